"""Entry point of the ``gradclip-jax`` console script: ``demo`` and ``bench``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradclip-jax",
        description="Gradient clipping for JAX/Optax: see what clipping does to a run.",
    )
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

    bench = sub.add_parser(
        "bench",
        help="overhead of each clip transform chained with adam",
        description="Extra gradient passes (XLA cost analysis) and wall-clock ratios of each "
        "clip transform chained with adam, against adam alone and optax's clip.",
    )
    bench.add_argument("--quick", action="store_true", help="fewer sizes and repetitions")
    bench.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            from gradclip_jax._cli import demo

            return demo.main(quick=args.quick, out=args.out, seeds=args.seeds, steps=args.steps)
        from tqdm.auto import tqdm

        from gradclip_jax._cli import bench

        sizes = len(bench.SIZES_QUICK if args.quick else bench.SIZES_FULL) + 1
        with tqdm(total=sizes, desc="bench", unit="size") as bar:
            results = bench.run(quick=args.quick, json_path=args.json, progress=bar.update)
        print(bench.format_table(results))
        return 0
    except KeyboardInterrupt:
        print("interrupted; no partial output was left behind", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
