"""The percentile-adaptive threshold rule and :func:`percentile_clip`.

The rule reads the state's histograms of recorded norms (``_sketch``); the update is rescaled
by the core's :class:`~gradclip_jax._apply.Rescale` part, as in the global-norm clip.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from gradclip_jax import _core
from gradclip_jax._apply import Rescale
from gradclip_jax._core import ScalarOrSchedule
from gradclip_jax._fixed import at_step
from gradclip_jax._mapping import DEFAULT_RANGE
from gradclip_jax._sketch import sketch_quantile, sketch_quantiles
from gradclip_jax._validation import (
    check_axis_name,
    check_int,
    check_name,
    check_nonfinite,
    check_norm_range,
    check_range,
    check_threshold,
    warn_if_quantile,
)

MEDIAN_MULTIPLE = 2.0
"""Without a window, the threshold is never above this multiple of the median recorded norm."""

WINDOW_MEDIAN_MULTIPLE = 4.0
"""With a window, the threshold is never above this multiple of the whole run's median norm.

Looser than without one: the recent percentile is already robust to a heavy tail, so this cap
only has to stop a diverging run's norms from carrying the threshold up, while norms that
grow as training proceeds (measured: a vanilla RNN trained with momentum) are followed."""

MAX_RISE_PER_STEP = 1.05
"""The threshold rises by at most this factor from one step to the next."""

START_RISE_PER_STEP = 1.01
"""During the start (see ``percentile_clip``'s ``start``), the threshold rises by at most this
factor per step."""

START_END_MULTIPLE = 4.0
"""The start ends early when the recent norms grow past this multiple of the norms it started
from: a new scale, followed at ``MAX_RISE_PER_STEP`` as after the start."""


@dataclasses.dataclass(frozen=True)
class PercentileRule(_core.ThresholdRule):
    """``min(Q_p(recent), m * median(all), 1.05 * previous, max_norm)``; see percentile_clip."""

    percentile: Any = 50.0
    window: Any = 20
    warmup_steps: Any = 1
    max_norm: ScalarOrSchedule | None = None
    decay: Any = None
    freeze_after: Any = None
    start: Any = None

    def histogram_decay(self) -> Any:
        return self.decay

    def recent_decay(self) -> Any:
        if self.window is None:
            return None
        return 1.0 - 1.0 / jnp.maximum(self.window, 1)

    def features(self) -> tuple[str, ...]:
        return tuple(name for name, value in (("start", self.start), ("max_norm", self.max_norm))
                     if value is not None)

    def threshold(self, state: _core.ClipState) -> jax.Array:
        hist = state.histogram
        q = jnp.asarray(self.percentile, jnp.float32) / 100.0
        if hist.recent is None:
            upper, median = sketch_quantile(hist, jnp.stack([q, jnp.float32(0.5)]))
            multiple = MEDIAN_MULTIPLE
        else:
            upper, median = sketch_quantiles((hist.recent, hist.whole), (q, 0.5))
            multiple = WINDOW_MEDIAN_MULTIPLE
        adaptive = jnp.minimum(upper, multiple * median)
        warmup = jnp.maximum(self.warmup_steps, 1)
        ready = hist.count >= warmup
        value = jnp.where(ready, adaptive, _core.NO_THRESHOLD)
        had_threshold = state.threshold < _core.NO_THRESHOLD
        rise = jnp.float32(MAX_RISE_PER_STEP)
        floor = None
        if self.start is not None:
            # The start: the first threshold is `start` x the median of the warmup norms, and
            # it rises at most 1% a step for as long as every step since has been clipped,
            # unless the recent norms grow past 4x the norms it started from (a new scale).
            # While it lasts, the threshold is never below `start` x the recent percentile:
            # where the norms rise after the first steps, the cap rises with them.
            # Steps whose norm was not recorded (non-finite, or a zero update) do not end it.
            start = jnp.asarray(self.start, jnp.float32)
            value = jnp.where(ready & ~had_threshold, start * median, value)
            starting = (had_threshold & (state.clipped_steps >= hist.count - warmup)
                        & (start * adaptive <= START_END_MULTIPLE * state.threshold))
            rise = jnp.where(starting, jnp.float32(START_RISE_PER_STEP), rise)
            floor = jnp.where(starting, start * adaptive, jnp.float32(0.0))
        if self.freeze_after is not None:
            frozen = hist.count > jnp.maximum(self.freeze_after, self.warmup_steps)
            value = jnp.where(frozen, state.threshold, value)
        value = jnp.minimum(value, jnp.where(had_threshold, state.threshold * rise, value))
        if floor is not None:
            value = jnp.maximum(value, floor)
        if self.max_norm is not None:
            value = jnp.minimum(value, at_step(self.max_norm, state.count))
        return value


def percentile_clip(
    percentile: float | jax.Array = 50.0,
    *,
    window: int | None = 20,
    warmup_steps: int = 1,
    max_norm: ScalarOrSchedule | None = None,
    decay: float | jax.Array | None = None,
    freeze_after: int | None = None,
    start: float | jax.Array | None = 0.25,
    relative_accuracy: float = 0.01,
    norm_range: tuple[float, float] = DEFAULT_RANGE,
    nonfinite: str = "zero",
    axis_name: str | Sequence[str] | None = None,
    name: str | None = None,
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
    :func:`clip_by_global_norm`. With ``start`` (0.25 by default; None for none) the first
    threshold is ``start`` times the first norm and rises at most 1% a step while every step
    is clipped, never below ``start`` times :math:`Q_p(R_{t-1})`.

    The default (the median of about the last 20 norms, after a start at a quarter of the
    first norm) was chosen on training runs, not on a heuristic: ``gradclip-jax outcomes``
    trains a transformer LM with AdamW, an LSTM LM with Adam and a vanilla RNN with SGD and
    with momentum, at shifted loss scales too, against fixed thresholds, AutoClip and ZClip
    (README, "Training outcomes" and "Which clip for which job", for the figures). It clips
    about every other step, a scale-free cap on the update's size that follows the norms as
    they fall early in training, where a threshold over the whole history lags; the start cuts
    the first steps harder, as ``clip_by_global_norm(1.0)`` cuts a transformer's. On the
    transformer (AdamW) and the LSTM (Adam) it ended below the best fixed threshold chosen in
    hindsight, or at most 0.11% above it, at every loss scale. Two other settings did better
    with SGD (:func:`gradclip_jax.percentile_clipped` picks among them from the optimizer's
    state):

    - with momentum, the classic rule, "clip at about the 90th percentile of the unclipped
      norm": ``percentile_clip(90.0, window=None, start=None)``, a rarer safety net. The
      default, clipping half the steps, slows momentum runs (7.5% and 17% above the best fixed
      threshold on two sets of the RNN's seeds; the classic rule from 12% below to 4% above);
    - plain SGD near the edge of stability: ``percentile_clip(10.0, start=None)``, which clips
      nine steps in ten, a near-constant step like the best fixed threshold's there. It lost
      none of 528 runs where the default lost 6, but with momentum it ended 65% above
      the best fixed threshold.

    Two bounds slow the threshold down when a run diverges; they do not stop it, so a run whose
    norms keep growing for hundreds of steps is followed (measured: a plain-SGD RNN whose norms
    grew from 2 to 4e6 over 1,300 steps, the threshold from 2 to 2e5). Where a safe ceiling is
    known, ``max_norm`` is the hard stop:

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

    A threshold taken from the run's own norms follows a change of the loss scale. That suits
    Adam and its kin, whose step does not depend on the gradient's scale. With SGD a loss
    multiplied by k is a learning rate multiplied by k, and the threshold passes that on
    (measured on a vanilla RNN at loss x100, plain SGD and momentum: every run lost, where a
    fixed threshold of at most 1 lost none): with SGD and a loss scale that may change, give
    ``max_norm``.

    Args:
      percentile: in (0, 100]; the percentile of the recent norms used as the threshold (a
        percentile, not a 0-1 quantile: the 90th is ``90.0``; a value of 1 or less warns).
      window: >= 1, or None. The number of recent norms (an exponential window) the
        percentile is taken over; None takes it over the whole histogram :math:`H`.
      warmup_steps: >= 1. Until this many finite nonzero norms are recorded there is no adaptive
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
      start: in (0, 1], or None (no start); default 0.25. A scale-free cap on the first
        steps: the first threshold is ``start`` times the median of the warmup norms (the
        first norm, by default), and it rises at most 1% a step, instead of 5%, for as long
        as every step since has been clipped; the first step left unclipped ends the start.
        While the recent norms are more than 4x the norms it started from (a new scale) it
        rises at 5% a step, and at 1% again once they are back within 4x. While the start
        lasts the threshold is never below ``start`` times the percentile of the recent
        norms, so where the norms rise after the first steps the cap rises with them (that
        floor may rise faster than 5% a step; it is at most ``4 * start`` times the run's
        median norm). While the norms fall early in training every step is cut to about one
        norm, as a fixed threshold below them would cut it, so that Adam's second-moment
        estimate does not lag the falling norms. Measured best for Adam and its kin (lower
        than the rule without it on the transformer and the LSTM); level with the rule
        without it, within the noise, on the vanilla RNN with SGD, with or without momentum.
        :func:`gradclip_jax.diagnose` suggests a start where Adam follows a percentile clip
        that has none. It may be injected.
      relative_accuracy: in (0, 1); accuracy of the histograms (and their size: halving it
        doubles the buckets). It fixes the state's shape at ``init``; under
        ``optax.inject_hyperparams`` it may be injected, but changing it later has no effect.
        ``window`` may be injected too; whether there is one (None or not) is fixed at init.
      norm_range: ``(low, high)``, ``0 < low < high``: the norms the histograms give buckets
        of their own (default 1e-8 to 1e8, 16 decades). A norm outside is counted as ``low``
        or ``high``, so a threshold taken from such norms stops there: norms of 1e10 (a loss
        summed rather than averaged over a large batch, say) would all be cut to 1e8.
        :func:`gradclip_jax.diagnose` warns when recorded norms fall outside. Widening it
        adds buckets (about 116 per decade at 1% accuracy; every step passes over them
        once), so move it rather than widen it: ``(1e-4, 1e12)`` for norms around 1e4.
        Static: it fixes the state's shape.
      nonfinite: ``"zero"`` (default) or ``"propagate"``, as for :func:`clip_by_global_norm`.
        Non-finite norms are never recorded, nor zero ones (a zero update has nothing to
        clip and no scale).
      axis_name: inside ``shard_map``, the mesh axis (or axes) the update is split over.
      name: optional; prefixes this transform's :func:`gradclip_jax.stats` keys, as for
        :func:`gradclip_jax.clip_by_global_norm`.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Example:
      >>> import jax, jax.numpy as jnp, optax, gradclip_jax
      >>> def last_update(tx, norms):
      ...     state = tx.init(None)
      ...     for norm in norms:
      ...         updates, state = tx.update({"w": jnp.array([norm])}, state)
      ...     return round(float(updates["w"][0]), 2)
      >>> norms = [1.0, 1.1, 0.9, 1.0, 1.2, 1000.0]  # five warmup norms, then a spike
      >>> last_update(gradclip_jax.percentile_clip(warmup_steps=5, start=None), norms)
      0.99
      >>> last_update(gradclip_jax.percentile_clip(warmup_steps=5), norms)  # the start
      0.25

      Without a start the spike is cut to the median of the recent norms (to 1%); the default
      start cuts the first steps to a quarter of the median of the warmup norms.

    References:
      Masson, Rim and Lee, "DDSketch: a fast and fully-mergeable quantile sketch with
      relative-error guarantees", VLDB 2019.
    """
    check_range("percentile", percentile, low=0.0, high=100.0, high_open=False)
    warn_if_quantile("percentile", percentile, stacklevel=3)
    if window is not None:
        check_int("window", window, low=1)
    check_int("warmup_steps", warmup_steps, low=1)
    if max_norm is not None:
        check_threshold("max_norm", max_norm)
    if decay is not None:
        check_range("decay", decay, low=0.0, high=1.0, high_open=False)
    if freeze_after is not None:
        check_int("freeze_after", freeze_after, low=1)
    if start is not None:
        check_range("start", start, low=0.0, high=1.0, high_open=False)
    check_range("relative_accuracy", relative_accuracy, low=0.0, high=1.0)
    norm_range = check_norm_range(norm_range)
    check_nonfinite(nonfinite)
    check_axis_name(axis_name)
    check_name(name)
    rule = PercentileRule(percentile=percentile, window=window, warmup_steps=warmup_steps,
                          max_norm=max_norm, decay=decay, freeze_after=freeze_after,
                          start=start)
    return _core.clip_transformation(rule, Rescale(2), nonfinite=nonfinite, axis_name=axis_name,
                                     relative_accuracy=relative_accuracy,
                                     norm_range=norm_range, name=name)
