"""Data-parallel training on 8 devices: the batch is split over a 1-D `data` mesh, params and optimizer state are
replicated, and the run reproduces the same run on 1 device (to fp32 reduction order), resumes exactly, and logs
its mesh.

JAX fixes the number of CPU devices when it starts, so each run is a child process: one with
XLA_FLAGS=--xla_force_host_platform_device_count=8 and one with 1 device, started together. The 8-device child
trains uninterrupted (run `a`), then trains again with a crash right after the save of step K (run `b`) and resumes
it to the end. A spy around the loop's train step records, from inside the run, the sharding of every batch and
of the state it was given, and whether the compiled step all-reduces across devices.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import child_env, curve, evals

ROOT = Path(__file__).resolve().parents[1]
REF = json.loads((ROOT / "tests" / "golden" / "tiny-micro-20.json").read_text())

N, K, DEVICES = 8, 4, 8
# The golden micro config (tests/golden/tiny-micro-20.json) at batch 16 = 2 micro-batches of 8 sequences, one per
# device; a short warmup so the loss moves clearly within N steps; an eval (batch split over the mesh too) at K.
SETS = [s for s in REF["set"] if not s.startswith(("train.num_steps", "train.batch_size", "train.save_every",
                                                     "train.eval_every", "train.keep_"))]
SETS += [f"train.num_steps={N}", "train.batch_size=16", "optim.warmup_steps=2", f"train.save_every={K}",
         f"train.eval_every={K}", "train.keep_last=10"]

CHILD = r"""
import json, sys
import jax
import jaxchat.loop as loop
from jaxchat.cli import main

out_path, sets, runs = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3:]  # runs: a [b K]
calls, trace_meshes = [], []
real_make = loop.make_train_step


def describe(state, batch, all_reduce):
    x = batch[0]
    leaves = jax.tree.leaves(state)
    shards = x.addressable_shards
    return {"batch_spec": [str(a) for a in x.sharding.spec], "mesh": dict(x.sharding.mesh.shape),
            "batch_shape": list(x.shape), "shard_shapes": sorted({str(tuple(s.data.shape)) for s in shards}),
            "shard_devices": len({s.device.id for s in shards}),
            "state_replicated": all(a.sharding.is_fully_replicated for a in leaves),
            "state_devices": sorted({len(a.sharding.device_set) for a in leaves}),
            "all_reduce": all_reduce}


def make_train_step(fns, opt, **kw):  # loop.py: make_train_step(...).lower(state, batch_shapes).compile()
    jitted = real_make(fns, opt, **kw)

    class Lowered:
        def __init__(self, lowered):
            self.lowered = lowered

        def compile(self):
            compiled = self.lowered.compile()
            all_reduce = "all-reduce" in compiled.as_text()

            def step(state, batch):
                calls.append(describe(state, batch, all_reduce))
                return compiled(state, batch)
            return step

    class Spy:
        def lower(self, *args):  # the mesh set around the trace (splash attention shard_maps over it)
            mesh = jax.sharding.get_abstract_mesh()
            trace_meshes.append({} if mesh.empty else dict(mesh.shape))
            return Lowered(jitted.lower(*args))
    return Spy()


loop.make_train_step = make_train_step


class Crash(Exception):
    pass


def crash_at(step):  # the batch of step `step` is never made: the run dies right after saving step `step`
    real = loop.get_batch

    def get_batch(rows, s, bs, seed, **kw):
        if s == step:
            raise Crash(f"crash before step {step + 1}")
        return real(rows, s, bs, seed, **kw)
    return get_batch


def train(run, *extra):
    args = ["train", "--preset", "tiny", "--run-dir", run] + [a for s in sets for a in ("--set", s)] + list(extra)
    assert main(args) == 0, args


result = {"devices": len(jax.devices()), "platform": jax.default_backend()}
train(runs[0])
result["steps_a"], calls[:] = list(calls), []
if len(runs) > 1:
    real_get_batch = loop.get_batch
    loop.get_batch = crash_at(int(runs[2]))
    try:
        train(runs[1])
        raise SystemExit("the crash did not happen")
    except Crash:
        pass
    loop.get_batch = real_get_batch
    assert main(["train", "--run-dir", runs[1], "--resume"]) == 0
    result["steps_b"] = list(calls)
result["trace_meshes"] = trace_meshes
json.dump(result, open(out_path, "w"))
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Both children, started together; the dataset is prepared here first (into the session's cache)."""
    from jaxchat.overrides import apply_overrides
    from jaxchat.run import load_dataset
    from jaxchat.presets import get_preset

    load_dataset(apply_overrides(get_preset("tiny"), SETS), log=lambda *a: None)
    tmp = tmp_path_factory.mktemp("multidevice")
    procs = {}
    for n, dirs in ((DEVICES, [tmp / "a", tmp / "b", K]), (1, [tmp / "one"])):
        flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}".strip()
        env = child_env(XLA_FLAGS=flags)
        if n == 1:  # the children run at the same time and JAX's cache files are not written atomically
            env = {k: v for k, v in env.items() if k != "JAX_COMPILATION_CACHE_DIR"} | {"JAXCHAT_COMPILE_CACHE": "off"}
        cmd = [sys.executable, "-c", CHILD, str(tmp / f"out{n}.json"), json.dumps(SETS)] + [str(d) for d in dirs]
        with open(tmp / f"child{n}.log", "w") as log:
            procs[n] = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp)
    try:
        for proc in procs.values():
            proc.wait(timeout=300)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for n, proc in procs.items():
        assert proc.returncode == 0, (tmp / f"child{n}.log").read_text()[-3000:]
    out = {n: json.loads((tmp / f"out{n}.json").read_text()) for n in procs}
    logs = {n: (tmp / f"child{n}.log").read_text() for n in procs}
    return tmp, out, logs


def test_eight_devices_split_the_batch(runs):
    """JAX saw 8 CPU devices, the loop logged a mesh of 8, and every step got a batch split 8 ways along its batch
    axis (one sequence of each micro-batch per device) and a state replicated on all 8; the compiled step
    all-reduces (the gradients) across them. The step was traced with the mesh set (what splash's shard_map
    reads)."""
    tmp, out, logs = runs
    eight, one = out[DEVICES], out[1]
    assert eight["devices"] == DEVICES and eight["platform"] == "cpu" and one["devices"] == 1
    assert logs[DEVICES].count(f"x{DEVICES} | batch 16 x 64 (micro 8 x 2)") == 3  # run a, run b, b resumed
    assert "x1 | batch 16 x 64 (micro 8 x 2)" in logs[1]
    seen = eight["steps_a"] + eight["steps_b"]
    assert len(eight["steps_a"]) == N and len(eight["steps_b"]) == N  # run b: steps 1..K, then K+1..N resumed
    for s in seen:
        assert s["mesh"] == {"data": DEVICES} and s["batch_spec"] == ["None", "data", "None"], s
        assert s["batch_shape"] == [2, 8, 64] and s["shard_shapes"] == ["(2, 1, 64)"], s
        assert s["shard_devices"] == DEVICES and s["state_replicated"] and s["state_devices"] == [DEVICES], s
        assert s["all_reduce"], s
    assert eight["trace_meshes"] == [{"data": DEVICES}] * 3 and one["trace_meshes"] == [{"data": 1}]
    for s in one["steps_a"]:
        assert s["mesh"] == {"data": 1} and s["shard_shapes"] == ["(2, 8, 64)"] and s["shard_devices"] == 1, s


def test_eight_devices_train_like_one(runs):
    """The 8-device run's per-step losses and evaluations equal the 1-device run's to rtol 1e-5, its grad norms to
    rtol 1e-4. The two programs differ only in the order of fp32 sums: each device sums the token losses and
    gradients of its sequence and an all-reduce adds the 8 partial sums, where one device sums all 16 sequences in
    another order. That is ~1e-7 relative per sum (fp32 eps 6e-8), carried through N AdamW steps: measured here
    <= 5e-7 on the losses and evals, <= 7e-6 on the grad norms (a norm of gradient entries that are themselves
    cancelling sums over tokens, so their relative error is larger), i.e. a margin >= 14x. A real difference is
    far larger: from step 2 on the loss moves by 0.05-0.25 per step (~1000x the tolerance), so a wrong shard of
    data shows, and a gradient left unreduced or reduced twice over the 8 devices changes the grad norm by a
    factor (AdamW would hide a scaled gradient in the loss, not in the norm)."""
    tmp, _, _ = runs
    a, one = curve(tmp / "a"), curve(tmp / "one")
    assert [s for s, _, _ in a] == [s for s, _, _ in one] == list(range(1, N + 1))
    losses, norms = np.array([x for _, x, _ in a]), np.array([g for _, _, g in a])
    assert np.isfinite(losses).all() and np.isfinite(norms).all() and (norms > 0.1).all()
    assert (np.diff(losses) < 0).all() and losses[-1] < losses[0] - 0.5  # a real curve, moving at every step
    np.testing.assert_allclose(losses, [x for _, x, _ in one], rtol=1e-5, atol=0)
    np.testing.assert_allclose(norms, [g for _, _, g in one], rtol=1e-4, atol=0)
    ea, eo = evals(tmp / "a"), evals(tmp / "one")
    assert [e[0] for e in ea] == [e[0] for e in eo] == [K, N]
    np.testing.assert_allclose(np.array(ea)[:, 1:], np.array(eo)[:, 1:], rtol=1e-5, atol=0)


def test_resume_on_eight_devices_is_exact(runs):
    """Run b died right after the save of step K (its next batch raised) and was resumed on 8 devices: it
    restarted at K, and its per-step losses, grad norms and evaluations equal the uninterrupted 8-device run's
    bitwise, each step logged once."""
    tmp, _, logs = runs
    assert f"resumed {tmp / 'b'} at step {K}" in logs[DEVICES]
    assert [json.loads(x)["step"] for x in (tmp / "b" / "restarts.jsonl").read_text().splitlines()] == [K]
    assert curve(tmp / "b") == curve(tmp / "a")
    assert evals(tmp / "b") == evals(tmp / "a")


def test_eight_device_run_evaluates_and_samples_on_one_device(runs, capsys):
    """`jaxchat eval`, `sample` and `export` read a run trained on 8 devices in this 1-device process (run.Run.load restores
    onto one device; Orbax refuses a checkpoint saved on another topology without a target sharding), and the
    restored params give the run's own final evaluation (same rows, rtol 1e-5 as above)."""
    from jaxchat.cli import main
    from jaxchat.evaluate import eval_rows, evaluate, make_eval_step
    from jaxchat.run import load_dataset, load_run

    tmp, _, _ = runs
    cfg, fns, params, tok, step = load_run(tmp / "a")
    assert step == N
    rows = eval_rows(load_dataset(cfg, log=lambda *a: None).val_rows, 8, cfg.train.eval_tokens)
    out = evaluate(make_eval_step(fns, tok.token_bytes()), params, rows, 8)
    (_, val_loss, val_bpb), = [e for e in evals(tmp / "a") if e[0] == N]
    np.testing.assert_allclose([out["val_loss"], out["val_bpb"]], [val_loss, val_bpb], rtol=1e-5, atol=0)
    capsys.readouterr()
    assert main(["sample", "--run", str(tmp / "a"), "--prompt", "def ", "--max-tokens", "4"]) == 0
    assert capsys.readouterr().out.startswith("def ")
    # `jaxchat export` restores the same way (interop/export.py): the exported tensors are the run's params
    from safetensors.numpy import load_file

    assert main(["export", str(tmp / "a"), "--format", "safetensors", "--out", str(tmp / "export")]) == 0
    tensors = load_file(next((tmp / "export").glob("*.safetensors")))
    np.testing.assert_array_equal(tensors["wte.embedding"], np.asarray(params["wte"]["embedding"]))
