"""The one clipping core that every transform in gradclip_jax runs.

A transform is two small typed parts handed to :func:`clip_transformation`:

- a :class:`ThresholdRule`, how the threshold for this step is chosen from the state (a fixed
  value or schedule in ``_fixed``, a percentile of the recorded norms in ``_percentile``);
- an :class:`Apply`, how the threshold is applied to the update (rescale the whole update to
  a norm, or clip each coordinate, in ``_apply``).

Everything else happens here, once, whatever the parts:

1. check the update's leaves (floating or complex, nothing else);
2. measure the update in a single read: the sum of squares (for the L2 norm in ``grad_norm``
   and the non-finite check) plus, when needed, the measure the threshold is compared with;
3. decide whether the step is finite;
4. apply the threshold, or handle the non-finite update (``"zero"`` or ``"propagate"``);
5. record diagnostics: the measure the threshold is compared with into the histogram(s) (the
   L2 norm for the percentile clip and the default norm clip), the L2 norm, step / clip /
   non-finite counters and moving averages of the clip rate over about 20 and 500 steps.

The state never takes a NaN or an Inf: non-finite norms are not recorded, and "no threshold"
is stored as float32's largest finite value.
"""

from __future__ import annotations

import abc
import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple, TypeAlias, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from gradclip_jax import _norms
from gradclip_jax._flax_interop import register_flax_serialization
from gradclip_jax._mapping import DEFAULT_RANGE
from gradclip_jax._sketch import NormSketch, sketch_add, sketch_init
from gradclip_jax._validation import is_traced

ScalarOrSchedule: TypeAlias = Union[float, jax.Array, optax.Schedule]  # noqa: UP007
"""A threshold: a Python float, a scalar array, or an optax schedule of the step count."""

NO_THRESHOLD = float(jnp.finfo(jnp.float32).max)
"""Stored as the threshold when none applies (no clipping); ``stats`` reports it as inf."""

RECENT_RATE = 1.0 / 20.0
LONG_RATE = 1.0 / 500.0

L2_NORM = "L2 norm"
"""What the L2-norm clips record, in words; the default of every label below."""


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class ClipName:
    """The name a clip transform (or a skip guard) was given, kept in its state as static data,
    with ``measure``: what its histograms record, in words, and ``features``: the options of
    its threshold rule that :func:`diagnose` reads (``ThresholdRule.features``)."""

    value: str | None = None
    measure: str = L2_NORM
    features: tuple[str, ...] = ()


class ClipState(NamedTuple):
    """State of every gradclip_jax transform.

    Attributes:
      count: int32, update steps seen, finite or not.
      threshold: float32, the threshold applied at the last step (``NO_THRESHOLD`` when none).
      grad_norm: float32, global L2 norm of the last finite unclipped update, whatever the
        clip compares with its threshold (float32's largest value when the norm overflows it).
      clipped_steps: int32, steps on which the update was changed by the threshold.
      nonfinite_steps: int32, steps whose update held a NaN or an Inf (for an L2-norm clip,
        also those whose norm overflows float32, from about 1.8e19).
      clip_rate_recent: float32, moving average of "this step was clipped" over ~20 steps.
      clip_rate_long: float32, the same over ~500 steps.
      histogram: the sketch (a fixed-size histogram) of the measure the threshold is compared
        with, on each finite step with a nonzero update, before clipping: the L2 norm
        (``percentile_clip``, ``clip_by_global_norm`` with ``ord=2``), the ``ord``-norm, or
        the largest magnitude (``clip_by_value``), so that its percentiles are thresholds of
        that clip. For the percentile clip with a ``window`` it carries, as a second row of
        its array, a sketch of the same norms whose counts decay, so that it holds about the
        last ``window`` of them (read as ``recent``; one array, updated in one pass).
      name: static (no array): the ``name`` the transform was given, which prefixes its
        :func:`gradclip_jax.stats` keys, and what ``histogram`` records, in words.
    """

    count: jax.Array  # type: ignore[assignment]  # optax's name; shadows tuple.count
    threshold: jax.Array
    grad_norm: jax.Array
    clipped_steps: jax.Array
    nonfinite_steps: jax.Array
    clip_rate_recent: jax.Array
    clip_rate_long: jax.Array
    histogram: NormSketch
    name: ClipName = ClipName()

    @property
    def recent(self) -> NormSketch | None:
        """The percentile clip's sketch of about the last ``window`` norms (``histogram``'s
        second row), or None."""
        return self.histogram.recent


class ThresholdRule(abc.ABC):
    """How a clip transform chooses its threshold.

    ``threshold`` maps the state before this step to this step's float32 threshold
    (``NO_THRESHOLD`` for none); it sees only the norms recorded before the current one. A
    rule that reads the histograms may ask for forgetting: ``histogram_decay`` for the
    histogram of the whole run, and ``recent_decay`` (not None) for a second sketch,
    ``ClipState.recent``.
    """

    @abc.abstractmethod
    def threshold(self, state: ClipState) -> jax.Array:
        """This step's threshold, from the state before it."""

    def histogram_decay(self) -> Any:
        """Forgetting factor per recorded norm of ``ClipState.histogram``; None keeps all."""
        return None

    def recent_decay(self) -> Any:
        """Forgetting factor of ``ClipState.recent``; None: no such sketch is kept."""
        return None

    def features(self) -> tuple[str, ...]:
        """Names of the options in use that :func:`diagnose` should know of (static)."""
        return ()


class Apply(abc.ABC):
    """How a clip transform applies its threshold to the update.

    The core measures the update once, for every measure in ``kinds`` (see ``_norms``), and
    a step is clipped when ``measure(...)`` exceeds the threshold. ``factor`` turns the
    threshold into the one scalar that ``leaf`` applies to each leaf of a clipped step.

    ``step_scalars`` and ``update_leaf`` put these together (the defaults select the clipped
    leaf, the leaf itself, or zeros); a part may override both to do it in fewer elementwise
    operations, which matters on CPU, where leaves of odd lengths are updated by scalar loops.
    """

    kinds: tuple[str, ...] = ()
    label: str = L2_NORM
    """What ``measure`` returns, in words (diagnostics name the recorded values with it)."""

    @abc.abstractmethod
    def measure(self, measures: Mapping[str, jax.Array]) -> jax.Array:
        """The value compared with the threshold."""

    @abc.abstractmethod
    def factor(self, threshold: jax.Array, measured: jax.Array) -> jax.Array:
        """The scalar handed to ``leaf`` on a clipped step."""

    @abc.abstractmethod
    def leaf(self, g: jax.Array, factor: jax.Array) -> jax.Array:
        """One leaf of a clipped step, in the leaf's dtype."""

    def check_leaf(self, path: str, dtype: Any) -> None:
        """Raises for a leaf dtype this part cannot apply to (called while tracing)."""
        del path, dtype

    def step_scalars(self, threshold: jax.Array, measured: jax.Array, clipped: jax.Array,
                     finite: jax.Array, zero_nonfinite: bool) -> tuple[jax.Array, ...]:
        """The per-step scalars ``update_leaf`` reads; the core computes them once per step."""
        del zero_nonfinite
        return self.factor(threshold, measured), clipped, finite

    def update_leaf(self, g: jax.Array, scalars: tuple[jax.Array, ...],
                    zero_nonfinite: bool) -> jax.Array:
        """One leaf of the step's output, from this step's ``step_scalars``."""
        factor, clipped, finite = scalars
        # Selecting g itself when nothing is clipped returns it bit for bit (multiplying by 1
        # would not: XLA flushes subnormals to zero on CPU), and returns a non-finite update
        # untouched under nonfinite="propagate" (clipped is False when not finite).
        kept = jnp.where(clipped, self.leaf(g, factor), g)
        return jnp.where(finite, kept, jnp.zeros_like(g)) if zero_nonfinite else kept


def init_state(
    relative_accuracy: float, *, weighted: bool, recent: bool = False, name: str | None = None,
    measure: str = L2_NORM, features: tuple[str, ...] = (),
    value_range: tuple[float, float] = DEFAULT_RANGE,
) -> ClipState:
    register_flax_serialization()
    f32 = jnp.float32
    return ClipState(
        count=jnp.zeros((), jnp.int32),
        threshold=jnp.full((), NO_THRESHOLD, f32),
        grad_norm=jnp.zeros((), f32),
        clipped_steps=jnp.zeros((), jnp.int32),
        nonfinite_steps=jnp.zeros((), jnp.int32),
        clip_rate_recent=jnp.zeros((), f32),
        clip_rate_long=jnp.zeros((), f32),
        # The recent sketch records the same norms, as the histogram's second row.
        histogram=sketch_init(relative_accuracy, weighted=weighted, recent=recent,
                              value_range=value_range),
        name=ClipName(name, measure, features),
    )


def _moving_average(avg: jax.Array, x: jax.Array, rate: float, count: jax.Array) -> jax.Array:
    # The first 1/rate steps use 1/count, giving the exact running mean while the average
    # warms up instead of a bias towards the initial zero.
    step_rate = jnp.maximum(jnp.float32(rate), 1.0 / count.astype(jnp.float32))
    return avg + step_rate * (x.astype(jnp.float32) - avg)


def computed_once(*scalars: jax.Array) -> tuple[jax.Array, ...]:
    """The per-step scalars, behind an op that XLA computes once instead of per element.

    Left to itself XLA fuses the whole scalar computation behind them (combining every leaf's
    partial norms, the threshold rule, a histogram quantile) into the elementwise update of
    every leaf, where it can run once per element: 50x slower on CPU for 96 leaves of an odd
    length. ``optimization_barrier`` does not stop that on CPU, and XLA simplifies small
    reductions away; it does not fuse a reduce-window into its users, so the scalars pass
    through a running maximum of two equal copies, whose first row is each value exactly
    (the maximum of one value and the padding's -inf: -0.0 and NaN come back as they went
    in, a subnormal as zero on CPU, which flushes them). It costs about half what a sort of
    the two copies did on a tiny model's step. The reduce-window is written out rather than
    taken from ``lax.cummax``, which JAX may lower as an associative scan (elementwise ops,
    which fuse) on some platforms. Booleans come back as booleans.
    """
    dtype = _norms.widest_float(x.dtype for x in scalars)
    packed = jnp.stack([x.astype(dtype) for x in scalars])
    # The initial value is a NumPy constant: a jnp array created under jit is a tracer, and
    # JAX then lowers a generic reduce-window, which reverse-mode autodiff cannot take
    # (jax.jit(jax.grad(...)) through a clip failed); with a constant it is the max monoid's.
    once = lax.reduce_window(jnp.stack([packed, packed]), np.array(-np.inf, dtype), lax.max,
                             (2, 1), (1, 1), ((1, 0), (0, 0)))[0]
    return tuple(once[i] > 0 if x.dtype == jnp.bool_ else once[i].astype(x.dtype)
                 for i, x in enumerate(scalars))


_MEASURED: contextvars.ContextVar[tuple[list[Any], Mapping[str, jax.Array]] | None] = (
    contextvars.ContextVar("gradclip_measured", default=None))
"""What a guard measured of the updates it hands to its inner transform, while it calls it.

Not an extra argument of ``update``: the inner chain passes extra arguments to every
transform, and some refuse those they do not know (``optax.lbfgs``'s line search raised
"not consumed by value_fn")."""


@contextlib.contextmanager
def measured(updates: Any, measures: Mapping[str, jax.Array]) -> Iterator[None]:
    """While it lasts, a clip given these very ``updates`` takes ``measures`` as its own."""
    token = _MEASURED.set((jax.tree.leaves(updates), measures))
    try:
        yield
    finally:
        _MEASURED.reset(token)


def shared_measures(updates: Any, kinds: Sequence[str]) -> Mapping[str, jax.Array] | None:
    """The measures a guard took of these very updates (the same arrays), or None."""
    shared = _MEASURED.get()
    if shared is None:
        return None
    leaves, measures = shared
    mine = jax.tree.leaves(updates)
    same = len(mine) == len(leaves) and all(a is b for a, b in zip(mine, leaves, strict=True))
    return measures if same and all(k in measures for k in kinds) else None


def check_update_leaves(updates: Any, apply: Apply) -> None:
    """Raises TypeError, naming the leaf, for an update leaf that is not floating or complex.

    optax's clips raise for integer leaves too; an integer update cannot be rescaled, and
    silently rounding it (to zero, for a small threshold) would hide a bug in the caller.
    """
    for path, leaf in jax.tree_util.tree_flatten_with_path(updates)[0]:
        dtype = jnp.result_type(leaf)
        where = jax.tree_util.keystr(path) or "the update"
        if not (jnp.issubdtype(dtype, jnp.floating)
                or jnp.issubdtype(dtype, jnp.complexfloating)):
            raise TypeError(
                f"gradclip_jax clips floating-point (or complex) updates; leaf {where} has "
                f"dtype {dtype}. Pass gradients of float parameters only (for example with "
                "optax.masked or by filtering the parameter tree)."
            )
        apply.check_leaf(where, dtype)


def _step(rule: ThresholdRule, apply: Apply, nonfinite: str,
          axis_name: str | Sequence[str] | None, decays: tuple[Any, Any], updates: Any,
          state: ClipState, measures: Mapping[str, jax.Array] | None):
    """One step of a clip transform (``update`` after its checks): see clip_transformation.

    ``decays`` are the rule's histogram and recent decays; ``measures`` a guard's measures of
    these updates, or None to take them here.
    """
    kinds = measure_kinds(apply)
    decay, recent_decay = decays
    threshold = jnp.asarray(rule.threshold(state), jnp.float32)
    if measures is None:
        measures = _norms.reduce_tree(updates, kinds, axis_name)
    l2 = _norms.l2_from(measures).astype(jnp.float32)
    measured = apply.measure(measures)
    # The sum of squares is NaN exactly when an element is (XLA's CPU max may skip one),
    # and infinite when one is infinite or when the L2 norm overflows float32 (elements
    # from about 1.8e19). The measured value is infinite when an element is, so a clip
    # measuring magnitudes (the value clip, ord 1 or inf) still clips a finite 1e30.
    finite = ~jnp.isnan(l2) & jnp.isfinite(measured)
    # In the measure's dtype: float64 for a float64 tree, which strict dtype promotion
    # would not compare with the float32 threshold.
    limit = threshold.astype(measured.dtype)
    clipped = finite & (measured > limit)
    # The histograms hold what the threshold is compared with, so that their percentiles
    # are thresholds of this clip; the same value as l2 for the L2-norm clips.
    recorded = measured.astype(jnp.float32)
    # A zero update (a batch whose loss has no gradient) has nothing to clip and says
    # nothing of the gradients' scale: recorded, it counted below the histogram's range,
    # and 20 zero steps at the start of a run held a percentile clip's threshold near
    # 1e-8 for hundreds of steps.
    record = finite & (recorded > 0)
    zero = nonfinite == "zero"
    # The threshold too: the state's copy then comes from the same kernel, not from a
    # second evaluation of the rule. And `record`: taken before the barrier, it put the
    # norms' combination into the histograms' update (10k MLP in a jitted loop: 1.07x ->
    # 1.11x the norm clip's step).
    *scalars, clipped, finite, record, threshold = computed_once(
        *apply.step_scalars(limit, measured, clipped, finite, zero), clipped, finite,
        record, threshold)
    # asarray: a Python number is a leaf optax accepts (optax.clip clips one).
    new_updates = jax.tree.map(
        lambda g: apply.update_leaf(jnp.asarray(g), tuple(scalars), zero), updates)

    count = state.count + 1
    new_state = ClipState(
        count=count,
        threshold=jnp.where(threshold < NO_THRESHOLD, threshold, NO_THRESHOLD),
        # A finite update whose L2 norm overflows float32 (the value clip's 1e30) records
        # float32's largest value, so that the state never holds an Inf.
        grad_norm=jnp.where(finite, jnp.minimum(l2, NO_THRESHOLD), state.grad_norm),
        clipped_steps=state.clipped_steps + clipped.astype(jnp.int32),
        nonfinite_steps=state.nonfinite_steps + (~finite).astype(jnp.int32),
        clip_rate_recent=_moving_average(state.clip_rate_recent, clipped, RECENT_RATE,
                                         count),
        clip_rate_long=_moving_average(state.clip_rate_long, clipped, LONG_RATE, count),
        histogram=sketch_add(state.histogram, recorded, record, decay, recent_decay),
        name=state.name,
    )
    return new_updates, new_state


_compiled_step = jax.jit(_step, static_argnums=(0, 1, 2, 3))
"""``_step`` compiled once per rule, apply part and tree, for an ``update`` called eagerly.

Run op by op, a step dispatched about a hundred small operations: on the 10k MLP with adam,
9.6 ms a step (the percentile clip 15.2 ms) against 4.7 ms with ``optax.clip_by_global_norm``
and 3.2 ms compiled, and 2 to 4 s for the first call of a process, which compiled each
operation. Under a trace (``jit``, ``grad``, ``vmap``, ``shard_map``,
``make_jaxpr``, a guard's replay) the step is traced inline as before, so a jitted training
step compiles exactly what it did.
"""


def _is_hashable(x: Any) -> bool:
    try:
        hash(x)
    except TypeError:
        return False
    return True


def compiles_eagerly(settings: Any, args: Any) -> bool:
    """Whether a step on ``args`` should run as one compiled call: it runs outside any trace,
    with only arrays and numbers in ``args`` (what a compiled call takes: an extra argument
    such as L-BFGS's ``value_fn`` is not), and ``settings`` can key a program (hashable: not
    arrays injected by ``optax.inject_hyperparams``, which rebuilds the transform at every
    step and would compile a program per step)."""
    return _is_hashable(settings) and all(
        isinstance(x, (jax.Array, np.ndarray, np.generic, bool, int, float, complex))
        and not is_traced(x) for x in jax.tree.leaves(args))


def measure_kinds(apply: Apply) -> tuple[str, ...]:
    """The measures a clip takes of each leaf: the sum of squares first, then its own."""
    return (_norms.SUMSQ,) + tuple(k for k in apply.kinds if k != _norms.SUMSQ)


def clip_transformation(
    rule: ThresholdRule,
    apply: Apply,
    *,
    nonfinite: str = "zero",
    axis_name: str | Sequence[str] | None = None,
    relative_accuracy: Any = 0.01,
    norm_range: tuple[float, float] = DEFAULT_RANGE,
    name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Builds a clip transform from a threshold rule and an apply part.

    Args:
      rule: a :class:`ThresholdRule`.
      apply: an :class:`Apply`.
      nonfinite: ``"zero"`` or ``"propagate"``.
      axis_name: mesh axes the update is split over inside ``shard_map``.
      relative_accuracy: accuracy of the norm histogram, read by ``init`` only: it fixes the
        histogram's shape, and ``update`` takes the mapping from the state. (Under
        ``optax.inject_hyperparams`` a later change of the injected value has no effect.)
      norm_range: ``(low, high)``, the recorded values the histograms give buckets of their
        own (static: it fixes their shape too).
      name: the transform's name, kept in the state (prefixes its ``stats`` keys).
    """
    if not isinstance(rule, ThresholdRule):
        raise TypeError(f"rule must be a ThresholdRule, got {type(rule).__name__} {rule!r}")
    if not isinstance(apply, Apply):
        raise TypeError(f"apply must be an Apply part, got {type(apply).__name__} {apply!r}")
    kinds = measure_kinds(apply)
    decay, recent_decay = rule.histogram_decay(), rule.recent_decay()

    def init_fn(params):
        del params
        if is_traced(relative_accuracy):
            raise TypeError(
                "relative_accuracy sets the shape of the norm histogram, so init needs a "
                "concrete value; call init outside jit or pass it in static_args"
            )
        return init_state(float(relative_accuracy), weighted=decay is not None,
                          recent=recent_decay is not None, name=name, measure=apply.label,
                          features=rule.features(), value_range=norm_range)

    def update_fn(updates, state, params=None, **extra_args):
        del params
        check_update_leaves(updates, apply)
        measures = shared_measures(updates, kinds)
        static = (rule, apply, nonfinite, axis_name)
        args = ((decay, recent_decay), updates, state, measures)
        # Eagerly, one compiled call; under a trace, inline.
        run = _compiled_step if compiles_eagerly(static, args) else _step
        return run(*static, *args)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
