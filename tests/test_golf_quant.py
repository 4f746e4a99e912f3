"""Golf's export quantisation (golf/quant.py) against PR #334's own output (tests/fixtures/golf_pr334_tiny.npz:
`quant/*`, `quant_meta`, `dequant/*`, made by the reference's `quantize_state_dict_mixed`), bitwise; the schemes
the fixture does not cover against float64 numpy written here; jaxchat's parameter tree in the reference's names."""

import json

import numpy as np
import pytest

from jaxchat.golf.names import golf_state, params_from_golf_state
from jaxchat.golf.quant import dequantize_state, quantile32, quantize_int8, quantize_state
from jaxchat.interop.common import InteropError
from jaxchat.interop.golf import config_from_golf, map_state_dict
from jaxchat.model.gpt import GPT, param_dict
from tests.conftest import fixture_path

# the reference's constants (train_gpt.py of PR #334), copied
CLIP_Q = 99.99984 / 100.0
KEEP_MAX = 65_536


@pytest.fixture(scope="module")
def fx():
    return np.load(fixture_path("golf_pr334_tiny.npz"))


@pytest.fixture(scope="module")
def ref_state(fx):
    return {k[len("param/"):]: fx[k] for k in fx.files if k.startswith("param/")}


def same_bits(a, b) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def test_quantisation_equals_the_reference_bitwise(fx, ref_state):
    """Every q, scale and passthrough tensor, the per-tensor choice (quant_meta) and the dequantised floats."""
    tensors, meta, orig = quantize_state(ref_state, "int5")
    assert meta == json.loads(str(fx["quant_meta"]))
    ref_quant = {k[len("quant/"):]: fx[k] for k in fx.files if k.startswith("quant/")}
    assert set(tensors) == set(ref_quant)
    kinds = {json.dumps(v) for v in meta.values()}
    assert kinds == {'"passthrough"', '{"type": "int5"}', '{"type": "int8"}'}  # the fixture covers all three
    for name, ref in ref_quant.items():
        assert same_bits(tensors[name], ref), name
        assert np.any(ref != 0), name  # (neither side trivially zero)
    out = dequantize_state(tensors, meta, orig)
    for k in fx.files:
        if k.startswith("dequant/"):
            assert same_bits(out[k[len("dequant/"):]], fx[k]), k
    # quantisation did something: the int5 tensors moved, by at most half a step
    w, d = ref_state["blocks.0.mlp.fc.weight"], out["blocks.0.mlp.fc.weight"]
    s = tensors["blocks.0.mlp.fc.weight.scale"].astype(np.float64)[:, None]
    assert np.abs(w - d).max() > 0 and np.all(np.abs(w - d) <= s / 2 + 1e-7)


def test_jaxchat_tree_maps_to_the_reference_names_and_layout(fx, ref_state):
    """The fixture imported into our tree and turned back gives the reference's state dict bitwise (same names,
    (out, in) layout, resid_mix split per block), so the quantiser sees what the reference saw; and back."""
    cfg = config_from_golf(str(fx["config"]))
    params = param_dict(map_state_dict(ref_state, cfg)[0])
    state = golf_state(params, cfg)
    assert set(state) == set(ref_state)
    for name, ref in ref_state.items():
        assert same_bits(state[name], ref), name
    back = params_from_golf_state(state, cfg)
    np.testing.assert_array_equal(back["blocks"][1]["mlp"]["c_fc"]["kernel"], ref_state["blocks.1.mlp.fc.weight"].T)


def test_a_padded_vocab_drops_and_restores_the_padding_rows(fx, ref_state):
    """vocab 500 pads our table to 512 rows; the golf state dict has exactly 500, as the reference's."""
    cfg = config_from_golf(dict(json.loads(str(fx["config"])), vocab_size=500))
    state = dict(ref_state, **{"tok_emb.weight": ref_state["tok_emb.weight"][:500]})
    params = param_dict(map_state_dict(state, cfg)[0])
    assert params["wte"]["embedding"].shape == (512, 160)
    assert golf_state(params, cfg)["tok_emb.weight"].shape == (500, 160)


def test_a_non_golf_model_is_refused_by_name():
    """nanochat's model (lambdas, value embeddings, its smear) has parameters golf cannot name."""
    import jax
    from flax import nnx
    from jaxchat.config import ModelConfig
    cfg = ModelConfig(vocab_size=320, sequence_len=64, n_layer=2, n_embd=64, n_head=1, n_kv_head=1)
    shapes = param_dict(nnx.eval_shape(lambda: GPT(cfg)))
    params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    with pytest.raises(InteropError, match="no parameter-golf name"):
        golf_state(params, cfg)


def ref_int_n(w, r):
    """int5/int6 per row in float64 numpy from the reference's formula: s = fp16(max(rowmax / r, 1e-12)), at
    least fp16's smallest normal; q = clamp(round(w / s), -r, r)."""
    s = np.maximum(np.abs(w).max(1) / r, 1e-12).astype(np.float16)
    s = np.maximum(s, np.float16(2.0 ** -14))
    q = np.clip(np.rint(w.astype(np.float64) / s.astype(np.float64)[:, None]), -r, r)
    return q.astype(np.int8), s


@pytest.mark.parametrize("scheme,r", [("int5", 15), ("int6", 31)])
def test_int5_and_int6_against_float64(scheme, r):
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((300, 256)) * 0.05).astype(np.float32)
    w[7] = 0.0  # an all-zero row: the scale floor, not a division by zero
    tensors, meta, _ = quantize_state({"blocks.0.mlp.fc.weight": w, "blocks.0.attn.c_q.weight": w}, scheme)
    q, s = ref_int_n(w, r)
    for name in ("blocks.0.mlp.fc.weight", "blocks.0.attn.c_q.weight"):
        assert meta[name] == {"type": scheme}
        assert same_bits(tensors[name + ".scale"], s)
        # (fp32 division vs float64 may differ at exact .5 ties only; there are none here)
        assert same_bits(tensors[name + ".q"], q)
        assert tensors[name + ".q"].max() == r and tensors[name + ".q"].min() == -r
    assert np.all(tensors["blocks.0.mlp.fc.weight.q"][7] == 0) and float(s[7]) == 2.0 ** -14


def test_int8_scheme_and_the_percentile_clip_against_float64():
    """--quant int8: matrices get the reference's int8 too; the clip is torch.quantile's linear interpolation at
    rank q (n - 1), which torch forms in the input's dtype (q is made a float32 tensor), here then in float64."""
    rng = np.random.default_rng(2)
    w = (rng.standard_normal((270, 300)) * 2.0).astype(np.float32)
    w[3, 5] = 40.0  # an outlier the clip cuts
    tensors, meta, _ = quantize_state({"blocks.0.mlp.proj.weight": w}, "int8")
    assert meta["blocks.0.mlp.proj.weight"] == {"type": "int8"}
    a = np.sort(np.abs(w).astype(np.float64), axis=1)
    rank = float(np.float32(CLIP_Q) * np.float32(w.shape[1] - 1))
    lo, hi = int(np.floor(rank)), int(np.ceil(rank))
    clip = a[:, lo] + (rank - lo) * (a[:, hi] - a[:, lo])
    np.testing.assert_allclose(quantile32(np.abs(w), CLIP_Q, axis=1), clip, rtol=1e-6)
    assert clip[3] < 40.0  # the outlier row is clipped
    s = np.maximum(clip / 127, 1 / 127)
    np.testing.assert_allclose(tensors["blocks.0.mlp.proj.weight.scale"].astype(np.float64), s, rtol=1e-3)
    q = tensors["blocks.0.mlp.proj.weight.q"]
    assert q[3, 5] == 127 and np.abs(q).max() == 127
    expect = np.clip(np.rint(np.clip(w, -clip[:, None], clip[:, None]) / s[:, None]), -127, 127)
    assert np.mean(q == expect) > 0.999  # (fp32 vs float64 steps differ on the rare tie)


def test_int8_on_a_vector_uses_one_fp32_scale():
    w = np.linspace(-3, 3, 70_000, dtype=np.float32)
    q, s = quantize_int8(w)
    assert s.dtype == np.float32 and s.shape == () and q.shape == w.shape
    assert abs(float(s) - 3.0 / 127) < 1e-4 and abs(int(q[-1])) == 127


def test_passthrough_rules():
    """<= 65,536 elements: control tensors fp32, other floats fp16 (dequantised back to fp32); ints as they
    are; > 65,536 tensors not named MLP/attention: int8 whatever the scheme."""
    rng = np.random.default_rng(3)
    state = {"skip_weights": rng.standard_normal((1, 64)).astype(np.float32),
             "blocks.0.attn.q_gain": rng.standard_normal(4).astype(np.float32),
             "smear.gate": rng.standard_normal(64).astype(np.float32),
             "blocks.0.attn.c_k.weight": rng.standard_normal((256, 256)).astype(np.float32),  # exactly 65,536
             "counter": np.arange(5, dtype=np.int64),
             "tok_emb.weight": rng.standard_normal((1100, 64)).astype(np.float32)}
    assert state["blocks.0.attn.c_k.weight"].size == KEEP_MAX
    for scheme in ("int5", "int6", "int8"):
        tensors, meta, orig = quantize_state(state, scheme)
        assert tensors["skip_weights"].dtype == np.float32 and tensors["blocks.0.attn.q_gain"].dtype == np.float32
        assert tensors["smear.gate"].dtype == np.float16 and tensors["blocks.0.attn.c_k.weight"].dtype == np.float16
        assert meta["counter"] == "passthrough_nonfloat" and tensors["counter"].dtype == np.int64
        assert meta["tok_emb.weight"] == {"type": "int8"}
        out = dequantize_state(tensors, meta, orig)
        assert out["smear.gate"].dtype == np.float32
        np.testing.assert_array_equal(out["smear.gate"], state["smear.gate"].astype(np.float16).astype(np.float32))
        np.testing.assert_array_equal(out["skip_weights"], state["skip_weights"])


def test_unknown_scheme_is_refused():
    with pytest.raises(ValueError, match="int4.*int5, int6, int8"):
        quantize_state({}, "int4")


@pytest.mark.parametrize("rows,cols", [(70, 1000), (130, 512), (40, 4096), (300, 257)])
def test_int8_and_int5_equal_torch_bitwise(rows, cols):
    """The fixture holds one int8 tensor (rows of 160); on other widths the quantiser equals the reference's
    formula written here with torch's own ops (torch.quantile in fp32, torch.round, fp16 casts), bitwise."""
    torch = pytest.importorskip("torch", reason="the torch-op reference of golf's quantiser needs torch")
    rng = np.random.default_rng(rows)
    w = (rng.standard_normal((rows, cols)) * rng.uniform(0.01, 3, (rows, 1))).astype(np.float32)
    t = torch.from_numpy(w)
    clip = torch.quantile(t.abs(), CLIP_Q, dim=1)
    scale = (clip / 127.0).clamp_min(1.0 / 127.0)
    q8 = torch.clamp(torch.round(torch.clamp(t, -clip[:, None], clip[:, None]) / scale[:, None]), -127, 127)
    tensors, _, _ = quantize_state({"tok_emb.weight": w, "blocks.0.mlp.fc.weight": w}, "int5")
    assert same_bits(tensors["tok_emb.weight.q"], q8.to(torch.int8).numpy())
    assert same_bits(tensors["tok_emb.weight.scale"], scale.to(torch.float16).numpy())
    s5 = (t.abs().amax(dim=1) / 15).clamp_min(1e-12).to(torch.float16).clamp_min(2.0 ** -14)
    q5 = torch.clamp(torch.round(t / s5.float()[:, None]), -15, 15).to(torch.int8)
    assert same_bits(tensors["blocks.0.mlp.fc.weight.q"], q5.numpy())
    assert same_bits(tensors["blocks.0.mlp.fc.weight.scale"], s5.numpy())
