"""The training tasks of the outcomes benchmark, and the scenarios cut from them.

A task is a model, its data and its optimizer, written functionally so that one jitted
program can run many (policy, learning rate, seed, scenario) combinations side by side:

- ``transformer``: a 2-layer (1 with ``--quick``) decoder-only byte-level language model in
  Flax NNX, on English text that ships with CPython (the language reference in
  ``pydoc_data.topics``, 466 KB; the last 10% is held out for validation). AdamW
  (b2 = 0.95), linear warmup then cosine.
- ``lstm``: a byte-level LSTM language model on the same text, with Adam, warmup + cosine.
- ``rnn``: the vanilla tanh RNN of the demo on the adding problem (spectral radius 1.3),
  plain SGD and SGD with momentum 0.9, after a linear warmup.

Every run of a task is described by an :class:`Arm`; a scenario is a named subset of the arms.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gradclip_jax.examples import rnn as rnn_example


@dataclasses.dataclass(frozen=True)
class Arm:
    """One training run's setting, apart from the clipping policy."""

    lr: float
    seed: int
    scale: float = 1.0  # the loss is multiplied by this before differentiation
    momentum: float = 0.0
    spikes: bool = False  # multiply the gradient by SPIKE_FACTOR at the task's spike steps


SPIKE_FACTOR = 1e3


@dataclasses.dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    arms: Callable[[Arm], bool]


@dataclasses.dataclass(frozen=True)
class Task:
    """A model, its data and optimizer, the arms to run and the scenarios they form."""

    name: str
    steps: int
    warmup: int
    eval_every: int
    init: Callable[[jax.Array], Any]
    loss: Callable[[Any, Any], jax.Array]
    sample: Callable[[jax.Array], Any]
    val_batch: Any
    optimizer: Callable[[jax.Array, jax.Array], optax.GradientTransformation]
    arms: tuple[Arm, ...]
    scenarios: tuple[Scenario, ...]
    spike_steps: tuple[int, ...] = ()
    # XLA options for the task's programs (``jax.jit(compiler_options=...)``), as pairs.
    compiler_options: tuple[tuple[str, Any], ...] = ()


QUICK_COMPILER_OPTIONS: tuple[tuple[str, Any], ...] = (("xla_backend_optimization_level", 1),)
"""``--quick``'s programs are compiled with fewer LLVM passes: on 2 CPU cores it took a third
off their compile time (4-10 s each, most of a quick run) and left their run time level. The
full runs keep XLA's default, so that their committed figures reproduce bit for bit."""


def _options(quick: bool) -> tuple[tuple[str, Any], ...]:
    return QUICK_COMPILER_OPTIONS if quick else ()


def warmup_cosine(lr: jax.Array, warmup: int, steps: int) -> optax.Schedule:
    """Linear warmup to ``lr`` (which may be traced), then cosine decay to ``lr / 10``."""
    unit = optax.warmup_cosine_decay_schedule(0.0, 1.0, warmup, steps, end_value=0.1)
    return lambda count: lr * unit(count)


# ----------------------------------------------------------------------------- text data


def text_bytes() -> np.ndarray:
    """CPython's language reference (``pydoc_data.topics``) as bytes: real English text."""
    import pydoc_data.topics as topics

    text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)


def _lm_data(seq: int, batch: int, val_batches: int):
    data = text_bytes()
    cut = int(len(data) * 0.9)
    train = jnp.asarray(data[:cut], jnp.int32)
    val = data[cut:]
    # Fixed, non-overlapping validation windows.
    n = val_batches * batch
    stride = (len(val) - seq - 1) // n
    starts = np.arange(n) * stride
    windows = np.stack([val[s:s + seq + 1] for s in starts]).astype(np.int32)
    val_batch = jnp.asarray(windows.reshape(val_batches, batch, seq + 1))

    def sample(key):
        starts = jax.random.randint(key, (batch,), 0, train.shape[0] - seq - 1)
        return jax.vmap(lambda s: jax.lax.dynamic_slice(train, (s,), (seq + 1,)))(starts)

    return sample, val_batch


def _xent(logits, targets):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, targets))


# ----------------------------------------------------------------------------- transformer


def _transformer_module(d: int, heads: int, layers: int, seq: int):
    from flax import nnx

    class Block(nnx.Module):
        def __init__(self, rngs):
            self.ln1 = nnx.LayerNorm(d, rngs=rngs)
            self.qkv = nnx.Linear(d, 3 * d, rngs=rngs)
            self.proj = nnx.Linear(d, d, rngs=rngs)
            self.ln2 = nnx.LayerNorm(d, rngs=rngs)
            self.fc = nnx.Linear(d, 4 * d, rngs=rngs)
            self.out = nnx.Linear(4 * d, d, rngs=rngs)

        def __call__(self, x):
            b, t, _ = x.shape
            q, k, v = jnp.split(self.qkv(self.ln1(x)), 3, axis=-1)
            split = lambda a: a.reshape(b, t, heads, d // heads)  # noqa: E731
            att = jnp.einsum("bqhc,bkhc->bhqk", split(q), split(k)) / math.sqrt(d // heads)
            att = jnp.where(jnp.tril(jnp.ones((t, t), bool)), att, -1e9)
            y = jnp.einsum("bhqk,bkhc->bqhc", jax.nn.softmax(att, axis=-1), split(v))
            x = x + self.proj(y.reshape(b, t, d))
            return x + self.out(jax.nn.gelu(self.fc(self.ln2(x))))

    class GPT(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(256, d, rngs=rngs)
            self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (seq, d)))
            self.blocks = nnx.List([Block(rngs) for _ in range(layers)]) if hasattr(
                nnx, "List") else [Block(rngs) for _ in range(layers)]
            self.ln_f = nnx.LayerNorm(d, rngs=rngs)
            self.head = nnx.Linear(d, 256, rngs=rngs)

        def __call__(self, tokens):
            x = self.embed(tokens) + self.pos[...][: tokens.shape[1]]
            for block in self.blocks:
                x = block(x)
            return self.head(self.ln_f(x))

    return GPT


def _seeds(asked: int | None, default: int, first: int = 0) -> tuple[int, ...]:
    """``n`` seeds per learning rate from ``first`` on: ``n`` is ``asked`` (``outcomes
    --seeds``) or the task's default, ``first`` is ``outcomes --first-seed`` (0 by default),
    so a second set of seeds can check a result without rerunning the first."""
    n = default if asked is None else asked
    return tuple(range(first, first + n))


def at_rates(task: Task, rates: Sequence[float]) -> Task | None:
    """``task`` with only its arms at these peak learning rates (``outcomes --lr``), and only
    the scenarios that keep an arm; None when no arm is left."""
    arms = tuple(a for a in task.arms if any(math.isclose(a.lr, r, rel_tol=1e-9)
                                             for r in rates))
    if not arms:
        return None
    kept = ", ".join(f"{r:g}" for r in sorted({a.lr for a in arms}))
    scenarios = tuple(dataclasses.replace(sc, title=f"{sc.title}; only the runs at {kept} (--lr)")
                      for sc in task.scenarios if any(sc.arms(a) for a in arms))
    return dataclasses.replace(task, arms=arms, scenarios=scenarios)


def transformer(*, quick: bool, seeds: int | None = None, first_seed: int = 0) -> Task:
    from flax import nnx

    d, heads, layers, seq, batch = (32, 2, 1, 32, 8) if quick else (48, 4, 2, 64, 8)
    steps = 60 if quick else 240
    warmup = steps // 10
    lrs = (3e-3, 3e-2) if quick else (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
    # Six seeds: with three, policies within 0.005 of each other swapped places between
    # reruns (c = 0.1 was 0.005 below c = 1 over 15 runs, 0.0025 above it over 30).
    seeds = _seeds(seeds, 2 if quick else 6, first_seed)
    scales = (1.0, 100.0, 0.01)
    gpt = _transformer_module(d, heads, layers, seq)
    # Only the structure: built abstractly, without running (and compiling) the initialisers.
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: gpt(nnx.Rngs(0))))
    sample, val_batch = _lm_data(seq, batch, 2 if quick else 4)

    def init(key):
        return nnx.split(gpt(nnx.Rngs(params=key)))[1]

    def loss(params, tokens):
        logits = nnx.merge(graphdef, params)(tokens[:, :-1])
        return _xent(logits, tokens[:, 1:])

    def optimizer(lr, momentum):
        del momentum
        return optax.adamw(warmup_cosine(lr, warmup, steps), b2=0.95, weight_decay=0.1)

    arms = tuple(Arm(lr, s, scale=sc) for sc in scales for lr in lrs for s in seeds)
    return Task(
        name="transformer", steps=steps, warmup=warmup, eval_every=steps // 6,
        init=init, loss=loss, sample=sample, val_batch=val_batch, optimizer=optimizer,
        arms=arms, compiler_options=_options(quick),
        scenarios=(
            Scenario("transformer", f"a. byte-level transformer LM (NNX, {layers} layers, "
                     f"d={d}), AdamW warmup + cosine, {len(lrs)} peak learning rates "
                     f"{lrs[0]:g}..{lrs[-1]:g}", lambda a: a.scale == 1.0),
            Scenario("transformer_x100", "d. the transformer with its loss multiplied by 100",
                     lambda a: a.scale == 100.0),
            Scenario("transformer_x0.01", "d. the transformer with its loss multiplied by 0.01",
                     lambda a: a.scale == 0.01),
        ),
    )


# ----------------------------------------------------------------------------- LSTM


def lstm(*, quick: bool, seeds: int | None = None, first_seed: int = 0) -> Task:
    embed, hidden, seq, batch = (16, 64, 32, 8) if quick else (32, 96, 48, 8)
    steps = 60 if quick else 240
    warmup = steps // 10
    lrs = (3e-3, 3e-2) if quick else (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
    stable_lr = lrs[0] if quick else 3e-3
    seeds = _seeds(seeds, 2 if quick else 3, first_seed)
    sample, val_batch = _lm_data(seq, batch, 2 if quick else 4)

    def init(key):
        k = jax.random.split(key, 4)
        glorot = jax.nn.initializers.glorot_uniform()
        return {
            "embed": jax.random.normal(k[0], (256, embed)) * 0.1,
            "w_x": glorot(k[1], (embed, 4 * hidden)),
            "w_h": jax.nn.initializers.orthogonal()(k[2], (hidden, 4 * hidden)),
            # Forget-gate bias of 1, the usual LSTM initialisation.
            "b": jnp.zeros((4 * hidden,)).at[hidden:2 * hidden].set(1.0),
            "w_out": glorot(k[3], (hidden, 256)),
            "b_out": jnp.zeros((256,)),
        }

    def loss(params, tokens):
        x = params["embed"][tokens[:, :-1]]

        def cell(carry, x_t):
            h, c = carry
            z = x_t @ params["w_x"] + h @ params["w_h"] + params["b"]
            i, f, g, o = jnp.split(z, 4, axis=-1)
            c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
            h = jax.nn.sigmoid(o) * jnp.tanh(c)
            return (h, c), h

        zeros = jnp.zeros((tokens.shape[0], hidden))
        _, hs = jax.lax.scan(cell, (zeros, zeros), jnp.swapaxes(x, 0, 1))
        logits = jnp.swapaxes(hs, 0, 1) @ params["w_out"] + params["b_out"]
        return _xent(logits, tokens[:, 1:])

    def optimizer(lr, momentum):
        del momentum
        return optax.adam(warmup_cosine(lr, warmup, steps))

    arms = tuple(Arm(lr, s) for lr in lrs for s in seeds)
    arms += tuple(Arm(stable_lr, s, spikes=True) for s in seeds)
    spike_steps = (warmup // 2, steps // 3, (2 * steps) // 3)
    return Task(
        name="lstm", steps=steps, warmup=warmup, eval_every=steps // 6,
        init=init, loss=loss, sample=sample, val_batch=val_batch, optimizer=optimizer,
        arms=arms, spike_steps=spike_steps, compiler_options=_options(quick),
        scenarios=(
            Scenario("lstm", f"b. byte-level LSTM LM (hidden {hidden}), Adam warmup + cosine, "
                     f"{len(lrs)} peak learning rates {lrs[0]:g}..{lrs[-1]:g}",
                     lambda a: not a.spikes),
            Scenario("lstm_spikes", f"e. the LSTM at learning rate {stable_lr:g} with x1e3 "
                     f"gradient spikes at steps {spike_steps}", lambda a: a.spikes),
        ),
    )


# ----------------------------------------------------------------------------- vanilla RNN


def rnn(*, quick: bool, seeds: int | None = None, first_seed: int = 0) -> Task:
    cfg = rnn_example.Config(seq_len=20, hidden=32, batch=32)
    steps = 300 if quick else 1500
    warmup = 100 if not quick else 30
    sgd_lrs = (0.1, 0.2) if quick else (0.05, 0.1, 0.2, 0.3)
    mom_lrs = (0.01, 0.02) if quick else (0.005, 0.01, 0.02, 0.03)
    seeds = _seeds(seeds, 2 if quick else 24, first_seed)
    val_batch = rnn_example.sample_batch(jax.random.key(12345), dataclasses.replace(
        cfg, batch=512))

    def init(key):
        return rnn_example.init_params(key, cfg)

    def loss(params, batch):
        return rnn_example.loss_fn(params, *batch)

    def sample(key):
        return rnn_example.sample_batch(key, cfg)

    def optimizer(lr, momentum):
        return optax.sgd(optax.linear_schedule(0.0, lr, warmup), momentum=momentum)

    arms = tuple(Arm(lr, s) for lr in sgd_lrs for s in seeds)
    arms += tuple(Arm(lr, s, momentum=0.9) for lr in mom_lrs for s in seeds)
    return Task(
        name="rnn", steps=steps, warmup=warmup, eval_every=steps // 10,
        init=init, loss=loss, sample=sample, val_batch=(val_batch[0][None], val_batch[1][None]),
        optimizer=optimizer, arms=arms, compiler_options=_options(quick),
        scenarios=(
            Scenario("rnn_sgd", f"c. vanilla tanh RNN, adding problem, spectral radius "
                     f"{cfg.radius}, plain SGD, learning rates {sgd_lrs}",
                     lambda a: a.momentum == 0.0),
            Scenario("rnn_momentum", f"c. the vanilla RNN with SGD + momentum 0.9, learning "
                     f"rates {mom_lrs}", lambda a: a.momentum > 0.0),
        ),
    )


TASKS = {"transformer": transformer, "lstm": lstm, "rnn": rnn}
