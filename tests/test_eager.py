"""An ``update`` called eagerly (outside ``jit``) runs as one compiled call, and only then.

Op by op, a clip step dispatched about a hundred small operations: 3x to 5x optax's clip on a
tiny model, and seconds for the first call of a process. The compiled call must give what a
jitted step gives, compile once per configuration and tree, and leave every traced use
(``jit``, ``grad``, ``vmap``, a guard's replay) tracing the step inline as before.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gradclip_jax as gc
from gradclip_jax import _core
from tests.helpers import CLIPS, assert_same_bits

GRADS = {"w": jnp.arange(1.0, 7.0).reshape(2, 3), "b": jnp.array([0.5, -2.0])}


def scaled(scale):
    return jax.tree.map(lambda x: x * scale, GRADS)


_TRACES = [0]


def _count_traces(name, *_, **__):
    _TRACES[0] += name == "/jax/core/compile/jaxpr_trace_duration"


# Registered once: jax 0.8 has no way to unregister a listener.
jax.monitoring.register_event_duration_secs_listener(_count_traces)


class Traces:
    """Counts the functions JAX traces to jaxprs while the block runs (jit, make_jaxpr)."""

    def __enter__(self):
        self._start = _TRACES[0]
        return self

    def __exit__(self, *exc):
        self.count = _TRACES[0] - self._start


def compiles_of(fn):
    """How many programs the eager step compiles while ``fn`` runs."""
    before = _core._compiled_step._cache_size()
    fn()
    return _core._compiled_step._cache_size() - before


@pytest.mark.parametrize("name", sorted(CLIPS))
def test_eager_steps_equal_jitted_steps_bit_for_bit(name):
    tx = CLIPS[name]()
    update = jax.jit(tx.update)
    eager = jitted = tx.init(GRADS)
    for i, scale in enumerate([0.05, 3.0, 40.0, float("nan"), 0.0, 7.0]):
        out_e, eager = tx.update(scaled(scale), eager)
        out_j, jitted = update(scaled(scale), jitted)
        assert_same_bits(out_e, out_j)
        assert_same_bits(eager, jitted)
        assert int(eager.count) == i + 1


@pytest.mark.parametrize("name", sorted(CLIPS))
def test_eager_steps_compile_once_per_configuration_and_tree(name):
    tx = CLIPS[name]()
    state = tx.init(GRADS)

    def steps(tx, state, n):
        for scale in np.linspace(0.5, 9.0, n):
            _, state = tx.update(scaled(float(scale)), state)
        return state

    first = compiles_of(lambda: steps(tx, state, 5))
    assert first <= 1  # 0 when an earlier test compiled this configuration already
    # Further steps, and a second transform built with the same arguments, reuse it.
    assert compiles_of(lambda: steps(tx, state, 5)) == 0
    assert compiles_of(lambda: steps(CLIPS[name](), state, 3)) == 0
    # Another tree is another program.
    wider = {"w": jnp.ones((2, 3)), "b": jnp.ones((2,)), "c": jnp.ones((5,))}
    assert compiles_of(lambda: tx.update(wider, tx.init(wider))) <= 1


def test_the_compiled_step_is_its_own_program_only_eagerly():
    tx = gc.percentile_clip()
    state = tx.init(GRADS)
    # Traced (jit, make_jaxpr, vmap, grad), the step is traced inline: no call of the eager
    # step's program, so a jitted training step compiles what it did before.
    jaxpr = jax.make_jaxpr(tx.update)(GRADS, state)
    names = [e.params.get("name") for e in jaxpr.jaxpr.eqns]
    assert "_step" not in names
    assert compiles_of(lambda: jax.jit(tx.update)(scaled(2.0), state)) == 0
    assert compiles_of(lambda: jax.vmap(tx.update, in_axes=(0, None))(
        jax.tree.map(lambda x: jnp.stack([x, 2 * x]), GRADS), state)) == 0
    assert compiles_of(lambda: jax.grad(
        lambda g: jnp.sum(tx.update(g, state)[0]["w"]))(GRADS)) == 0


def test_injected_arguments_run_op_by_op_and_compile_nothing():
    # optax.inject_hyperparams rebuilds the clip at every step with its arguments as arrays,
    # which cannot key a compiled program (a new compile per step, were they hashed by id).
    tx = optax.inject_hyperparams(gc.percentile_clip)(percentile=50.0)
    update = jax.jit(tx.update)
    eager = jitted = tx.init(GRADS)
    n = compiles_of(lambda: None)
    for scale in [1.0, 2.0, 30.0, 1.5]:
        out_e, eager = tx.update(scaled(scale), eager)
        out_j, jitted = update(scaled(scale), jitted)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), out_e, out_j)
    assert n == 0
    assert compiles_of(lambda: tx.update(scaled(3.0), eager)) == 0


def test_an_unhashable_schedule_runs_op_by_op():
    class Schedule:  # a callable that defines __eq__ and so has no hash
        def __eq__(self, other):
            return isinstance(other, Schedule)

        __hash__ = None  # type: ignore[assignment]

        def __call__(self, count):
            return 1.0 + count

    tx = gc.clip_by_global_norm(Schedule())
    state = tx.init(GRADS)
    n = compiles_of(lambda: None)
    out, state = tx.update(scaled(10.0), state)
    assert n == 0 and compiles_of(lambda: tx.update(scaled(10.0), state)) == 0
    np.testing.assert_allclose(float(gc.global_norm(out)), 1.0, rtol=1e-6)
    _, state = tx.update(scaled(10.0), state)
    assert float(state.threshold) == 2.0


def test_a_guard_eagerly_is_one_compiled_call_equal_to_the_guard_jitted():
    # skip_spikes traces its inner step for a replay on every call: op by op, an eager step
    # traced the inner chain each time (37 ms against 4 ms for optax's clip on a 10k MLP).
    tx = gc.skip_spikes(optax.chain(gc.percentile_clip(), optax.adam(0.1)), warmup_steps=3)
    update = jax.jit(tx.update)
    eager = jitted = tx.init(GRADS)
    for i, scale in enumerate([1.0, 1.2, 0.9, 1.1, 500.0, float("inf"), 1.0]):
        with Traces() as traces:
            out_e, eager = tx.update(scaled(scale), eager, GRADS, loss=jnp.float32(scale))
        if i > 0:  # the first call traces (and compiles) the step; later ones reuse it
            assert traces.count == 0
        out_j, jitted = update(scaled(scale), jitted, GRADS, loss=jnp.float32(scale))
        assert_same_bits(out_e, out_j)
        assert_same_bits(eager, jitted)
    assert int(gc.stats(eager)["skipped_steps"]) == 2


def test_a_guard_with_injected_settings_runs_op_by_op():
    # optax.inject_hyperparams builds a guard per step with its settings as arrays: compiled
    # per guard, that would be a compile per step. The step is traced per call instead.
    tx = optax.inject_hyperparams(gc.skip_spikes, static_args=("inner",))(
        optax.chain(gc.percentile_clip(), optax.sgd(0.1)), k=6.0)
    update = jax.jit(tx.update)
    eager = jitted = tx.init(GRADS)
    for scale in [1.0, 2.0, 1.5, 300.0]:
        with Traces() as traces:
            out_e, eager = tx.update(scaled(scale), eager, GRADS)
        assert traces.count >= 1
        out_j, jitted = update(scaled(scale), jitted, GRADS)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), out_e, out_j)
