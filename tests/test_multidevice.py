"""Same answer on one device and on many: sharded jit, shard_map model and data parallelism.

conftest.py gives the test session 8 simulated CPU devices.
"""

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import gradclip_jax as gc
from tests.helpers import CLIPS

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")

def make_params(key):
    ks = jax.random.split(key, 4)
    return {
        "embed": jax.random.normal(ks[0], (16, 8)),
        "dense": jax.random.normal(ks[1], (8, 8)),
        "bias": jax.random.normal(ks[2], (8,)),
        "scale": jax.random.normal(ks[3], (3,)),
    }


def grads_stream(n):
    return [jax.tree.map(lambda x, s=s: s * x, make_params(jax.random.key(i)))
            for i, s in enumerate(np.linspace(0.05, 3.0, n))]


def single_device_run(tx, stream):
    state = tx.init(stream[0])
    outs = []
    for g in stream:
        out, state = jax.jit(tx.update)(g, state)
        outs.append(out)
    return outs, state


def assert_trees_close(a, b, rtol=1e-5):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=1e-6)


@pytest.mark.parametrize("name", sorted(CLIPS))
def test_fsdp_sharded_jit_matches_single_device(name):
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    specs = {"embed": P("data", "model"), "dense": P(None, "model"), "bias": P("model"),
             "scale": P()}
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
    tx = optax.chain(CLIPS[name](), optax.adam(1e-2))
    stream = grads_stream(6)
    params = make_params(jax.random.key(99))

    def step(params, state, g):
        updates, state = tx.update(g, state, params)
        return optax.apply_updates(params, updates), state

    ref_p, ref_s = params, tx.init(params)
    for g in stream:
        ref_p, ref_s = jax.jit(step)(ref_p, ref_s, g)

    sharded_step = jax.jit(step, out_shardings=(shardings, None))
    p = jax.device_put(params, shardings)
    s = tx.init(p)
    for g in stream:
        p, s = sharded_step(p, s, jax.device_put(g, shardings))
    assert_trees_close(p, ref_p)
    assert_trees_close(s, ref_s)
    for leaf in jax.tree.leaves(s[0]):
        assert leaf.sharding.is_fully_replicated


def model_parallel_specs():
    # embed and dense are split over "model"; bias and scale are replicated on it.
    return {"embed": P("model"), "dense": P(None, "model"), "bias": P(), "scale": P()}


@pytest.mark.parametrize("ord", [1, 2, math.inf])
def test_global_norm_in_shard_map_counts_replicated_leaves_once(ord):
    mesh = jax.make_mesh((8,), ("model",))
    specs = model_parallel_specs()
    g = make_params(jax.random.key(0))
    gs = jax.device_put(g, jax.tree.map(lambda s: NamedSharding(mesh, s), specs))

    @jax.jit
    @partial(jax.shard_map, mesh=mesh, in_specs=(specs,), out_specs=P())
    def sharded_norm(tree):
        return gc.global_norm(tree, ord=ord, axis_name="model")

    @jax.jit
    @partial(jax.shard_map, mesh=mesh, in_specs=(specs,), out_specs=P())
    def naive_norm(tree):
        # What code that psums every leaf computes: replicated leaves counted 8 times.
        local = sum(jnp.sum(x * x) for x in jax.tree.leaves(tree))
        return jnp.sqrt(jax.lax.psum(local, "model"))

    want = float(gc.global_norm(g, ord=ord))
    assert float(sharded_norm(gs)) == pytest.approx(want, rel=1e-5)
    if ord == 2:
        assert float(naive_norm(gs)) > want * (1 + 1e-3)


@pytest.mark.parametrize("name", sorted(CLIPS))
def test_every_clip_in_shard_map_model_parallel(name):
    mesh = jax.make_mesh((8,), ("model",))
    specs = model_parallel_specs()
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
    tx = CLIPS[name](axis_name="model")
    stream = grads_stream(5)
    ref_outs, ref_state = single_device_run(CLIPS[name](), stream)

    @jax.jit
    @partial(jax.shard_map, mesh=mesh, in_specs=(specs, P()), out_specs=(specs, P()))
    def update(g, state):
        return tx.update(g, state)

    state = tx.init(stream[0])
    for g, ref in zip(stream, ref_outs, strict=True):
        out, state = update(jax.device_put(g, shardings), state)
        assert_trees_close(out, ref)
    assert_trees_close(state, ref_state)


@pytest.mark.parametrize("name", sorted(CLIPS))
def test_data_parallel_after_pmean_keeps_states_identical(name):
    mesh = jax.make_mesh((8,), ("data",))
    tx = CLIPS[name]()
    stream = grads_stream(4)
    # Each device computes gradients of its own batch shard; pmean makes them equal.
    per_device = [jax.tree.map(lambda x: jnp.stack([x * (1 + 0.1 * d) for d in range(8)]), g)
                  for g in stream]
    mean_stream = [jax.tree.map(lambda x: jnp.mean(x, axis=0), g) for g in per_device]
    ref_outs, ref_state = single_device_run(tx, mean_stream)

    @jax.jit
    @partial(jax.shard_map, mesh=mesh, in_specs=(P("data"), P()), out_specs=(P(), P("data")))
    def update(g, state):
        g = jax.tree.map(lambda x: jax.lax.pmean(x[0], "data"), g)
        out, new_state = tx.update(g, state)
        # Return every device's copy of the state to check that they agree.
        return out, jax.tree.map(lambda x: x[None], new_state)

    state = tx.init(mean_stream[0])
    split = NamedSharding(mesh, P("data"))
    for g, ref in zip(per_device, ref_outs, strict=True):
        out, stacked = update(jax.device_put(g, split), state)
        assert_trees_close(out, ref)
        for leaf in jax.tree.leaves(stacked):
            assert np.all(np.asarray(leaf) == np.asarray(leaf)[0])
        state = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)[0]), stacked)
    assert_trees_close(state, ref_state)


def test_pmap_data_parallel_after_pmean():
    tx = gc.percentile_clip(warmup_steps=2)
    stream = grads_stream(4)
    ref_outs, ref_state = single_device_run(tx, stream)
    update = jax.pmap(
        lambda g, s: tx.update(jax.lax.pmean(g, "batch"), s), axis_name="batch",
        in_axes=(0, None),
    )
    state = tx.init(stream[0])
    for g, ref in zip(stream, ref_outs, strict=True):
        out, states = update(jax.tree.map(lambda x: jnp.stack([x] * 8), g), state)
        for leaf in jax.tree.leaves(states):
            assert np.all(np.asarray(leaf) == np.asarray(leaf)[0])
        assert_trees_close(jax.tree.map(lambda x: x[0], out), ref)
        state = jax.tree.map(lambda x: x[0], states)
    assert_trees_close(state, ref_state)


def test_skip_spikes_decides_the_same_on_8_devices_as_on_1():
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    specs = {"embed": P("data", "model"), "dense": P(None, "model"), "bias": P("model"),
             "scale": P()}
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
    tx = gc.skip_spikes(optax.chain(gc.percentile_clip(), optax.adam(1e-2)), warmup_steps=5)
    scales = np.exp(np.random.default_rng(0).normal(0, 0.2, 30))
    scales[[12, 20, 21]] = 1e3
    stream = [jax.tree.map(lambda x, s=s: s * x, make_params(jax.random.key(i)))
              for i, s in enumerate(scales)]

    def run(put, step):
        p = put(make_params(jax.random.key(99)))
        s = tx.init(p)
        skipped = []
        for g in stream:
            before = int(s.skipped_steps)
            p, s = step(p, s, put(g))
            skipped.append(int(s.skipped_steps) > before)
        return p, s, skipped

    def step(params, state, g):
        updates, state = tx.update(g, state, params)
        return optax.apply_updates(params, updates), state

    ref_p, ref_s, ref_skipped = run(lambda x: x, jax.jit(step))
    p, s, skipped = run(lambda x: jax.device_put(x, shardings),
                        jax.jit(step, out_shardings=(shardings, None)))
    assert skipped == ref_skipped and sum(skipped) == 3
    assert_trees_close(p, ref_p)
    assert_trees_close(s, ref_s)


def test_skip_spikes_in_shard_map_model_parallel():
    mesh = jax.make_mesh((8,), ("model",))
    specs = model_parallel_specs()
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)

    def make(axis_name=None):
        inner = optax.chain(gc.clip_by_global_norm(2.0, axis_name=axis_name), optax.sgd(0.1))
        return gc.skip_spikes(inner, warmup_steps=3, axis_name=axis_name)

    scales = np.exp(np.random.default_rng(1).normal(0, 0.2, 12))
    scales[[6, 9]] = 1e3
    stream = [jax.tree.map(lambda x, s=s: s * x, make_params(jax.random.key(i)))
              for i, s in enumerate(scales)]
    ref_outs, ref_state = single_device_run(make(), stream)
    tx = make("model")

    @jax.jit
    @partial(jax.shard_map, mesh=mesh, in_specs=(specs, P()), out_specs=(specs, P()))
    def update(g, state):
        return tx.update(g, state)

    state = tx.init(stream[0])
    for g, ref in zip(stream, ref_outs, strict=True):
        out, state = update(jax.device_put(g, shardings), state)
        assert_trees_close(out, ref)
    assert_trees_close(state, ref_state)
    assert int(state.skipped_norm_spikes) == 2


@pytest.mark.parametrize("name", sorted(CLIPS))
def test_explicit_sharding_mixed_small_and_large_leaves(name):
    # Under explicit sharding a split leaf is not joined with the small replicated ones (that
    # would need a reshape of a sharded array); the answer is the single-device one.
    from jax.sharding import AxisType

    mesh = jax.make_mesh((8,), ("d",), axis_types=(AxisType.Explicit,))
    tree = {"split": jnp.linspace(-2.0, 3.0, 64), "bias": jnp.arange(3.0),
            "scale": jnp.full((5,), 0.5), "wide": jnp.linspace(1.0, 2.0, 5000)}
    tx = CLIPS[name]()
    ref, _ = jax.jit(tx.update)(tree, tx.init(tree))
    with jax.set_mesh(mesh):
        sharded = dict(tree, split=jax.device_put(tree["split"], NamedSharding(mesh, P("d"))))
        out, _ = jax.jit(tx.update)(sharded, tx.init(sharded))
        assert out["split"].sharding.spec == P("d")
    assert_trees_close(out, ref)

