"""A vanilla RNN on the adding problem, trained under several clipping policies at once.

The adding problem (Hochreiter and Schmidhuber 1997; used by Pascanu, Mikolov and Bengio 2013
to study exploding gradients): each input step carries a random value in [0, 1] and a marker;
exactly two steps are marked, and the target is the sum of their values. Predicting the mean
(1.0) gives a loss of 1/6; learning the task needs gradients carried across the sequence. A
tanh RNN whose recurrent matrix starts with a spectral radius above 1 and is trained with
plain SGD meets the cliffs of the paper: most steps are tame, a few have huge gradients.
With a short learning-rate warmup (as any real run has) the first steps are harmless, and the
runs that diverge do so later, when training walks into a cliff.

Everything is one jitted program: seeds are vmapped, steps run in ``lax.scan``, and each step
logs the loss, the unclipped global norm and the threshold that was applied.

Example:
  >>> from gradclip_jax.examples import rnn
  >>> cfg = rnn.Config(steps=20, seeds=2, seq_len=10, hidden=8)
  >>> result = rnn.train(cfg, rnn.policies(cfg)["norm clip 1.0"])
  >>> result.loss.shape, result.grad_norm.shape
  ((2, 20), (2, 20))
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import gradclip_jax as gc


@dataclasses.dataclass(frozen=True)
class Config:
    """Experiment settings.

    Attributes:
      seq_len: length of each adding-problem sequence.
      hidden: RNN state size.
      batch: sequences per step.
      steps: optimizer steps.
      seeds: independent runs (vmapped).
      learning_rate: plain SGD step size (after the warmup).
      lr_warmup: if > 0, the step size rises linearly from 0 over this many steps.
      radius: spectral radius of the initial recurrent matrix (> 1: exploding gradients).
      spike_every: if > 0, multiply the gradient by ``spike_factor`` every this many steps
        (an injected fault, for the "stable run with spikes" scenario).
      spike_factor: size of the injected spikes.
      diverged_loss: a run whose final loss is above this (or not finite) has diverged.
    """

    seq_len: int = 20
    hidden: int = 32
    batch: int = 32
    steps: int = 1500
    seeds: int = 16
    learning_rate: float = 0.1
    lr_warmup: int = 0
    radius: float = 1.3
    spike_every: int = 0
    spike_factor: float = 1000.0
    diverged_loss: float = 0.5


SCENARIOS = {
    "exploding": "SGD warmed up over 100 steps to learning rate 0.2, recurrent matrix of "
    "spectral radius 1.3: some seeds walk into a cliff and explode",
    "spikes": "a stable run (learning rate 0.05) hit by a 1000x gradient spike every 97 steps",
}


def scenario(name: str, **overrides) -> Config:
    """The demo's two settings: ``"exploding"`` and ``"spikes"`` (see ``SCENARIOS``)."""
    if name not in SCENARIOS:
        raise ValueError(f"scenario must be one of {sorted(SCENARIOS)}, got {name!r}")
    if name == "exploding":
        base = Config(learning_rate=0.2, lr_warmup=100)
    else:
        base = Config(learning_rate=0.05, spike_every=97)
    return dataclasses.replace(base, **overrides)


class Result(NamedTuple):
    """Per-seed, per-step logs of one policy: arrays of shape (seeds, steps)."""

    loss: np.ndarray
    grad_norm: np.ndarray
    threshold: np.ndarray
    clipped: np.ndarray

    def diverged(self, cfg: Config) -> np.ndarray:
        final = self.final_loss()
        return ~np.isfinite(final) | (final > cfg.diverged_loss)

    def final_loss(self, window: int = 100) -> np.ndarray:
        """Mean loss of each seed over its last ``window`` steps."""
        return np.mean(self.loss[:, -window:], axis=1)


FIXED_NORMS = (0.1, 1.0, 10.0)
"""The fixed global-norm thresholds the percentile clip is compared with."""


def optimizer(cfg: Config) -> optax.GradientTransformation:
    """Plain SGD at ``cfg.learning_rate``, after a linear warmup if ``cfg.lr_warmup``."""
    if cfg.lr_warmup:
        return optax.sgd(optax.linear_schedule(0.0, cfg.learning_rate, cfg.lr_warmup))
    return optax.sgd(cfg.learning_rate)


def policies(cfg: Config) -> dict[str, optax.GradientTransformation]:
    """The clipping policies the demo compares, each chained into :func:`optimizer`.

    No clipping, a value clip, the global-norm clip at each of ``FIXED_NORMS`` and the
    percentile clip with its defaults (the name of a norm clip is ``f"norm clip {c}"``).
    """
    sgd = optimizer(cfg)
    return {
        "no clipping": sgd,
        "value clip 0.1": optax.chain(gc.clip_by_value(0.1), sgd),
        **{f"norm clip {c}": optax.chain(gc.clip_by_global_norm(c), sgd) for c in FIXED_NORMS},
        "percentile clip": optax.chain(gc.percentile_clip(), sgd),
    }


def init_params(key: jax.Array, cfg: Config) -> dict[str, jax.Array]:
    k_in, k_rec, k_out = jax.random.split(key, 3)
    w = jax.random.normal(k_rec, (cfg.hidden, cfg.hidden))
    w = w * cfg.radius / jnp.max(jnp.abs(jnp.linalg.eigvals(w)))
    return {
        "w_in": jax.random.normal(k_in, (2, cfg.hidden)) / np.sqrt(2.0),
        "w_rec": w.real,
        "b": jnp.zeros((cfg.hidden,)),
        "w_out": jax.random.normal(k_out, (cfg.hidden,)) / np.sqrt(cfg.hidden),
        "b_out": jnp.ones(()),
    }


def sample_batch(key: jax.Array, cfg: Config) -> tuple[jax.Array, jax.Array]:
    k_val, k_pos = jax.random.split(key)
    values = jax.random.uniform(k_val, (cfg.batch, cfg.seq_len))
    half = cfg.seq_len // 2
    pos = jax.random.randint(k_pos, (cfg.batch, 2), 0, half) + jnp.array([0, half])
    markers = jax.nn.one_hot(pos, cfg.seq_len).sum(axis=1)
    inputs = jnp.stack([values, markers], axis=-1)
    return inputs, jnp.sum(values * markers, axis=1)


def loss_fn(params, inputs, targets):
    def cell(h, x):
        h = jnp.tanh(x @ params["w_in"] + h @ params["w_rec"] + params["b"])
        return h, None

    h0 = jnp.zeros((inputs.shape[0], params["w_rec"].shape[0]))
    h, _ = jax.lax.scan(cell, h0, jnp.swapaxes(inputs, 0, 1))
    pred = h @ params["w_out"] + params["b_out"]
    return jnp.mean((pred - targets) ** 2)


def train(cfg: Config, tx: optax.GradientTransformation, *, seed: int = 0) -> Result:
    """Trains ``cfg.seeds`` RNNs with ``tx`` and returns their per-step logs."""

    def one_run(key):
        k_init, k_data = jax.random.split(key)
        params = init_params(k_init, cfg)
        opt_state = tx.init(params)

        def step(carry, i):
            params, opt_state = carry
            inputs, targets = sample_batch(jax.random.fold_in(k_data, i), cfg)
            loss, grads = jax.value_and_grad(loss_fn)(params, inputs, targets)
            if cfg.spike_every:
                spike = jnp.where((i + 1) % cfg.spike_every == 0, cfg.spike_factor, 1.0)
                grads = jax.tree.map(lambda g: g * spike, grads)
            updates, new_state = tx.update(grads, opt_state, params)
            norm, threshold, clipped = _step_logs(new_state, opt_state, grads)
            return (optax.apply_updates(params, updates), new_state), (
                loss, norm, threshold, clipped)

        _, logs = jax.lax.scan(step, (params, opt_state), jnp.arange(cfg.steps))
        return logs

    keys = jax.random.split(jax.random.key(seed), cfg.seeds)
    logs = jax.jit(jax.vmap(one_run))(keys)
    return Result(*(np.asarray(x) for x in logs))


def _step_logs(new_state, old_state, grads):
    new, old = gc.find_clip_states(new_state), gc.find_clip_states(old_state)
    if not new:  # no clip transform: log the norm ourselves; nothing was clipped
        return gc.global_norm(grads), jnp.float32(jnp.inf), jnp.bool_(False)
    (now,), (before,) = new.values(), old.values()
    s = gc.stats(now)
    return s["grad_norm"], s["threshold"], now.clipped_steps > before.clipped_steps
