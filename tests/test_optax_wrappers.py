"""The transforms inside optax's wrappers: inject_hyperparams, MultiSteps, masked, partition,
apply_if_finite."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gradclip_jax as gc

PARAMS = {"w": jnp.ones((4,)), "b": jnp.ones((2,))}


def grads(scale, dtype=jnp.float32):
    return jax.tree.map(lambda x: jnp.full(x.shape, scale, dtype), PARAMS)


INJECTABLE = {
    "clip_by_global_norm": (gc.clip_by_global_norm, dict(max_norm=1.0)),
    "clip_by_global_norm_schedule": (
        gc.clip_by_global_norm, dict(max_norm=optax.linear_schedule(1.0, 3.0, 4))),
    "clip_by_value": (gc.clip_by_value, dict(max_value=0.5)),
    "percentile_clip": (gc.percentile_clip, dict(
        percentile=80.0, warmup_steps=2, max_norm=optax.linear_schedule(5.0, 2.0, 4),
        decay=0.95, freeze_after=6)),
}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("name", sorted(INJECTABLE))
def test_every_numeric_argument_can_be_injected(name, dtype):
    factory, kwargs = INJECTABLE[name]
    injected = optax.inject_hyperparams(factory)(**kwargs)
    plain = factory(**kwargs)
    numeric = {k for k, v in kwargs.items() if not callable(v)}
    params = jax.tree.map(lambda x: x.astype(dtype), PARAMS)
    s_inj, s_plain = injected.init(params), plain.init(params)
    # Every numeric argument, defaults included (ord, warmup_steps, relative_accuracy...),
    # is injected and traced inside update.
    assert numeric <= set(s_inj.hyperparams)
    update_inj, update_plain = jax.jit(injected.update), jax.jit(plain.update)
    # With bfloat16 params inject_hyperparams casts float hyperparameters to bfloat16 too
    # (decay 0.95 becomes 0.9492), so the runs agree to bfloat16 precision only.
    rtol = 1e-6 if dtype == jnp.float32 else 2e-2
    for scale in [3.0, 0.2, 5.0, 1.0, 8.0, 0.5, 9.0, 2.0]:
        g = grads(scale, dtype)
        out_inj, s_inj = update_inj(g, s_inj, params)
        out_plain, s_plain = update_plain(g, s_plain, params)
        for a, b in zip(jax.tree.leaves(out_inj), jax.tree.leaves(out_plain), strict=True):
            assert a.dtype == dtype
            np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                       rtol=rtol)
    assert int(gc.stats(s_inj)["count"]) == 8


def test_injected_schedule_on_bfloat16_where_optax_crashes():
    schedule = optax.linear_schedule(1.0, 2.0, 10)
    g = grads(3.0, jnp.bfloat16)
    ours = optax.inject_hyperparams(gc.clip_by_global_norm)(max_norm=schedule)
    out, _ = jax.jit(ours.update)(g, ours.init(g))
    assert out["w"].dtype == jnp.bfloat16
    assert float(gc.global_norm(out)) == pytest.approx(1.0, rel=1e-2)


def test_injected_value_changes_the_threshold_at_runtime():
    tx = optax.inject_hyperparams(gc.clip_by_global_norm)(max_norm=1.0)
    state = tx.init(PARAMS)
    state.hyperparams["max_norm"] = jnp.asarray(2.0)
    out, state = tx.update(grads(10.0), state)
    assert float(gc.global_norm(out)) == pytest.approx(2.0)
    assert float(gc.stats(state)["threshold"]) == 2.0


@pytest.mark.parametrize("ord", [1, 2, float("inf")])
def test_injected_ord_selects_the_norm_at_runtime(ord):
    tx = optax.inject_hyperparams(gc.clip_by_global_norm)(max_norm=1.0, ord=ord)
    out, _ = jax.jit(tx.update)(grads(3.0), tx.init(PARAMS))
    assert float(gc.global_norm(out, ord=ord)) == pytest.approx(1.0, rel=1e-6)


def test_traced_relative_accuracy_at_init_gets_a_clear_error():
    tx = gc.percentile_clip()
    with pytest.raises(TypeError, match="relative_accuracy"):
        jax.jit(lambda a: gc.percentile_clip(relative_accuracy=a).init(None))(0.01)
    assert tx.init(None).histogram.relative_accuracy == 0.01


def test_multisteps_clips_the_accumulated_gradient_once_per_real_step():
    k = 3
    tx = optax.MultiSteps(optax.chain(gc.clip_by_global_norm(1.0), optax.sgd(1.0)), k)
    state = tx.init(PARAMS)
    update = jax.jit(tx.update)
    scales = [1.0, 2.0, 6.0, 0.1, 0.2, 0.3]
    for s in scales:
        out, state = update(grads(s), state, PARAMS)
    st = gc.stats(state)
    assert int(st["count"]) == 2  # one observation per emitted optimizer step
    mean_second = np.mean(scales[3:]) * np.sqrt(6)  # norm of the averaged gradient
    assert float(st["grad_norm"]) == pytest.approx(mean_second, rel=1e-5)
    assert int(st["clipped_steps"]) == 1  # the first accumulated gradient (norm 7.3) only


def test_masked_and_partition_clip_only_their_subset():
    mask = {"w": True, "b": False}
    tx = optax.masked(gc.clip_by_global_norm(1.0), mask)
    out, state = tx.update(grads(3.0), tx.init(PARAMS))
    assert float(gc.global_norm(out["w"])) == pytest.approx(1.0)
    np.testing.assert_array_equal(out["b"], grads(3.0)["b"])
    # The norm covers only the masked-in subset.
    assert float(gc.stats(state)["grad_norm"]) == pytest.approx(3.0 * 2.0)

    part = optax.partition(
        {"clip": gc.clip_by_global_norm(1.0), "free": optax.identity()},
        {"w": "clip", "b": "free"},
    )
    out, state = part.update(grads(3.0), part.init(PARAMS))
    assert float(gc.global_norm(out["w"])) == pytest.approx(1.0)
    assert float(gc.stats(state)["grad_norm"]) == pytest.approx(6.0)


def test_apply_if_finite_skips_nonfinite_steps_with_propagate():
    tx = optax.apply_if_finite(
        optax.chain(gc.clip_by_global_norm(1.0, nonfinite="propagate"), optax.sgd(1.0)), 3)
    state = tx.init(PARAMS)
    bad = grads(1.0)
    bad["w"] = bad["w"].at[0].set(jnp.nan)
    out, state = tx.update(bad, state, PARAMS)
    assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(out))
    assert int(state.notfinite_count) == 1
    out, state = tx.update(grads(1.0), state, PARAMS)
    assert int(state.notfinite_count) == 0
    # apply_if_finite discards the inner state of a skipped step, so the clip saw one step.
    assert int(gc.stats(state)["count"]) == 1


def test_optax_monitor_and_snapshot_sit_beside_a_clip():
    # The optax way of logging the norm before clipping: optax.monitor / optax.snapshot in the
    # chain, read back with optax.tree.get. Our global_norm is a measure they take, and the
    # clip's own stats are still found beside their states.
    tx = optax.chain(
        optax.monitor({
            "norm_before_clip": gc.global_norm,
            "is_clipped_ema": optax.measure_with_ema(lambda u: gc.global_norm(u) > 1.0,
                                                     decay=0.9),
        }),
        optax.snapshot("snapshot_norm", gc.global_norm),
        gc.clip_by_global_norm(1.0),
        optax.sgd(0.1),
    )
    params = {"w": jnp.zeros((3,)), "b": jnp.zeros((2,))}
    state = tx.init(params)
    update = jax.jit(tx.update)
    for scale in (0.1, 2.0, 3.0):
        _, state = update(jax.tree.map(lambda p, s=scale: jnp.full_like(p, s), params), state,
                          params)
    norm = float(gc.stats(state)["grad_norm"])
    assert norm == pytest.approx(3.0 * math.sqrt(5))
    assert float(optax.tree.get(state, "norm_before_clip")) == norm
    assert float(optax.tree.get(state, "snapshot_norm")) == norm
    assert int(gc.stats(state)["clipped_steps"]) == 2
    assert 0.0 < float(optax.tree.get(state, "is_clipped_ema")) < 1.0


@pytest.mark.parametrize("jitted", [True, False], ids=["jit", "eager"])
def test_a_guard_around_lbfgs_passes_on_only_the_callers_arguments(jitted):
    # optax.lbfgs's line search refuses extra arguments its value_fn does not take; the guard
    # used to hand its measured norm to the clip inside as one ("not consumed by value_fn").
    def loss_fn(p):
        return 3.0 * jnp.sum((p["w"] - 2.0) ** 2) + jnp.sum(p["b"] ** 4)

    def chain():
        return optax.chain(gc.clip_by_global_norm(5.0), optax.lbfgs())

    guarded, plain = gc.skip_spikes(chain()), chain()
    runs = {}
    for name, tx in (("guarded", guarded), ("plain", plain)):
        update = jax.jit(tx.update, static_argnames="value_fn") if jitted else tx.update
        params, state = PARAMS, tx.init(PARAMS)
        for _ in range(6):
            value, g = jax.value_and_grad(loss_fn)(params)
            updates, state = update(g, state, params, value=value, grad=g, value_fn=loss_fn)
            params = optax.apply_updates(params, updates)
        runs[name] = (params, state)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
                 runs["guarded"][0], runs["plain"][0])
    assert float(loss_fn(runs["guarded"][0])) < 0.01 * float(loss_fn(PARAMS))
    stats = gc.stats(runs["guarded"][1])
    assert int(stats["skipped_steps"]) == 0 and int(stats["clipped_steps"]) >= 1
    # L-BFGS's `value` is the loss the guard judges: no `loss=` that L-BFGS would refuse.
    assert int(runs["guarded"][1].losses.recorded) == 6
