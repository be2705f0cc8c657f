"""``gradclip-jax bench``: what each clip transform costs on top of adam, on every shape.

For each named parameter tree (odd lengths, GPT-2, ResNet-50, LSTM, thousands of tiny
leaves, one huge leaf, a tiny MLP; see ``shapes.py``), in float32 and bfloat16:

- extra gradient passes: (XLA ``bytes accessed`` of ``chain(clip, adam)`` - that of ``adam``)
  / gradient bytes. Deterministic; 1.0 is the floor for a norm clip fused into the optimizer.
- wall-clock ratios: one jitted optimizer step of ``chain(clip, adam)`` against ``adam`` alone
  and against ``chain(optax.clip_by_global_norm, adam)`` (``--optimizer adamw``: adamw in
  place of adam; on an accelerator, a 1B-parameter tree is benched too). Every variant runs
  once per round, in a shuffled order; a ratio is the median over rounds of the two steps'
  times in the same round, with a 95% interval (see ``paired_ratio``): on a shared machine a
  slow spell moves both runs of a round and cancels, where the fastest run of each, compared,
  did not (the same step timed twice differed by up to 1.29x that way). Trees whose adam step
  takes under a millisecond are timed three more ways: one call per step with the parameters and
  optimizer state donated to the step (``jax.jit(..., donate_argnums=...)``, as training loops
  do, so the step writes into their buffers instead of allocating new ones), ``LOOP_STEPS``
  steps inside one jitted loop, as a small model is trained in a ``scan``, and eagerly: the
  step called from Python without ``jax.jit``, as a notebook may train a small model. A
  call's dispatch costs more than such a step, so timed one call per step the clip's share is
  diluted and partly a cost per buffer of state; in the loop the step itself is what is
  measured.

The table ends with the slowest ratio to optax's clip over every tree, dtype and transform,
so that a regression on any one shape shows at once. It also times ``global_norm`` against a
device-to-device copy of the same bytes, to report the memory bandwidth the norm achieves.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import gradclip_jax as gc
from gradclip_jax._cli import shapes
from gradclip_jax._cli.cost import extra_gradient_passes, gradient_bytes, model_params, train_step

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

OPTIMIZERS = {"adam": lambda: optax.adam(1e-3), "adamw": lambda: optax.adamw(1e-3)}
"""The optimizer every clip is chained with (``--optimizer``); its own step is the baseline.
JSON fields keep the names ``adam_ms`` and ``vs_adam`` whichever it is."""
REFERENCE = "optax.clip_by_global_norm"
CONTROL = "optax.clip_by_global_norm, timed again"


def transforms() -> dict[str, optax.GradientTransformation]:
    return {
        "optax.clip_by_global_norm": optax.clip_by_global_norm(1.0),
        "gradclip_jax.clip_by_global_norm": gc.clip_by_global_norm(1.0),
        "gradclip_jax.clip_by_value": gc.clip_by_value(1.0),
        "gradclip_jax.percentile_clip": gc.percentile_clip(),
    }


def _block(x: Any) -> None:
    jax.block_until_ready(x)


def interleaved_times(fns: dict[str, Any], repeats: int, budget_s: float = 0.0,
                      seed: int = 0) -> dict[str, np.ndarray]:
    """Per-round times of every zero-argument function, at least ``repeats`` rounds.

    Each round runs every function once, in an order shuffled afresh (a fixed order would
    give each function the same neighbour, and so the same cache and clock state, every
    time). Rounds continue past ``repeats`` until ``budget_s`` seconds have passed, so that
    steps of a tenth of a millisecond are timed thousands of times, while long steps are not
    timed longer.
    """
    for fn in fns.values():
        _block(fn())  # compile and warm up
    names = list(fns)
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {name: [] for name in names}
    start_all = time.perf_counter()
    rounds = 0
    while rounds < repeats or time.perf_counter() - start_all < budget_s:
        for i in rng.permutation(len(names)):
            start = time.perf_counter()
            _block(fns[names[i]]())
            samples[names[i]].append(time.perf_counter() - start)
        rounds += 1
    return {name: np.asarray(v) for name, v in samples.items()}


def interleaved_min_times(fns: dict[str, Any], repeats: int,
                          budget_s: float = 0.0) -> dict[str, float]:
    """Fastest of at least ``repeats`` interleaved runs of each function (see above)."""
    return {name: float(v.min())
            for name, v in interleaved_times(fns, repeats, budget_s).items()}


def paired_ratio(times: np.ndarray, reference: np.ndarray) -> dict[str, Any]:
    """Median over rounds of ``times / reference`` (same round), with a 95% interval.

    Each ratio pairs two runs made moments apart, so a slow spell of a shared machine moves
    both and cancels; the median ignores the rounds an interruption hit. The interval is the
    distribution-free one for a median: order statistics ``n/2 -+ 0.98 sqrt(n)`` of the
    sorted ratios (the binomial's normal approximation; with 7 rounds or fewer, the range).
    """
    ratios = np.sort(np.asarray(times) / np.asarray(reference))
    n = len(ratios)
    half = 0.98 * math.sqrt(n)
    lo = max(int(math.floor(n / 2 - half)), 0)
    hi = min(int(math.ceil(n / 2 + half)), n - 1)
    return {"ratio": round(float(np.median(ratios)), 3),
            "ci": [round(float(ratios[lo]), 3), round(float(ratios[hi]), 3)]}


def side_by_side(times: dict[str, np.ndarray], reference: str, steps_per_call: int = 1,
                 title: str = "") -> str:
    """A Markdown table of interleaved step times (``interleaved_times``): each step's median
    time per step, and its paired ratio to ``reference``'s, for the before/after scripts of
    ``benchmarks/``."""
    lines = [f"\n{title}, {len(times[reference])} rounds\n",
             f"| step | us per step | over the {reference}'s |", "|---|---|---|"]
    for name, t in times.items():
        r = paired_ratio(t, times[reference])
        lines.append(f"| {name} | {np.median(t) * 1e6 / steps_per_call:.2f} | "
                     f"{r['ratio']:.3f}x [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}] |")
    return "\n".join(lines)


LOOP_STEPS = 100
LOOPED_BELOW_MS = 1.0
"""Trees whose adam step is faster are also timed with the state donated, in a jitted loop of
``LOOP_STEPS`` steps, and eagerly (no ``jax.jit``)."""


def _step_runner(tx: optax.GradientTransformation, params: Any, loop_steps: int | None = None,
                 donate: bool = False, eager: bool = False):
    """A zero-argument function that runs one step (or ``loop_steps`` steps in one call).

    With ``donate``, each call donates the parameters and optimizer state of the call before
    it, as a training loop does: the step then writes into their buffers instead of new ones.
    With ``eager``, the step is not jitted: ``tx.update`` and ``optax.apply_updates`` are
    called from Python, as in a notebook that trains without ``jax.jit``.
    """
    state = tx.init(params)
    grads = jax.tree.map(lambda x: jnp.full_like(x, 0.01), params)
    if eager:
        def eager_step():
            updates, _ = tx.update(grads, state, params)
            return optax.apply_updates(params, updates)

        return eager_step
    if donate:
        step = train_step(tx, donate=True)
        carry = [jax.tree.map(jnp.copy, params), state]

        def run():
            carry[0], carry[1] = step(grads, carry[1], carry[0])
            return carry[0]

        return run
    if loop_steps is None:
        step = train_step(tx)
        return lambda: step(grads, state, params)

    @jax.jit
    def steps(params, state):
        def body(_, carry):
            p, s = carry
            # Gradients that depend on the carried parameters, so that XLA cannot fold the
            # norm of a loop-invariant gradient out of the loop.
            g = jax.tree.map(lambda g0, x: (g0 + 0.5 * x).astype(x.dtype), grads, p)
            updates, s = tx.update(g, s, p)
            return optax.apply_updates(p, updates), s

        return jax.lax.fori_loop(0, loop_steps, body, (params, state))

    return lambda: steps(params, state)


def bench_tree(name: str, params: Any, repeats: int, *, passes: bool = True,
               budget_s: float = 0.0, loop_steps: int | None = None,
               donate: bool = False, eager: bool = False,
               optimizer: str = "adam") -> dict[str, Any]:
    """Step times of every transform chained with adam on ``params``, and their traffic.

    With ``loop_steps``, each timed call runs that many steps in a jitted loop, and the
    times are per step. With ``donate``, each call donates the last call's parameters and
    state to the step; with ``eager``, the step runs without ``jax.jit``. ``optimizer`` (a
    key of ``OPTIMIZERS``) replaces adam.
    """
    adam = OPTIMIZERS[optimizer]()
    txs = transforms()
    runner = lambda tx: _step_runner(tx, params, loop_steps, donate, eager)  # noqa: E731
    runners = {"adam": runner(adam)}
    runners.update({t: runner(optax.chain(tx, adam)) for t, tx in txs.items()})
    # The noise control: optax's clip compiled and timed a second time, side by side. Its
    # ratio to the first is what this machine's timing alone makes of identical steps.
    runners[CONTROL] = runner(optax.chain(txs[REFERENCE], adam))
    samples = interleaved_times(runners, repeats, budget_s=budget_s)
    fastest = {t: float(v.min()) / (loop_steps or 1) for t, v in samples.items()}
    rows = []
    for t, tx in txs.items():
        vs_optax = paired_ratio(samples[t], samples[REFERENCE])
        rows.append({
            "transform": t,
            "extra_gradient_passes": (round(extra_gradient_passes(tx, params, adam), 4)
                                      if passes else None),
            "time_ms": round(fastest[t] * 1e3, 4),
            "vs_adam": paired_ratio(samples[t], samples["adam"])["ratio"],
            "vs_optax_clip": vs_optax["ratio"],
            "vs_optax_clip_ci": vs_optax["ci"],
        })
    leaves = jax.tree.leaves(params)
    control = paired_ratio(samples[CONTROL], samples[REFERENCE])
    tree, timing = name, "one call per step"
    if loop_steps is not None:
        tree, timing = f"{name}, {loop_steps} steps in a jitted loop", "jitted loop"
    elif donate:
        tree, timing = f"{name}, state donated", "one call per step, state donated"
    elif eager:
        tree, timing = f"{name}, eager (no jit)", "one eager call per step, not jitted"
    rule = paired_ratio(samples["gradclip_jax.percentile_clip"],
                        samples["gradclip_jax.clip_by_global_norm"])
    return {
        "tree": tree,
        "timing": timing,
        "dtype": str(leaves[0].dtype),
        "params": sum(int(x.size) for x in leaves),
        "leaves": len(leaves),
        "adam_ms": round(fastest["adam"] * 1e3, 5),
        "rounds": len(samples["adam"]),
        "rows": rows,
        "control_vs_optax_clip": control["ratio"],
        "control_vs_optax_clip_ci": control["ci"],
        "percentile_vs_norm_clip": rule["ratio"],
        "percentile_vs_norm_clip_ci": rule["ci"],
    }


TIME_BUDGET_S = {False: 3.0, True: 0.5}
"""Seconds of interleaved rounds per tree at least, full and quick (short steps get more)."""


def _repeats(n_params: int, quick: bool) -> int:
    # Small steps are noisy and cheap: time them more often.
    if n_params < 1_000_000:
        return 31 if quick else 101
    return 5 if quick else 11


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


def select_sets(sets: dict[str, shapes.Builder],
                words: Sequence[str]) -> dict[str, shapes.Builder]:
    """The shape sets whose name contains any of ``words`` (case-insensitive); all of them
    when ``words`` is empty. A word that matches no set is an error listing the names."""
    for word in words:
        if not any(word.lower() in name.lower() for name in sets):
            raise SystemExit(f"gradclip-jax bench: --only {word!r} matches no shape set; "
                             f"the sets are: {'; '.join(sets)}")
    return {name: build for name, build in sets.items()
            if not words or any(word.lower() in name.lower() for word in words)}


def run(*, quick: bool, json_path: str | None, progress: Any = None,
        sets: dict[str, shapes.Builder] | None = None,
        budget_s: float | None = None, optimizer: str = "adam") -> dict[str, Any]:
    """Benchmarks every shape set (``sets``, default all) in both dtypes; ``budget_s`` is the
    least time of interleaved rounds per tree (default ``TIME_BUDGET_S``); every clip is
    chained with ``optimizer`` (a key of ``OPTIMIZERS``)."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {optimizer!r}")
    sets = sets if sets is not None else shapes.shape_sets(quick=quick)
    budget = TIME_BUDGET_S[quick] if budget_s is None else budget_s
    results: dict[str, Any] = {
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        "jax": jax.__version__,
        "optax": optax.__version__,
        "optimizer": optimizer,
        "budget_s": budget,
        "trees": [],
    }
    for name, build in sets.items():
        for dtype in DTYPES.values():
            params = build(dtype)
            n = sum(int(x.size) for x in jax.tree.leaves(params))
            # The cost analysis compiles every variant twice more; skip it for the largest
            # trees and for the one with a thousand leaves (XLA compiles ~15 s per program).
            passes = n <= 40_000_000 and len(jax.tree.leaves(params)) <= 500
            per_call = bench_tree(name, params, _repeats(n, quick), passes=passes,
                                  budget_s=budget, optimizer=optimizer)
            results["trees"].append(per_call)
            if per_call["adam_ms"] < LOOPED_BELOW_MS:
                results["trees"].append(bench_tree(name, params, _repeats(n, quick),
                                                   passes=False, budget_s=budget,
                                                   donate=True, optimizer=optimizer))
                results["trees"].append(bench_tree(name, params, 11 if quick else 31,
                                                   passes=False, budget_s=budget,
                                                   loop_steps=LOOP_STEPS,
                                                   optimizer=optimizer))
                results["trees"].append(bench_tree(name, params, 11 if quick else 31,
                                                   passes=False, budget_s=budget,
                                                   eager=True, optimizer=optimizer))
            del params
            if progress is not None:
                progress(1)
    results["slowest"] = slowest(results)
    results["noisiest"] = noisiest(results)
    results["percentile_vs_norm"] = percentile_vs_norm(results)
    results["bandwidth"] = bench_bandwidth(8_000_000 if quick else 32_000_000, 5 if quick else 15)
    if progress is not None:
        progress(1)
    if json_path:
        write_json_atomically(json_path, results)
    return results


GOAL = 1.05
"""The step-time goal: every transform at most this ratio to optax's clip + adam."""


def _ours(results: dict[str, Any]):
    for tree in results["trees"]:
        for row in tree["rows"]:
            if row["transform"] != REFERENCE:
                yield tree, row


def slowest(results: dict[str, Any]) -> dict[str, Any]:
    """The gradclip_jax transform, tree and dtype with the largest ratio to optax's clip,
    and how many rows miss ``GOAL``: by their median, and by their whole interval."""
    worst: dict[str, Any] = {"vs_optax_clip": -math.inf}
    for tree, row in _ours(results):
        if row["vs_optax_clip"] > worst["vs_optax_clip"]:
            worst = {"tree": tree["tree"], "dtype": tree["dtype"], **row}
    rows = [row for _, row in _ours(results)]
    worst["rows"] = len(rows)
    worst["above_goal"] = sum(row["vs_optax_clip"] > GOAL for row in rows)
    worst["surely_above_goal"] = sum(row.get("vs_optax_clip_ci", [0.0])[0] > GOAL
                                     for row in rows)
    return worst


def noisiest(results: dict[str, Any]) -> dict[str, Any]:
    """The tree whose noise control (the same step timed twice) is furthest from 1."""
    def spread(tree: dict[str, Any]) -> float:
        r = tree["control_vs_optax_clip"]
        return max(r, 1.0 / r)

    trees = [t for t in results["trees"] if "control_vs_optax_clip" in t]
    if not trees:
        return {}
    worst = max(trees, key=spread)
    return {"tree": worst["tree"], "dtype": worst["dtype"], "spread": round(spread(worst), 3)}


TINY_PARAMS = 1_000_000
"""Trees up to this many parameters are tiny models, where the percentile rule's per-step
work (its histograms and quantile) shows most: the speed issue's 1.10x goal is set on them."""

TINY_GOAL = 1.10


def percentile_vs_norm(results: dict[str, Any]) -> dict[str, Any]:
    """The tree where the percentile clip's step is slowest against the norm clip's, and
    (``"tiny"``) the same among tiny models (at most ``TINY_PARAMS`` parameters).

    The percentile rule's own cost: its histograms and quantile, over the same clip. On a
    large tree that cost is a few kernels on 15 KB beside passes over the gradients, so the
    largest ratio there is the noise of a few rounds; on a tiny model it is the rule's cost.
    """
    def worst(trees: list[dict[str, Any]]) -> dict[str, Any]:
        tree = max(trees, key=lambda t: t["percentile_vs_norm_clip"])
        return {"tree": tree["tree"], "dtype": tree["dtype"],
                "ratio": tree["percentile_vs_norm_clip"],
                "ci": tree.get("percentile_vs_norm_clip_ci")}

    trees = [t for t in results["trees"] if "percentile_vs_norm_clip" in t]
    if not trees:
        return {}
    found = worst(trees)
    tiny = [t for t in trees if t["params"] <= TINY_PARAMS]
    if tiny:
        found["tiny"] = worst(tiny)
    return found


def steps_per_run(quick: bool, sets: dict[str, shapes.Builder] | None = None) -> int:
    """How many progress steps ``run`` reports: one per tree and dtype, one for bandwidth."""
    sets = sets if sets is not None else shapes.shape_sets(quick=quick)
    return len(sets) * len(DTYPES) + 1


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
    opt = results.get("optimizer", "adam")
    lines = [f"backend: {results['backend']} ({results['device']}), jax {results['jax']}, "
             f"optax {results['optax']}. {opt} step ms: its fastest run. Ratios: the median, over "
             "rounds that run every step once in a shuffled order, of the step's time over the "
             "other's in the same round, with a 95% interval"
             + (f"; at least {results['budget_s']:g} s of rounds per tree"
                if "budget_s" in results else ""),
             "",
             f"| tree | dtype | params (leaves) | {opt} step ms | transform, chained with {opt} "
             f"| extra gradient passes | step vs {opt} | vs optax clip |",
             "|---|---|---|---|---|---|---|---|"]
    for tree in results["trees"]:
        for row in tree["rows"]:
            passes = row["extra_gradient_passes"]
            lines.append(
                f"| {tree['tree']} | {tree['dtype']} | {_count(tree['params'])} "
                f"({tree['leaves']}) | {tree['adam_ms']:.4g} | `{row['transform']}` | "
                f"{'-' if passes is None else f'{passes:.3f}'} | {row['vs_adam']:.3f} | "
                f"{_with_ci(row['vs_optax_clip'], row.get('vs_optax_clip_ci'))} |")
        if "control_vs_optax_clip" in tree:
            lines.append(
                f"| {tree['tree']} | {tree['dtype']} | {_count(tree['params'])} "
                f"({tree['leaves']}) | {tree['adam_ms']:.4g} | `{CONTROL}` (noise control) | "
                f"- | - | "
                f"{_with_ci(tree['control_vs_optax_clip'], tree.get('control_vs_optax_clip_ci'))}"
                " |")
    worst = results.get("slowest")
    if worst:
        lines.append("")
        lines.append(f"slowest ratio to optax's clip: "
                     f"{_with_ci(worst['vs_optax_clip'], worst.get('vs_optax_clip_ci'))} "
                     f"(`{worst['transform']}` on {worst['tree']}, {worst['dtype']})")
        if "rows" in worst:
            lines.append(f"goal {GOAL}x: {worst['above_goal']} of {worst['rows']} ratios above "
                         f"it, {worst['surely_above_goal']} with their whole 95% interval "
                         "above it")
    rule = results.get("percentile_vs_norm")
    if rule:
        lines.append(f"the percentile clip's step over the norm clip's, largest: "
                     f"{_with_ci(rule['ratio'], rule.get('ci'))} ({rule['tree']}, "
                     f"{rule['dtype']})")
        tiny = rule.get("tiny")
        if tiny:
            lines.append(f"  on tiny models (at most {TINY_PARAMS:,} parameters; goal "
                         f"{TINY_GOAL:.2f}x): {_with_ci(tiny['ratio'], tiny.get('ci'))} "
                         f"({tiny['tree']}, {tiny['dtype']})")
    noise = results.get("noisiest")
    if noise:
        lines.append(f"noise: the same step timed twice differed by up to {noise['spread']:.3f}x "
                     f"({noise['tree']}, {noise['dtype']}); ratios that close to 1 are not "
                     f"measured differences")
    bw = results["bandwidth"]
    lines.append(f"global_norm over {bw['bytes'] / 1e6:.0f} MB: {bw['global_norm_GBps']} GB/s; "
                 f"device copy: {bw['copy_GBps']} GB/s ({bw['fraction_of_copy']:.0%} of copy)")
    return "\n".join(lines)


def _with_ci(ratio: float, ci: list[float] | None) -> str:
    return f"{ratio:.3f}" if ci is None else f"{ratio:.3f} [{ci[0]:.2f}, {ci[1]:.2f}]"


def _count(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 100_000 else f"{n:,}"
