"""A fixed-shape quantile sketch of gradient norms (the store and its queries).

The sketch is a histogram over the buckets of a :class:`LogMapping`. Its size is fixed at
construction (1,846 buckets, 7.2 KiB, at the default 1% accuracy) and does not grow with the
number of steps; adding a value and reading a quantile each cost O(buckets).

Counts are exact int32 when nothing is forgotten. With exponential forgetting (``decay``) they
are float32 and their total converges to ``1 / (1 - decay)``. So that counts never silently
stop increasing late in a long run, every count is halved once per 2**22 recorded values for
float32 counts and once per 2**29 for int32 ones, which keeps the total under 2**23 (where a
float32 count of 2**24 would swallow ``+1``) and under 2**30 (before an int32 total could
wrap). The schedule is read from ``recorded``, a scalar, so no step sums the counts to decide.
Halving keeps the ratios between counts, and so the quantiles, up to rounding.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from gradclip_jax._mapping import LogMapping

_HALVE_EVERY = {jnp.dtype(jnp.float32): 2**22, jnp.dtype(jnp.int32): 2**29}


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
    # Before the recorded count reaches each multiple of the period: the total is then at
    # most twice the period (it halves from at most 2p to p, and p more values are added).
    due = valid & ((sketch.recorded + 1) % _HALVE_EVERY[counts.dtype] == 0)
    counts = jnp.where(due, halved, counts)
    # A one-hot add, not a scatter: it fuses with the halving (and decay) into one pass over
    # the buckets, where a scatter is a kernel of its own, and on a small model's step each
    # kernel launch costs more than the two thousand additions.
    hit = jnp.arange(counts.shape[0], dtype=jnp.int32) == sketch.mapping.index(value)
    counts = counts + (hit & valid).astype(counts.dtype)
    return dataclasses.replace(
        sketch, counts=counts, recorded=sketch.recorded + valid.astype(jnp.int32)
    )


_BLOCK = 64


def _cumsum(counts: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Inclusive prefix sums of ``counts`` (..., n) along its last axis, and their totals.

    Two triangular matmuls: ``jnp.cumsum`` lowers to a cascade of reduce-windows, about ten
    kernels for two thousand buckets; on a small model, where each kernel's launch costs more
    than its work, that was a fifth of the step. Leading axes (several sketches) share the
    same two matmuls. Sums of counts are exact in float32 up to 2**24 either way.
    """
    *lead, n = counts.shape
    rows = -(-n // _BLOCK)  # ceil
    pad = [(0, 0)] * len(lead) + [(0, rows * _BLOCK - n)]
    blocks = jnp.pad(counts, pad).reshape(*lead, rows, _BLOCK)
    tri = jnp.triu(jnp.ones((_BLOCK, _BLOCK), counts.dtype))
    within = jnp.matmul(blocks, tri, precision=jax.lax.Precision.HIGHEST)
    strict = jnp.triu(jnp.ones((rows, rows), counts.dtype), k=1)
    offsets = jnp.matmul(within[..., -1], strict, precision=jax.lax.Precision.HIGHEST)
    cumulative = (within + offsets[..., None]).reshape(*lead, rows * _BLOCK)[..., :n]
    return cumulative, offsets[..., -1] + within[..., -1, -1]


def _quantile_from(counts: jax.Array, q: jax.Array, mapping: LogMapping) -> jax.Array:
    """Quantiles ``q`` (..., m) of the histograms ``counts`` (..., n): (..., m) values."""
    cumulative, total = _cumsum(counts)
    rank = q * jnp.maximum(total - 1.0, 0.0)[..., None]
    below = jnp.sum(cumulative[..., None, :] <= rank[..., None], axis=-1)
    value = mapping.value(jnp.minimum(below, counts.shape[-1] - 1))
    return jnp.where(total[..., None] > 0, value, jnp.nan)


def sketch_quantile(sketch: NormSketch, q: jax.Array | float) -> jax.Array:
    """The ``q``-quantile (q in [0, 1]) of the recorded values, float32; NaN when empty.

    Returns the representative of the bucket holding the element of rank
    ``floor(q * (n - 1))`` (NumPy's ``method="lower"``), so the result is within the mapping's
    relative accuracy of it for values inside the mapped range. ``q`` may be an array of
    quantiles: they share one pass over the buckets.
    """
    q = jnp.asarray(q, jnp.float32)
    out = _quantile_from(sketch.counts.astype(jnp.float32), q.reshape(-1), sketch.mapping)
    return out.reshape(q.shape)


def sketch_quantiles(sketches: tuple[NormSketch, ...], qs: tuple[Any, ...]) -> jax.Array:
    """One quantile of each sketch (all of one accuracy), from one pass over their buckets."""
    mappings = {s.relative_accuracy for s in sketches}
    if len(mappings) != 1:
        raise ValueError(f"sketches of one relative accuracy needed, got {sorted(mappings)}")
    counts = jnp.stack([s.counts.astype(jnp.float32) for s in sketches])
    q = jnp.stack([jnp.asarray(x, jnp.float32) for x in qs])[:, None]
    return _quantile_from(counts, q, sketches[0].mapping)[:, 0]
