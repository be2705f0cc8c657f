"""Donating the optimizer state to a jitted step, as training loops do (Flax, MaxText, levanter).

Donation needs every state leaf to be a buffer of its own: two fields holding one array made
the first donated step fail with "Attempt to donate the same buffer twice" (skip_spikes' seven
counters were one array).
"""

import warnings

import jax
import jax.numpy as jnp
import optax
import pytest

import gradclip_jax as gc
from tests.helpers import CLIPS

PARAMS = {"w": jnp.ones((7, 5)), "b": jnp.zeros(5)}

TRANSFORMS = {
    **{name: (lambda clip=clip: optax.chain(clip(), optax.adam(1e-3)))
       for name, clip in CLIPS.items()},
    "percentile, no window": lambda: optax.chain(gc.percentile_clip(90.0, window=None),
                                                 optax.sgd(0.1, momentum=0.9)),
    "percentile_clipped": lambda: gc.percentile_clipped(optax.adamw(1e-3)),
    "skip_spikes": lambda: gc.skip_spikes(optax.chain(gc.percentile_clip(), optax.adam(1e-3))),
    "skip_spikes, named": lambda: gc.skip_spikes(optax.adam(1e-3), name="guard"),
    "injected": lambda: optax.inject_hyperparams(gc.percentile_clip)(percentile=90.0),
}


def buffer_ids(state):
    return [leaf.unsafe_buffer_pointer() for leaf in jax.tree.leaves(state)]


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_state_leaves_are_distinct_buffers(name):
    tx = TRANSFORMS[name]()
    state = tx.init(PARAMS)
    ids = buffer_ids(state)
    assert len(set(ids)) == len(ids)
    grads = jax.tree.map(lambda x: jnp.full_like(x, 0.5), PARAMS)
    _, state = tx.update(grads, state, PARAMS)  # eagerly (one compiled call)
    ids = buffer_ids(state)
    assert len(set(ids)) == len(ids)


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_donated_steps(name):
    tx = TRANSFORMS[name]()

    def step(grads, state, params):
        updates, state = tx.update(grads, state, params, loss=jnp.sum(grads["w"]))
        return optax.apply_updates(params, updates), state

    donated = jax.jit(step, donate_argnums=(1, 2))
    reference = jax.jit(step)
    params, state = jax.tree.map(jnp.copy, PARAMS), tx.init(PARAMS)
    ref_params, ref_state = jax.tree.map(jnp.copy, PARAMS), tx.init(PARAMS)
    with warnings.catch_warnings():
        # Every donated buffer must be usable: a leaf the step cannot write into warns.
        warnings.simplefilter("error")
        for i in range(4):
            grads = jax.tree.map(lambda x, s=0.5 * (i + 1): jnp.full_like(x, s), PARAMS)
            params, state = donated(grads, state, params)
            ref_params, ref_state = reference(grads, ref_state, ref_params)
    for a, b in zip(jax.tree.leaves((params, state)), jax.tree.leaves((ref_params, ref_state)),
                    strict=True):
        assert jnp.array_equal(a, b)
