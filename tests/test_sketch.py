"""The log mapping and the norm sketch: accuracy against NumPy, fixed size, long runs."""

import dataclasses
import math

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import gradclip_jax as gc
from gradclip_jax._mapping import LogMapping
from gradclip_jax._sketch import _count_at_most, sketch_add, sketch_init, sketch_quantile


@given(x=st.floats(1e-8, 1e8), a=st.sampled_from([0.001, 0.01, 0.05]))
@example(x=52588295.0, a=0.001)
def test_mapping_relative_accuracy(x, a):
    mapping = LogMapping(a)
    value = float(mapping.value(mapping.index(x)))
    # a, and float32's rounding of the key's logarithm near a bucket edge (hypothesis found
    # a + 1.0e-5 at x = 52588295, a = 0.001; a sweep of 2e7 values a + 1.8e-5).
    assert abs(value - x) <= (a + 3e-5) * x


def test_mapping_out_of_range_buckets():
    mapping = LogMapping(0.01)
    assert int(mapping.index(0.0)) == 0
    assert int(mapping.index(1e-12)) == 0
    assert int(mapping.index(1e12)) == mapping.num_buckets - 1
    assert float(mapping.value(0)) == pytest.approx(1e-8)
    assert float(mapping.value(mapping.num_buckets - 1)) == pytest.approx(1e8)


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 2.0])
def test_mapping_rejects_bad_accuracy(bad):
    with pytest.raises(ValueError, match="relative_accuracy must be in"):
        LogMapping(bad)


def add_all(sketch, values, decay=None):
    def body(s, v):
        return sketch_add(s, v, jnp.isfinite(v), decay), None

    values = jnp.asarray(values, jnp.float32)
    return jax.jit(lambda s, v: jax.lax.scan(body, s, v)[0])(sketch, values)


@given(
    values=hnp.arrays(np.float64, st.integers(1, 300),
                      elements=st.floats(1e-6, 1e6, allow_nan=False)),
    q=st.floats(0.0, 1.0),
)
def test_quantile_within_accuracy_of_numpy(values, q):
    a = 0.01
    values32 = values.astype(np.float32)
    sketch = add_all(sketch_init(a, weighted=False), values32)
    got = float(sketch_quantile(sketch, q))
    lower = float(np.quantile(values32, q, method="lower"))
    higher = float(np.quantile(values32, q, method="higher"))
    assert lower * (1 - a) * (1 - 1e-5) <= got <= higher * (1 + a) * (1 + 1e-5)


@given(
    counts=st.lists(hnp.arrays(np.int32, st.integers(1, 200), elements=st.integers(0, 3)),
                    min_size=1, max_size=3),
    data=st.data(),
)
def test_the_two_level_search_counts_as_a_full_comparison_does(counts, data):
    # Any lengths (below, at and between multiples of the 32-bucket block, and shorter
    # than one block), runs of equal sums (empty buckets), and ranks below, between, on
    # and above the sums.
    n = min(c.size for c in counts)
    sums = [np.cumsum(c[:n]).astype(np.float32) for c in counts]
    top = max(float(s[-1]) for s in sums) + 2
    # No subnormal ranks: XLA's CPU backend flushes them to zero (a rank of -1e-44 would
    # count a sum of 0 as below it, where NumPy does not). Real ranks are never negative,
    # and for sums >= 0 a positive subnormal rank counts what 0 counts.
    ranks = data.draw(hnp.arrays(np.float32, (len(sums), 3),
                                 elements=st.floats(-1.0, top, width=32,
                                                    allow_subnormal=False)))
    for s, r in zip(sums, ranks, strict=True):
        r[0] = s[data.draw(st.integers(0, n - 1))]  # exactly on a stored sum
    stored = tuple(jnp.asarray(s if i % 2 else s.astype(np.int32)) for i, s in enumerate(sums))
    got = np.asarray(jax.jit(_count_at_most)(stored, tuple(ranks)))
    want = np.array([[np.sum(s <= x) for x in r] for s, r in zip(sums, ranks, strict=True)])
    np.testing.assert_array_equal(got, want)


def test_empty_sketch_quantile_is_nan():
    assert math.isnan(float(sketch_quantile(sketch_init(0.01, weighted=False), 0.5)))


def test_state_size_is_fixed_and_small():
    tx = gc.percentile_clip()
    state = tx.init(None)
    nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
    assert nbytes <= 64 * 1024
    # Shapes are fixed by construction: a state as ten million steps leave it (counts forced to
    # such a run's totals) is the same size, and one more update keeps it so.
    # The whole run's row holds ten million norms; the recent row's weight is a window's.
    whole = jnp.cumsum(jnp.zeros(state.histogram.mapping.num_buckets).at[900:960].set(
        10**7 // 60))
    assert state.histogram.cumulative.shape == (2, whole.size)
    late = state._replace(
        count=jnp.asarray(10**7, jnp.int32),
        histogram=dataclasses.replace(
            state.histogram, cumulative=jnp.stack([whole, whole * (20.0 / whole[-1])]),
            recorded=jnp.asarray(10**7, jnp.int32)),
    )
    _, after = jax.jit(tx.update)({"w": jnp.ones(3)}, late)
    assert sum(x.nbytes for x in jax.tree.leaves(after)) == nbytes
    assert int(after.histogram.recorded) == 10**7 + 1


@pytest.mark.parametrize("weighted,decay", [(False, None), (True, 1.0), (True, 1.0 - 1e-9)])
def test_counts_keep_increasing_in_long_runs(weighted, decay):
    sketch = sketch_init(0.01, weighted=weighted)
    big_bucket, small_bucket = 1000, 1200
    # A state as a long run leaves it, 4 values before a halving is due: the counts' total is
    # at its largest, twice the halving period.
    period = 2**29 if not weighted else 2**22
    limit = 2 * period
    counts = sketch.counts.at[big_bucket].set(limit - 4).at[small_bucket].set(limit // 4)
    sketch = dataclasses.replace(sketch, cumulative=jnp.cumsum(counts), recorded=jnp.asarray(
        3 * period - 4, jnp.int32))
    value = sketch.mapping.value(small_bucket)
    before = float(sketch_quantile(sketch, 0.9))
    for _ in range(8):
        new = sketch_add(sketch, value, jnp.bool_(True), decay)
        # Each addition registers: the small bucket grows relative to the big one.
        ratio_before = float(sketch.counts[small_bucket]) / float(sketch.counts[big_bucket])
        ratio_after = float(new.counts[small_bucket]) / float(new.counts[big_bucket])
        assert ratio_after > ratio_before
        sketch = new
    assert int(sketch.recorded) == 3 * period + 4
    assert float(jnp.sum(sketch.counts.astype(jnp.float32))) < limit
    assert float(sketch_quantile(sketch, 0.9)) == pytest.approx(before, rel=0.03)


def test_a_recent_row_is_the_sketch_it_would_be_on_its_own():
    # The percentile clip's recent sketch is the second row of its histogram's array, so
    # that one pass updates both: each row must be, bit for bit, the float32 sketch it
    # would be alone, through a halving (due at the second value here) and skipped values.
    period = 2**22
    start = sketch_init(0.01, weighted=True).counts.at[1000].set(float(period))
    alone = [dataclasses.replace(sketch_init(0.01, weighted=True), cumulative=jnp.cumsum(
        start), recorded=jnp.asarray(period - 2, jnp.int32)) for _ in range(2)]
    both = dataclasses.replace(sketch_init(0.01, weighted=False, recent=True),
                               cumulative=jnp.stack([a.cumulative for a in alone]),
                               recorded=jnp.asarray(period - 2, jnp.int32))
    assert both.cumulative.dtype == jnp.float32 and both.recent.count is both.count
    values = [(float(both.mapping.value(1000)), True), (3.0, True), (5.0, False), (0.5, True)]
    for value, valid in values:
        value, valid = jnp.float32(value), jnp.bool_(valid)
        alone = [sketch_add(alone[0], value, valid, None),
                 sketch_add(alone[1], value, valid, 0.95)]
        both = sketch_add(both, value, valid, None, 0.95)
        np.testing.assert_array_equal(both.whole.cumulative, alone[0].cumulative)
        np.testing.assert_array_equal(both.recent.cumulative, alone[1].cumulative)
        assert int(both.count) == int(alone[0].count)
    assert float(both.whole.cumulative[-1]) < 0.6 * period  # halved once, on the schedule
    assert int(both.count) == period + 1
    np.testing.assert_array_equal(both.counts, alone[0].counts)
    assert float(sketch_quantile(both, 0.5)) == float(sketch_quantile(alone[0], 0.5))
    with pytest.raises(ValueError, match="recent_decay"):
        sketch_add(both, jnp.float32(1.0), jnp.bool_(True), None)


def test_the_percentile_clips_recent_sketch_shares_the_histograms_array_and_count():
    tx = gc.percentile_clip()
    state = tx.init({"w": jnp.zeros(2)})
    assert state.histogram.cumulative.shape == (2, state.histogram.mapping.num_buckets)
    assert tx.init(None).recent is not None and gc.percentile_clip(window=None).init(
        None).recent is None
    for norm in (1.0, float("nan"), 2.0):
        _, state = tx.update({"w": jnp.array([norm, 0.0])}, state)
    assert int(state.histogram.recorded) == 2  # the NaN step is not recorded
    assert int(state.recent.count) == 2
    # Both sketches hold the same two norms (the recent one with decayed weights).
    assert float(state.histogram.whole.cumulative[-1]) == 2.0
    assert float(state.recent.cumulative[-1]) == pytest.approx(1.0 + (1.0 - 1.0 / 20))


def test_decay_forgets_old_values():
    old = np.full(1000, 1.0)
    new = np.full(200, 100.0)
    kept = add_all(sketch_init(0.01, weighted=False), np.concatenate([old, new]))
    forgot = add_all(sketch_init(0.01, weighted=True), np.concatenate([old, new]), decay=0.99)
    assert float(sketch_quantile(kept, 0.5)) == pytest.approx(1.0, rel=0.0101)
    assert float(sketch_quantile(forgot, 0.5)) == pytest.approx(100.0, rel=0.0101)


@pytest.mark.parametrize("weighted,decay", [(False, None), (True, 0.9)])
def test_running_sums_hold_the_counts_of_each_bucket(weighted, decay):
    values = np.random.default_rng(0).lognormal(0.0, 2.0, 300).astype(np.float32)
    sketch = add_all(sketch_init(0.01, weighted=weighted), values, decay=decay)
    buckets = np.asarray(jax.vmap(sketch.mapping.index)(jnp.asarray(values)))
    weights = np.ones(300) if decay is None else decay ** np.arange(299, -1, -1)
    expected = np.bincount(buckets, weights, minlength=sketch.cumulative.shape[0])
    assert np.all(np.diff(np.asarray(sketch.cumulative)) >= 0)
    np.testing.assert_allclose(np.asarray(sketch.counts), expected, atol=1e-5)
    np.testing.assert_allclose(float(sketch.cumulative[-1]), expected.sum(), rtol=1e-5)


def test_nonfinite_values_are_not_recorded():
    sketch = add_all(sketch_init(0.01, weighted=False), [1.0, np.nan, np.inf, 2.0])
    assert int(sketch.recorded) == 2
    assert int(jnp.sum(sketch.counts)) == 2
