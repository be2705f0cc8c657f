"""Differentiating through the clips (meta-learning, hypergradients, learned optimizers).

optax's clips are differentiable under jit; ours must be too, with the derivative optax gives
wherever optax's is finite, and a finite one where it is not (a zero gradient).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gradclip_jax as gc

GRADS = {"a": jnp.array([3.0, -4.0, 0.5]), "b": jnp.array([[1.0, -2.0], [0.25, 6.0]])}


def outcome_loss(tx, state):
    """A scalar of the clipped update, as a meta-objective would be."""

    def loss(grads):
        updates, _ = tx.update(grads, state, grads)
        return sum(jnp.sum(jnp.sin(3.0 * u.astype(jnp.float32))) for u in jax.tree.leaves(updates))

    return loss


def warmed(tx, grads, steps=3):
    """The state after a few steps on smaller gradients, so that an adaptive rule has a
    threshold below ``grads``' norm."""
    state = tx.init(grads)
    for _ in range(steps):
        _, state = tx.update(jax.tree.map(lambda g: 0.1 * g, grads), state, grads)
    return state


TRANSFORMS = {
    "norm clipped": lambda: gc.clip_by_global_norm(1.0),
    "norm unclipped": lambda: gc.clip_by_global_norm(100.0),
    "norm ord 1": lambda: gc.clip_by_global_norm(1.0, ord=1),
    "norm ord inf": lambda: gc.clip_by_global_norm(1.0, ord=math.inf),
    "value": lambda: gc.clip_by_value(1.5),
    "percentile": lambda: gc.percentile_clip(),
    "percentile start": lambda: gc.percentile_clip(start=0.25),
    "injected": lambda: optax.inject_hyperparams(gc.clip_by_global_norm)(max_norm=1.0),
    "skip guard": lambda: gc.skip_spikes(optax.chain(gc.clip_by_global_norm(1.0),
                                                     optax.sgd(0.1))),
    "percentile_clipped": lambda: gc.percentile_clipped(optax.sgd(0.1)),
}


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_jitted_gradient_equals_eager(name):
    # The core's computed_once took a jnp array as the reduce-window's initial value: under
    # jit that is a tracer, JAX lowered a generic reduce-window, and reverse mode failed
    # ("Linearization failed") where eager differentiation worked.
    tx = TRANSFORMS[name]()
    loss = outcome_loss(tx, warmed(tx, GRADS))
    eager = jax.grad(loss)(GRADS)
    jitted = jax.jit(jax.grad(loss))(GRADS)
    forward = jax.jit(jax.jacfwd(loss))(GRADS)
    for e, j, f in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted),
                       jax.tree.leaves(forward), strict=True):
        assert np.all(np.isfinite(j))
        np.testing.assert_allclose(j, e, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(f, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("max_norm", [1.0, 100.0])
def test_norm_clip_gradient_equals_optax(max_norm):
    ours, theirs = gc.clip_by_global_norm(max_norm), optax.clip_by_global_norm(max_norm)
    mine = jax.jit(jax.grad(outcome_loss(ours, ours.init(GRADS))))(GRADS)
    ref = jax.jit(jax.grad(outcome_loss(theirs, theirs.init(GRADS))))(GRADS)
    for a, b in zip(jax.tree.leaves(mine), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # Clipped, the step is c * g / |g|, whose derivative is not the identity.
    if max_norm == 1.0:
        assert not np.allclose(mine["a"], 3.0 * np.cos(3.0 * GRADS["a"]))


def test_value_clip_gradient_equals_optax():
    ours, theirs = gc.clip_by_value(1.5), optax.clip(1.5)
    mine = jax.jit(jax.grad(outcome_loss(ours, ours.init(GRADS))))(GRADS)
    ref = jax.jit(jax.grad(outcome_loss(theirs, theirs.init(GRADS))))(GRADS)
    for a, b in zip(jax.tree.leaves(mine), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("name", ["norm clipped", "percentile", "value", "norm ord 1"])
def test_zero_gradient_has_identity_derivative(name, dtype):
    # A zero update is never clipped, so the clip is the identity there; jnp.sqrt's infinite
    # derivative at 0 times a zero cotangent made it NaN (optax's clip_by_global_norm gives
    # NaN there too).
    zeros = jax.tree.map(lambda g: jnp.zeros_like(g, dtype), GRADS)
    tx = TRANSFORMS[name]()
    grad = jax.jit(jax.grad(outcome_loss(tx, tx.init(zeros))))(zeros)
    for leaf in jax.tree.leaves(grad):
        np.testing.assert_allclose(np.asarray(leaf, np.float32), 3.0, rtol=1e-6)


def test_global_norm_gradient():
    grad = jax.jit(jax.grad(gc.global_norm))(GRADS)
    ref = jax.jit(jax.grad(optax.tree.norm))(GRADS)
    for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    # At zero the norm has no derivative; 0 is a subgradient (jnp.sqrt's would be NaN).
    at_zero = jax.grad(gc.global_norm)(jax.tree.map(jnp.zeros_like, GRADS))
    assert all(np.all(np.asarray(x) == 0.0) for x in jax.tree.leaves(at_zero))
    # NaN and Inf still come back from the norm itself.
    assert np.isnan(gc.global_norm({"a": jnp.array([np.nan, 1.0])}))
    assert np.isinf(gc.global_norm({"a": jnp.array([np.inf, 1.0])}))


def test_hypergradient_of_an_injected_threshold():
    # d/dc of the clipped step c * g / |g| is g / |g|: a threshold can be meta-learned.
    tx = optax.inject_hyperparams(gc.clip_by_global_norm)(max_norm=1.0)
    state = tx.init(GRADS)

    def total(c):
        inner = state._replace(hyperparams={**state.hyperparams, "max_norm": c})
        updates, _ = tx.update(GRADS, inner)
        return sum(jnp.sum(u) for u in jax.tree.leaves(updates))

    norm = float(optax.tree.norm(GRADS))
    expected = sum(float(jnp.sum(g)) for g in jax.tree.leaves(GRADS)) / norm
    np.testing.assert_allclose(jax.jit(jax.grad(total))(jnp.float32(1.0)), expected, rtol=1e-5)
