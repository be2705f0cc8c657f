"""Under JAX's strict configuration options, as some codebases run.

``jax_numpy_rank_promotion="raise"`` (no implicit broadcasting to a higher rank),
``jax_numpy_dtype_promotion="strict"`` (no implicit dtype promotion) and ``jax_debug_nans``
(raise on the first NaN any operation produces): every transform, guard and diagnostic must run
under each, in float32, bfloat16 and a tree mixing them, as optax's clips do.
"""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gradclip_jax as gc
from tests.helpers import CLIPS

CONFIGS = {
    "rank promotion raise": lambda: jax.numpy_rank_promotion("raise"),
    "strict dtype promotion": lambda: jax.numpy_dtype_promotion("strict"),
    "debug nans": lambda: jax.debug_nans(True),
}

TRANSFORMS = {
    **CLIPS,
    "percentile p90, decay, schedule": lambda: gc.percentile_clip(
        90.0, window=None, decay=0.99, max_norm=optax.linear_schedule(1.0, 2.0, 10)),
    "percentile start": lambda: gc.percentile_clip(start=0.25),
    # sgd: optax's adam itself fails under strict dtype promotion (its bias correction).
    "skip_spikes": lambda: gc.skip_spikes(optax.chain(gc.percentile_clip(), optax.sgd(0.1))),
    "percentile_clipped": lambda: gc.percentile_clipped(optax.sgd(0.1, momentum=0.9)),
    "injected": lambda: optax.inject_hyperparams(gc.percentile_clip)(percentile=90.0),
}

TREES = {
    "float32": {"w": jnp.ones((4, 3)), "b": jnp.zeros(3)},
    "bfloat16": {"w": jnp.ones((4, 3), jnp.bfloat16), "b": jnp.zeros(3, jnp.bfloat16)},
    "mixed": {"w": jnp.ones((4, 3), jnp.bfloat16), "b": jnp.zeros(3)},
}


def scaled(tree, scale):
    return jax.tree.map(lambda x: jnp.full_like(x, scale), tree)


@pytest.mark.parametrize("tree", sorted(TREES))
@pytest.mark.parametrize("transform", sorted(TRANSFORMS))
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_runs_under_strict_config(config, transform, tree):
    if (config, transform, tree) == ("strict dtype promotion", "injected", "mixed"):
        pytest.skip("optax.inject_hyperparams' own init promotes bfloat16 with float32")
    params = TREES[tree]
    tx = TRANSFORMS[transform]()
    with contextlib.ExitStack() as stack:
        stack.enter_context(CONFIGS[config]())
        state = tx.init(params)
        update = jax.jit(tx.update)
        # Norms 1-4 times the base, a zero step (no norm, a zero division avoided) and a
        # spike; eagerly once too (one compiled call).
        for i in range(24):
            scale = 0.0 if i == 3 else 40.0 if i == 17 else 1.0 + i % 4
            _, state = update(scaled(params, scale), state, params, loss=jnp.float32(i % 3))
        updates, state = tx.update(scaled(params, 2.0), state, params, loss=jnp.float32(1.0))
        stats = gc.host_stats(state)
        gc.diagnose(state)
        gc.global_norm(updates)
    assert all(np.isfinite(v) or k.endswith("threshold") for k, v in stats.items())
    assert all(np.all(np.isfinite(np.asarray(u, np.float32))) for u in jax.tree.leaves(updates))
    with contextlib.ExitStack() as stack:
        stack.enter_context(CONFIGS[config]())
        if "percentile" in transform or transform == "injected":
            assert np.isfinite(gc.norm_percentile(state, 90.0))


@pytest.mark.parametrize("transform", ["norm", "value", "percentile", "skip_spikes"])
def test_float64_tree_under_strict_promotion(transform):
    # With x64, a float64 leaf makes the measure float64; it was compared with the float32
    # threshold, a promotion strict mode refuses.
    with jax.enable_x64(True), jax.numpy_dtype_promotion("strict"):
        params = {"a": jnp.full((3,), 2.0, jnp.float64), "b": jnp.ones((2,), jnp.float32)}
        tx = TRANSFORMS[transform]()
        state = tx.init(params)
        for scale in (1.0, 3.0, 0.5):
            updates, state = jax.jit(tx.update)(scaled(params, scale), state, params)
        assert [u.dtype for u in jax.tree.leaves(updates)] == [jnp.float64, jnp.float32]
        stats = gc.host_stats(state)
    norm = next(v for k, v in stats.items() if k.endswith("grad_norm"))
    np.testing.assert_allclose(norm, 0.5 * np.sqrt(5.0), rtol=1e-6)
