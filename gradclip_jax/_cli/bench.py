"""``gradclip-jax bench``: what each clip transform costs on top of adam.

Two measures per model size:

- extra gradient passes: (XLA ``bytes accessed`` of ``chain(clip, adam)`` - that of ``adam``)
  / gradient bytes. Deterministic; 1.0 is the floor for a norm clip fused into the optimizer.
- wall-clock ratios: one jitted optimizer step of ``chain(clip, adam)`` against ``adam`` alone
  and against ``chain(optax.clip_by_global_norm, adam)``; variants are run interleaved, and
  each keeps its fastest of several repetitions.

It also times ``global_norm`` against a device-to-device copy of the same bytes, to report the
memory bandwidth the norm achieves.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import optax

import gradclip_jax as gc
from gradclip_jax._cli.cost import extra_gradient_passes, gradient_bytes, model_params, train_step

SIZES_QUICK = [(1_000_000, 32), (8_000_000, 96)]
SIZES_FULL = [(1_000_000, 32), (8_000_000, 96), (32_000_000, 192)]


def transforms() -> dict[str, optax.GradientTransformation]:
    return {
        "optax.clip_by_global_norm": optax.clip_by_global_norm(1.0),
        "gradclip_jax.clip_by_global_norm": gc.clip_by_global_norm(1.0),
        "gradclip_jax.clip_by_value": gc.clip_by_value(1.0),
        "gradclip_jax.percentile_clip": gc.percentile_clip(),
    }


def _block(x: Any) -> None:
    jax.block_until_ready(x)


def interleaved_min_times(fns: dict[str, Any], repeats: int) -> dict[str, float]:
    """Fastest of ``repeats`` runs of each zero-argument function, runs interleaved."""
    for fn in fns.values():
        _block(fn())  # compile and warm up
    best = {name: math.inf for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            _block(fn())
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def _step_runner(tx: optax.GradientTransformation, params: Any):
    step = train_step(tx)
    state = tx.init(params)
    grads = jax.tree.map(lambda x: jnp.full_like(x, 0.01), params)
    return lambda: step(grads, state, params)


def bench_size(n_params: int, n_leaves: int, repeats: int) -> dict[str, Any]:
    params = model_params(n_params, n_leaves)
    adam = optax.adam(1e-3)
    txs = transforms()
    runners = {"adam": _step_runner(adam, params)}
    runners.update({name: _step_runner(optax.chain(t, adam), params) for name, t in txs.items()})
    times = interleaved_min_times(runners, repeats)
    rows = []
    for name, t in txs.items():
        rows.append({
            "transform": name,
            "extra_gradient_passes": round(extra_gradient_passes(t, params, adam), 4),
            "time_ms": round(times[name] * 1e3, 3),
            "vs_adam": round(times[name] / times["adam"], 3),
            "vs_optax_clip": round(times[name] / times["optax.clip_by_global_norm"], 3),
        })
    return {
        "params": sum(int(x.size) for x in params),
        "leaves": n_leaves,
        "adam_ms": round(times["adam"] * 1e3, 3),
        "rows": rows,
    }


def bench_bandwidth(n_params: int, repeats: int) -> dict[str, Any]:
    """Achieved bandwidth of ``global_norm`` and of a copy of the same bytes."""
    params = model_params(n_params, 96)
    nbytes = gradient_bytes(params)
    norm = jax.jit(gc.global_norm)
    copy = jax.jit(lambda t: jax.tree.map(lambda x: x + 0, t))
    times = interleaved_min_times({"norm": lambda: norm(params), "copy": lambda: copy(params)},
                                  repeats)
    # The norm reads the bytes once; the copy reads them and writes them.
    norm_gbs = nbytes / times["norm"] / 1e9
    copy_gbs = 2 * nbytes / times["copy"] / 1e9
    return {"bytes": nbytes, "global_norm_GBps": round(norm_gbs, 1),
            "copy_GBps": round(copy_gbs, 1), "fraction_of_copy": round(norm_gbs / copy_gbs, 3)}


def run(*, quick: bool, json_path: str | None, progress: Any = None) -> dict[str, Any]:
    sizes = SIZES_QUICK if quick else SIZES_FULL
    repeats = 5 if quick else 15
    results: dict[str, Any] = {
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        "jax": jax.__version__,
        "optax": optax.__version__,
        "repeats": repeats,
        "sizes": [],
    }
    for n_params, n_leaves in sizes:
        results["sizes"].append(bench_size(n_params, n_leaves, repeats))
        if progress is not None:
            progress(1)
    results["bandwidth"] = bench_bandwidth(sizes[-1][0], repeats)
    if progress is not None:
        progress(1)
    if json_path:
        write_json_atomically(json_path, results)
    return results


def write_json_atomically(path: str, data: Any) -> None:
    """Writes to a temporary file, then renames: an interrupted run leaves no partial file."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def format_table(results: dict[str, Any]) -> str:
    lines = [f"backend: {results['backend']} ({results['device']}), jax {results['jax']}, "
             f"optax {results['optax']}, fastest of {results['repeats']} interleaved runs"]
    for size in results["sizes"]:
        lines.append("")
        lines.append(f"{size['params'] / 1e6:.1f}M float32 params in {size['leaves']} leaves; "
                     f"adam step {size['adam_ms']:.2f} ms")
        lines.append(f"  {'transform (chained with adam)':36s} {'extra passes':>12s} "
                     f"{'step ms':>9s} {'vs adam':>8s} {'vs optax clip':>14s}")
        for row in size["rows"]:
            lines.append(
                f"  {row['transform']:36s} {row['extra_gradient_passes']:12.3f} "
                f"{row['time_ms']:9.2f} {row['vs_adam']:8.3f} {row['vs_optax_clip']:14.3f}"
            )
    bw = results["bandwidth"]
    lines.append("")
    lines.append(f"global_norm over {bw['bytes'] / 1e6:.0f} MB: {bw['global_norm_GBps']} GB/s; "
                 f"device copy: {bw['copy_GBps']} GB/s ({bw['fraction_of_copy']:.0%} of copy)")
    return "\n".join(lines)
