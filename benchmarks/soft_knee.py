"""Exploratory: the default's threshold with a soft knee instead of a hard cut.

Run: ``JAX_PLATFORMS=cpu python benchmarks/soft_knee.py --task rnn [--seeds N] [--first-seed S]
[--only sgd|momentum] [--knee ALPHA,CAP ...]`` (the RNN's 192 runs per policy: about 15 min on
2 CPU cores). It prints, per scenario, the benchmark's figures for the fixed thresholds, the
default and each knee, with the final validation loss at each learning rate.

With momentum the default costs progress: it cuts about every other step to the median of the
recent norms, which at low learning rates works as a further cut of the learning rate. A knee
keeps the default's threshold ``c`` (and so which steps it changes) but cuts those steps less:
a step of norm ``n > c`` leaves with norm ``min(c * (n / c) ** alpha, cap * c)``; ``alpha = 0``,
``cap = 1`` is the default's hard cut. A spike is still cut to at most ``cap * c``. Not library
API. Measured (README, "The RNN with momentum"): the knee helped the RNN with momentum and cost
the LSTM, with Adam, the default's lead over every fixed threshold, so it is not the default.
Reproduce with ``--task rnn --knee 0.5,2 --knee 0.5,1.5`` (add ``--seeds 48 --first-seed 100
--only momentum`` or ``--only sgd`` for the second set of seeds) and ``--task lstm``.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from gradclip_jax import _core
from gradclip_jax._apply import Rescale
from gradclip_jax._cli.outcomes import harness, tasks
from gradclip_jax._percentile import PercentileRule


def knee_norm(n, c, alpha: float, cap: float, xp=jnp):
    """The norm a step of norm ``n > c`` leaves with: ``min(c (n/c)^alpha, cap c)`` (``xp``:
    jax.numpy in the clip, numpy in the figures)."""
    return xp.minimum(c * (n / c) ** alpha, cap * c)


@dataclasses.dataclass(frozen=True)
class Knee(Rescale):
    """Rescales a step of norm ``n`` above the threshold ``c`` to ``knee_norm(n, c)``."""

    alpha: float = 0.5
    cap: float = 2.0

    def factor(self, threshold: jax.Array, measured: jax.Array) -> jax.Array:
        out = knee_norm(measured, threshold, self.alpha, self.cap)
        return jnp.where(measured > threshold, out / measured, 1.0)


def knee_clip(alpha: float, cap: float):
    return _core.clip_transformation(PercentileRule(), Knee(2, alpha, cap))


def knee_family(alpha: float, cap: float) -> harness.Family:
    return harness.Family(f"knee {alpha:g},{cap:g}", lambda _, task: knee_clip(alpha, cap),
                          {f"knee alpha={alpha:g} cap={cap:g}": 0.0})


def taken_off(norm: np.ndarray, threshold: np.ndarray, alpha: float, cap: float) -> float:
    """Mean over runs of the share of the summed unclipped norm the knee took off: the
    benchmark's share, with each clipped step's threshold replaced by the norm it left with."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        left = np.where(norm > threshold, knee_norm(norm, threshold, alpha, cap, np), threshold)
    return 100.0 * float(np.mean(harness.taken_off(norm, left, np.isfinite(norm))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=list(tasks.TASKS), default="rnn")
    parser.add_argument("--seeds", type=int)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--only", choices=["sgd", "momentum"],
                        help="the RNN's plain-SGD or momentum runs only")
    parser.add_argument("--knee", action="append", default=[], metavar="ALPHA,CAP")
    args = parser.parse_args()
    knees = [tuple(float(x) for x in k.split(",")) for k in args.knee] or [(0.5, 2.0)]

    task = tasks.TASKS[args.task](quick=False, seeds=args.seeds, first_seed=args.first_seed)
    if args.only is not None:
        keep = (lambda a: a.momentum > 0) if args.only == "momentum" else (
            lambda a: a.momentum == 0)
        task = dataclasses.replace(task, arms=tuple(a for a in task.arms if keep(a)))
    # The benchmark's own fixed thresholds and default, and its noise control.
    fams = [f for f in harness.families() if f.name in ("fixed", "default", "control")]
    fams += [knee_family(a, c) for a, c in knees]
    start = time.time()
    logs = harness.run_task(task, fams)
    print(f"{task.name}: {len(task.arms)} runs per policy, trained in "
          f"{time.time() - start:.0f} s")
    for sc in task.scenarios:
        idx = [i for i, a in enumerate(task.arms) if sc.arms(a)]
        if not idx:
            continue
        m = harness.scenario_metrics(task, logs, sc.arms)
        lr = np.array([task.arms[i].lr for i in idx])
        print(f"\n{sc.key}: best fixed {m['best_fixed']}; final loss per learning rate "
              f"{', '.join(f'{r:g}' for r in m['lrs'])}")
        for p, r in m["rows"].items():
            sub = {k: v[idx] for k, v in logs[p].items()}
            finals = harness.final_val(sub)
            per = " ".join(f"{finals[lr == r0].mean():.4f}" for r0 in m["lrs"])
            off = r["taken_off_pct"]
            for a, c in knees:
                if p == f"knee alpha={a:g} cap={c:g}":
                    off = taken_off(sub["grad_norm"], sub["threshold"], a, c)
            lo, hi = r["vs_best_fixed_ci"]
            print(f"  {p:28s} lost {r['lost']:3d}  vs best fixed {r['vs_best_fixed_pct']:+7.2f}% "
                  f"[{lo:+.1f}, {hi:+.1f}]  vs c=1 {r['vs_c1']:+.4f}  clipped "
                  f"{r['clipped_pct']:5.1f}%  off {off:5.1f}%  | {per}")


if __name__ == "__main__":
    main()
