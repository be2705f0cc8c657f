"""The public surface: what is exported, what leaves are accepted, stable stats keys, logging,
the typed core parts, and the packaging details (version, py.typed, mypy)."""

import dataclasses
import importlib.resources
import math
import shutil
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gradclip_jax as gc
from gradclip_jax import _core
from gradclip_jax._apply import Rescale
from gradclip_jax._diagnostics import STATS_KEYS

TRANSFORMS = {
    "norm": lambda **kw: gc.clip_by_global_norm(1.0, **kw),
    "value": lambda **kw: gc.clip_by_value(1.0, **kw),
    "percentile": lambda **kw: gc.percentile_clip(**kw),
}


def test_public_names_are_exactly_the_usable_ones():
    assert sorted(gc.__all__) == sorted([
        "ClipState", "Finding", "SkipState", "skip_spikes", "clip_by_global_norm",
        "clip_by_value", "diagnose",
        "find_clip_states", "global_norm", "host_stats", "log_stats", "norm_percentile",
        "percentile_clip", "percentile_clipped", "stats",
    ])
    for inert in ("LogMapping", "NormSketch", "MEDIAN_MULTIPLE"):
        assert not hasattr(gc, inert)


# Leaves of every kind


def test_complex_leaves_are_clipped_by_their_modulus():
    tx = gc.clip_by_global_norm(1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no casting warning either
        out, state = tx.update({"w": jnp.array([3 + 4j])}, tx.init(None))
    np.testing.assert_allclose(np.asarray(out["w"]), [0.6 + 0.8j], rtol=1e-6)
    assert out["w"].dtype == jnp.complex64
    assert float(gc.stats(state)["grad_norm"]) == pytest.approx(5.0)
    ref = optax.clip_by_global_norm(1.0).update({"w": jnp.array([3 + 4j])}, None)[0]
    np.testing.assert_allclose(np.asarray(out["w"]), np.asarray(ref["w"]), rtol=1e-6)


def test_global_norm_of_complex_leaves_matches_numpy():
    z = np.array([3 + 4j, -1 + 2j, 0.5j], np.complex64)
    tree = {"z": jnp.asarray(z), "x": jnp.array([2.0])}
    flat = np.concatenate([z, [2.0]])
    for ord in (1, 2, math.inf):
        expected = np.linalg.norm(flat, ord)
        assert float(gc.global_norm(tree, ord=ord)) == pytest.approx(expected, rel=1e-6)


def test_percentile_clip_takes_complex_leaves():
    tx = gc.percentile_clip(warmup_steps=2, start=None)
    state = tx.init(None)
    for z in (3 + 4j, 4 + 3j, 0 + 5j):
        out, state = tx.update({"w": jnp.array([z])}, state)
    out, state = tx.update({"w": jnp.array([300 + 400j])}, state)
    assert float(jnp.abs(out["w"][0])) == pytest.approx(5.0 * 1.0, rel=0.011)


def test_value_clip_rejects_complex_leaves_by_name():
    tx = gc.clip_by_value(1.0)
    with pytest.raises(TypeError, match=r"clip_by_value cannot clip the complex leaf \['z'\]"):
        tx.update({"x": jnp.ones(2), "z": jnp.array([1 + 1j])}, tx.init(None))


@pytest.mark.parametrize("kind", sorted(TRANSFORMS))
@pytest.mark.parametrize("dtype", [jnp.int32, jnp.uint8, jnp.bool_])
def test_integer_and_bool_leaves_raise_a_type_error_naming_the_leaf(kind, dtype):
    tx = TRANSFORMS[kind]()
    updates = {"w": jnp.ones(2), "steps": jnp.array([3, 4]).astype(dtype)}
    with pytest.raises(TypeError, match=r"leaf \['steps'\] has dtype"):
        tx.update(updates, tx.init(None))
    with pytest.raises(TypeError, match=r"leaf \['steps'\]"):
        jax.jit(tx.update)(updates, tx.init(None))


@pytest.mark.parametrize("kind", sorted(TRANSFORMS))
def test_python_number_leaves_are_clipped_like_arrays(kind):
    # optax.clip accepts a Python float as a leaf; so do we, with or without jit.
    tx = TRANSFORMS[kind]()
    state = tx.init(None)
    for scale in (1.0, 1.0, 10.0):  # the last step is clipped by every transform
        numbers = {"a": 3.0 * scale, "b": -0.25 * scale}
        arrays = {k: jnp.array(v) for k, v in numbers.items()}
        for update in (tx.update, jax.jit(tx.update)):
            expected, ref_state = update(arrays, state)
            out, new_state = update(numbers, state)
            np.testing.assert_array_equal(np.asarray(out["a"]), np.asarray(expected["a"]))
            np.testing.assert_array_equal(np.asarray(out["b"]), np.asarray(expected["b"]))
            assert float(new_state.grad_norm) == float(ref_state.grad_norm)
        state = ref_state
    assert int(state.clipped_steps) >= 1


# Arguments that a user gets wrong


@pytest.mark.parametrize("reader", ["percentile_clip", "norm_percentile"])
def test_a_quantile_passed_as_percentile_warns(reader):
    state = gc.clip_by_global_norm(1.0).init(None)
    call = {"percentile_clip": lambda p: gc.percentile_clip(p),
            "norm_percentile": lambda p: gc.norm_percentile(state, p)}[reader]
    with pytest.warns(UserWarning, match=r"0.9th percentile, not the 90th; pass percentile=90"):
        call(0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        call(90.0)


def test_warmup_steps_zero_is_rejected_not_silently_one():
    with pytest.raises(ValueError, match="warmup_steps must be an integer >= 1, got 0"):
        gc.percentile_clip(warmup_steps=0)


@pytest.mark.parametrize("factory", [gc.clip_by_value, gc.clip_by_global_norm])
def test_a_threshold_array_must_be_a_scalar(factory):
    arg = "max_value" if factory is gc.clip_by_value else "max_norm"
    with pytest.raises(TypeError, match=rf"{arg} must be a real scalar .* shape \(3,\)"):
        factory(jnp.ones(3))
    tx = factory(jnp.asarray(2.0))  # a 0-d array is a scalar
    out, _ = tx.update({"w": jnp.array([5.0])}, tx.init(None))
    assert float(out["w"][0]) == 2.0


@pytest.mark.parametrize("kind", sorted(TRANSFORMS))
@pytest.mark.parametrize("name,error", [("", ValueError), ("a/b", ValueError), (3, TypeError)])
def test_bad_names_fail_at_construction(kind, name, error):
    with pytest.raises(error, match="name must be"):
        TRANSFORMS[kind](name=name)


# Stable stats keys


def _run(tx, steps=3, params=None):
    params = {"w": jnp.ones(3)} if params is None else params
    state = tx.init(params)
    for i in range(steps):
        _, state = tx.update({"w": jnp.full(3, 2.0 + i)}, state, params)
    return state


def test_stats_keys_are_the_state_fields():
    fields = set(gc.ClipState._fields)
    assert set(STATS_KEYS) - fields == {"clip_fraction"}
    state = _run(optax.chain(gc.clip_by_global_norm(1.0), optax.sgd(0.1)))
    s = gc.stats(state)
    assert list(s) == list(STATS_KEYS)
    clip = gc.find_clip_states(state)[""]
    for key in STATS_KEYS[:-1]:
        if key != "threshold":
            assert np.asarray(s[key]) == np.asarray(getattr(clip, key)), key


def test_stats_keys_do_not_change_when_the_chain_changes_shape():
    named = gc.clip_by_global_norm(1.0, name="clip")
    shapes = [
        optax.chain(named, optax.adam(1e-3)),
        optax.chain(gc.clip_by_value(5.0, name="guard"), named, optax.adam(1e-3)),
        optax.chain(named, gc.percentile_clip(), optax.adam(1e-3)),
        optax.MultiSteps(optax.chain(gc.clip_by_value(5.0), named, optax.sgd(0.1)), 1),
        optax.inject_hyperparams(
            lambda learning_rate: optax.chain(named, optax.sgd(learning_rate)))(0.1),
    ]
    for tx in shapes:
        keys = set(gc.stats(_run(tx)))
        assert {f"clip/{k}" for k in STATS_KEYS} <= keys
    # An unnamed clip keeps its plain keys when a named one is added next to it.
    alone = set(gc.stats(_run(optax.chain(gc.percentile_clip(), optax.sgd(0.1)))))
    both = set(gc.stats(_run(optax.chain(gc.clip_by_value(5.0, name="guard"),
                                          gc.percentile_clip(), optax.sgd(0.1)))))
    assert alone == set(STATS_KEYS) and alone <= both


def test_two_unnamed_clips_ask_for_names():
    state = _run(optax.chain(gc.clip_by_value(5.0), gc.clip_by_global_norm(1.0)))
    for reader in (gc.stats, gc.diagnose, gc.find_clip_states):
        with pytest.raises(ValueError, match="several clip transforms with no name.*name="):
            reader(state)
    state = _run(optax.chain(gc.clip_by_value(5.0, name="a"), gc.clip_by_global_norm(1.0,
                                                                                      name="a")))
    with pytest.raises(ValueError, match="several clip transforms named 'a'"):
        gc.stats(state)


# Logging


def test_host_stats_are_python_numbers_from_one_transfer(monkeypatch):
    state = _run(optax.chain(gc.clip_by_global_norm(1.0, name="clip"),
                             gc.percentile_clip(name="adaptive"), optax.sgd(0.1)))
    calls = []
    real = jax.device_get
    monkeypatch.setattr(jax, "device_get", lambda x: calls.append(1) or real(x))
    values = gc.host_stats(state)
    assert len(calls) == 1
    assert len(values) == 2 * len(STATS_KEYS)
    assert type(values["clip/count"]) is int and values["clip/count"] == 3
    assert type(values["clip/grad_norm"]) is float
    assert values["clip/grad_norm"] == pytest.approx(4.0 * math.sqrt(3))


class _TensorBoardLike:
    def __init__(self):
        self.rows = []

    def add_scalar(self, tag, value, global_step=None):
        self.rows.append((tag, value, global_step))


class _CluLike:
    def __init__(self):
        self.calls = []

    def write_scalars(self, step, scalars):
        self.calls.append((step, dict(scalars)))


def test_log_stats_writes_to_tensorboard_clu_and_callables():
    state = _run(optax.chain(gc.clip_by_global_norm(1.0), optax.sgd(0.1)))
    expected = gc.host_stats(state)
    tb = _TensorBoardLike()
    assert gc.log_stats(state, tb, step=7) == expected
    assert tb.rows == [(k, v, 7) for k, v in expected.items()]
    clu = _CluLike()
    gc.log_stats(state, clu, step=7)
    assert clu.calls == [(7, expected)]
    got = []
    gc.log_stats(state, got.append)
    assert got == [expected]
    with pytest.raises(TypeError, match="writer must have write_scalars"):
        gc.log_stats(state, 3)


# The typed core


def test_the_core_takes_typed_parts_not_strings():
    with pytest.raises(TypeError, match="rule must be a ThresholdRule"):
        _core.clip_transformation(lambda s: 1.0, Rescale(2))
    with pytest.raises(TypeError, match="apply must be an Apply part, got str 'nrom'"):
        _core.clip_transformation(gc._fixed.FixedThreshold(1.0), "nrom")


def test_a_new_rule_is_one_small_class():
    @dataclasses.dataclass(frozen=True)
    class TwiceLastNorm(_core.ThresholdRule):
        def threshold(self, state):
            return jnp.where(state.count > 0, 2.0 * state.grad_norm, _core.NO_THRESHOLD)

    tx = _core.clip_transformation(TwiceLastNorm(), Rescale(2), name="twice")
    state = tx.init(None)
    _, state = tx.update({"w": jnp.array([3.0, 4.0])}, state)
    out, state = tx.update({"w": jnp.array([30.0, 40.0])}, state)
    np.testing.assert_allclose(np.asarray(out["w"]), [6.0, 8.0], rtol=1e-6)
    assert int(gc.stats(state)["twice/clipped_steps"]) == 1


# Packaging


def test_version_is_the_installed_distribution_version():
    from importlib import metadata

    assert gc.__version__ == metadata.version("gradclip-jax")
    out = subprocess.run([sys.executable, "-m", "gradclip_jax._cli.main", "--version"],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == f"gradclip-jax {gc.__version__}"


def test_package_is_marked_typed():
    assert importlib.resources.files("gradclip_jax").joinpath("py.typed").is_file()


@pytest.mark.skipif(shutil.which("mypy") is None, reason="mypy is in the test extra")
def test_library_is_mypy_clean():
    result = subprocess.run(["mypy"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_optax_tree_get_reads_the_same_fields():
    state = _run(optax.chain(gc.clip_by_global_norm(1.0), optax.adam(1e-3)))
    assert float(optax.tree.get(state, "grad_norm")) == pytest.approx(4.0 * math.sqrt(3))
    assert int(optax.tree.get(state, "clipped_steps")) == 3
