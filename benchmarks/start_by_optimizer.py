"""``percentile_clip(start=0.25)`` against the median rule without a start (the default before
0.2.0, *the default* below), by optimizer, on the vanilla RNN.

Run: ``JAX_PLATFORMS=cpu python benchmarks/start_by_optimizer.py adam|sgd [SEEDS] [FIRST_SEED]``
(adam, 24 seeds: about 6 min on 2 CPU cores; sgd, 48 seeds: about 16 min), or
``... MODEL-OPT [SEEDS] [FIRST_SEED]`` with OPT one of the normalising optimizers of
``TRANSFORMER_OPTIMIZERS`` (Lion, Adafactor, RMSProp, AdaBelief, Muon), trained on the transformer
or LSTM language model of ``gradclip-jax outcomes`` (MODEL ``transformer`` or ``lstm``) at
natural loss scale in place of its AdamW or Adam, with starts of 0.25 and 0.1 (6 seeds: about
8 min for the transformer). It prints a table per optimizer.

The start cuts a run's first steps to about a quarter of its first norm while the norms fall.
With Adam the step does not shrink with the gradient, and on ``gradclip-jax outcomes`` the start
helped the transformer (AdamW) and the LSTM (Adam); with SGD the cut is a cut of the step. This
trains the RNN task's model and data, paired by seed, with three optimizers: Adam (warmup +
cosine, as the language models; peak learning rates 1e-3 to 3e-2), and the task's own plain
SGD and SGD + momentum 0.9 (``sgd``). Policies: the default, the start, fixed thresholds around
the best ones, and the noise control (c = 1 + 2^-20), whose distance from c = 1 is what
rounding alone moves these chaotic runs by.
"""

import dataclasses
import sys
import time

import numpy as np
import optax

import gradclip_jax as gc
from gradclip_jax._cli.outcomes import harness, tasks

ADAM_RATES = (1e-3, 3e-3, 1e-2, 3e-2)

# Each with optax's defaults and the transformer's schedule; Lion's rates are a tenth of the
# others' (its paper: 3-10x smaller than AdamW's, its sign update being larger).
TRANSFORMER_OPTIMIZERS = {
    "adafactor": (lambda s: optax.adafactor(s), 1.0),
    "lion": (lambda s: optax.lion(s), 0.1),
    "rmsprop": (lambda s: optax.rmsprop(s), 1.0),
    "adabelief": (lambda s: optax.adabelief(s), 1.0),
    # Muon: Newton-Schulz orthogonalised momentum for the matrices, Adam for the rest (optax's
    # defaults, one learning rate for both); its step does not grow with the gradient's scale.
    "muon": (lambda s: optax.contrib.muon(s), 1.0),
    # The language models' own (the transformer's AdamW, the LSTM's Adam), to compare starts.
    "adamw": (lambda s: optax.adamw(s, b2=0.95, weight_decay=0.1), 1.0),
    "adam": (lambda s: optax.adam(s), 1.0),
}
START = 0.25


def _fixed(cs: dict[str, float]) -> harness.Family:
    return harness.Family("fixed", lambda c, task: gc.clip_by_global_norm(
        c, nonfinite="propagate"), {**cs, "c=1, perturbed (control)": harness.CONTROL_C})


def _policies(fixed: dict[str, float],
              starts: tuple[float, ...] = (START,)) -> list[harness.Family]:
    return [
        _fixed(fixed),
        # The median rule without a start (the default before 0.2.0), the reference here.
        harness.Family("median", lambda p, task: gc.percentile_clip(start=None),
                       {harness.MEDIAN: 0.0}),
        harness.Family("start", lambda s, task: gc.percentile_clip(start=s),
                       {f"percentile_clip(start={s:g})": s for s in starts}),
    ]


def with_optimizer(base: tasks.Task, name: str, make, arms) -> tasks.Task:
    """``base`` trained with ``make(schedule)`` in place of its optimizer (the task's warmup +
    cosine to each arm's peak rate), on ``arms``, as one scenario called ``name``."""
    schedule = lambda lr: tasks.warmup_cosine(lr, base.warmup, base.steps)  # noqa: E731
    return dataclasses.replace(
        base, name=name, arms=tuple(arms), spike_steps=(),
        optimizer=lambda lr, momentum: make(schedule(lr)),
        scenarios=(tasks.Scenario(name, name.replace("_", " with "), lambda a: True),))


def adam_task(seeds: int, first_seed: int) -> tasks.Task:
    base = tasks.rnn(quick=False, seeds=seeds, first_seed=first_seed)
    seeds_run = sorted({a.seed for a in base.arms})
    return with_optimizer(base, "rnn_adam", optax.adam,
                          (tasks.Arm(lr, s) for lr in ADAM_RATES for s in seeds_run))


LANGUAGE_MODELS = ("transformer", "lstm")


def language_model_task(model: str, name: str, seeds: int, first_seed: int) -> tasks.Task:
    """``model``'s task (a key of ``LANGUAGE_MODELS``) at natural loss scale, without injected
    spikes, trained with the optimizer ``name`` in place of its own."""
    base = tasks.TASKS[model](quick=False, seeds=seeds, first_seed=first_seed)
    make, rate = TRANSFORMER_OPTIMIZERS[name]
    return with_optimizer(base, f"{model}_{name}", make,
                          (dataclasses.replace(a, lr=a.lr * rate) for a in base.arms
                           if a.scale == 1.0 and not a.spikes))


def table(title: str, logs: dict, arm_lr: np.ndarray, idx: list[int]) -> None:
    """Markdown rows of the runs ``idx``, each policy against the median rule (no start; the
    default before 0.2.0, *the default* in the tables), paired by run."""
    finals = {p: harness.final_val({k: v[idx] for k, v in m.items()}) for p, m in logs.items()}
    ref = finals[harness.MEDIAN]
    resampled = harness._bootstrap_runs(len(ref))  # the outcomes tables' paired bootstrap
    lr = arm_lr[idx]
    rates = sorted(set(lr.tolist()))
    shown = ", ".join(f"{r:g}" for r in rates)
    print(f"### {title} ({len(idx)} runs per policy; learning rates [{shown}])\n")
    print("| policy | final val loss | vs the default (95% interval) | runs lower | runs lost "
          "| steps clipped | per learning rate |")
    print("|---|---|---|---|---|---|---|")
    for p, m in logs.items():
        sub = {k: v[idx] for k, v in m.items()}
        d = finals[p] - ref
        lo, hi = harness._relative_ci(finals[p], ref, resampled)
        per = " / ".join(f"{finals[p][lr == r].mean():.4f}" for r in rates)
        print(f"| `{p}` | {finals[p].mean():.4f} | {100 * d.mean() / ref.mean():+.1f}% "
              f"[{lo:+.1f}, {hi:+.1f}] | {(d < 0).sum()} of {len(d)} "
              f"| {int(harness.lost(sub).sum())} | "
              f"{np.mean(sub['grad_norm'] > sub['threshold']):.1%} | {per} |")
    print()


def main(part: str, seeds: int, first_seed: int) -> None:
    if part == "adam":
        task = adam_task(seeds, first_seed)
        fams = _policies({"no clip": harness.NO_CLIP, "c=0.3": 0.3, "c=1": 1.0, "c=3": 3.0})
        groups = [("Adam, warmup + cosine", lambda a: True)]
    elif part == "sgd":
        task = tasks.rnn(quick=False, seeds=seeds, first_seed=first_seed)
        fams = _policies({"c=1": 1.0, "c=3": 3.0})
        groups = [("plain SGD", lambda a: a.momentum == 0.0),
                  ("SGD + momentum 0.9", lambda a: a.momentum > 0.0)]
    elif (part.partition("-")[0] in LANGUAGE_MODELS
          and part.partition("-")[2] in TRANSFORMER_OPTIMIZERS):
        model, _, name = part.partition("-")
        task = language_model_task(model, name, seeds, first_seed)
        fams = _policies({"c=0.3": 0.3, "c=1": 1.0, "c=3": 3.0}, starts=(START, 0.1))
        groups = [(f"{model}, {name}, warmup + cosine", lambda a: True)]
    else:
        raise SystemExit("part must be adam, sgd or MODEL-OPT with MODEL one of "
                         f"{LANGUAGE_MODELS} and OPT one of {sorted(TRANSFORMER_OPTIMIZERS)}, "
                         f"got {part!r}")
    start = time.time()
    logs = harness.run_task(task, fams)
    print(f"seeds {first_seed}..{first_seed + seeds - 1}, trained in {time.time() - start:.0f} s\n")
    for title, keep in groups:
        idx = [i for i, a in enumerate(task.arms) if keep(a)]
        table(title, logs, np.array([a.lr for a in task.arms]), idx)


if __name__ == "__main__":
    args = sys.argv[1:]
    default_seeds = 6 if args and args[0].partition("-")[0] in LANGUAGE_MODELS else 24
    main(args[0] if args else "adam", int(args[1]) if len(args) > 1 else default_seeds,
         int(args[2]) if len(args) > 2 else 0)
