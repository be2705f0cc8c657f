"""Memory traffic: each clip costs at most ~one extra read of the gradients (XLA cost analysis).

This is a deterministic measure of the compiled program, not a timing; wall-clock figures are in
``gradclip-jax bench``.
"""

import math

import optax
import pytest

import gradclip_jax as gc
from gradclip_jax._cli.cost import extra_gradient_passes, model_params

# ~8M float32 parameters in 96 leaves, as the performance contract specifies.
PARAMS = model_params(8_000_000, 96)


@pytest.mark.parametrize("name,clip", [
    ("clip_by_global_norm", gc.clip_by_global_norm(1.0)),
    ("clip_by_value", gc.clip_by_value(1.0)),
    ("percentile_clip", gc.percentile_clip()),
    ("percentile_clip_decay_cap", gc.percentile_clip(decay=0.999, max_norm=5.0)),
    ("clip_by_global_norm_ord_inf", gc.clip_by_global_norm(1.0, ord=math.inf)),
])
def test_at_most_one_extra_gradient_read(name, clip):
    assert extra_gradient_passes(clip, PARAMS) <= 1.05


def test_the_measure_sees_optax_extra_passes():
    # The measure is not blind: optax's own clip materialises the clipped gradients.
    assert extra_gradient_passes(optax.clip_by_global_norm(1.0), PARAMS) > 3.0
