"""The vanilla RNN with SGD + momentum alone, on a set of seeds: how far its results move.

Run: ``JAX_PLATFORMS=cpu python benchmarks/rnn_momentum_seeds.py [SEEDS] [FIRST_SEED]`` (24
seeds from 0 by default: about 3 min on 2 CPU cores). It prints a Markdown table.

``gradclip-jax outcomes`` judges the default against the best fixed threshold in hindsight on
this scenario too, where the noise control (c = 1 one part in a million larger) moves the mean
by about 13%. This trains only the momentum arms of its RNN task (the same model, data,
learning rates and seeds), with the fixed thresholds, the default, the median rule and the
classic rule, so that the scenario can be rerun cheaply on other sets of seeds. The fixed
thresholds' runs are bit for bit those of the full benchmark; the adaptive rules' differ from
them by rounding (they are vmapped over fewer arms), which training amplifies.
"""

import dataclasses
import sys
import time

import numpy as np

from gradclip_jax._cli.outcomes import harness, tasks

FAMILIES = ("fixed", "default", "median", "classic")


def main(seeds: int, first_seed: int) -> None:
    task = tasks.rnn(quick=False, seeds=seeds, first_seed=first_seed)
    task = dataclasses.replace(task, arms=tuple(a for a in task.arms if a.momentum > 0.0))
    # The benchmark's own policies, not copies of them.
    fams = [f for f in harness.families() if f.name in FAMILIES]
    start = time.time()
    logs = harness.run_task(task, fams)
    lrs = sorted({a.lr for a in task.arms})
    lr = np.array([a.lr for a in task.arms])
    finals = {p: harness.final_val(m) for p, m in logs.items()}
    # The benchmark's own figures: the best fixed c in hindsight and the paired intervals.
    metrics = harness.scenario_metrics(task, logs, lambda a: True)
    best = metrics["best_fixed"]
    print(f"SGD + momentum 0.9 on the vanilla RNN, seeds {first_seed}-{first_seed + seeds - 1}, "
          f"learning rates {lrs}: {len(task.arms)} runs per policy, trained in "
          f"{time.time() - start:.0f} s; best fixed c in hindsight: {best}\n")
    print("| policy | final val loss | vs best fixed c [95% interval] | runs lost "
          "| steps clipped | " + " | ".join(f"lr {x:g}" for x in lrs) + " |")
    print("|---|---|---|---|---|" + "---|" * len(lrs))
    for p, row in metrics["rows"].items():
        low, high = row["vs_best_fixed_ci"]
        per_lr = " | ".join(f"{finals[p][lr == x].mean():.4f}" for x in lrs)
        print(f"| `{p}` | {row['final_val_mean']:.4f} | {row['vs_best_fixed_pct']:+.1f}% "
              f"[{low:+.1f}, {high:+.1f}] | {row['lost']} of {row['runs']} "
              f"| {row['clipped_pct']:.1f}% | {per_lr} |")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 24,
         int(sys.argv[2]) if len(sys.argv) > 2 else 0)
