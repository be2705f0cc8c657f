"""The public clip transforms: each is a threshold rule handed to the clipping core."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax

from gradclip_jax import _core
from gradclip_jax._sketch import sketch_quantile
from gradclip_jax._validation import (
    check_axis_name,
    check_int,
    check_nonfinite,
    check_ord,
    check_range,
    check_threshold,
)

ScalarOrSchedule = float | jax.Array | optax.Schedule

MEDIAN_MULTIPLE = 2.0
"""The percentile clip's threshold is never above this multiple of the median recorded norm."""

MAX_RISE_PER_STEP = 1.05
"""The percentile clip's threshold rises by at most this factor from one step to the next."""


def _at_step(value: ScalarOrSchedule, count: jax.Array) -> jax.Array:
    """A threshold given as a number, a scalar array or a schedule, at step ``count``."""
    if callable(value) and not isinstance(value, jax.Array):
        value = value(count)
    return jnp.asarray(value, jnp.float32)


def _fixed_threshold_clip(
    name: str, threshold: ScalarOrSchedule, *, mode: str, nonfinite: str, axis_name, ord=2
) -> optax.GradientTransformationExtraArgs:
    """A clip whose threshold is a given number or schedule; validates, then builds it."""
    check_threshold(name, threshold)
    check_nonfinite(nonfinite)
    check_axis_name(axis_name)
    return _core.clip_transformation(
        lambda state: _at_step(threshold, state.count),
        mode=mode,
        ord=ord,
        nonfinite=nonfinite,
        axis_name=axis_name,
    )


def clip_by_global_norm(
    max_norm: ScalarOrSchedule = 1.0,
    *,
    ord: float = 2,
    nonfinite: str = "zero",
    axis_name: str | Sequence[str] | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Rescales the whole update so that its global norm is at most ``max_norm``.

    .. math::
        u \leftarrow u \cdot \min\left(1, \frac{c}{\|u\|}\right)

    with ``c = max_norm`` and the norm taken over every element of every leaf (see
    :func:`gradclip_jax.global_norm`). The direction is preserved exactly; below the threshold
    the update is returned bit for bit. The norm is accumulated in float32 whatever the leaf
    dtype and each leaf keeps its dtype. The gradients are read once, to take the norm; the
    scale fuses into the optimizer's elementwise update under ``jit``.

    The state (:class:`ClipState`) records the unclipped L2 norm, the threshold, step, clip and
    non-finite counts and a histogram of norms; read it with :func:`gradclip_jax.stats`,
    :func:`gradclip_jax.norm_percentile` and :func:`gradclip_jax.diagnose`.

    Args:
      max_norm: the threshold ``c`` > 0: a float, a scalar array, or an optax schedule (a
        callable of the step count kept in the state).
      ord: the norm compared with ``c``: 2 (default), 1 or ``math.inf``. The recorded
        ``grad_norm`` is always the L2 norm. If ``ord`` arrives traced (``inject_hyperparams``
        injects every numeric argument), all three norms come out of one reduction and the
        one asked for is selected at run time.
      nonfinite: what to do with an update that holds a NaN or an Inf. ``"zero"`` (default)
        returns an all-zero update (the step is skipped, the optimizer still counts it);
        ``"propagate"`` returns it untouched, for a later ``optax.apply_if_finite``. Either way
        the state stays finite and the step counts in ``nonfinite_steps``.
      axis_name: inside ``shard_map``, the mesh axis (or axes) the update is split over; see
        :func:`gradclip_jax.global_norm`.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Example:
      >>> import jax.numpy as jnp, optax, gradclip_jax
      >>> tx = optax.chain(gradclip_jax.clip_by_global_norm(1.0), optax.sgd(1.0))
      >>> params = {"w": jnp.zeros(2)}
      >>> state = tx.init(params)
      >>> updates, state = tx.update({"w": jnp.array([3.0, 4.0])}, state, params)
      >>> updates["w"].tolist()  # norm 5 rescaled to 1, direction kept
      [-0.6000000238418579, -0.800000011920929]
      >>> float(gradclip_jax.stats(state)["grad_norm"])
      5.0

    References:
      Pascanu, Mikolov and Bengio, "On the difficulty of training recurrent neural networks",
      ICML 2013.
    """
    return _fixed_threshold_clip(
        "max_norm", max_norm, mode=_core.NORM, ord=check_ord(ord), nonfinite=nonfinite,
        axis_name=axis_name,
    )


def clip_by_value(
    max_value: ScalarOrSchedule,
    *,
    nonfinite: str = "zero",
    axis_name: str | Sequence[str] | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Clips every coordinate of the update to ``[-max_value, max_value]``.

    .. math::
        u_i \leftarrow \operatorname{clip}(u_i, -c, c)

    This bounds each coordinate but, unlike :func:`clip_by_global_norm`, bends the direction of
    the update when coordinates of different scale are clipped unevenly. A step counts as
    clipped when any coordinate exceeded ``c``. Diagnostics are the same as for the norm clip
    (the recorded norm is the unclipped global L2 norm) and come out of the same single read
    of the gradients.

    Args:
      max_value: ``c`` > 0: a float, a scalar array or an optax schedule.
      nonfinite: ``"zero"`` (default) or ``"propagate"``, as for :func:`clip_by_global_norm`.
      axis_name: inside ``shard_map``, the mesh axis (or axes) the update is split over; only
        the diagnostics (norm, "was anything clipped") need it.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Example:
      >>> import jax.numpy as jnp, gradclip_jax
      >>> tx = gradclip_jax.clip_by_value(1.0)
      >>> updates, state = tx.update({"w": jnp.array([0.5, -3.0])}, tx.init(None))
      >>> updates["w"].tolist()
      [0.5, -1.0]
      >>> int(gradclip_jax.stats(state)["clipped_steps"])
      1
    """
    return _fixed_threshold_clip(
        "max_value", max_value, mode=_core.VALUE, nonfinite=nonfinite, axis_name=axis_name
    )


def percentile_clip(
    percentile: float | jax.Array = 90.0,
    *,
    warmup_steps: int = 1,
    max_norm: ScalarOrSchedule | None = None,
    decay: float | jax.Array | None = None,
    freeze_after: int | None = None,
    relative_accuracy: float = 0.01,
    nonfinite: str = "zero",
    axis_name: str | Sequence[str] | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Global-norm clip at a running percentile of the gradient norms seen so far.

    The state keeps a fixed-size histogram of the unclipped global L2 norms (a DDSketch-style
    log-bucket sketch: 1,846 buckets at 1% accuracy for norms in 1e-8..1e8, the same size at
    step 0 and step 10^7). The threshold for step :math:`t` is computed from the norms recorded
    at steps before :math:`t`:

    .. math::
        c_t = \min\bigl(Q_p(H_{t-1}),\; 2\,Q_{50}(H_{t-1}),\; 1.05\,c_{t-1},\;
        \text{max\_norm}\bigr)

    where :math:`Q_p` is the ``percentile``-th percentile of the (optionally decayed) histogram
    :math:`H`. The update is then rescaled as in :func:`clip_by_global_norm`.

    Why two caps. Recording every unclipped norm and clipping at its running p90 alone
    ratchets: while a run slides off a cliff its norms grow step after step, soon fill the top
    10% of the history, and the p90 follows them up. Two bounds stop that:

    - the median cannot be moved until the new norms outweigh the whole history: if the
      history holds weight :math:`W` when norms start to grow, then after :math:`k < W` steps
      (no decay), whatever the new norms are,
      :math:`c_{t_0+k} \le 2\,Q^{\text{old}}_{(1/2 + k/2W)}`, twice a quantile of the
      *old* history (with ``decay`` the old weight shrinks by ``decay`` per step, so the
      horizon is about ``1/(1-decay)`` steps);
    - the threshold rises by at most 5% per step, :math:`c_t \le 1.05^k c_{t-k}`: it at most
      doubles in 14 steps, however short the history. This is what protects a run that blows
      up in its first steps, when the history is only a few norms long.

    The median cap also keeps the threshold tight when the history is heavy-tailed, which is
    what a run near a cliff looks like: a few huge norms (or the large norms of the first
    steps, which a run without ``decay`` never forgets) inflate the p90, but not the median.
    A norm more than twice the typical one is always clipped.

    A regime that persists (a real change of scale, or norms that were tiny in the first
    steps) takes over the median and is followed at up to 5% per step: a thousandfold rise in
    about 140 steps. With stationary norms whose p90 is below twice their median (log-normal
    with sigma < 0.54; healthy training is usually well inside this) neither cap is active
    and about ``100 - percentile`` percent of steps are clipped; with wider norms the
    threshold is twice the median (24% of steps clipped at sigma = 1).

    Args:
      percentile: in (0, 100]; the percentile of recorded norms used as the threshold.
      warmup_steps: >= 0. Until this many finite norms are recorded there is no adaptive
        threshold (only ``max_norm`` if given; otherwise no clipping). The default, 1, clips
        from the second step on: runs that blow up often do so in their first ten steps, and
        the 5% rise cap keeps so short a history from producing a runaway threshold. No
        data-driven threshold can clip the very first step; a run whose first gradient is
        already on a cliff needs ``max_norm`` or a learning-rate warmup as well.
      max_norm: optional hard cap > 0 (float, scalar array or schedule): the threshold is
        never above it, during warmup included.
      decay: in (0, 1], or None (default: keep every norm). Each recorded norm first
        multiplies the histogram's counts by ``decay``, so it reflects roughly the last
        ``1/(1-decay)`` norms and the threshold follows a slowly drifting scale.
      freeze_after: >= 1, or None. After this many recorded norms (and at least
        ``warmup_steps``) the threshold stays fixed: "log a few hundred steps, then clip at
        their 90th percentile", automated. The histogram keeps recording.
      relative_accuracy: in (0, 1); accuracy of the histogram (and its size: halving it
        doubles the buckets). It fixes the state's shape at ``init``; under
        ``optax.inject_hyperparams`` it may be injected, but changing it later has no effect.
      nonfinite: ``"zero"`` (default) or ``"propagate"``, as for :func:`clip_by_global_norm`.
        Non-finite norms are never recorded.
      axis_name: inside ``shard_map``, the mesh axis (or axes) the update is split over.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Example:
      >>> import jax, jax.numpy as jnp, optax, gradclip_jax
      >>> tx = gradclip_jax.percentile_clip(90.0, warmup_steps=5)
      >>> state = tx.init(None)
      >>> for norm in [1.0, 1.1, 0.9, 1.0, 1.2]:
      ...     _, state = tx.update({"w": jnp.array([norm])}, state)
      >>> updates, state = tx.update({"w": jnp.array([1000.0])}, state)  # a spike
      >>> round(float(updates["w"][0]), 1)  # the p90 of the 5 norms seen, to 1%
      1.1

    References:
      Masson, Rim and Lee, "DDSketch: a fast and fully-mergeable quantile sketch with
      relative-error guarantees", VLDB 2019.
    """
    check_range("percentile", percentile, low=0.0, high=100.0, high_open=False)
    check_int("warmup_steps", warmup_steps, low=0)
    if max_norm is not None:
        check_threshold("max_norm", max_norm)
    if decay is not None:
        check_range("decay", decay, low=0.0, high=1.0, high_open=False)
    if freeze_after is not None:
        check_int("freeze_after", freeze_after, low=1)
    check_range("relative_accuracy", relative_accuracy, low=0.0, high=1.0)
    check_nonfinite(nonfinite)
    check_axis_name(axis_name)

    def threshold(state: _core.ClipState) -> jax.Array:
        hist = state.histogram
        q = jnp.asarray(percentile, jnp.float32) / 100.0
        upper, median = sketch_quantile(hist, jnp.stack([q, jnp.float32(0.5)]))
        adaptive = jnp.minimum(upper, MEDIAN_MULTIPLE * median)
        ready = hist.recorded >= jnp.maximum(warmup_steps, 1)
        value = jnp.where(ready, adaptive, _core.NO_THRESHOLD)
        if freeze_after is not None:
            frozen = hist.recorded > jnp.maximum(freeze_after, warmup_steps)
            value = jnp.where(frozen, state.threshold, value)
        had_threshold = state.threshold < _core.NO_THRESHOLD
        value = jnp.minimum(
            value, jnp.where(had_threshold, state.threshold * MAX_RISE_PER_STEP, value))
        if max_norm is not None:
            value = jnp.minimum(value, _at_step(max_norm, state.count))
        return value

    return _core.clip_transformation(
        threshold,
        mode=_core.NORM,
        nonfinite=nonfinite,
        axis_name=axis_name,
        relative_accuracy=relative_accuracy,
        decay=decay,
    )

