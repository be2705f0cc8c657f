"""The percentile clip's promise on a real training run, with no tuning.

A vanilla RNN on the adding problem, trained with plain SGD, suffers an injected 1000x gradient
spike every 97 steps (a stable run with rare faults). Unclipped training diverges; the default
percentile clip loses no seed and ends within 10% of the best fixed threshold from
{0.1, 1, 10} chosen in hindsight.
"""

import numpy as np
import optax

import gradclip_jax as gc
from gradclip_jax.examples import rnn


def test_percentile_clip_matches_the_best_fixed_threshold_on_spiky_rnn_training():
    cfg = rnn.Config(learning_rate=0.05, spike_every=97, spike_factor=1000.0, steps=1200,
                     seeds=6)
    sgd = optax.sgd(cfg.learning_rate)
    unclipped = rnn.train(cfg, sgd)
    assert unclipped.diverged(cfg).mean() >= 0.5

    fixed = {}
    for c in (0.1, 1.0, 10.0):
        result = rnn.train(cfg, optax.chain(gc.clip_by_global_norm(c), sgd))
        if not result.diverged(cfg).any():
            fixed[c] = float(np.mean(result.final_loss()))
    best = min(fixed.values())

    adaptive = rnn.train(cfg, optax.chain(gc.percentile_clip(), sgd))
    assert not adaptive.diverged(cfg).any()
    assert float(np.mean(adaptive.final_loss())) <= 1.10 * best
    # It is a safety net, not a learning-rate cap: it clips a minority of steps.
    assert adaptive.clipped.mean() < 0.25
