"""Reading clip states back: ``stats``, ``norm_percentile`` and ``diagnose``.

Each function finds the :class:`ClipState` of every gradclip_jax transform anywhere inside a
nested optax state (chain tuples, ``named_chain`` dicts, ``inject_hyperparams``,
``MultiSteps``, ``masked``, Flax NNX optimizer states whose leaves are wrapped in variables).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from gradclip_jax._core import NO_THRESHOLD, ClipState
from gradclip_jax._sketch import NormSketch, sketch_quantile
from gradclip_jax._validation import check_range

# diagnose's rules; the rates are those kept in ClipState.
RECENT_MOSTLY = 0.5  # fast clip rate above which "most recent steps" are clipped
RARELY = 0.01  # clip fraction under which clipping is a rare safety net
NEAR_ZERO = 0.02  # fast clip rate that counts as "has dropped to near zero"
WAS_STABLE = 0.25  # slow clip rate under which the run was stable before a burst
EARLY_STEPS = 100  # before this many steps, frequent clipping is early-training behaviour


def _leaf(x: Any) -> jax.Array:
    """The array inside ``x``, unwrapping containers such as Flax NNX variables."""
    leaves = jax.tree.leaves(x)
    if len(leaves) != 1:
        raise TypeError(f"expected a single array in a clip state field, got {x!r}")
    return jnp.asarray(leaves[0])


def _plain_sketch(sketch: NormSketch | None) -> NormSketch | None:
    if sketch is None:
        return None
    return NormSketch(counts=_leaf(sketch.counts), recorded=_leaf(sketch.recorded),
                      relative_accuracy=sketch.relative_accuracy)


def _plain(state: ClipState) -> ClipState:
    sketches = ("histogram", "recent")
    fields = {f: _leaf(getattr(state, f)) for f in ClipState._fields if f not in sketches}
    return ClipState(**fields, histogram=_plain_sketch(state.histogram),
                     recent=_plain_sketch(state.recent))


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def find_clip_states(opt_state: Any) -> dict[str, ClipState]:
    """Every gradclip_jax state inside ``opt_state``, keyed by its path ("" when alone).

    Paths join the keys that lead to each state with "/" (``"0"`` for the first element of a
    chain, ``"clip"`` for a ``named_chain`` entry, ``"inner_state/0"`` inside
    ``inject_hyperparams``).

    Example:
      >>> import optax, gradclip_jax
      >>> tx = optax.named_chain(("clip", gradclip_jax.clip_by_value(1.0)),
      ...                        ("guard", gradclip_jax.clip_by_global_norm(5.0)),
      ...                        ("sgd", optax.sgd(0.1)))
      >>> sorted(gradclip_jax.find_clip_states(tx.init(None)))
      ['clip', 'guard']
    """
    found = jax.tree_util.tree_flatten_with_path(
        opt_state, is_leaf=lambda x: isinstance(x, ClipState)
    )[0]
    states = {
        "/".join(_key_name(k) for k in path): _plain(leaf)
        for path, leaf in found
        if isinstance(leaf, ClipState)
    }
    if len(states) == 1:
        return {"": next(iter(states.values()))}
    return states


def _one_state(opt_state: Any, which: str | None) -> tuple[str, ClipState]:
    states = find_clip_states(opt_state)
    if not states:
        raise ValueError("no gradclip_jax clip state found in opt_state")
    if which is None:
        if len(states) > 1:
            raise ValueError(
                f"opt_state holds {len(states)} clip states {sorted(states)}; pass which=..."
            )
        return next(iter(states.items()))
    if which not in states:
        raise ValueError(f"which must be one of {sorted(states)}, got {which!r}")
    return which, states[which]


def stats(opt_state: Any) -> dict[str, jax.Array]:
    """Diagnostics of every clip transform in ``opt_state`` as a flat dict of arrays.

    Keys (prefixed ``"<path>/"`` when the state holds several clip transforms):

    - ``grad_norm``: global L2 norm of the last finite unclipped update (float32);
    - ``threshold``: the threshold applied at the last step (inf when none applied);
    - ``steps``, ``clipped_steps``, ``nonfinite_steps``: int32 counters;
    - ``clip_fraction``: ``clipped_steps / steps``;
    - ``clip_rate_recent`` / ``clip_rate_long``: moving averages of the clip indicator over
      about 20 and 500 steps.

    Works inside ``jit`` (values are arrays). Log them every N steps: the unclipped norm and
    the clip rate are what tell a safety net from a learning-rate cap.

    Example:
      >>> import jax.numpy as jnp, optax, gradclip_jax
      >>> tx = optax.chain(gradclip_jax.clip_by_global_norm(1.0), optax.adam(1e-3))
      >>> state = tx.init({"w": jnp.zeros(2)})
      >>> _, state = tx.update({"w": jnp.array([3.0, 4.0])}, state)
      >>> {k: float(v) for k, v in gradclip_jax.stats(state).items()}["clip_fraction"]
      1.0
    """
    out: dict[str, jax.Array] = {}
    for name, s in find_clip_states(opt_state).items():
        prefix = f"{name}/" if name else ""
        steps = s.count
        out.update({
            f"{prefix}grad_norm": s.grad_norm,
            f"{prefix}threshold": jnp.where(s.threshold >= NO_THRESHOLD, jnp.inf, s.threshold),
            f"{prefix}steps": steps,
            f"{prefix}clipped_steps": s.clipped_steps,
            f"{prefix}nonfinite_steps": s.nonfinite_steps,
            f"{prefix}clip_fraction": s.clipped_steps / jnp.maximum(steps, 1).astype(jnp.float32),
            f"{prefix}clip_rate_recent": s.clip_rate_fast,
            f"{prefix}clip_rate_long": s.clip_rate_slow,
        })
    return out


def norm_percentile(
    opt_state: Any, percentile: float | jax.Array, *, which: str | None = None
) -> jax.Array:
    """Estimated ``percentile`` of the unclipped norms a clip transform has recorded.

    Every gradclip_jax transform keeps the histogram, so this answers "what threshold would
    the 90th-percentile rule pick for my run?" whichever clip you use. The estimate is within
    the histogram's relative accuracy (1% by default) of the exact empirical percentile
    (between NumPy's ``method="lower"`` and ``"higher"``) for norms in 1e-8..1e8; NaN when
    nothing was recorded yet.

    Args:
      opt_state: an optax state holding one clip state (or several, with ``which``).
      percentile: in [0, 100].
      which: the path of the clip state (a key of :func:`find_clip_states`) when there are
        several.

    Example:
      >>> import jax.numpy as jnp, gradclip_jax
      >>> tx = gradclip_jax.clip_by_global_norm(10.0)
      >>> state = tx.init(None)
      >>> for n in range(1, 101):
      ...     _, state = tx.update({"w": jnp.array([float(n)])}, state)
      >>> p90 = float(gradclip_jax.norm_percentile(state, 90))  # exact: 90
      >>> abs(p90 - 90) <= 0.01 * 90
      True
    """
    check_range("percentile", percentile, low=0.0, high=100.0, low_open=False, high_open=False)
    _, state = _one_state(opt_state, which)
    return sketch_quantile(state.histogram, jnp.asarray(percentile, jnp.float32) / 100.0)


@dataclasses.dataclass(frozen=True)
class Finding:
    """One observation of :func:`diagnose`.

    Attributes:
      level: ``"info"`` or ``"warning"``.
      message: a sentence for a person, with the figures it is based on.
      clip: path of the clip state it is about ("" when there is one).
    """

    level: str
    message: str
    clip: str = ""


def _diagnose_one(name: str, s: ClipState) -> list[Finding]:
    steps = int(s.count)
    found: list[Finding] = []

    def say(level: str, message: str) -> None:
        found.append(Finding(level, (f"[{name}] " if name else "") + message, name))

    if steps == 0:
        say("info", "no steps recorded yet.")
        return found
    nonfinite = int(s.nonfinite_steps)
    if nonfinite:
        say(
            "warning",
            f"{nonfinite} of {steps} steps had a NaN or Inf gradient; their updates were "
            "zeroed or passed on (see nonfinite=). Look for a loss blow-up, a division by "
            "zero or a too-high learning rate.",
        )
    fraction = int(s.clipped_steps) / steps
    recent = float(s.clip_rate_fast)
    slow = float(s.clip_rate_slow)
    p90 = float(sketch_quantile(s.histogram, 0.9))
    suggestion = f" The 90th percentile of the unclipped norms is {p90:.3g}." if p90 == p90 else ""
    threshold = float(s.threshold)
    current = "none" if threshold >= NO_THRESHOLD else f"{threshold:.3g}"

    if recent >= RECENT_MOSTLY:
        if s.recent is not None:
            say(
                "info",
                f"clipped on {recent:.0%} of recent steps (threshold {current}), by design: "
                "the windowed percentile clip caps every update at a low percentile of the "
                "recent norms. The usual heuristic would call this a learning-rate cap; on "
                "training runs (gradclip-jax outcomes) it ended with a lower validation loss "
                "than rare clipping. Judge it by your validation loss.",
            )
        elif steps < EARLY_STEPS:
            say(
                "info",
                f"clipped on {recent:.0%} of recent steps in the first {steps} steps. Early "
                "training is often unstable and clipping is doing its job; check again later.",
            )
        elif slow < WAS_STABLE:
            say(
                "warning",
                f"the run was stable (long-run clip rate {slow:.0%}) and now clips on "
                f"{recent:.0%} of recent steps: something changed, usually the learning rate "
                "or the data, and clipping may be masking it." + suggestion,
            )
        else:
            say(
                "warning",
                f"clipped on {recent:.0%} of recent steps (threshold {current}): by the usual "
                "heuristic the threshold acts as a per-step learning-rate cap rather than a "
                "safety net, and should be raised." + suggestion + " Measured on training runs "
                "(gradclip-jax outcomes), frequent clipping is not always worse: c=1 clipped "
                "most steps of a vanilla RNN trained with SGD and still gave the lowest "
                "validation loss of the fixed thresholds. Compare validation loss before "
                "raising it.",
            )
    elif fraction < RARELY:
        say(
            "info",
            f"clipped on {int(s.clipped_steps)} of {steps} steps ({fraction:.1%}): a rare "
            "safety net, the threshold is fine.",
        )
    elif recent <= NEAR_ZERO:
        say(
            "info",
            f"clipping was frequent earlier ({fraction:.1%} of all steps) and has dropped to "
            f"near zero ({recent:.1%} of recent steps): healthy, early training was unstable "
            "and clipping kept it from diverging.",
        )
    else:
        say(
            "info",
            f"clipped on {recent:.0%} of recent steps and {fraction:.1%} of all steps "
            f"(threshold {current}).",
        )
    return found


def diagnose(opt_state: Any) -> list[Finding]:
    """Reads the clip states in ``opt_state`` and says, in words, what clipping is doing.

    Rules (each finding carries the figures it is based on):

    - any non-finite steps: warning with the count;
    - clipped on most recent steps (moving average over ~20 steps >= 50%): a warning that the
      threshold acts as a learning-rate cap by the usual heuristic, with the 90th-percentile
      norm as a suggestion, and what the training-outcomes benchmark measured (frequent
      clipping can still give the lowest validation loss); for the windowed percentile clip,
      which clips most steps by design, an info saying so;
      or, when the long-run rate (~500 steps) was low, a warning that the run was stable and
      something changed (learning rate, data), which clipping may be masking; within the
      first 100 steps, an info that early training often clips;
    - clipped on under 1% of all steps: info, the threshold is fine;
    - frequent clipping earlier that has dropped to near zero: info, healthy;
    - otherwise an info with the rates.

    Call it outside ``jit`` (it reads concrete values).

    Example:
      >>> import jax.numpy as jnp, gradclip_jax
      >>> tx = gradclip_jax.clip_by_global_norm(1.0)
      >>> state = tx.init(None)
      >>> for _ in range(200):
      ...     _, state = tx.update({"w": jnp.array([0.5])}, state)
      >>> [f.level for f in gradclip_jax.diagnose(state)]
      ['info']
    """
    states = find_clip_states(opt_state)
    if not states:
        raise ValueError("no gradclip_jax clip state found in opt_state")
    findings: list[Finding] = []
    for name, s in states.items():
        findings.extend(_diagnose_one(name, s))
    return findings
