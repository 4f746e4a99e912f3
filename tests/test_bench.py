"""`jaxchat bench` on a micro config (CPU, a few seconds): the fields it prints, the JSON it writes, that it
writes a row only when asked (`--record FILE`), and the BENCHMARKS.md row format."""

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys

import jax
import pytest
from conftest import ROOT, child_env

from jaxchat import bench, cli, environment
from jaxchat.config import ConfigError

MICRO = ["--preset", "tiny", "--set", "model.n_layer=2", "--set", "model.n_embd=64", "--set", "model.n_kv_head=1",
         "--set", "model.n_head=1", "--set", "model.vocab_size=512", "--set", "data.tokenizer_vocab=512",
         "--seq", "64", "--batch", "4", "--steps", "3", "--warmup", "1"]


def parse(argv):
    p = argparse.ArgumentParser(prog="jaxchat")
    bench.add_parsers(p.add_subparsers(dest="cmd", required=True))
    return p.parse_args(argv)


def run(argv) -> str:
    """`jaxchat bench ARGV` in this process; what it printed."""
    args = parse(["bench", *argv])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        args.fn(args)
    return out.getvalue()


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    """One real run without --record, standing in an empty folder: (printed text, JSON result, that folder)."""
    cwd, json_dir = tmp_path_factory.mktemp("cwd"), tmp_path_factory.mktemp("json")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        text = run([*MICRO, "--json", str(json_dir / "r.jsonl")])
    return text, json.loads((json_dir / "r.jsonl").read_text()), cwd


def test_bench_prints_every_field(ran):
    text, _, _ = ran
    for field in ("bench tiny", "batch 4 x seq 64 = 256 tokens/step", "float32", "attention auto->cpu", "params:",
                  "value_embeds", "FLOPs/token:", "lm_head", "mlp", "compile:", "step time:", "tokens/s:", "MFU",
                  "peak memory:", "model.n_layer=2"):
        assert field in text, field
    assert "MFU n/a" in text  # no known peak on CPU
    assert "recorded in" not in text


def test_bench_result_is_sane(ran):
    _, r, _ = ran
    assert r["tokens_per_s"] > 0 and r["tokens_per_step"] == 256 and r["timed_steps"] == 3
    assert len(r["step_s_windows"]) == 3 and min(r["step_s_windows"]) <= r["step_s"] <= max(r["step_s_windows"])
    assert abs(r["tokens_per_s"] - 256 / r["step_s"]) < 1e-6 * r["tokens_per_s"]
    assert (r["backend"], r["backend_resolved"]) == ("auto", "cpu") and r["mfu"] is None
    assert r["params"]["total"] == sum(v for k, v in r["params"].items() if k != "total")
    assert r["flops_per_token"]["total"] > 6 * (r["params"]["mlp"] + r["params"]["attention"])
    assert 0 < r["loss"] < 10 and r["compile_s"] > 0
    assert r["xla_mem_estimate_bytes"] > 0


def test_bench_without_record_writes_no_file(ran):
    _, _, cwd = ran
    assert [str(p) for p in cwd.rglob("*")] == []


def test_record_appends_one_row_to_the_file_named(ran, tmp_path, monkeypatch):
    _, r, _ = ran
    monkeypatch.setattr(bench, "run_bench", lambda *a, **k: r)  # the measured result above, not a second run
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "rows" / "B.md"
    path.parent.mkdir()
    for i in (1, 2):
        text = run([*MICRO, "--record", str(path), "--note", f"run {i}"])
        assert f"recorded in {path}" in text and "tokens/s:" in text
        rows = [line for line in path.read_text().splitlines() if line.startswith("| 20")]
        assert len(rows) == i and f"run {i}" in rows[-1]
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["B.md", "rows"]  # nothing else, no ./BENCHMARKS.md


def test_rows_append_under_one_header(ran, tmp_path):
    _, r, _ = ran
    path = tmp_path / "BENCHMARKS.md"
    bench.append_row(path, r, note="first | run")
    bench.append_row(path, r)
    lines = path.read_text().splitlines()
    header = [i for i, line in enumerate(lines) if line.startswith("| date |")]
    assert len(header) == 1
    rows = lines[header[0] + 2:]
    assert len(rows) == 2 and all(row.count("|") == lines[header[0]].count("|") for row in rows)
    assert "first / run" in rows[0] and "| tiny |" in rows[0] and "| cpu (" in rows[0]


def test_rows_go_into_the_table_even_with_sections_after_it(ran, tmp_path):
    _, r, _ = ran
    path = tmp_path / "BENCHMARKS.md"
    bench.append_row(path, r)
    path.write_text(path.read_text() + "\n## Another section\n\nprose\n")
    bench.append_row(path, r, note="second")
    lines = path.read_text().splitlines()
    assert lines[-1] == "prose" and "second" in lines[lines.index("## Another section") - 2]


def test_config_deltas_leave_out_own_columns():
    base, cfg = bench.bench_config("tiny", ["model.n_layer=2"], batch=4, seq=64, backend="auto", dtype="float32")
    assert cfg.train.batch_size == 4 and cfg.train.grad_accum == 1 and cfg.model.sequence_len == 64
    assert bench.config_deltas(base, cfg) == ["model.n_layer=2"]


def test_accum_makes_a_step_of_several_micro_batches():
    base, cfg = bench.bench_config("tiny", [], batch=4, seq=64, dtype="float32", accum=3)
    assert cfg.train.batch_size == 12 and cfg.train.grad_accum == 3
    assert bench.config_deltas(base, cfg) == []
    assert bench.batch_text({"batch": 12, "grad_accum": 3}) == "4 x3"
    assert bench.batch_text({"batch": 12, "grad_accum": 1}) == "12"
    with pytest.raises(ConfigError, match="--accum 0"):
        bench.bench_config("tiny", [], batch=4, accum=0)


def test_commit_label_can_be_given(monkeypatch):
    monkeypatch.setenv("JAXCHAT_COMMIT", "abc1234-dirty")
    assert environment.git_commit() == "abc1234-dirty"


def test_bad_preset_is_a_user_error(capsys):
    assert cli.main(["bench", "--preset", "nope"]) == 2
    assert "unknown preset" in capsys.readouterr().err


def test_cli_registers_bench():
    args = cli.build_parser().parse_args(["bench", "--preset", "tiny", "--record", "B.md"])
    assert args.fn is bench.cmd_bench and args.record == "B.md"


def test_every_suite_plan_parses(monkeypatch):
    """benchmarks/suite.py's plans are bench arguments run on another machine; each must parse here."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import suite

    assert {"cpu", "micro", "d12-gpu"} <= set(suite.PLANS)
    for plan in suite.PLANS.values():
        for _, args in plan:
            assert parse(["bench", *args, "--record", "rows.md"]).fn is bench.cmd_bench


def test_cpu_profile_is_summarised_per_scope(tmp_path):
    """trace_summary attributes a CPU profile's time to the model's named scopes: XLA:CPU's ops are host events
    labelled with their HLO names (before, the summary read only GPU/TPU planes and said a CPU trace had none)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import trace_summary

    prof = tmp_path / "prof"
    env = child_env(JAXCHAT_COMPILE_CACHE="off")
    env.pop("XLA_FLAGS", None)
    subprocess.run([sys.executable, "-m", "jaxchat.cli", "bench", *MICRO, "--profile", str(prof)], env=env,
                   cwd=tmp_path, check=True, capture_output=True, timeout=300)
    text = trace_summary.summarise(str(prof), steps=3, top=5, ops=5)
    assert "CPU op events" in text, text
    ops = text.split("top 5 HLO ops", 1)[1].split("memsets by HLO op")[0].strip().splitlines()[1:]
    assert len(ops) == 5 and all(re.search(r"\s(f32|bf16|s32|pred)\[[\d,]*\]", row) for row in ops), text
    rows = dict(re.findall(r"^(embed|attention|mlp|lm_head|loss|optimizer)\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+([\d.]+)",
                           text, re.M))
    assert {"attention", "mlp", "lm_head", "loss", "optimizer"} <= set(rows), text
    assert all(float(v) > 0 for v in rows.values()), text


@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo") or jax.default_backend() != "cpu",
                    reason="a CPU label, read from Linux's /proc/cpuinfo")
def test_cpu_device_label_names_the_cpu():
    """A CPU row says the cores, the vector ISA and the CPU model /proc/cpuinfo names: CPU speed ratios against
    torch differ by vendor (AMX or not), so two hosts' rows must not read alike."""
    label = environment.device_label()
    assert label.startswith(f"cpu ({os.cpu_count()} cores")
    model = environment.cpu_model()
    with open("/proc/cpuinfo") as fh:
        names = [line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")]
    assert model == (names[0] if names else "")
    if model:
        assert label.endswith(f", {model})") and len(model) > 2
