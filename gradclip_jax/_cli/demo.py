"""``gradclip-jax demo``: the exploding-gradient experiment, with a table and plots."""

from __future__ import annotations

import dataclasses
import os
import tempfile
from typing import Any

import numpy as np

from gradclip_jax._cli.bench import write_json_atomically
from gradclip_jax.examples import rnn

QUICK = dict(steps=600)


def config(name: str, *, quick: bool, seeds: int | None, steps: int | None) -> rnn.Config:
    overrides = dict(QUICK) if quick else {}
    overrides.update({k: v for k, v in dict(seeds=seeds, steps=steps).items() if v is not None})
    return rnn.scenario(name, **overrides)


def summarize(cfg: rnn.Config, results: dict[str, rnn.Result]) -> list[dict[str, Any]]:
    rows = []
    for name, r in results.items():
        diverged = r.diverged(cfg)
        final = r.final_loss()
        kept = final[~diverged]
        rows.append({
            "policy": name,
            "diverged": int(diverged.sum()),
            "seeds": int(cfg.seeds),
            "final_loss_median": float(np.median(final)) if np.all(np.isfinite(final))
            else float("nan"),
            "final_loss_kept_mean": float(np.mean(kept)) if kept.size else float("nan"),
            "clipped_fraction": float(r.clipped.mean()),
        })
    return rows


def mean_final_loss(row: dict[str, Any]) -> float:
    """A policy's mean final loss over all seeds; infinite if any seed diverged."""
    return row["final_loss_kept_mean"] if row["diverged"] == 0 else float("inf")


def compare(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The percentile clip against the best fixed norm threshold chosen in hindsight."""
    by_name = {r["policy"]: r for r in rows}
    fixed = {f"norm clip {c}": mean_final_loss(by_name[f"norm clip {c}"])
             for c in rnn.FIXED_NORMS}
    best = min(fixed, key=fixed.get)
    adaptive = by_name["percentile clip"]
    return {
        "best_fixed": best,
        "best_fixed_loss": fixed[best],
        "percentile_loss": mean_final_loss(adaptive),
        "percentile_diverged": adaptive["diverged"],
        "ratio": mean_final_loss(adaptive) / fixed[best],
    }


def format_comparison(c: dict[str, Any], seeds: int) -> str:
    return (f"percentile clip (defaults) vs the best fixed norm clip in hindsight "
            f"({c['best_fixed']}): mean final loss {c['percentile_loss']:.4f} vs "
            f"{c['best_fixed_loss']:.4f} ({c['ratio']:.2f}x), {c['percentile_diverged']} of "
            f"{seeds} seeds lost")


def format_table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'policy':18s} {'diverged':>9s} {'final loss (median)':>20s} "
            f"{'final loss (kept seeds)':>24s} {'steps clipped':>14s}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['policy']:18s} {r['diverged']:>4d} / {r['seeds']:<2d} "
            f"{r['final_loss_median']:20.4g} {r['final_loss_kept_mean']:24.4f} "
            f"{r['clipped_fraction']:14.1%}"
        )
    return "\n".join(lines)


def _save_figure(fig: Any, path: str) -> None:
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=os.path.dirname(path) or ".")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def plot(cfg: rnn.Config, results: dict[str, rnn.Result], out: str, tag: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.arange(cfg.steps)
    paths = []

    fig, axes = plt.subplots(1, len(results), figsize=(4 * len(results), 3.4), sharey=True)
    for ax, (name, r) in zip(np.atleast_1d(axes), results.items(), strict=True):
        diverged = r.diverged(cfg)
        for seed in range(cfg.seeds):
            ax.plot(steps, np.clip(r.loss[seed], 1e-3, 1e3), lw=0.8,
                    color="tab:red" if diverged[seed] else "tab:blue", alpha=0.6)
        ax.axhline(1 / 6, color="grey", ls=":", lw=1, label="predict the mean")
        ax.set_yscale("log")
        ax.set_title(f"{name}\n{diverged.sum()} of {cfg.seeds} seeds diverged (red)")
        ax.set_xlabel("step")
    np.atleast_1d(axes)[0].set_ylabel("training loss (MSE)")
    np.atleast_1d(axes)[0].legend(loc="lower left", fontsize=8)
    fig.suptitle(f"Vanilla RNN on the adding problem, plain SGD: {rnn.SCENARIOS[tag]}", y=1.08)
    paths.append(os.path.join(out, f"loss_curves_{tag}.png"))
    _save_figure(fig, paths[-1])
    plt.close(fig)

    fig, axes = plt.subplots(len(results), 1, figsize=(10, 2.3 * len(results)), sharex=True,
                             layout="constrained")
    for ax, (name, r) in zip(np.atleast_1d(axes), results.items(), strict=True):
        # A diverged seed where the policy lost one (that is what it looks like); otherwise
        # the seed with the largest spike.
        diverged = r.diverged(cfg)
        if diverged.any():
            seed = int(np.argmax(diverged))
        else:
            seed = int(np.argmax(np.nan_to_num(r.grad_norm.max(axis=1))))
        norm = np.where(np.isfinite(r.grad_norm[seed]), r.grad_norm[seed], np.nan)
        ax.plot(steps, norm, lw=0.7, color="tab:blue", label="unclipped norm")
        threshold = r.threshold[seed]
        finite = np.isfinite(threshold)
        if finite.any():
            # A value clip's threshold bounds each coordinate; it is not a norm.
            label = "bound per coordinate" if name.startswith("value") else "threshold"
            ax.plot(steps[finite], threshold[finite], color="tab:orange", lw=1.2, label=label)
        clipped = r.clipped[seed].astype(bool)
        ax.scatter(steps[clipped], norm[clipped], s=4, color="tab:red", label="clipped", zorder=3)
        ax.set_yscale("log")
        ax.set_ylabel("global norm")
        fate = "diverged" if diverged[seed] else "kept"
        ax.set_title(f"{name} (seed {seed}, {fate}): {clipped.mean():.0%} of steps clipped",
                     fontsize=10, loc="left")
        # Outside the axes, so that it never covers a spike.
        ax.legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=7, frameon=False)
    np.atleast_1d(axes)[-1].set_xlabel("step")
    fig.suptitle(f"Gradient norm, threshold and clip events ({tag})")
    paths.append(os.path.join(out, f"grad_norms_{tag}.png"))
    _save_figure(fig, paths[-1])
    plt.close(fig)
    return paths


def main(*, quick: bool, out: str, seeds: int | None, steps: int | None) -> int:
    from tqdm.auto import tqdm

    os.makedirs(out, exist_ok=True)
    configs = {name: config(name, quick=quick, seeds=seeds, steps=steps) for name in rnn.SCENARIOS}
    policies = {name: rnn.policies(cfg) for name, cfg in configs.items()}
    runs = [(name, policy) for name in configs for policy in policies[name]]
    results: dict[str, dict[str, rnn.Result]] = {name: {} for name in configs}
    for name, policy in tqdm(runs, desc="training", unit="run"):
        results[name][policy] = rnn.train(configs[name], policies[name][policy])

    summary, paths = {}, []
    for name, cfg in configs.items():
        rows = summarize(cfg, results[name])
        comparison = compare(rows)
        summary[name] = {"config": dataclasses.asdict(cfg), "policies": rows,
                         "comparison": comparison}
        print(f"\n[{name}] {rnn.SCENARIOS[name]}; vanilla RNN, adding problem (length "
              f"{cfg.seq_len}), {cfg.seeds} seeds x {cfg.steps} steps")
        print(format_table(rows))
        print(format_comparison(comparison, cfg.seeds))
        if quick:
            print("  (--quick: the runs stop before they have learned the task, so the final "
                  "losses above say little; run without --quick to compare them)")
        paths += plot(cfg, results[name], out, name)
    paths.append(os.path.join(out, "results.json"))
    write_json_atomically(paths[-1], summary)
    print("\nwrote " + ", ".join(paths))
    return 0
