"""Orbax: a run saved mid-way and restored against an abstract target continues bit for bit."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import gradclip_jax as gc


def make_tx():
    return optax.chain(
        gc.clip_by_value(5.0, name="value"),
        gc.percentile_clip(warmup_steps=3, decay=0.99, name="adaptive"),
        optax.adam(1e-2),
    )


def grads_at(step, params):
    key = jax.random.key(step)
    scale = jnp.where(step % 7 == 3, 50.0, 1.0)
    return jax.tree.map(lambda x: scale * jax.random.normal(key, x.shape), params)


@pytest.fixture(scope="module")
def step_fn():
    tx = make_tx()

    @jax.jit
    def step(params, opt_state, i):
        updates, opt_state = tx.update(grads_at(i, params), opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return tx, step


def run(step, params, opt_state, start, stop):
    for i in range(start, stop):
        params, opt_state = step(params, opt_state, i)
    return params, opt_state


def test_restore_continues_bit_identically(tmp_path, step_fn):
    tx, step = step_fn
    params = {"w": jnp.ones((8, 4)), "b": jnp.zeros((4,))}
    full_p, full_s = run(step, params, tx.init(params), 0, 40)

    mid_p, mid_s = run(step, params, tx.init(params), 0, 20)
    path = tmp_path / "ckpt"
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, {"params": mid_p, "opt_state": mid_s})
    abstract = jax.eval_shape(lambda: {"params": params, "opt_state": tx.init(params)})
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(path, abstract)
    assert jax.tree.structure(restored) == jax.tree.structure(abstract)
    res_p, res_s = run(step, restored["params"], restored["opt_state"], 20, 40)

    for a, b in zip(jax.tree.leaves((full_p, full_s)), jax.tree.leaves((res_p, res_s)),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # The percentile clip's histogram and counters came through the checkpoint.
    assert int(gc.stats(res_s)["adaptive/count"]) == 40
    assert int(res_s[1].histogram.recorded) == 40


def test_skip_spikes_state_restores_and_continues_bit_identically(tmp_path):
    tx = gc.skip_spikes(optax.chain(gc.percentile_clip(), optax.adam(1e-2)), warmup_steps=3)

    @jax.jit
    def step(params, opt_state, i):
        updates, opt_state = tx.update(grads_at(i, params), opt_state, params,
                                       loss=jnp.float32(1.0) + i % 5)
        return optax.apply_updates(params, updates), opt_state

    params = {"w": jnp.ones((8, 4)), "b": jnp.zeros((4,))}
    full_p, full_s = run(step, params, tx.init(params), 0, 30)
    mid_p, mid_s = run(step, params, tx.init(params), 0, 15)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "skip", {"params": mid_p, "opt_state": mid_s})
    abstract = jax.eval_shape(lambda: {"params": params, "opt_state": tx.init(params)})
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(tmp_path / "skip", abstract)
    res_p, res_s = run(step, restored["params"], restored["opt_state"], 15, 30)
    for a, b in zip(jax.tree.leaves((full_p, full_s)), jax.tree.leaves((res_p, res_s)),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(gc.stats(res_s)["skipped_norm_spikes"]) > 0  # the x50 steps were skipped
