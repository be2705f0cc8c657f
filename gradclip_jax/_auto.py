""":func:`percentile_clipped`: the percentile clip, with its rule chosen for the optimizer.

A clip chained before an optimizer cannot see which optimizer it feeds, and on the training
runs of ``gradclip-jax outcomes`` the best rule depended on it (README, "Which clip for which
job"). This wrapper holds both, so it reads the optimizer's state once, at ``init``, and picks
the rule measured best for it; its state is the ``optax.chain`` state of the two.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import optax

from gradclip_jax._core import ScalarOrSchedule
from gradclip_jax._diagnostics import optimizer_kind, optimizer_state_names
from gradclip_jax._mapping import DEFAULT_RANGE
from gradclip_jax._percentile import percentile_clip

RULES: dict[str, dict[str, Any]] = {
    "adam": {"start": 0.25},
    "lion": {"start": 0.1},
    "muon": {"start": 0.25},
    "momentum": {"percentile": 90.0, "window": None, "start": None},
    "sgd": {"percentile": 10.0, "start": None},
    "other": {"start": None},
}
"""The ``percentile_clip`` arguments chosen for each kind of optimizer (see ``rule_for``): every
one names its start (None: none), so that no rule changes with the default's."""


def rule_for(opt_state: Any) -> str:
    """The kind of optimizer whose (initial) state this is: ``"lion"`` for Lion, ``"muon"``
    for Muon (``optax.contrib.muon``), ``"adam"``
    when it keeps Adam's state or its kin's (an optax ``ScaleByAdamState``: adam, adamw,
    nadam; or AdaBelief's or Adafactor's), ``"momentum"`` for SGD with
    momentum (a ``TraceState`` and no state of an optimizer that normalises the step),
    ``"sgd"`` for plain SGD (no state but a learning-rate schedule's), else ``"other"``
    (RMSProp, and optimizers no benchmark here trained: any other optax state, those of
    ``optax.contrib``'s optimizers that set their own step size included). Wrappers
    (``inject_hyperparams``, ``MultiSteps``, ``masked``, ...) are read through. Optimizers
    that keep no state (``sign_sgd``, ``polyak_sgd``, ``fromage``) cannot be told from plain
    SGD, nor a trust ratio (``lars``) from SGD with momentum."""
    return optimizer_kind(optimizer_state_names(opt_state))


def percentile_clipped(
    optimizer: optax.GradientTransformation,
    *,
    max_norm: ScalarOrSchedule | None = None,
    relative_accuracy: float = 0.01,
    norm_range: tuple[float, float] = DEFAULT_RANGE,
    nonfinite: str = "zero",
    axis_name: str | Sequence[str] | None = None,
    name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
    """``optax.chain(percentile_clip(...), optimizer)``, with the clip's rule chosen for the
    optimizer, from its state, at ``init``.

    Measured on ``gradclip-jax outcomes`` and ``benchmarks/start_by_optimizer.py``, paired by
    seed against fixed thresholds (README, "Which clip for which job", for every figure). *The
    median rule* below is the rule without a start, ``percentile_clip(start=None)``:

    - Adam, AdamW, NAdam (an optax ``ScaleByAdamState``), Adafactor, AdaBelief and Muon
      (``optax.contrib.muon``): ``percentile_clip(start=0.25)``, the default. On the
      transformer LM with AdamW it ended at most 0.11% above the best fixed threshold
      in hindsight, or below it, at every loss scale, where the median rule ended up to 0.3%
      above it; on the LSTM LM with Adam 3.6% below it (the median rule 0.8%). With
      Adafactor, AdaBelief and Muon in place of AdamW on the transformer it ended 0.7% to
      1.0% below the median rule.
    - Lion: ``percentile_clip(start=0.1)``. On the transformer with Lion it ended about 4%
      below the median rule on two sets of 30 runs, and 0.3% and 0.7% below
      ``clip_by_global_norm(1.0)``; a start of 0.25 ended 3.5% and 3.2% below the median rule.
    - SGD with momentum (an optax ``TraceState`` and no normalising state):
      ``percentile_clip(90.0, window=None, start=None)``, the classic rule, which clips about
      one step in six. On the vanilla RNN with momentum it lost no run and ended from 11.6%
      below to 3.8% above the best fixed threshold on three runs of two sets of seeds (a
      scenario whose noise control moves 10% to 13%), where the default ended 7.5% and 16.6%
      above it and the median rule from 7% below to 31% above.
    - Plain SGD (no optimizer state but a schedule's): ``percentile_clip(10.0, start=None)``,
      which clips about nine steps in ten, a near-constant step like the best fixed
      threshold's. On the plain-SGD RNN it lost none of 528 runs on three sets of seeds, where
      the median rule lost 5 (4 of them among 240 at the highest learning rate), and ended
      15.4% and 4.2% below the best fixed threshold over four learning rates (the median rule
      19.0% below and 0.9% above). At loss x0.01, where no fixed threshold clips, it ended
      7.0% above them (the median rule 2.8%): with SGD and a loss scale that may change, give
      ``max_norm`` (below).
    - Anything else (RMSProp, with which the start was level with the median rule, and
      optimizers not trained there, such as ``optax.contrib``'s Prodigy, D-Adaptation, DoG or
      schedule-free, which set their own step size from the gradients): the median rule,
      ``percentile_clip(start=None)``, the default before 0.2.0 (no rule here changed with
      the default).

    The kind is read from the state's types, not from hyperparameters: ``optax.sgd(lr,
    momentum=0.0)`` keeps a ``TraceState`` (of decay 0) and counts as momentum; for plain SGD
    leave ``momentum`` at optax's default, None.

    The state is the chain's, ``(clip_state, optimizer_state)``, so :func:`gradclip_jax.stats`,
    :func:`gradclip_jax.diagnose` and ``optax.tree.get`` read it as they read a chain.
    Optimizers whose step follows the gradient's scale (SGD) pass a change of the loss scale
    on as a change of the learning rate; if the scale may change, give ``max_norm``.

    Args:
      optimizer: an optax ``GradientTransformation``; it follows the clip.
      max_norm, relative_accuracy, norm_range, nonfinite, axis_name, name: as for
        :func:`gradclip_jax.percentile_clip`, whatever the rule.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Example:
      >>> import jax.numpy as jnp, optax, gradclip_jax
      >>> tx = gradclip_jax.percentile_clipped(optax.adamw(1e-3))
      >>> params = {"w": jnp.ones(3)}
      >>> state = tx.init(params)
      >>> gradclip_jax.find_clip_states(state)[""].name.features  # Adam: the start
      ('start',)
    """
    if not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(
            "optimizer must be an optax GradientTransformation (for example optax.adamw(1e-3)), "
            f"got {type(optimizer).__name__} {optimizer!r}"
        )
    options: dict[str, Any] = dict(max_norm=max_norm, relative_accuracy=relative_accuracy,
                                   norm_range=norm_range, nonfinite=nonfinite,
                                   axis_name=axis_name, name=name)
    percentile_clip(**options)  # bad arguments fail here, at construction

    def clip_for(opt_state: Any) -> optax.GradientTransformationExtraArgs:
        return percentile_clip(**RULES[rule_for(opt_state)], **options)

    def init_fn(params):
        opt_state = optimizer.init(params)
        return (clip_for(opt_state).init(params), opt_state)

    def update_fn(updates, state, params=None, **extra_args):
        # The optimizer's state has the same types at every step, so the rule is the same.
        chained = optax.chain(clip_for(state[1]), optimizer)
        return chained.update(updates, state, params, **extra_args)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
