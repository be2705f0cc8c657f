"""percentile_clip on synthetic norm streams: the behaviours its contract requires."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gradclip_jax as gc
from tests.helpers import run_norm_stream


def lognormal(rng, n, sigma=0.5, scale=1.0):
    return scale * np.exp(rng.normal(0.0, sigma, n))


def p90_full_history(**kwargs):
    """The rule as the classic heuristic states it: the p90 of every norm seen so far."""
    return gc.percentile_clip(90.0, window=None, start=None, **kwargs)


def no_start(**kwargs):
    """The default's adaptive rule alone: the recent median, with no start."""
    return gc.percentile_clip(start=None, **kwargs)


RULES = {"default": gc.percentile_clip, "no start": no_start, "p90 full history": p90_full_history}
"""The properties every configuration must keep, tested on the default (whose start cuts the
first steps), on its rule without the start and on the p90 rule."""


@pytest.mark.parametrize("sigma", [0.1, 0.3, 0.5])
def test_stationary_lognormal_p90_clips_about_ten_percent(sigma):
    norms = lognormal(np.random.default_rng(1), 4000, sigma)
    _, _, _, clipped = run_norm_stream(p90_full_history(), norms)
    assert 0.06 <= clipped.mean() <= 0.14


@pytest.mark.parametrize("sigma", [0.1, 0.3, 0.5])
def test_stationary_lognormal_default_clips_about_half_at_the_recent_median(sigma):
    norms = lognormal(np.random.default_rng(1), 4000, sigma)
    _, _, thresholds, clipped = run_norm_stream(gc.percentile_clip(), norms)
    assert 0.42 <= clipped[100:].mean() <= 0.62
    # The threshold is the median of about the last `window` norms: it moves with them.
    assert np.median(thresholds[100:]) == pytest.approx(np.percentile(norms, 50), rel=0.1)
    assert np.std(np.log(thresholds[100:])) > 0.1 * sigma


def test_wide_norms_are_clipped_at_twice_the_median():
    # sigma = 1: the p90 is 3.6x the median, so the median cap sets the threshold.
    norms = lognormal(np.random.default_rng(10), 4000, 1.0)
    _, _, thresholds, clipped = run_norm_stream(p90_full_history(), norms)
    median = np.median(norms[:-1])
    assert thresholds[-1] == pytest.approx(gc._percentile.MEDIAN_MULTIPLE * median, rel=0.03)
    expected = np.mean(norms > gc._percentile.MEDIAN_MULTIPLE * np.median(norms))  # about 24%
    assert clipped[1000:].mean() == pytest.approx(expected, abs=0.03)


@pytest.mark.parametrize("rule", RULES.values(), ids=RULES)
def test_sustained_growth_cannot_ratchet_the_threshold(rule):
    rng = np.random.default_rng(2)
    stable = lognormal(rng, 500, 0.3)
    growing = lognormal(rng, 300, 0.3) * 1.05 ** np.arange(1, 301)
    norms = np.concatenate([stable, growing])
    _, outs, thresholds, _ = run_norm_stream(rule(), norms)
    before = thresholds[499]
    assert thresholds[-1] <= 8.0 * before
    assert np.all(outs <= thresholds.astype(np.float64) * (1 + 1e-5))
    # The norms grew 2e6-fold; the run's updates did not follow them.
    assert norms[-1] / norms[499] > 1e5
    assert outs[-1] <= 8.0 * before * (1 + 1e-5)


@pytest.mark.parametrize("rule", RULES.values(), ids=RULES)
def test_slow_drift_is_followed_with_decay(rule):
    rng = np.random.default_rng(3)
    n = 20_000
    norms = lognormal(rng, n, 0.3) * 10 ** (np.arange(n) / n)
    _, _, thresholds, _ = run_norm_stream(rule(decay=0.999), norms)
    recent_p90 = np.percentile(norms[-1000:], 90)
    assert 0.5 * recent_p90 <= thresholds[-1] <= 2.0 * recent_p90


def test_tiny_first_norms_do_not_lock_the_threshold_low():
    rng = np.random.default_rng(4)
    norms = np.concatenate([lognormal(rng, 100, 0.2, 1e-3), lognormal(rng, 2000, 0.3)])
    _, _, thresholds, clipped = run_norm_stream(p90_full_history(), norms)
    assert clipped.mean() <= 0.20
    assert clipped[-1000:].mean() <= 0.20
    assert thresholds[-1] == pytest.approx(np.percentile(norms[-1000:], 90), rel=0.2)
    # The default follows the new scale within a few hundred steps (the rise cap, 5% a step,
    # takes 142 steps for 1000x) and then clips at its recent median.
    _, _, thresholds, clipped = run_norm_stream(gc.percentile_clip(), norms)
    assert 0.42 <= clipped[400:].mean() <= 0.62
    assert thresholds[-1] == pytest.approx(np.percentile(norms[-1000:], 50), rel=0.3)


@pytest.mark.parametrize("rule", RULES.values(), ids=RULES)
def test_isolated_spike_is_clipped_and_barely_moves_the_threshold(rule):
    rng = np.random.default_rng(5)
    norms = lognormal(rng, 600, 0.3)
    norms[500] = 1e6 * np.median(norms)
    _, outs, thresholds, clipped = run_norm_stream(rule(), norms)
    assert clipped[500]
    assert outs[500] == pytest.approx(thresholds[500], rel=1e-5)
    assert outs[500] <= 1.5 * np.percentile(norms[:500], 90)
    assert abs(thresholds[501] / thresholds[500] - 1) < 0.05


@pytest.mark.parametrize("rule", RULES.values(), ids=RULES)
def test_current_norm_does_not_raise_its_own_threshold(rule):
    _, _, thresholds, _ = run_norm_stream(rule(warmup_steps=3), [1.0, 1.0, 1.0, 50.0, 1.0])
    _, _, calm, _ = run_norm_stream(rule(warmup_steps=3), [1.0, 1.0, 1.0, 1.0])
    assert thresholds[3] == calm[3]
    # Nor the next one by more than the rise cap (5% a step; 1% during a start).
    assert thresholds[4] <= thresholds[3] * 1.05 * (1 + 1e-6)
    # The adaptive rule's threshold is the median of the norms before it; the start's first
    # threshold a quarter of the median of the warmup norms.
    first = 0.25 if rule is gc.percentile_clip else 1.0
    assert thresholds[3] == pytest.approx(first, rel=0.011)


def test_warmup_without_and_with_max_norm():
    norms = np.full(20, 5.0)
    _, outs, thresholds, clipped = run_norm_stream(gc.percentile_clip(warmup_steps=10), norms)
    assert not clipped[:10].any()
    np.testing.assert_allclose(outs[:10], 5.0, rtol=1e-6)
    assert np.all(thresholds[:10] >= 3e38)  # stored "no threshold"
    assert np.isinf(float(gc.stats(gc.percentile_clip().init(None))["threshold"]))

    _, outs, _, clipped = run_norm_stream(gc.percentile_clip(warmup_steps=10, max_norm=2.0), norms)
    assert clipped[:10].all()
    np.testing.assert_allclose(outs, 2.0, rtol=1e-6)


@pytest.mark.parametrize("rule,first", [(gc.percentile_clip, 0.25), (no_start, 1.0)],
                         ids=["default", "no start"])
def test_warmup_one_starts_after_the_first_norm(rule, first):
    _, _, thresholds, clipped = run_norm_stream(rule(warmup_steps=1), [1.0, 3.0])
    assert not clipped[0]
    assert clipped[1] and thresholds[1] == pytest.approx(first, rel=0.011)


def test_max_norm_caps_the_adaptive_threshold():
    norms = lognormal(np.random.default_rng(6), 300, 0.3, 10.0)
    _, outs, thresholds, _ = run_norm_stream(gc.percentile_clip(max_norm=3.0), norms)
    assert thresholds.max() <= 3.0 + 1e-6
    assert outs.max() <= 3.0 * (1 + 1e-6)
    schedule = optax.linear_schedule(1.0, 2.0, 100)
    _, _, thresholds, _ = run_norm_stream(gc.percentile_clip(max_norm=schedule), norms[:150])
    assert thresholds[-1] == pytest.approx(2.0)


def test_freeze_after_fixes_the_threshold():
    rng = np.random.default_rng(7)
    norms = np.concatenate([lognormal(rng, 200, 0.3), lognormal(rng, 300, 0.3, 10.0)])
    state, _, thresholds, _ = run_norm_stream(p90_full_history(freeze_after=200), norms)
    frozen = thresholds[200]
    assert frozen == pytest.approx(np.percentile(norms[:200], 90), rel=0.05)
    np.testing.assert_array_equal(thresholds[200:], frozen)
    # The histogram keeps recording after the freeze.
    assert int(state.histogram.recorded) == 500
    _, _, unfrozen, _ = run_norm_stream(p90_full_history(), norms)
    assert unfrozen[-1] > 3 * frozen


def test_norm_percentile_reads_the_histogram():
    norms = lognormal(np.random.default_rng(8), 1000, 0.7)
    state, _, _, _ = run_norm_stream(gc.percentile_clip(), norms)
    for p in (10, 50, 90, 99):
        got = float(gc.norm_percentile(state, p))
        lo = np.percentile(norms.astype(np.float32), p, method="lower")
        hi = np.percentile(norms.astype(np.float32), p, method="higher")
        assert lo * 0.99 * (1 - 1e-5) <= got <= hi * 1.01 * (1 + 1e-5)


def test_traced_percentile_via_inject_hyperparams():
    tx = optax.inject_hyperparams(gc.percentile_clip)(percentile=90.0, window=None,
                                                      warmup_steps=5, start=None)
    state = tx.init(None)
    update = jax.jit(tx.update)
    for n in [1.0, 2.0, 3.0, 4.0, 5.0]:
        _, state = update({"w": jnp.array([n])}, state)
    out, state = update({"w": jnp.array([100.0])}, state)
    assert float(out["w"][0]) == pytest.approx(4.0, rel=0.011)  # p90 ("lower") of 1..5
    # Lowering the injected percentile at run time lowers the threshold at once.
    state.hyperparams["percentile"] = jnp.asarray(50.0)
    out, state = update({"w": jnp.array([100.0])}, state)
    assert float(out["w"][0]) == pytest.approx(3.0, rel=0.011)  # median of 1..5 and 100


@pytest.mark.parametrize("kwargs,match", [
    (dict(percentile=0.0), "percentile must be in"),
    (dict(percentile=100.5), "percentile must be in"),
    (dict(percentile=float("nan")), "percentile must be in"),
    (dict(relative_accuracy=0.0), "relative_accuracy must be in"),
    (dict(relative_accuracy=1.0), "relative_accuracy must be in"),
    (dict(decay=0.0), "decay must be in"),
    (dict(decay=1.5), "decay must be in"),
    (dict(warmup_steps=-1), "warmup_steps must be an integer >= 1"),
    (dict(warmup_steps=0), "warmup_steps must be an integer >= 1"),
    (dict(window=0), "window must be an integer >= 1"),
    (dict(freeze_after=0), "freeze_after must be an integer >= 1"),
    (dict(max_norm=0.0), "max_norm must be in"),
    (dict(max_norm=-3.0), "max_norm must be in"),
    (dict(start=0.0), "start must be in"),
    (dict(start=1.5), "start must be in"),
    (dict(start=float("nan")), "start must be in"),
])
def test_bad_arguments_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match + ".*got"):
        gc.percentile_clip(**kwargs)


@pytest.mark.parametrize("norm_range,error,match", [
    ((0.0, 1.0), ValueError, "0 < low < high < inf"),
    ((1.0, 1.0), ValueError, "0 < low < high < inf"),
    ((1e4, 1e-4), ValueError, "0 < low < high < inf"),
    ((1e-4, float("inf")), ValueError, "0 < low < high < inf"),
    ((float("nan"), 1.0), ValueError, "0 < low < high < inf"),
    ((1e-4,), TypeError, "a pair"),
    (1e8, TypeError, "a pair"),
    (("1e-4", 1e4), TypeError, "must be a real number"),
])
def test_bad_norm_range_fails_at_construction(norm_range, error, match):
    with pytest.raises(error, match=f"norm_range.*{match}"):
        gc.percentile_clip(norm_range=norm_range)
    with pytest.raises(error, match=f"norm_range.*{match}"):
        gc.percentile_clipped(optax.sgd(0.1), norm_range=norm_range)


@pytest.mark.parametrize("scale,norm_range", [(1e10, (1e-4, 1e12)), (1e-12, (1e-20, 1e-4))])
def test_norm_range_follows_norms_outside_the_default_range(scale, norm_range):
    # Outside 1e-8..1e8 the default histogram counts every norm at its bound, so the
    # threshold stops there (1e8 for norms of 1e10: every step cut a hundredfold); a range
    # around the norms restores the median of the recent ones.
    rng = np.random.default_rng(4)
    norms = lognormal(rng, 100, 0.3)
    state, _, thresholds, _ = run_norm_stream(no_start(norm_range=norm_range), norms * scale)
    median = np.median(norms[-20:]) * scale
    assert median / 1.1 <= float(thresholds[-1]) <= median * 1.1
    assert state.histogram.value_range == norm_range
    default, _, thresholds, _ = run_norm_stream(no_start(), norms * scale)
    assert float(thresholds[-1]) == pytest.approx(1e8 if scale > 1 else 1e-8, rel=1e-6)


def test_norm_range_is_static_under_jit_and_inject_hyperparams():
    tx = optax.inject_hyperparams(gc.percentile_clip)(percentile=50.0, start=None,
                                                      norm_range=(1e-4, 1e12))
    state = tx.init(None)
    assert "norm_range" not in state.hyperparams
    update = jax.jit(tx.update)
    for _ in range(3):
        _, state = update({"w": jnp.array([3e10])}, state)
    assert float(state.inner_state.threshold) == pytest.approx(3e10, rel=0.011)  # not 1e8


def test_percentile_100_and_decay_1_are_valid():
    gc.percentile_clip(100.0, decay=1.0)


@pytest.mark.parametrize("rule", [no_start, p90_full_history], ids=["no start", "p90"])
def test_threshold_rises_at_most_five_percent_per_step(rule):
    rng = np.random.default_rng(9)
    # A run that blows up right after a short warmup: norms grow tenfold per step.
    norms = np.concatenate([lognormal(rng, 3, 0.1), 10.0 ** np.arange(1, 30)])
    _, outs, thresholds, _ = run_norm_stream(rule(), norms)
    t = thresholds[3:].astype(np.float64)
    assert np.all(t[1:] <= t[:-1] * 1.05 * (1 + 1e-6))
    assert outs.max() <= thresholds[3] * 1.05 ** (len(norms) - 4) * (1 + 1e-5)


def test_during_the_start_the_threshold_stays_below_the_runs_median():
    # The same blow-up under the default: its start's floor, a quarter of the recent median,
    # may rise faster than 5% a step, but the recent median is capped at 4x the whole run's,
    # so the threshold never passes the median of the norms recorded before it (to the
    # sketch's 1%) nor 1.01x the one before, and the updates stay below the run's median.
    rng = np.random.default_rng(9)
    # Up to 1e16 (tenfold per step): a float32 sum of squares of larger norms overflows.
    norms = np.concatenate([lognormal(rng, 3, 0.1), 10.0 ** np.arange(1, 17)])
    _, outs, thresholds, clipped = run_norm_stream(gc.percentile_clip(), norms)
    assert clipped[1:].all()
    t = thresholds.astype(np.float64)
    medians = np.array([np.median(norms[:i]) for i in range(2, len(norms))])
    assert np.all(t[2:] <= np.maximum(t[1:-1] * 1.01, medians * 1.01) * (1 + 1e-6))
    assert np.all(outs[1:] <= np.maximum(medians[-1], t[1]) * 1.01)
    assert outs[-1] < 1e-10 * norms[-1]


def test_window_threshold_follows_a_change_of_scale_within_the_window():
    rng = np.random.default_rng(11)
    norms = np.concatenate([lognormal(rng, 300, 0.3), lognormal(rng, 300, 0.3, 0.1)])
    _, _, thresholds, _ = run_norm_stream(gc.percentile_clip(50.0, window=20), norms)
    # A fall is followed at once: 60 steps after a tenfold drop the threshold is the new median.
    assert thresholds[360] == pytest.approx(np.median(norms[300:]), rel=0.25)
    # Without a window the median cap is twice the run's median; with one, four times.
    wide = lognormal(np.random.default_rng(10), 3000, 1.0)
    _, _, top, _ = run_norm_stream(gc.percentile_clip(100.0, window=20), wide)
    assert top[1:].max() <= gc._percentile.WINDOW_MEDIAN_MULTIPLE * np.median(wide) * 1.1
    _, _, slow, _ = run_norm_stream(p90_full_history(), norms)
    assert slow[360] > 3 * thresholds[360]


def test_window_traced_through_inject_hyperparams():
    tx = optax.inject_hyperparams(gc.percentile_clip)(percentile=50.0, window=20, start=None)
    state = tx.init(None)
    update = jax.jit(tx.update)
    for n in [1.0, 1.0, 1.0, 1.0]:
        _, state = update({"w": jnp.array([n])}, state)
    out, state = update({"w": jnp.array([100.0])}, state)
    assert float(out["w"][0]) == pytest.approx(1.0, rel=0.011)


def with_start(**kwargs):
    return gc.percentile_clip(start=0.25, **kwargs)


def test_start_clips_a_falling_start_at_a_quarter_of_the_first_norm():
    # Norms that fall fourfold over the first 60 steps, then level off around 1.
    rng = np.random.default_rng(12)
    norms = np.concatenate([4.0 * 0.977 ** np.arange(60), lognormal(rng, 540, 0.2)])
    _, outs, thresholds, clipped = run_norm_stream(with_start(), norms)
    assert thresholds[1] == pytest.approx(0.25 * norms[0], rel=0.011)
    end = int(np.argmin(clipped[1:])) + 1  # the first unclipped step after the first
    assert end > 10 and clipped[1:end].all()
    # Every step of the start leaves with the threshold, which rises at most 1% a step.
    np.testing.assert_allclose(outs[1:end], thresholds[1:end], rtol=1e-5)
    t = thresholds.astype(np.float64)
    assert np.all(t[2:end + 1] <= t[1:end] * gc._percentile.START_RISE_PER_STEP * (1 + 1e-6))
    # After it, the default's rule: at most 5% a step, the recent median, about half clipped.
    assert np.all(t[end + 1:] <= t[end:-1] * 1.05 * (1 + 1e-6))
    assert 0.42 <= clipped[end + 100:].mean() <= 0.62
    # Without a start the same stream clips far less of its first 60 steps.
    _, _, _, default_clipped = run_norm_stream(no_start(), norms)
    assert clipped[:60].mean() > default_clipped[:60].mean() + 0.3


def test_start_rises_with_norms_that_rise_after_the_first():
    # A first norm at a third of the norms that follow (as on the LSTM LM, whose first norm is
    # among its smallest): while the start lasts its cap is at least a quarter of the recent
    # median, where a cap rising 1% a step from a quarter of the first norm stays far below.
    rng = np.random.default_rng(14)
    norms = np.concatenate([[0.3], lognormal(rng, 400, 0.2)])
    _, outs, thresholds, clipped = run_norm_stream(with_start(), norms)
    assert thresholds[1] == pytest.approx(0.25 * norms[0], rel=0.011)
    assert clipped[1:60].all()  # still the start: every step clipped
    recent = np.array([np.median(norms[max(0, i - 19):i + 1]) for i in range(len(norms))])
    assert np.all(thresholds[30:60] >= 0.25 * recent[29:59] * 0.85)
    assert thresholds[30] > 2.0 * 0.25 * norms[0] * 1.01**30
    np.testing.assert_allclose(outs[1:60], thresholds[1:60], rtol=1e-5)
    # Norms that fall from the first (the transformer's): the cap is the start's, 1% a step.
    falling = np.concatenate([4.0 * 0.977 ** np.arange(60), lognormal(rng, 100, 0.2)])
    _, _, thresholds, _ = run_norm_stream(with_start(), falling)
    np.testing.assert_allclose(thresholds[1:40], 0.25 * 4.0 * 1.01 ** np.arange(39), rtol=0.011)


def test_start_on_level_norms_ends_within_a_bounded_number_of_steps():
    # Norms that never fall: the start's threshold rises 1% a step until it meets them.
    norms = lognormal(np.random.default_rng(13), 2000, 0.3)
    _, _, thresholds, clipped = run_norm_stream(with_start(), norms)
    end = int(np.argmin(clipped[1:])) + 1
    # From a quarter of the first norm to the norms' low tail at 1% a step.
    assert end <= math.log(4.0 * norms[0] / norms.min()) / math.log(1.01) + 2
    assert 0.42 <= clipped[end + 100:].mean() <= 0.62


def test_start_ends_at_a_new_scale_and_follows_it():
    # Tiny first norms, then a thousandfold larger scale: the start does not hold the
    # threshold to 1% a step; the new scale is followed as without a start.
    rng = np.random.default_rng(4)
    norms = np.concatenate([lognormal(rng, 100, 0.2, 1e-3), lognormal(rng, 2000, 0.3)])
    _, _, thresholds, clipped = run_norm_stream(with_start(), norms)
    assert 0.42 <= clipped[500:].mean() <= 0.62
    assert thresholds[-1] == pytest.approx(np.percentile(norms[-1000:], 50), rel=0.3)


@pytest.mark.parametrize("rule", [with_start, lambda **kw: gc.percentile_clip(
    90.0, window=None, start=0.5, **kw)], ids=["default", "p90 full history"])
def test_start_keeps_the_rules_bounds(rule):
    rng = np.random.default_rng(2)
    # A spike during the start, and one after it: each clipped, neither raises the threshold.
    norms = lognormal(rng, 800, 0.3)
    norms[5] = norms[600] = 1e6
    _, outs, thresholds, clipped = run_norm_stream(rule(), norms)
    assert clipped[5] and clipped[600]
    assert thresholds[6] <= thresholds[5] * 1.05 * (1 + 1e-6)
    assert abs(thresholds[601] / thresholds[600] - 1) < 0.05
    assert np.all(outs[1:] <= thresholds[1:].astype(np.float64) * (1 + 1e-5))
    # Sustained growth after the start: no ratchet.
    growing = np.concatenate([lognormal(rng, 500, 0.3),
                              lognormal(rng, 300, 0.3) * 1.05 ** np.arange(1, 301)])
    _, _, thresholds, _ = run_norm_stream(rule(), growing)
    assert thresholds[-1] <= 8.0 * thresholds[499]


def test_start_traced_through_inject_hyperparams():
    norms = [4.0, 3.0, 2.0, 1.5, 1.0, 0.5, 0.9]
    tx = optax.inject_hyperparams(gc.percentile_clip)(start=0.25)
    state = tx.init(None)
    update = jax.jit(tx.update)
    outs = []
    for n in norms:
        out, state = update({"w": jnp.array([n])}, state)
        outs.append(float(out["w"][0]))
    _, static, _, _ = run_norm_stream(with_start(), norms)
    np.testing.assert_allclose(outs, static, rtol=1e-5)
    assert outs[1] == pytest.approx(1.0, rel=0.011)


@pytest.mark.parametrize("rule", [*RULES.values(), lambda: gc.percentile_clip(start=0.25),
                                  lambda: gc.clip_by_value(0.5)],
                         ids=[*RULES, "start", "value clip"])
def test_zero_updates_are_not_recorded(rule):
    # Twenty batches with no gradient at the start (a masked loss, a satisfied margin) used
    # to enter the histogram below its range and hold the threshold near 1e-8 for hundreds
    # of steps, every later update cut to about 1e-5 of its norm. A zero update has nothing
    # to clip and no scale: the run clips as if those steps had not been.
    rng = np.random.default_rng(6)
    norms = lognormal(rng, 200, 0.3)
    state, _, thresholds, _ = run_norm_stream(rule(), np.r_[np.zeros(20), norms])
    _, _, expected, _ = run_norm_stream(rule(), norms)
    np.testing.assert_array_equal(thresholds[20:], expected)
    assert int(state.count) == 220 and int(state.histogram.recorded) == 200
