"""A clip + adam step at several commits, side by side in one run (the 10k MLP by default).

Run: ``JAX_PLATFORMS=cpu python benchmarks/compare_commits.py [--seconds S] [--dtype D]
[--mode loop|call|eager] [--tree WORD] REV [REV ...]``,
each ``REV`` a git revision of this repository, or ``.`` for the working tree.

Each revision's ``gradclip_jax`` is taken with ``git archive`` into a temporary directory and
imported under a name of its own (``gradclip_at_<n>``, its imports rewritten to match), so
that every revision's steps are compiled in one process and timed in one interleaved run:
machine load then moves them together, and the ratios compare code, not moments. The table
gives each step (the norm, value and percentile clips, chained with ``optax.adam``; 100
steps in a jitted loop, then one call per step; with ``--mode eager``, the step called without
``jax.jit``), and optax's clip the same way, over the first revision's norm clip step in
the same round, median over rounds and 95% interval, as ``gradclip-jax bench`` does. The
tiny model is where a clip's per-step scalar work shows most (item 3 of the speed issue).
"""

import argparse
import importlib
import pathlib
import re
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import optax

from gradclip_jax._cli import bench, shapes

LOOP = 100


def import_revision(rev: str, index: int, into: pathlib.Path):
    """``gradclip_jax`` at ``rev`` (``.``: the working tree), imported as its own package."""
    name = f"gradclip_at_{index}"
    root = pathlib.Path(__file__).resolve().parent.parent
    target = into / name
    if rev == ".":
        subprocess.run(["cp", "-r", str(root / "gradclip_jax"), str(target)], check=True)
    else:
        archive = subprocess.run(["git", "-C", str(root), "archive", rev, "gradclip_jax"],
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
        (into / "gradclip_jax").rename(target)
    for path in target.rglob("*.py"):
        path.write_text(re.sub(r"\bgradclip_jax\b", name, path.read_text()))
    return importlib.import_module(name)


MODES = ("loop", "call", "eager")
HOW = {"loop": f"{LOOP} steps in a jitted loop", "call": "one call per step",
       "eager": "one eager step per call (no jit)"}


def main(revs: list[str], seconds: float, dtype: str = "float32",
         modes: tuple[str, ...] = ("loop", "call"), tree: str = "MLP") -> None:
    with tempfile.TemporaryDirectory() as tmp:
        sys.path.insert(0, tmp)
        mods = {rev: import_revision(rev, i, pathlib.Path(tmp)) for i, rev in enumerate(revs)}
        (name, build), = bench.select_sets(shapes.shape_sets(quick=False), [tree]).items()
        params = build(jnp.dtype(dtype))
        for mode in modes:
            loop = LOOP if mode == "loop" else None
            fns = {}
            for rev, gc in mods.items():
                clips = [("norm clip", gc.clip_by_global_norm(1.0)),
                         ("value clip", gc.clip_by_value(1.0)),
                         ("percentile clip", gc.percentile_clip())]
                for kind, clip in clips:
                    run = bench._step_runner(optax.chain(clip, optax.adam(1e-3)), params, loop,
                                             eager=mode == "eager")
                    jax.block_until_ready(run())
                    fns[f"{kind} @ {rev}"] = run
            run = bench._step_runner(
                optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3)), params, loop,
                eager=mode == "eager")
            jax.block_until_ready(run())
            fns["optax.clip_by_global_norm"] = run
            times = bench.interleaved_times(fns, 50, budget_s=seconds)
            print(bench.side_by_side(times, f"norm clip @ {revs[0]}", loop or 1,
                                     f"{name}, {dtype}, {HOW[mode]}, jax {jax.__version__}"))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("revs", nargs="+", help="git revisions, or . for the working tree")
    parser.add_argument("--seconds", type=float, default=30.0,
                        help="timing budget per table (default 30)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="the MLP's parameter dtype (default float32)")
    parser.add_argument("--mode", action="append", choices=MODES,
                        help="how each step is timed (repeatable; default: loop and call): "
                        + "; ".join(f"{m}: {h}" for m, h in HOW.items())
                        )
    parser.add_argument("--tree", default="MLP", metavar="WORD",
                        help="the bench's shape set whose name contains WORD (default: MLP, "
                        "the 10k MLP); one set")
    args = parser.parse_args()
    main(args.revs, args.seconds, args.dtype, tuple(args.mode or ("loop", "call")), args.tree)
