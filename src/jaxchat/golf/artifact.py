"""The golf artifact: a quantised model in one compressed file, and its byte accounting (docs/golf.md §Artifact).

File layout (before compression; all integers little-endian):
    MAGIC (8 bytes, b"JXGOLF01")
    header length (uint32), header: compact JSON
        format, version, scheme (what MLP/attention matrices got), model (the ModelConfig), source (run, step,
        weights), meta and orig_dtypes (the quantiser's, as PR #334's object holds them), tensors: [[name,
        dtype, shape], ...] in the order of the data
    data: every tensor's raw bytes (C order) back to back
Compression: zstd level 22 (`pip install 'jaxchat[zstd]'`), or zlib level 9 when zstandard is missing (as PR
#334 falls back); the reader tells them apart by the frame's first bytes (zstd 28 b5 2f fd, zlib 78 ..).

Size rule (SPEC_SPEEDRUN §3): compressed model bytes + code bytes <= 16,000,000. Golf's code bytes are its
train_gpt.py; jaxchat's are the bytes of its own source files that loading and evaluating the artifact
executes: every jaxchat module reachable by import (module-level and in-function imports, so the count errs
high) from CODE_ROOTS, with the package __init__ files on the way. Third-party libraries (jax, flax, numpy,
zstandard) are not counted, as golf does not count torch.
"""

from __future__ import annotations

import ast
import json
import struct
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from jaxchat.config import ModelConfig
from jaxchat.golf.names import golf_state, params_from_golf_state
from jaxchat.golf.quant import dequantize_state, quantize_state
from jaxchat.interop.common import InteropError

CAP_BYTES = 16_000_000  # decimal, model + code
MAGIC = b"JXGOLF01"
FORMAT = "jaxchat-golf"
VERSION = 1
ZSTD_LEVEL, ZLIB_LEVEL = 22, 9
ZSTD_FRAME = b"\x28\xb5\x2f\xfd"
CODE_ROOTS = ("jaxchat.golf.artifact", "jaxchat.evaluate", "jaxchat.train")  # load, evaluate (ModelFns)
ZLIB_NOTE = ("zstandard is not installed, so the artifact is compressed with zlib level 9 (larger than zstd-22): "
             "pip install 'jaxchat[zstd]' for golf's compressor")


class ArtifactError(InteropError):
    """An artifact that cannot be written (over the cap, no golf names) or read (corrupt, wrong format)."""


# ---- serialisation --------------------------------------------------------------------------------------------

def serialize(tensors: dict[str, np.ndarray], header: dict) -> bytes:
    """MAGIC + header + data (module docstring); `header` gets the tensor list."""
    order = list(tensors)
    header = dict(header, tensors=[[n, tensors[n].dtype.str, list(tensors[n].shape)] for n in order])
    head = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    parts = [MAGIC, struct.pack("<I", len(head)), head]
    parts += [np.ascontiguousarray(tensors[n]).tobytes() for n in order]
    return b"".join(parts)


def deserialize(raw: bytes, where: str = "artifact") -> tuple[dict, dict[str, np.ndarray]]:
    """(header, tensors) of `serialize`'s bytes; anything malformed is an ArtifactError naming what."""
    if raw[:len(MAGIC)] != MAGIC:
        raise ArtifactError(f"{where} is not a jaxchat golf artifact (its content does not start with {MAGIC!r}); "
                            f"write one with `jaxchat export RUN --format golf --out DIR`")
    try:
        (n,) = struct.unpack_from("<I", raw, len(MAGIC))
        start = len(MAGIC) + 4
        header = json.loads(raw[start:start + n])
        pos, tensors = start + n, {}
        for name, dtype, shape in header["tensors"]:
            dt = np.dtype(dtype)
            size = dt.itemsize * int(np.prod(shape, dtype=np.int64))
            if pos + size > len(raw):
                raise ValueError(f"tensor {name} runs past the end of the data")
            tensors[name] = np.frombuffer(raw, dt, count=size // dt.itemsize, offset=pos).reshape(shape).copy()
            pos += size
        if pos != len(raw):
            raise ValueError(f"{len(raw) - pos} bytes after the last tensor")
    except (struct.error, ValueError, KeyError, TypeError) as e:
        raise ArtifactError(f"{where} is corrupt ({e}): export it again") from None
    if header.get("format") != FORMAT or header.get("version") != VERSION:
        raise ArtifactError(f"{where} has format {header.get('format')!r} version {header.get('version')!r}; this "
                            f"jaxchat reads {FORMAT!r} version {VERSION}")
    return header, tensors


def _zstandard():
    try:
        import zstandard
    except ImportError:
        return None
    return zstandard


def compress(raw: bytes, compressor: str = "auto") -> tuple[bytes, str]:
    """(blob, what compressed it): 'zstd-22', or 'zlib-9' when zstandard is missing (auto) or asked for."""
    zstd = _zstandard()
    if compressor == "zstd" and zstd is None:
        raise ArtifactError("--compressor zstd needs the optional package `zstandard`: pip install 'jaxchat[zstd]'")
    if compressor in ("auto", "zstd") and zstd is not None:
        return zstd.ZstdCompressor(level=ZSTD_LEVEL).compress(raw), f"zstd-{ZSTD_LEVEL}"
    if compressor not in ("auto", "zlib"):
        raise ArtifactError(f"compressor {compressor!r}: choose auto, zstd or zlib")
    return zlib.compress(raw, ZLIB_LEVEL), f"zlib-{ZLIB_LEVEL}"


def decompress(blob: bytes, where: str = "artifact") -> bytes:
    try:
        if blob[:4] == ZSTD_FRAME:
            zstd = _zstandard()
            if zstd is None:
                raise ArtifactError(f"{where} is zstd-compressed and the optional package `zstandard` is not "
                                    f"installed: pip install 'jaxchat[zstd]'")
            return zstd.ZstdDecompressor().decompress(blob)
        if blob[:1] == b"\x78":
            return zlib.decompress(blob)
    except ArtifactError:
        raise
    except Exception as e:  # (zstd.ZstdError, zlib.error: a truncated or damaged file)
        raise ArtifactError(f"{where} is corrupt: decompressing it failed ({e}); export it again") from None
    raise ArtifactError(f"{where} is neither zstd- nor zlib-compressed (first bytes {blob[:4].hex()}): not a golf "
                        f"artifact, or a damaged one; export it again")


# ---- code bytes -----------------------------------------------------------------------------------------------

def _module_file(root: Path, module: str) -> Path | None:
    parts = module.split(".")[1:]
    if not parts:
        return root / "__init__.py"
    for p in (root.joinpath(*parts[:-1], parts[-1] + ".py"), root.joinpath(*parts, "__init__.py")):
        if p.is_file():
            return p
    return None


def code_files(roots: tuple[str, ...] = CODE_ROOTS) -> list[Path]:
    """The jaxchat source files the import closure of `roots` reaches (module docstring), sorted."""
    import jaxchat
    root = Path(jaxchat.__file__).parent
    seen: set[Path] = set()
    todo = list(roots)
    while todo:
        mod = todo.pop()
        parts = mod.split(".")
        if parts[0] != "jaxchat":
            continue
        for i in range(1, len(parts) + 1):  # the packages on the way run their __init__
            f = _module_file(root, ".".join(parts[:i]))
            if f is None or f in seen:
                continue
            seen.add(f)
            for node in ast.walk(ast.parse(f.read_text(), str(f))):
                if isinstance(node, ast.Import):
                    todo += [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module:
                    base = node.module
                    if node.level:  # relative: from the file's package
                        pkg = ".".join(parts[:i] if f.name == "__init__.py" else parts[:i - 1])
                        base = ".".join(pkg.split(".")[:len(pkg.split(".")) - node.level + 1] + [node.module])
                    todo.append(base)
                    todo += [f"{base}.{a.name}" for a in node.names]  # (`from pkg import module`)
    return sorted(seen)


def code_bytes(roots: tuple[str, ...] = CODE_ROOTS) -> tuple[int, list[tuple[str, int]]]:
    """(total, [(path relative to the package's parent, bytes), ...]) of `code_files`."""
    import jaxchat
    top = Path(jaxchat.__file__).parent.parent
    rows = [(str(f.relative_to(top)), f.stat().st_size) for f in code_files(roots)]
    return sum(b for _, b in rows), rows


# ---- building and reading -------------------------------------------------------------------------------------

@dataclass
class Accounting:
    """What the size rule is checked on, and what the artifact holds."""

    model_bytes: int                 # the compressed artifact file
    code_bytes: int
    total_bytes: int
    cap_bytes: int
    fits: bool
    compressor: str                  # zstd-22 | zlib-9
    raw_bytes: int                   # serialised, before compression
    scheme: str
    params: int
    tensors: dict = field(default_factory=dict)  # kind -> number of tensors
    code_files: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        verdict = "fits" if self.fits else "OVER THE CAP"
        return (f"model {self.model_bytes:,} bytes ({self.compressor}, {self.scheme}) + code {self.code_bytes:,} "
                f"bytes = {self.total_bytes:,} of {self.cap_bytes:,}: {verdict} "
                f"({self.cap_bytes - self.total_bytes:+,} bytes to spare)")


def build_artifact(params: dict, cfg: ModelConfig, scheme: str = "int5", source: dict | None = None,
                   compressor: str = "auto", cap: int = CAP_BYTES) -> tuple[bytes, Accounting, dict]:
    """(compressed artifact, its accounting, the dequantised golf state dict it decodes to) of `params`."""
    state = golf_state(params, cfg)
    tensors, meta, orig = quantize_state(state, scheme)
    header = {"format": FORMAT, "version": VERSION, "scheme": scheme, "model": asdict(cfg),
              "source": source or {}, "meta": meta, "orig_dtypes": orig}
    raw = serialize(tensors, header)
    blob, used = compress(raw, compressor)
    code, rows = code_bytes()
    kinds: dict[str, int] = {}
    for info in meta.values():
        k = info if isinstance(info, str) else info["type"]
        kinds[k] = kinds.get(k, 0) + 1
    acc = Accounting(model_bytes=len(blob), code_bytes=code, total_bytes=len(blob) + code, cap_bytes=cap,
                     fits=len(blob) + code <= cap, compressor=used, raw_bytes=len(raw), scheme=scheme,
                     params=int(sum(v.size for v in state.values())), tensors=kinds, code_files=rows,
                     notes=[ZLIB_NOTE] if used.startswith("zlib") and compressor == "auto" else [])
    return blob, acc, dequantize_state(tensors, meta, orig)


@dataclass
class Artifact:
    """A read artifact: its header, the dequantised golf state dict, and our parameter tree."""

    header: dict
    state: dict
    params: dict
    cfg: ModelConfig
    compressor: str
    nbytes: int


def read_artifact(path: str | Path) -> Artifact:
    """Read, decompress, parse and dequantise an artifact file, then map it onto the model in its header."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path} is not a file: pass the model.golf file `jaxchat export RUN --format golf` wrote")
    blob = path.read_bytes()
    header, tensors = deserialize(decompress(blob, str(path)), str(path))
    try:
        cfg = ModelConfig(**header["model"])
        state = dequantize_state(tensors, header["meta"], header["orig_dtypes"])
    except (TypeError, ValueError, KeyError) as e:
        raise ArtifactError(f"{path} is corrupt ({type(e).__name__}: {e}): export it again") from None
    params = params_from_golf_state(state, cfg)
    return Artifact(header, state, params, cfg, "zstd" if blob[:4] == ZSTD_FRAME else "zlib", len(blob))
