"""Entry point of the ``gradclip-jax`` console script: ``demo``, ``outcomes`` and ``bench``."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence
from typing import Any


def _checked(text: str, convert: Callable[[str], Any], ok: Callable[[Any], bool],
             what: str) -> Any:
    """``convert(text)``, or an argparse error naming ``what`` was expected and what came."""
    try:
        value = convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"expected {what}, got {value:g}")
    return value


def _positive_int(text: str) -> int:
    return _checked(text, int, lambda v: v >= 1, "a positive integer")


def _non_negative_int(text: str) -> int:
    return _checked(text, int, lambda v: v >= 0, "an integer >= 0")


def _positive_float(text: str) -> float:
    return _checked(text, float, lambda v: v > 0.0 and math.isfinite(v),
                    "a finite number > 0")


def _fraction(text: str) -> float:
    return _checked(text, float, lambda v: 0.0 < v <= 1.0, "a number in (0, 1]")


def _percentile(text: str) -> float:
    value = _checked(text, float, lambda v: 0.0 < v <= 100.0, "a percentile in (0, 100]")
    # The variants are built with a traced percentile, which percentile_clip cannot check.
    from gradclip_jax._validation import warn_if_quantile

    warn_if_quantile("--percentile", value, stacklevel=2)
    return value


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("gradclip-jax")
    except metadata.PackageNotFoundError:
        return "0.0.0+unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradclip-jax",
        description="Gradient clipping for JAX/Optax: see what clipping does to a run.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser(
        "demo",
        help="train a vanilla RNN on the adding problem under each clipping policy",
        description="Trains a small vanilla RNN on the adding problem across several seeds "
        "(vmapped) with no clipping, value clipping, norm clipping at 0.1, 1 and 10 and the "
        "percentile clip; prints a table and writes PNG plots.",
    )
    demo.add_argument("--quick", action="store_true",
                      help="600 steps instead of 1500: a smoke run, too short to compare losses")
    demo.add_argument("--out", default="gradclip-demo", help="folder for the plots and "
                      "results.json (default: %(default)s)")
    demo.add_argument("--seeds", type=_positive_int, help="number of seeds")
    demo.add_argument("--steps", type=_positive_int, help="optimizer steps per run")

    outcomes = sub.add_parser(
        "outcomes",
        help="judge every clipping policy on real training runs (transformer, LSTM, RNN)",
        description="Trains a byte-level transformer LM (Flax NNX), an LSTM LM and a vanilla "
        "RNN under no clipping, fixed thresholds, AutoClip, ZClip and the percentile clip, "
        "paired by seed and vmapped over learning rates and seeds; writes a Markdown table, "
        "JSON and PNG plots. About 2 min with --quick, up to 45 min in full on 2 CPU cores.",
    )
    outcomes.add_argument("--quick", action="store_true",
                          help="small models (a 1-layer transformer) and short runs: a smoke run "
                          "for CI")
    outcomes.add_argument("--out", default="gradclip-outcomes",
                          help="folder for outcomes.md, outcomes.json and the plots "
                          "(default: %(default)s)")
    outcomes.add_argument("--task", action="append", choices=["transformer", "lstm", "rnn"],
                          help="run only this task (repeatable)")
    outcomes.add_argument("--percentile", action="append", type=_percentile, default=[],
                          metavar="P", help="also train percentile_clip(P), a variant of the "
                          "default, beside the other policies (repeatable)")
    outcomes.add_argument("--window", action="append", type=_positive_int, default=[],
                          metavar="W", help="also train percentile_clip(window=W) (repeatable)")
    outcomes.add_argument("--early-cap", action="append", type=_positive_int, default=[],
                          metavar="N", help="also train percentile_clip(start=None) capped at "
                          "c = 1 for its first N steps (repeatable)")
    outcomes.add_argument("--start", action="append", type=_fraction, default=[],
                          metavar="S", help="also train percentile_clip(start=S), whose first "
                          "threshold is S times the first norm (repeatable)")
    outcomes.add_argument("--seeds", type=_positive_int, metavar="N",
                          help="seeds per learning rate in every task (default: 6 for the "
                          "transformer, 3 for the LSTM, 24 for the RNN; 2 with --quick). Runs "
                          "of one program are chaotic: more seeds narrow the intervals, and "
                          "the time grows in proportion")
    outcomes.add_argument("--first-seed", type=_non_negative_int, default=0, metavar="S",
                          help="seeds S..S+N-1 instead of 0..N-1: a second, independent set "
                          "of runs to check a result on (default 0)")
    outcomes.add_argument("--lr", action="append", type=_positive_float, default=[],
                          metavar="LR", help="train only the runs at this peak learning rate "
                          "(repeatable; with --seeds, many seeds at the rate where runs are "
                          "lost, for example --task rnn --lr 0.3 --seeds 240)")

    bench = sub.add_parser(
        "bench",
        help="overhead of each clip transform chained with adam, on every shape set",
        description="Extra gradient passes (XLA cost analysis) and wall-clock ratios of each "
        "clip transform chained with adam, against adam alone and optax's clip, on odd leaf "
        "lengths, GPT-2, ResNet-50 and LSTM trees, a thousand tiny leaves, one huge leaf "
        "and a tiny MLP, in float32 and bfloat16. Ends with the slowest ratio.",
    )
    bench.add_argument("--quick", action="store_true",
                       help="smaller versions of each tree and fewer repetitions")
    bench.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    bench.add_argument("--seconds", type=_positive_float, metavar="S",
                       help="time every tree for at least S seconds of rounds (default 3; "
                       "0.5 with --quick): steps of 200 ms or more get few rounds in 3 s, "
                       "and more rounds narrow their intervals")
    bench.add_argument("--optimizer", choices=("adam", "adamw"), default="adam",
                       help="the optimizer every clip is chained with, and whose step alone "
                       "is the baseline (default adam)")
    bench.add_argument("--only", action="append", default=[], metavar="WORD",
                       help="bench only the shape sets whose name contains WORD "
                       "(repeatable, case-insensitive; for example --only GPT-2 --only 100M)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            from gradclip_jax._cli import demo

            return demo.main(quick=args.quick, out=args.out, seeds=args.seeds, steps=args.steps)
        if args.command == "outcomes":
            from gradclip_jax._cli.outcomes import run

            return run.main(quick=args.quick, out=args.out, only=args.task,
                            percentiles=tuple(args.percentile),
                            windows=tuple(args.window),
                            early_caps=tuple(args.early_cap), starts=tuple(args.start),
                            seeds=args.seeds,
                            first_seed=args.first_seed, rates=tuple(args.lr))
        import jax
        from tqdm.auto import tqdm

        from gradclip_jax._cli import bench, shapes

        accelerator = jax.default_backend() != "cpu"
        sets = bench.select_sets(shapes.shape_sets(quick=args.quick, accelerator=accelerator),
                                 args.only)
        with tqdm(total=bench.steps_per_run(args.quick, sets), desc="bench",
                  unit="tree") as bar:
            results = bench.run(quick=args.quick, json_path=args.json, progress=bar.update,
                                sets=sets, budget_s=args.seconds, optimizer=args.optimizer)
        print(bench.format_table(results))
        return 0
    except KeyboardInterrupt:
        print("interrupted; no partial output was left behind", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
