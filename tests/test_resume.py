"""Checkpoints are atomic and exact: kill a run at any moment, resume, and the loss curve is bitwise the same.

The reference run is the golden config tests/golden/tiny-micro-20.json (the `tiny` preset at micro shapes, 20 steps,
grad_accum 2, a save every 4 steps, an eval every 8, keep_last 2 + keep_every 8). Other runs are compared with it.
Compiled programs are shared between the runs (and the child processes) through the session's persistent XLA cache
(tests/conftest.py).
"""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from conftest import child_env, curve, evals, records
from jaxchat.checkpoint import SAVE_DELAY_ENV, SAVE_MARKER_ENV, TMP_MARK, Checkpointer, find_debris
from jaxchat.cli import main
from jaxchat.data import loader
from jaxchat.data.loader import batch_indices, get_batch

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden"


def golden(name: str) -> dict:
    return json.loads((GOLDEN / f"{name}.json").read_text())


REF = golden("tiny-micro-20")
N = 20  # steps of the reference run; saves at 4, 8, 12, 16, 20; evals at 8, 16, 20


def train_args(run_dir, *sets, preset=True, base=REF["set"]):
    args = ["train", "--run-dir", str(run_dir)] + (["--preset", REF["preset"]] if preset else [])
    for s in list(base) + list(sets):
        args += ["--set", s]
    return args


# ------------------------------------------------------------------------------------------------------------
# shared fixtures

def state_leaves(run_dir, step):
    from jaxchat.rundir import load_run_config
    from jaxchat.optim import build_optimizer
    from jaxchat.averaging import Averaging
    from jaxchat.train import ModelFns, abstract_state

    cfg = load_run_config(run_dir)
    fns = ModelFns(cfg)
    ck = Checkpointer(run_dir, async_save=False, read_only=True)
    state, _ = ck.restore(abstract_state(fns, build_optimizer(cfg, None), averaging=Averaging.from_config(cfg)), step)
    ck.close()
    return jax.tree_util.tree_flatten_with_path(state)[0]


def assert_same_state(run_a, run_b, step):
    a, b = state_leaves(run_a, step), state_leaves(run_b, step)
    assert [p for p, _ in a] == [p for p, _ in b]
    names = {jax.tree_util.keystr(p) for p, _ in a}
    assert any("opt_state" in n for n in names) and any("params" in n for n in names)
    for (path, x), (_, y) in zip(a, b):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape, jax.tree_util.keystr(path)
        assert np.array_equal(x, y), f"{jax.tree_util.keystr(path)} differs at step {step}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted golden run, with a spy on the batches and seeds the loop asks for."""
    import jaxchat.loop as loop
    import jaxchat.run as run_module

    run = tmp_path_factory.mktemp("ref") / "run"
    calls, inits = [], []
    real_batch, real_init = loop.get_batch, run_module.init_state
    loop.get_batch = lambda rows, step, bs, seed, **kw: calls.append((step, seed)) or real_batch(rows, step, bs,
                                                                                                 seed, **kw)
    run_module.init_state = lambda fns, opt, seed, *avg: inits.append(seed) or real_init(fns, opt, seed, *avg)
    try:
        assert main(train_args(run)) == 0
    finally:
        loop.get_batch, run_module.init_state = real_batch, real_init
    return run, calls, inits


# ------------------------------------------------------------------------------------------------------------
# determinism, seeds, retention

def test_golden_losses(reference):
    """Same config and seed, same losses: the reference run reproduces the golden file exactly."""
    run, _, _ = reference
    env = REF["env"]
    data = json.loads((run / "data.json").read_text())
    if data["corpus_fingerprint"] != env["corpus_fingerprint"]:
        pytest.skip(f"this Python's stdlib corpus differs from the golden's (Python {env['python']}): regenerate "
                    f"with scripts/make_golden.py")
    assert data["tokenizer_fingerprint"] == env["tokenizer_fingerprint"]
    got = [loss for _, loss, _ in curve(run)]
    assert len(got) == N and len(set(got)) > N // 2  # a real, moving curve
    if same_build(env):
        assert got == REF["losses"]
        assert [g for _, _, g in curve(run)] == REF["grad_norms"]
    else:  # another XLA build or CPU may round float reductions differently
        np.testing.assert_allclose(got, REF["losses"], rtol=1e-4)


def same_build(env: dict) -> bool:
    """Whether this process compiles the golden's programs exactly as its run did: same jax and jaxlib, same
    backend and, on CPU, the same vector ISA (XLA:CPU emits AVX-512 or AVX2 code, which rounds differently)."""
    import jaxlib

    from jaxchat.environment import cpu_vector_isa

    here = (jax.__version__, jaxlib.__version__, jax.default_backend())
    if here != (env["jax"], env["jaxlib"], env["backend"]):
        return False
    return env["backend"] != "cpu" or env.get("cpu_isa") == cpu_vector_isa()


def test_seeds_are_independent(reference):
    """init_seed sets the initial params only and data_seed the batch order only: the loop passes each to its
    own consumer, and changing one leaves the other's effect bitwise unchanged."""
    from jaxchat.rundir import load_run_config
    from jaxchat.data import get_batch as gb
    from jaxchat.optim import build_optimizer
    from jaxchat.train import ModelFns, init_state

    run, calls, inits = reference
    cfg = load_run_config(run)
    assert inits == [cfg.train.init_seed] and {s for _, s in calls} == {cfg.data.data_seed}
    assert [s for s, _ in calls] == list(range(N))  # one batch per step, in order
    fns = ModelFns(cfg)
    opt = build_optimizer(cfg, None)
    p0, p1 = (jax.tree.leaves(init_state(fns, opt, s)["params"]) for s in (0, 1))
    assert not all(np.array_equal(a, b) for a, b in zip(p0, p1))  # init_seed matters ...
    rows = np.arange(50 * 9, dtype=np.int32).reshape(50, 9)
    b0 = [gb(rows, s, 8, 0)[0] for s in range(10)]
    b1 = [gb(rows, s, 8, 1)[0] for s in range(10)]
    assert not all(np.array_equal(a, b) for a, b in zip(b0, b1))  # ... and so does data_seed,
    # but init_state takes no data seed and get_batch no init seed: a study can vary one at a time.


def test_retention_keeps_last_n_and_every_m(reference):
    run, _, _ = reference
    # saves at 4, 8, 12, 16, 20; keep_last 2 -> 16, 20; keep_every 8 -> 8, 16
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir()) == [8, 16, 20]
    assert Checkpointer(run, read_only=True).all_steps() == [8, 16, 20]


def test_sample_does_not_touch_training(reference):
    """From the reference checkpoint at 16: sample (as the loop does at the end), then train 4 steps with the
    step function directly: the state equals the reference's checkpoint 20 bitwise. (Evaluations mid-run are
    covered by the SIGKILL test, whose first process evaluates every 2 steps.)"""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from jaxchat.rundir import load_run_config
    from jaxchat.data import Tokenizer
    from jaxchat.loop import DEFAULT_PROMPT
    from jaxchat.optim import build_optimizer
    from jaxchat.run import load_dataset
    from jaxchat.sample import Sampler
    from jaxchat.train import (ModelFns, abstract_state, batch_sharding, make_mesh, make_train_step,
                               shaped_batch)

    run, _, _ = reference
    cfg = load_run_config(run)
    fns, opt = ModelFns(cfg), build_optimizer(cfg, None)
    mesh = make_mesh()
    rep = NamedSharding(mesh, P())
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rep), abstract_state(fns, opt))
    ck = Checkpointer(run, read_only=True)
    state, _ = ck.restore(abstract, 16)
    ck.close()
    ds = load_dataset(cfg, log=lambda *a: None)
    tok = Tokenizer.load(run / "tokenizer.json")
    Sampler(fns).generate(state["params"], [tok.bos_id] + tok.encode(DEFAULT_PROMPT), cfg.train.sample_tokens,
                          temperature=0.8, top_k=50, seed=0)
    step = make_train_step(fns, opt)
    for s in range(16, N):
        x, y = get_batch(ds.train_rows, s, cfg.train.batch_size, cfg.data.data_seed)
        state, _ = step(state, jax.device_put(shaped_batch(x, y, cfg.train.grad_accum), batch_sharding(mesh)))
    ref = state_leaves(run, N)
    got = jax.tree_util.tree_flatten_with_path(state)[0]
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for (_, a), (_, b) in zip(ref, got))


# ------------------------------------------------------------------------------------------------------------
# exact resume

def _wait_for(cond, timeout, what, proc, log):
    t0 = time.time()
    while not cond():
        if proc.poll() is not None:
            tail = Path(log).read_text()[-3000:]
            raise AssertionError(f"the child exited ({proc.returncode}) before {what}:\n{tail}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_sigkill_mid_save_then_resume_is_exact(reference, tmp_path, capsys):
    """A child process trains with the reference config but evaluates every 2 steps; the save of step 12 is held
    (test hook) after its files are written and before the rename that commits it. Training goes on meanwhile
    (saves are asynchronous); once step 14 is logged the child is SIGKILLed. Then: the committed checkpoints are 4
    and 8, the interrupted save is only a temporary directory, a reader sees step 8 and loads it. `--resume`
    (with the reference's eval_every) removes the debris and says so, drops the records of steps 9+ and says so,
    resumes at 8 (right after an eval), asks for exactly the batches of steps 8..19, and ends bitwise equal to the
    uninterrupted run (per-step losses and grad norms, evals, params and optimizer state), each step logged once,
    with the lost time accounted for."""
    import jaxchat.loop as loop

    ref, _, _ = reference
    run = tmp_path / "run"
    marker = tmp_path / "save-held"
    cmd = [sys.executable, "-m", "jaxchat.cli"] + train_args(run, "train.eval_every=2")
    log = open(tmp_path / "child.log", "w")
    proc = subprocess.Popen(cmd, env=child_env(**{SAVE_DELAY_ENV: "120@12", SAVE_MARKER_ENV: marker}),
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_for(marker.exists, 120, "the save of step 12 to start", proc, log.name)
        assert marker.read_text().startswith("12 ") and TMP_MARK in marker.read_text()

        def logged_14():
            return any(r.get("step", 0) >= 14 and "loss" in r for r in records(run))
        _wait_for(logged_14, 60, "step 14 to be logged while the save of step 12 is in flight", proc, log.name)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    assert proc.returncode == -signal.SIGKILL

    # what a reader sees after the crash: committed steps only, the latest loadable
    debris = find_debris(run)
    assert [p.name.split(".")[0] for p in debris] == ["12"]
    ck = Checkpointer(run, read_only=True)
    assert ck.all_steps() == [4, 8] and ck.latest_step() == 8
    ck.close()
    state = dict(state_leaves(run, 8))
    assert all(np.isfinite(np.asarray(v)).all() for v in state.values() if np.asarray(v).dtype.kind == "f")
    killed = max(r["step"] for r in records(run) if "loss" in r)
    assert killed >= 14

    capsys.readouterr()
    asked, real = [], loop.get_batch
    loop.get_batch = lambda rows, step, bs, seed, **kw: asked.append(step) or real(rows, step, bs, seed, **kw)
    try:
        assert main(["train", "--run-dir", str(run), "--resume", "--set", "train.eval_every=8"]) == 0
    finally:
        loop.get_batch = real
    out = capsys.readouterr().out
    assert f"removed 1 incomplete checkpoint(s) left by an interrupted save: {debris[0].name}" in out
    assert "after step 8" in out and "at step 8" in out
    assert find_debris(run) == []
    assert asked == list(range(8, N))
    assert curve(run) == curve(ref)  # bitwise, each step once
    assert [e[0] for e in evals(run)] == [2, 4, 6, 8, 16, 20]
    assert evals(run)[3:] == evals(ref)  # the evals at 2, 4, 6 (and 8) changed nothing
    assert_same_state(run, ref, N)
    assert Checkpointer(run, read_only=True).all_steps() == [8, 16, 20]

    # time accounting over both processes
    restart = json.loads((run / "restarts.jsonl").read_text().splitlines()[-1])
    assert restart["step"] == 8 and restart["lost_steps"] == list(range(9, killed + 1)) and restart["lost_s"] > 0
    summary = json.loads((run / "summary.json").read_text())
    t = summary["time_s"]
    assert set(t) >= {"compile", "data", "train", "eval", "checkpoint", "restarts"}
    assert t["restarts"] == round(restart["lost_s"], 2) and summary["restarts"] == 1
    assert abs(sum(t.values()) - summary["wall_s"]) < 0.05
    assert summary["wall_s"] > summary["process_wall_s"]  # the killed process's time up to step 8 is included


AVERAGING = ["train.ema_decay=0.9", "train.swa_lr_below=0.6", "train.swa_every=2", "optim.warmup_steps=2"]


@pytest.mark.slow
def test_resume_with_ema_and_swa_is_exact(tmp_path, capsys):
    """EMA and SWA on (collecting from step 10 of 20): a run that lost everything after its checkpoint of step 8
    (the later checkpoints removed, as a kill after that save leaves it) resumes from 8 and ends bitwise equal
    to the uninterrupted run: params, optimizer state, EMA, SWA sum and count. The restored averages are the
    checkpoint's, so a resume that re-initialised them (or dropped them) would differ."""
    import shutil

    ref, run = tmp_path / "ref", tmp_path / "run"
    assert main(train_args(ref, *AVERAGING)) == 0
    shutil.copytree(ref, run)
    for step in (16, 20):
        shutil.rmtree(run / "checkpoints" / str(step))
    (run / "summary.json").unlink()
    capsys.readouterr()
    assert main(["train", "--run-dir", str(run), "--resume"]) == 0
    assert "at step 8" in capsys.readouterr().out
    assert curve(run) == curve(ref)
    assert_same_state(run, ref, N)
    leaves = dict((jax.tree_util.keystr(p), np.asarray(x)) for p, x in state_leaves(run, N))
    assert any("['ema']" in k for k in leaves) and any("['swa_sum']" in k for k in leaves)
    count = [v for k, v in leaves.items() if "swa_count" in k][0]
    assert 0 < int(count) < N // 2  # SWA collected some steps, not all
    # --resume with other averaging settings is refused before anything changes
    assert main(["train", "--run-dir", str(run), "--resume", "--set", "train.ema_decay=0.5"]) == 2
    assert "train.ema_decay: checkpoint has 0.9, now 0.5" in capsys.readouterr().err


def test_checkpoint_save_is_async_and_atomic(tmp_path, monkeypatch):
    """While a save is being written, training goes on (save returns at once) and a second reader of the
    directory sees only committed steps; the step appears only when complete. Retention: last 2 + every 4."""
    import jax.numpy as jnp

    monkeypatch.setenv(SAVE_DELAY_ENV, "1.5@3")
    ck = Checkpointer(tmp_path, keep_last=2, keep_every=4)
    tree = {"w": jnp.arange(1000.0), "step": jnp.int32(0)}
    for s in (1, 2):
        ck.save(s, {**tree, "step": jnp.int32(s)}, {"s": s})
    ck.wait()
    t0 = time.perf_counter()
    ck.save(3, {**tree, "step": jnp.int32(3)}, {"s": 3})
    returned = time.perf_counter() - t0
    assert returned < 1.0  # not blocked on the (held) write
    time.sleep(0.3)
    reader = Checkpointer(tmp_path, read_only=True)
    assert reader.all_steps() == [1, 2] and [p.name.split(".")[0] for p in find_debris(tmp_path)] == ["3"]
    reader.close()
    ck.wait()
    assert find_debris(tmp_path) == [] and Checkpointer(tmp_path, read_only=True).all_steps() == [2, 3]
    for s in range(4, 10):
        ck.save(s, {**tree, "step": jnp.int32(s)}, {"s": s})
    ck.close()
    assert Checkpointer(tmp_path, read_only=True).all_steps() == [4, 8, 9]


def test_reconcile_metrics_after_a_chain_of_crashes(tmp_path):
    """Process A (started at t=100) saved step 4 at t=110, logged steps 5-6 and died; process B (t=200) resumed
    from 4 but died at step 5 before saving, mid-line. Resuming from 4 keeps steps <= 4 once each, moves the rest
    to metrics.discarded.jsonl, and counts as lost A's 110..130 and B's 200..240."""
    from jaxchat.rundir import reconcile_metrics

    a, b = 100.0, 200.0
    recs = [{"step": s, "loss": 1.0, "time": a + 2 * s, "proc": a} for s in (1, 2, 3, 4)]
    recs += [{"step": 4, "val_loss": 2.0, "time": 109.0, "proc": a}, {"step": 3, "loss": 1.0, "time": 107.0, "proc": a}]
    recs += [{"step": 5, "loss": 1.0, "time": 120.0, "proc": a}, {"step": 6, "loss": 1.0, "time": 130.0, "proc": a}]
    recs += [{"step": 5, "loss": 1.0, "time": 240.0, "proc": b}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"step": 6, "lo')
    out = reconcile_metrics(tmp_path, 4, {"saved_at": 110.0, "proc": a})
    assert out == {"dropped": 3, "lost_steps": [5, 6], "lost_s": 20.0 + 40.0, "unreadable_lines": 1, "duplicates": 1}
    kept = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["step"], "loss" in r) for r in kept] == [(1, True), (2, True), (3, True), (4, True), (4, False)]
    assert len((tmp_path / "metrics.discarded.jsonl").read_text().splitlines()) == 3


# ------------------------------------------------------------------------------------------------------------
# data order

@pytest.mark.parametrize("num_rows,batch", [(23, 1), (23, 4), (23, 5), (23, 23), (7, 10)])
def test_no_sequence_repeated_or_skipped_after_any_resume(num_rows, batch):
    """Exhaustively: for every resume step K over several epochs, the rows read by steps 0..K-1 and (after
    a fresh start: caches cleared) K..S-1 are those of the uninterrupted run, and each epoch reads every row
    exactly once, across epoch boundaries and batches that straddle them."""
    seed = 3
    steps = (4 * num_rows) // batch + 3
    loader.epoch_permutation.cache_clear()
    full = np.concatenate([batch_indices(s, batch, num_rows, seed) for s in range(steps)])
    for e in range(len(full) // num_rows):
        assert sorted(full[e * num_rows:(e + 1) * num_rows]) == list(range(num_rows))
    assert len(set(map(tuple, np.split(full[:num_rows * 2], 2)))) == 2  # epochs are shuffled differently
    for k in range(steps + 1):
        before = [batch_indices(s, batch, num_rows, seed) for s in range(k)]
        loader.epoch_permutation.cache_clear()  # a new process
        after = [batch_indices(s, batch, num_rows, seed) for s in range(k, steps)]
        np.testing.assert_array_equal(np.concatenate(before + after), full)
    rows = np.arange(num_rows * 5, dtype=np.int32).reshape(num_rows, 5)
    x, y = get_batch(rows, 2, batch, seed)
    np.testing.assert_array_equal(x[:, 0] // 5, batch_indices(2, batch, num_rows, seed))
    np.testing.assert_array_equal(y, x + 1)


# ------------------------------------------------------------------------------------------------------------
# the full tiny preset (slow on CPU)

@pytest.mark.slow
def test_golden_tiny_20(tmp_path):
    g = golden("tiny-20")
    run = tmp_path / "tiny"
    assert main(train_args(run, base=g["set"])) == 0
    data = json.loads((run / "data.json").read_text())
    if data["corpus_fingerprint"] != g["env"]["corpus_fingerprint"]:
        pytest.skip("this Python's stdlib corpus differs from the golden's: regenerate with scripts/make_golden.py")
    got = [loss for _, loss, _ in curve(run)]
    if same_build(g["env"]):
        assert got == g["losses"]
    else:
        np.testing.assert_allclose(got, g["losses"], rtol=1e-4)
