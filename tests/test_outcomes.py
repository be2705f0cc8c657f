"""The outcomes benchmark: its baselines follow their papers, its metrics say what they claim,
and a tiny end-to-end run writes the table, JSON and plots."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradclip_jax._cli import main
from gradclip_jax._cli.outcomes import baselines, harness, report, tasks


def _norms_through(tx, norms):
    state = tx.init(None)
    thresholds, outs = [], []
    for n in norms:
        out, state = tx.update({"w": jnp.array([n], jnp.float32)}, state)
        thresholds.append(float(state.threshold))
        outs.append(float(out["w"][0]))
    return np.array(thresholds), np.array(outs)


def test_autoclip_clips_at_the_percentile_of_every_norm_including_the_current():
    rng = np.random.default_rng(0)
    norms = rng.lognormal(0.0, 0.5, size=40)
    thresholds, outs = _norms_through(baselines.autoclip(10.0, max_steps=64), norms)
    for t in range(len(norms)):
        expected = np.percentile(norms[: t + 1], 10)
        assert thresholds[t] == pytest.approx(expected, rel=1e-5)
        assert outs[t] == pytest.approx(min(norms[t], expected), rel=1e-5)


def _zclip_reference(norms, alpha=0.97, z_thresh=2.5, cap=1.0, eps=1e-6, warmup=25):
    """The reference implementation's step, in plain Python, for the comparison."""
    buf, mean, var, out = [], None, None, []
    for g in norms:
        if mean is None:
            buf.append(g)
            if len(buf) >= warmup:
                mean = sum(buf) / len(buf)
                var = sum((x - mean) ** 2 for x in buf) / len(buf)
            out.append(cap)
            continue
        std = var ** 0.5
        z = (g - mean) / (std + eps)
        clip = mean + z_thresh * std / (z / z_thresh) if z > z_thresh else None
        out.append(min(clip, cap) if clip is not None else cap)
        eff = clip if clip is not None else g
        mean = alpha * mean + (1 - alpha) * eff
        var = alpha * var + (1 - alpha) * (eff - mean) ** 2
    return np.array(out)


@pytest.mark.parametrize("cap", [1.0, None])
def test_zclip_matches_its_reference_step(cap):
    rng = np.random.default_rng(1)
    norms = rng.lognormal(0.0, 0.3, size=80) * 0.5
    norms[[40, 60]] *= 30.0  # outliers, whose threshold shrinks as they grow
    tx = baselines.zclip(max_grad_norm=cap)
    thresholds, outs = _norms_through(tx, norms)
    expected = _zclip_reference(norms, cap=np.inf if cap is None else cap)
    np.testing.assert_allclose(thresholds, expected, rtol=1e-4)
    np.testing.assert_allclose(outs, np.minimum(norms, expected), rtol=1e-4)
    if cap is None:
        assert thresholds[40] < np.median(norms) * 3  # the spike is cut to the typical scale


def _logs(val_first, val_last, train=None):
    val = np.stack([np.asarray(val_first, float), np.asarray(val_last, float)], axis=1)
    train = np.ones((len(val_first), 200)) if train is None else train
    return {"val_loss": val, "train_loss": train, "grad_norm": np.ones_like(train),
            "threshold": np.full_like(train, np.inf)}


def test_a_run_is_lost_when_non_finite_or_worse_than_at_the_start():
    logs = _logs([5.0, 5.0, 5.0], [np.nan, 5.5, 3.0])
    assert harness.lost(logs).tolist() == [True, True, False]
    # A lost run counts at its initial loss, so means stay finite and punish the loss.
    assert harness.final_val(logs).tolist() == [5.0, 5.0, 3.0]


def test_loss_spikes_count_steps_far_above_the_recent_median():
    train = np.ones((2, 200))
    train[0, [120, 150]] = 10.0
    train[1, 180:] = np.nan  # a divergence counts every step from then on
    spikes = harness.loss_spikes(_logs([1, 1], [1, 1], train), warmup=20)
    assert spikes.tolist() == [2, 20]


def test_norm_taken_off_is_the_share_of_the_summed_norm_that_clipping_removed():
    norm = np.array([[1.0, 2.0, 3.0, 4.0], [1.0, 1.0, np.nan, 1.0], [2.0, 2.0, 2.0, 2.0]])
    threshold = np.array([[2.0, 2.0, 2.0, 2.0], [0.5, np.inf, 0.5, np.inf],
                          [np.inf, np.inf, np.inf, np.inf]])
    applied = np.isfinite(norm)
    applied[0, 3] = False  # a skipped step counts in neither sum
    shares = harness.taken_off(norm, threshold, applied)
    # (3 - 2) of 1 + 2 + 3; 0.5 of 3 (the NaN step and the unclipped ones add nothing
    # removed); no threshold, nothing removed.
    np.testing.assert_allclose(shares, [1.0 / 6.0, 0.5 / 3.0, 0.0])


def test_scenario_metrics_pair_by_run_and_pick_the_best_fixed_c_in_hindsight():
    task = tasks.Task(name="t", steps=200, warmup=10, eval_every=100, init=None, loss=None,
                      sample=None, val_batch=None, optimizer=None,
                      arms=(tasks.Arm(0.1, 0), tasks.Arm(0.1, 1), tasks.Arm(1.0, 0),
                            tasks.Arm(1.0, 1)), scenarios=())
    finals = {"c=0.1": [3.0, 3.0, 4.0, 4.0], "c=0.3": [2.0, 2.0, 2.0, 2.0],
              "c=1": [2.5, 2.5, 2.5, 2.5], "c=3": [3, 3, 3, 3], "c=10": [4, 4, 4, 4],
              "no clip": [4, 4, np.nan, 4], harness.DEFAULT: [2.0, 2.0, 2.1, 2.3],
              harness.CONTROL: [2.4, 2.6, 2.5, 1.0]}
    logs = {p: _logs([5.0] * 4, v) for p, v in finals.items()}
    m = harness.scenario_metrics(task, logs, lambda a: True)
    # The noise control: its distance from c=1; it is no one's best, at any lr.
    assert m["noise_vs_c1"] == pytest.approx(abs(np.mean([-0.1, 0.1, 0.0, -1.5])))
    assert m["noise_vs_best_pct"] == pytest.approx(100 * m["noise_vs_c1"] / 2.0)
    assert m["best_fixed"] == "c=0.3" and m["lrs"] == [0.1, 1.0]
    row = m["rows"][harness.DEFAULT]
    assert row["vs_c1"] == pytest.approx(np.mean([-0.5, -0.5, -0.4, -0.2]))
    assert row["vs_c1_wins"] == 4
    assert row["vs_best_fixed_pct"] == pytest.approx(100 * (2.1 - 2.0) / 2.0)
    # The paired interval: every resample is 0% to 15% above c=0.3's 2.0, so it lies in
    # there and holds the point estimate; c=0.3 against itself is exactly 0.
    lo, hi = row["vs_best_fixed_ci"]
    assert 0.0 <= lo <= row["vs_best_fixed_pct"] <= hi <= 15.0
    assert m["rows"]["c=0.3"]["vs_best_fixed_ci"] == [0.0, 0.0]
    # Against c=1 every run of the default is 0.2 to 0.5 lower.
    lo, hi = row["vs_c1_ci"]
    assert -0.5 <= lo <= row["vs_c1"] <= hi <= -0.2
    # gap per lr: at 0.1 the best is 2.0 (default and c=0.3 tie), at 1.0 the best is c=0.3's 2.0
    assert row["gap_to_best_per_lr"] == pytest.approx(np.mean([0.0, 0.2]))
    assert m["rows"]["no clip"]["lost"] == 1


def test_every_policy_of_a_task_trains_on_the_same_initialisation_and_batches():
    task = tasks.rnn(quick=True)
    task = tasks.Task(**{**task.__dict__, "steps": 20, "eval_every": 10,
                         "arms": task.arms[:2]})
    logs = harness.run_task(task, harness.families())
    first = {p: m["train_loss"][:, 0] for p, m in logs.items()}
    ref = first["no clip"]
    for p, loss in first.items():
        np.testing.assert_array_equal(loss, ref, err_msg=p)  # step 0 precedes any update
    assert not np.array_equal(logs["c=0.1"]["train_loss"], logs["no clip"]["train_loss"])
    assert logs["c=0.1"]["threshold"][0, 0] == pytest.approx(0.1)


@pytest.mark.parametrize("name", ["transformer", "lstm", "rnn"])
def test_seeds_sets_the_runs_per_learning_rate_in_every_task(name):
    # `outcomes --seeds N`: seeds 0..N-1 for every setting of every scenario.
    def seeds_per_setting(task):
        groups = {}
        for a in task.arms:
            groups.setdefault((a.lr, a.scale, a.momentum, a.spikes), []).append(a.seed)
        return {tuple(v) for v in groups.values()}

    assert seeds_per_setting(tasks.TASKS[name](quick=True, seeds=4)) == {(0, 1, 2, 3)}
    assert seeds_per_setting(tasks.TASKS[name](quick=True)) == {(0, 1)}
    # `--first-seed S`: a second set, disjoint from the first.
    assert seeds_per_setting(tasks.TASKS[name](quick=True, seeds=3, first_seed=100)) == {
        (100, 101, 102)}


@pytest.mark.parametrize("name", ["transformer", "lstm", "rnn"])
def test_quick_programs_compile_with_fewer_llvm_passes_and_full_ones_with_xlas_default(name):
    # --quick runs in CI under a time limit; the full runs' committed figures must reproduce.
    assert tasks.TASKS[name](quick=True).compiler_options == tasks.QUICK_COMPILER_OPTIONS
    assert tasks.TASKS[name](quick=False).compiler_options == ()
    # XLA still knows the option (an unknown one fails the compile).
    f = jax.jit(lambda x: jnp.tanh(x) * 2.0, compiler_options=dict(tasks.QUICK_COMPILER_OPTIONS))
    np.testing.assert_allclose(f(jnp.ones(3)), 2.0 * np.tanh(np.ones(3)), rtol=1e-6)
    with pytest.raises(Exception, match="no_such_xla_option"):
        jax.jit(lambda x: x + 1.0, compiler_options={"no_such_xla_option": 1})(jnp.ones(3))


def test_text_data_is_real_english_available_offline():
    data = tasks.text_bytes()
    assert data.size > 400_000
    assert b" the " in data[:20_000].tobytes()


@pytest.mark.parametrize("name", ["transformer", "lstm", "rnn"])
def test_at_rates_keeps_the_runs_and_scenarios_at_those_rates(name):
    # `outcomes --lr`: many seeds at the one rate where runs are lost, without the others.
    task = tasks.TASKS[name](quick=True, seeds=3)
    rates = sorted({a.lr for a in task.arms})
    one = tasks.at_rates(task, [rates[-1]])
    assert one.arms == tuple(a for a in task.arms if a.lr == rates[-1])
    assert all(any(sc.arms(a) for a in one.arms) for sc in one.scenarios)
    assert tasks.at_rates(task, rates).arms == task.arms
    assert tasks.at_rates(task, [rates[-1] * 7.1]) is None
    if name == "rnn":  # plain SGD and momentum train at different rates
        assert [sc.key for sc in one.scenarios] == ["rnn_sgd"]


@pytest.fixture
def tiny_rnn(monkeypatch):
    real = tasks.rnn

    def tiny(*, quick, seeds=None, first_seed=0):
        task = real(quick=True, seeds=seeds, first_seed=first_seed)
        return tasks.Task(**{**task.__dict__, "steps": 60, "eval_every": 30, "warmup": 10})

    monkeypatch.setitem(tasks.TASKS, "rnn", tiny)


def test_outcomes_lr_trains_only_that_rate(tmp_path, tiny_rnn, capsys):
    out = tmp_path / "out"
    argv = ["outcomes", "--quick", "--task", "rnn", "--lr", "0.2", "--seeds", "2",
            "--out", str(out)]
    assert main.main(argv) == 0
    results = json.loads((out / "outcomes.json").read_text())
    assert [s["key"] for s in results["scenarios"]] == ["rnn_sgd"]
    assert results["scenarios"][0]["arm_lr"] == [0.2, 0.2]
    text = (out / "outcomes.md").read_text()
    assert "only the runs at 0.2 (--lr); 2 runs per policy (peak learning rate 0.2 x 2 seeds)" \
        in text
    with pytest.raises(SystemExit, match=r"--lr 0.7: no run of rnn trains at that peak "
                       r"learning rate; the rates are 0.01, 0.02, 0.1, 0.2"):
        main.main([*argv[:5], "0.7", *argv[6:]])


def test_outcomes_command_writes_table_json_and_plots(tmp_path, tiny_rnn):
    out = tmp_path / "out"
    argv = ["outcomes", "--quick", "--task", "rnn", "--seeds", "3", "--first-seed", "7",
            "--out", str(out)]
    assert main.main(argv) == 0
    text = (out / "outcomes.md").read_text()
    assert "rnn_sgd" in text and "percentile_clip()" in text and "AutoClip p10" in text
    assert "percentile_clip(90, window=None, start=None)" in text
    assert "percentile_clip(start=None)" in text
    assert "(2 learning rates x 3 seeds)" in text
    results = json.loads((out / "outcomes.json").read_text())
    assert {s["key"] for s in results["scenarios"]} == {"rnn_sgd", "rnn_momentum"}
    assert [s["runs"] for s in results["scenarios"]] == [6, 6]
    assert [sorted(set(s["arm_seed"])) for s in results["scenarios"]] == [[7, 8, 9]] * 2
    assert (out / "outcomes_rnn_sgd.png").stat().st_size > 10_000
    assert jax.tree.leaves(results)  # plain JSON values throughout


def _short_rnn_task():
    """The quick RNN task cut to two arms of 40 steps: enough to compare variants."""
    task = tasks.rnn(quick=True)
    return tasks.Task(**{**task.__dict__, "steps": 40, "eval_every": 20, "warmup": 5,
                         "arms": task.arms[:2]})


def test_percentile_and_window_variants_train_beside_the_default():
    # `outcomes --percentile P --window W`: variants of the default in one vmapped program
    # each; at the default's own values they train exactly as the default does.
    task = _short_rnn_task()
    fams = harness.families(percentiles=(50.0, 25.0), windows=(20, 5))
    fams = [f for f in fams if f.name in ("percentiles", "windows", "default")]
    logs = harness.run_task(task, fams)
    assert {"percentile_clip(50)", "percentile_clip(25)", "percentile_clip(window=20)",
            "percentile_clip(window=5)"} <= set(logs)
    default = logs[harness.DEFAULT]
    for same in ("percentile_clip(50)", "percentile_clip(window=20)"):
        np.testing.assert_allclose(logs[same]["threshold"], default["threshold"], rtol=1e-5)
        np.testing.assert_allclose(logs[same]["val_loss"], default["val_loss"], rtol=1e-5)
    lower = logs["percentile_clip(25)"]["threshold"][:, 5:]
    assert np.mean(np.log(lower)) < np.mean(np.log(default["threshold"][:, 5:]))


def test_an_early_cap_clips_at_one_for_its_steps_then_trains_as_the_default():
    # `outcomes --early-cap N`: the median rule (no start) capped at c = 1 for its first N
    # steps.
    task = _short_rnn_task()
    fams = [f for f in harness.families(early_caps=(10,)) if f.name in ("early caps", "median")]
    logs = harness.run_task(task, fams)
    capped, default = logs["percentile_clip(start=None), c=1 for 10 steps"], logs[harness.MEDIAN]
    assert np.all(capped["threshold"][:, :10] <= 1.0)
    # From the first step on, where the default has no threshold yet.
    assert np.all(capped["threshold"][:, 0] == 1.0) and np.all(np.isinf(default["threshold"][:, 0]))
    # The cap binds on these runs (their norms are above 1), and is gone after 10 steps.
    assert np.any(default["threshold"][:, 1:10] > 1.0)
    assert np.any(capped["threshold"][:, 10:] > 1.0)


def test_a_start_variant_clips_from_a_fraction_of_the_first_norm():
    # `outcomes --start S`: percentile_clip(start=S), whose first threshold is S times the
    # first norm; the median policy (no start) clips from the first norm itself, and their
    # runs differ from that step on. The default has the start of 0.25 and trains as its
    # variant does.
    task = _short_rnn_task()
    fams = [f for f in harness.families(starts=(0.25, 0.5))
            if f.name in ("starts", "default", "median")]
    logs = harness.run_task(task, fams)
    started, median = logs["percentile_clip(start=0.25)"], logs[harness.MEDIAN]
    np.testing.assert_allclose(started["threshold"][:, 1], 0.25 * started["grad_norm"][:, 0],
                               rtol=0.011)
    np.testing.assert_allclose(median["threshold"][:, 1], median["grad_norm"][:, 0], rtol=0.011)
    assert np.all(started["grad_norm"][:, 1] > started["threshold"][:, 1])
    default = logs[harness.DEFAULT]
    np.testing.assert_allclose(default["threshold"], started["threshold"], rtol=1e-5)
    np.testing.assert_allclose(default["val_loss"], started["val_loss"], rtol=1e-5)
    half = logs["percentile_clip(start=0.5)"]
    np.testing.assert_allclose(half["threshold"][:, 1], 0.5 * half["grad_norm"][:, 0], rtol=0.011)


def test_the_guarded_policy_skips_the_injected_spikes_past_its_warmup():
    task = tasks.lstm(quick=True)
    spiked = tuple(a for a in task.arms if a.spikes)[:1]
    task = tasks.Task(**{**task.__dict__, "arms": spiked})
    guarded = [f for f in harness.families() if f.guarded]
    assert [f.tasks for f in guarded] == [("lstm",)]
    logs = harness.run_task(task, guarded)
    skipped = logs[harness.GUARDED]["skipped"][0]
    late = [t for t in task.spike_steps if t >= 20]  # skip_spikes' default warmup_steps
    assert late and skipped[late].all()
    assert skipped.sum() <= len(task.spike_steps)
    # Families for other tasks are left out of the RNN's programs.
    assert harness.GUARDED not in harness.run_task(
        tasks.Task(**{**tasks.rnn(quick=True).__dict__, "steps": 10, "eval_every": 5,
                      "arms": tasks.rnn(quick=True).arms[:1]}), guarded)


def test_verdict_says_when_a_failed_line_is_within_its_interval():
    def row(vs_c1, c1_ci, pct, pct_ci):
        return {"lost": 0, "vs_c1": vs_c1, "vs_c1_ci": c1_ci, "vs_best_fixed_pct": pct,
                "vs_best_fixed_ci": pct_ci}

    results = {"scenarios": [
        {"key": "a", "rows": {harness.DEFAULT: row(0.002, [-0.008, 0.012], 0.1, [-0.5, 0.6])}},
        {"key": "b", "rows": {harness.DEFAULT: row(0.05, [0.01, 0.09], 5.0, [3.0, 7.0])}},
        {"key": "a_x100", "rows": {harness.DEFAULT: row(0.05, [0.01, 0.09], 16.0, [-7.0, 70.0])}},
    ]}
    lines = report.verdict(results).splitlines()
    assert "(FAIL: > 0, but its 95% interval [-0.0080, +0.0120] holds 0)" in lines[1]
    assert "vs best fixed c," in lines[1]  # +0.10% passes the 2% line
    assert lines[2].endswith("+5.00% vs best fixed c (FAIL: > 2%), +0.0500 vs c=1 (FAIL: > 0)")
    assert "reaches 2%" in lines[3] and "vs c=1" not in lines[3]  # x100 is not natural scale
    # With a noise control that moved further from c=1 than the failed difference, it says so.
    results["scenarios"][0]["noise_vs_c1"] = 0.0052
    results["scenarios"][1]["noise_vs_c1"] = 0.001
    results["scenarios"][2].update(noise_vs_c1=0.01, noise_vs_best_pct=15.0)
    lines = report.verdict(results).splitlines()
    assert lines[1].endswith("holds 0; the noise control differs from c=1 by 0.0052, more than "
                             "this)")
    assert lines[2].endswith("+0.0500 vs c=1 (FAIL: > 0)")
    # 16% is 14 points over the 2% line, less than the control's 15%.
    assert lines[3].endswith("reaches 2%; the noise control moved 15.0% from c=1, more than the "
                             "excess)")
    assert lines[-1].endswith("a 0.0052, b 0.0010, a_x100 0.0100 (15.0%)")
