"""The command line end to end on a micro config: train, eval, sample, resume; and its error messages.

The micro config is the golden runs' model on their 300,000-character prefix of the corpus, with their sample length
(tests/golden/tiny-micro-20.json): its dataset is prepared once for this module, test_errors, test_resume and
test_multidevice, and its sampler is compiled once (the session's XLA cache)."""

import json

import pytest

from jaxchat.cli import main

MICRO = ["--set", "model.n_layer=2", "--set", "model.n_embd=64", "--set", "model.n_head=1", "--set",
         "model.n_kv_head=1", "--set", "model.sequence_len=64", "--set", "model.vocab_size=512", "--set",
         "data.tokenizer_vocab=512", "--set", "data.max_train_chars=300000", "--set", "train.batch_size=4",
         "--set", "train.num_steps=4", "--set", "train.eval_every=2", "--set", "train.eval_tokens=512", "--set",
         "train.sample_tokens=4", "--set", "train.log_every=1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "micro"
    assert main(["train", "--preset", "tiny", "--run-dir", str(run)] + MICRO) == 0
    return run


def test_train_writes_a_complete_run(trained, capsys):
    assert (trained / "config.json").is_file() and (trained / "tokenizer.json").is_file()
    assert (trained / "checkpoints" / "4").is_dir()
    lines = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in lines if "loss" in r]
    assert steps == [1, 2, 3, 4]
    evals = [r for r in lines if "val_bpb" in r]
    assert [r["step"] for r in evals] == [2, 4] and all(0 < r["val_bpb"] < 20 for r in evals)
    summary = json.loads((trained / "summary.json").read_text())
    assert summary["gzip_bpb"] > 0.5 and summary["xz_bpb"] > 0.5
    assert abs(sum(summary["time_s"].values()) - summary["wall_s"]) < 0.5


def test_eval_and_sample_from_run(trained, capsys):
    assert main(["eval", "--run", str(trained), "--batch-size", "4"]) == 0
    out = capsys.readouterr().out
    assert "val bpb" in out and "gzip -9" in out
    assert main(["sample", "--run", str(trained), "--prompt", "import ", "--max-tokens", "8", "--seed", "1"]) == 0
    first = capsys.readouterr().out
    assert first.startswith("import ")
    assert main(["sample", "--run", str(trained), "--prompt", "import ", "--max-tokens", "8", "--seed", "1"]) == 0
    assert capsys.readouterr().out == first  # same seed, same text


def test_existing_run_is_never_overwritten(trained, capsys):
    assert main(["train", "--preset", "tiny", "--run-dir", str(trained)] + MICRO) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "--force" in err
    assert (trained / "checkpoints" / "4").is_dir()


def test_force_refuses_a_foreign_directory(tmp_path, capsys):
    (tmp_path / "precious.txt").write_text("keep me")
    assert main(["train", "--preset", "tiny", "--run-dir", str(tmp_path), "--force"] + MICRO) == 2
    assert "refusing" in capsys.readouterr().err
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_resume_continues_from_latest(trained, capsys):
    assert main(["train", "--run-dir", str(trained), "--resume", "--set", "train.num_steps=6"]) == 0
    out = capsys.readouterr().out
    assert "resumed" in out and "at step 4" in out
    lines = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == [1, 2, 3, 4, 5, 6]


def test_resume_with_a_different_model_is_refused(trained, capsys):
    assert main(["train", "--preset", "tiny", "--run-dir", str(trained), "--resume"] + MICRO
                + ["--set", "model.n_embd=128"]) == 2
    assert "model.n_embd" in capsys.readouterr().err


@pytest.mark.parametrize("bad,needle", [
    ("model.n_hed=2", "Did you mean model.n_head"),
    ("model.n_head=3", "not divisible"),
    ("train.num_steps=abc", "expected an integer"),
    ("optim.lr=-1", "positive"),
    ("model.mlp=tanh", "relu2, gelu, swiglu"),
    ("model.window_pattern=SSX", "letters S"),
    ("train.batch_size=6", "grad_accum"),
])
def test_bad_set_values_are_clear(bad, needle, capsys, tmp_path):
    extra = ["--set", "train.grad_accum=4"] if bad.startswith("train.batch_size") else []
    assert main(["train", "--preset", "tiny", "--run-dir", str(tmp_path / "r"), "--set", bad] + extra) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_params_prints_exact_counts(capsys):
    assert main(["params", "--preset", "nanochat-d12"]) == 0
    out = capsys.readouterr().out
    assert "286,261,730" in out and "value_embeds" in out and "lm_head" in out and "attention" in out
    assert main(["params", "--preset", "d12-gelu-chinchilla"]) == 0
    assert "261,096,338" in capsys.readouterr().out


def test_presets_lists_every_preset(capsys):
    from jaxchat.presets import PRESETS
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in PRESETS)


def test_version_is_the_package_version(capsys):
    import importlib.metadata

    import jaxchat

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"jaxchat {jaxchat.__version__}"
    assert importlib.metadata.version("jaxchat") == jaxchat.__version__


def test_train_from_a_config_file_with_set_on_top(tmp_path):
    spec = tmp_path / "micro.toml"
    spec.write_text('[model]\nn_layer = 2\nn_embd = 64\nn_head = 1\nn_kv_head = 1\nsequence_len = 64\n'
                    'vocab_size = 512\n[data]\ntokenizer_vocab = 512\nmax_train_chars = 300000\n'
                    '[train]\nbatch_size = 4\nnum_steps = 50\neval_tokens = 512\nsample_tokens = 0\n')
    run = tmp_path / "run"
    assert main(["train", "--config", str(spec), "--run-dir", str(run), "--set", "train.num_steps=2"]) == 0
    cfg = json.loads((run / "config.json").read_text())
    assert (cfg["model"]["n_layer"], cfg["model"]["n_embd"], cfg["train"]["num_steps"]) == (2, 64, 2)
    from jaxchat.config import Config

    assert cfg["optim"] == Config().to_dict()["optim"]  # (absent from the file: the defaults, not a preset's)
    # a run's own config.json is a config file too
    assert main(["train", "--config", str(run / "config.json"), "--run-dir", str(tmp_path / "again")]) == 0
    assert json.loads((tmp_path / "again" / "config.json").read_text()) == cfg


@pytest.mark.parametrize("text,argv,needle", [
    ("", ["--preset", "tiny"], "drop --preset"),
    (None, [], "no such file"),
    ("[model\n", [], "does not parse (TOML)"),
    ("[model]\nno_such = 1\n", [], "unknown keys in config section 'model'"),
])
def test_bad_config_files(tmp_path, text, argv, needle, capsys):
    spec = tmp_path / "c.toml"
    if text is not None:
        spec.write_text(text)
    assert main(["train", "--config", str(spec), "--run-dir", str(tmp_path / "r")] + argv) == 2
    assert needle in capsys.readouterr().err and not (tmp_path / "r").exists()
