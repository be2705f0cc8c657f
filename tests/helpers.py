"""Shared test helpers: every clip transform by name, feeding norm streams through a
transform, tree checks."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

import gradclip_jax as gc

CLIPS = {
    "norm": lambda **kw: gc.clip_by_global_norm(1.0, **kw),
    "norm_ord1": lambda **kw: gc.clip_by_global_norm(1.0, ord=1, **kw),
    "norm_ordinf": lambda **kw: gc.clip_by_global_norm(1.0, ord=math.inf, **kw),
    "value": lambda **kw: gc.clip_by_value(0.1, **kw),
    "percentile": lambda **kw: gc.percentile_clip(warmup_steps=2, **kw),
    "percentile_decay": lambda **kw: gc.percentile_clip(warmup_steps=2, decay=0.9, **kw),
}
"""Every clip transform, by name: factories taking the keyword arguments all of them accept."""


def _clip_state(state):
    """The one clip state in ``state`` (itself, or the unnamed clip of a chain's state)."""
    return state if isinstance(state, gc.ClipState) else gc.find_clip_states(state)[""]


def run_norm_stream(tx, norms, *, dim: int = 1, params=None):
    """Feeds updates whose global L2 norm follows ``norms`` through ``tx`` under ``lax.scan``.

    ``tx`` may be a clip or a chain holding one unnamed clip (given ``params`` for its
    optimizer's ``init``, ``{"w": <dim floats>}``). Returns (final state, output norms,
    thresholds applied, per-step clipped flags).
    """
    direction = jnp.ones((dim,), jnp.float32) / np.sqrt(dim)

    def step(state, norm):
        out, new_state = tx.update({"w": direction * norm}, state, params)
        out_norm = jnp.sqrt(jnp.sum(out["w"] ** 2))
        clip, new_clip = _clip_state(state), _clip_state(new_state)
        clipped = new_clip.clipped_steps > clip.clipped_steps
        return new_state, (out_norm, new_clip.threshold, clipped)

    state, (outs, thresholds, clipped) = jax.jit(lambda s, n: jax.lax.scan(step, s, n))(
        tx.init(params), jnp.asarray(norms, jnp.float32)
    )
    return state, np.asarray(outs), np.asarray(thresholds), np.asarray(clipped)


def shapes_and_dtypes(tree):
    return jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x)), tree)


def all_finite(tree) -> bool:
    return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree)
               if jnp.issubdtype(jnp.result_type(x), jnp.inexact))


def assert_same_bits(a, b):
    """Two trees with the same leaves, bit for bit (NaNs in the same places)."""
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
