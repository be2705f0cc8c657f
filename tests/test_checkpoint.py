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


def test_flax_serialization_bytes_continue_bit_identically(step_fn):
    # flax.serialization.to_bytes is how a Linen TrainState is often saved; it walks the state
    # through flax's registry, which did not know NormSketch nor ClipName ("can not serialize
    # 'NormSketch' object").
    from flax import serialization

    tx, step = step_fn
    params = {"w": jnp.ones((8, 4)), "b": jnp.zeros((4,))}
    full_p, full_s = run(step, params, tx.init(params), 0, 40)
    mid_p, mid_s = run(step, params, tx.init(params), 0, 20)
    blob = serialization.to_bytes({"params": mid_p, "opt_state": mid_s})
    restored = serialization.from_bytes({"params": params, "opt_state": tx.init(params)}, blob)
    assert jax.tree.structure(restored["opt_state"]) == jax.tree.structure(mid_s)
    res_p, res_s = run(step, restored["params"], restored["opt_state"], 20, 40)
    for a, b in zip(jax.tree.leaves((full_p, full_s)), jax.tree.leaves((res_p, res_s)),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(gc.stats(res_s)["adaptive/count"]) == 40


@pytest.mark.parametrize("make", [
    lambda: gc.skip_spikes(optax.chain(gc.percentile_clip(window=None), optax.adam(1e-2)),
                           name="guard"),
    lambda: gc.percentile_clipped(optax.adamw(1e-2)),
    lambda: optax.inject_hyperparams(gc.percentile_clip)(percentile=90.0),
], ids=["skip_spikes", "percentile_clipped", "injected"])
def test_flax_serialization_of_every_state(make):
    from flax import serialization

    tx = make()
    params = {"w": jnp.ones((8, 4))}
    state = tx.init(params)
    for i in range(6):
        _, state = tx.update(grads_at(i, params), state, params, loss=jnp.float32(i))
    restored = serialization.from_bytes(tx.init(params), serialization.to_bytes(state))
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert gc.stats(restored) == gc.stats(state)


def test_linen_train_state_round_trip():
    from flax import linen as nn
    from flax import serialization
    from flax.training import train_state

    model = nn.Dense(3)
    params = model.init(jax.random.key(0), jnp.ones((1, 4)))["params"]
    tx = optax.chain(gc.percentile_clip(), optax.adam(1e-2))
    state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
    for i in range(5):
        state = state.apply_gradients(grads=grads_at(i, state.params))
    blob = serialization.to_bytes(state)
    fresh = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
    restored = serialization.from_bytes(fresh, blob)
    assert int(restored.step) == 5
    assert gc.stats(restored.opt_state) == gc.stats(state.opt_state)


def test_flax_registration_waits_for_flax():
    # import gradclip_jax needs only jax and optax: flax is never imported by it, and a state
    # made after flax is imported (in whatever order the two were imported) serializes.
    import subprocess
    import sys

    script = (
        "import sys\n"
        "import jax.numpy as jnp, optax, gradclip_jax as gc\n"
        "assert 'flax' not in sys.modules\n"
        "tx = gc.percentile_clip(); tx.init(None)\n"
        "assert 'flax' not in sys.modules\n"
        "from flax import serialization\n"
        "state = gc.skip_spikes(optax.sgd(0.1)).init({'w': jnp.ones(2)})\n"
        "back = serialization.from_bytes(state, serialization.to_bytes(state))\n"
        "print('ok', int(back.count))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env={**__import__("os").environ, "JAX_PLATFORMS": "cpu"}, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ok 0"
