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
"""Without a window, the percentile clip's threshold is never above this multiple of the
median recorded norm."""

WINDOW_MEDIAN_MULTIPLE = 4.0
"""With a window, the threshold is never above this multiple of the whole run's median norm.

Looser than without one: the recent percentile is already robust to a heavy tail, so this cap
only has to stop a diverging run's norms from carrying the threshold up, while norms that
grow as training proceeds (measured: a vanilla RNN trained with momentum) are followed."""

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
    percentile: float | jax.Array = 35.0,
    *,
    window: int | None = 20,
    warmup_steps: int = 1,
    max_norm: ScalarOrSchedule | None = None,
    decay: float | jax.Array | None = None,
    freeze_after: int | None = None,
    relative_accuracy: float = 0.01,
    nonfinite: str = "zero",
    axis_name: str | Sequence[str] | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Global-norm clip at a percentile of the recent gradient norms, with no threshold to pick.

    The state keeps fixed-size histograms of the unclipped global L2 norms (DDSketch-style
    log-bucket sketches: 1,846 buckets at 1% accuracy for norms in 1e-8..1e8, the same size at
    step 0 and step 10^7): :math:`H`, of every norm of the run, and, with a ``window``,
    :math:`R`, whose counts decay by :math:`1 - 1/\text{window}` per norm, so it holds about
    the last ``window`` norms. The threshold for step :math:`t` is computed from the norms
    recorded before :math:`t`:

    .. math::
        c_t = \min\bigl(Q_p(R_{t-1}),\; m\,Q_{50}(H_{t-1}),\; 1.05\,c_{t-1},\;
        \text{max\_norm}\bigr)

    where :math:`Q_p` is the ``percentile``-th percentile, and :math:`m = 4` with a window,
    :math:`m = 2` and :math:`R = H` without one. The update is then rescaled as in
    :func:`clip_by_global_norm`.

    The default, the 35th percentile of about the last 20 norms, was chosen on training
    runs, not on a heuristic (``gradclip-jax outcomes``: a transformer LM with AdamW, an LSTM
    LM with Adam, a vanilla RNN with SGD and with momentum, at natural and shifted loss
    scales, against fixed thresholds, AutoClip and ZClip). It clips about two steps in three,
    so it acts as a scale-free cap on the update's size, and it follows the norms as they fall
    early in training, where a threshold over the whole history lags. The percentile was
    swept from 25 to 90 with windows of 10, 20, 100 and the whole run; 30 to 40 over about 20
    norms did best. The classic rule, "log the unclipped norm and clip at about its 90th
    percentile", is ``percentile_clip(90.0, window=None)``: a rarer safety net, which did
    worse on those runs.

    Two bounds keep the threshold from following a run that diverges:

    - the median of the whole run cannot be moved until the new norms outweigh the history:
      if the history holds weight :math:`W` when norms start to grow, then after :math:`k < W`
      steps (no ``decay``), whatever the new norms are,
      :math:`c_{t_0+k} \le m\,Q^{\text{old}}_{(1/2 + k/2W)}`, a multiple of a quantile of the
      *old* history (with ``decay`` the old weight shrinks by ``decay`` per step, so the
      horizon is about ``1/(1-decay)`` steps);
    - the threshold rises by at most 5% per step, :math:`c_t \le 1.05^k c_{t-k}`: it at most
      doubles in 14 steps, however short the history. This is what protects a run that blows
      up in its first steps, when the history is only a few norms long.

    A norm more than :math:`m` times the run's median is always clipped, and a spike cannot
    raise its own threshold. A regime that persists (a real change of scale, or norms that
    were tiny in the first steps) takes over the median and is followed at up to 5% per
    step: a thousandfold rise in about 140 steps; with ``decay`` a slow drift is followed.

    Args:
      percentile: in (0, 100]; the percentile of the recent norms used as the threshold.
      window: >= 1, or None. The number of recent norms (an exponential window) the
        percentile is taken over; None takes it over the whole histogram :math:`H`.
      warmup_steps: >= 0. Until this many finite norms are recorded there is no adaptive
        threshold (only ``max_norm`` if given; otherwise no clipping). The default, 1, clips
        from the second step on: runs that blow up often do so in their first ten steps, and
        the 5% rise cap keeps so short a history from producing a runaway threshold. No
        data-driven threshold can clip the very first step; a run whose first gradient is
        already on a cliff needs ``max_norm`` or a learning-rate warmup as well.
      max_norm: optional hard cap > 0 (float, scalar array or schedule): the threshold is
        never above it, during warmup included.
      decay: in (0, 1], or None (default: keep every norm). Each recorded norm first
        multiplies the counts of :math:`H` by ``decay``, so it reflects roughly the last
        ``1/(1-decay)`` norms and the median cap follows a slowly drifting scale.
      freeze_after: >= 1, or None. After this many recorded norms (and at least
        ``warmup_steps``) the threshold stays fixed: "log a few hundred steps, then clip at
        their 90th percentile", automated (with ``percentile=90.0, window=None``). The
        histograms keep recording.
      relative_accuracy: in (0, 1); accuracy of the histograms (and their size: halving it
        doubles the buckets). It fixes the state's shape at ``init``; under
        ``optax.inject_hyperparams`` it may be injected, but changing it later has no effect.
        ``window`` may be injected too; whether there is one (None or not) is fixed at init.
      nonfinite: ``"zero"`` (default) or ``"propagate"``, as for :func:`clip_by_global_norm`.
        Non-finite norms are never recorded.
      axis_name: inside ``shard_map``, the mesh axis (or axes) the update is split over.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Example:
      >>> import jax, jax.numpy as jnp, optax, gradclip_jax
      >>> tx = gradclip_jax.percentile_clip(warmup_steps=5)
      >>> state = tx.init(None)
      >>> for norm in [1.0, 1.1, 0.9, 1.0, 1.2]:
      ...     _, state = tx.update({"w": jnp.array([norm])}, state)
      >>> updates, state = tx.update({"w": jnp.array([1000.0])}, state)  # a spike
      >>> round(float(updates["w"][0]), 2)  # the 35th percentile of the recent norms, to 1%
      0.99

    References:
      Masson, Rim and Lee, "DDSketch: a fast and fully-mergeable quantile sketch with
      relative-error guarantees", VLDB 2019.
    """
    check_range("percentile", percentile, low=0.0, high=100.0, high_open=False)
    if window is not None:
        check_int("window", window, low=1)
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
        if state.recent is None:
            upper, median = sketch_quantile(hist, jnp.stack([q, jnp.float32(0.5)]))
        else:
            upper = sketch_quantile(state.recent, q)
            median = sketch_quantile(hist, jnp.float32(0.5))
        multiple = MEDIAN_MULTIPLE if state.recent is None else WINDOW_MEDIAN_MULTIPLE
        adaptive = jnp.minimum(upper, multiple * median)
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
        recent_decay=None if window is None else 1.0 - 1.0 / jnp.maximum(window, 1),
    )

