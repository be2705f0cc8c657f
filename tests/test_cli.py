"""The gradclip-jax command: argument errors, a tiny end-to-end demo, bench pieces, and
interrupted writes leaving nothing behind."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gradclip_jax as gc
from gradclip_jax._cli import bench, main, shapes


@pytest.mark.parametrize("argv", [
    [],
    ["train"],
    ["demo", "--seeds", "0"],
    ["demo", "--steps", "-5"],
    ["demo", "--steps", "many"],
    ["bench", "--json"],
    ["bench", "--seconds", "0"],
    ["bench", "--seconds", "long"],
    ["bench", "--only"],
    ["outcomes", "--percentile", "0"],
    ["outcomes", "--percentile", "ninety"],
    ["outcomes", "--window", "0"],
    ["outcomes", "--early-cap", "-30"],
    ["outcomes", "--start", "0"],
    ["outcomes", "--start", "2"],
    ["outcomes", "--seeds", "0"],
    ["outcomes", "--first-seed", "-1"],
    ["outcomes", "--first-seed", "one"],
    ["outcomes", "--lr", "0"],
    ["outcomes", "--lr", "fast"],
    ["outcomes", "--lr", "inf"],
])
def test_bad_arguments_exit_with_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main.main(argv)
    assert exc.value.code == 2
    assert "usage: gradclip-jax" in capsys.readouterr().err


def test_tiny_demo_writes_table_plots_and_json(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main.main(["demo", "--quick", "--seeds", "2", "--steps", "30", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "percentile clip" in printed and "diverged" in printed
    files = sorted(os.listdir(out))
    assert files == ["grad_norms_exploding.png", "grad_norms_spikes.png",
                     "loss_curves_exploding.png", "loss_curves_spikes.png", "results.json"]
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"exploding", "spikes"}
    rows = results["spikes"]["policies"]
    assert [r["policy"] for r in rows] == ["no clipping", "value clip 0.1", "norm clip 0.1",
                                           "norm clip 1.0", "norm clip 10.0", "percentile clip"]
    assert all(r["seeds"] == 2 for r in rows)
    comparison = results["spikes"]["comparison"]
    assert comparison["best_fixed"] in {"norm clip 0.1", "norm clip 1.0", "norm clip 10.0"}
    assert comparison["ratio"] == pytest.approx(
        comparison["percentile_loss"] / comparison["best_fixed_loss"])
    assert "best fixed norm clip in hindsight" in printed
    for png in files[:-1]:
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_interrupted_json_write_leaves_no_file(tmp_path):
    class Boom:
        """Serialising it raises, like a Ctrl-C in the middle of the write."""

    path = tmp_path / "bench.json"
    with pytest.raises(TypeError):
        bench.write_json_atomically(str(path), {"ok": 1, "bad": Boom()})
    assert os.listdir(tmp_path) == []
    bench.write_json_atomically(str(path), {"ok": 1})
    assert json.loads(path.read_text()) == {"ok": 1}


def test_keyboard_interrupt_is_reported_cleanly(monkeypatch, capsys):
    def interrupted(**kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, "run", interrupted)
    assert main.main(["bench", "--quick"]) == 130
    assert "interrupted" in capsys.readouterr().err


def _fake_bench_run(seen):
    """A stand-in for bench.run that records its arguments in ``seen`` and times nothing."""
    def fake_run(**kwargs):
        seen.update(kwargs)
        return {"backend": "cpu", "device": "cpu", "jax": "x", "optax": "y",
                "budget_s": (bench.TIME_BUDGET_S[kwargs["quick"]] if kwargs["budget_s"] is None
                             else kwargs["budget_s"]),
                "optimizer": kwargs["optimizer"], "trees": [],
                "bandwidth": {"bytes": 1e6, "global_norm_GBps": 1.0, "copy_GBps": 2.0,
                              "fraction_of_copy": 0.5}}

    return fake_run


def test_bench_only_and_seconds_reach_the_run(monkeypatch, capsys):
    seen = {}
    monkeypatch.setattr(bench, "run", _fake_bench_run(seen))
    assert main.main(["bench", "--quick", "--only", "gpt-2", "--only", "MLP",
                      "--seconds", "7.5"]) == 0
    assert list(seen["sets"]) == ["GPT-2 tree at 1/4 width", "tiny MLP (10k)"]
    assert seen["budget_s"] == 7.5
    assert "at least 7.5 s of rounds per tree" in capsys.readouterr().out
    assert bench.steps_per_run(True, seen["sets"]) == 2 * 2 + 1


def test_bench_only_names_the_sets_when_nothing_matches():
    sets = shapes.shape_sets(quick=True)
    assert bench.select_sets(sets, []) == sets
    with pytest.raises(SystemExit, match="--only 'VGG' matches no shape set.*tiny MLP"):
        bench.select_sets(sets, ["VGG"])


def test_bench_tree_reports_every_transform():
    # 200k parameters: at a 10k-parameter MLP the fixed-size histograms (14 KiB of state
    # read and written per step) outweigh the gradients, which is what the MLP row shows.
    params = {f"w{i}": jnp.zeros((50_021,)) for i in range(4)}
    result = bench.bench_tree("odd", params, repeats=1)
    names = [row["transform"] for row in result["rows"]]
    assert names == list(bench.transforms())
    assert result["params"] == 200_084 and result["leaves"] == 4
    optax_passes = result["rows"][0]["extra_gradient_passes"]
    assert optax_passes > 3
    for row in result["rows"]:
        assert row["time_ms"] > 0 and row["vs_adam"] > 0
        lo, hi = row["vs_optax_clip_ci"]
        assert lo <= row["vs_optax_clip"] <= hi
        if row["transform"].startswith("gradclip_jax"):
            assert row["extra_gradient_passes"] < optax_passes
    results = {"backend": "cpu", "device": "cpu", "jax": jax.__version__,
               "optax": optax.__version__, "trees": [result],
               "bandwidth": bench.bench_bandwidth(20_000, 1)}
    results["slowest"] = bench.slowest(results)
    assert results["slowest"]["transform"] != bench.REFERENCE
    # The noise control (optax's clip timed a second time) is reported, not ranked.
    assert result["control_vs_optax_clip"] > 0
    results["noisiest"] = bench.noisiest(results)
    assert results["noisiest"]["spread"] >= 1.0 and results["noisiest"]["tree"] == "odd"
    table = bench.format_table(results)
    assert "gradclip_jax.percentile_clip" in table and "| odd |" in table
    assert "slowest ratio to optax's clip" in table
    worst = results["slowest"]
    assert worst["rows"] == 3 and 0 <= worst["surely_above_goal"] <= worst["above_goal"] <= 3
    assert f"goal {bench.GOAL}x: {worst['above_goal']} of 3 ratios above it" in table
    assert "(noise control)" in table and "the same step timed twice" in table


def test_a_quantile_given_as_percentile_warns():
    parser = main.build_parser()
    with pytest.warns(UserWarning, match="0.9th percentile"):
        args = parser.parse_args(["outcomes", "--percentile", "0.9"])
    assert args.percentile == [0.9]


def test_small_trees_are_also_timed_in_a_jitted_loop():
    # A tiny model's step costs less than a call's dispatch, so it is timed in a jitted loop
    # too; the loop must train (the parameters move) and report times per step.
    params = {"w": jnp.ones((7, 3)), "b": jnp.ones((3,))}
    tx = optax.chain(gc.percentile_clip(), optax.adam(0.1))
    new_params, state = bench._step_runner(tx, params, loop_steps=5)()
    assert int(gc.stats(state)["count"]) == 5
    assert not np.allclose(new_params["w"], params["w"])
    looped = bench.bench_tree("mlp", params, repeats=2, passes=False, loop_steps=5)
    assert looped["timing"] == "jitted loop" and "5 steps in a jitted loop" in looped["tree"]
    assert all(row["time_ms"] > 0 for row in looped["rows"])
    per_call = bench.bench_tree("mlp", params, repeats=2, passes=False)
    assert per_call["timing"] == "one call per step" and per_call["tree"] == "mlp"
    results = {"backend": "cpu", "device": "cpu", "jax": jax.__version__,
               "optax": optax.__version__, "trees": [per_call, looped],
               "bandwidth": bench.bench_bandwidth(20_000, 1)}
    results["percentile_vs_norm"] = bench.percentile_vs_norm(results)
    worst = max(per_call["percentile_vs_norm_clip"], looped["percentile_vs_norm_clip"])
    assert results["percentile_vs_norm"]["ratio"] == worst
    assert "the percentile clip's step over the norm clip's" in bench.format_table(results)
    # Both trees are tiny models, so the tiny models' figure is the same, with its interval.
    tiny = results["percentile_vs_norm"]["tiny"]
    assert tiny["ratio"] == worst and tiny["ci"][0] <= worst <= tiny["ci"][1]
    assert f"on tiny models (at most 1,000,000 parameters; goal 1.10x): {worst:.3f}" in (
        bench.format_table(results))
    # A large tree's ratio does not count among the tiny models'.
    large = dict(per_call, params=10**8, percentile_vs_norm_clip=worst + 1.0)
    both = bench.percentile_vs_norm({"trees": [large, per_call, looped]})
    assert both["ratio"] == worst + 1.0 and both["tiny"]["ratio"] == worst


def test_small_trees_are_also_timed_with_the_state_donated():
    # Donated, each call trains on from the last one's parameters and state, whose buffers
    # the step takes over (as a training loop that donates them).
    params = {"w": jnp.ones((7, 3)), "b": jnp.ones((3,))}
    tx = optax.chain(gc.percentile_clip(), optax.adam(0.1))
    run = bench._step_runner(tx, params, donate=True)
    first = run()
    second = run()
    assert first["w"].is_deleted() and not second["w"].is_deleted()
    assert not np.allclose(second["w"], params["w"])
    assert not params["w"].is_deleted()  # the caller's parameters are copied first
    donated = bench.bench_tree("mlp", params, repeats=2, passes=False, donate=True)
    assert donated["tree"] == "mlp, state donated"
    assert donated["timing"] == "one call per step, state donated"
    assert all(row["time_ms"] > 0 for row in donated["rows"])


@pytest.mark.parametrize("quick", [True, False])
def test_every_shape_set_is_named_and_builds(quick):
    sets = shapes.shape_sets(quick=quick)
    names = " ".join(sets)
    for word in ("odd", "GPT-2", "ResNet-50", "LSTM", "tiny leaves", "leaf", "MLP"):
        assert word in names
    for name, build in sets.items():
        tree = jax.eval_shape(lambda b=build: b(jnp.bfloat16))
        leaves = jax.tree.leaves(tree)
        assert leaves and all(x.dtype == jnp.bfloat16 for x in leaves), name
    assert bench.steps_per_run(quick) == 2 * len(sets) + 1


def test_the_1b_tree_is_benched_on_accelerators_only():
    # Item 4 of the speed issue asks for 125M and 1B parameters on a GPU; 1B float32 with
    # adam's state does not fit beside CI on a 2-core machine.
    assert not any("1B" in name for name in shapes.shape_sets(quick=False))
    assert not any("1B" in name for name in shapes.shape_sets(quick=True, accelerator=True))
    sets = shapes.shape_sets(quick=False, accelerator=True)
    tree = jax.eval_shape(lambda: sets["GPT-style 1B (1.01B)"](jnp.bfloat16))
    assert round(sum(x.size for x in jax.tree.leaves(tree)) / 1e9, 2) == 1.01
    assert "GPT-2 small (124M)" in sets


def test_the_optimizer_can_be_adamw(monkeypatch, capsys):
    with pytest.raises(ValueError, match="optimizer must be one of.*'sgd'"):
        bench.run(quick=True, json_path=None, sets={}, optimizer="sgd")
    seen = {}
    monkeypatch.setattr(bench, "run", _fake_bench_run(seen))
    assert main.main(["bench", "--quick", "--only", "MLP", "--optimizer", "adamw"]) == 0
    assert seen["optimizer"] == "adamw"
    assert "transform, chained with adamw" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main.build_parser().parse_args(["bench", "--optimizer", "sgd"])
    # "adamw" is adamw (its decoupled weight decay moves the parameters under a zero
    # gradient, adam's step does not), and bench_tree builds the baseline and every chain
    # from the one it is given.
    params = {"w": jnp.ones((3, 2))}
    zeros = jax.tree.map(jnp.zeros_like, params)
    for name, moves in (("adam", False), ("adamw", True)):
        opt = bench.OPTIMIZERS[name]()
        updates, _ = opt.update(zeros, opt.init(params), params)
        assert bool(jnp.any(updates["w"] != 0)) == moves, name
    built = []
    monkeypatch.setitem(bench.OPTIMIZERS, "adamw",
                        lambda: built.append("adamw") or optax.adamw(1e-3))
    tree = bench.bench_tree("mlp", params, repeats=2, passes=False, optimizer="adamw")
    assert built == ["adamw"]
    assert [row["transform"] for row in tree["rows"]] == list(bench.transforms())


def test_real_model_trees_have_their_published_sizes():
    count = lambda tree: sum(x.size for x in jax.tree.leaves(jax.eval_shape(lambda: tree)))  # noqa: E731
    assert count(shapes.gpt2(jnp.float32, d=64, layers=1, vocab=10, ctx=8)) == (
        10 * 64 + 8 * 64 + 2 * 64 + 2 * 64 + 64 * 192 + 192 + 64 * 64 + 64 + 2 * 64
        + 64 * 256 + 256 + 256 * 64 + 64)
    assert abs(count(shapes.resnet50(jnp.float32)) - 25_557_032) == 0


def test_the_library_does_not_import_the_command_line():
    assert gc.__name__ == "gradclip_jax"
    code = ("import sys, gradclip_jax; "
            "bad = [m for m in sys.modules if m.split('.')[0] in "
            "('matplotlib', 'tqdm', 'flax', 'orbax') or m.startswith('gradclip_jax._cli')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_interleaved_timing_runs_at_least_the_repeats_and_fills_the_budget():
    from gradclip_jax._cli.bench import interleaved_min_times, interleaved_times

    calls = {"a": 0, "b": 0}
    order = []

    def fn(name):
        def run():
            calls[name] += 1
            order.append(name)
        return run

    times = interleaved_min_times({"a": fn("a"), "b": fn("b")}, repeats=3)
    assert calls == {"a": 4, "b": 4}  # one warm-up, then 3 interleaved rounds
    assert all(0.0 <= t < 1.0 for t in times.values())
    calls.update(a=0, b=0)
    interleaved_min_times({"a": fn("a"), "b": fn("b")}, repeats=3, budget_s=0.05)
    assert calls["a"] == calls["b"] > 100  # rounds continue until the budget is spent
    # Each round runs every function once, in an order shuffled afresh.
    order.clear()
    samples = interleaved_times({"a": fn("a"), "b": fn("b")}, repeats=40)
    assert {len(v) for v in samples.values()} == {40}
    rounds = [tuple(order[i:i + 2]) for i in range(2, len(order), 2)]
    assert all(sorted(r) == ["a", "b"] for r in rounds)
    assert {("a", "b"), ("b", "a")} <= set(rounds)


def test_side_by_side_tables_each_step_per_step_and_against_the_reference():
    from gradclip_jax._cli.bench import side_by_side

    reference = np.linspace(1e-3, 2e-3, 9)  # seconds per call of 100 steps
    text = side_by_side({"before": reference, "after": 1.25 * reference}, "before", 100, "f32")
    lines = text.strip().splitlines()
    assert lines[0] == "f32, 9 rounds"
    assert lines[-2] == "| before | 15.00 | 1.000x [1.000, 1.000] |"
    assert lines[-1] == "| after | 18.75 | 1.250x [1.250, 1.250] |"


def test_paired_ratio_cancels_a_slow_spell_and_brackets_the_median():
    from gradclip_jax._cli.bench import paired_ratio

    # A slow spell (rounds 3-5 five times slower) hits both runs of those rounds: the paired
    # median is the true 1.1, where the fastest run of each would also give 1.1 only by luck.
    reference = np.array([1.0, 1.0, 1.0, 5.0, 5.0, 5.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    out = paired_ratio(1.1 * reference, reference)
    assert out["ratio"] == pytest.approx(1.1) and out["ci"] == pytest.approx([1.1, 1.1])
    # The interval holds the median and comes from order statistics of the ratios.
    ratios = np.linspace(0.9, 1.3, 101)
    out = paired_ratio(ratios, np.ones(101))
    assert out["ratio"] == pytest.approx(1.1)
    assert out["ci"][0] < out["ratio"] < out["ci"][1]
    assert out["ci"] == pytest.approx([ratios[40], ratios[61]], abs=1e-3)
    # A shuffled copy of the same ratios gives the same answer.
    assert paired_ratio(ratios[::-1], np.ones(101)) == out
