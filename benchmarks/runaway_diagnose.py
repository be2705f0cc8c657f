"""Does ``diagnose`` tell a percentile clip's diverging run from the runs it keeps?

Run: ``JAX_PLATFORMS=cpu python benchmarks/runaway_diagnose.py [--seeds 240] [--first-seed 200]
[--lr 0.3]`` (about 3 min on 2 CPU cores), or with ``--task transformer|lstm|rnn [--seeds N]``
for every arm of that outcomes task instead. It prints a Markdown table.

At the highest learning rate of the outcomes benchmark's vanilla RNN with plain SGD, the
default loses a few runs in a few hundred: their norms grow a thousandfold and more while
nearly every step is clipped, and the threshold follows them up. This trains that arm with the
default and the fixed thresholds c = 0.3 and c = 1 (paired by seed, the benchmark's own task
and harness), then feeds each run's logged norms through the same clip again, which rebuilds
its state (a clip's state depends on the norms alone), and calls ``diagnose`` on it every 25
steps: how many lost runs its runaway warning flagged, when first, and how many kept runs it
flagged at any point. The fixed thresholds are never flagged (their threshold does not follow
the norms); they are here for the runs lost. With ``--task``, the task's every arm (all its
scenarios, learning rates and loss scales) with the default, the median rule and, on the RNN,
the classic rule: how often the warning fires on runs that end well.
"""

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

import gradclip_jax as gc
from gradclip_jax._cli.outcomes import harness, tasks
from gradclip_jax._diagnostics import NEARLY_ALL

EVERY = 25
CLIPS = {"c=0.3": lambda: gc.clip_by_global_norm(0.3),
         "c=1": lambda: gc.clip_by_global_norm(1.0),
         harness.DEFAULT: gc.percentile_clip,
         harness.MEDIAN: lambda: gc.percentile_clip(start=None),
         harness.CLASSIC: lambda: gc.percentile_clip(90.0, window=None, start=None)}
"""The clip each policy trained with, to rebuild its state from the logged norms."""


def flagged(make, norms: np.ndarray) -> np.ndarray:
    """Per run, the first step (a multiple of ``EVERY``) after which ``diagnose`` warned that
    the norms run away; -1 for none."""
    tx = make()

    def step(state, norm):
        return tx.update({"w": norm[None]}, state)[1], None

    chunk = jax.jit(jax.vmap(lambda s, n: jax.lax.scan(step, s, n)[0]))
    state = jax.vmap(lambda _: tx.init(None))(jnp.arange(norms.shape[0]))
    first = np.full(norms.shape[0], -1)
    for start in range(0, norms.shape[1], EVERY):
        state = chunk(state, jnp.asarray(norms[:, start:start + EVERY], jnp.float32))
        # The warning needs nearly every recent step clipped: diagnose only those runs.
        rate = np.asarray(state.clip_rate_recent)
        for i in np.flatnonzero((first < 0) & (rate >= NEARLY_ALL)):
            one = jax.tree.map(lambda x, i=i: x[i], state)
            if any("running away" in f.message for f in gc.diagnose(one)):
                first[i] = start + EVERY
    return first


def table(title: str, logs: dict, runs: np.ndarray) -> None:
    print(f"{title}\n")
    print("| policy | runs lost | lost runs flagged | first flagged at step | kept runs "
          "flagged (at any step) |")
    print("|---|---|---|---|---|")
    for name, m in logs.items():
        lost = harness.lost(m)[runs]
        first = flagged(CLIPS[name], m["grad_norm"][runs])
        print(f"| `{name}` | {lost.sum()} of {lost.size} | {(first[lost] >= 0).sum()} | "
              f"{', '.join(str(x) for x in first[lost & (first >= 0)]) or '-'} | "
              f"{(first[~lost] >= 0).sum()} of {(~lost).sum()} |")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", choices=sorted(tasks.TASKS))
    parser.add_argument("--seeds", type=int)
    parser.add_argument("--first-seed", type=int, default=None)
    parser.add_argument("--lr", type=float, default=0.3)
    args = parser.parse_args()
    start = time.time()
    if args.task is None:
        seeds = args.seeds or 240
        first_seed = 200 if args.first_seed is None else args.first_seed
        task = tasks.rnn(quick=False, seeds=seeds, first_seed=first_seed)
        task = dataclasses.replace(task, arms=tuple(
            a for a in task.arms if a.momentum == 0.0 and a.lr == args.lr))
        fams = [harness.Family("fixed", lambda c, t: gc.clip_by_global_norm(
                    c, nonfinite="propagate"), {"c=0.3": 0.3, "c=1": 1.0}),
                harness.Family("default", lambda p, t: gc.percentile_clip(),
                               {harness.DEFAULT: 0.0})]
        logs = harness.run_task(task, fams)
        table(f"Plain SGD at lr {args.lr:g} on the vanilla RNN, seeds {first_seed}-"
              f"{first_seed + seeds - 1}: {seeds} runs per policy, trained in "
              f"{time.time() - start:.0f} s; diagnose called every {EVERY} steps on each "
              "run's clip state", logs, np.arange(len(task.arms)))
        return
    task = tasks.TASKS[args.task](quick=False, seeds=args.seeds,
                                  first_seed=args.first_seed or 0)
    fams = [f for f in harness.families() if f.name in ("default", "median", "classic")]
    logs = harness.run_task(task, fams)
    print(f"Task {args.task}, trained in {time.time() - start:.0f} s; diagnose called every "
          f"{EVERY} steps on each run's clip state\n")
    for scenario in task.scenarios:
        runs = np.flatnonzero([scenario.arms(a) for a in task.arms])
        table(f"**{scenario.key}**: {scenario.title}", logs, runs)


if __name__ == "__main__":
    main()
