"""``gradclip-jax outcomes``: run every task, write the table, JSON and plots."""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import optax

from gradclip_jax._cli.bench import write_json_atomically
from gradclip_jax._cli.outcomes import harness, report, tasks


def main(*, quick: bool, out: str, only: list[str] | None = None,
         percentiles: tuple[float, ...] = (), windows: tuple[int, ...] = (),
         early_caps: tuple[int, ...] = (), starts: tuple[float, ...] = (),
         seeds: int | None = None,
         first_seed: int = 0, rates: tuple[float, ...] = ()) -> int:
    from tqdm.auto import tqdm

    names = only or list(tasks.TASKS)
    built = {n: tasks.TASKS[n](quick=quick, seeds=seeds, first_seed=first_seed)
             for n in names}
    if rates:
        every = sorted({a.lr for t in built.values() for a in t.arms})
        kept = {n: tasks.at_rates(t, rates) for n, t in built.items()}
        built = {n: t for n, t in kept.items() if t is not None}
        if not built:
            raise SystemExit(
                f"gradclip-jax outcomes: error: --lr {', '.join(f'{r:g}' for r in rates)}: no "
                f"run of {', '.join(names)} trains at that peak learning rate; the rates are "
                f"{', '.join(f'{r:g}' for r in every)}")
    os.makedirs(out, exist_ok=True)
    fams = harness.families(percentiles, windows, early_caps, starts)
    start = time.time()
    logs: dict[str, Any] = {}
    programs = sum(f.tasks is None or n in f.tasks for n in built for f in fams)
    with tqdm(total=programs, desc="outcomes", unit="program") as bar:
        for name, task in built.items():
            bar.set_postfix_str(name)
            logs[name] = harness.run_task(task, fams, progress=bar.update)
    results = summarize(built, logs, quick=quick, seconds=time.time() - start)
    text = report.markdown(results)
    with open(os.path.join(out, "outcomes.md"), "w") as f:
        f.write(text + "\n")
    write_json_atomically(os.path.join(out, "outcomes.json"), results)
    paths = report.plots(results, logs, out)
    print(text)
    print(f"\nwrote {out}/outcomes.md, outcomes.json and {len(paths)} plots "
          f"({results['seconds']:.0f} s of training)")
    return 0


def summarize(built: dict[str, tasks.Task], logs: dict[str, Any], *, quick: bool,
              seconds: float) -> dict[str, Any]:
    scenarios = []
    for name, task in built.items():
        for sc in task.scenarios:
            m = harness.scenario_metrics(task, logs[name], sc.arms)
            index = [i for i, a in enumerate(task.arms) if sc.arms(a)]
            scenarios.append({
                "key": sc.key, "title": sc.title, "task": name, "steps": task.steps,
                "runs": len(index), "arm_index": index,
                "arm_lr": [task.arms[i].lr for i in index],
                "arm_seed": [task.arms[i].seed for i in index], **m,
            })
    return {"mode": "quick" if quick else "full", "jax": jax.__version__,
            "optax": optax.__version__, "backend": jax.default_backend(),
            "seconds": round(seconds, 1), "scenarios": scenarios}
