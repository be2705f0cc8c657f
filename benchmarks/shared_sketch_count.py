"""The percentile clip's recent sketch without a count of its own: the step before and after.

Run: ``JAX_PLATFORMS=cpu python benchmarks/shared_sketch_count.py [SECONDS]``.

The recent sketch records the same norms as the histogram, so it now reads the histogram's
count (for its halving schedule) instead of keeping its own. One interleaved run times each
step on the 10k-parameter MLP, 100 steps inside one jitted loop (where ``gradclip-jax bench``
found the percentile clip slowest against the norm clip) and once per call: "before" builds
the state with a counted recent sketch (the previous layout, which ``sketch_add`` still
updates as it did), "after" with the shipped one. Ratios are to the norm clip's step in the
same round (median over rounds, 95% interval), as in ``gradclip-jax bench``. The thresholds
are the same either way (``tests/test_sketch.py``).
"""

import sys

import jax
import jax.numpy as jnp
import optax

import gradclip_jax as gc
from gradclip_jax import _core
from gradclip_jax._cli import bench, shapes

LOOP = 100


shipped_init = _core.sketch_init


def _counted_init(relative_accuracy, *, weighted, counted=True):
    del counted  # the layout before: every sketch keeps its own count
    return shipped_init(relative_accuracy, weighted=weighted)


def main(seconds: float) -> None:
    for dname, dtype in [("float32", jnp.float32), ("bfloat16", jnp.bfloat16)]:
        params = shapes.tiny_mlp(dtype)
        for loop in (LOOP, None):
            fns = {}
            for label, init in [("before", _counted_init), ("after", shipped_init)]:
                _core.sketch_init = init  # read by tx.init, which the runner calls now
                clips = [("norm clip", gc.clip_by_global_norm(1.0))] if label == "before" else []
                clips += [(f"percentile clip, {label}", gc.percentile_clip())]
                for name, clip in clips:
                    run = bench._step_runner(optax.chain(clip, optax.adam(1e-3)), params, loop)
                    jax.block_until_ready(run())
                    fns[name] = run
            _core.sketch_init = shipped_init
            times = bench.interleaved_times(fns, 50, budget_s=seconds)
            how = f"{LOOP} steps in a jitted loop" if loop else "one call per step"
            print(bench.side_by_side(times, "norm clip", loop or 1, f"{dname}, {how}"))


if __name__ == "__main__":
    main(float(sys.argv[1]) if len(sys.argv) > 1 else 25.0)
