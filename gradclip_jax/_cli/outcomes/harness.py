"""Paired training runs of every clipping policy, and the metrics that judge them.

Pairing: a run's initialisation and batches depend only on its seed, so every policy sees the
same ones. A policy *family* is one transform factory whose argument is vmapped (the fixed
thresholds are one family, no clipping being the threshold float32-max): one jitted program
trains every (variant, arm) pair of a task at once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import gradclip_jax as gc
from gradclip_jax._cli.outcomes import baselines
from gradclip_jax._cli.outcomes.tasks import SPIKE_FACTOR, Arm, Task
from gradclip_jax._diagnostics import share_taken_off

FIXED_C = (0.1, 0.3, 1.0, 3.0, 10.0)
NO_CLIP = float(np.finfo(np.float32).max)
DEFAULT = "percentile_clip()"
REFERENCE = "c=1"
GUARDED = "percentile_clip() + skip_spikes"
CLASSIC = "percentile_clip(90, window=None, start=None)"
MEDIAN = "percentile_clip(start=None)"
"""The default's rule without its start: the recent median alone (the default before 0.2.0)."""
CONTROL = "c=1, perturbed (control)"
CONTROL_C = 1.0 + 2.0**-20
"""The noise control: c = 1 one part in a million larger, trained in a program of its own.

It differs from c = 1 only by rounding-sized changes (the threshold, and the batch the runs
are vmapped in), which training then amplifies: its paired difference from c = 1 is what a
policy can differ by with no effect at all."""


@dataclasses.dataclass(frozen=True)
class Family:
    """Policies that differ only in one numeric argument of the same factory."""

    name: str
    make: Callable[[jax.Array, Task], optax.GradientTransformation]
    variants: dict[str, float]
    guarded: bool = False  # wrap clip + optimizer in skip_spikes, and pass it the loss
    tasks: tuple[str, ...] | None = None  # the tasks it runs on (None: all)


def capped_for(steps: jax.Array, c: float = 1.0) -> optax.Schedule:
    """A ``max_norm`` schedule: ``c`` for the first ``steps`` steps, no cap after."""
    return lambda count: jnp.where(count < steps, jnp.float32(c), jnp.float32(NO_CLIP))


def families(percentiles: tuple[float, ...] = (), windows: tuple[int, ...] = (),
             early_caps: tuple[int, ...] = (), starts: tuple[float, ...] = ()) -> list[Family]:
    """Every policy of the benchmark; ``percentiles``, ``windows``, ``early_caps`` and
    ``starts`` add variants of the default, each set one program: ``percentile_clip(p)``,
    ``percentile_clip(window=w)``, ``percentile_clip(start=None)`` capped at c = 1 for its
    first ``n`` steps (what c = 1 does during a learning-rate warmup, then the median rule,
    measured before the start was the default), and ``percentile_clip(start=s)`` (the
    scale-free form of that cap)."""
    fixed = {"no clip": NO_CLIP, **{f"c={c:g}": c for c in FIXED_C}}
    extra = []
    if early_caps:
        extra.append(Family("early caps", lambda n, task: gc.percentile_clip(
            max_norm=capped_for(n), start=None),
            {f"percentile_clip(start=None), c=1 for {n} steps": n for n in early_caps}))
    if percentiles:
        extra.append(Family("percentiles", lambda p, task: gc.percentile_clip(p),
                            {f"percentile_clip({p:g})": p for p in percentiles}))
    if starts:
        extra.append(Family("starts", lambda s, task: gc.percentile_clip(start=s),
                            {f"percentile_clip(start={s:g})": s for s in starts}))
    if windows:
        extra.append(Family("windows", lambda w, task: gc.percentile_clip(window=w),
                            {f"percentile_clip(window={w})": w for w in windows}))
    return extra + [
        # nonfinite="propagate": a fixed clip then behaves exactly as optax's.
        Family("fixed", lambda c, task: gc.clip_by_global_norm(c, nonfinite="propagate"), fixed),
        Family("autoclip", lambda p, task: baselines.autoclip(p, max_steps=task.steps),
               {"AutoClip p10": 10.0, "AutoClip p90": 90.0}),
        Family("zclip", lambda p, task: baselines.zclip(), {"ZClip": 0.0}),
        Family("default", lambda p, task: gc.percentile_clip(), {DEFAULT: 0.0}),
        # What the start adds: the same rule without it, on every task.
        Family("median", lambda p, task: gc.percentile_clip(start=None), {MEDIAN: 0.0}),
        # The classic safety net, with the library's caps, where the README recommends it
        # (SGD with momentum) and where it is most at risk (plain SGD): the RNN.
        Family("classic", lambda p, task: gc.percentile_clip(p, window=None, start=None),
               {CLASSIC: 90.0}, tasks=("rnn",)),
        # Clip alone against clip + skip, where the spikes are (the LSTM's spikes arm).
        Family("guarded", lambda p, task: gc.percentile_clip(), {GUARDED: 0.0},
               guarded=True, tasks=("lstm",)),
        Family("control", lambda c, task: gc.clip_by_global_norm(c, nonfinite="propagate"),
               {CONTROL: CONTROL_C}),
    ]


def _threshold(state: Any) -> jax.Array:
    """The threshold the clip in ``state`` applied at the last step (inf when none)."""
    found = [s for s in jax.tree.leaves(state, is_leaf=lambda x: hasattr(x, "threshold")
                                        and hasattr(x, "_fields"))
             if hasattr(s, "threshold")]
    t = found[0].threshold
    return jnp.where(t >= NO_CLIP, jnp.inf, t)


def _skipped(state: Any) -> jax.Array:
    """Steps a skip_spikes guard in ``state`` has skipped (0 without one)."""
    found = [s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, gc.SkipState))
             if isinstance(s, gc.SkipState)]
    return found[0].skipped_steps if found else jnp.zeros((), jnp.int32)


def _train_one(task: Task, family: Family, param, arm: dict[str, jax.Array]):
    k_init, k_data = jax.random.split(jax.random.key(arm["seed"]))
    params = task.init(k_init)
    tx = optax.chain(family.make(param, task), task.optimizer(arm["lr"], arm["momentum"]))
    if family.guarded:
        tx = gc.skip_spikes(tx)
    opt_state = tx.init(params)
    spike_steps = jnp.asarray(task.spike_steps or (-1,), jnp.int32)

    def val_loss(p):
        return jnp.mean(jax.vmap(task.loss, in_axes=(None, 0))(p, task.val_batch))

    def step(carry, t):
        params, opt_state = carry
        batch = task.sample(jax.random.fold_in(k_data, t))
        loss, grads = jax.value_and_grad(lambda p: arm["scale"] * task.loss(p, batch))(params)
        spike = arm["spikes"] & jnp.any(t == spike_steps)
        grads = jax.tree.map(lambda g: g * jnp.where(spike, SPIKE_FACTOR, 1.0), grads)
        norm = gc.global_norm(grads)
        extra = {"loss": loss} if family.guarded else {}
        updates, new_state = tx.update(grads, opt_state, params, **extra)
        params = optax.apply_updates(params, updates)
        skipped = _skipped(new_state) > _skipped(opt_state)
        return (params, new_state), (loss / arm["scale"], norm, _threshold(new_state), skipped)

    def chunk(carry, start):
        carry, logs = jax.lax.scan(step, carry, start + jnp.arange(task.eval_every))
        return carry, (logs, val_loss(carry[0]))

    starts = jnp.arange(0, task.steps, task.eval_every)
    _, (logs, vals) = jax.lax.scan(chunk, (params, opt_state), starts)
    logs = jax.tree.map(lambda x: x.reshape(-1), logs)
    return (*logs, jnp.concatenate([val_loss(params)[None], vals]))


def run_family(task: Task, family: Family) -> dict[str, np.ndarray]:
    """Trains every (variant, arm) pair of ``task`` with ``family``; arrays (V, A, ...)."""
    values = jnp.asarray(list(family.variants.values()), jnp.float32)
    arms = {f.name: jnp.asarray([getattr(a, f.name) for a in task.arms])
            for f in dataclasses.fields(Arm)}
    arms["lr"] = arms["lr"].astype(jnp.float32)
    arms["scale"] = arms["scale"].astype(jnp.float32)
    arms["momentum"] = arms["momentum"].astype(jnp.float32)

    one = lambda p, a: _train_one(task, family, p, a)  # noqa: E731
    over_arms = jax.vmap(one, in_axes=(None, 0))
    train_loss, norm, threshold, skipped, val = jax.jit(
        jax.vmap(over_arms, in_axes=(0, None)),
        compiler_options=dict(task.compiler_options) or None)(values, arms)
    return {"train_loss": np.asarray(train_loss), "grad_norm": np.asarray(norm),
            "threshold": np.asarray(threshold), "skipped": np.asarray(skipped),
            "val_loss": np.asarray(val)}


def run_task(task: Task, fams: list[Family] | None = None,
             progress: Callable[[int], Any] | None = None) -> dict[str, dict[str, np.ndarray]]:
    """Per-policy logs of every arm of ``task``: {policy: {metric: (arms, ...)}}."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for family in fams if fams is not None else families():
        if family.tasks is not None and task.name not in family.tasks:
            continue
        logs = run_family(task, family)
        for i, name in enumerate(family.variants):
            out[name] = {k: v[i] for k, v in logs.items()}
        if progress is not None:
            progress(1)
    return out


# ----------------------------------------------------------------------------- metrics


def lost(logs: dict[str, np.ndarray]) -> np.ndarray:
    """A run is lost when its final validation loss is not finite or above the initial one."""
    val = logs["val_loss"]
    return ~np.isfinite(val[:, -1]) | (val[:, -1] > val[:, 0])


def final_val(logs: dict[str, np.ndarray]) -> np.ndarray:
    """Final validation loss of every run; a lost run counts at its initial loss."""
    val = logs["val_loss"]
    return np.where(lost(logs), val[:, 0], val[:, -1])


SPIKE_WINDOW = 50


def loss_spikes(logs: dict[str, np.ndarray], warmup: int) -> np.ndarray:
    """Per run: steps after warmup whose training loss is over 3x the median of the 50 before.

    A diverged run counts every step from its divergence on (a non-finite loss is a spike).
    """
    loss = np.where(np.isfinite(logs["train_loss"]), logs["train_loss"], np.inf)
    start = max(warmup, SPIKE_WINDOW)
    if loss.shape[1] <= start:
        return np.zeros(loss.shape[0])
    windows = np.lib.stride_tricks.sliding_window_view(loss[:, :-1], SPIKE_WINDOW, axis=1)
    median = np.median(windows, axis=-1)  # median[:, i] covers steps i .. i + window - 1
    current = loss[:, SPIKE_WINDOW:]
    spiking = current > 3.0 * median
    return spiking[:, start - SPIKE_WINDOW:].sum(axis=1)


def taken_off(norm: np.ndarray, threshold: np.ndarray, applied: np.ndarray) -> np.ndarray:
    """Per run: the share of the sum of the unclipped norms that clipping removed,
    ``sum(max(n - c, 0)) / sum(n)`` over the steps whose threshold was applied (finite, not
    skipped; a step with no threshold removes nothing). It says how much clipping cut the
    steps on the whole, where the share of steps clipped says only how often it acted: a
    threshold at the median of widely spread norms clips half the steps and takes much off
    them. The same share ``diagnose`` reports from a clip's recent histogram."""
    return share_taken_off(norm, threshold, applied)


def scenario_metrics(task: Task, logs: dict[str, dict[str, np.ndarray]],
                     select: Callable[[Arm], bool]) -> dict[str, Any]:
    """The judged figures of one scenario (a subset of the task's arms)."""
    idx = np.array([i for i, a in enumerate(task.arms) if select(a)])
    arms = [task.arms[i] for i in idx]
    lrs = sorted({a.lr for a in arms})
    sub = {p: {k: v[idx] for k, v in m.items()} for p, m in logs.items()}
    finals = {p: final_val(m) for p, m in sub.items()}
    mean = {p: float(np.mean(f)) for p, f in finals.items()}
    fixed = [f"c={c:g}" for c in FIXED_C]
    best_fixed = min(fixed, key=lambda p: mean[p])
    per_lr = {p: np.array([np.mean(f[[a.lr == lr for a in arms]]) for lr in lrs])
              for p, f in finals.items()}
    best_at_lr = np.min(np.stack([v for p, v in per_lr.items() if p != CONTROL]), axis=0)
    resampled = _bootstrap_runs(len(idx))
    rows = {}
    for p, m in sub.items():
        finite = np.isfinite(m["threshold"]) & np.isfinite(m["grad_norm"])
        skipped = m.get("skipped", np.zeros_like(finite))
        clipped = finite & (m["grad_norm"] > m["threshold"]) & ~skipped
        applied = np.isfinite(m["grad_norm"]) & ~skipped
        rows[p] = {
            "lost": int(lost(m).sum()),
            "runs": len(idx),
            "final_val_mean": mean[p],
            "vs_c1": float(np.mean(finals[p] - finals[REFERENCE])),
            "vs_c1_wins": int(np.sum(finals[p] < finals[REFERENCE])),
            "vs_c1_ci": _difference_ci(finals[p], finals[REFERENCE], resampled),
            "vs_best_fixed_pct": 100.0 * (mean[p] - mean[best_fixed]) / mean[best_fixed],
            "vs_best_fixed_ci": _relative_ci(finals[p], finals[best_fixed], resampled),
            "gap_to_best_per_lr": float(np.mean(per_lr[p] - best_at_lr)),
            "clipped_pct": 100.0 * float(clipped.mean()),
            "taken_off_pct": 100.0 * float(np.mean(taken_off(m["grad_norm"], m["threshold"],
                                                          applied))),
            "skipped_pct": 100.0 * float(skipped.mean()),
            "loss_spikes": float(np.mean(loss_spikes(m, task.warmup))),
        }
    out: dict[str, Any] = {"lrs": lrs, "best_fixed": best_fixed, "rows": rows}
    if CONTROL in rows:
        out.update(noise_from_rows(rows, best_fixed))
    return out


def noise_from_rows(rows: dict[str, Any], best_fixed: str) -> dict[str, float]:
    """The noise control's distance from c = 1: in loss, and in % of the best fixed c's loss."""
    gap = abs(rows[CONTROL]["final_val_mean"] - rows[REFERENCE]["final_val_mean"])
    return {"noise_vs_c1": gap,
            "noise_vs_best_pct": 100.0 * gap / rows[best_fixed]["final_val_mean"]}


BOOTSTRAP_SAMPLES = 2000


def _bootstrap_runs(n: int) -> np.ndarray:
    """Resampled run indices (samples, n), the same for every policy, so the runs stay paired."""
    return np.random.default_rng(0).integers(0, n, (BOOTSTRAP_SAMPLES, n))


def _difference_ci(finals: np.ndarray, reference: np.ndarray,
                   resampled: np.ndarray) -> list[float]:
    """95% paired-bootstrap interval of mean(finals - reference)."""
    return _central_95((finals - reference)[resampled].mean(axis=1))


def _relative_ci(finals: np.ndarray, reference: np.ndarray,
                 resampled: np.ndarray) -> list[float]:
    """95% paired-bootstrap interval of mean(finals) / mean(reference) - 1, in percent."""
    return _central_95(100.0 * (finals[resampled].mean(axis=1)
                                / reference[resampled].mean(axis=1) - 1.0))


def _central_95(samples: np.ndarray) -> list[float]:
    return [float(np.percentile(samples, 2.5)), float(np.percentile(samples, 97.5))]
