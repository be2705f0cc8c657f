"""A start that follows the recent norms up (exploratory; not library API).

Run: ``JAX_PLATFORMS=cpu python benchmarks/start_follows.py MODEL-OPT|rnn-adam [SEEDS]
[FIRST_SEED]`` (the tasks of ``start_by_optimizer.py``; about 8 min for 6 seeds of the
transformer on 2 CPU cores, and for 24 of the vanilla RNN with Adam).
``percentile_clip(start=s)`` took its first threshold from the first norm; where the norms
rise after the first steps (the LSTM LM), that capped them far below their level for most of
the run (``start_norms.py``). The variant trained here, *follow s*, is the same rule but, while
the start lasts, its threshold is never below ``s`` times the median of the recent norms: the
start's level is taken from the norms as they rise, and as they fall it is the start's. It is
trained beside c = 1, the noise control, the default and the starts of 0.25 and 0.1.
"""

import dataclasses
import sys
import time

import jax.numpy as jnp
import numpy as np
from start_by_optimizer import (
    LANGUAGE_MODELS,
    TRANSFORMER_OPTIMIZERS,
    _fixed,
    adam_task,
    language_model_task,
    table,
)

import gradclip_jax as gc
from gradclip_jax import _core
from gradclip_jax._apply import Rescale
from gradclip_jax._cli.outcomes import harness
from gradclip_jax._percentile import START_END_MULTIPLE, PercentileRule
from gradclip_jax._sketch import sketch_quantiles


@dataclasses.dataclass(frozen=True)
class FollowingStart(PercentileRule):
    """``PercentileRule`` whose start is never below ``start`` x the recent median."""

    def threshold(self, state: _core.ClipState) -> jnp.ndarray:
        value = super().threshold(state)
        hist = state.histogram
        recent_median, median = sketch_quantiles((state.recent, hist), (0.5, 0.5))
        adaptive = jnp.minimum(recent_median, 4.0 * median)
        warmup = jnp.maximum(self.warmup_steps, 1)
        start = jnp.asarray(self.start, jnp.float32)
        had_threshold = state.threshold < _core.NO_THRESHOLD
        starting = (had_threshold & (state.clipped_steps >= hist.count - warmup)
                    & (start * adaptive <= START_END_MULTIPLE * state.threshold))
        return jnp.where(starting, jnp.maximum(value, start * recent_median), value)


def following(start: float):
    return _core.clip_transformation(FollowingStart(start=start), Rescale(2),
                                     nonfinite="zero", axis_name=None,
                                     relative_accuracy=0.01, norm_range=(1e-8, 1e8), name=None)


def main(part: str, seeds: int, first_seed: int) -> None:
    model, _, name = part.partition("-")
    if part == "rnn-adam":
        task = adam_task(seeds, first_seed)
    elif model in LANGUAGE_MODELS and name in TRANSFORMER_OPTIMIZERS:
        task = language_model_task(model, name, seeds, first_seed)
    else:
        raise SystemExit(f"part must be rnn-adam or MODEL-OPT with MODEL one of "
                         f"{LANGUAGE_MODELS} and OPT one of {sorted(TRANSFORMER_OPTIMIZERS)}, "
                         f"got {part!r}")
    fams = [
        _fixed({"c=1": 1.0}),
        harness.Family("default", lambda p, task: gc.percentile_clip(), {harness.DEFAULT: 0.0}),
        harness.Family("start", lambda s, task: gc.percentile_clip(start=s),
                       {f"percentile_clip(start={s:g})": s for s in (0.25, 0.1)}),
        harness.Family("follow", lambda s, task: following(s),
                       {f"follow {s:g}": s for s in (0.25, 0.1)}),
    ]
    began = time.time()
    logs = harness.run_task(task, fams)
    print(f"seeds {first_seed}..{first_seed + seeds - 1}, trained in "
          f"{time.time() - began:.0f} s\n")
    table(f"{model}, {name}, warmup + cosine", logs, np.array([a.lr for a in task.arms]),
          list(range(len(task.arms))))


if __name__ == "__main__":
    args = sys.argv[1:]
    seeds = int(args[1]) if len(args) > 1 else (24 if args[0] == "rnn-adam" else 6)
    main(args[0], seeds, int(args[2]) if len(args) > 2 else 0)
