"""Run a named plan of `jaxchat bench` measurements, one fresh process each (so every peak-memory reading is
that run's own), inside a time budget; collect JSON lines, BENCHMARKS.md rows and logs in one folder.

    python benchmarks/suite.py PLAN --out DIR [--budget SECONDS] [--only SUBSTRING] [--set KEY=VALUE ...]

Plans are below (`PLANS`); each entry is (note, bench arguments, extra environment). An experiment kept as a
patch (benchmarks/patches/) is measured by putting `PATCH: "benchmarks/patches/NAME.patch"` in the entry's
environment: that run imports jaxchat from a scratch copy of src/ and tests/ with the patch applied, so the
baseline and the experiment run in one call. A run that fails (out of memory, unsupported shape, a patch that
no longer applies) is recorded as a failure with the tail of its output, and the suite goes on. Rows land
in DIR/rows.md (append them to BENCHMARKS.md), full results in DIR/results.jsonl, output in DIR/suite.log.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from jaxchat.bench import git_commit  # noqa: E402  (how `jaxchat bench` names the code in a row)
NO_CMDBUF = {"XLA_FLAGS": "--xla_gpu_enable_command_buffer="}
SOFTCAP_EXP = {"PATCH": "benchmarks/patches/softcap_exp.patch"}
LOSS_KERNEL = {"PATCH": "benchmarks/patches/loss_kernel.patch"}
EMBED_CLIP = {"PATCH": "benchmarks/patches/embed_clip.patch"}

D12 = ["--preset", "nanochat-d12", "--seq", "2048", "--dtype", "bfloat16"]
GELU = ["--preset", "d12-gelu-chinchilla", "--seq", "1024", "--dtype", "bfloat16"]
D12_STEP = D12 + ["--batch", "32", "--accum", "8", "--backend", "cudnn", "--steps", "6"]  # the presets' one-GPU steps
GELU_STEP = GELU + ["--batch", "64", "--accum", "4", "--backend", "cudnn", "--steps", "6"]
YAT_STEP = ["--preset", "d12-yatnmn-softplus-chinchilla", *GELU_STEP[2:]]  # the seed-card recipe, its MLP
SWIGLU_STEP = GELU_STEP + ["--set", "model.mlp=swiglu"]
TRITON_FUSIONS = {"XLA_FLAGS": "--xla_gpu_experimental_all_fusions_with_triton=true"}
TRITON_FUSIONS_OFF = {"XLA_FLAGS": "--xla_gpu_experimental_all_fusions_with_triton=false"}
TRITON_GEMM_ANY = {"XLA_FLAGS": "--xla_gpu_triton_gemm_any=true"}
BLOCK_REWRITER = {"XLA_FLAGS": "--xla_gpu_experimental_enable_fusion_block_level_rewriter=true"}
TRITON_AND_BLOCK_REWRITER = {"XLA_FLAGS": f"{TRITON_FUSIONS['XLA_FLAGS']} {BLOCK_REWRITER['XLA_FLAGS']}"}

MICRO = ["--preset", "tiny", "--set", "model.n_layer=2", "--set", "model.n_embd=64", "--set", "model.n_kv_head=1",
         "--set", "model.n_head=1", "--set", "model.vocab_size=512", "--set", "data.tokenizer_vocab=512",
         "--seq", "64", "--batch", "4", "--steps", "3", "--warmup", "1"]

PLANS: dict[str, list[tuple[str, list[str], dict]]] = {
    "micro": [("micro smoke test", MICRO, {}), ("micro smoke test, profiled", MICRO + ["--profile", "/tmp/jaxchat-prof"], {})],
    # the shared CPU benchmark config (SPEC: tiny = 4 layers, 256 wide, vocab 8192, seq 512, batch 8, fp32)
    "cpu": [("shared CPU config", ["--preset", "cpu-bench", "--batch", "8", "--seq", "512", "--dtype", "float32",
                                   "--steps", "6", "--warmup", "1"], {})],
    # first H100 call: the honest baseline numbers, then one profiled run
    "h100-baseline": [
        ("d12 b32 cudnn", D12 + ["--batch", "32", "--backend", "cudnn", "--steps", "15"], {}),
        ("gelu b64 cudnn", GELU + ["--batch", "64", "--backend", "cudnn", "--steps", "15"], {}),
        ("d12 b32 cudnn, command buffers off, profiled", D12 + ["--batch", "32", "--backend", "cudnn", "--steps", "9",
                                                                "--profile", "/tmp/jaxchat-prof"], NO_CMDBUF),
        ("gelu b32 cudnn", GELU + ["--batch", "32", "--backend", "cudnn", "--steps", "15"], {}),
        ("d12 b16 xla", D12 + ["--batch", "16", "--backend", "xla", "--steps", "9"], {}),
        ("gelu b32 xla", GELU + ["--batch", "32", "--backend", "xla", "--steps", "9"], {}),
        ("d12 b16 cudnn", D12 + ["--batch", "16", "--backend", "cudnn", "--steps", "15"], {}),
    ],
    # second H100 call, after the fused head (model/head.py) and the accumulation loop skipped at grad_accum 1
    "h100-opt": [
        ("d12 b32 cudnn, fused head", D12 + ["--batch", "32", "--backend", "cudnn", "--steps", "15"], {}),
        ("gelu b64 cudnn, fused head", GELU + ["--batch", "64", "--backend", "cudnn", "--steps", "15"], {}),
        ("d12 b32 cudnn, fused head, cmdbuf off, profiled", D12 + ["--batch", "32", "--backend", "cudnn", "--steps", "9",
                                                                   "--profile", "/tmp/jaxchat-prof"], NO_CMDBUF),
        ("gelu b128 cudnn, fused head", GELU + ["--batch", "128", "--backend", "cudnn", "--steps", "9"], {}),
        ("d12 b32 cudnn, fused head, triton_gemm_any", D12 + ["--batch", "32", "--backend", "cudnn", "--steps", "15"],
         {"XLA_FLAGS": "--xla_gpu_triton_gemm_any=true"}),
        ("gelu b32 cudnn, fused head", GELU + ["--batch", "32", "--backend", "cudnn", "--steps", "15"], {}),
        ("d12 b64 cudnn, fused head", D12 + ["--batch", "64", "--backend", "cudnn", "--steps", "9"], {}),
    ],
    # third H100 call: one-pass logsumexp under the soft-cap (model/head.py)
    "h100-lse": [
        ("d12 b32 cudnn, fused head + one-pass lse", D12 + ["--batch", "32", "--backend", "cudnn", "--steps", "15"], {}),
        ("gelu b64 cudnn, fused head + one-pass lse", GELU + ["--batch", "64", "--backend", "cudnn", "--steps", "15"], {}),
    ],
    # session 2 (built on CPU, no GPU then): scan over layer groups, remat policies, chunked loss, splash absent
    "h100-scan-remat": [
        ("d12 b32 cudnn (reference for this plan)", D12 + ["--batch", "32", "--backend", "cudnn", "--steps", "15"], {}),
        ("d12 b32 cudnn, scan", D12 + ["--batch", "32", "--backend", "cudnn", "--steps", "15",
                                        "--set", "model.scan_layers=true"], {}),
        ("gelu b64 cudnn (reference for this plan)", GELU + ["--batch", "64", "--backend", "cudnn", "--steps", "15"], {}),
        ("gelu b64 cudnn, scan", GELU + ["--batch", "64", "--backend", "cudnn", "--steps", "15",
                                         "--set", "model.scan_layers=true"], {}),
        ("d12 b64 cudnn, remat dots_no_batch", D12 + ["--batch", "64", "--backend", "cudnn", "--steps", "9",
                                                      "--set", "model.remat=dots_no_batch"], {}),
        ("d12 b32 cudnn, loss_chunk 8192", D12 + ["--batch", "32", "--backend", "cudnn", "--steps", "15",
                                                  "--set", "model.loss_chunk=8192"], {}),
        ("gelu b128 cudnn, remat save_qkv_proj", GELU + ["--batch", "128", "--backend", "cudnn", "--steps", "9",
                                                         "--set", "model.remat=save_qkv_proj"], {}),
    ],
    # session 3: RoPE + QK-norm as one Pallas kernel (model/rotary.py), the head's backward no longer sharing the
    # forward's fp32 tanh (model/head.py), and the presets' own one-GPU steps (8 accumulated micro-batches of 32)
    "h100-rope": [
        ("d12 b32 cudnn, rope kernel", D12 + ["--batch", "32", "--backend", "cudnn", "--steps", "15"], {}),
        ("d12 b32 cudnn, rope xla", D12 + ["--batch", "32", "--backend", "cudnn", "--steps", "15",
                                           "--set", "model.rope_norm=xla"], {}),
        ("gelu b64 cudnn, rope kernel", GELU + ["--batch", "64", "--backend", "cudnn", "--steps", "15"], {}),
        ("d12 32 x8 accum cudnn, rope kernel", D12 + ["--batch", "32", "--accum", "8", "--backend", "cudnn",
                                                      "--steps", "6"], {}),
        ("gelu 32 x8 accum cudnn, rope kernel", GELU + ["--batch", "32", "--accum", "8", "--backend", "cudnn",
                                                        "--steps", "6"], {}),
        ("d12 b64 cudnn, rope kernel", D12 + ["--batch", "64", "--backend", "cudnn", "--steps", "9"], {}),
        ("d12 b32 cudnn, rope kernel, cmdbuf off, profiled", D12 + ["--batch", "32", "--backend", "cudnn", "--steps",
                                                                    "6", "--profile", "/tmp/jaxchat-prof"], NO_CMDBUF),
    ],
    # session 3, the current code's headline rows: the presets' own one-GPU steps (accumulated micro-batches)
    "h100-final": [
        ("d12 32 x8 accum cudnn", D12 + ["--batch", "32", "--accum", "8", "--backend", "cudnn", "--steps", "6"], {}),
        ("gelu 64 x4 accum cudnn", GELU + ["--batch", "64", "--accum", "4", "--backend", "cudnn", "--steps", "6"], {}),
        ("d12 b32 cudnn", D12 + ["--batch", "32", "--backend", "cudnn", "--steps", "15"], {}),
        ("gelu b64 cudnn", GELU + ["--batch", "64", "--backend", "cudnn", "--steps", "15"], {}),
    ],
    # for the next session with a GPU (session 4 had none): the headline rows on the current code (commits after
    # session 3's call 5 changed the defaults, evaluation and the multi-device paths, not the one-GPU step), the GELU
    # backward by hand (patch) against autodiff, cuBLASLt (GELU epilogue), the GELU card's batch as 2 x 128 (b128
    # was +1% per token over b64 in session 1; d12 as 4 x 64 was no faster than 8 x 32 in session 3's call 4), and
    # a GELU profile. About 40 s a run: ~6 min, within one device call after `pytest -m gpu`
    # run in session 5; its two GELU-backward entries (a patch then, the code's GPU default since) are gone
    "h100-next": [  # most important first: the suite stops starting runs when its budget is spent
        ("d12 32 x8 accum cudnn", D12 + ["--batch", "32", "--accum", "8", "--backend", "cudnn", "--steps", "6"], {}),
        ("gelu 64 x4 accum cudnn", GELU + ["--batch", "64", "--accum", "4", "--backend", "cudnn", "--steps", "6"], {}),
        # cuBLASLt can run the tanh-GELU as the c_fc GEMM's epilogue (XLA's GEMM rewriter matches jax.nn.gelu's
        # formula), removing the forward's separate pass
        ("gelu 64 x4 accum cudnn, cublaslt", GELU + ["--batch", "64", "--accum", "4", "--backend", "cudnn", "--steps",
                                                     "6"], {"XLA_FLAGS": "--xla_gpu_enable_cublaslt=true"}),
        ("gelu b64 cudnn", GELU + ["--batch", "64", "--backend", "cudnn", "--steps", "15"], {}),
        ("d12 32 x8 accum cudnn, cublaslt", D12 + ["--batch", "32", "--accum", "8", "--backend", "cudnn", "--steps",
                                                   "6"], {"XLA_FLAGS": "--xla_gpu_enable_cublaslt=true"}),
        ("gelu 128 x2 accum cudnn", GELU + ["--batch", "128", "--accum", "2", "--backend", "cudnn", "--steps", "6"], {}),
        ("gelu b64 cudnn, cmdbuf off, profiled", GELU + ["--batch", "64", "--backend", "cudnn", "--steps", "6",
                                                         "--profile", "/tmp/jaxchat-prof"], NO_CMDBUF),
    ],
    # session 5: the soft-cap through exponentials (patch) against tanh, alternating, on both presets' own steps;
    # then a profile of the d12 micro-batch with the patch
    "h100-softcap": [
        ("d12 32 x8 accum cudnn", D12_STEP, {}),
        ("d12 32 x8 accum cudnn, softcap by exp (patch)", D12_STEP, SOFTCAP_EXP),
        ("gelu 64 x4 accum cudnn", GELU_STEP, {}),
        ("gelu 64 x4 accum cudnn, softcap by exp (patch)", GELU_STEP, SOFTCAP_EXP),
        ("d12 32 x8 accum cudnn, softcap by exp (patch), again", D12_STEP, SOFTCAP_EXP),
        ("d12 32 x8 accum cudnn, again", D12_STEP, {}),
        ("d12 b32 cudnn, softcap by exp (patch), cmdbuf off, profiled",
         D12 + ["--batch", "32", "--backend", "cudnn", "--steps", "6", "--profile", "/tmp/jaxchat-prof"],
         {**SOFTCAP_EXP, **NO_CMDBUF}),
    ],
    # session 5: XLA:GPU's fusion-emitter flags on the d12 step (the elementwise and reduction fusions run below
    # memory bandwidth: the loss's at ~2 TB/s), baseline first and last; then the GELU step with the first two
    "h100-flags": [
        ("d12 32 x8 accum cudnn", D12_STEP, {}),
        ("d12 32 x8, unroll factor 8", D12_STEP, {"XLA_FLAGS": "--xla_gpu_experimental_max_unroll_factor=8"}),
        ("d12 32 x8, tuned loop unroll", D12_STEP,
         {"XLA_FLAGS": "--xla_gpu_native_emitter_tune_unroll_factor_for_loops=true"}),
        ("d12 32 x8, block-level rewriter", D12_STEP, BLOCK_REWRITER),
        ("d12 32 x8, all fusions with triton", D12_STEP, TRITON_FUSIONS),
        ("d12 32 x8 accum cudnn, again", D12_STEP, {}),
        ("gelu 64 x4 accum cudnn", GELU_STEP, {}),
        ("gelu 64 x4, unroll factor 8", GELU_STEP, {"XLA_FLAGS": "--xla_gpu_experimental_max_unroll_factor=8"}),
        ("gelu 64 x4, tuned loop unroll", GELU_STEP,
         {"XLA_FLAGS": "--xla_gpu_native_emitter_tune_unroll_factor_for_loops=true"}),
    ],
    # session 5's last call: the two flags that won on d12 in h100-flags, paired on both presets
    "h100-triton": [
        ("gelu 64 x4 accum cudnn", GELU_STEP, {}),
        ("gelu 64 x4, all fusions with triton", GELU_STEP, TRITON_FUSIONS),
        ("d12 32 x8, all fusions with triton", D12_STEP, TRITON_FUSIONS),
        ("d12 32 x8 accum cudnn", D12_STEP, {}),
        ("gelu 64 x4, block-level rewriter", GELU_STEP, BLOCK_REWRITER),
        ("d12 32 x8, block-level rewriter", D12_STEP, BLOCK_REWRITER),
    ],
    # session 6, first call (run with GPU_TESTS_XLA_FLAGS=--xla_gpu_experimental_all_fusions_with_triton=true so the
    # GPU tests check the flag): can the Triton-fusions flag become the GPU default? Every MLP's d12 step with and
    # without it, paired, and the block-level rewriter on top of it (it became the default: h100-s6b)
    "h100-s6": [
        ("d12 32 x8 accum cudnn", D12_STEP, {}),
        ("d12 32 x8, all fusions with triton", D12_STEP, TRITON_FUSIONS),
        ("d12 32 x8, triton fusions + block-level rewriter", D12_STEP, TRITON_AND_BLOCK_REWRITER),
        ("gelu 64 x4 accum cudnn", GELU_STEP, {}),
        ("gelu 64 x4, all fusions with triton", GELU_STEP, TRITON_FUSIONS),
        ("gelu 64 x4, triton fusions + block-level rewriter", GELU_STEP, TRITON_AND_BLOCK_REWRITER),
        ("yatnmn-softplus 64 x4 accum cudnn", YAT_STEP, {}),
        ("yatnmn-softplus 64 x4, all fusions with triton", YAT_STEP, TRITON_FUSIONS),
        ("swiglu 64 x4 accum cudnn", SWIGLU_STEP, {}),
        ("swiglu 64 x4, all fusions with triton", SWIGLU_STEP, TRITON_FUSIONS),
    ],
    # session 6, second call: the Triton-fusions option is the step's GPU default (train.step_compiler_options);
    # XLA_FLAGS naming it =false is the off switch
    "h100-s6b": [
        ("d12 32 x8, default (triton fusions)", D12_STEP, {}),
        ("d12 32 x8, triton fusions off", D12_STEP, TRITON_FUSIONS_OFF),
        ("gelu 64 x4, default (triton fusions)", GELU_STEP, {}),
        ("gelu 64 x4, triton fusions off", GELU_STEP, TRITON_FUSIONS_OFF),
        ("d12 64 x4, default", D12 + ["--batch", "64", "--accum", "4", "--backend", "cudnn", "--steps", "6"], {}),
        ("d12 32 x8, + triton gemm any", D12_STEP, TRITON_GEMM_ANY),
        ("gelu 64 x4, + triton gemm any", GELU_STEP, TRITON_GEMM_ANY),
    ],
    # session 6, third call: the Pallas loss kernel (benchmarks/patches/loss_kernel.patch) against the xla head.
    # Call 3 ran its first tuning (whole rows, 4 warps); the patch now carries the tuning its sweep
    # (benchmarks/loss_kernel_tuning.py, call 4) found fastest: one row, 2048-column blocks, 4 warps
    "h100-s6c": [
        ("d12 32 x8, loss xla", D12_STEP, {}),
        ("d12 32 x8, loss pallas", D12_STEP + ["--set", "model.loss_kernel=pallas"], LOSS_KERNEL),
        ("gelu 64 x4, loss xla", GELU_STEP, {}),
        ("gelu 64 x4, loss pallas", GELU_STEP + ["--set", "model.loss_kernel=pallas"], LOSS_KERNEL),
    ],
    # for the next GPU session (prepared in session 6; ~6 min after the GPU tests): the embeddings gathered without
    # the NaN fill (patch), all windows long (what the sliding windows save inside cuDNN: compare step ms, not MFU,
    # which counts the windows' smaller attention), and a profile of the default step (state H)
    "h100-s7": [
        ("d12 32 x8 (state H)", D12_STEP, {}),
        ("d12 32 x8, embed clip", D12_STEP, EMBED_CLIP),
        ("gelu 64 x4 (state H)", GELU_STEP, {}),
        ("gelu 64 x4, embed clip", GELU_STEP, EMBED_CLIP),
        ("d12 32 x8, all windows long", D12_STEP + ["--set", "model.window_pattern=L"], {}),
        ("d12 b32 (state H), profiled", D12 + ["--batch", "32", "--backend", "cudnn", "--steps", "6",
                                              "--profile", "/tmp/jaxchat-prof"], {}),
    ],
    # a second call for the next GPU session: XLA:GPU's other fusion and Triton flags (named in jaxlib 0.10's flag
    # table, none measured yet) on top of the default step, d12 only (the unmet target), baseline first and last.
    # Candidates: Triton fusions formed first in priority fusion (e.g. a norm with its residual add), several
    # outputs per Triton fusion, the emitter chosen per fusion by autotuning, the generic Triton GEMM emitter
    # (which can take elementwise producers such as ReLU^2 into a GEMM) with Triton considered for every GEMM,
    # with and without Triton's warp specialization
    "h100-s7b": [
        ("d12 32 x8 (state H)", D12_STEP, {}),
        ("d12 32 x8, + heroless triton priority fusion", D12_STEP,
         {"XLA_FLAGS": "--xla_gpu_experimental_enable_triton_heroless_priority_fusion=true"}),
        ("d12 32 x8, + triton multi-output fusion", D12_STEP,
         {"XLA_FLAGS": "--xla_gpu_unsupported_enable_triton_multi_output_fusion=true"}),
        ("d12 32 x8, + fusion autotuner", D12_STEP,
         {"XLA_FLAGS": "--xla_gpu_experimental_enable_fusion_autotuner=true"}),
        ("d12 32 x8, + gemm fusion v2, triton gemm any", D12_STEP,
         {"XLA_FLAGS": f"--xla_gpu_experimental_gemm_fusion_v2=true {TRITON_GEMM_ANY['XLA_FLAGS']}"}),
        ("d12 32 x8, + gemm fusion v2, triton gemm any, warp specialization", D12_STEP,
         {"XLA_FLAGS": f"--xla_gpu_experimental_gemm_fusion_v2=true {TRITON_GEMM_ANY['XLA_FLAGS']} "
                       "--xla_gpu_experimental_enable_triton_warp_specialization=true"}),
        ("d12 32 x8 (state H), again", D12_STEP, {}),
    ],
    # the same after `patch -p1 < benchmarks/patches/qkv_fused.patch` (one GEMM for q, k, v)
    "h100-qkv": [
        ("d12 b32 cudnn, fused head, qkv fused", D12 + ["--batch", "32", "--backend", "cudnn", "--steps", "15"], {}),
        ("gelu b64 cudnn, fused head, qkv fused", GELU + ["--batch", "64", "--backend", "cudnn", "--steps", "15"], {}),
    ],
}


def patched_src(patch: str, out: Path) -> Path:
    """A scratch copy of src/ and tests/ under `out` with `patch` (a path from the repo root) applied; its src."""
    work = out / ("patched-" + Path(patch).stem)
    if work.exists():
        shutil.rmtree(work)
    for part in ("src", "tests"):
        shutil.copytree(ROOT / part, work / part, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    subprocess.run(["patch", "-p1", "--forward", "--quiet", "-i", str(ROOT / patch)], cwd=work, check=True,
                   capture_output=True, text=True)
    return work / "src"


def run_one(note: str, args: list[str], env_extra: dict, out: Path, timeout: float, log) -> dict:
    args = [a.replace("{out}", str(out)) for a in args]
    cmd = [sys.executable, "-m", "jaxchat.bench", *args, "--json", str(out / "results.jsonl"),
           "--record-to", str(out / "rows.md"), "--note", note]
    log(f"\n=== {note}: {' '.join(args)} {env_extra or ''}")
    env_extra = dict(env_extra)
    t0 = time.perf_counter()
    try:
        src, named = ROOT / "src", {}
        if "PATCH" in env_extra:  # the row names the code it measured: the commit plus the patch
            patch = env_extra.pop("PATCH")
            src, named = patched_src(patch, out), {"JAXCHAT_COMMIT": f"{git_commit(ROOT)}+{Path(patch).stem}"}
        env = {**os.environ, "PYTHONPATH": str(src) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               "PYTHONUNBUFFERED": "1", "JAXCHAT_COMPILE_CACHE": "off", **env_extra, **named}  # cold compiles
        p = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        rc, text = p.returncode, p.stdout + p.stderr
    except subprocess.CalledProcessError as e:  # the patch did not apply
        rc, text = -1, f"patch failed: {e.stdout}{e.stderr}"
    except subprocess.TimeoutExpired as e:
        partial = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        rc, text = -9, partial + f"\ntimed out after {timeout:.0f} s"
    log(text.rstrip())
    log(f"--- rc {rc}, {time.perf_counter() - t0:.0f} s")
    if rc == 0 and "--profile" in args:
        prof = args[args.index("--profile") + 1]
        s = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "trace_summary.py"), prof, "--ops", "60"],
                           capture_output=True, text=True)
        hlo = Path(prof) / "step.hlo.txt"  # the optimized HLO the trace's ops are read against, kept beside
        if hlo.exists():
            with open(hlo, "rb") as src, gzip.open(out / "step.hlo.txt.gz", "wb") as dst:
                shutil.copyfileobj(src, dst)
        (out / "trace_summary.txt").write_text(f"{note}\n{s.stdout}{s.stderr}")
        log(s.stdout + s.stderr)
    if rc != 0:
        tail = "\n".join(text.strip().splitlines()[-6:])
        with open(out / "results.jsonl", "a") as fh:
            fh.write(json.dumps({"note": note, "args": args, "env": env_extra, "failed": True, "rc": rc,
                                 "error": tail}) + "\n")
    return {"note": note, "rc": rc}


def table(out: Path) -> str:
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()] \
        if (out / "results.jsonl").exists() else []
    lines = [f"{'note':<48}{'tok/s':>12}{'MFU':>8}{'step ms':>9}{'peak GiB':>10}{'compile s':>10}"]
    for r in rows:
        if r.get("failed"):
            lines.append(f"{r['note'][:47]:<48}  FAILED rc={r['rc']}: {r['error'].splitlines()[-1][:80]}")
            continue
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        peak = r["peak_mem_bytes"] or r["xla_mem_estimate_bytes"] or 0
        lines.append(f"{r['note'][:47]:<48}{r['tokens_per_s']:>12,.0f}{mfu:>8}{1e3 * r['step_s']:>9.1f}"
                     f"{peak / 2**30:>10.2f}{r['compile_s']:>10.1f}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("plan", choices=sorted(PLANS))
    p.add_argument("--out", required=True)
    p.add_argument("--budget", type=float, default=540, help="seconds; no run starts after this")
    p.add_argument("--timeout", type=float, default=150, help="seconds per run")
    p.add_argument("--only", default="", help="run only entries whose note contains this")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override added to every run (repeatable), noted in each row")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    logf = open(out / "suite.log", "a")

    def log(text):
        print(text, flush=True)
        logf.write(text + "\n")
        logf.flush()

    t0 = time.perf_counter()
    for note, args, env in PLANS[a.plan]:
        if a.only and a.only not in note:
            continue
        left = a.budget - (time.perf_counter() - t0)
        if left < 30:
            log(f"=== skipped (budget): {note}")
            continue
        extra = [x for kv in a.set for x in ("--set", kv)]
        run_one(note + "".join(f", {kv}" for kv in a.set), args + extra, env, out, min(a.timeout, left), log)
    log("\n" + table(out))


if __name__ == "__main__":
    main()
