"""A fixed-shape quantile sketch of gradient norms (the store and its queries).

The sketch is a histogram over the buckets of a :class:`LogMapping`, stored as its running
(cumulative) sum: entry ``i`` is the weight of the values in buckets ``0..i``. Its size is
fixed at construction (1,846 buckets, 7.2 KiB, at the default 1% accuracy) and does not grow
with the number of steps. Stored so, adding a value is one elementwise pass (``+1`` from its
bucket on), and so are the forgetting and the halving below, which scale a cumulative sum as
they scale the counts; a quantile is one comparison with the stored sums, with no prefix sum
to compute on every step (on a small model's step that was four kernels and most of the
rule's cost).

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
    """Histogram of recorded gradient norms, as its running sum over the buckets.

    Attributes:
      cumulative: nondecreasing; entry ``i`` is the weight recorded in buckets ``0..i``
        (so the last is the total), int32 (no forgetting) or float32 (with ``decay``).
      recorded: int32, how many norms were recorded (not decayed, not halved).
      relative_accuracy: static; the accuracy of the bucket mapping.
    """

    cumulative: jax.Array
    recorded: jax.Array
    relative_accuracy: float = dataclasses.field(metadata=dict(static=True), default=0.01)

    @property
    def mapping(self) -> LogMapping:
        return LogMapping(self.relative_accuracy)

    @property
    def counts(self) -> jax.Array:
        """The weight in each bucket (the differences of ``cumulative``)."""
        c = self.cumulative
        return jnp.concatenate([c[..., :1], c[..., 1:] - c[..., :-1]], axis=-1)


def sketch_init(relative_accuracy: float, *, weighted: bool) -> NormSketch:
    mapping = LogMapping(relative_accuracy)
    dtype = jnp.float32 if weighted else jnp.int32
    return NormSketch(
        cumulative=jnp.zeros((mapping.num_buckets,), dtype),
        recorded=jnp.zeros((), jnp.int32),
        relative_accuracy=relative_accuracy,
    )


def sketch_add(
    sketch: NormSketch, value: jax.Array, valid: jax.Array, decay: jax.Array | float | None
) -> NormSketch:
    """Records ``value`` if ``valid``; with ``decay``, first scales every count by it."""
    cumulative = sketch.cumulative
    if decay is not None:
        cumulative = jnp.where(valid, cumulative * jnp.asarray(decay, cumulative.dtype),
                               cumulative)
    halved = cumulative // 2 if cumulative.dtype == jnp.int32 else cumulative * 0.5
    # Before the recorded count reaches each multiple of the period: the total is then at
    # most twice the period (it halves from at most 2p to p, and p more values are added).
    due = valid & ((sketch.recorded + 1) % _HALVE_EVERY[cumulative.dtype] == 0)
    cumulative = jnp.where(due, halved, cumulative)
    # +1 from the value's bucket on: an elementwise pass that fuses with the halving (and
    # the decay), where a scatter would be a kernel of its own.
    from_bucket = jnp.arange(cumulative.shape[0], dtype=jnp.int32) >= sketch.mapping.index(value)
    cumulative = cumulative + (from_bucket & valid).astype(cumulative.dtype)
    return dataclasses.replace(
        sketch, cumulative=cumulative, recorded=sketch.recorded + valid.astype(jnp.int32)
    )


def _quantile_from(cumulative: jax.Array, q: jax.Array, mapping: LogMapping,
                   total: jax.Array | None = None, empty_is_nan: bool = True) -> jax.Array:
    """Quantiles ``q`` (..., m) of the running sums ``cumulative`` (..., n): (..., m) values.

    ``total`` is ``cumulative[..., -1]``; pass it, read from each sketch, when ``cumulative``
    is a stack of several. An empty sketch gives NaN, or with ``empty_is_nan=False`` the top
    bucket's value. Both are for XLA's CPU backend: with the totals sliced from the stack,
    or used again by the emptiness check, the stack has a second user and is written out
    instead of fused into the comparison (one kernel more per step).
    """
    n = cumulative.shape[-1]
    total = cumulative[..., -1] if total is None else total
    rank = q * jnp.maximum(total - 1.0, 0.0)[..., None]
    # The bucket of the element of that rank is the number of buckets whose running sum is at
    # most the rank. Summed, on XLA's CPU backend, as a cascade of small reduce-window
    # kernels: about 1 us in all, where a matmul by a vector of ones, one kernel, took 6 us
    # (the library call costs more than the 2 x 1,846 additions). Exact in int32.
    below = jnp.sum(cumulative[..., None, :] <= rank[..., None], axis=-1, dtype=jnp.int32)
    value = mapping.value(jnp.minimum(below, n - 1))
    return jnp.where(total[..., None] > 0, value, jnp.nan) if empty_is_nan else value


def sketch_quantile(sketch: NormSketch, q: jax.Array | float) -> jax.Array:
    """The ``q``-quantile (q in [0, 1]) of the recorded values, float32; NaN when empty.

    Returns the representative of the bucket holding the element of rank
    ``floor(q * (n - 1))`` (NumPy's ``method="lower"``), so the result is within the mapping's
    relative accuracy of it for values inside the mapped range. ``q`` may be an array of
    quantiles: they share one pass over the buckets.
    """
    q = jnp.asarray(q, jnp.float32)
    out = _quantile_from(sketch.cumulative.astype(jnp.float32), q.reshape(-1),
                         sketch.mapping)
    return out.reshape(q.shape)


def sketch_quantiles(sketches: tuple[NormSketch, ...], qs: tuple[Any, ...]) -> jax.Array:
    """One quantile of each sketch (all of one accuracy), from one pass over their buckets.

    An empty sketch gives the top bucket's value, not NaN: the caller checks that values were
    recorded (the percentile rule waits for ``warmup_steps``).
    """
    mappings = {s.relative_accuracy for s in sketches}
    if len(mappings) != 1:
        raise ValueError(f"sketches of one relative accuracy needed, got {sorted(mappings)}")
    cumulative = jnp.stack([s.cumulative.astype(jnp.float32) for s in sketches])
    total = jnp.stack([s.cumulative[-1].astype(jnp.float32) for s in sketches])
    q = jnp.stack([jnp.asarray(x, jnp.float32) for x in qs])[:, None]
    return _quantile_from(cumulative, q, sketches[0].mapping, total, empty_is_nan=False)[:, 0]
