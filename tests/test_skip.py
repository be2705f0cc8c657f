"""skip_spikes: what a skipped step leaves behind, what counts as a spike, and where it works."""

import functools
import math

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import gradclip_jax as gc
from tests.helpers import assert_same_bits

PARAMS = {"w": jnp.ones((4,)), "b": jnp.zeros((2,))}


def guarded(**kw):
    return gc.skip_spikes(optax.chain(gc.clip_by_global_norm(10.0), optax.adam(1e-2)), **kw)


def grads_of_norm(norm):
    direction = jax.tree.map(lambda x: jnp.ones_like(x), PARAMS)
    total = math.sqrt(sum(x.size for x in jax.tree.leaves(PARAMS)))
    return jax.tree.map(lambda x: x * (norm / total), direction)


def run(tx, norms, losses=None):
    """Scans norms (and losses) through tx; returns the final state and per-step skip flags."""
    def step(state, xs):
        norm, loss = xs
        kwargs = {} if losses is None else {"loss": loss}
        _, new = tx.update(grads_of_norm(norm), state, PARAMS, **kwargs)
        return new, new.skipped_steps > state.skipped_steps

    losses_ = jnp.ones(len(norms)) if losses is None else jnp.asarray(losses, jnp.float32)
    state, skipped = jax.jit(lambda s, xs: jax.lax.scan(step, s, xs))(
        tx.init(PARAMS), (jnp.asarray(norms, jnp.float32), losses_))
    return state, np.asarray(skipped)


@functools.cache
def _scan_states(tx):
    """One jitted scan per transform (compiled once per input length): every step's state."""
    def step(state, xs):
        norm, loss = xs
        _, new = tx.update(grads_of_norm(norm), state, PARAMS, loss=loss)
        return new, new

    return jax.jit(lambda s, xs: jax.lax.scan(step, s, xs))


def lognormal(seed, n, sigma=0.3):
    return np.exp(np.random.default_rng(seed).normal(0.0, sigma, n))


def test_a_spike_is_skipped_and_leaves_the_inner_state_bit_identical():
    tx = guarded()
    state, _ = run(tx, lognormal(0, 50))
    before = state.inner_state
    updates, state = jax.jit(tx.update)(grads_of_norm(1e3), state, PARAMS)
    assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(updates))
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(state.inner_state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    s = gc.stats(state)
    assert int(s["skipped_steps"]) == 1 and int(s["skipped_norm_spikes"]) == 1
    assert int(state.count) == 51


GUARDED_5 = guarded(warmup_steps=5)


@settings(max_examples=20, deadline=None)
@given(t=st.integers(0, 39), bad=st.sampled_from([math.nan, math.inf]),
       in_loss=st.booleans())
def test_a_nonfinite_step_leaves_the_statistics_as_they_were(t, bad, in_loss):
    tx = GUARDED_5
    norms = lognormal(1, 40)
    losses = np.ones(40)
    if in_loss:
        losses[t] = bad
    else:
        norms[t] = bad
    # Every step's state from one scan (compiled once for all examples): the state after
    # step t against the one after step t - 1 (the initial state for t = 0).
    _, states = _scan_states(tx)(tx.init(PARAMS), (jnp.asarray(norms, jnp.float32),
                                                   jnp.asarray(losses, jnp.float32)))
    state = jax.tree.map(lambda x: x[t], states)
    clean = jax.tree.map(lambda x: x[t - 1], states) if t else tx.init(PARAMS)
    skipped = [int(state.skipped_steps) > int(clean.skipped_steps)]
    assert skipped[-1] and int(state.skipped_nonfinite) == 1
    for a, b in zip(jax.tree.leaves((clean.norms, clean.losses, clean.inner_state)),
                    jax.tree.leaves((state.norms, state.losses, state.inner_state)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_no_false_positives_on_stationary_noise():
    for seed in range(3):
        _, skipped = run(guarded(), lognormal(seed, 3000))
        assert skipped.sum() <= 3000 / 500, (seed, skipped.sum())


def test_rare_spikes_are_all_skipped_and_do_not_hide_the_next():
    norms = lognormal(4, 1000)
    spikes = np.arange(100, 1000, 37)
    norms[spikes] *= 1e3
    norms[spikes + 1] *= 1e3  # two in a row: the first must not widen the spread
    _, skipped = run(guarded(), norms)
    assert skipped[spikes].all() and skipped[spikes + 1].all()
    assert skipped.sum() <= 2 * len(spikes) + 2


def test_a_lasting_change_of_scale_is_accepted_after_a_bounded_number_of_skips():
    norms = np.concatenate([lognormal(5, 300), 30 * lognormal(6, 300)])
    state, skipped = run(guarded(max_consecutive=10), norms)
    assert skipped[300:311].sum() == 10 and not skipped[310]
    assert skipped[311:].sum() <= 2  # the baseline moved to the new scale
    assert int(state.rebased) == 1


def test_never_applies_a_nonfinite_update():
    tx = guarded(max_consecutive=2)
    state = tx.init(PARAMS)
    for _ in range(6):
        updates, state = tx.update(grads_of_norm(math.nan), state, PARAMS)
        assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(updates))
    assert int(state.skipped_nonfinite) == 6


def test_loss_spikes_are_skipped_when_the_loss_is_passed():
    losses = 2.0 * lognormal(7, 200, 0.05)
    losses[150] = 50.0
    state, skipped = run(guarded(), np.ones(200), losses)
    assert skipped[150] and skipped.sum() == 1
    assert int(state.skipped_loss_spikes) == 1


def test_stats_and_diagnose_report_skips_next_to_the_clip():
    norms = lognormal(8, 200)
    norms[[120, 160]] = 1e4
    state, _ = run(guarded(name="guard"), norms)
    s = gc.host_stats(state)
    assert s["guard/skipped_steps"] == 2 and s["guard/skipped_norm_spikes"] == 2
    assert "grad_norm" in s  # the clip inside keeps its plain keys
    messages = [f.message for f in gc.diagnose(state)]
    assert any("skipped 2 of 200 steps" in m and "2 gradient-norm spikes" in m
               for m in messages)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(k=0.0), ValueError, "k must be in"),
    (dict(min_ratio=1.0), ValueError, "min_ratio must be in"),
    (dict(window=1), ValueError, "window must be an integer >= 2"),
    (dict(warmup_steps=0), ValueError, "warmup_steps must be an integer >= 1"),
    (dict(max_consecutive=0), ValueError, "max_consecutive must be an integer >= 1"),
    (dict(name=""), ValueError, "name must be"),
])
def test_bad_arguments_fail_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        gc.skip_spikes(optax.sgd(0.1), **kwargs)
    with pytest.raises(TypeError, match="inner must be an optax GradientTransformation"):
        gc.skip_spikes(lambda g: g)


def test_works_inside_multisteps_and_inject_hyperparams():
    inner = optax.inject_hyperparams(optax.adam)(learning_rate=1e-2)
    tx = optax.MultiSteps(gc.skip_spikes(inner, warmup_steps=3), every_k_schedule=2)
    state = tx.init(PARAMS)
    update = jax.jit(tx.update)
    for norm in [1.0, 1.1, 0.9, 1.0, 1.2, 0.95, 1.0, 1.05, 1e4, 1e4]:
        _, state = update(grads_of_norm(norm), state, PARAMS)
    assert int(gc.stats(state)["skipped_norm_spikes"]) == 1  # one emitted step held the spike


def test_the_guard_itself_under_inject_hyperparams():
    inner = optax.chain(gc.clip_by_global_norm(1.0), optax.adam(1e-2))
    tx = optax.inject_hyperparams(gc.skip_spikes)(inner, k=6.0, warmup_steps=3)
    state = tx.init(PARAMS)
    update = jax.jit(tx.update)
    for norm in [1.0, 1.1, 0.9, 1.0, 1.2, 1e4]:
        _, state = update(grads_of_norm(norm), state, PARAMS)
    assert int(gc.stats(state)["skipped_norm_spikes"]) == 1
    _, state = update(grads_of_norm(1.5), state, PARAMS)
    assert int(gc.stats(state)["skipped_norm_spikes"]) == 1  # 1.5x the median is no spike
    state.hyperparams["min_ratio"] = jnp.asarray(1.2)  # injected at run time
    state.hyperparams["k"] = jnp.asarray(0.5)
    _, state = update(grads_of_norm(1.5), state, PARAMS)
    assert int(gc.stats(state)["skipped_norm_spikes"]) == 2


GUARDED_ADAMW = gc.skip_spikes(optax.chain(gc.percentile_clip(), optax.adamw(1e-2)),
                               warmup_steps=3)
GUARDED_ADAMW_UPDATE = jax.jit(GUARDED_ADAMW.update)


@settings(max_examples=25, deadline=None)
@given(params=hnp.arrays(np.float32, st.integers(1, 6),
                         # Subnormals excluded: XLA's CPU backend flushes them to zero in
                         # any addition, p + (-0.0) included.
                         elements=st.floats(-2.0**100, 2.0**100, width=32,
                                            allow_subnormal=False)),
       spike=st.sampled_from([1e4, math.nan, math.inf]))
def test_a_skipped_step_leaves_parameters_and_inner_state_bit_identical(params, spike):
    params = {"p": jnp.asarray(params).at[0].set(-0.0)}  # a negative zero, too
    tx, update = GUARDED_ADAMW, GUARDED_ADAMW_UPDATE  # compiled once per parameter length
    state = tx.init(params)
    for g in (1.0, 1.2, 0.9, 1.1):
        _, state = update({"p": jnp.full_like(params["p"], g)}, state, params)
    updates, new_state = update({"p": jnp.full_like(params["p"], spike)}, state, params)
    new_params = optax.apply_updates(params, updates)
    assert int(new_state.skipped_steps) == 1
    bits = lambda x: np.asarray(x).view(np.uint32)  # noqa: E731
    np.testing.assert_array_equal(bits(new_params["p"]), bits(params["p"]))
    for a, b in zip(jax.tree.leaves(state.inner_state), jax.tree.leaves(new_state.inner_state),
                    strict=True):
        np.testing.assert_array_equal(bits(a), bits(b))


INNERS = {
    "adamw": lambda: optax.adamw(1e-2, weight_decay=0.1),
    "momentum": lambda: optax.sgd(1e-2, momentum=0.9),  # the update is the new state itself
    "adafactor": lambda: optax.adafactor(1e-2),  # factored moments, a state of another shape
    "lion": lambda: optax.lion(1e-3),
    "noise": lambda: optax.chain(optax.add_noise(0.01, 0.55, 0), optax.adam(1e-2)),  # a key
    "injected": lambda: optax.inject_hyperparams(optax.adamw)(learning_rate=1e-2),
    "schedule": lambda: optax.adam(optax.warmup_cosine_decay_schedule(0.0, 1e-2, 3, 20)),
    "multisteps": lambda: optax.MultiSteps(optax.adam(1e-2), every_k_schedule=2),
    "percentile_clip+adam": lambda: optax.chain(gc.percentile_clip(), optax.adam(1e-2)),
}


def _raw(x):
    """An array's values as NumPy, a typed PRNG key's as its key data."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    return np.asarray(x)


@pytest.mark.parametrize("make", INNERS.values(), ids=INNERS.keys())
def test_applied_steps_are_the_inner_transformation_s_own(make):
    # The guard replays the inner update with each state leaf selected where it is computed
    # (so XLA does not compute it twice); on an applied step nothing may change, bit for bit.
    params = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "b": jnp.full((5,), 0.5)}
    inner, tx = make(), gc.skip_spikes(make(), warmup_steps=3)
    inner_state, state = inner.init(params), tx.init(params)
    inner_update, update = jax.jit(inner.update), jax.jit(tx.update)
    rng = np.random.default_rng(0)
    for t in range(8):
        grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
        if t == 6:  # a spike: skipped, the inner state kept
            grads = jax.tree.map(lambda g: g * 1e4, grads)
            updates, new_state = update(grads, state, params)
            assert int(new_state.skipped_steps) == 1
            assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(updates))
            for a, b in zip(jax.tree.leaves(state.inner_state),
                            jax.tree.leaves(new_state.inner_state), strict=True):
                np.testing.assert_array_equal(_raw(a), _raw(b))
            state = new_state
            continue
        want, inner_state = inner_update(grads, inner_state, params)
        got, state = update(grads, state, params)
        for a, b in zip(jax.tree.leaves((want, inner_state)),
                        jax.tree.leaves((got, state.inner_state)), strict=True):
            np.testing.assert_array_equal(_raw(a), _raw(b))
        params = optax.apply_updates(params, want)


def test_extra_arguments_that_are_not_arrays_reach_the_inner_transformation():
    seen = []

    def update(updates, state, params=None, *, tag=None, **extra):
        seen.append(tag)
        return updates, state

    inner = optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update)
    tx = gc.skip_spikes(inner)
    jax.jit(lambda g, s: tx.update(g, s, tag="label"))(PARAMS, tx.init(PARAMS))
    assert seen == ["label"]


def test_a_guard_that_never_skips_trains_bit_for_bit_as_its_inner_transformation():
    # The whole loop jitted, so that XLA fuses the parameter update with the optimizer's. Before
    # the replay, XLA computed Adam's moments a second time inside that fusion, and the
    # parameters drifted from the unguarded run's by an ulp within 300 steps (measured).
    rng = np.random.default_rng(0)
    params = {"w": jnp.zeros((64, 33)), "b": jnp.zeros((7,))}
    grads = jax.tree.map(
        lambda p: jnp.asarray(rng.normal(size=(300, *p.shape)), jnp.float32), params)
    inner = optax.chain(gc.percentile_clip(), optax.adamw(1e-2))

    def train(tx):
        def step(carry, g):
            p, s = carry
            u, s = tx.update(g, s, p)
            return (optax.apply_updates(p, u), s), None

        (p, s), _ = jax.jit(lambda c, gs: jax.lax.scan(step, c, gs))((params, tx.init(params)),
                                                                      grads)
        return p, s

    want, _ = train(inner)
    got, state = train(gc.skip_spikes(inner))
    assert int(state.skipped_steps) == 0
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("norm_range", [None, (1e4, 1e16)])
def test_norms_outside_the_sketch_range_are_never_all_spikes(norm_range):
    # Norms of about 1e10 read back as the default range's top, 1e8: judged against that,
    # every norm was a spike (60 of 200 steps skipped). Out of range the guard skips no
    # finite step and diagnose says why; a range around the norms restores the guard.
    kwargs = {} if norm_range is None else {"norm_range": norm_range}
    tx = gc.skip_spikes(optax.sgd(0.1), **kwargs)
    params = {"w": jnp.zeros(4)}
    state = tx.init(params)
    update = jax.jit(tx.update)
    rng = np.random.default_rng(5)
    for t in range(60):
        scale = 1e13 if t == 50 else 1e10
        g = {"w": jnp.asarray(rng.normal(size=4) * scale, jnp.float32)}
        _, state = update(g, state, params)
    skipped = int(gc.stats(state)["skipped_norm_spikes"])
    warned = [f.message for f in gc.diagnose(state) if "outside its sketch" in f.message]
    if norm_range is None:
        assert skipped == 0 and len(warned) == 1 and "100% above 1e+08" in warned[0]
    else:
        assert skipped == 1 and not warned  # the x1000 spike at step 50, and only it


def test_losses_outside_the_range_are_not_judged():
    tx = gc.skip_spikes(optax.sgd(0.1), warmup_steps=5)
    params = {"w": jnp.zeros(2)}
    state = tx.init(params)
    for t in range(30):
        loss = jnp.float32(2e9 * (1.5 if t % 2 else 1.0))  # every loss above 1e8
        _, state = tx.update({"w": jnp.ones(2)}, state, params, loss=loss)
    assert int(gc.stats(state)["skipped_loss_spikes"]) == 0
    assert any("of the recent losses, 100% above" in f.message for f in gc.diagnose(state))


def _plateau_chain():
    return optax.chain(gc.clip_by_global_norm(1.0), optax.sgd(0.1),
                       optax.contrib.reduce_on_plateau(patience=2, cooldown=0, accumulation_size=1))


@pytest.mark.parametrize("jitted", [True, False], ids=["jit", "eager"])
def test_optax_value_argument_is_the_guarded_loss(jitted):
    # reduce_on_plateau (like lbfgs and polyak_sgd) reads the loss as `value`; passing it so,
    # the guard judges it too, and a skipped loss spike never reaches the plateau's state.
    tx = gc.skip_spikes(_plateau_chain(), warmup_steps=5)
    update = jax.jit(tx.update) if jitted else tx.update
    params = {"w": jnp.zeros(2)}
    state = tx.init(params)
    losses = lognormal(3, 20) + 1.0
    for loss in losses:
        _, state = update({"w": jnp.ones(2)}, state, params, value=jnp.float32(loss))
    assert int(state.losses.recorded) == len(losses)
    before = state.inner_state
    _, state = update({"w": jnp.ones(2)}, state, params, value=jnp.float32(1e3))
    stats = gc.stats(state)
    assert int(stats["skipped_loss_spikes"]) == 1 and int(stats["skipped_steps"]) == 1
    assert_same_bits(before, state.inner_state)


def test_loss_comes_before_value_when_both_are_given():
    tx = gc.skip_spikes(_plateau_chain(), warmup_steps=5)
    params = {"w": jnp.zeros(2)}
    state = tx.init(params)
    for loss in lognormal(4, 20) + 1.0:
        _, state = tx.update({"w": jnp.ones(2)}, state, params, loss=jnp.float32(loss),
                             value=jnp.float32(1e3 * loss))
    assert int(gc.stats(state)["skipped_steps"]) == 0
    _, state = tx.update({"w": jnp.ones(2)}, state, params, loss=jnp.float32(1e3),
                         value=jnp.float32(1.5))
    assert int(gc.stats(state)["skipped_loss_spikes"]) == 1


@pytest.mark.parametrize("key", ["loss", "value"])
def test_a_loss_that_is_not_a_scalar_gets_a_clear_error(key):
    tx = gc.skip_spikes(optax.sgd(0.1))
    params = {"w": jnp.zeros(2)}
    with pytest.raises(ValueError, match=rf"loss \({key}=\) must be a scalar.*\(3,\)"):
        tx.update({"w": jnp.ones(2)}, tx.init(params), params, **{key: jnp.ones(3)})
