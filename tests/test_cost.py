"""Memory traffic and compiled structure of each clip (XLA cost analysis and HLO text).

These are deterministic measures of the compiled program, not timings; wall-clock figures are
in ``gradclip-jax bench``.
"""

import math
import re

import jax
import jax.numpy as jnp
import jaxlib
import optax
import pytest

import gradclip_jax as gc
from gradclip_jax._cli.cost import (
    bytes_accessed,
    extra_gradient_passes,
    gradient_bytes,
    model_params,
    train_step,
)

# ~8M float32 parameters in 96 leaves, as the performance contract specifies.
PARAMS = model_params(8_000_000, 96)

JAXLIB = tuple(int(x) for x in re.match(r"(\d+)\.(\d+)\.(\d+)", jaxlib.__version__).groups())
compiler_figures = pytest.mark.skipif(
    JAXLIB < (0, 10, 2),
    reason=f"a figure of the XLA in jaxlib >= 0.10.2 (here {jaxlib.__version__}), whose CPU "
    "backend hands a sum of squares to a vectorised library with the squaring inside. Older "
    "XLA (measured: jaxlib 0.8.0 to 0.10.1) splits a long reduction into a tree and writes the "
    "squares out first: about 3 extra passes for the norm clip, 6 for the value clip, 7 for "
    "optax's clip. test_fewer_reads_than_optax_clip holds there too.")
"""The tests that pin this compiler's fusion figures: CI installs the newest jaxlib."""

before_xla_0_11 = pytest.mark.skipif(
    JAXLIB >= (0, 11, 0),
    reason=f"a figure of the XLA in jaxlib 0.10 (here {jaxlib.__version__}; CI's Python 3.11 "
    "gets 0.10.2, jaxlib >= 0.11 needs Python >= 3.12). Measured on jaxlib 0.11.2 and 0.12.0.1: "
    "in bfloat16, Adam's two moment updates read the raw gradient again beside the rescaled "
    "update (the clip's select of the unclipped leaf is fused into each), 5.0 passes where "
    "0.10 has 3.0 (optax's clip: 9.0 there, 7.0 here); and optax.monitor's norm is no longer "
    "merged with the clip's (2.0 passes). test_bfloat16_clips_read_less_than_optax_clip holds "
    "on both.")
"""Figures of jaxlib 0.10 that newer XLA does not reproduce (see the reason)."""


@compiler_figures
@pytest.mark.parametrize("name,clip", [
    ("clip_by_global_norm", gc.clip_by_global_norm(1.0)),
    ("percentile_clip", gc.percentile_clip()),
    ("percentile_clip_decay_cap", gc.percentile_clip(decay=0.999, max_norm=5.0)),
])
def test_at_most_one_extra_gradient_read(name, clip):
    assert extra_gradient_passes(clip, PARAMS) <= 1.05


@compiler_figures
@pytest.mark.parametrize("name,clip", [
    ("clip_by_value", gc.clip_by_value(1.0)),
    ("clip_by_global_norm_ord_inf", gc.clip_by_global_norm(1.0, ord=math.inf)),
    ("clip_by_global_norm_ord_1", gc.clip_by_global_norm(1.0, ord=1)),
])
def test_two_measures_cost_one_read_each_on_cpu(name, clip):
    # These need two measures of each leaf (the sum of squares and the largest or summed
    # magnitude). Each is a single-output reduction, one read each on XLA's CPU backend (GPU
    # backends fuse sibling reductions of one operand). Nothing is written out and read back.
    assert extra_gradient_passes(clip, PARAMS) <= 2.05


@pytest.mark.parametrize("clip", [gc.clip_by_global_norm(1.0), gc.percentile_clip()],
                         ids=["norm", "percentile"])
def test_fewer_reads_than_optax_clip(clip):
    # On every jaxlib: optax's clip writes the clipped gradients out and adam reads them
    # back, where ours fuses its scale into adam's update (1.0 against 5.0 extra passes on
    # jaxlib 0.10.2, 3.1 against 7.1 on 0.8.0 to 0.10.1).
    theirs = extra_gradient_passes(optax.clip_by_global_norm(1.0), PARAMS)
    assert extra_gradient_passes(clip, PARAMS) <= theirs - 2.0


def test_the_measure_sees_optax_extra_passes():
    # The measure is not blind: optax's own clip materialises the clipped gradients.
    assert extra_gradient_passes(optax.clip_by_global_norm(1.0), PARAMS) > 3.0


@compiler_figures
@before_xla_0_11
def test_the_optax_way_of_logging_the_norm_adds_no_read_to_a_clip():
    # optax's recipe for logging the norm before clipping: optax.monitor in front of the clip.
    # XLA merges the monitor's norm with the clip's, so logging costs no extra read; what
    # costs is optax's clip itself, which writes the clipped gradients out.
    def monitored(clip, norm):
        measures = {"norm_before_clip": norm,
                    "is_clipped_ema": optax.measure_with_ema(lambda u: norm(u) > 1.0, 0.9)}
        return optax.chain(optax.monitor(measures), clip)

    ours = extra_gradient_passes(monitored(gc.clip_by_global_norm(1.0), gc.global_norm), PARAMS)
    mixed = extra_gradient_passes(monitored(gc.percentile_clip(), optax.tree.norm), PARAMS)
    theirs = extra_gradient_passes(
        monitored(optax.clip_by_global_norm(1.0), optax.tree.norm), PARAMS)
    assert ours <= 1.05 and mixed <= 1.05
    assert theirs > 4.0


ODD = 83_333  # its largest divisor up to 256 is 167


def _compiled(tx, params):
    """The HLO text of a compiled optimizer step of ``tx`` on ``params``."""
    return train_step(tx).lower(params, tx.init(params), params).compile().as_text()


def _compiled_step_text(clip, n_leaves, dtype=jnp.float32):
    params = [jnp.zeros((ODD,), dtype) for _ in range(n_leaves)]
    return _compiled(optax.chain(clip, optax.adam(1e-3)), params)


def _entry(text):
    return text[text.index("\nENTRY"):]


CLIPS = [
    gc.clip_by_global_norm(1.0),
    gc.clip_by_value(1.0),
    gc.percentile_clip(),
    gc.clip_by_global_norm(1.0, ord=math.inf),
]


@pytest.mark.parametrize("clip", CLIPS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_no_multi_output_reduction(clip, dtype):
    # XLA's CPU backend runs a multi-output (variadic) reduce as a scalar loop: 5-7x slower than
    # a single-output reduce, and 50x on odd lengths once split into blocks.
    text = _compiled_step_text(clip, 4, dtype)
    tuple_reduce = re.compile(r"= \([a-z0-9]+\[[0-9,]*\][^)]*\) (fusion|reduce)\(")
    reduces = [line for line in text.splitlines() if " reduce(" in line or "reduce_fusion" in line]
    assert reduces or "ynn_fusion" in text  # the pattern below has something to look at
    assert not tuple_reduce.search(text)


@pytest.mark.parametrize("clip", CLIPS)
def test_per_element_work_does_not_grow_with_leaf_count(clip):
    # The per-step scalars (every leaf's partial norm combined, the threshold rule) are
    # computed once. If XLA fused them into each leaf's elementwise update, every such fusion
    # would take one operand per leaf and redo the combination for every element.
    def widest_elementwise_fusion(n_leaves):
        entry = _entry(_compiled_step_text(clip, n_leaves))
        widths = [line.split(" fusion(", 1)[1].split(")", 1)[0].count("%")
                  for line in entry.splitlines() if re.search(rf"= f32\[{ODD}\]\{{0\}} fusion\(",
                                                              line)]
        assert widths, "no elementwise update fusion found"
        return max(widths)

    assert widest_elementwise_fusion(48) == widest_elementwise_fusion(4)
    assert widest_elementwise_fusion(48) <= 8


@pytest.mark.parametrize("platform", ["cpu", "cuda", "rocm", "tpu"])
def test_the_scalar_barrier_is_a_reduce_window_on_every_platform(platform):
    # The per-step scalars stay out of the elementwise updates only behind an op XLA does not
    # fuse into its users; lowered for each backend (no device needed), it is a reduce-window,
    # not elementwise ops that a scan lowering would leave.
    from gradclip_jax._core import computed_once

    step = jax.jit(lambda a, b: computed_once(a, b > 0))
    text = step.trace(jnp.float32(1.0), jnp.float32(2.0)).lower(
        lowering_platforms=(platform,)).as_text()
    assert text.count("stablehlo.reduce_window") == 1, text


def test_jit_of_update_alone_keeps_scalars_once():
    # The same holds without an optimizer after the clip.
    tx = gc.clip_by_value(1.0)
    grads = [jnp.zeros((ODD,)) for _ in range(32)]
    text = _entry(jax.jit(tx.update).lower(grads, tx.init(grads)).compile().as_text())
    widths = [line.split(" fusion(", 1)[1].split(")", 1)[0].count("%")
              for line in text.splitlines() if f"f32[{ODD}]" in line and " fusion(" in line]
    assert widths and max(widths) <= 6


def _guard_step_text(inner, n_leaves=4):
    params = [jnp.zeros((ODD,), jnp.float32) for _ in range(n_leaves)]
    return _entry(_compiled(gc.skip_spikes(inner), params))


@compiler_figures
def test_a_guard_and_the_clip_inside_it_take_the_norm_once():
    # The guard hands its measurement to the clip that sees the same arrays, so there is one
    # reduction of each gradient leaf (to a scalar), not two.
    text = _guard_step_text(optax.chain(gc.clip_by_global_norm(1.0), optax.adamw(1e-3)))
    scalar_reductions = [line for line in text.splitlines()
                         if re.search(r"= f32\[\] fusion\(", line) and "grads_" in line]
    assert len(scalar_reductions) == 4


@compiler_figures
@pytest.mark.parametrize("inner,base", [
    (optax.chain(gc.clip_by_global_norm(1.0), optax.adamw(1e-3)), optax.adamw(1e-3)),
    (optax.chain(gc.percentile_clip(), optax.adamw(1e-3)), optax.adamw(1e-3)),
    (optax.adamw(1e-3), optax.adamw(1e-3)),
    (optax.sgd(1e-3, momentum=0.9), optax.sgd(1e-3, momentum=0.9)),
], ids=["norm_clip+adamw", "percentile_clip+adamw", "adamw", "momentum"])
def test_guard_clip_and_optimizer_read_the_gradients_once_more_than_the_optimizer(inner, base):
    # The norm, taken once for the guard and the clip inside it, is the one extra read. Before
    # the guard replayed the inner update, XLA's CPU backend recomputed Adam's moments inside
    # the parameter update once they passed through the skip's select (2.01 with a clip
    # inside); without a clip, the norm's g * g also merged with Adam's and was written out
    # and read back (4.01).
    tx = gc.skip_spikes(inner)
    extra = (bytes_accessed(tx, PARAMS) - bytes_accessed(base, PARAMS)) / gradient_bytes(PARAMS)
    assert extra <= 1.05


@compiler_figures
@pytest.mark.parametrize("clip,passes", [
    (gc.clip_by_global_norm(1.0), 3), (gc.percentile_clip(), 3), (gc.clip_by_value(1.0), 4),
    (gc.clip_by_global_norm(1.0, ord=math.inf), 4)], ids=["norm", "percentile", "value", "inf"])
def test_bfloat16_norms_write_no_float32_copy(clip, passes):
    dtype = jnp.bfloat16
    # XLA's CPU backend computes bf16 arithmetic in float32; the optimizer's converts and
    # the norm's must not merge (the merged float32 copy of every leaf was written out and
    # read back: 9.3 passes over a bf16 tree instead of 3), nor may one broadcast scale be
    # shared by every leaf of a shape.
    entry = _entry(_compiled_step_text(clip, 8, dtype))
    assert not re.search(rf"= f32\[{ODD}\]", entry)
    params = [jnp.zeros((ODD,), dtype) for _ in range(8)]
    state = clip.init(None)
    compiled = jax.jit(lambda g: clip.update(g, state)[0]).lower(params).compile()
    nbytes = sum(x.size * x.dtype.itemsize for x in params)
    # Read for each measure (one or two), read for the update, write the update.
    assert compiled.cost_analysis()["bytes accessed"] / nbytes <= passes + 0.05


@compiler_figures
@before_xla_0_11
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("clip", [gc.clip_by_global_norm(1.0), gc.percentile_clip()],
                         ids=["norm", "percentile"])
def test_bfloat16_rescale_costs_what_a_constant_scale_costs(clip, dtype):
    # In bfloat16 XLA's CPU backend writes out any rescaled update before Adam's two moment
    # updates read it, even a constant optax.scale(0.5) (2.0 passes; 0.0 in float32). A
    # rescaling clip can then cost no less than that plus the one read for its norm, and
    # costs no more.
    # Large enough that the percentile clip's histograms (15 KB) are no share of a pass.
    params = [jnp.zeros((ODD,), dtype) for _ in range(8)] + [jnp.zeros((1000, 257), dtype)]
    floor = extra_gradient_passes(optax.scale(0.5), params)
    assert floor == (0.0 if dtype == jnp.float32 else 2.0)
    assert extra_gradient_passes(clip, params) <= floor + 1.05


@compiler_figures
@pytest.mark.parametrize("clip,at_most", [
    (gc.clip_by_global_norm(1.0), 5), (gc.percentile_clip(), 5), (gc.clip_by_value(1.0), 4)],
    ids=["norm", "percentile", "value"])
def test_bfloat16_clips_read_less_than_optax_clip(clip, at_most):
    # On every XLA measured (jaxlib 0.10.2, 0.11.2, 0.12.0.1). With the float32 copy of each
    # bfloat16 leaf that XLA >= 0.11 wrote out (the copy was a barrier's operand), the norm
    # clip cost 9.0 passes there, as much as optax's clip, and the value clip 6.0.
    params = [jnp.zeros((ODD,), jnp.bfloat16) for _ in range(8)] + [
        jnp.zeros((1000, 257), jnp.bfloat16)]
    theirs = extra_gradient_passes(optax.clip_by_global_norm(1.0), params)
    ours = extra_gradient_passes(clip, params)
    assert ours <= at_most + 0.05 and ours <= theirs - 2.95


def _elementwise_ops(clip, dtype=jnp.float32, n_leaves=2):
    """Op counts in the fused elementwise computation that writes one clipped leaf."""
    grads = [jnp.zeros((ODD,), dtype) for _ in range(n_leaves)]
    text = jax.jit(clip.update).lower(grads, clip.init(grads)).compile().as_text()
    entry = _entry(text)
    dt = jnp.dtype(dtype).name.replace("float", "f").replace("bf16", "bf16")
    out = [line for line in entry.splitlines()
           if re.search(rf"= {dt}\[{ODD}\]\{{0\}} fusion\(", line)]
    assert out, "no elementwise update fusion found"
    name = re.search(r"calls=(%[\w.\-]+)", out[0]).group(1)
    body = text[text.index(f"\n{name} "):]
    body = body[:body.index("\n}")]
    ops = re.findall(r"= [a-z0-9]+\[[0-9,]*\](?:\{[0-9,]*\})? ([a-z\-]+)\(", body)
    return {op: ops.count(op) for op in set(ops)}


@pytest.mark.parametrize("nonfinite", ["zero", "propagate"])
def test_value_clip_costs_two_comparisons_and_two_selects_per_element(nonfinite):
    # On leaves of odd lengths XLA's CPU backend updates elements in a scalar loop, so each
    # elementwise op counts: the value clip's old chain (two comparisons, an or, min, max and
    # three selects) made its step 1.4x optax's norm clip on 96 leaves of 83,333. One bound,
    # computed once per step, covers clipped, unclipped and non-finite steps.
    ops = _elementwise_ops(gc.clip_by_value(1.0, nonfinite=nonfinite))
    assert ops.get("compare", 0) <= 2 and ops.get("select", 0) <= 2, ops
    assert "maximum" not in ops and "minimum" not in ops and "or" not in ops, ops


_LAUNCHED = re.compile(r"= \S+ (fusion|sort|dot|custom-call|scatter|dynamic-update-slice|"
                       r"reduce|reduce-window|copy|convolution|while|conditional)\(")


def _kernels(clip, params):
    """Kernels (top-level fusions and other ops that launch work) of a compiled clip + adam step."""
    entry = _entry(_compiled(optax.chain(clip, optax.adam(1e-3)), params))
    return sum(bool(_LAUNCHED.search(line)) for line in entry.splitlines())


def _loop_kernels(clip, params, steps=10):
    """Kernels in the body of a jitted loop of clip + adam steps (the largest computation
    called by the while loop, where a small model's training loop spends its time)."""
    tx = optax.chain(clip, optax.adam(1e-3))
    step = train_step(tx)

    def loop(p, s):
        return jax.lax.fori_loop(0, steps, lambda i, c: step(c[0], c[1], c[0]), (p, s))

    text = jax.jit(loop).lower(params, tx.init(params)).compile().as_text()
    name = re.search(r" while\(.*body=(%[\w.\-]+)", _entry(text)).group(1)
    body = text[text.index(f"\n{name} "):]
    body = body[:body.index("\n}")]
    return sum(bool(_LAUNCHED.search(line)) for line in body.splitlines())


def _library_calls(clip, params):
    """Kernels of a compiled clip + adam step that call a library (a matmul, a custom call)."""
    entry = _entry(_compiled(optax.chain(clip, optax.adam(1e-3)), params))
    called = re.compile(r"= \S+ (dot|custom-call)\(|kind=kCustom")
    return sum(bool(called.search(line)) for line in entry.splitlines())


def test_percentile_clip_adds_few_kernels_to_a_tiny_models_step():
    # On a 10k-parameter model a step is ~10 us inside a jitted loop, so the percentile
    # rule's histogram work must stay a few cheap kernels: the sketches store running sums,
    # so recording a value is one elementwise pass, and a quantile a two-level search of
    # them (two kernels, both sketches at once), with no prefix sum per step; the rule is
    # evaluated once (the state's threshold comes out of the computed_once barrier).
    # Measured: 39 kernels against the norm clip's 37 (40 while the recent sketch was an
    # array of its own, not the histogram's second row; 41 while it kept a
    # count of its own, the histogram's twin; 43 against 39 before a small model's
    # tree was joined whole; 45 when every bucket was compared,
    # whose sum took a cascade of three; 56 with a prefix sum of two matmuls per step, 81
    # with jnp.cumsum).
    from gradclip_jax._cli.shapes import tiny_mlp

    params = tiny_mlp(jnp.float32)
    norm = _kernels(gc.clip_by_global_norm(1.0), params)
    assert _kernels(gc.percentile_clip(), params) <= norm + 2
    # And inside a jitted loop (41 against 39; 42 with the recent sketch an array of its
    # own: the step 1.105x -> 1.047x the norm clip's). Every scalar the histograms' update reads
    # must come out of the computed_once barrier: "record this norm", taken before it,
    # put the norms' combination into that update (44 kernels, the step 1.07x -> 1.11x the
    # norm clip's, measured).
    norm = _loop_kernels(gc.clip_by_global_norm(1.0), params)
    assert _loop_kernels(gc.percentile_clip(), params) <= norm + 2


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_the_quantile_calls_no_matmul(dtype):
    # Kernel count is not cost: the quantile's count of buckets, done as a matmul by a vector
    # of ones, was one kernel where a sum is four, yet that library call took ~6 us of a
    # ~10 us tiny-model step on XLA's CPU backend (percentile step 1.44x the norm clip's
    # inside a jitted loop, 1.11x with the sum). The rule adds no library call to the step.
    from gradclip_jax._cli.shapes import tiny_mlp

    params = tiny_mlp(dtype)
    norm = _library_calls(gc.clip_by_global_norm(1.0), params)
    assert _library_calls(gc.percentile_clip(), params) == norm
    # Nor does the guard's spike test (sums and a segment sum over its sketches).
    assert _library_calls(gc.skip_spikes(gc.clip_by_global_norm(1.0)), params) == norm


def _norm_kernels(params, ord=2):
    """Top-level kernels of a compiled ``global_norm``, and the length of the longest vector
    its leaves are joined into (0 if none is)."""
    text = _entry(jax.jit(lambda t: gc.global_norm(t, ord=ord)).lower(params).compile().as_text())
    launched = re.compile(r"= \S+ (fusion|reduce|reduce-window|concatenate|copy)\(")
    lines = [line for line in text.splitlines() if launched.search(line)]
    sizes = [math.prod(int(d) for d in m.group(1).split(",") if d)
             for line in lines
             if "concatenate" in line and (m := re.search(r"= \w+\[([\d,]*)\]", line))]
    return len(lines), max(sizes, default=0)


def test_a_thousand_tiny_leaves_are_reduced_together():
    # Each kernel launch costs more than reading a leaf of a few thousand elements, so small
    # leaves are joined into one vector and reduced once: a handful of kernels for the norm of
    # a thousand leaves, not one (or three, as a reduce-window cascade) per leaf.
    from gradclip_jax._cli.shapes import tiny_leaves

    params = tiny_leaves(jnp.float32)
    count, _ = _norm_kernels(params)
    assert count <= 10
    tx = gc.clip_by_value(1.0)
    text = _entry(jax.jit(tx.update).lower(params, tx.init(params)).compile().as_text())
    reductions = [line for line in text.splitlines()
                  if re.search(r"= f32\[\] (fusion|reduce)\(", line)]
    assert len(reductions) <= 10


@compiler_figures
@pytest.mark.parametrize("ord,at_most", [(2, 3), (math.inf, 4)])
def test_a_small_models_leaves_are_reduced_together(ord, at_most):
    # Inside a jitted loop a 10k-parameter step is ~10 us and each kernel launch ~1 us, so a
    # tree of at most TINY_TREE elements is joined whole: one copy, one reduction per measure
    # and the root, where its two large leaves and the joined small ones took three reductions
    # (5 kernels for the L2 norm, 9 for the largest magnitude).
    from gradclip_jax._cli.shapes import tiny_mlp

    params = tiny_mlp(jnp.float32)
    count, largest = _norm_kernels(params, ord)
    assert count <= at_most
    assert largest == sum(x.size for x in jax.tree.leaves(params))  # every leaf in one vector


def test_a_larger_model_joins_only_its_small_leaves():
    # Past TINY_TREE the joined copy costs more than the launches it saves (29x slower at
    # 387k elements, measured): only leaves of at most SMALL_LEAF elements are joined.
    from gradclip_jax import _norms

    params = {"w": jnp.zeros((_norms.TINY_TREE,)), "v": jnp.zeros((3, 1000)),
              "b": jnp.zeros((100,)), "c": jnp.zeros((7,))}
    _, largest = _norm_kernels(params)
    assert largest == 107  # the two small leaves, joined; the large ones reduced in place


@pytest.mark.parametrize("clip,arrays", [
    (lambda: gc.clip_by_global_norm(1.0), 9),
    (lambda: gc.clip_by_value(1.0), 9),
    (lambda: gc.percentile_clip(), 9),
    (lambda: gc.percentile_clip(window=None), 9),
])
def test_state_is_a_few_arrays_whatever_the_tree(clip, arrays):
    # A jitted call pays for each array it takes and returns, which is most of what the
    # clips cost per call on a tiny model (README, Benchmark): the state holds a fixed
    # number of them, one per field that optax.tree.get can find, whatever the parameters.
    # The percentile clip's recent sketch is its histogram's second row, not an array (and a
    # kernel in every step) of its own: it had 10.
    tx = clip()
    for params in (None, {"w": jnp.ones(3)}, [jnp.ones((i % 7) + 1) for i in range(1000)]):
        assert len(jax.tree.leaves(tx.init(params))) == arrays
