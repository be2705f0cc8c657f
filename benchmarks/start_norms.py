"""The unclipped norm and each start's threshold over one seed's runs, per learning rate.

Run: ``JAX_PLATFORMS=cpu python benchmarks/start_norms.py [SEED]`` (about 3 min on 2 CPU
cores). It trains the transformer LM with its AdamW and the LSTM LM with its Adam (the tasks of
``start_by_optimizer.py``, natural loss scale) without clipping and with starts of 0.25 and
0.1, and prints the norm (and threshold) at a few steps of every run, with the share of steps
clipped: where the first norm sits among the later ones decides what a start caps.
"""

import sys

import numpy as np
from start_by_optimizer import language_model_task

import gradclip_jax as gc
from gradclip_jax._cli.outcomes import harness

STEPS = (0, 5, 10, 20, 40, 60, 80, 120, 160, 239)


def main(seed: int) -> None:
    for model, optimizer in (("transformer", "adamw"), ("lstm", "adam")):
        task = language_model_task(model, optimizer, 1, seed)
        logs = harness.run_task(task, [
            harness.Family("fixed", lambda c, task: gc.clip_by_global_norm(
                c, nonfinite="propagate"), {"no clip": harness.NO_CLIP}),
            harness.Family("start", lambda s, task: gc.percentile_clip(start=s),
                           {"start=0.25": 0.25, "start=0.1": 0.1}),
        ])
        print(f"## {model}, {optimizer}, seed {seed}: at steps {', '.join(map(str, STEPS))}\n")
        for policy, m in logs.items():
            for i, arm in enumerate(task.arms):
                norm, threshold = m["grad_norm"][i], m["threshold"][i]
                row = " ".join(f"{norm[s]:.2f}" for s in STEPS)
                print(f"{policy:11s} lr {arm.lr:<6g} norm      {row}")
                if policy != "no clip":
                    row = " ".join(f"{threshold[s]:.2f}" for s in STEPS)
                    print(f"{'':11s} {'':9s} threshold {row}   "
                          f"clipped {np.mean(norm > threshold):.0%}")
        print()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
