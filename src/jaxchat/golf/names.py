"""A jaxchat golf model's parameters <-> parameter-golf's state dict (PR #334 names, PyTorch layout).

The quantiser decides per tensor from the reference's name and quantises the rows of the reference's (out, in)
matrices, so a jaxchat run is first put in the reference's form: interop/golf.py's `golf_name` gives each of
our paths its name (and whether to transpose), `resid_mix` (L, 2, C) is split into `blocks.i.resid_mix`, and the
token embedding loses the padding rows above vocab_size (the reference's table has exactly vocab_size rows). The
way back is interop/golf.py's `map_state_dict`, the same function `jaxchat import golf` uses, which pads the
table again with zero rows and refuses a state dict that does not fill the model exactly.
"""

from __future__ import annotations

import jax
import numpy as np

from jaxchat.config import ModelConfig
from jaxchat.interop.common import InteropError, path_str
from jaxchat.interop.golf import golf_name, map_state_dict
from jaxchat.model.gpt import param_dict, param_path


def golf_state(params: dict, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Our parameter tree -> {reference name: fp32 array in the reference's layout}. Only a golf-architecture
    model (every parameter has a golf name) has one."""
    out = {}
    for keypath, value in jax.tree_util.tree_flatten_with_path(params)[0]:
        path = param_path(keypath)
        arr = np.asarray(value, np.float32)
        if path[0] == "resid_mix":
            out.update({f"blocks.{i}.resid_mix": np.array(arr[i]) for i in range(arr.shape[0])})
            continue
        name, transpose = golf_name(path)
        if name == path[0] and name != "skip_weights":  # (golf_name's fallback: a parameter golf has no name for)
            raise InteropError(f"parameter {path_str(keypath)} has no parameter-golf name: the golf artifact holds "
                               f"golf-architecture models only (model.golf_block, unet, smear_v1, no value "
                               f"embeddings, lambdas or nanochat smear; e.g. presets golf-pr334, golf-baseline)")
        if name == "tok_emb.weight":
            arr = arr[:cfg.vocab_size]
        out[name] = np.array(arr.T if transpose else arr, order="C")  # (np.array keeps a 0-d scalar 0-d)
    return out


def params_from_golf_state(state: dict[str, np.ndarray], cfg: ModelConfig) -> dict:
    """A golf state dict -> our parameter tree (fp32), through interop/golf.py's `map_state_dict`, which checks
    every name and shape against `cfg`."""
    model, _, _ = map_state_dict(state, cfg)
    return param_dict(model)
