"""global_norm: agreement with a float64 reference, low-precision safety, odd trees."""

import functools
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

ORDS = [1, 2, math.inf]

leaf_arrays = hnp.arrays(
    np.float32,
    hnp.array_shapes(min_dims=0, max_dims=3, max_side=6),
    elements=st.floats(-1e4, 1e4, width=32),
)


def reference_norm(leaves, ord):
    flat = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in leaves] or [np.zeros(0)])
    if flat.size == 0:
        return 0.0
    return float(np.linalg.norm(flat, ord))


@pytest.mark.parametrize("ord", ORDS)
@given(leaves=st.lists(leaf_arrays, min_size=0, max_size=4))
def test_matches_float64_reference(leaves, ord):
    tree = {f"p{i}": jnp.asarray(x) for i, x in enumerate(leaves)}
    got = float(jax.jit(lambda t: gc.global_norm(t, ord=ord))(tree))
    want = reference_norm(leaves, ord)
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_float16_regression_does_not_overflow():
    grads = {"w": jnp.full((1000,), 300.0, jnp.float16)}
    # The failure this library exists to avoid: optax squares in float16, gets inf, and its
    # clip then returns all zeros.
    assert not np.isfinite(float(optax.tree.norm(grads)))
    clipped, _ = optax.clip_by_global_norm(1.0).update(grads, optax.EmptyState())
    assert float(jnp.max(jnp.abs(clipped["w"]))) == 0.0

    norm = gc.global_norm(grads)
    assert norm.dtype == jnp.float32
    assert float(norm) == pytest.approx(300.0 * math.sqrt(1000), rel=1e-6)

    tx = gc.clip_by_global_norm(1.0)
    out, _ = tx.update(grads, tx.init(grads))
    assert out["w"].dtype == jnp.float16
    assert float(gc.global_norm(out)) == pytest.approx(1.0, rel=2e-3)
    assert float(out["w"][0]) == pytest.approx(1.0 / math.sqrt(1000), rel=2e-3)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_low_precision_large_values(dtype):
    value = 60000.0 if dtype == jnp.float16 else 1e15
    grads = [jnp.full((4096,), value, dtype), jnp.full((3,), -value, dtype)]
    expected = float(jnp.asarray(value, dtype)) * math.sqrt(4099)
    assert float(gc.global_norm(grads)) == pytest.approx(expected, rel=1e-5)
    assert float(gc.global_norm(grads, ord=1)) == pytest.approx(expected / math.sqrt(4099) * 4099,
                                                                rel=1e-5)
    assert float(gc.global_norm(grads, ord=math.inf)) == pytest.approx(expected / math.sqrt(4099))


def test_bfloat16_norm_above_float32_sqrt_max_does_not_overflow():
    # 1e20 squared overflows float32, but the norm (3.2e21) fits: it must come out finite.
    grads = {"big": jnp.full((1000,), 1e20, jnp.bfloat16), "small": jnp.ones((3,), jnp.float32)}
    expected = float(jnp.asarray(1e20, jnp.bfloat16)) * math.sqrt(1000)
    assert float(gc.global_norm(grads)) == pytest.approx(expected, rel=1e-5)
    tx = gc.clip_by_global_norm(1.0)
    out, state = jax.jit(tx.update)(grads, tx.init(grads))
    assert int(state.nonfinite_steps) == 0
    assert float(gc.global_norm(out)) == pytest.approx(1.0, rel=1e-2)
    assert float(state.grad_norm) == pytest.approx(expected, rel=1e-5)
    # A real Inf or NaN is still non-finite.
    for bad in (jnp.inf, jnp.nan):
        grads["big"] = grads["big"].at[0].set(bad)
        assert not np.isfinite(float(gc.global_norm(grads)))


def test_float64_leaves_accumulate_in_float64():
    with jax.enable_x64(True):
        tree = {"a": jnp.full((10,), 1e100, jnp.float64)}
        norm = gc.global_norm(tree)
        assert norm.dtype == jnp.float64
        assert float(norm) == pytest.approx(1e100 * math.sqrt(10))


@pytest.mark.parametrize("ord", ORDS)
def test_empty_none_and_masked_leaves(ord):
    assert float(gc.global_norm({}, ord=ord)) == 0.0
    assert float(gc.global_norm([], ord=ord)) == 0.0
    tree = {"a": None, "b": optax.MaskedNode(), "c": jnp.array([3.0, -4.0])}
    assert float(gc.global_norm(tree, ord=ord)) == pytest.approx(reference_norm([[3.0, -4.0]], ord))


def test_nonfinite_leaves_give_nonfinite_norm():
    assert np.isnan(float(gc.global_norm({"a": jnp.array([1.0, jnp.nan])})))
    assert np.isinf(float(gc.global_norm({"a": jnp.array([1.0, jnp.inf])})))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16, jnp.complex64])
@pytest.mark.parametrize("n", [5, 3000, 83_333])
def test_a_nan_in_a_long_leaf_makes_every_norm_nonfinite(n, dtype):
    # XLA's CPU max skips NaNs in long arrays: the infinity norm must not come out finite.
    tree = {"a": jnp.ones((n,), dtype).at[n // 2].set(jnp.nan), "b": jnp.ones((7,), dtype)}
    for ord in ORDS:
        assert not np.isfinite(float(jax.jit(functools.partial(gc.global_norm, ord=ord))(tree)))
        # ord arriving traced (as under optax.inject_hyperparams) selects at run time.
        traced = jax.jit(lambda t, o: gc.global_norm(t, ord=o))(tree, jnp.float32(ord))
        assert not np.isfinite(float(traced)), ord
    assert float(gc.global_norm({"a": jnp.ones((n,), dtype)}, ord=math.inf)) == 1.0


@pytest.mark.parametrize("bad", [0, 3, -1, 0.5])
def test_bad_ord_is_a_value_error(bad):
    with pytest.raises(ValueError, match="ord"):
        gc.global_norm({"a": jnp.ones(2)}, ord=bad)


def test_bad_ord_type_is_a_type_error():
    with pytest.raises(TypeError, match="ord"):
        gc.global_norm({"a": jnp.ones(2)}, ord="fro")


@pytest.mark.parametrize("shape", [(2_000_003,), (1_000_000,), (1024, 2048)])
def test_value_clip_and_bfloat16_norms_are_accurate_on_large_leaves(shape):
    # The value clip (and bfloat16 leaves) take two measures in one reduction; XLA's CPU
    # backend runs those sequentially, so a naive version loses percent-level accuracy here.
    x = jnp.full(shape, 1.1, jnp.float32)
    exact = math.sqrt(x.size) * float(np.float32(1.1))
    tx = gc.clip_by_value(10.0)
    _, state = jax.jit(tx.update)({"w": x}, tx.init(None))
    assert float(state.grad_norm) == pytest.approx(exact, rel=1e-5)
    bf = jnp.full(shape, 1.1, jnp.bfloat16)
    exact_bf = math.sqrt(bf.size) * float(bf.ravel()[0])
    assert float(gc.global_norm({"w": bf})) == pytest.approx(exact_bf, rel=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("ord", [1, 2, math.inf])
def test_zero_size_leaves_count_as_nothing(dtype, ord):
    tree = {"empty": jnp.zeros((0,), dtype), "empty2d": jnp.zeros((3, 0), dtype),
            "w": jnp.array([3.0, -4.0], dtype)}
    expected = {1: 7.0, 2: 5.0, math.inf: 4.0}[ord]
    assert float(gc.global_norm(tree, ord=ord)) == pytest.approx(expected, rel=1e-2)
    for tx in (gc.clip_by_global_norm(1.0, ord=ord), gc.clip_by_value(1.0), gc.percentile_clip()):
        out, state = jax.jit(tx.update)(tree, tx.init(tree))
        assert out["empty"].shape == (0,) and out["empty2d"].shape == (3, 0)
        assert float(state.grad_norm) == pytest.approx(5.0, rel=1e-2)


@pytest.mark.parametrize("ord", ORDS)
def test_small_leaves_of_mixed_dtypes_pooled_with_large_ones(ord):
    # Small leaves are joined per dtype before they are reduced (one kernel, not one each);
    # large ones, complex ones and float64 ones mixed in still give the float64 reference.
    rng = np.random.default_rng(0)
    dtypes = [np.float32, jnp.bfloat16, np.float16, np.float64]
    leaves = [rng.normal(size=size).astype(dtypes[i % 4])
              for i, size in enumerate([1, 3, 4096, 4097, 7, 50_000, 2, 33])]
    leaves.append((rng.normal(size=5) + 1j * rng.normal(size=5)).astype(np.complex64))
    got = float(jax.jit(lambda t: gc.global_norm(t, ord=ord))([jnp.asarray(x) for x in leaves]))
    want = reference_norm([np.abs(np.asarray(x, np.complex128)) for x in leaves], ord)
    assert got == pytest.approx(want, rel=1e-5)
