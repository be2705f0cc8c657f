"""Reading clip states back: ``stats``, ``norm_percentile`` and ``diagnose``.

Each function finds the :class:`ClipState` of every gradclip_jax transform anywhere inside a
nested optax state (chain tuples, ``named_chain`` dicts, ``inject_hyperparams``,
``MultiSteps``, ``masked``, Flax NNX optimizer states whose leaves are wrapped in variables).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gradclip_jax._core import L2_NORM, NO_THRESHOLD, ClipState
from gradclip_jax._percentile import (
    MAX_RISE_PER_STEP,
    MEDIAN_MULTIPLE,
    WINDOW_MEDIAN_MULTIPLE,
)
from gradclip_jax._sketch import NormSketch, sketch_quantile
from gradclip_jax._skip import SkipState
from gradclip_jax._validation import check_range, warn_if_quantile

# diagnose's rules; the rates are those kept in ClipState.
RECENT_MOSTLY = 0.5  # fast clip rate above which "most recent steps" are clipped
RARELY = 0.01  # clip fraction under which clipping is a rare safety net
NEAR_ZERO = 0.02  # fast clip rate that counts as "has dropped to near zero"
WAS_STABLE = 0.25  # slow clip rate under which the run was stable before a burst
EARLY_STEPS = 100  # before this many steps, frequent clipping is early-training behaviour

FEW_STEPS = 20  # under this many steps, too few to judge the threshold
SHARE_HIGH = 0.30  # share of the recent norms' sum a windowed percentile clip takes off, above
# which diagnose reports it: on gradclip-jax outcomes the median rule took 7-24% of the summed norm
# off where it did as well as the best fixed threshold (AdamW, Adam, plain SGD), 36% with
# SGD + momentum
NEARLY_ALL = 0.9  # fast clip rate at which nearly every recent step is clipped
RUNAWAY_GROWTH = 8.0  # recent norms this many times the run's median, with nearly every recent
# step clipped: norms running away (on gradclip-jax outcomes' vanilla RNN with plain SGD at
# lr 0.3, the runs the default lost, and none of those it kept, on 240 seeds)
RUNAWAY_FROM_CALM = 12.0  # or, for a windowed clip, this many times the run's 10th percentile:
# a run unstable from its first steps raises its own median with its norms (a GRU LM with
# SGD + momentum at lr 10: the default's 3 lost runs reached 15-18x their 10th percentile,
# 1.3-1.6x their median; its kept runs on the LSTM and RNN tasks and that GRU at most 4.6x)
OUTSIDE_SHARE = 0.01  # share of the recorded values outside the histogram's range, from
# which diagnose reports it
_STATISTICS_ONLY = ("ScaleBy", "TraceState", "FactoredState")  # optax optimizer states that
# hold no other state
_NOT_OPTIMIZERS = frozenset({
    # optax states that hold no optimizer's statistics: wrappers, whose inner states are read
    # through, and parts that schedule, log or guard the updates without choosing their step
    "EmptyState", "InjectHyperparamsState", "InjectStatefulHyperparamsState",
    "WrappedScheduleState", "MultiStepsState", "MaskedState", "ApplyIfFiniteState",
    "ConditionallyMaskState", "ConditionallyTransformState", "PartitionState",
    "MultiTransformState", "MonitorState", "SnapshotState", "ZeroNansState",
    "NonNegativeParamsState", "AddNoiseState", "ReduceLROnPlateauState",
})


def _leaf(x: Any) -> jax.Array:
    """The array inside ``x``, unwrapping containers such as Flax NNX variables."""
    leaves = jax.tree.leaves(x)
    if len(leaves) != 1:
        raise TypeError(f"expected a single array in a clip state field, got {x!r}")
    leaf = leaves[0]
    return leaf if isinstance(leaf, jax.core.Tracer) else jnp.asarray(leaf)


def _plain_sketch(sketch: NormSketch) -> NormSketch:
    return NormSketch(cumulative=_leaf(sketch.cumulative), recorded=_leaf(sketch.recorded),
                      relative_accuracy=sketch.relative_accuracy,
                      value_range=sketch.value_range, with_recent=sketch.with_recent)


_ARRAY_FIELDS = tuple(f for f in ClipState._fields if f not in ("histogram", "name"))


def _plain(state: ClipState) -> ClipState:
    fields = {f: _leaf(getattr(state, f)) for f in _ARRAY_FIELDS}
    return ClipState(**fields, histogram=_plain_sketch(state.histogram), name=state.name)


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _is_optimizer_state(x: Any) -> bool:
    # Any state of optax's (optax.contrib's included) but those of _NOT_OPTIMIZERS: an
    # optimizer this module does not know by name counts as one, whose kind is "other".
    cls = type(x)
    return (cls.__module__.startswith("optax") and cls.__name__.endswith("State")
            and cls.__name__ not in _NOT_OPTIMIZERS)


def _may_hold_states(x: Any) -> bool:
    """Whether states may sit inside ``x``: not in a clip's, nor in the states of optax's own
    optimizers (their statistics only), which are not walked, as a model's moments are large."""
    return not (isinstance(x, ClipState)
                or (_is_optimizer_state(x) and type(x).__name__.startswith(_STATISTICS_ONLY)))


def _is_node(x: Any) -> bool:
    return isinstance(x, ClipState) or _is_optimizer_state(x)


@dataclasses.dataclass(frozen=True)
class _Found:
    path: str
    state: ClipState
    after: str | None  # an optimizer state that precedes the clip in the same chain
    feeds: tuple[str, ...] = ()  # the optimizer states that follow it in the same chain


def _in_one_chain(path: tuple, other_path: tuple) -> bool:
    """Whether two states sit in one chain: their paths part at a tuple index."""
    n = 0
    while n < min(len(path), len(other_path)) and path[n] == other_path[n]:
        n += 1
    return n < len(path) and isinstance(path[n], jax.tree_util.SequenceKey)


def _state_nodes(opt_state: Any) -> list[tuple[tuple, Any]]:
    """``(path, state)`` of every clip state and optimizer state in ``opt_state``, in the
    order of its leaves; a state inside an optimizer's (the inner optimizer of
    ``optax.lookahead`` or ``optax.contrib.schedule_free``, a clip in it) follows it."""
    nodes: list[tuple[tuple, Any]] = []

    def visit(tree: Any, prefix: tuple) -> None:
        inner = lambda x: x is not tree and _is_node(x)  # noqa: E731
        for path, node in jax.tree_util.tree_flatten_with_path(tree, is_leaf=inner)[0]:
            if node is not tree and _is_node(node):
                nodes.append((prefix + path, node))
                if _may_hold_states(node):
                    visit(node, prefix + path)

    if _is_node(opt_state):
        nodes.append(((), opt_state))
    if _may_hold_states(opt_state):
        visit(opt_state, ())
    return nodes


def _locate(opt_state: Any) -> list[_Found]:
    nodes = _state_nodes(opt_state)
    found = []
    for i, (path, node) in enumerate(nodes):
        if not isinstance(node, ClipState):
            continue
        chained = [(j, type(other).__name__) for j, (other_path, other) in enumerate(nodes)
                   if j != i and _is_optimizer_state(other) and _in_one_chain(path, other_path)]
        before = [name for j, name in chained if j < i]
        found.append(_Found("/".join(_key_name(k) for k in path), _plain(node),
                            before[-1] if before else None,
                            tuple(name for j, name in chained if j > i)))
    return found


ADAM_KIN = {
    "ScaleByAdamState": "Adam",
    "ScaleByBeliefState": "AdaBelief",
    "FactoredState": "Adafactor",
    "ScaleByLionState": "Lion",
    "MuonState": "Muon",
}
"""The optax states of optimizers whose step does not grow with the gradient's scale, on which
a ``start`` was measured to end lower than the same rule without it, and their names: Adam's
(optax.adam, adamw, nadam, and others built on ``scale_by_adam``), AdaBelief's and Adafactor's (kind
``"adam"``), Lion's (kind ``"lion"``) and Muon's (``optax.contrib.muon``, kind ``"muon"``), on
the transformer LM (README, "Which clip for which job")."""

_KIND_STATE = {"lion": "ScaleByLionState", "muon": "MuonState"}
"""The state that names each kind of optimizer that is not Adam's kin by its own name."""

_START_MEASURED = {
    "adam": (
        "Measured on training runs (gradclip-jax outcomes --start 0.25; "
        "benchmarks/start_by_optimizer.md), "
        "percentile_clip(start=0.25), which cuts the first steps to about a quarter of the "
        "first norm while the norms fall, as a fixed threshold below them would, ended lower "
        "than the rule without it with AdamW on a transformer LM (by 0.2%, within 0.2% of "
        "clip_by_global_norm(1.0)), with Adam on an LSTM (by 3.2% and 3.4% on two sets of "
        "seeds) and on the transformer with Adafactor (1.0%) and AdaBelief (0.7%): try it"
    ),
    "lion": (
        "Measured on training runs (the transformer LM of gradclip-jax outcomes with Lion in "
        "place of AdamW, benchmarks/start_by_optimizer.py), percentile_clip(start=0.1), which "
        "cuts the first steps to about a tenth of the first norm while the norms fall, ended "
        "4.5% and 4.1% below the rule without it on two sets of seeds, and 0.3% and 0.7% below "
        "clip_by_global_norm(1.0), where the rule without it ended 3.5% to 4.4% above it: try it"
    ),
    "muon": (
        "Measured on training runs (the transformer and LSTM LMs of gradclip-jax outcomes "
        "with Muon in place of their optimizer, benchmarks/start_by_optimizer.py), "
        "percentile_clip(start=0.25), which cuts the first steps to about a quarter of the "
        "first norm while the norms fall, ended 0.9% and 1.0% below the rule without it on the "
        "transformer on two sets of seeds, level with clip_by_global_norm(1.0), where the rule "
        "without it ended 1.0% above it, and 0.7% below the rule without it on the LSTM: try it"
    ),
}
"""What a start did, against the same rule without it, for each kind of optimizer that has one."""


def optimizer_kind(states: tuple[str, ...]) -> str:
    """The kind of optimizer whose optax state types are named in ``states`` (those that
    follow a clip in its chain, or all of an optimizer's): ``"lion"`` when one is Lion's;
    ``"muon"`` when one is Muon's (``optax.contrib.muon``, which keeps Adam's state for the
    parameters that are not matrices); ``"adam"`` when one is Adam's or its kin's
    (``ADAM_KIN``: optax.adam, adamw, nadam, adabelief, adafactor); ``"momentum"`` for a
    momentum trace (``TraceState``) with no state of an optimizer that normalises the step by
    the gradient's scale (RMSProp and the rest; a schedule does not); ``"sgd"`` for no
    optimizer state but a learning-rate schedule's (plain SGD: ``optax.sgd(lr)``); else
    ``"other"`` (any other optax state is an optimizer's, those of ``optax.contrib``
    included, so an optimizer not known by name is not taken for SGD).
    :func:`gradclip_jax.percentile_clipped` picks its rule by it, and
    :func:`gradclip_jax.diagnose` says what was measured for the kind a clip feeds."""
    for kind, state in _KIND_STATE.items():
        if state in states:  # before Adam's: Muon keeps Adam's state for its vectors
            return kind
    if any(n in ADAM_KIN for n in states):
        return "adam"
    normalising = [n for n in states if n not in ("ScaleByScheduleState", "TraceState")]
    if normalising:
        return "other"
    return "momentum" if "TraceState" in states else "sgd"


def optimizer_state_names(opt_state: Any) -> tuple[str, ...]:
    """The type names of the optax optimizer states in ``opt_state``, in order."""
    return tuple(type(s).__name__ for _, s in _state_nodes(opt_state)
                 if _is_optimizer_state(s))


def _keyed(found: list[_Found], opt_state: Any, *, required: bool = True) -> dict[str, _Found]:
    if not found and required:
        raise ValueError(
            f"no gradclip_jax clip state found in opt_state (a {type(opt_state).__name__}); "
            "pass the state of an optax transformation that contains a gradclip_jax clip"
        )
    keyed: dict[str, _Found] = {}
    for f in found:
        key = f.state.name.value or ""
        if key in keyed:
            what = f"named {key!r}" if key else "with no name"
            raise ValueError(
                f"opt_state holds several clip transforms {what} (at paths "
                f"{keyed[key].path!r} and {f.path!r}); give each a distinct name, for "
                "example clip_by_global_norm(1.0, name='guard'), so that stats() keys stay "
                "the same whatever the chain's shape"
            )
        keyed[key] = f
    return keyed


def find_clip_states(opt_state: Any) -> dict[str, ClipState]:
    """Every gradclip_jax state inside ``opt_state``, keyed by the name its transform was given.

    The key is the transform's ``name`` ("" for the one unnamed transform), never its place
    in the chain, so it does not change when transforms are added, removed or wrapped. Several
    unnamed transforms (or two with the same name) raise a ``ValueError`` that says so; a
    state without any gradclip_jax transform gives ``{}`` (the readers, :func:`stats`,
    :func:`norm_percentile` and :func:`diagnose`, raise for it instead).

    Example:
      >>> import optax, gradclip_jax
      >>> tx = optax.chain(gradclip_jax.clip_by_value(1.0, name="value"),
      ...                  gradclip_jax.clip_by_global_norm(5.0, name="guard"),
      ...                  optax.sgd(0.1))
      >>> sorted(gradclip_jax.find_clip_states(tx.init(None)))
      ['guard', 'value']
    """
    found = _keyed(_locate(opt_state), opt_state, required=False)
    return {k: f.state for k, f in found.items()}


def _states(opt_state: Any) -> dict[str, ClipState]:
    return {k: f.state for k, f in _keyed(_locate(opt_state), opt_state).items()}


def _one_state(opt_state: Any, which: str | None) -> tuple[str, ClipState]:
    states = _states(opt_state)
    if which is None:
        if len(states) > 1:
            raise ValueError(
                f"opt_state holds {len(states)} clip states {sorted(states)}; pass which=..."
            )
        return next(iter(states.items()))
    if which not in states:
        raise ValueError(f"which must be one of {sorted(states)}, got {which!r}")
    return which, states[which]


SKIP_KEYS = ("skipped_steps", "skipped_nonfinite", "skipped_norm_spikes", "skipped_loss_spikes",
             "rebased")
"""The keys of :func:`stats` for one :func:`skip_spikes` guard (its state's fields)."""


def _skip_states(opt_state: Any) -> dict[str, SkipState]:
    nodes = jax.tree_util.tree_flatten_with_path(
        opt_state, is_leaf=lambda x: isinstance(x, SkipState))[0]
    keyed: dict[str, SkipState] = {}
    for path, node in nodes:
        if not isinstance(node, SkipState):
            continue
        key = node.name.value or ""
        if key in keyed:
            what = f"named {key!r}" if key else "with no name"
            raise ValueError(
                f"opt_state holds several skip_spikes guards {what} (the second at "
                f"{jax.tree_util.keystr(path)!r}); give each a distinct name"
            )
        keyed[key] = node
    return keyed


def _readable(opt_state: Any) -> tuple[dict[str, _Found], dict[str, SkipState]]:
    """Every clip and guard state; raises if there is neither."""
    skips = _skip_states(opt_state)
    return _keyed(_locate(opt_state), opt_state, required=not skips), skips


def _batch_shape(found: dict[str, _Found], skips: dict[str, SkipState]) -> tuple[int, ...]:
    """The leading axes the states carry (pmap replicas, a vmapped ensemble of runs), read
    from their step counters, which are scalars in one state; () for one state."""
    counts = [f.state.count for f in found.values()] + [_leaf(g.count) for g in skips.values()]
    return next((tuple(c.shape) for c in counts if c.ndim), ())


def _one_member_please(what: str, shape: tuple[int, ...]) -> ValueError:
    return ValueError(
        f"{what} reads one optimizer state, and this one is batched: its step counter has "
        f"shape {shape} (pmap replicas, or an ensemble of runs under vmap). Pass one member, "
        "for example jax.tree.map(lambda x: x[0], opt_state) (flax.jax_utils.unreplicate for "
        "replicas); stats() and norm_percentile() keep the leading axes."
    )


STATS_KEYS = ("count", "threshold", "grad_norm", "clipped_steps", "nonfinite_steps",
              "clip_rate_recent", "clip_rate_long", "clip_fraction")
"""The keys of :func:`stats` for one clip: the state's fields, then ``clip_fraction``."""


def stats(opt_state: Any) -> dict[str, jax.Array]:
    """Diagnostics of every clip transform in ``opt_state`` as a flat dict of scalar arrays.

    Keys are the :class:`ClipState` field of the same name, plus one derived value:

    - ``count``, ``clipped_steps``, ``nonfinite_steps``: int32 counters;
    - ``threshold``: the threshold applied at the last step (inf when none applied);
    - ``grad_norm``: global L2 norm of the last finite unclipped update (float32);
    - ``clip_rate_recent`` / ``clip_rate_long``: moving averages of the clip indicator over
      about 20 and 500 steps;
    - ``clip_fraction``: ``clipped_steps / count``.

    A :func:`skip_spikes` guard adds ``skipped_steps`` and its reasons,
    ``skipped_nonfinite``, ``skipped_norm_spikes`` and ``skipped_loss_spikes``, and
    ``rebased`` (lasting changes of scale accepted).

    A transform given a ``name`` has its keys prefixed ``"<name>/"``; the one unnamed
    transform has plain keys. Keys depend only on the names, so adding, removing or wrapping
    other transforms never changes them. Raises ``ValueError`` when ``opt_state`` holds no
    clip transform, or several unnamed ones. For a batched state (pmap replicas, or runs
    under ``vmap``: every leaf with leading axes) each value keeps those axes.

    Works inside ``jit`` (values are arrays); :func:`host_stats` and :func:`log_stats` bring
    them to the host as Python numbers in one transfer.

    Example:
      >>> import jax.numpy as jnp, optax, gradclip_jax
      >>> tx = optax.chain(gradclip_jax.clip_by_global_norm(1.0), optax.adam(1e-3))
      >>> state = tx.init({"w": jnp.zeros(2)})
      >>> _, state = tx.update({"w": jnp.array([3.0, 4.0])}, state)
      >>> float(gradclip_jax.stats(state)["clip_fraction"])
      1.0
    """
    out: dict[str, jax.Array] = {}
    clips, skips = _readable(opt_state)
    for name, g in skips.items():
        prefix = f"{name}/" if name else ""
        out.update({f"{prefix}{k}": _leaf(getattr(g, k)) for k in SKIP_KEYS})
    for name, s in ((n, f.state) for n, f in clips.items()):
        prefix = f"{name}/" if name else ""
        out.update({
            f"{prefix}count": s.count,
            f"{prefix}threshold": jnp.where(s.threshold >= NO_THRESHOLD, jnp.inf, s.threshold),
            f"{prefix}grad_norm": s.grad_norm,
            f"{prefix}clipped_steps": s.clipped_steps,
            f"{prefix}nonfinite_steps": s.nonfinite_steps,
            f"{prefix}clip_rate_recent": s.clip_rate_recent,
            f"{prefix}clip_rate_long": s.clip_rate_long,
            f"{prefix}clip_fraction":
                s.clipped_steps.astype(jnp.float32)
                / jnp.maximum(s.count, 1).astype(jnp.float32),
        })
    return out


def host_stats(opt_state: Any) -> dict[str, float | int]:
    """:func:`stats` as Python numbers, brought to the host in one transfer.

    Counters are ``int``, the rest ``float``. Call it outside ``jit``, every N steps. A
    batched state (pmap replicas, runs under ``vmap``) raises ``ValueError``: pass one member.

    Example:
      >>> import jax.numpy as jnp, gradclip_jax
      >>> tx = gradclip_jax.clip_by_global_norm(1.0)
      >>> _, state = tx.update({"w": jnp.array([3.0, 4.0])}, tx.init(None))
      >>> s = gradclip_jax.host_stats(state)
      >>> s["grad_norm"], s["count"]
      (5.0, 1)
    """
    arrays = stats(opt_state)
    shape = next((tuple(v.shape) for v in arrays.values() if jnp.ndim(v)), ())
    if shape:
        raise _one_member_please("host_stats", shape)
    values = jax.device_get(arrays)
    return {k: int(values[k]) if np.issubdtype(np.asarray(values[k]).dtype, np.integer)
            else float(values[k]) for k in arrays}


def log_stats(opt_state: Any, writer: Any, *, step: int | None = None) -> dict[str, float | int]:
    """Logs :func:`stats` to ``writer`` in one host transfer, and returns them.

    ``writer`` may be:

    - a clu metric writer (``clu.metric_writers``): ``writer.write_scalars(step, values)``;
    - a TensorBoard writer (``tensorboardX.SummaryWriter`` or torch's):
      ``writer.add_scalar(key, value, step)`` for each key;
    - any callable (``print``, ``wandb.log``, a list's ``append``): ``writer(values)``, with
      ``values["step"] = step`` when ``step`` is given.

    Example:
      >>> import jax.numpy as jnp, gradclip_jax
      >>> tx = gradclip_jax.clip_by_global_norm(1.0)
      >>> _, state = tx.update({"w": jnp.array([3.0, 4.0])}, tx.init(None))
      >>> logged = []
      >>> _ = gradclip_jax.log_stats(state, logged.append, step=1)
      >>> logged[0]["grad_norm"], logged[0]["step"]
      (5.0, 1)
    """
    values = host_stats(opt_state)
    if hasattr(writer, "write_scalars"):
        writer.write_scalars(0 if step is None else step, values)
    elif hasattr(writer, "add_scalar"):
        for key, value in values.items():
            writer.add_scalar(key, value, step)
    elif callable(writer):
        writer(values if step is None else {**values, "step": step})
    else:
        raise TypeError(
            "writer must have write_scalars (clu), add_scalar (TensorBoard) or be callable, "
            f"got {type(writer).__name__}"
        )
    return values


def norm_percentile(
    opt_state: Any, percentile: float | jax.Array, *, which: str | None = None
) -> jax.Array:
    """Estimated ``percentile`` of the unclipped norms a clip transform has recorded.

    Every gradclip_jax transform keeps the histogram, so this answers "what threshold would
    the 90th-percentile rule pick for my run?" whichever clip you use. It records what its
    threshold is compared with: the L2 norm (``percentile_clip``, ``clip_by_global_norm``),
    the ``ord``-norm for another ``ord``, and the largest magnitude of any coordinate for
    ``clip_by_value``, so the answer is a threshold for that same clip. The estimate is within
    the histogram's relative accuracy (1% by default) of the exact empirical percentile
    (between NumPy's ``method="lower"`` and ``"higher"``) for norms in 1e-8..1e8; NaN when
    nothing was recorded yet.

    Args:
      opt_state: an optax state holding one clip state (or several, with ``which``).
      percentile: in [0, 100].
      which: the path of the clip state (a key of :func:`find_clip_states`) when there are
        several.

    Returns:
      A float32 scalar; for a batched state (pmap replicas, runs under ``vmap``), one value
      per member, with the state's leading axes.

    Example:
      >>> import jax.numpy as jnp, gradclip_jax
      >>> tx = gradclip_jax.clip_by_global_norm(10.0)
      >>> state = tx.init(None)
      >>> for n in range(1, 101):
      ...     _, state = tx.update({"w": jnp.array([float(n)])}, state)
      >>> p90 = float(gradclip_jax.norm_percentile(state, 90))  # exact: 90
      >>> abs(p90 - 90) <= 0.01 * 90
      True
    """
    check_range("percentile", percentile, low=0.0, high=100.0, low_open=False, high_open=False)
    warn_if_quantile("percentile", percentile, stacklevel=3)
    _, state = _one_state(opt_state, which)
    q = jnp.asarray(percentile, jnp.float32) / 100.0
    quantile = lambda sketch: sketch_quantile(sketch, q)  # noqa: E731
    for _ in range(jnp.ndim(state.count)):  # a batched state: one answer per member
        quantile = jax.vmap(quantile)
    return quantile(state.histogram)


@dataclasses.dataclass(frozen=True)
class Finding:
    """One observation of :func:`diagnose`.

    Attributes:
      level: ``"info"`` or ``"warning"``.
      message: a sentence for a person, with the figures it is based on.
      clip: path of the clip state it is about ("" when there is one).
    """

    level: str
    message: str
    clip: str = ""


def _diagnose_one(name: str, found: _Found) -> list[Finding]:
    s = found.state
    started = "start" in s.name.features
    steps = int(s.count)
    findings: list[Finding] = []

    def say(level: str, message: str) -> None:
        findings.append(Finding(level, (f"[{name}] " if name else "") + message, name))

    if found.after is not None:
        say(
            "warning",
            f"this clip comes after an optimizer ({found.after}) in its chain, so it measures "
            f"the optimizer's update (last norm {float(s.grad_norm):.3g}), not the gradient, "
            "and its threshold acts on the step size. Put gradclip_jax's clip first: "
            "optax.chain(clip, optimizer).",
        )
    kind = optimizer_kind(found.feeds)
    if s.recent is not None and found.after is None and kind == "momentum":
        say(
            "info",
            "this windowed percentile clip feeds SGD with momentum (optax TraceState). "
            "Measured on training runs (gradclip-jax outcomes, a vanilla RNN with SGD + "
            "momentum 0.9), the median of the recent norms, which clips about every other "
            "step, ended 7% and 31% above the best fixed threshold on two sets of seeds "
            "(without a start), where percentile_clip(90.0, window=None, start=None), which "
            "clips about one step in six, ended 12% and 1% below it: with momentum, try it. "
            "And with SGD a loss multiplied by k is a learning rate multiplied by k, which "
            "thresholds taken from the norms pass on: if the loss scale may change, give "
            "max_norm."
            + (" Its start (start=, 0.25 by default) made no clear difference there: in "
               "seven runs on six sets of seeds it ended from 16% above the same rule "
               "without it to 15% below, 7% below on the largest (384 runs, where the "
               "classic rule ended 9% below the start); the classic rule above has none "
               "(start=None)."
               if started else ""),
        )
    kin = _KIND_STATE.get(kind) or next((n for n in found.feeds if n in ADAM_KIN), "")
    if s.recent is not None and found.after is None and not started and kin:
        say("info", f"this windowed percentile clip feeds {ADAM_KIN[kin]} (optax {kin}) and has "
            f"no start. {_START_MEASURED[kind]} (gradclip_jax.percentile_clipped(optimizer) "
            "picks it for this optimizer).")
    if steps == 0:
        say("info", "no steps recorded yet.")
        return findings
    nonfinite = int(s.nonfinite_steps)
    if nonfinite:
        say(
            "warning",
            f"{nonfinite} of {steps} steps had a NaN or Inf gradient; their updates were "
            "zeroed or passed on (see nonfinite=). Look for a loss blow-up, a division by "
            "zero or a too-high learning rate.",
        )
    outside = _outside_range(s)
    if outside:
        say("warning", outside)
    fraction = int(s.clipped_steps) / steps
    if steps < FEW_STEPS:
        say(
            "info",
            f"only {steps} step{'s' if steps > 1 else ''} recorded (clipped on "
            f"{int(s.clipped_steps)}): too few to judge the threshold; check again after "
            f"{FEW_STEPS} or more.",
        )
        return findings
    recent = float(s.clip_rate_recent)
    slow = float(s.clip_rate_long)
    p90 = float(sketch_quantile(s.histogram, 0.9))
    measure = s.name.measure
    what = "unclipped norms" if measure == L2_NORM else f"{measure} before clipping"
    suggestion = f" The 90th percentile of the {what} is {p90:.3g}." if p90 == p90 else ""
    threshold = float(s.threshold)
    current = "none" if threshold >= NO_THRESHOLD else f"{threshold:.3g}"
    running_away = _running_away(s)
    if running_away:
        say("warning", running_away)
        return findings

    if recent >= RECENT_MOSTLY:
        if s.recent is not None:
            say(
                "info",
                f"clipped on {recent:.0%} of recent steps (threshold {current}), by design: "
                "the windowed percentile clip caps every update at a percentile of the "
                "recent norms (by default their median). The usual heuristic would call this a "
                "learning-rate cap; on "
                "training runs (gradclip-jax outcomes) it ended with a lower validation loss "
                "than rare clipping. Judge it by your validation loss.",
            )
        elif steps < EARLY_STEPS:
            say(
                "info",
                f"clipped on {recent:.0%} of recent steps in the first {steps} steps. Early "
                "training is often unstable and clipping is doing its job; check again later.",
            )
        elif slow < WAS_STABLE:
            say(
                "warning",
                f"the run was stable (long-run clip rate {slow:.0%}) and now clips on "
                f"{recent:.0%} of recent steps: something changed, usually the learning rate "
                "or the data, and clipping may be masking it." + suggestion,
            )
        else:
            say(
                "warning",
                f"clipped on {recent:.0%} of recent steps (threshold {current}): by the usual "
                "heuristic the threshold acts as a per-step learning-rate cap rather than a "
                "safety net, and should be raised." + suggestion + " Measured on training runs "
                "(gradclip-jax outcomes), frequent clipping is not always worse: c=1 clipped "
                "most steps of a vanilla RNN trained with SGD and still gave the lowest "
                "validation loss of the fixed thresholds. Compare validation loss before "
                "raising it.",
            )
    elif fraction < RARELY:
        say(
            "info",
            f"clipped on {int(s.clipped_steps)} of {steps} steps ({fraction:.1%}): a rare "
            "safety net, the threshold is fine.",
        )
    elif recent <= NEAR_ZERO:
        say(
            "info",
            f"clipping was frequent earlier ({fraction:.1%} of all steps) and has dropped to "
            f"near zero ({recent:.1%} of recent steps): healthy, early training was unstable "
            "and clipping kept it from diverging.",
        )
    else:
        say(
            "info",
            f"clipped on {recent:.0%} of recent steps and {fraction:.1%} of all steps "
            f"(threshold {current}).",
        )
    if s.recent is not None and threshold < NO_THRESHOLD:
        share = _share_taken_off(s.recent, threshold)
        if share >= SHARE_HIGH:
            say(
                "info",
                f"at its threshold ({current}) this clip takes about {share:.0%} off the sum "
                "of the recent unclipped norms (widely spread norms, or a spike among them): "
                "on average a cut of the step of that order. Measured on training runs "
                "(gradclip-jax outcomes, norm taken off), the median rule (no start) took "
                "7-24% off with AdamW, Adam and plain SGD, where it ended level with or below "
                "the best fixed threshold, and 36% on a vanilla RNN trained with SGD + "
                "momentum, where it "
                "ended 7-31% above it (c=3, which took 9% off). There "
                "percentile_clip(90.0, window=None, start=None) took 16% off and did as well as "
                "c=3: with a momentum optimizer, try it. With plain SGD on that RNN, cutting "
                "most steps did best: percentile_clip(10.0, start=None), which "
                "percentile_clipped picks for plain SGD, took about half off and ended 4-15% "
                "below the best fixed threshold, losing no run.",
            )
    return findings


def _running_away(s: ClipState) -> str:
    """The warning for norms running away under a percentile clip, or ''.

    Nearly every recent step clipped, and the latest norms (the recent sketch's median for a
    windowed percentile clip, else the last norm) far above the run's median, or, for a
    windowed clip whose run was unstable from its first steps (its median has risen with its
    norms), far above its calmer norms (its 10th percentile): if the loss rises too, the run
    diverges, and a threshold that follows the norms passes it on. A fixed threshold does not
    follow them: its clip-rate findings apply.
    """
    recent = float(s.clip_rate_recent)
    threshold = float(s.threshold)
    if "fixed" in s.name.features or recent < NEARLY_ALL or threshold >= NO_THRESHOLD:
        return ""
    median = float(sketch_quantile(s.histogram.whole, 0.5))
    if s.recent is not None:
        latest = float(sketch_quantile(s.recent, 0.5))
        grown = f"the recent norms (median {latest:.3g}) are"
    else:
        latest = float(s.grad_norm)
        grown = f"the last norm ({latest:.3g}) is"
    growth = latest / median if median > 0 else 0.0
    calm = float(sketch_quantile(s.histogram.whole, 0.1))
    from_calm = latest / calm if calm > 0 else 0.0
    if growth >= RUNAWAY_GROWTH:
        grown = f"{grown} {growth:.0f}x the run's median ({median:.3g})"
    elif s.recent is not None and from_calm >= RUNAWAY_FROM_CALM:
        # Only against the recent sketch's median: a single last norm 12x the 10th percentile
        # is common (the classic rule's kept momentum RNN runs: 10 of 96 at some step).
        grown = (f"{grown} {from_calm:.0f}x the run's 10th percentile ({calm:.3g}) and "
                 f"{growth:.1f}x its median ({median:.3g}), which has risen with them")
    else:
        return ""
    multiple = MEDIAN_MULTIPLE if s.recent is None else WINDOW_MEDIAN_MULTIPLE
    rise = f"{MAX_RISE_PER_STEP - 1:.0%} a step"
    if "max_norm" in s.name.features:
        ceiling = ("Its max_norm is the most the threshold can reach: lower the learning rate, "
                   "or that ceiling, toward the norms of the run's calmer steps (its 10th "
                   f"percentile so far is {calm:.3g}).")
    else:
        ceiling = ("Lower the learning rate, or give a ceiling, max_norm, near the norms of "
                   f"the run's calmer steps (its 10th percentile so far is {calm:.3g}).")
    return (
        f"the norms are running away: {grown}, and {recent:.0%} of recent steps were clipped, "
        f"at {threshold:.3g}. If the training loss is rising, the run is diverging, and this "
        "clip's threshold follows its norms "
        f"upward (by at most {rise}, to at most {multiple:g}x the run's median, which rises "
        "as the new norms fill the history), so it bounds each update less and less. "
        "Measured on training runs (gradclip-jax outcomes' vanilla RNN, plain SGD at its "
        "highest learning rate, one run of 240 seeds), the default lost 3 runs this way, each "
        "flagged by this finding, and none of the 237 it kept was (c=1 lost 1; "
        "percentile_clip(10.0, start=None), which percentile_clipped picks for plain SGD, "
        "lost none of those seeds in its own run); on a GRU LM with SGD + momentum at a "
        "learning rate where no clipping lost every run, it lost 3 of 3, each flagged against "
        f"the run's 10th percentile, where c=1 lost none. {ceiling} If instead the scale changed "
        f"for good (a new loss scale), the threshold follows it at up to {rise} once the "
        "norms stop growing."
    )


def _outside_share(sketch: NormSketch) -> str:
    """The shares of the sketch's weight below and above its range, in words, or '' when
    they are under ``OUTSIDE_SHARE`` (an isolated spike above the range is clipped anyway)."""
    counts = np.asarray(sketch.counts, np.float64)
    total = counts.sum()
    if total <= 0 or counts[0] + counts[-1] < OUTSIDE_SHARE * total:
        return ""
    low, high = sketch.value_range
    return " and ".join(f"{share:.0%} {side} {bound:g}" for share, side, bound in (
        (counts[0] / total, "below", low), (counts[-1] / total, "above", high)) if share > 0)


def _outside_range(s: ClipState) -> str:
    """Words for the recorded values outside the histogram's own buckets, or ''."""
    parts = _outside_share(s.histogram)
    if not parts:
        return ""
    low, high = s.histogram.value_range
    what = "norms" if s.name.measure == L2_NORM else f"values ({s.name.measure})"
    return (f"of the recorded {what}, {parts} lie outside the histogram's "
            f"range ({low:g} to {high:g}). They are read back as its "
            "bounds, so their percentiles (a percentile clip's threshold, norm_percentile, "
            "the suggestions here) stop there whatever the scale: a percentile clip would "
            "cut norms above the range to its top. For a percentile clip, pass "
            "norm_range=(low, high) around your norms; a fixed threshold is not affected.")


def share_taken_off(norms: np.ndarray, thresholds: Any, weights: np.ndarray) -> np.ndarray:
    """The share of a weighted sum of norms that clipping at ``thresholds`` removes:
    ``sum(w * max(n - c, 0)) / sum(w * n)`` along the last axis, 0 where that sum is 0. An
    entry of weight 0 counts for nothing, whatever its norm (NaN included), and a norm at or
    below its threshold (or with a NaN or infinite one) loses nothing."""
    norms = np.asarray(norms, np.float64)
    weights = np.asarray(weights, np.float64)
    thresholds = np.broadcast_to(np.asarray(thresholds, np.float64), norms.shape)
    used = weights > 0
    kept = np.where(used, norms, 0.0)
    excess = np.subtract(kept, thresholds, out=np.zeros_like(kept),
                         where=used & (kept > thresholds))
    total = (weights * kept).sum(axis=-1)
    removed = (weights * excess).sum(axis=-1)
    return np.divide(removed, total, out=np.zeros_like(total), where=total > 0)


def _share_taken_off(sketch: NormSketch, threshold: float) -> float:
    """About what share of the sum of the norms in ``sketch`` a clip at ``threshold`` removes,
    from each bucket's representative value (so within the sketch's relative accuracy of each
    norm); 0 for an empty sketch."""
    counts = np.asarray(sketch.counts, np.float64)
    values = np.asarray(sketch.mapping.value(jnp.arange(counts.size)), np.float64)
    return float(share_taken_off(values, threshold, counts))


def diagnose(opt_state: Any) -> list[Finding]:
    """Reads the clip states in ``opt_state`` and says, in words, what clipping is doing.

    Rules (each finding carries the figures it is based on):

    - any non-finite steps: warning with the count;
    - 1% or more of the recorded values (or of a skip guard's norms or losses) outside the
      histogram's range (``norm_range``, 1e-8 to 1e8 by default): warning with the shares
      below and above, since percentiles stop at the range's bounds;
    - clipped on most recent steps (moving average over ~20 steps >= 50%): a warning that the
      threshold acts as a learning-rate cap by the usual heuristic, with the 90th-percentile
      norm as a suggestion, and what the training-outcomes benchmark measured (frequent
      clipping can still give the lowest validation loss); for the windowed percentile clip,
      which clips about half the steps or more by design, an info saying so;
      or, when the long-run rate (~500 steps) was low, a warning that the run was stable and
      something changed (learning rate, data), which clipping may be masking; within the
      first 100 steps, an info that early training often clips;
    - the clip comes after an optimizer state in its chain (any optax state but a wrapper's,
      a schedule's or a monitor's, ``optax.contrib``'s included; it measures the update, not
      the gradient): warning, put the clip first;
    - a windowed percentile clip followed in its chain by SGD with momentum (an optax
      ``TraceState``, and no state of an optimizer that normalises the step, such as Adam's):
      info, what the median rule and ``percentile_clip(90.0, window=None, start=None)`` did with
      momentum on training runs, and that with SGD a change of the loss scale is a change of the
      learning rate (give ``max_norm``), and, for a clip with a ``start`` (the default has
      one), what the start did there;
    - a windowed percentile clip with no ``start`` followed in its chain by Adam (an optax
      ``ScaleByAdamState``: adam, adamw, nadam), Adafactor, AdaBelief, Lion or Muon: info,
      naming the optimizer, what ``percentile_clip(start=0.25)`` (for Lion ``start=0.1``) did
      with it on training runs;
    - fewer than 20 steps: info, too few to judge (only the rules above apply);
    - norms running away under a percentile clip (90% or more of recent steps clipped, and
      the recent norms, or without a recent window the last norm, at least 8x the run's
      median, or for a windowed clip 12x its 10th percentile): a warning, in place of the
      clip-rate and share findings below, that its threshold follows diverging norms
      upward, with what the training-outcomes benchmark measured and a ``max_norm`` near
      the run's calmer norms (or, for a clip given one, that it is the most the threshold
      reaches; a fixed threshold does not follow the norms: its clip-rate findings below
      apply);
    - clipped on under 1% of all steps: info, the threshold is fine;
    - frequent clipping earlier that has dropped to near zero: info, healthy;
    - otherwise an info with the rates;
    - and, for the windowed percentile clip, an info when its threshold takes 30% or more off
      the sum of the recent unclipped norms (from its recent histogram): what that share was
      on training runs, and ``percentile_clip(90.0, window=None, start=None)`` for momentum
      optimizers, where the median rule took most off and trailed the best fixed threshold.

    Call it outside ``jit``: it reads concrete values (inside ``jit`` it raises a TypeError
    that says so). Raises ``ValueError`` when ``opt_state`` holds no clip transform, and for a
    batched state (pmap replicas, runs under ``vmap``), naming its leading axes: pass one
    member.

    Example:
      >>> import jax.numpy as jnp, gradclip_jax
      >>> tx = gradclip_jax.clip_by_global_norm(1.0)
      >>> state = tx.init(None)
      >>> for _ in range(200):
      ...     _, state = tx.update({"w": jnp.array([0.5])}, state)
      >>> [f.level for f in gradclip_jax.diagnose(state)]
      ['info']
    """
    found, skips = _readable(opt_state)
    if any(isinstance(x, jax.core.Tracer)
           for x in jax.tree.leaves(([f.state for f in found.values()], skips))):
        raise TypeError(
            "diagnose reads concrete values on the host and cannot run inside jit; call it "
            "outside, on the state your jitted step returns (stats works inside jit)"
        )
    shape = _batch_shape(found, skips)
    if shape:
        raise _one_member_please("diagnose", shape)
    findings: list[Finding] = []
    for name, g in skips.items():
        findings.extend(_diagnose_skip(name, g))
    for name, f in found.items():
        findings.extend(_diagnose_one(name, f))
    return findings


def _diagnose_skip(name: str, g: SkipState) -> list[Finding]:
    steps, skipped = int(_leaf(g.count)), int(_leaf(g.skipped_steps))
    tag = f"[{name}] " if name else ""
    findings = []
    for what, sketch in (("norms", g.norms), ("losses", g.losses)):
        share = _outside_share(_plain_sketch(sketch))
        if share:
            low, high = sketch.value_range
            fix = (" Pass skip_spikes(norm_range=(low, high)) around your norms."
                   if what == "norms" else "")
            findings.append(Finding(
                "warning", f"{tag}skip_spikes: of the recent {what}, {share} lie outside its "
                f"sketch's range ({low:g} to {high:g}). While their median does, it cannot be "
                f"measured, and no finite value is skipped as a spike of them.{fix}", name))
    if skipped == 0:
        return findings + [Finding("info", f"{tag}skip_spikes skipped none of {steps} steps.",
                                   name)]
    reasons = (f"{int(_leaf(g.skipped_nonfinite))} non-finite, "
               f"{int(_leaf(g.skipped_norm_spikes))} gradient-norm spikes, "
               f"{int(_leaf(g.skipped_loss_spikes))} loss spikes")
    fraction = skipped / max(steps, 1)
    level = "warning" if fraction > RARELY else "info"
    message = (f"{tag}skip_spikes skipped {skipped} of {steps} steps ({fraction:.1%}: "
               f"{reasons}).")
    if level == "warning":
        message += (" More than 1% of steps is more than rare spikes: look for a learning rate "
                    "that is too high, bad batches or a loss that overflows.")
    rebased = int(_leaf(g.rebased))
    if rebased:
        message += (f" The scale changed lastingly {rebased} time(s): the guard accepted the "
                    "new scale after its max_consecutive skipped steps.")
    return findings + [Finding(level, message, name)]
