"""Flax train loops: NNX ``nnx.Optimizer`` and Linen ``TrainState``, with ``stats`` read back."""

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import linen, nnx
from flax.training import train_state

import gradclip_jax as gc


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(4, 16, rngs=rngs)
        self.out = nnx.Linear(16, 1, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.hidden(x)))


def batch(i):
    x = jax.random.normal(jax.random.key(i), (32, 4))
    return x, 100.0 * jnp.sum(x, axis=1, keepdims=True)  # large targets: large gradients


def test_nnx_optimizer_with_percentile_clip():
    model = MLP(nnx.Rngs(0))
    tx = optax.chain(gc.percentile_clip(warmup_steps=3), optax.adamw(1e-2))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, x, y):
        def loss_fn(model):
            return jnp.mean((model(x) - y) ** 2)

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    x, y = batch(0)
    losses = [float(train_step(model, optimizer, x, y)) for _ in range(30)]
    s = gc.stats(optimizer.opt_state)
    assert all(isinstance(v, jax.Array) and not isinstance(v, nnx.Variable) for v in s.values())
    assert int(s["count"]) == 30
    assert int(s["clipped_steps"]) >= 1
    assert float(s["grad_norm"]) > 0
    assert losses[-1] < losses[0]
    assert float(gc.norm_percentile(optimizer.opt_state, 90)) > 0
    assert gc.diagnose(optimizer.opt_state)


class LinenMLP(linen.Module):
    @linen.compact
    def __call__(self, x):
        return linen.Dense(1)(linen.relu(linen.Dense(16)(x)))


@pytest.mark.parametrize("clip", [gc.clip_by_global_norm(1.0), gc.clip_by_value(0.5)])
def test_linen_train_state(clip):
    model = LinenMLP()
    x, y = batch(0)
    state = train_state.TrainState.create(
        apply_fn=model.apply,
        params=model.init(jax.random.key(0), x),
        tx=optax.chain(clip, optax.adam(1e-2)),
    )

    @jax.jit
    def train_step(state, x, y):
        def loss_fn(params):
            return jnp.mean((state.apply_fn(params, x) - y) ** 2)

        grads = jax.grad(loss_fn)(state.params)
        return state.apply_gradients(grads=grads)

    for i in range(5):
        state = train_step(state, *batch(i))
    s = gc.stats(state.opt_state)
    assert int(s["count"]) == 5
    assert int(s["clipped_steps"]) == 5  # targets of ~100 give gradients far above 1
    assert float(s["threshold"]) in (1.0, 0.5)


def test_nnx_optimizer_with_skip_spikes_and_the_loss():
    model = MLP(nnx.Rngs(0))
    tx = gc.skip_spikes(optax.chain(gc.percentile_clip(), optax.adamw(1e-3)), warmup_steps=5)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, x, y, scale):
        def loss_fn(model):
            return scale * jnp.mean((model(x) - y) ** 2)

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads, loss=loss)
        return loss

    for i in range(12):
        train_step(model, optimizer, *batch(i), jnp.float32(1.0))
    before = jax.tree.map(jnp.copy, nnx.state(model, nnx.Param))
    train_step(model, optimizer, *batch(12), jnp.float32(1e6))  # loss and gradients spike
    after = nnx.state(model, nnx.Param)
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
        assert jnp.array_equal(a, b)
    s = gc.host_stats(optimizer.opt_state)
    assert s["skipped_steps"] == 1 and s["skipped_norm_spikes"] == 1
    assert s["skipped_loss_spikes"] == 1 and s["count"] == 12  # the clip did not see it
