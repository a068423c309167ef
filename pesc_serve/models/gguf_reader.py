"""Read a GGUF file (llama.cpp's format) as a Hugging Face config dict + tensors.

Only dense Llama/Mistral/Qwen2 GGUFs are meaningful here (the PESC bases).  Tensors are
renamed to Hugging Face names; llama.cpp's converter permutes Llama Q/K rows for its
interleaved RoPE, which we undo.  Q4_0 and Q4_1 tensors can come as their blocks (:class:`Q4Blocks`),
which the int4 kernels take as they are: bit for bit the file's weights, and no float round
trip at start-up.  Everything else is dequantized with the ``gguf`` package.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_ARCH_MODEL_TYPE = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}
Q4_1_BLOCK, Q4_1_BYTES = 32, 20  # weights per block; bytes: float16 d, float16 m, 16 bytes of nibbles
Q4_0_BYTES = 18  # float16 d, 16 bytes of nibbles (w = (q - 8) d)
Q8_0_BYTES = 34  # float16 d, 32 int8 values (w = q d)


@dataclass
class Q4Blocks:
    """A Q4_1 weight as its blocks: w[n, 32 g + j] = q * scale[n, g] + min[n, g].

    ``qweight`` is uint8 [N, K/2] with feature 2i in the low nibble (the int4 layer's layout);
    ``scale`` and ``minimum`` are [N, K/32] float16, as the file stores them.
    """

    qweight: torch.Tensor
    scale: torch.Tensor
    minimum: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return self.qweight.shape[0], self.qweight.shape[1] * 2

    def dequantize(self) -> torch.Tensor:
        n, k = self.shape
        q = torch.stack([self.qweight & 15, self.qweight >> 4], dim=-1).view(n, k // Q4_1_BLOCK, Q4_1_BLOCK)
        w = q.float() * self.scale.float().unsqueeze(-1) + self.minimum.float().unsqueeze(-1)
        return w.view(n, k)

    def rows(self, order: torch.Tensor) -> "Q4Blocks":
        return Q4Blocks(self.qweight[order], self.scale[order], self.minimum[order])


@dataclass
class Q8Blocks:
    """A Q8_0 weight as its blocks: w[n, 32 g + j] = q[n, 32 g + j] * scale[n, g].

    ``q`` is int8 [N, K]; ``scale`` [N, K/32] float16, as the file stores it.  Yielded beside the
    weight's dequantized values (which are exact: float16 times int8 fits float32), for the
    layers that can take the blocks themselves (the int8 LM head)."""

    q: torch.Tensor
    scale: torch.Tensor

    def dequantize(self) -> torch.Tensor:
        n, k = self.q.shape
        return (self.q.float().view(n, k // Q4_1_BLOCK, Q4_1_BLOCK) * self.scale.float().unsqueeze(-1)).view(n, k)


def q8_0_blocks(raw: np.ndarray, rows: int) -> Q8Blocks:
    """Q8_0 bytes [rows, K/32 * 34] -> blocks (float16 d, then 32 int8 values)."""
    blocks = np.ascontiguousarray(raw).reshape(rows, -1, Q8_0_BYTES)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0]
    q = blocks[..., 2:].copy().view(np.int8).reshape(rows, -1)
    return Q8Blocks(torch.from_numpy(q), torch.from_numpy(d))


def q4_1_blocks(raw: np.ndarray, rows: int) -> Q4Blocks:
    """Q4_1 bytes [rows, K/32 * 20] -> blocks (ggml: a byte's low nibble is element j, its high
    nibble element j + 16 of the 32)."""
    blocks = np.ascontiguousarray(raw).reshape(rows, -1, Q4_1_BYTES)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0]
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0]
    qs = blocks[..., 4:]
    q = np.concatenate([qs & 15, qs >> 4], axis=-1).reshape(rows, -1)  # element order within each block
    qweight = q[:, 0::2] | (q[:, 1::2] << 4)
    return Q4Blocks(torch.from_numpy(np.ascontiguousarray(qweight)), torch.from_numpy(d), torch.from_numpy(m))


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes are in the file, and how to read them."""

    name: str
    ggml_type: int
    shape: tuple[int, ...]  # ggml order: the fastest-varying dimension first
    offset: int  # from the start of the file
    nbytes: int


INDEX_VERSION = 1


def q4_0_blocks(raw: np.ndarray, rows: int) -> Q4Blocks:
    """Q4_0 bytes [rows, K/32 * 18] -> blocks: w = (q - 8) d is q * d + (-8 d), exact in float16
    (a power-of-two multiple), with Q4_1's nibble order."""
    blocks = np.ascontiguousarray(raw).reshape(rows, -1, Q4_0_BYTES)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0]
    qs = blocks[..., 2:]
    q = np.concatenate([qs & 15, qs >> 4], axis=-1).reshape(rows, -1)
    qweight = q[:, 0::2] | (q[:, 1::2] << 4)
    return Q4Blocks(torch.from_numpy(np.ascontiguousarray(qweight)), torch.from_numpy(d), torch.from_numpy(d * np.float16(-8)))


class GGUFCheckpoint:
    """A GGUF file opened lazily: metadata now, tensors when iterated.

    Parsing the metadata with the ``gguf`` package takes seconds for a 49k-token vocabulary, so
    what the server needs of it (the config and where each tensor lies) is cached on disk, keyed
    by the file's path, size and mtime: a warm start reads the tensors straight from a memory map.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        index = _load_index(path)
        if index is None:
            index = _build_index(path)
            _save_index(path, index)
        self.arch = index["arch"]
        self._config = index["config"]
        self.tensor_infos = [TensorInfo(t[0], t[1], tuple(t[2]), t[3], t[4]) for t in index["tensors"]]

    def hf_config(self) -> dict[str, Any]:
        """The equivalent Hugging Face config.json."""
        return dict(self._config)

    @property
    def is_quantized(self) -> bool:
        """Whether its matrices arrive in a block-quantized format (not F32/F16/BF16)."""
        from gguf import GGMLQuantizationType as T

        return any(len(t.shape) == 2 and t.ggml_type not in (T.F32, T.F16, T.BF16) for t in self.tensor_infos)

    def tensors(self, q4_blocks: bool = False) -> Iterator[tuple[str, "torch.Tensor | Q4Blocks | Q8Blocks"]]:
        """Yield (Hugging Face name, tensor) pairs one at a time: float32, or with ``q4_blocks``
        the Q4_0/Q4_1 weights as :class:`Q4Blocks` and the Q8_0 ones as :class:`Q8Blocks`."""
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        cfg = self._config
        data = np.memmap(self.path, dtype=np.uint8, mode="r")
        for t in self.tensor_infos:
            name = _hf_name(t.name)
            if name is None:
                raise ValueError(f"{self.path}: unexpected GGUF tensor {t.name!r}")
            if t.offset + t.nbytes > data.shape[0]:
                raise ValueError(f"{self.path}: truncated (tensor {t.name!r} lies beyond the end of the file)")
            raw = _typed(data[t.offset : t.offset + t.nbytes], t)
            rope_rows = self.arch in ("llama", "mistral") and (".q_proj." in name or ".k_proj." in name)
            n_head = cfg["num_attention_heads"] if ".q_proj." in name else cfg["num_key_value_heads"]
            if q4_blocks and t.ggml_type in (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1) and len(t.shape) == 2:
                unpack = q4_0_blocks if t.ggml_type == GGMLQuantizationType.Q4_0 else q4_1_blocks
                blocks = unpack(raw, int(t.shape[1]))
                if rope_rows:
                    blocks = blocks.rows(_unpermute_rope(torch.arange(blocks.shape[0]), n_head))
                yield name, blocks
                continue
            if q4_blocks and t.ggml_type == GGMLQuantizationType.Q8_0 and len(t.shape) == 2 and not rope_rows:
                yield name, q8_0_blocks(raw, int(t.shape[1]))
                continue
            w = torch.from_numpy(np.array(dequantize(raw, t.ggml_type), dtype=np.float32, copy=True))
            if rope_rows:
                w = _unpermute_rope(w, n_head)
            yield name, w


def _typed(raw: np.ndarray, t: TensorInfo) -> np.ndarray:
    """The bytes of ``t`` as the ``gguf`` package lays a tensor out: float types as their values
    [rows..., ne0], block-quantized ones as bytes [rows, bytes per row]."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    shape = tuple(reversed(t.shape))
    kind = GGMLQuantizationType(t.ggml_type)
    plain = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16}
    if kind in plain:
        return raw.view(plain[kind]).reshape(shape)
    block, size = GGML_QUANT_SIZES[kind]
    return raw.reshape(*shape[:-1], shape[-1] // block * size)


def _index_file(path: Path) -> Path:
    import hashlib

    from pesc_serve.cache_dirs import cache_dir

    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{INDEX_VERSION}".encode()).hexdigest()
    return cache_dir("gguf") / f"{key[:16]}.json"


def _load_index(path: Path) -> dict[str, Any] | None:
    import json

    try:
        index = json.loads(_index_file(path).read_text())
    except (OSError, ValueError):
        return None
    return index if isinstance(index, dict) and index.get("version") == INDEX_VERSION else None


def _save_index(path: Path, index: dict[str, Any]) -> None:
    import json
    import os

    file = _index_file(path)
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(index))
        tmp.replace(file)  # atomic: a concurrent start never reads half a file
    except OSError:
        pass  # a read-only cache is only slower


def _build_index(path: Path) -> dict[str, Any]:
    """Parse the file with the ``gguf`` package (seconds): its config and tensor locations."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # the gguf package raises assorted errors on bad files
        raise ValueError(f"{path}: not a readable GGUF file ({exc})") from None

    def field(key: str, default: Any = None) -> Any:
        f = reader.fields.get(key)
        return default if f is None else f.contents()

    arch = field("general.architecture")
    if arch not in _ARCH_MODEL_TYPE:
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported (llama, mistral, qwen2)")
    tensors = [[t.name, int(t.tensor_type), [int(d) for d in t.shape], int(t.data_offset), int(t.n_bytes)]
               for t in reader.tensors]
    return {"version": INDEX_VERSION, "arch": arch, "config": _hf_config(arch, field, {t[0] for t in tensors}),
            "tensors": tensors}


def _hf_config(a: str, field, names: set[str]) -> dict[str, Any]:
    """The equivalent Hugging Face config.json of a GGUF's metadata."""
    heads = int(field(f"{a}.attention.head_count"))
    eos = field("tokenizer.ggml.eos_token_id")
    return {
        "model_type": _ARCH_MODEL_TYPE[a],
        "architectures": ["GGUF"],
        "vocab_size": len(field("tokenizer.ggml.tokens", [])) or int(field(f"{a}.vocab_size")),
        "hidden_size": int(field(f"{a}.embedding_length")),
        "intermediate_size": int(field(f"{a}.feed_forward_length")),
        "num_hidden_layers": int(field(f"{a}.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(field(f"{a}.attention.head_count_kv", heads)),
        "rms_norm_eps": float(field(f"{a}.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(field(f"{a}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(field(f"{a}.context_length", 4096)),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "hidden_act": "silu",
        "bos_token_id": field("tokenizer.ggml.bos_token_id"),
        "eos_token_id": eos,
    }


def _hf_name(gguf_name: str) -> str | None:
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
    if m:
        layer, part, kind = m.groups()
        mapped = _LAYER_NAMES.get(part)
        return None if mapped is None else f"model.layers.{layer}.{mapped}.{kind}"
    m = re.fullmatch(r"(\w+)\.(weight|bias)", gguf_name)
    if m and m.group(1) in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[m.group(1)]}.{m.group(2)}"
    return None


def _unpermute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Invert llama.cpp's interleaving of Q/K rows (rows of each head: pairs -> halves)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
