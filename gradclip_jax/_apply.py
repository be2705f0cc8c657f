"""How a threshold is applied to the update: the two :class:`~gradclip_jax._core.Apply` parts.

- :class:`Rescale` multiplies the whole update by ``threshold / norm`` when its ``ord``-norm
  is above the threshold: the direction is kept exactly.
- :class:`ClipEach` clips every coordinate to ``[-threshold, threshold]``.

Both compute in at least float32 and round once into the leaf's dtype.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from gradclip_jax import _norms
from gradclip_jax._core import L2_NORM, Apply


@dataclasses.dataclass(frozen=True)
class Rescale(Apply):
    """Rescales the update so that its ``ord``-norm is at most the threshold.

    ``ord`` is 1, 2 or ``math.inf``, or a traced value (under ``optax.inject_hyperparams``),
    in which case all three norms are measured and the one asked for is selected.
    """

    ord: Any = 2

    @property
    def kinds(self) -> tuple[str, ...]:  # type: ignore[override]
        return _norms.norm_kinds(self.ord)

    @property
    def label(self) -> str:  # type: ignore[override]
        labels = {2: L2_NORM, 1: "L1 norm", math.inf: "largest magnitude (L-inf norm)"}
        if isinstance(self.ord, (int, float)) and self.ord in labels:
            return labels[self.ord]
        return "norm of the injected ord"

    def measure(self, measures: Mapping[str, jax.Array]) -> jax.Array:
        return _norms.norm_from(measures, self.ord)

    def factor(self, threshold: jax.Array, measured: jax.Array) -> jax.Array:
        # The division's operand is selected too, so that an unclipped step (a zero norm, or
        # a threshold of float32's max) has a finite derivative, not 0 * inf = NaN.
        over = measured > threshold
        return jnp.where(over, threshold / jnp.where(over, measured, 1.0), 1.0)

    def leaf(self, g: jax.Array, factor: jax.Array) -> jax.Array:
        # Multiply in at least float32 and round once, so bfloat16/float16 updates are scaled
        # as accurately as their dtype allows.
        wide = _norms.wide_dtype(g.dtype)
        return (g.astype(wide) * factor.astype(wide)).astype(g.dtype)


@dataclasses.dataclass(frozen=True)
class ClipEach(Apply):
    """Clips every coordinate to ``[-threshold, threshold]``; a step is clipped when any is."""

    kinds: tuple[str, ...] = (_norms.MAXABS,)
    label: str = "largest magnitude"

    def measure(self, measures: Mapping[str, jax.Array]) -> jax.Array:
        return measures[_norms.MAXABS]

    def factor(self, threshold: jax.Array, measured: jax.Array) -> jax.Array:
        del measured
        return threshold

    def leaf(self, g: jax.Array, factor: jax.Array) -> jax.Array:
        return self.update_leaf(g, (factor,), zero_nonfinite=False)

    def step_scalars(self, threshold: jax.Array, measured: jax.Array, clipped: jax.Array,
                     finite: jax.Array, zero_nonfinite: bool) -> tuple[jax.Array, ...]:
        # One bound does it all: a finite step is bounded by the threshold (coordinates
        # within it are kept whether or not the step is clipped); a non-finite one by 0
        # (zeros) or by infinity (passed through).
        del measured, clipped
        other = 0.0 if zero_nonfinite else jnp.inf
        return (jnp.where(finite, threshold, other),)

    def update_leaf(self, g: jax.Array, scalars: tuple[jax.Array, ...],
                    zero_nonfinite: bool) -> jax.Array:
        # Two comparisons and two selects per coordinate. Coordinates within the bound are
        # selected, not passed through min/max, so they come back bit for bit (subnormals
        # included); comparisons rather than abs(g), which XLA would share with the norm's
        # reduction, then write out and read back. The bound is compared in at least float32
        # and rounded once into the leaf's dtype.
        wide = _norms.wide_dtype(g.dtype)
        hi = scalars[0].astype(wide)
        x = g.astype(wide)
        upper, lower = hi.astype(g.dtype), (-hi).astype(g.dtype)
        if zero_nonfinite:
            # NaN fails both comparisons and becomes the bound, 0 on a non-finite step.
            return jnp.where(x <= hi, jnp.where(x >= -hi, g, lower), upper)
        # NaN passes both comparisons and is kept, as nonfinite="propagate" asks.
        return jnp.where(x > hi, upper, jnp.where(x < -hi, lower, g))

    def check_leaf(self, path: str, dtype: Any) -> None:
        if jnp.issubdtype(dtype, jnp.complexfloating):
            raise TypeError(
                f"clip_by_value cannot clip the complex leaf {path} ({dtype}): complex numbers "
                "have no order, so there is no [-c, c] to clip to (optax.clip raises too). Use "
                "clip_by_global_norm, which rescales complex updates by their norm."
            )
