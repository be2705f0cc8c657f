"""The one clipping core that every transform in gradclip_jax runs.

A transform differs from the others only in how it picks its threshold (a fixed value or
schedule, or a percentile of the recorded norms) and in how it applies it (rescale the whole
update, or clip each coordinate). Everything else happens here, once:

1. measure the update in a single read: the sum of squares (for the L2 norm that diagnostics
   record and the non-finite check) plus, when needed, the measure the threshold is compared
   with;
2. decide whether the step is finite;
3. apply the threshold, or handle the non-finite update (``"zero"`` or ``"propagate"``);
4. record diagnostics: the L2 norm into the histogram, step / clip / non-finite counters and
   fast and slow moving averages of the clip rate.

The state never takes a NaN or an Inf: non-finite norms are not recorded, and "no threshold"
is stored as float32's largest finite value.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from gradclip_jax import _norms
from gradclip_jax._sketch import NormSketch, sketch_add, sketch_init
from gradclip_jax._validation import is_traced

NO_THRESHOLD = float(jnp.finfo(jnp.float32).max)
"""Stored as the threshold when none applies (no clipping); ``stats`` reports it as inf."""

FAST_RATE = 1.0 / 20.0
SLOW_RATE = 1.0 / 500.0

NORM = "norm"
VALUE = "value"


class ClipState(NamedTuple):
    """State of every gradclip_jax transform.

    Attributes:
      count: int32, update steps seen, finite or not.
      threshold: float32, the threshold applied at the last step (``NO_THRESHOLD`` when none).
      grad_norm: float32, global L2 norm of the last finite unclipped update.
      clipped_steps: int32, steps on which the update was changed by the threshold.
      nonfinite_steps: int32, steps whose update held a NaN or an Inf.
      clip_rate_fast: float32, moving average of "this step was clipped" over ~20 steps.
      clip_rate_slow: float32, the same over ~500 steps.
      histogram: :class:`NormSketch` of the finite unclipped L2 norms.
      recent: for the percentile clip with a ``window``, a second sketch of the same norms
        whose counts decay, so it holds about the last ``window`` of them; None otherwise.
    """

    count: jax.Array
    threshold: jax.Array
    grad_norm: jax.Array
    clipped_steps: jax.Array
    nonfinite_steps: jax.Array
    clip_rate_fast: jax.Array
    clip_rate_slow: jax.Array
    histogram: NormSketch
    recent: NormSketch | None = None


ThresholdFn = Callable[[ClipState], jax.Array]


def init_state(relative_accuracy: float, *, weighted: bool, recent: bool = False) -> ClipState:
    f32 = jnp.float32
    return ClipState(
        count=jnp.zeros((), jnp.int32),
        threshold=jnp.full((), NO_THRESHOLD, f32),
        grad_norm=jnp.zeros((), f32),
        clipped_steps=jnp.zeros((), jnp.int32),
        nonfinite_steps=jnp.zeros((), jnp.int32),
        clip_rate_fast=jnp.zeros((), f32),
        clip_rate_slow=jnp.zeros((), f32),
        histogram=sketch_init(relative_accuracy, weighted=weighted),
        recent=sketch_init(relative_accuracy, weighted=True) if recent else None,
    )


def _moving_average(avg: jax.Array, x: jax.Array, rate: float, count: jax.Array) -> jax.Array:
    # The first 1/rate steps use 1/count, giving the exact running mean while the average
    # warms up instead of a bias towards the initial zero.
    step_rate = jnp.maximum(jnp.float32(rate), 1.0 / count.astype(jnp.float32))
    return avg + step_rate * (x.astype(jnp.float32) - avg)


def _scale_leaf(g: jax.Array, scale: jax.Array) -> jax.Array:
    # Multiply in at least float32 and round once, so bfloat16/float16 updates are scaled as
    # accurately as their dtype allows.
    wide = jnp.promote_types(g.dtype, jnp.float32)
    return (g.astype(wide) * scale.astype(wide)).astype(g.dtype)


def _clip_leaf(g: jax.Array, limit: jax.Array) -> jax.Array:
    # Coordinates within the limit are selected, not passed through clip, so they come back
    # bit for bit (subnormals included). Comparisons rather than abs(g): an abs here would be
    # shared with the norm's reduction, and XLA would then write it out and read it back.
    wide = jnp.promote_types(g.dtype, jnp.float32)
    limit = limit.astype(wide)
    x = g.astype(wide)
    bounded = jnp.clip(x, -limit, limit).astype(g.dtype)
    return jnp.where((x > limit) | (x < -limit), bounded, g)


def _computed_once(scale: jax.Array, clipped: jax.Array, finite: jax.Array):
    """The per-step scalars, behind an op that XLA computes once instead of per element.

    Left to itself XLA fuses the whole scalar computation behind them (combining every leaf's
    partial norms, the threshold rule, a histogram quantile) into the elementwise update of
    every leaf, where it can run once per element: 50x slower on CPU for 96 leaves of an odd
    length. ``optimization_barrier`` does not stop that on CPU, and XLA simplifies small
    reductions away; it never fuses a sort, so the scalars pass through one (of two equal
    copies, which returns them exactly).
    """
    dtype = scale.dtype
    packed = jnp.stack([scale, clipped.astype(dtype), finite.astype(dtype)])
    once = lax.sort(jnp.stack([packed, packed]), dimension=0)[0]
    return once[0], once[1] > 0, once[2] > 0


def clip_transformation(
    threshold_fn: ThresholdFn,
    *,
    mode: str,
    ord: float = 2,
    nonfinite: str = "zero",
    axis_name: str | Sequence[str] | None = None,
    relative_accuracy: float = 0.01,
    decay: Any = None,
    recent_decay: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """Builds a clip transform from a threshold rule.

    Args:
      threshold_fn: maps the state before this step to the float32 threshold for this step
        (``NO_THRESHOLD`` for none). It sees the norms recorded before the current one.
      mode: ``NORM`` rescales the whole update when its ``ord``-norm exceeds the threshold;
        ``VALUE`` clips each coordinate to [-threshold, threshold].
      ord: the norm compared with the threshold in ``NORM`` mode.
      nonfinite: ``"zero"`` or ``"propagate"``.
      axis_name: mesh axes the update is split over inside ``shard_map``.
      relative_accuracy: accuracy of the norm histogram, read by ``init`` only: it fixes the
        histogram's shape, and ``update`` takes the mapping from the state. (Under
        ``optax.inject_hyperparams`` a later change of the injected value has no effect.)
      decay: per-recorded-norm forgetting factor of the histogram, or None.
      recent_decay: if not None, the state also keeps ``recent``, a sketch of the same norms
        with this forgetting factor.
    """
    measure = _norms.norm_kinds(ord) if mode == NORM else (_norms.MAXABS,)
    kinds = (_norms.SUMSQ,) + tuple(k for k in measure if k != _norms.SUMSQ)

    def init_fn(params):
        del params
        if is_traced(relative_accuracy):
            raise TypeError(
                "relative_accuracy sets the shape of the norm histogram, so init needs a "
                "concrete value; call init outside jit or pass it in static_args"
            )
        return init_state(float(relative_accuracy), weighted=decay is not None,
                          recent=recent_decay is not None)

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        threshold = jnp.asarray(threshold_fn(state), jnp.float32)
        measures = _norms.reduce_tree(updates, kinds, axis_name)
        l2 = _norms.l2_from(measures).astype(jnp.float32)
        finite = jnp.isfinite(l2)
        measured = _norms.norm_from(measures, ord) if mode == NORM else measures[_norms.MAXABS]
        clipped = finite & (measured > threshold)

        scale = jnp.where(clipped, threshold / measured, 1.0) if mode == NORM else threshold
        scale, clipped, finite = _computed_once(scale, clipped, finite)
        if mode == NORM:
            apply = lambda g: _scale_leaf(g, scale)  # noqa: E731
        else:
            apply = lambda g: _clip_leaf(g, scale)  # noqa: E731
        # Selecting g itself when nothing is clipped returns it bit for bit (multiplying by 1
        # would not: XLA flushes subnormals to zero on CPU), and returns a non-finite update
        # untouched under nonfinite="propagate" (clipped is False when not finite).
        kept = lambda g: jnp.where(clipped, apply(g), g)  # noqa: E731
        if nonfinite == "zero":
            out = lambda g: jnp.where(finite, kept(g), jnp.zeros_like(g))  # noqa: E731
        else:
            out = kept
        new_updates = jax.tree.map(out, updates)

        count = state.count + 1
        new_state = ClipState(
            count=count,
            threshold=jnp.where(threshold < NO_THRESHOLD, threshold, NO_THRESHOLD),
            grad_norm=jnp.where(finite, l2, state.grad_norm),
            clipped_steps=state.clipped_steps + clipped.astype(jnp.int32),
            nonfinite_steps=state.nonfinite_steps + (~finite).astype(jnp.int32),
            clip_rate_fast=_moving_average(state.clip_rate_fast, clipped, FAST_RATE, count),
            clip_rate_slow=_moving_average(state.clip_rate_slow, clipped, SLOW_RATE, count),
            histogram=sketch_add(state.histogram, l2, finite, decay),
            recent=(None if state.recent is None
                    else sketch_add(state.recent, l2, finite, recent_decay)),
        )
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
