"""percentile_clipped: the rule chosen for each optimizer, and the chain it then is."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gradclip_jax as gc
from gradclip_jax._auto import RULES, rule_for
from tests.helpers import run_norm_stream

PARAMS = {"w": jnp.ones((5, 3)), "b": jnp.zeros(3)}

OPTIMIZERS = {
    "adam": (optax.adam(1e-2), "adam"),
    "adamw": (optax.adamw(1e-2, b2=0.95), "adam"),
    "nadam": (optax.nadam(1e-2), "adam"),
    "injected_adamw": (optax.inject_hyperparams(optax.adamw)(learning_rate=1e-2), "adam"),
    "momentum": (optax.sgd(1e-2, momentum=0.9), "momentum"),
    "nesterov": (optax.sgd(1e-2, momentum=0.9, nesterov=True), "momentum"),
    "momentum_schedule": (optax.sgd(optax.linear_schedule(0.0, 1e-2, 10), momentum=0.9),
                          "momentum"),
    "sgd": (optax.sgd(1e-2), "sgd"),
    "sgd_schedule": (optax.sgd(optax.linear_schedule(0.0, 1e-2, 10)), "sgd"),
    "noisy_sgd": (optax.noisy_sgd(1e-2, key=jax.random.key(0)), "sgd"),
    "sgd_momentum_0": (optax.sgd(1e-2, momentum=0.0), "momentum"),  # a TraceState: documented
    # Normalising optimizers on which the start was measured (the transformer LM): Adam's kin.
    "adafactor": (optax.adafactor(1e-2), "adam"),
    "lion": (optax.lion(1e-4), "lion"),
    "muon": (optax.contrib.muon(1e-2), "muon"),  # Adam's state too, for the vector "b"
    "adabelief": (optax.adabelief(1e-3), "adam"),
    # Measured level with the default (RMSProp), or not measured: the default.
    "rmsprop": (optax.rmsprop(1e-3), "other"),
    "amsgrad": (optax.amsgrad(1e-3), "other"),
    # Optimizers that set their own step size from the gradients' statistics (optax.contrib),
    # whose states the rule knows not by name: the default, not plain SGD's rule.
    "prodigy": (optax.contrib.prodigy(), "other"),
    "dadapt_adamw": (optax.contrib.dadapt_adamw(), "other"),
    "dog": (optax.contrib.dog(), "other"),
    "cocob": (optax.contrib.cocob(), "other"),
    "schedule_free_sgd": (optax.contrib.schedule_free_sgd(1e-2), "other"),
    "schedule_free_adamw": (optax.contrib.schedule_free_adamw(1e-3), "other"),
    "momo": (optax.contrib.momo(), "other"),
    # Optimizers that keep no state cannot be told from plain SGD (README): SGD's rule.
    "sign_sgd": (optax.sign_sgd(1e-2), "sgd"),
}


def grads(step):
    # Norms that fall, then a spike: every rule clips some of these steps.
    key = jax.random.key(step)
    scale = 5.0 * 0.9**step + (50.0 if step == 17 else 0.0)
    return jax.tree.map(lambda p: scale * jax.random.normal(key, p.shape), PARAMS)


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_the_rule_is_the_one_measured_for_the_optimizer(opt_name):
    optimizer, kind = OPTIMIZERS[opt_name]
    assert rule_for(optimizer.init(PARAMS)) == kind
    state = gc.percentile_clipped(optimizer).init(PARAMS)
    clip_state = gc.find_clip_states(state)[""]
    assert clip_state.name.features == (("start",) if kind in ("adam", "lion", "muon") else ())
    assert (clip_state.recent is None) == (kind == "momentum")  # the classic rule: no window


@pytest.mark.parametrize("opt_name", ["adamw", "momentum", "sgd", "lion", "adafactor", "muon"])
def test_it_trains_bit_for_bit_as_the_chain_it_names(opt_name):
    optimizer, kind = OPTIMIZERS[opt_name]
    ours = gc.percentile_clipped(optimizer, max_norm=20.0)
    theirs = optax.chain(gc.percentile_clip(**RULES[kind], max_norm=20.0), optimizer)
    states = [ours.init(PARAMS), theirs.init(PARAMS)]
    steps = [jax.jit(ours.update), jax.jit(theirs.update)]
    clipped = 0
    for t in range(30):
        out = [step(grads(t), s, PARAMS) for step, s in zip(steps, states, strict=True)]
        for a, b in zip(jax.tree.leaves(out[0]), jax.tree.leaves(out[1]), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        states = [o[1] for o in out]
        clipped = int(gc.stats(states[0])["clipped_steps"])
    assert clipped > 0  # the comparison covered clipped steps
    assert jax.tree.structure(states[0]) == jax.tree.structure(states[1])


def test_diagnose_reads_it_as_a_chain_and_does_not_suggest_what_it_chose():
    for optimizer in (optax.adamw(1e-2), optax.lion(1e-4), optax.adafactor(1e-2),
                      optax.sgd(1e-2, momentum=0.9)):
        tx = gc.percentile_clipped(optimizer)
        state = tx.init(PARAMS)
        for t in range(25):
            _, state = tx.update(grads(t), state, PARAMS)
        messages = " ".join(f.message for f in gc.diagnose(state))
        assert "has no start" not in messages  # Adam and its kin, Lion: it has the start
        assert "TraceState" not in messages  # momentum: the classic rule, no window
        assert int(gc.stats(state)["count"]) == 25
        # The optax way reaches the clip's fields too (Adam's state also has a "count").
        assert int(optax.tree.get(state, "clipped_steps")) == int(
            gc.stats(state)["clipped_steps"]) > 0


def test_under_skip_spikes_and_multisteps():
    tx = optax.MultiSteps(gc.skip_spikes(gc.percentile_clipped(optax.adam(1e-2)),
                                         warmup_steps=3), every_k_schedule=2)
    state = tx.init(PARAMS)
    update = jax.jit(tx.update)
    for t in range(8):
        _, state = update(grads(t), state, PARAMS, loss=jnp.float32(1.0))
    assert int(gc.stats(state)["count"]) == 4  # the clip saw the 4 emitted steps


@pytest.mark.parametrize("opt_name", ["adamw", "momentum", "sgd", "lion", "adafactor"])
def test_every_rule_takes_the_norm_range(opt_name):
    state = gc.percentile_clipped(OPTIMIZERS[opt_name][0], norm_range=(1e-3, 1e13)).init(PARAMS)
    clip_state = gc.find_clip_states(state)[""]
    sketches = [clip_state.histogram] + ([clip_state.recent] if clip_state.recent else [])
    assert all(s.value_range == (1e-3, 1e13) for s in sketches)


def test_bad_arguments_fail_at_construction():
    with pytest.raises(TypeError, match="optimizer must be an optax GradientTransformation"):
        gc.percentile_clipped(optax.adam)  # the factory, not a transformation
    with pytest.raises(ValueError, match=r"max_norm must be in \(0.0, inf\), got -1.0"):
        gc.percentile_clipped(optax.adam(1e-3), max_norm=-1.0)
    with pytest.raises(ValueError, match="nonfinite"):
        gc.percentile_clipped(optax.adam(1e-3), nonfinite="skip")


@pytest.mark.parametrize("opt_name, low, high", [
    ("sgd", 0.80, 0.97),  # the 10th percentile: about nine steps in ten
    ("momentum", 0.03, 0.25),  # the classic 90th percentile of every norm
    ("rmsprop", 0.35, 0.65),  # the default: the recent median
])
def test_how_often_each_rule_clips_stationary_norms(opt_name, low, high):
    optimizer, _ = OPTIMIZERS[opt_name]
    norms = np.exp(np.random.default_rng(1).normal(0.0, 0.4, 400))
    *_, clipped = run_norm_stream(gc.percentile_clipped(optimizer), norms,
                                  params={"w": jnp.zeros(1)})
    rate = clipped.mean()
    assert low <= rate <= high, rate
