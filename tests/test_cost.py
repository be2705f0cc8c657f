"""Memory traffic and compiled structure of each clip (XLA cost analysis and HLO text).

These are deterministic measures of the compiled program, not timings; wall-clock figures are
in ``gradclip-jax bench``.
"""

import math
import re

import jax
import jax.numpy as jnp
import optax
import pytest

import gradclip_jax as gc
from gradclip_jax._cli.cost import extra_gradient_passes, model_params, train_step

# ~8M float32 parameters in 96 leaves, as the performance contract specifies.
PARAMS = model_params(8_000_000, 96)


@pytest.mark.parametrize("name,clip", [
    ("clip_by_global_norm", gc.clip_by_global_norm(1.0)),
    ("percentile_clip", gc.percentile_clip()),
    ("percentile_clip_decay_cap", gc.percentile_clip(decay=0.999, max_norm=5.0)),
])
def test_at_most_one_extra_gradient_read(name, clip):
    assert extra_gradient_passes(clip, PARAMS) <= 1.05


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


def test_the_measure_sees_optax_extra_passes():
    # The measure is not blind: optax's own clip materialises the clipped gradients.
    assert extra_gradient_passes(optax.clip_by_global_norm(1.0), PARAMS) > 3.0


ODD = 83_333  # its largest divisor up to 256 is 167


def _compiled_step_text(clip, n_leaves, dtype=jnp.float32):
    params = [jnp.zeros((ODD,), dtype) for _ in range(n_leaves)]
    tx = optax.chain(clip, optax.adam(1e-3))
    lowered = train_step(tx).lower(params, tx.init(params), params)
    return lowered.compile().as_text()


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


def test_jit_of_update_alone_keeps_scalars_once():
    # The same holds without an optimizer after the clip.
    tx = gc.clip_by_value(1.0)
    grads = [jnp.zeros((ODD,)) for _ in range(32)]
    text = _entry(jax.jit(tx.update).lower(grads, tx.init(grads)).compile().as_text())
    widths = [line.split(" fusion(", 1)[1].split(")", 1)[0].count("%")
              for line in text.splitlines() if f"f32[{ODD}]" in line and " fusion(" in line]
    assert widths and max(widths) <= 6
