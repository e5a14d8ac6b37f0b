"""Read any llama.cpp GGUF (v2, v3): metadata -> ModelConfig, tensors -> torch.

The header is parsed by engine/gguf/header.py (bounded, and light on memory); dequantization is
``gguf.quants.dequantize``'s. What this module adds is the model-level contract: which keys an
architecture needs, the shape every tensor must have, and errors that name the file and the key or
tensor.
"""

from __future__ import annotations

import os
import re
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFValueType
from gguf import quants as gguf_quants

from engine import kernels
from engine.config import ATTN, ROPE_NONE, RWKV7, SSM, ModelConfig
from engine.errors import KvbenchError, ModelFileError, UnsupportedError
from engine.gguf.header import GGUFHeader, TensorInfo, Undecodable, read_header
from engine.gguf.keymap import ARCHS, TIED_KEY, expand
from engine.model.weights import DenseWeight, PackedWeight, Weight

_MISSING = object()

MAX_LAYERS = 4096  # shape-only files: the deepest real models have a few hundred layers
MAX_VOCAB = 1 << 24  # 16.7M tokens: real vocabularies have at most a few hundred thousand
_BLOCK = re.compile(r"blk\.(\d+)\.")

# Tensor types whose GGUF data numpy can view directly (no dequantization step).
_NATIVE = {GGMLQuantizationType.F32: torch.float32, GGMLQuantizationType.F16: torch.float16}
_ARRAY = int(GGUFValueType.ARRAY)


class GGUFFile:
    """An opened, structurally validated GGUF file. Tensor data stays memory-mapped."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.header: GGUFHeader = read_header(self.path)
        self.fields = self.header.fields
        self.tensors: dict[str, TensorInfo] = self.header.tensors

    @cached_property
    def _map(self) -> np.memmap:
        # 'c' (copy-on-write) gives writable arrays, so torch.from_numpy can wrap the mapping
        # without a copy or a warning; nothing is ever written back to the file.
        return np.memmap(self.path, dtype=np.uint8, mode="c")

    # -- metadata ------------------------------------------------------------------------------
    def has(self, key: str) -> bool:
        return key in self.fields

    def get(self, key: str, default: Any = _MISSING) -> Any:
        """Metadata value as a Python scalar, string or list."""
        value = self.fields.get(key, _MISSING)
        if value is _MISSING:
            if default is _MISSING:
                raise ModelFileError(
                    f"{self.path}: missing required metadata key {key!r}; "
                    "the file was not written by a compatible converter"
                )
            return default
        if isinstance(value, Undecodable):
            raise ModelFileError(f"{self.path}: metadata key {key!r} {value.reason}; "
                                 "the file is damaged -- re-convert it")
        return value

    def get_scalar(self, key: str, default: Any = _MISSING) -> Any:
        if self.header.types.get(key, (None,))[0] == _ARRAY:
            raise UnsupportedError(
                f"{self.path}: key {key!r} holds per-layer values; kvbench supports one value "
                "for all layers"
            )
        return self.get(key, default)

    @cached_property
    def arch(self) -> str:
        return str(self.get("general.architecture"))

    # -- config --------------------------------------------------------------------------------
    def config(self) -> ModelConfig:
        arch = self.arch
        if arch not in ARCHS:
            raise UnsupportedError(
                f"{self.path}: architecture {arch!r} (general.architecture) is not supported; "
                f"supported: {', '.join(sorted(ARCHS))}"
            )
        spec = ARCHS[arch]
        g = lambda k, d=_MISSING: self.get_scalar(f"{arch}.{k}", d)  # noqa: E731
        n_head = int(g("attention.head_count"))
        n_embd = int(g("embedding_length"))
        tok_embd = self.tensors.get("token_embd.weight")
        n_vocab = g("vocab_size", None)
        if n_vocab is None:
            if tok_embd is not None:
                n_vocab = int(tok_embd.shape[1])
            else:
                n_vocab = len(self.get("tokenizer.ggml.tokens"))
        rope_scaling = str(g("rope.scaling.type", "none"))
        if rope_scaling == "linear":
            freq_scale = 1.0 / float(g("rope.scaling.factor"))
        elif rope_scaling == "none":
            freq_scale = 1.0 / float(g("rope.scale_linear", 1.0))
        else:
            raise UnsupportedError(
                f"{self.path}: rope scaling {rope_scaling!r} ({arch}.rope.scaling.type) is not "
                "supported; supported: none, linear, and llama-3 (rope_freqs tensor)"
            )
        n_layer = int(g("block_count"))
        self._check_layer_count(n_layer, f"{arch}.block_count")
        extra: dict = {}
        n_head_kv = n_head
        if spec.recurrent:
            # a layer is recurrent when its head_count_kv is 0 (llama.cpp: per-layer array or scalar)
            kv = self.get(f"{arch}.attention.head_count_kv", 0)
            kv = list(kv) if isinstance(kv, list) else [int(kv)] * n_layer
            if len(kv) != n_layer:
                raise ModelFileError(f"{self.path}: {arch}.attention.head_count_kv has {len(kv)} entries for "
                                     f"{n_layer} layers ({arch}.block_count)")
            n_head_kv = max(int(v) for v in kv)
            extra = dict(layer_kinds=tuple(SSM if int(v) == 0 else ATTN for v in kv), ssm_kind=spec.ssm_kind)
            if spec.ssm_kind == RWKV7:
                extra |= dict(
                    wkv_head_size=int(g("wkv.head_size")), n_lora_decay=int(g("attention.decay_lora_rank")),
                    n_lora_iclr=int(g("attention.iclr_lora_rank")),
                    n_lora_value_res_mix=int(g("attention.value_residual_mix_lora_rank")),
                    n_lora_gate=int(g("attention.gate_lora_rank")),
                    norm_eps=float(g("attention.layer_norm_epsilon")),
                )
                if int(g("token_shift_count", 2)) != 2:  # llama.cpp asserts it too
                    raise UnsupportedError(f"{self.path}: {arch}.token_shift_count must be 2 (RWKV-7)")
            else:
                extra |= dict(
                    ssm_d_conv=int(g("ssm.conv_kernel")), ssm_d_inner=int(g("ssm.inner_size")),
                    ssm_d_state=int(g("ssm.state_size")), ssm_dt_rank=int(g("ssm.time_step_rank")),
                    ssm_dt_b_c_rms=bool(g("ssm.dt_b_c_rms", False)),
                    n_expert=int(g("expert_count", 0)), n_expert_used=int(g("expert_used_count", 0)),
                    moe_layers=tuple(f"blk.{il}.ffn_gate_inp.weight" in self.tensors for il in range(n_layer)),
                    ssm_n_group=int(g("ssm.group_count", 0)),
                    expert_weights_norm=spec.moe_norm_w, n_ff_shexp=int(g("expert_shared_feed_forward_length", 0)),
                    embedding_scale=float(g("embedding_scale", 0.0)), residual_scale=float(g("residual_scale", 0.0)),
                    attention_scale=float(g("attention.scale", 0.0)), logit_scale=float(g("logit_scale", 0.0)),
                )
                if spec.moe_every_layer:  # llama.cpp: every layer routes when the file has experts
                    extra["moe_layers"] = tuple(extra["n_expert"] > 0 for _ in range(n_layer))
        rope_type = spec.rope_type
        if spec.rope_if_finetuned and not bool(g("rope.scaling.finetuned", True)):
            rope_type = ROPE_NONE  # llama.cpp's rope_pattern: Granite 4 hybrids apply no rope on any layer
        if not 0 < int(n_vocab) <= MAX_VOCAB:
            raise ModelFileError(f"{self.path}: vocabulary size {int(n_vocab)} is not plausible (1 .. {MAX_VOCAB})")
        try:
            return ModelConfig(
                arch=arch,
                n_vocab=int(n_vocab),
                n_embd=n_embd,
                n_layer=n_layer,
                n_head=n_head,
                n_head_kv=int(g("attention.head_count_kv", n_head)) if not spec.recurrent else n_head_kv,
                n_ff=int(g("feed_forward_length", 0 if arch == "mamba" else _MISSING)),
                **extra,
                n_ctx_train=min(int(g("context_length")), 1 << 20),
                n_embd_head_k=int(g("attention.key_length", 0)),
                n_embd_head_v=int(g("attention.value_length", 0)),
                n_rot=int(g("rope.dimension_count", 0)),
                rope_type=rope_type,
                rope_freq_base=float(g("rope.freq_base", 10000.0)),
                rope_freq_scale=freq_scale,
                # RWKV's norms are LayerNorms (norm_eps above): an RMS eps is not required of its files
                rms_eps=float(g("attention.layer_norm_rms_epsilon", 1e-5 if spec.ssm_kind == RWKV7 else _MISSING)),
                n_swa=int(g("attention.sliding_window", 0)),
                attn_bias=spec.attn_bias,
                # A shape-only file (no tensors) cannot say by omission: kvbench's shape-only presets write
                # TIED_KEY; without it, untied (the LLaMA family's default).
                tied_output=("output.weight" not in self.tensors) if self.tensors else bool(self.get(TIED_KEY, False)),
                name=str(self.get("general.name", self.path.stem)),
                bos_id=_opt_int(self.get("tokenizer.ggml.bos_token_id", None)),
                eos_id=_opt_int(self.get("tokenizer.ggml.eos_token_id", None)),
                weights_present=bool(self.tensors),
            )
        except ModelFileError as e:  # ModelConfig's own checks do not know the file; metadata reads do
            raise (e if str(e).startswith(str(self.path)) else ModelFileError(f"{self.path}: {e}")) from None

    def _check_layer_count(self, n_layer: int, key: str) -> None:
        """Bound the layer count by what the file holds, before anything is built per layer: a file
        with tensors has exactly blocks 0 .. n_layer - 1; a shape-only file at most MAX_LAYERS."""
        blocks = {int(m.group(1)) for name in self.tensors if (m := _BLOCK.match(name))}
        if self.tensors:
            have = max(blocks) + 1 if blocks else 0
            if n_layer != have:
                raise ModelFileError(f"{self.path}: {key} = {n_layer}, but the file has tensors for {have} blocks "
                                     f"(blk.0 .. blk.{have - 1}); the metadata and the tensors disagree")
        elif not 1 <= n_layer <= MAX_LAYERS:
            raise ModelFileError(f"{self.path}: {key} = {n_layer} is not a plausible layer count (1 .. {MAX_LAYERS})")

    # -- tensors -------------------------------------------------------------------------------
    def tensor_types(self) -> dict[str, str]:
        return {name: t.tensor_type.name for name, t in self.tensors.items()}

    def check_tensors(self, config: ModelConfig) -> None:
        """Every required tensor present, every present tensor of the expected shape."""
        if not config.weights_present:
            return
        for gguf_name, _, spec in expand(ARCHS[config.arch].tensors, config):
            t = self.tensors.get(gguf_name)
            if t is None:
                if spec.required:
                    raise ModelFileError(
                        f"{self.path}: tensor {gguf_name!r} is missing; the file is incomplete "
                        "or was converted for another architecture"
                    )
                continue
            want = spec.shape(config)
            have = tuple(int(d) for d in t.shape)
            if have != want:
                raise ModelFileError(
                    f"{self.path}: tensor {gguf_name!r} has shape {list(have)} but the metadata "
                    f"implies {list(want)}; the file's tensors and metadata disagree -- re-convert it"
                )

    def load_weights(self, config: ModelConfig, dtype: torch.dtype = torch.float32, mmap: bool = False,
                     compute: str = "exact") -> dict[str, torch.Tensor | Weight]:
        """Parameters by kvbench name.

        ``compute="exact"``: every tensor dequantized to ``dtype``. ``compute="fast"``: matrices
        become ``Weight``s that keep the file's bytes (engine/model/weights.py); vectors and 3-D
        expert tensors are dequantized to float32 as in exact mode.

        ``mmap=False`` (the default, like llama.cpp's --no-mmap) reads tensor bytes into process
        memory with plain file reads, one tensor at a time, never touching the mapping: one copy of
        each weight, on anonymous pages (transparent huge pages: decode on llama-small F32 ran 5-7%
        faster than on file-backed pages here). ``mmap=True`` leaves F32/F16 tensors and packed
        blocks as views of the mapping (pages come in as they are first read).
        """
        if not config.weights_present:
            raise ModelFileError(
                f"{self.path}: the file holds no tensors (a shape-only GGUF); use it for "
                "memory-only runs, or pass a model file with weights"
            )
        self.check_tensors(config)
        out: dict[str, torch.Tensor | Weight] = {}
        for gguf_name, param, _ in expand(ARCHS[config.arch].tensors, config):
            if gguf_name not in self.tensors:
                continue
            t = self.tensors[gguf_name]
            if compute == "fast" and len(t.shape) == 2:
                out[param] = self.weight(gguf_name, mmap)
            else:
                out[param] = self.dequantize(gguf_name, dtype, mmap)
        return out

    def planned_weight_bytes(self, config: ModelConfig, compute: str, dtype: torch.dtype) -> int:
        """Bytes the weights will take once loaded, from the header alone: exact mode holds every tensor
        in ``dtype``; fast mode holds matrices as ``weight`` keeps them and the rest in float32."""
        total, itemsize = 0, torch.empty((), dtype=dtype).element_size()
        for gguf_name, _, _ in expand(ARCHS[config.arch].tensors, config):
            t = self.tensors.get(gguf_name)
            if t is None:
                continue
            n = t.n_elements
            if compute != "fast":
                total += n * itemsize
            elif len(t.shape) == 2 and (t.tensor_type in kernels.KERNEL_TYPES
                                        or t.tensor_type == GGMLQuantizationType.F32):
                total += int(t.n_bytes)
            else:
                total += n * (2 if len(t.shape) == 2 else 4)
        return total

    def weight(self, name: str, mmap: bool = False) -> Weight:
        """A matrix in fast mode: its GGUF bytes as they are (F32, F16, BF16 and the kernel types),
        or dequantized to bf16 when no kernel reads its type (Q2_K, Q3_K, IQ*)."""
        t = self.tensors[name]
        n, k = int(t.shape[1]), int(t.shape[0])  # GGUF ne0 is the row length
        qtype = t.tensor_type
        if qtype == GGMLQuantizationType.F32:
            return DenseWeight(self.dequantize(name, torch.float32, mmap), fast=True)
        if qtype not in kernels.KERNEL_TYPES:
            return DenseWeight(self.dequantize(name, torch.bfloat16, mmap), qtype.name, fast=True)
        data = torch.from_numpy(self.raw(name, mmap)).reshape(-1).view(torch.uint8)
        if qtype == GGMLQuantizationType.F16:
            return DenseWeight(data.view(torch.float16).view(n, k), fast=True)
        if qtype == GGMLQuantizationType.BF16:
            return DenseWeight(data.view(torch.bfloat16).view(n, k), fast=True)
        return PackedWeight(data, qtype, n, k)

    def raw(self, name: str, mmap: bool = True) -> np.ndarray:
        """A tensor's stored data as the reader shapes it (a view of the mapping, or a copy read from the file)."""
        t = self.tensors[name]
        dtype, shape = t.view_layout()
        if mmap:
            return self._map[t.data_offset:t.data_offset + t.n_bytes].view(dtype).reshape(shape)
        return np.fromfile(self.path, dtype=dtype, count=t.n_bytes // dtype.itemsize,
                           offset=t.data_offset).reshape(shape)

    def dequantize(self, name: str, dtype: torch.dtype = torch.float32, mmap: bool = True) -> torch.Tensor:
        t = self.tensors[name]
        shape = tuple(int(d) for d in reversed(t.shape))  # torch order: (ne1, ne0)
        data = self.raw(name, mmap)
        native = _NATIVE.get(t.tensor_type)
        if native is not None:
            x = torch.from_numpy(data).reshape(shape)
        else:
            try:
                x = torch.from_numpy(gguf_quants.dequantize(data, t.tensor_type)).reshape(shape)
            except NotImplementedError:
                raise UnsupportedError(
                    f"{self.path}: tensor {name!r} has type {t.tensor_type.name}, which gguf "
                    "cannot dequantize; re-quantize the model to a supported type (e.g. Q8_0, Q4_K)"
                ) from None
        return x if x.dtype == dtype else x.to(dtype)

    def tokenizer_metadata(self) -> dict[str, Any]:
        return {k: self.get(k) for k in self.fields if k.startswith("tokenizer.ggml.")}


def _opt_int(v: Any) -> int | None:
    return None if v is None else int(v)


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    try:
        return GGUFFile(path)
    except KvbenchError:
        raise
    except (OSError, MemoryError) as e:
        raise ModelFileError(f"{path}: cannot read ({e}); check the file and free memory") from None

