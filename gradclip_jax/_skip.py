"""Skipping a step on a spike: :func:`skip_spikes`, a guard around any optax transformation.

A step is skipped (all-zero update, inner state left bit for bit as it was) when the gradient
or the loss is non-finite, or when the gradient's global norm or the loss is a spike against
robust statistics of the recent accepted values: in log space, above the median by more than
``k`` robust standard deviations (1.4826 x the median absolute deviation), so that a spike
does not inflate the spread that would hide the next one, as mean + k sigma does. The
statistics live in the same fixed-size log-bucket sketch as the clip's histogram, with counts
that decay over about ``window`` values; skipped and non-finite values never enter them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.extend import core as jcore

from gradclip_jax import _norms
from gradclip_jax._core import ClipName, compiles_eagerly, computed_once, measured
from gradclip_jax._flax_interop import register_flax_serialization
from gradclip_jax._mapping import DEFAULT_RANGE
from gradclip_jax._sketch import NormSketch, sketch_add, sketch_init
from gradclip_jax._validation import (
    check_axis_name,
    check_int,
    check_name,
    check_norm_range,
    check_range,
)

MAD_TO_SIGMA = 1.4826
"""The median absolute deviation of a normal sample times this estimates its sigma."""


class SkipState(NamedTuple):
    """State of :func:`skip_spikes`.

    Attributes:
      count: int32, steps seen.
      skipped_steps: int32, steps skipped, for any reason.
      skipped_nonfinite: int32, steps skipped because the gradient or the loss held a NaN/Inf.
      skipped_norm_spikes: int32, finite steps skipped because the gradient norm was a spike.
      skipped_loss_spikes: int32, finite steps skipped because the loss was a spike.
      consecutive: int32, finite steps skipped in a row up to now.
      rebased: int32, times a lasting change of scale was accepted and the statistics restarted.
      grad_norm: float32, the global L2 norm of the last gradient (0 until a finite one).
      norms: sketch of recent accepted gradient norms (counts decay over ``window``).
      losses: sketch of recent accepted positive losses.
      inner_state: the wrapped transformation's state.
      name: static: the ``name`` the guard was given.
    """

    count: jax.Array  # type: ignore[assignment]  # optax's name; shadows tuple.count
    skipped_steps: jax.Array
    skipped_nonfinite: jax.Array
    skipped_norm_spikes: jax.Array
    skipped_loss_spikes: jax.Array
    consecutive: jax.Array
    rebased: jax.Array
    grad_norm: jax.Array
    norms: NormSketch
    losses: NormSketch
    inner_state: Any
    name: ClipName = ClipName()


def _log_median_and_sigma(sketch: NormSketch) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Median and robust sigma of the log-values in ``sketch`` (natural log units), and
    whether the median lies inside the sketch's range (not in its bucket below or above).

    Buckets are evenly spaced in log value, so both come from bucket indices: the median
    bucket, and the weighted median of every bucket's distance from it (the MAD), O(buckets).
    """
    cumulative = sketch.cumulative.astype(jnp.float32)
    counts = sketch.counts.astype(jnp.float32)
    n = counts.shape[0]
    half = 0.5 * cumulative[-1]
    median = jnp.minimum(jnp.sum(cumulative < half), n - 1)
    distance = jnp.abs(jnp.arange(n) - median)
    folded = jax.ops.segment_sum(counts, distance, num_segments=n)
    mad = jnp.sum(jnp.cumsum(folded) < half).astype(jnp.float32)
    log_gamma = math.log(sketch.mapping.gamma)
    inside = (median > 0) & (median < n - 1)
    return jnp.log(sketch.mapping.value(median)), MAD_TO_SIGMA * mad * log_gamma, inside


def _is_spike(sketch: NormSketch, value: jax.Array, k: Any, min_ratio: Any,
              warmup: Any) -> jax.Array:
    log_median, sigma, inside = _log_median_and_sigma(sketch)
    log_limit = log_median + jnp.maximum(k * sigma, jnp.log(jnp.float32(min_ratio)))
    # A median outside the sketch's range reads back as the range's bound, not as itself:
    # typical norms of 1e10 would make every norm a "spike" against 1e8. No finite value is
    # judged against a median that cannot be measured (diagnose says so).
    ready = (sketch.count >= warmup) & inside
    return ready & (jnp.log(jnp.maximum(value, 1e-30)) > log_limit)


def _restart(sketch: NormSketch) -> NormSketch:
    return dataclasses.replace(sketch, cumulative=jnp.zeros_like(sketch.cumulative),
                               recorded=jnp.zeros_like(sketch.count))


def _is_traceable(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic, bool, int, float, complex))


def _update_unless(skip: jax.Array, step: Any, args: tuple, old_state: Any) -> tuple[Any, Any]:
    """``step(*args) -> (updates, new_state)``; on ``skip``, -0.0 updates and ``old_state``.

    The plain way, ``where(skip, old, new)`` on the step's outputs, leaves the updates
    computed from the unselected new state, and XLA (on CPU, which has no multi-output loop
    fusion) then computes every new moment twice: once for the state it writes, and again,
    reading the gradient and the old moment, inside the parameter update. So the step is
    traced and replayed, and each state leaf is selected where it is computed, before the
    updates use it. On an applied step that changes no bit; on a skipped one the updates
    are replaced anyway. The parameter update then reads the state it writes, as it does
    without the guard.
    """
    flat, in_tree = jax.tree.flatten(args)
    dynamic = [i for i, x in enumerate(flat) if _is_traceable(x)]

    def traced(*values):
        full = list(flat)
        for i, v in zip(dynamic, values, strict=True):
            full[i] = v
        return step(*jax.tree.unflatten(in_tree, full))

    values = [flat[i] for i in dynamic]
    closed, out_shape = jax.make_jaxpr(traced, return_shape=True)(*values)
    jaxpr = closed.jaxpr
    n_updates = len(jax.tree.leaves(out_shape[0]))
    state_vars = jaxpr.outvars[n_updates:]
    old_leaves = jax.tree.leaves(old_state)
    # The state leaves this replay selects where they are computed: each computed by the
    # step (not passed through, not a literal), and not two leaves from one variable.
    bound = set(jaxpr.invars) | set(jaxpr.constvars)
    select_at: dict[Any, Any] = {}
    for var, old in zip(state_vars, old_leaves, strict=True):
        if isinstance(var, jcore.Var) and var not in bound:
            select_at[var] = None if var in select_at else old

    env: dict[Any, Any] = dict(zip(jaxpr.constvars, closed.consts, strict=True))
    env.update(zip(jaxpr.invars, values, strict=True))

    def read(v: Any) -> Any:
        return v.val if isinstance(v, jcore.Literal) else env[v]

    for eqn in jaxpr.eqns:
        params = eqn.primitive.get_bind_params(eqn.params)
        # jax < 0.7 returns (subfuns, params).
        subfuns, params = params if isinstance(params, tuple) else ((), params)
        with eqn.ctx.manager:
            outs = eqn.primitive.bind(*subfuns, *map(read, eqn.invars), **params)
        outs = outs if eqn.primitive.multiple_results else [outs]
        for var, out in zip(eqn.outvars, outs, strict=True):
            old = select_at.get(var)
            env[var] = out if old is None else jnp.where(skip, old, out)

    outs = [read(v) for v in jaxpr.outvars]
    # -0.0, not 0.0: p + (-0.0) is p bit for bit, a parameter of -0.0 included, so a
    # skipped step leaves the parameters exactly as they were.
    updates = [jnp.where(skip, jnp.full_like(u, -0.0), u) for u in outs[:n_updates]]
    # The leaves not selected yet. Selecting one twice would make XLA fuse the first select
    # into both of its users, which is the recomputation this replay is for.
    state = [new if select_at.get(var) is not None else jnp.where(skip, old, new)
             for var, new, old in zip(state_vars, outs[n_updates:], old_leaves, strict=True)]
    return jax.tree.unflatten(jax.tree.structure(out_shape), updates + state)


LOSS_ARGS = ("loss", "value")
"""The extra arguments the guard reads the loss from, in order: its own ``loss``, then optax's
``value`` (the objective's value, which ``optax.lbfgs``, ``optax.contrib.reduce_on_plateau`` and
``optax.polyak_sgd`` take), so a chain that needs ``value`` is guarded on its loss without a
second argument that the inner transforms would be handed too."""


def _loss_of(extra_args: dict[str, Any]) -> Any:
    """The loss among the caller's extra arguments (see ``LOSS_ARGS``), or None."""
    for key in LOSS_ARGS:
        loss = extra_args.get(key)
        if loss is None:
            continue
        if jnp.size(loss) != 1:
            raise ValueError(f"skip_spikes: the loss ({key}=) must be a scalar, got an array "
                             f"of shape {jnp.shape(loss)}")
        return loss
    return None


def skip_spikes(
    inner: optax.GradientTransformation,
    *,
    k: float = 6.0,
    min_ratio: float = 3.0,
    window: int = 128,
    warmup_steps: int = 20,
    max_consecutive: int = 10,
    relative_accuracy: float = 0.01,
    norm_range: tuple[float, float] = DEFAULT_RANGE,
    axis_name: str | Sequence[str] | None = None,
    name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Skips the step when the gradient norm or the loss spikes, or either is non-finite.

    With :math:`m` the median and :math:`\hat\sigma = 1.4826\,\mathrm{MAD}` the robust
    spread of the log of the recent accepted values (about the last ``window``), a value
    :math:`x` is a spike when

    .. math::
        \log x > m + \max(k\,\hat\sigma,\; \log \text{min\_ratio})

    On a skipped step the update is all zeros (-0.0, so that ``optax.apply_updates`` returns
    the parameters bit for bit; on CPU, XLA flushes subnormal parameters to zero in any
    addition), the inner state is returned bit for bit (no
    moment update, no count increment) and the step is counted, with its reason. The loss is
    checked when passed as an extra argument, ``tx.update(grads, state, params, loss=loss)``
    (optax's ``GradientTransformationExtraArgs`` convention), or as ``value=loss``, the name
    optax's ``lbfgs``, ``contrib.reduce_on_plateau`` and ``polyak_sgd`` read it by (``loss``
    first when both are given; either must be a scalar). Every extra argument is passed on to
    ``inner``. Only positive losses are compared (the statistics are of log-values), a
    non-finite loss always skips.

    Skipped and non-finite values never enter the statistics, so a NaN cannot poison them and
    a spike cannot widen the spread. A lasting change of scale is accepted after
    ``max_consecutive`` finite steps skipped in a row: that step is applied, the statistics
    restart from it, and for the next ``warmup_steps`` steps only non-finite values are
    skipped. The guard never skips a finite step forever, and never applies a non-finite one.

    The gradient norm is the same single-read reduction as the clips'; with a gradclip_jax
    clip inside ``inner``, XLA computes it once for both, and that read is all the guard adds
    to the step: the inner update is replayed with each state leaf selected where it is
    computed, so the parameter update reads the state the step writes (bit for bit the inner
    transformation's own on an applied step) instead of computing it a second time.

    Args:
      inner: the transformation to guard, for example
        ``optax.chain(gradclip_jax.percentile_clip(), optax.adamw(1e-3))`` (an
        ``optax.MultiSteps`` is taken as its ``gradient_transformation()``).
      k: > 0, the spike threshold in robust standard deviations of the log-values. The
        default, 6, matches the mean + 6 sigma of MaxText and OLMo, on robust statistics.
      min_ratio: > 1, the smallest ratio to the median that can be a spike, whatever the
        spread (nearly constant norms have a spread of zero).
      window: >= 2, about how many recent accepted values the statistics hold.
      warmup_steps: >= 1, accepted values needed before a finite value can be a spike.
      max_consecutive: >= 1, finite steps skipped in a row before the next one is accepted
        as a change of scale.
      relative_accuracy: in (0, 1), accuracy of the sketches (it fixes the state's shape).
      norm_range: ``(low, high)``, ``0 < low < high``: the gradient norms the norm sketch
        gives buckets of their own (default 1e-8 to 1e8; losses always use that default).
        While the median of the recent norms (or losses) lies outside, it cannot be measured
        and no finite value of it is judged a spike; :func:`gradclip_jax.diagnose` warns.
        Static: it fixes the state's shape.
      axis_name: inside ``shard_map``, the mesh axis (or axes) the gradients are split over.
      name: optional; prefixes this guard's :func:`gradclip_jax.stats` keys.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a :class:`SkipState`.

    Example:
      >>> import jax.numpy as jnp, optax, gradclip_jax
      >>> tx = gradclip_jax.skip_spikes(optax.sgd(1.0), warmup_steps=5)
      >>> state = tx.init({"w": jnp.zeros(1)})
      >>> for g in [1.0, 1.1, 0.9, 1.0, 1.2]:
      ...     _, state = tx.update({"w": jnp.array([g])}, state)
      >>> updates, state = tx.update({"w": jnp.array([1000.0])}, state)  # a spike
      >>> bool((updates["w"] == 0).all()), int(gradclip_jax.stats(state)["skipped_norm_spikes"])
      (True, 1)
    """
    if isinstance(inner, optax.MultiSteps):
        inner = inner.gradient_transformation()
    if not isinstance(inner, optax.GradientTransformation):
        raise TypeError(
            f"inner must be an optax GradientTransformation, got {type(inner).__name__}")
    check_range("k", k, low=0.0)
    check_range("min_ratio", min_ratio, low=1.0)
    check_int("window", window, low=2)
    check_int("warmup_steps", warmup_steps, low=1)
    check_int("max_consecutive", max_consecutive, low=1)
    check_range("relative_accuracy", relative_accuracy, low=0.0, high=1.0)
    norm_range = check_norm_range(norm_range)
    check_axis_name(axis_name)
    check_name(name)
    inner = optax.with_extra_args_support(inner)
    decay = 1.0 - 1.0 / window

    def init_fn(params):
        # A buffer of its own for every counter: one array shared by several fields could not
        # be donated to a jitted step ("Attempt to donate the same buffer twice").
        def zero():
            return jnp.zeros((), jnp.int32)

        register_flax_serialization()

        losses = sketch_init(float(relative_accuracy), weighted=True)
        norms = sketch_init(float(relative_accuracy), weighted=True, value_range=norm_range)
        return SkipState(
            count=zero(), skipped_steps=zero(), skipped_nonfinite=zero(),
            skipped_norm_spikes=zero(), skipped_loss_spikes=zero(), consecutive=zero(),
            rebased=zero(), grad_norm=jnp.zeros((), jnp.float32), norms=norms, losses=losses,
            inner_state=inner.init(params), name=ClipName(name),
        )

    def step(updates, state, params, extra_args):
        loss = _loss_of(extra_args)
        measures = _norms.reduce_tree(updates, (_norms.SUMSQ,), axis_name)
        norm = _norms.l2_from(measures).astype(jnp.float32)
        finite = jnp.isfinite(norm)
        norm_spike = finite & _is_spike(state.norms, norm, k, min_ratio, warmup_steps)
        if loss is None:
            loss_value, loss_spike = jnp.float32(1.0), jnp.bool_(False)
        else:
            loss_value = jnp.asarray(loss, jnp.float32).reshape(())
            finite = finite & jnp.isfinite(loss_value)
            loss_spike = (finite & (loss_value > 0)
                          & _is_spike(state.losses, loss_value, k, min_ratio, warmup_steps))
        spike = norm_spike | loss_spike
        rebase = spike & (state.consecutive >= max_consecutive)
        skip = ~finite | (spike & ~rebase)
        skip, positive = computed_once(skip, norm > 0)

        def inner_step(grads, inner_state, params, measures, extra):
            # The clip inside recognises the measures by the identity of these leaves.
            with measured(grads, measures):
                return inner.update(grads, inner_state, params, **extra)

        new_updates, new_inner = _update_unless(
            skip, inner_step, (updates, state.inner_state, params, measures, extra_args),
            state.inner_state)

        accept = ~skip
        norms = jax.tree.map(lambda a, b: jnp.where(rebase, a, b),
                             _restart(state.norms), state.norms)
        losses = jax.tree.map(lambda a, b: jnp.where(rebase, a, b),
                              _restart(state.losses), state.losses)
        # As for the losses, only positive values: a zero norm has no log and no scale.
        norms = sketch_add(norms, norm, accept & positive, decay)
        losses = sketch_add(losses, loss_value, accept & (loss is not None) & (loss_value > 0),
                            decay)
        as_int = lambda b: b.astype(jnp.int32)  # noqa: E731
        skipped_finite = skip & finite
        new_state = SkipState(
            count=state.count + 1,
            skipped_steps=state.skipped_steps + as_int(skip),
            skipped_nonfinite=state.skipped_nonfinite + as_int(~finite),
            skipped_norm_spikes=state.skipped_norm_spikes + as_int(skipped_finite & norm_spike),
            skipped_loss_spikes=state.skipped_loss_spikes + as_int(skipped_finite & loss_spike),
            consecutive=jnp.where(skipped_finite, state.consecutive + 1,
                                  jnp.where(finite, 0, state.consecutive)),
            rebased=state.rebased + as_int(rebase),
            grad_norm=jnp.where(jnp.isfinite(norm), norm, state.grad_norm),
            norms=norms,
            losses=losses,
            inner_state=new_inner,
            name=state.name,
        )
        return new_updates, new_state

    compiled = jax.jit(step)
    settings = (k, min_ratio, window, warmup_steps, max_consecutive)

    def update_fn(updates, state, params=None, **extra_args):
        args = (updates, state, params, extra_args)
        # Eagerly, one compiled call (the step traces the inner transform for its replay on
        # every call); under a trace, inline.
        return (compiled if compiles_eagerly(settings, args) else step)(*args)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
