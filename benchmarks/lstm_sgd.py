"""The LSTM language model of ``gradclip-jax outcomes`` trained with plain SGD: the default
against ``percentile_clip(10.0)``, the rule ``percentile_clipped`` picks for plain SGD.

Run: ``JAX_PLATFORMS=cpu python benchmarks/lstm_sgd.py [SEEDS] [RATE ...]`` (3 seeds and four
rates: about 3 min on 2 CPU cores). It prints one row per policy: the mean final validation
loss, its distance from the best fixed threshold in hindsight with the 95% paired-bootstrap
interval of the outcomes tables, runs lost, the share of steps clipped and the loss per
learning rate.

The 10th percentile was chosen for plain SGD on the vanilla RNN, where the default lost runs
near the edge of stability. This checks it on another model: the LSTM with SGD (warmup +
cosine, as the task's Adam), paired by seed with the fixed thresholds, no clipping and the
noise control (c = 1 + 2^-20).
"""

import sys
import time

import numpy as np
import optax
from start_by_optimizer import with_optimizer  # run from the repository root: benchmarks/

import gradclip_jax as gc
from gradclip_jax._cli.outcomes import harness, tasks

RATES = (3.0, 10.0, 30.0, 100.0)


def main(seeds: int, rates: tuple[float, ...]) -> None:
    base = tasks.lstm(quick=False, seeds=seeds)
    seeds_run = sorted({a.seed for a in base.arms})
    task = with_optimizer(base, "lstm_sgd", optax.sgd,
                          (tasks.Arm(lr, s) for lr in rates for s in seeds_run))
    fams = [
        harness.Family("fixed", lambda c, t: gc.clip_by_global_norm(c, nonfinite="propagate"),
                       {"no clip": harness.NO_CLIP, "c=0.3": 0.3, "c=1": 1.0, "c=3": 3.0,
                        harness.CONTROL: harness.CONTROL_C}),
        # Without a start, as measured before 0.2.0 (and as percentile_clipped's SGD rule).
        harness.Family("percentiles", lambda p, t: gc.percentile_clip(p, start=None),
                       {harness.MEDIAN: 50.0, "percentile_clip(10, start=None)": 10.0}),
    ]
    start = time.time()
    logs = harness.run_task(task, fams)
    lr = np.array([a.lr for a in task.arms])
    finals = {p: harness.final_val(m) for p, m in logs.items()}
    best = min((p for p in finals if p.startswith("c=")), key=lambda p: finals[p].mean())
    resampled = harness._bootstrap_runs(len(lr))  # the outcomes tables' paired bootstrap
    print(f"{len(task.arms)} runs per policy (seeds 0..{seeds - 1}, learning rates {rates}), "
          f"trained in {time.time() - start:.0f} s; best fixed c: {best}\n")
    print("| policy | final val loss | vs best fixed c (95% interval) | runs lost "
          "| steps clipped | per learning rate |")
    print("|---|---|---|---|---|---|")
    for p, m in logs.items():
        lo, hi = harness._relative_ci(finals[p], finals[best], resampled)
        rel = 100 * (finals[p].mean() / finals[best].mean() - 1)
        per = " / ".join(f"{finals[p][lr == r].mean():.4f}" for r in rates)
        print(f"| `{p}` | {finals[p].mean():.4f} | {rel:+.1f}% [{lo:+.1f}, {hi:+.1f}] "
              f"| {int(harness.lost(m).sum())} | "
              f"{np.mean(m['grad_norm'] > m['threshold']):.1%} | {per} |")


if __name__ == "__main__":
    args = sys.argv[1:]
    main(int(args[0]) if args else 3, tuple(map(float, args[1:])) or RATES)
