"""clip_by_global_norm and clip_by_value: properties, thresholds as arrays and schedules,
chaining with optax, construction-time validation."""

import math

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st

import gradclip_jax as gc

grads_strategy = st.lists(
    hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=2, max_side=5),
               elements=st.floats(-1e3, 1e3, width=32)),
    min_size=1, max_size=3,
)
thresholds = st.floats(1e-3, 1e3)


def as_tree(leaves):
    return {f"p{i}": jnp.asarray(x) for i, x in enumerate(leaves)}


def flat64(tree):
    return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


@pytest.mark.parametrize("ord", [1, 2, math.inf])
@given(leaves=grads_strategy, max_norm=thresholds)
def test_norm_clip_properties(leaves, max_norm, ord):
    grads = as_tree(leaves)
    tx = gc.clip_by_global_norm(max_norm, ord=ord)
    update = jax.jit(tx.update)
    out, state = update(grads, tx.init(grads))
    g, o = flat64(grads), flat64(out)
    norm = np.linalg.norm(g, ord)
    c = float(np.float32(max_norm))  # the threshold as the transform sees it
    # Bound: the result's norm is at most max_norm (to float32 rounding).
    assert np.linalg.norm(o, ord) <= c * (1 + 1e-5)
    if int(state.clipped_steps) == 0:
        # Not clipped: the norm was within the threshold and the update comes back bit for bit.
        assert norm <= c * (1 + 1e-5)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(out), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    else:
        # Clipped: the norm was above the threshold, and the direction is preserved (the
        # output is a positive multiple of the input) with norm exactly max_norm.
        assert norm >= c * (1 - 1e-5)
        np.testing.assert_allclose(o, g * (c / norm), rtol=1e-5, atol=1e-6 * c)
        assert np.linalg.norm(o, ord) == pytest.approx(c, rel=1e-5)
    # Idempotent: clipping the clipped update changes nothing.
    again, _ = update(out, tx.init(grads))
    np.testing.assert_allclose(flat64(again), o, rtol=1e-6, atol=1e-12)
    # The recorded norm is always the unclipped L2 norm.
    assert float(state.grad_norm) == pytest.approx(np.linalg.norm(g), rel=1e-5, abs=1e-6)


@given(leaves=grads_strategy, max_value=thresholds)
def test_value_clip_properties(leaves, max_value):
    grads = as_tree(leaves)
    tx = gc.clip_by_value(max_value)
    out, state = jax.jit(tx.update)(grads, tx.init(grads))
    g, o = flat64(grads), flat64(out)
    c = np.float64(np.float32(max_value))
    np.testing.assert_array_equal(o, np.clip(g, -c, c))
    assert int(state.clipped_steps) == int(np.any(np.abs(g) > c))
    assert float(state.grad_norm) == pytest.approx(np.linalg.norm(g), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_clip_is_accurate(dtype):
    grads = {"w": jnp.linspace(-50.0, 80.0, 301).astype(dtype)}
    tx = gc.clip_by_global_norm(2.0)
    out, _ = tx.update(grads, tx.init(grads))
    assert out["w"].dtype == dtype
    eps = float(jnp.finfo(dtype).eps)
    assert float(gc.global_norm(out)) == pytest.approx(2.0, rel=2 * eps)


def test_threshold_as_scalar_array_and_schedule():
    grads = {"w": jnp.array([3.0, 4.0])}
    array_tx = gc.clip_by_global_norm(jnp.asarray(2.5))
    out, _ = array_tx.update(grads, array_tx.init(grads))
    assert float(gc.global_norm(out)) == pytest.approx(2.5)

    schedule = optax.linear_schedule(1.0, 4.0, transition_steps=3)
    tx = gc.clip_by_global_norm(schedule)
    state = tx.init(grads)
    norms = []
    for _ in range(5):
        out, state = jax.jit(tx.update)(grads, state)
        norms.append(float(gc.global_norm(out)))
    assert norms == pytest.approx([1.0, 2.0, 3.0, 4.0, 4.0])
    assert float(gc.stats(state)["threshold"]) == pytest.approx(4.0)

    vtx = gc.clip_by_value(optax.constant_schedule(0.5))
    vout, _ = vtx.update(grads, vtx.init(grads))
    np.testing.assert_array_equal(vout["w"], [0.5, 0.5])


def test_chain_with_adam_under_jit_matches_manual_clip():
    params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    tx = optax.chain(gc.clip_by_global_norm(0.5), optax.adam(1e-2))
    ref = optax.adam(1e-2)
    state, ref_state = tx.init(params), ref.init(params)

    @jax.jit
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    p, rp = params, params
    for i in range(5):
        grads = jax.tree.map(lambda x, i=i: jnp.full_like(x, float(i + 1)), params)
        p, state = step(p, state, grads)
        scale = min(1.0, 0.5 / float(gc.global_norm(grads)))
        ru, ref_state = ref.update(jax.tree.map(lambda g, s=scale: g * s, grads), ref_state, rp)
        rp = optax.apply_updates(rp, ru)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), p, rp)
    assert int(gc.stats(state)["clipped_steps"]) == 5


@pytest.mark.parametrize("factory,name", [
    (lambda v: gc.clip_by_global_norm(v), "max_norm"),
    (lambda v: gc.clip_by_value(v), "max_value"),
])
@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), jnp.asarray(-2.0)])
def test_bad_threshold_is_a_value_error_naming_it(factory, name, bad):
    with pytest.raises(ValueError, match=f"{name} must be in .*got"):
        factory(bad)


@pytest.mark.parametrize("bad", ["1.0", None, True, [1.0], jnp.ones(2)])
def test_bad_threshold_type_is_a_type_error(bad):
    with pytest.raises(TypeError, match="max_norm"):
        gc.clip_by_global_norm(bad)


def test_bad_options():
    with pytest.raises(ValueError, match="ord must be 1, 2 or math.inf, got 3"):
        gc.clip_by_global_norm(1.0, ord=3)
    with pytest.raises(ValueError, match="nonfinite must be one of .* got 'skip'"):
        gc.clip_by_global_norm(1.0, nonfinite="skip")
    with pytest.raises(ValueError, match="nonfinite"):
        gc.clip_by_value(1.0, nonfinite="ignore")
    with pytest.raises(TypeError, match="axis_name"):
        gc.clip_by_global_norm(1.0, axis_name=3)
