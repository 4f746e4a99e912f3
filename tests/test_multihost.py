"""Two processes training one model, as on several hosts: `jaxchat train --coordinator ... --num-processes 2
--process-id I` started twice, each process with 2 CPU devices (a mesh of 4 over both; gradients cross the
processes over gloo). The run equals the same run in one process, process 0 alone writes and prints, and its
checkpoint resumes both on two processes and on one.

Each process is a real `python -m jaxchat.cli` child; the one-process reference runs beside the pair.
"""

import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, child_env, curve, evals, records

REF = json.loads((ROOT / "tests" / "golden" / "tiny-micro-20.json").read_text())
N, M = 6, 9  # steps of the first run, then of its continuation
# The golden micro config at batch 8 = 2 micro-batches of 4 rows, one row per device of the 4; an eval at step 4.
SETS = [s for s in REF["set"] if not s.startswith(("train.num_steps", "train.batch_size", "train.save_every",
                                                     "train.eval_every", "train.keep_"))]
SETS += [f"train.num_steps={N}", "train.batch_size=8", "optim.warmup_steps=2", "train.save_every=3",
         "train.eval_every=4", "train.keep_last=10"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp, name: str, args: list[str], processes: int, devices: int) -> list[subprocess.Popen]:
    """Start `jaxchat <args>` as `processes` processes of one job, each seeing `devices` CPU devices."""
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
    env = child_env(XLA_FLAGS=flags)
    # children run at the same time and JAX's cache files are not written atomically: no shared XLA cache
    env = {k: v for k, v in env.items() if k != "JAX_COMPILATION_CACHE_DIR"} | {"JAXCHAT_COMPILE_CACHE": "off"}
    port, procs = free_port(), []
    for i in range(processes):
        job = ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(processes), "--process-id", str(i)]
        cmd = [sys.executable, "-m", "jaxchat.cli", *args, *(job if processes > 1 else [])]
        with open(tmp / f"{name}.{i}.log", "w") as log:  # (the child keeps its own copy of the file)
            procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp))
    return procs


def wait_all(tmp, jobs: dict[str, list[subprocess.Popen]]) -> dict[str, list[str]]:
    try:
        for procs in jobs.values():
            for p in procs:
                p.wait(timeout=300)
    finally:
        for procs in jobs.values():
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
    logs = {name: [(tmp / f"{name}.{i}.log").read_text() for i in range(len(procs))] for name, procs in jobs.items()}
    for name, procs in jobs.items():
        for i, p in enumerate(procs):
            assert p.returncode == 0, (name, i, logs[name][i][-3000:])
    return logs


def train_args(run, *extra) -> list[str]:
    return ["train", "--preset", "tiny", "--run-dir", str(run), *[a for s in SETS for a in ("--set", s)], *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run `pair` (2 processes x 2 devices) and `one` (1 process, 1 device) for N steps, side by side; then continue
    the pair's run to M steps on 2 processes (`pair`) and, from a copy of it, on 1 process (`copy`)."""
    from jaxchat.overrides import apply_overrides
    from jaxchat.run import load_dataset
    from jaxchat.presets import get_preset

    load_dataset(apply_overrides(get_preset("tiny"), SETS), log=lambda *a: None)  # into the session's cache
    tmp = tmp_path_factory.mktemp("multihost")
    first = wait_all(tmp, {"pair": launch(tmp, "pair", train_args(tmp / "pair"), 2, 2),
                           "one": launch(tmp, "one", train_args(tmp / "one"), 1, 1)})
    shutil.copytree(tmp / "pair", tmp / "copy")
    more = ["--resume", "--set", f"train.num_steps={M}"]
    cont = wait_all(tmp, {"pair2": launch(tmp, "pair2", ["train", "--run-dir", str(tmp / "pair"), *more], 2, 2),
                          "copy": launch(tmp, "copy", ["train", "--run-dir", str(tmp / "copy"), *more], 1, 1)})
    return tmp, first, cont


def test_two_processes_train_like_one(runs):
    """Per-step losses and evaluations of the 2-process run equal the 1-process run's to rtol 1e-5 and grad norms
    to 1e-4 (the same tolerances, and the same reason, as the 8-device test: only the order of fp32 sums
    differs); the curve really moves, so a process reading the wrong rows (or the same rows as the other) shows."""
    tmp, _, _ = runs
    pair = [r for r in curve(tmp / "pair") if r[0] <= N]
    one = curve(tmp / "one")
    assert [s for s, _, _ in pair] == [s for s, _, _ in one] == list(range(1, N + 1))
    losses = np.array([x for _, x, _ in pair])
    assert np.isfinite(losses).all() and losses[-1] < losses[0] - 0.3
    np.testing.assert_allclose(losses, [x for _, x, _ in one], rtol=1e-5, atol=0)
    np.testing.assert_allclose([g for _, _, g in pair], [g for _, _, g in one], rtol=1e-4, atol=0)
    ep, eo = evals(tmp / "pair"), evals(tmp / "one")
    assert [e[0] for e in eo] == [4, N] and [e[0] for e in ep][:2] == [4, N]
    np.testing.assert_allclose(np.array(ep)[:2, 1:], np.array(eo)[:, 1:], rtol=1e-5, atol=0)


def test_process_zero_writes_and_prints(runs):
    """Both processes saw the job (4 devices over 2 processes); only process 0 printed the run; every step and
    eval was logged once (not once per process); the summary, config and checkpoints are there."""
    tmp, first, _ = runs
    p0, p1 = first["pair"]
    assert "cpu x4 over 2 processes | batch 8 x 64 (micro 4 x 2)" in p0, p0[-2000:]
    assert "val bpb" in p0 and "sample (temperature" in p0
    assert "val bpb" not in p1 and "step " not in p1 and "sample" not in p1, p1[-2000:]
    recs = records(tmp / "one")
    steps = [r["step"] for r in records(tmp / "copy") if "loss" in r]
    assert steps == list(range(1, M + 1)), steps
    assert len([r for r in recs if "loss" in r]) == N
    summary = json.loads((tmp / "pair" / "summary.json").read_text())
    assert summary["step"] == M and np.isfinite(summary["val_bpb"])
    assert sorted(int(p.name) for p in (tmp / "pair" / "checkpoints").iterdir()) == [3, 6, 9]


def test_resume_on_two_processes_and_on_one_agree(runs):
    """The checkpoint two processes wrote at step N resumes on two processes and (a copy of it) on one: both
    continuations log steps N+1..M once each, with equal losses (rtol 1e-5)."""
    tmp, _, cont = runs
    assert f"resumed {tmp / 'pair'} at step {N}" in cont["pair2"][0]
    assert "resumed" not in cont["pair2"][1]
    pair = [r for r in curve(tmp / "pair") if r[0] > N]
    copy = [r for r in curve(tmp / "copy") if r[0] > N]
    assert [s for s, _, _ in pair] == [s for s, _, _ in copy] == list(range(N + 1, M + 1))
    np.testing.assert_allclose([x for _, x, _ in pair], [x for _, x, _ in copy], rtol=1e-5, atol=0)
    np.testing.assert_allclose([g for _, _, g in pair], [g for _, _, g in copy], rtol=1e-4, atol=0)


HOLD = "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX); " \
       "print('held', flush=True); time.sleep(120)"


def test_an_error_on_one_process_stops_every_process(runs):
    """Process 0 cannot take the run's lock (another job holds it): it stops with the lock's message, process 1
    stops at the end of the same phase saying process 0 failed, both at once (not after JAX's 5-minute
    timeouts), and the run directory is untouched."""
    import time

    tmp, _, _ = runs
    run = tmp / "one"
    before = (run / "metrics.jsonl").read_bytes()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        t0 = time.perf_counter()
        procs = launch(tmp, "locked", ["train", "--run-dir", str(run), "--resume", "--set", "train.num_steps=9"], 2, 2)
        for p in procs:
            p.wait(timeout=200)
        took = time.perf_counter() - t0
    finally:
        holder.kill()
        holder.wait()
    logs = [(tmp / f"locked.{i}.log").read_text() for i in range(2)]
    assert [p.returncode for p in procs] == [2, 2], logs
    assert "error: another process is using run directory" in logs[0]
    assert ("error: process 0 of 2 stopped with an error while locking the run directory (CheckpointError: "
            "another process is using run directory") in logs[1]
    assert took < 90, took
    assert (run / "metrics.jsonl").read_bytes() == before


@pytest.mark.parametrize("args,message", [
    (["--coordinator", "127.0.0.1:1234"], "missing --num-processes, --process-id"),
    (["--num-processes", "2", "--process-id", "1"], "missing --coordinator"),
    (["--coordinator", "h:1", "--num-processes", "2", "--process-id", "2"], r"--process-id=2 must lie in \[0, "),
    (["--coordinator", "h:1", "--num-processes", "0", "--process-id", "0"], "--num-processes=0 must be >= 1"),
    (["--dry-run", "--distributed"], "--dry-run compiles from shapes in one process"),
])
def test_incomplete_job_flags_are_a_clear_error(tmp_path, capsys, args, message):
    """Flags that cannot describe a job stop before JAX starts, naming what is missing; nothing is written."""
    import re

    from jaxchat.cli import main

    assert main(["train", "--run-dir", str(tmp_path / "run"), *args]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


def test_distributed_without_a_cluster_is_a_clear_error(tmp_path):
    """`--distributed` where JAX detects no cluster says so and what to pass instead (in a child: joining a job
    is once per process)."""
    env = child_env()
    for k in [k for k in env if k.startswith(("SLURM_", "OMPI_", "TPU_", "KUBERNETES_", "JAX_COORDINATOR"))]:
        env.pop(k)
    out = subprocess.run([sys.executable, "-m", "jaxchat.cli", "train", "--distributed", "--run-dir",
                          str(tmp_path / "run")], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "JAX found no cluster it knows here" in out.stderr and "--coordinator HOST:PORT" in out.stderr
    assert not (tmp_path / "run").exists()
