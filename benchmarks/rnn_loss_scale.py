"""The vanilla-RNN scenarios with the loss multiplied by 100 and by 0.01: SGD is not scale-free.

Run: ``JAX_PLATFORMS=cpu python benchmarks/rnn_loss_scale.py [SEEDS] [PERCENTILE ...]`` (24
seeds: about 17 min on 2 CPU cores). It prints a table per optimizer and scale. Each
``PERCENTILE`` trains ``percentile_clip(PERCENTILE)`` beside the rest.

``gradclip-jax outcomes`` shifts the loss scale of the transformer, trained with AdamW, whose
step does not depend on the gradient's scale. With SGD, a loss multiplied by k multiplies the
step by k: a learning-rate change. A threshold taken from the run's own norms scales with them
and passes that change on; a fixed threshold caps the step at ``lr * c`` whatever the scale.
This trains the RNN task's arms (plain SGD and SGD + momentum, four learning rates each) at
both scales, paired by seed, with the fixed thresholds, the default and the classic rule.
"""

import dataclasses
import sys
import time

import numpy as np

from gradclip_jax._cli.outcomes import harness, tasks

SCALES = (100.0, 0.01)


def main(seeds: int, percentiles: tuple[float, ...] = ()) -> None:
    task = tasks.rnn(quick=False, seeds=seeds)
    arms = tuple(dataclasses.replace(a, scale=s) for s in SCALES for a in task.arms)
    task = dataclasses.replace(task, arms=arms)
    # The benchmark's own fixed thresholds, default and classic rule, not copies of them.
    fams = [f for f in harness.families(percentiles)
            if f.name in ("fixed", "default", "median", "classic", "percentiles")]
    start = time.time()
    logs = harness.run_task(task, fams)
    print(f"{seeds} seeds per learning rate, trained in {time.time() - start:.0f} s\n")
    for scale in SCALES:
        for momentum, label in ((0.0, "plain SGD"), (0.9, "SGD + momentum 0.9")):
            idx = [i for i, a in enumerate(task.arms)
                   if a.scale == scale and a.momentum == momentum]
            rates = sorted({task.arms[i].lr for i in idx})
            finals = {p: harness.final_val({k: v[idx] for k, v in m.items()})
                      for p, m in logs.items()}
            best = min((p for p in finals if p.startswith("c=")), key=lambda p: finals[p].mean())
            print(f"### {label}, loss x{scale:g} (learning rates {rates}; best fixed c: {best})\n")
            print("| policy | final val loss | vs best fixed c | runs lost | steps clipped |")
            print("|---|---|---|---|---|")
            for p, m in logs.items():
                sub = {k: v[idx] for k, v in m.items()}
                mean = finals[p].mean()
                clipped = np.mean(sub["grad_norm"] > sub["threshold"])
                print(f"| `{p}` | {mean:.4f} | {100 * (mean / finals[best].mean() - 1):+.1f}% "
                      f"| {int(harness.lost(sub).sum())} of {len(idx)} | {clipped:.1%} |")
            print()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 24, tuple(map(float, sys.argv[2:])))
