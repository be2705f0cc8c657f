"""Behaviour every transform shares through the clipping core: state shape stability,
abstract init, jit and eager agreement, dtype keeping, non-finite handling."""


import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gradclip_jax as gc
from tests.helpers import CLIPS, all_finite, shapes_and_dtypes


def make_grads(key, scale=1.0, dtype=jnp.float32):
    k1, k2 = jax.random.split(key)
    return {
        "dense": {"w": (scale * jax.random.normal(k1, (8, 4))).astype(dtype)},
        "bias": (scale * jax.random.normal(k2, (4,))).astype(dtype),
    }


@pytest.fixture(params=sorted(CLIPS))
def make_tx(request):
    return CLIPS[request.param]


def test_returns_extra_args_transformation(make_tx):
    assert isinstance(make_tx(), optax.GradientTransformationExtraArgs)


def test_abstract_init_and_stable_state_structure(make_tx):
    tx = make_tx()
    params = make_grads(jax.random.key(0))
    abstract = jax.eval_shape(tx.init, jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params))
    state = tx.init(params)
    assert shapes_and_dtypes(abstract) == shapes_and_dtypes(state)
    assert jax.tree.structure(abstract) == jax.tree.structure(state)
    update = jax.jit(tx.update)
    for i, scale in enumerate([0.01, 100.0, float("nan"), 1.0]):
        _, new_state = update(make_grads(jax.random.key(i), scale), state)
        assert jax.tree.structure(new_state) == jax.tree.structure(state)
        assert shapes_and_dtypes(new_state) == shapes_and_dtypes(state)
        state = new_state


def test_jit_and_eager_agree(make_tx):
    tx = make_tx()
    state_e = state_j = tx.init(None)
    update = jax.jit(tx.update)
    for i, scale in enumerate([0.5, 50.0, 1.0, 80.0]):
        grads = make_grads(jax.random.key(i), scale)
        out_e, state_e = tx.update(grads, state_e)
        out_j, state_j = update(grads, state_j)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), out_e, out_j)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), state_e, state_j)


def test_works_inside_scan(make_tx):
    tx = make_tx()
    grads = jax.vmap(lambda k: make_grads(k, 10.0))(jax.random.split(jax.random.key(1), 7))

    def body(state, g):
        out, state = tx.update(g, state)
        return state, out

    state, outs = jax.jit(lambda s, g: jax.lax.scan(body, s, g))(tx.init(None), grads)
    assert int(state.count) == 7
    assert all_finite(outs)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_keeps_leaf_dtypes(make_tx, dtype):
    tx = make_tx()
    grads = make_grads(jax.random.key(3), 5.0, dtype)
    state = tx.init(grads)
    for _ in range(3):
        out, state = jax.jit(tx.update)(grads, state)
    assert shapes_and_dtypes(out) == shapes_and_dtypes(grads)


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf, -jnp.inf])
def test_nonfinite_zero_mode(make_tx, bad):
    tx = make_tx()
    state = tx.init(None)
    update = jax.jit(tx.update)
    good = make_grads(jax.random.key(0), 2.0)
    for _ in range(3):
        _, state = update(good, state)
    before = state
    grads = jax.tree.map(lambda x: x.at[0].set(bad) if x.ndim == 1 else x, good)
    out, state = update(grads, state)
    for leaf in jax.tree.leaves(out):
        assert bool(jnp.all(leaf == 0))
    assert all_finite(state)
    assert int(state.count) == int(before.count) + 1
    assert int(state.nonfinite_steps) == 1
    assert int(state.histogram.recorded) == int(before.histogram.recorded)
    np.testing.assert_array_equal(state.histogram.cumulative, before.histogram.cumulative)
    assert float(state.grad_norm) == float(before.grad_norm)


@pytest.mark.parametrize("make_tx,expected", [
    (lambda: gc.clip_by_value(0.5), [0.5, -0.5, 0.25]),
    (lambda: gc.clip_by_global_norm(1.0, ord=math.inf), [1.0, -1.0, 0.25e-30]),
    (lambda: gc.clip_by_global_norm(1.0, ord=1), [0.5, -0.5, 0.125e-30]),
])
def test_a_finite_update_whose_squares_overflow_is_clipped(make_tx, expected):
    # 1e30 squared overflows float32's sum of squares, but the update is finite: a clip that
    # measures magnitudes too clips it (as optax.clip does) instead of zeroing the step.
    tx = make_tx()
    g = {"w": jnp.array([1e30, -1e30, 0.25], jnp.float32)}
    out, state = jax.jit(tx.update)(g, tx.init(None))
    np.testing.assert_allclose(out["w"], expected, rtol=1e-6)
    assert int(state.nonfinite_steps) == 0 and int(state.clipped_steps) == 1
    assert int(state.histogram.recorded) == 1
    assert float(state.grad_norm) == float(jnp.finfo(jnp.float32).max)  # recorded, not Inf
    assert all_finite(state)


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf])
def test_the_magnitude_measure_still_catches_a_nonfinite_long_update(bad):
    # The largest magnitude of a long vector may skip a NaN on CPU; an infinite coordinate
    # makes it infinite. Either way the step is non-finite and zeroed.
    for tx in (gc.clip_by_value(0.5), gc.clip_by_global_norm(1.0, ord=math.inf)):
        g = {"w": jnp.full((100_000,), 2.0).at[77_777].set(bad)}
        out, state = jax.jit(tx.update)(g, tx.init(None))
        assert int(state.nonfinite_steps) == 1 and int(state.histogram.recorded) == 0
        assert not np.any(np.asarray(out["w"]))


@pytest.mark.parametrize("ord,nonfinite", [(2.0, 1), (math.inf, 0)])
def test_an_injected_ord_checks_the_norm_it_selects(ord, nonfinite):
    # A traced ord measures all three norms; the overflow check is of the one selected, so
    # ord=2 never records the Inf its sum of squares gives.
    tx = optax.inject_hyperparams(gc.clip_by_global_norm)(max_norm=1.0, ord=ord)
    g = {"w": jnp.array([1e30, 1.0])}
    out, state = jax.jit(tx.update)(g, tx.init(g))
    inner = state.inner_state
    assert int(inner.nonfinite_steps) == nonfinite
    assert all_finite(inner) and all_finite(out)


def test_an_l2_clip_counts_an_overflowing_norm_as_nonfinite():
    # Documented limit: with only the sum of squares measured, 1e30 is not told from Inf.
    tx = gc.clip_by_global_norm(1.0)
    out, state = jax.jit(tx.update)({"w": jnp.array([1e30, 1.0])}, tx.init(None))
    assert int(state.nonfinite_steps) == 1 and not np.any(np.asarray(out["w"]))


def test_nonfinite_propagate_mode_returns_update_untouched(make_tx):
    tx = make_tx(nonfinite="propagate")
    grads = make_grads(jax.random.key(0), 2.0)
    grads["bias"] = grads["bias"].at[1].set(jnp.nan)
    out, state = jax.jit(tx.update)(grads, tx.init(None))
    np.testing.assert_array_equal(out["dense"]["w"], grads["dense"]["w"])
    assert bool(jnp.isnan(out["bias"][1]))
    assert all_finite(state)
    assert int(state.nonfinite_steps) == 1

    # optax.apply_if_finite downstream then skips the step.
    chain = optax.apply_if_finite(optax.chain(tx, optax.sgd(0.1)), max_consecutive_errors=5)
    updates, chain_state = chain.update(grads, chain.init(grads), grads)
    assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(updates))
    assert int(chain_state.notfinite_count) == 1


def test_nan_stream_never_poisons_state(make_tx):
    tx = make_tx()
    state = tx.init(None)
    update = jax.jit(tx.update)
    rng = np.random.default_rng(0)
    for i in range(30):
        scale = [float("nan"), float("inf"), 1.0, 30.0][rng.integers(4)]
        out, state = update(make_grads(jax.random.key(i), scale), state)
        assert all_finite(out)
        assert all_finite(state)
    assert int(state.count) == 30
    assert int(state.nonfinite_steps) + int(state.histogram.recorded) == 30
