"""A fixed-shape quantile sketch of gradient norms (the store and its queries).

The sketch is a histogram over the buckets of a :class:`LogMapping`. Its size is fixed at
construction (1,846 buckets, 7.2 KiB, at the default 1% accuracy) and does not grow with the
number of steps; adding a value and reading a quantile each cost O(buckets).

Counts are exact int32 when nothing is forgotten. With exponential forgetting (``decay``) they
are float32 and their total converges to ``1 / (1 - decay)``. So that counts never silently
stop increasing late in a long run, every count is halved when the total reaches 2**23 for
float32 (where a count of 2**24 would swallow ``+1``; only reachable with ``decay`` very close
to 1) or 2**30 for int32 (a billion recorded norms, before the int32 total could wrap).
Halving keeps the ratios between counts, and so the quantiles, up to rounding.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from gradclip_jax._mapping import LogMapping

_HALVE_AT = {jnp.dtype(jnp.float32): 2.0**23, jnp.dtype(jnp.int32): 2**30}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NormSketch:
    """Histogram of recorded gradient norms.

    Attributes:
      counts: per-bucket weight, int32 (no forgetting) or float32 (with ``decay``).
      recorded: int32, how many norms were recorded (not decayed, not halved).
      relative_accuracy: static; the accuracy of the bucket mapping.
    """

    counts: jax.Array
    recorded: jax.Array
    relative_accuracy: float = dataclasses.field(metadata=dict(static=True), default=0.01)

    @property
    def mapping(self) -> LogMapping:
        return LogMapping(self.relative_accuracy)


def sketch_init(relative_accuracy: float, *, weighted: bool) -> NormSketch:
    mapping = LogMapping(relative_accuracy)
    dtype = jnp.float32 if weighted else jnp.int32
    return NormSketch(
        counts=jnp.zeros((mapping.num_buckets,), dtype),
        recorded=jnp.zeros((), jnp.int32),
        relative_accuracy=relative_accuracy,
    )


def sketch_add(
    sketch: NormSketch, value: jax.Array, valid: jax.Array, decay: jax.Array | float | None
) -> NormSketch:
    """Records ``value`` if ``valid``; with ``decay``, first scales every count by it."""
    counts = sketch.counts
    if decay is not None:
        counts = jnp.where(valid, counts * jnp.asarray(decay, counts.dtype), counts)
    halved = counts // 2 if counts.dtype == jnp.int32 else counts * 0.5
    counts = jnp.where(jnp.sum(counts) >= _HALVE_AT[counts.dtype], halved, counts)
    counts = counts.at[sketch.mapping.index(value)].add(valid.astype(counts.dtype))
    return dataclasses.replace(
        sketch, counts=counts, recorded=sketch.recorded + valid.astype(jnp.int32)
    )


def sketch_quantile(sketch: NormSketch, q: jax.Array | float) -> jax.Array:
    """The ``q``-quantile (q in [0, 1]) of the recorded values, float32; NaN when empty.

    Returns the representative of the bucket holding the element of rank
    ``floor(q * (n - 1))`` (NumPy's ``method="lower"``), so the result is within the mapping's
    relative accuracy of it for values inside the mapped range. ``q`` may be an array of
    quantiles: they share one pass over the buckets.
    """
    counts = sketch.counts.astype(jnp.float32)
    cumulative = jnp.cumsum(counts)
    # A reduction, not cumulative[-1]: XLA fuses cheap scalar work into every consumer, and a
    # slice would hand each of them the whole cumulative array.
    total = jnp.sum(counts)
    rank = jnp.asarray(q, jnp.float32) * jnp.maximum(total - 1.0, 0.0)
    below = jnp.sum(cumulative <= rank[..., None], axis=-1)
    index = jnp.minimum(below, counts.shape[0] - 1)
    value = sketch.mapping.value(index)
    return jnp.where(total > 0, value, jnp.nan)
