"""Fixed thresholds: :func:`clip_by_global_norm` and :func:`clip_by_value`.

The threshold rule is a given number, scalar array or optax schedule of the step count; the
two transforms differ only in their apply part (rescale, or clip each coordinate).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax

from gradclip_jax import _core
from gradclip_jax._apply import ClipEach, Rescale
from gradclip_jax._core import ScalarOrSchedule
from gradclip_jax._validation import (
    check_axis_name,
    check_name,
    check_nonfinite,
    check_ord,
    check_threshold,
)


def at_step(value: ScalarOrSchedule, count: jax.Array) -> jax.Array:
    """A threshold given as a number, a scalar array or a schedule, at step ``count``."""
    if callable(value) and not isinstance(value, jax.Array):
        value = value(count)
    return jnp.asarray(value, jnp.float32)


@dataclasses.dataclass(frozen=True)
class FixedThreshold(_core.ThresholdRule):
    """The threshold is ``value`` (a number, scalar array or schedule of the step count)."""

    value: ScalarOrSchedule

    def threshold(self, state: _core.ClipState) -> jax.Array:
        return at_step(self.value, state.count)

    def features(self) -> tuple[str, ...]:
        return ("fixed",)  # diagnose: the threshold does not follow the norms


def _fixed_threshold_clip(
    arg: str, threshold: ScalarOrSchedule, apply: _core.Apply, *, nonfinite: str,
    axis_name: str | Sequence[str] | None, name: str | None,
) -> optax.GradientTransformationExtraArgs:
    """A clip whose threshold is a given number or schedule; validates, then builds it."""
    check_threshold(arg, threshold)
    check_nonfinite(nonfinite)
    check_axis_name(axis_name)
    check_name(name)
    return _core.clip_transformation(FixedThreshold(threshold), apply, nonfinite=nonfinite,
                                     axis_name=axis_name, name=name)


def clip_by_global_norm(
    max_norm: ScalarOrSchedule = 1.0,
    *,
    ord: float = 2,
    nonfinite: str = "zero",
    axis_name: str | Sequence[str] | None = None,
    name: str | None = None,
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
        ``grad_norm`` is always the L2 norm; the histogram records the ``ord``-norm, so that
        :func:`gradclip_jax.norm_percentile` gives thresholds for this clip. If ``ord``
        arrives traced (``inject_hyperparams`` injects every numeric argument), all three
        norms come out of one reduction and the one asked for is selected at run time.
      nonfinite: what to do with an update that holds a NaN or an Inf. ``"zero"`` (default)
        returns an all-zero update (the step is skipped, the optimizer still counts it);
        ``"propagate"`` returns it untouched, for a later ``optax.apply_if_finite``. Either way
        the state stays finite and the step counts in ``nonfinite_steps``.
      axis_name: inside ``shard_map``, the mesh axis (or axes) the update is split over; see
        :func:`gradclip_jax.global_norm`.
      name: optional; prefixes this transform's :func:`gradclip_jax.stats` keys
        (``"<name>/grad_norm"``) and names it in :func:`gradclip_jax.diagnose`. Give one to
        each clip when a state holds several; a single unnamed clip has plain keys.

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
    return _fixed_threshold_clip("max_norm", max_norm, Rescale(check_ord(ord)),
                                 nonfinite=nonfinite, axis_name=axis_name, name=name)


def clip_by_value(
    max_value: ScalarOrSchedule,
    *,
    nonfinite: str = "zero",
    axis_name: str | Sequence[str] | None = None,
    name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Clips every coordinate of the update to ``[-max_value, max_value]``.

    .. math::
        u_i \leftarrow \operatorname{clip}(u_i, -c, c)

    This bounds each coordinate but, unlike :func:`clip_by_global_norm`, bends the direction of
    the update when coordinates of different scale are clipped unevenly. A step counts as
    clipped when any coordinate exceeded ``c``. Diagnostics are those of the norm clip:
    ``grad_norm`` is the unclipped global L2 norm, while the histogram records the largest
    magnitude of any coordinate, the value compared with ``c`` (so
    :func:`gradclip_jax.norm_percentile` and :func:`gradclip_jax.diagnose` speak of values of
    ``c``, not of L2 norms). They take two reductions of each
    leaf, the sum of squares and the largest magnitude: GPU backends fuse sibling reductions
    into one read, XLA's CPU backend reads the gradients once for each (2 extra reads; the
    clip itself fuses into the optimizer's update, where ``optax.clip`` writes the clipped
    update out and reads it back).

    Args:
      max_value: ``c`` > 0: a float, a scalar (0-d) array or an optax schedule. One bound
        for every coordinate, as in ``optax.clip``; a per-leaf bound is not supported.
      nonfinite: ``"zero"`` (default) or ``"propagate"``, as for :func:`clip_by_global_norm`.
      axis_name: inside ``shard_map``, the mesh axis (or axes) the update is split over; only
        the diagnostics (norm, "was anything clipped") need it.
      name: optional; prefixes this transform's :func:`gradclip_jax.stats` keys, as for
        :func:`clip_by_global_norm`.

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
    return _fixed_threshold_clip("max_value", max_value, ClipEach(),
                                 nonfinite=nonfinite, axis_name=axis_name, name=name)
