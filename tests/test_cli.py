"""The gradclip-jax command: argument errors, a tiny end-to-end demo, bench pieces, and
interrupted writes leaving nothing behind."""

import json
import os
import subprocess
import sys

import jax
import optax
import pytest

import gradclip_jax as gc
from gradclip_jax._cli import bench, main


@pytest.mark.parametrize("argv", [
    [],
    ["train"],
    ["demo", "--seeds", "0"],
    ["demo", "--steps", "-5"],
    ["demo", "--steps", "many"],
    ["bench", "--json"],
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


def test_bench_size_reports_every_transform():
    result = bench.bench_size(20_000, 4, repeats=1)
    names = [row["transform"] for row in result["rows"]]
    assert names == list(bench.transforms())
    optax_passes = result["rows"][0]["extra_gradient_passes"]
    assert optax_passes > 3
    for row in result["rows"]:
        assert row["time_ms"] > 0 and row["vs_adam"] > 0
        # At 20k parameters the fixed-size histogram work is not negligible (the 8M-parameter
        # contract is in test_cost.py), but every transform still costs less than optax's.
        if row["transform"].startswith("gradclip_jax"):
            assert row["extra_gradient_passes"] < optax_passes
    table = bench.format_table({"backend": "cpu", "device": "cpu", "jax": jax.__version__,
                                "optax": optax.__version__, "repeats": 1, "sizes": [result],
                                "bandwidth": bench.bench_bandwidth(20_000, 1)})
    assert "gradclip_jax.percentile_clip" in table


def test_the_library_does_not_import_the_command_line():
    assert gc.__name__ == "gradclip_jax"
    code = ("import sys, gradclip_jax; "
            "bad = [m for m in sys.modules if m.split('.')[0] in "
            "('matplotlib', 'tqdm', 'flax', 'orbax') or m.startswith('gradclip_jax._cli')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
