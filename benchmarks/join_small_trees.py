"""Joining a small model's whole tree before its norm: the step before and after, side by side.

Run: ``JAX_PLATFORMS=cpu python benchmarks/join_small_trees.py [SECONDS]``.

One interleaved run times each clip + adam on the 10k-parameter MLP inside a 100-step jitted
loop, compiled twice: "before" with ``_norms.TINY_TREE = 0`` (only leaves of at most
``SMALL_LEAF`` elements are joined, as before the change) and "after" with the shipped value.
Each ratio is to optax's clip + adam in the same round (median over rounds, 95% interval),
as in ``gradclip-jax bench``.
"""

import sys

import jax
import jax.numpy as jnp
import optax

import gradclip_jax as gc
from gradclip_jax import _norms
from gradclip_jax._cli import bench, shapes

LOOP = 100


def main(seconds: float) -> None:
    shipped = _norms.TINY_TREE
    for dname, dtype in [("float32", jnp.float32), ("bfloat16", jnp.bfloat16)]:
        params = shapes.tiny_mlp(dtype)
        fns = {}
        for label, tiny_tree in [("before", 0), ("after", shipped)]:
            _norms.TINY_TREE = tiny_tree  # read while tracing: compile each step now
            clips = [("optax clip", optax.clip_by_global_norm(1.0))] if label == "before" else []
            clips += [("norm clip", gc.clip_by_global_norm(1.0)),
                      ("value clip", gc.clip_by_value(1.0)),
                      ("percentile clip", gc.percentile_clip())]
            for name, clip in clips:
                run = bench._step_runner(optax.chain(clip, optax.adam(1e-3)), params, LOOP)
                jax.block_until_ready(run())
                fns[name if name == "optax clip" else f"{name}, {label}"] = run
        _norms.TINY_TREE = shipped
        times = bench.interleaved_times(fns, 50, budget_s=seconds)
        print(bench.side_by_side(times, "optax clip", LOOP, dname))


if __name__ == "__main__":
    main(float(sys.argv[1]) if len(sys.argv) > 1 else 25.0)
