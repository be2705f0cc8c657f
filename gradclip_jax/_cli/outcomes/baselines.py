"""Published adaptive clipping rules, written from their papers for the outcomes benchmark.

They are baselines, not library API. Both are ordinary optax transformations whose state has a
``threshold`` field (the threshold applied at the last step, ``inf`` when none), which is what
the harness logs.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

import gradclip_jax as gc


def _rescale(updates, norm, threshold):
    scale = jnp.where(norm > threshold, threshold / norm, 1.0)
    return jax.tree.map(lambda g: (g * scale).astype(g.dtype), updates)


class AutoClipState(NamedTuple):
    """history: every norm seen (a buffer of ``max_steps``, filled up to ``count``)."""

    count: jax.Array
    history: jax.Array
    threshold: jax.Array


def autoclip(percentile: float | jax.Array, *, max_steps: int) -> optax.GradientTransformation:
    """AutoClip (Seetharaman, Wichern, Pardo and Le Roux, MLSP 2020, arXiv:2007.14469).

    Follows the paper and its reference code: the current global norm is appended to the
    history of every norm seen so far, and the update is clipped at the ``percentile``-th
    percentile of that history (NumPy's default linear interpolation). The history is a
    fixed buffer of ``max_steps`` entries, so runs must not be longer than that.
    """

    def init(params):
        del params
        return AutoClipState(jnp.zeros((), jnp.int32), jnp.zeros((max_steps,), jnp.float32),
                             jnp.full((), jnp.inf, jnp.float32))

    def update(updates, state, params=None):
        del params
        norm = gc.global_norm(updates)
        history = state.history.at[state.count].set(norm)
        n = state.count + 1
        valid = jnp.arange(max_steps) < n
        ordered = jnp.sort(jnp.where(valid, history, jnp.inf))
        rank = jnp.asarray(percentile, jnp.float32) / 100.0 * (n - 1).astype(jnp.float32)
        lo = jnp.floor(rank).astype(jnp.int32)
        hi = jnp.minimum(lo + 1, n - 1)
        frac = rank - lo.astype(jnp.float32)
        threshold = ordered[lo] * (1.0 - frac) + ordered[hi] * frac
        return _rescale(updates, norm, threshold), AutoClipState(n, history, threshold)

    return optax.GradientTransformation(init, update)


class ZClipState(NamedTuple):
    """mean / var: the EMA statistics (valid once ``count`` > warmup); warm: warmup norms."""

    count: jax.Array
    warm: jax.Array
    mean: jax.Array
    var: jax.Array
    threshold: jax.Array


def zclip(*, alpha: float = 0.97, z_thresh: float = 2.5, max_grad_norm: float | None = 1.0,
          eps: float = 1e-6, warmup_steps: int = 25) -> optax.GradientTransformation:
    """ZClip (Kumar, Owen, Roy Chowdhury and Güra 2025, arXiv:2504.02507), z-score mode.

    Follows the paper and the reference implementation's defaults (``mode="zscore"``,
    ``clip_option="adaptive_scaling"``, ``clip_factor=1``, ``max_grad_norm=1.0``):

    - for the first ``warmup_steps`` steps the norms are collected and the update is clipped
      at ``max_grad_norm``; then the EMA mean and variance start from their plain mean and
      variance;
    - afterwards, with ``z = (g - mean) / (std + eps)``: when ``z > z_thresh`` the threshold is
      ``mean + z_thresh**2 * std / z`` (it shrinks as the outlier grows), otherwise no adaptive
      threshold; the threshold applied is the smaller of that and ``max_grad_norm``;
    - the EMA is updated with the adaptive threshold on an outlier step and with the norm
      otherwise (``mean`` first, then ``var`` around the new mean).
    """
    cap = jnp.inf if max_grad_norm is None else max_grad_norm

    def init(params):
        del params
        f = jnp.float32
        return ZClipState(jnp.zeros((), jnp.int32), jnp.zeros((warmup_steps,), f),
                          jnp.zeros((), f), jnp.zeros((), f), jnp.full((), jnp.inf, f))

    def update(updates, state, params=None):
        del params
        norm = gc.global_norm(updates)
        in_warmup = state.count < warmup_steps
        std = jnp.sqrt(state.var)
        z = (norm - state.mean) / (std + eps)
        outlier = z > z_thresh
        adaptive = state.mean + z_thresh * std / (z / z_thresh)
        clip_val = jnp.where(outlier, adaptive, jnp.inf)
        threshold = jnp.where(in_warmup, cap, jnp.minimum(clip_val, cap))

        warm = jnp.where(in_warmup, state.warm.at[state.count].set(norm), state.warm)
        first = state.count == warmup_steps - 1
        w_mean = jnp.mean(warm)
        w_var = jnp.mean((warm - w_mean) ** 2)
        effective = jnp.where(outlier, clip_val, norm)
        e_mean = alpha * state.mean + (1 - alpha) * effective
        e_var = alpha * state.var + (1 - alpha) * (effective - e_mean) ** 2
        mean = jnp.where(in_warmup, jnp.where(first, w_mean, state.mean), e_mean)
        var = jnp.where(in_warmup, jnp.where(first, w_var, state.var), e_var)
        new = ZClipState(state.count + 1, warm, mean, var, threshold)
        return _rescale(updates, norm, threshold), new

    return optax.GradientTransformation(init, update)
