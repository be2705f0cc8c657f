"""Joins ``gradclip-jax outcomes --start 0.25`` runs made before 0.2.0 into the table of 0.2.0.

Run: ``python benchmarks/relabel_outcomes.py OUT_DIR RUN.json [RUN.json ...]``. Before 0.2.0,
``percentile_clip()`` had no start, and ``--start 0.25`` trained ``percentile_clip(start=0.25)``
beside it; that is today's ``percentile_clip()``, and the old default is today's
``percentile_clip(start=None)``, the benchmark's *median* policy. This renames the rows of such
runs to today's policy names (and the classic rule's and the guarded policy's, which had no
start), puts them in today's order and writes ``outcomes.md`` and ``outcomes.json`` with the
benchmark's own report code. Nothing is recomputed: every figure is the run's. The old
``percentile_clip(start=0.25)`` was trained with its start traced (a variant of a family), today's
default with it constant: the same rule, in programs that differ by rounding. The guarded
policy of the LSTM's spikes scenario is the old default's inside ``skip_spikes``
(``percentile_clip(start=None) + skip_spikes``), not today's.
"""

from __future__ import annotations

import json
import os
import sys

from gradclip_jax._cli.bench import write_json_atomically
from gradclip_jax._cli.outcomes import harness, report

RENAME = {
    "percentile_clip(start=0.25)": harness.DEFAULT,
    "percentile_clip()": harness.MEDIAN,
    "percentile_clip() + skip_spikes": "percentile_clip(start=None) + skip_spikes",
    "percentile_clip(90, window=None)": harness.CLASSIC,
}


def relabel(scenario: dict) -> dict:
    rows = {RENAME.get(name, name): row for name, row in scenario["rows"].items()}
    if harness.DEFAULT not in rows or harness.MEDIAN not in rows:
        raise SystemExit(f"{scenario['key']}: not a run with --start 0.25 before 0.2.0")
    first = [harness.DEFAULT, harness.MEDIAN]
    order = [n for n in rows if n not in first and n != harness.CONTROL]
    # Today's order: the fixed thresholds and the published rules, the default, the median,
    # the classic rule and the guarded policy, the noise control last.
    at = next(i for i, n in enumerate(order) if n == "ZClip") + 1
    order = order[:at] + first + order[at:] + [harness.CONTROL]
    return {**scenario, "rows": {n: rows[n] for n in order}}


def main(out: str, paths: list[str]) -> None:
    runs = [json.load(open(p)) for p in paths]
    first = runs[0]
    results = {k: first[k] for k in ("mode", "jax", "optax", "backend")}
    results["seconds"] = sum(r["seconds"] for r in runs)
    results["scenarios"] = [relabel(s) for r in runs for s in r["scenarios"]]
    os.makedirs(out, exist_ok=True)
    sources = ", ".join(os.path.basename(os.path.dirname(os.path.abspath(p))) + "/"
                        + os.path.basename(p) for p in paths)
    note = (f"Joined by `benchmarks/relabel_outcomes.py` from runs of `gradclip-jax outcomes "
            f"--start 0.25` made before 0.2.0 ({sources}), their rows renamed to today's "
            "policies: `percentile_clip()` is the run's `percentile_clip(start=0.25)`, "
            "trained in a program that differs from today's default's by rounding (in a "
            "--quick run the transformer's and the LSTM's final losses agree to 1e-6; the "
            "RNN's, chaotic, move as the noise control does); `percentile_clip(start=None)` "
            "is the run's `percentile_clip()`, bit for bit today's. Nothing is recomputed.")
    with open(os.path.join(out, "outcomes.md"), "w") as f:
        f.write(note + "\n\n" + report.markdown(results) + "\n")
    write_json_atomically(os.path.join(out, "outcomes.json"), results)
    print(report.summary(results))
    print(report.verdict(results))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
