"""Memory traffic of a clip transform from XLA's compiled cost analysis (deterministic)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax


def model_params(n_params: int, n_leaves: int, dtype: Any = jnp.float32) -> list[jax.Array]:
    """``n_leaves`` zero matrices holding about ``n_params`` parameters in all."""
    per_leaf = max(1, n_params // n_leaves)
    cols = 128 if per_leaf >= 128 else per_leaf
    rows = max(1, per_leaf // cols)
    return [jnp.zeros((rows, cols), dtype) for _ in range(n_leaves)]


def train_step(tx: optax.GradientTransformation, *, donate: bool = False):
    """A jitted optimizer step: ``(grads, opt_state, params) -> (params, opt_state)``; with
    ``donate``, the state and parameters passed in are donated to the step."""

    def step(grads, opt_state, params):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return jax.jit(step, donate_argnums=(1, 2) if donate else ())


def bytes_accessed(tx: optax.GradientTransformation, params: Any) -> float:
    """XLA's estimate of the bytes one compiled step of ``tx`` reads and writes."""
    state = tx.init(params)
    compiled = train_step(tx).lower(params, state, params).compile()
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0]
    return float(analysis["bytes accessed"])


def gradient_bytes(params: Any) -> int:
    return int(sum(np.prod(x.shape) * jnp.dtype(x.dtype).itemsize
                   for x in jax.tree.leaves(params)))


def extra_gradient_passes(
    clip: optax.GradientTransformation,
    params: Any,
    base: optax.GradientTransformation | None = None,
) -> float:
    """(bytes of ``chain(clip, base)`` - bytes of ``base``) / gradient bytes.

    ``base`` defaults to ``optax.adam(1e-3)``. 1.0 is the floor for a norm-based clip whose
    scale fuses into the optimizer's update: one extra read of the gradients.
    """
    base = base if base is not None else optax.adam(1e-3)
    extra = bytes_accessed(optax.chain(clip, base), params) - bytes_accessed(base, params)
    return extra / gradient_bytes(params)
