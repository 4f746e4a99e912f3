"""What `jaxchat train` shows and measures around its steps: the progress line (learning rate, MFU, device memory
where the runtime has stats), MFU on a CPU from a measured and cached matmul peak or --peak-tflops, and
--profile A:B writing a jax.profiler trace of those steps into the run directory."""

import json
import math

import jax
import pytest

from jaxchat.cli import main
from jaxchat.display import device_memory, format_memory
from jaxchat.peak import cache_file, machine_key, measure_matmul_flops
from test_cli import MICRO


def step_records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


@pytest.mark.slow  # (~10 s: a real run and the CPU peak measurement)
def test_progress_line_and_measured_cpu_peak(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("JAXCHAT_CACHE", str(tmp_path / "cache"))  # an empty cache: the peak is measured here
    run = tmp_path / "run"
    # (AdamW: its records carry the absolute lr; `tiny`'s own Muon recipe logs a multiplier)
    assert main(["train", "--preset", "tiny", "--run-dir", str(run)] + MICRO
                + ["--set", "optim.optimizer=adamw", "--set", "optim.warmup_steps=2"]) == 0
    out = capsys.readouterr().out
    assert "measuring this CPU's float32 matmul rate" in out
    cached = json.loads(cache_file().read_text())
    assert list(cached) == [machine_key("float32")] and cached[machine_key("float32")] > 1e8  # > 0.1 GFLOP/s
    lines = [line for line in out.splitlines() if line.startswith("step ") and "/4 |" in line]
    assert len(lines) == 4
    # the lr shown is the record's (a 2-step warmup makes it change from step to step)
    recs = step_records(run)
    for line, rec in zip(lines, recs):
        assert f"lr {rec['lr']:.3g}" in line and "MFU " in line and "n/a" not in line
        assert "mem" not in line  # a CPU has no memory stats
    assert all(0 < r["mfu"] < 1 for r in recs) and len({r["lr"] for r in recs}) > 1

    # a second run reuses the cached peak
    run2 = tmp_path / "run2"
    assert main(["train", "--preset", "tiny", "--run-dir", str(run2)] + MICRO) == 0
    out = capsys.readouterr().out
    assert "measuring" not in out and "matmul rate measured on this CPU (cached in" in out


def test_peak_tflops_given(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--run-dir", str(run), "--peak-tflops", "0.001"] + MICRO) == 0
    assert "MFU against 0.001 TFLOP/s per device (--peak-tflops)" in capsys.readouterr().out
    flops = json.loads((run / "summary.json").read_text())["model_flops"] / (4 * 4 * 64)  # per token
    for r in step_records(run):
        assert math.isclose(r["mfu"], flops * r["tok_per_s"] / 1e9, rel_tol=1e-3, abs_tol=1e-4)


def test_matmul_benchmark_measures_a_rate():
    f32 = measure_matmul_flops("float32", n=256, reps=2)
    assert 1e7 < f32 < 1e14


def test_memory_text():
    assert format_memory(None) == ""
    assert format_memory((3 * 2**30, 80 * 2**30)) == " | mem 3.0/80.0 GiB"
    if jax.default_backend() == "cpu":
        assert device_memory() is None


def test_profile_writes_a_trace(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--run-dir", str(run), "--profile", "2:4"] + MICRO) == 0
    out = capsys.readouterr().out
    traces = list((run / "profile").rglob("*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 1000
    assert list((run / "profile").rglob("*.trace.json.gz")) and (run / "profile" / "step.hlo.txt").is_file()
    assert "profile of steps 2..3" in out and "tensorboard --logdir" in out
    assert [r["step"] for r in step_records(run)] == [1, 2, 3, 4]  # the run itself is whole


@pytest.mark.parametrize("arg, needle", [("5", "is not A:B"), ("4:4", "need 1 <= A < B"), ("0:2", "need 1 <= A < B"),
                                         ("3:9", "executes steps 1..4")])
def test_bad_profile_ranges(arg, needle, tmp_path, capsys):
    run = tmp_path / "run"
    try:
        code = main(["train", "--preset", "tiny", "--run-dir", str(run), "--profile", arg] + MICRO)
    except SystemExit as e:  # argparse's own refusal
        code = e.code
    assert code != 0
    assert needle in capsys.readouterr().err
    assert not run.exists()  # refused before anything is written
