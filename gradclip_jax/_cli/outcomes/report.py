"""The outcomes benchmark's Markdown table, JSON and PNG plots."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from gradclip_jax._cli.outcomes.harness import CONTROL, DEFAULT, MEDIAN, REFERENCE

COLUMNS = ("lost", "final val loss", "vs c=1 (wins)", "vs best fixed c", "gap to best per lr",
           "steps clipped", "norm taken off", "loss spikes")


SUMMARY_POLICIES = ("no clip", "c=0.1", "c=1", "c=10", "AutoClip p10", "AutoClip p90", "ZClip",
                    DEFAULT, MEDIAN)


def summary(results: dict[str, Any]) -> str:
    """One row per scenario: each policy's mean final validation loss relative to the best
    fixed c in hindsight, with its lost runs."""
    cols = [p for p in SUMMARY_POLICIES if all(p in sc["rows"] for sc in results["scenarios"])]
    lines = ["| scenario | best fixed c | " + " | ".join(f"`{p}`" for p in cols) + " |",
             "|---" * (len(cols) + 2) + "|"]
    for sc in results["scenarios"]:
        cells = []
        for p in cols:
            r = sc["rows"][p]
            lost = f", {r['lost']} lost" if r["lost"] else ""
            text = f"{r['vs_best_fixed_pct']:+.1f}%{lost}"
            cells.append(f"**{text}**" if p == DEFAULT else text)
        lines.append(f"| {sc['key']} | {sc['best_fixed']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(results: dict[str, Any]) -> str:
    lines = [f"Training outcomes ({results['mode']}; jax {results['jax']}, optax "
             f"{results['optax']}, {results['backend']}). Every policy trains on the same "
             "initialisations and batches. *lost*: final validation loss not finite or above the "
             "initial one (a lost run counts at its initial loss in the means). *vs c=1*: paired "
             "mean difference of final validation loss, with the number of runs that end lower. "
             "*vs best fixed c*: mean final loss relative to the best of c in "
             "{0.1, 0.3, 1, 3, 10} for that scenario, chosen in hindsight, with a 95% "
             "paired-bootstrap interval over the runs (an interval that holds 0 is no measured "
             "difference). *gap to best per "
             "lr*: mean over learning rates of the distance to the best policy at that rate. "
             "*norm taken off*: the share of the sum of a run's unclipped norms that "
             "clipping removed (how much it cut the steps, where *steps clipped* says how "
             "often it acted), averaged over the runs. "
             "*loss spikes*: steps per run whose training loss is 3x the median of the 50 "
             "before.", "",
             "Mean final validation loss relative to the best fixed c in hindsight (lower is "
             "better), and runs lost:", "", summary(results)]
    for sc in results["scenarios"]:
        lines += ["", f"**{sc['key']}**: {sc['title']}; {sc['runs']} runs per policy "
                  f"({_rates(sc['lrs'])} x {sc['runs'] // len(sc['lrs'])} seeds), "
                  f"{sc['steps']} steps; best fixed c in hindsight: {sc['best_fixed']}", ""]
        lines.append("| policy | " + " | ".join(COLUMNS) + " |")
        lines.append("|---" * (len(COLUMNS) + 1) + "|")
        for name, r in sc["rows"].items():
            bold = "**" if name == DEFAULT else ""
            lines.append(
                f"| {bold}{name}{bold} | {r['lost']}/{r['runs']} | {r['final_val_mean']:.4f} | "
                f"{r['vs_c1']:+.4f} ({r['vs_c1_wins']}/{r['runs']}) | "
                f"{r['vs_best_fixed_pct']:+.2f}% {_interval(r)} | "
                f"{r['gap_to_best_per_lr']:.4f} | "
                f"{r['clipped_pct']:.1f}% | {r.get('taken_off_pct', float('nan')):.1f}% | "
                f"{r['loss_spikes']:.1f} |")
        skips = [f"`{n}` skipped {r['skipped_pct']:.1f}% of steps"
                 for n, r in sc["rows"].items() if r.get("skipped_pct", 0.0) > 0]
        if skips:
            lines += ["", "Skipped steps (zero update, optimizer state unchanged): "
                      + "; ".join(skips) + "."]
    lines += ["", verdict(results)]
    return "\n".join(lines)


def verdict(results: dict[str, Any]) -> str:
    """The default rule against the bar it is held to, scenario by scenario."""
    out = [f"`{DEFAULT}` against the bar:"]
    below_c1 = 0
    for sc in results["scenarios"]:
        r = sc["rows"][DEFAULT]
        ok_lost = r["lost"] == 0
        ok_best = r["vs_best_fixed_pct"] <= 2.0
        natural = "x100" not in sc["key"] and "x0.01" not in sc["key"]
        ok_c1 = (not natural) or r["vs_c1"] <= 0.0
        below_c1 += int(natural and r["vs_c1"] < 0.0)
        noise_pct = sc.get("noise_vs_best_pct")
        best_note = _fail_note(
            ok_best, r.get("vs_best_fixed_ci"), 2.0, "2%", "reaches", ".1f",
            noise=(None if noise_pct is None or r["vs_best_fixed_pct"] - 2.0 > noise_pct
                   else f"the noise control moved {noise_pct:.1f}% from c=1, more than the "
                        "excess"))
        marks = [f"lost {r['lost']}" + ("" if ok_lost else " (FAIL)"),
                 f"{r['vs_best_fixed_pct']:+.2f}% vs best fixed c" + best_note]
        if natural:
            noise_c1 = sc.get("noise_vs_c1")
            c1_note = _fail_note(
                ok_c1, r.get("vs_c1_ci"), 0.0, "0", "holds", ".4f",
                noise=(None if noise_c1 is None or abs(r["vs_c1"]) > noise_c1
                       else f"the noise control differs from c=1 by {noise_c1:.4f}, more "
                            "than this"))
            marks.append(f"{r['vs_c1']:+.4f} vs c=1" + c1_note)
        out.append(f"- {sc['key']}: " + ", ".join(marks))
    out.append(f"- lower than c=1 in {below_c1} natural-scale scenarios (the bar is 2)")
    noises = [f"{sc['key']} {sc['noise_vs_c1']:.4f}"
              + (f" ({sc['noise_vs_best_pct']:.1f}%)" if "noise_vs_best_pct" in sc else "")
              for sc in results["scenarios"] if "noise_vs_c1" in sc]
    if noises:
        out.append(f"- noise control (`{CONTROL}`: c = 1 + 2^-20 in a program of its own), "
                   "its distance from c=1 (in % of the best fixed c's loss): "
                   + ", ".join(noises))
    return "\n".join(out)


def _fail_note(ok: bool, ci: list[float] | None, bar: float, bar_text: str, verb: str,
               fmt: str, noise: str | None = None) -> str:
    """'' when a line is met; else says so, whether its interval still meets the bar, and
    ``noise`` (when the noise control moved further than the line was missed by)."""
    if ok:
        return ""
    text = f"FAIL: > {bar_text}"
    if ci is not None and ci[0] <= bar:
        text += f", but its 95% interval [{ci[0]:+{fmt}}, {ci[1]:+{fmt}}] {verb} {bar_text}"
    if noise is not None:
        text += f"; {noise}"
    return f" ({text})"


def _interval(row: dict[str, Any]) -> str:
    ci = row.get("vs_best_fixed_ci")
    return "" if ci is None else f"[{ci[0]:+.1f}, {ci[1]:+.1f}]"


def plots(results: dict[str, Any], logs: dict[str, dict[str, dict[str, np.ndarray]]],
          out: str) -> list[str]:
    """Per scenario: loss curves per policy, and one run's norm and threshold per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for sc in results["scenarios"]:
        task_logs = logs[sc["task"]]
        idx = np.asarray(sc["arm_index"])
        lrs = np.asarray(sc["arm_lr"])
        policies = [p for p in task_logs if p != CONTROL]
        fig, axes = plt.subplots(2, len(policies), figsize=(2.6 * len(policies), 5.6),
                                 sharex=True, squeeze=False, layout="constrained")
        # One learning rate for the norm panels: the highest at which c=1 lost no run.
        shown_lr = sc["lrs"][-1]
        for lr in sorted(sc["lrs"], reverse=True):
            runs = idx[lrs == lr]
            if np.all(np.isfinite(task_logs[REFERENCE]["val_loss"][runs, -1])):
                shown_lr = lr
                break
        shown = idx[lrs == shown_lr][0]
        for j, name in enumerate(policies):
            m = task_logs[name]
            ax = axes[0, j]
            for i in idx:
                curve = _smooth(m["train_loss"][i])
                ax.plot(curve, lw=0.7, alpha=0.7,
                        color=_lr_color(sc["lrs"], float(lrs[list(idx).index(i)])))
            ax.set_title(name, fontsize=9, fontweight="bold" if name == DEFAULT else None)
            ax.set_yscale("log")
            if j == 0:
                ax.set_ylabel("training loss (smoothed)")
            ax = axes[1, j]
            ax.semilogy(m["grad_norm"][shown], lw=0.6, color="0.3", label="unclipped norm")
            thr = np.where(np.isfinite(m["threshold"][shown]), m["threshold"][shown], np.nan)
            ax.semilogy(thr, lw=1.0, color="tab:red", label="threshold")
            ax.set_xlabel("step")
            if j == 0:
                ax.set_ylabel(f"norm at lr {shown_lr:g}, seed 0")
                ax.legend(fontsize=7, loc="upper right")
        fig.suptitle(sc["title"], fontsize=10)
        path = os.path.join(out, f"outcomes_{sc['key']}.png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


def _smooth(x: np.ndarray, k: int = 10) -> np.ndarray:
    x = np.where(np.isfinite(x), x, np.nan)
    if x.size < k:
        return x
    return np.convolve(x, np.ones(k) / k, mode="valid")


def _lr_color(lrs: list[float], lr: float):
    import matplotlib

    pos = lrs.index(lr) / max(len(lrs) - 1, 1)
    return matplotlib.colormaps["viridis"](pos)


def _rates(lrs: list[float]) -> str:
    if len(lrs) == 1:
        return f"peak learning rate {lrs[0]:g}"
    return f"{len(lrs)} learning rates"
