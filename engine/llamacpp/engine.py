"""A llama.cpp model and context behind kvbench's engine interface (``Generator``).

``LlamaCppEngine.decode`` hands a kvbench ``Batch`` to ``llama_decode`` as one ``llama_batch``
(tokens of many sequences; llama.cpp splits it into ubatches itself) and returns the logits of the
output rows as a float32 tensor in batch order, as the torch ``Engine`` does. ``llama_decode``
returning 1 (no KV slot: llama.cpp restores its memory) becomes ``MemoryFullError``, which the
scheduler answers by preemption, as it does for kvbench's own memories.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from engine import kernels
from engine.batch import Batch
from engine.config import ModelConfig
from engine.errors import ConfigError, MemoryFullError, ModelFileError, UnsupportedError
from engine.llamacpp.lib import CACHE_TYPES, LogCapture, binding, parse_kv_log
from engine.llamacpp.memory import LlamaCppMemory
from engine.runtime.engine import Generator

_PAD = 256  # llama.cpp rounds n_ctx (and n_ctx / n_seq_max per stream) up to a multiple of 256


class LlamaCppEngine(Generator):
    """One llama.cpp model and context. ``close()`` frees both (also on garbage collection)."""

    def __init__(self, path: str | os.PathLike, config: ModelConfig, n_ctx: int, n_seq_max: int = 1,
                 type_k: str = "f16", type_v: str = "f16", kv_unified: bool = True, swa_full: bool = False,
                 n_ubatch: int = 512, n_batch: int = 2048, threads: int = 2, mmap: bool = True) -> None:
        lib = binding()
        for key, t in (("type_k", type_k), ("type_v", type_v)):
            if t not in CACHE_TYPES:
                raise ConfigError(f"cache.{key} = {t!r}: llama.cpp's cache types are {', '.join(CACHE_TYPES)}")
        if config.ssm_layers:
            raise UnsupportedError(f"{path}: the llamacpp backend measures attention models; {config.arch} has "
                                   "recurrent layers (run it with backend=torch)")
        if not config.weights_present:
            raise UnsupportedError(f"{path}: memory-only (shape-only) models run on the torch backend only; "
                                   "llama.cpp needs the weights")
        self.lib, self.path, self.config = lib, Path(path), config
        self.device, self.n_vocab = torch.device("cpu"), config.n_vocab
        self.model = self.ctx = None
        mp = lib.llama_model_default_params()
        mp.n_gpu_layers, mp.use_mmap = 0, mmap
        with LogCapture() as log:
            self.model = lib.llama_model_load_from_file(str(path).encode(), mp)
        if not self.model:
            tail = [ln.strip() for ln in log.lines if "error" in ln.lower() or "failed" in ln.lower()][-1:]
            raise ModelFileError(f"{path}: llama.cpp could not load the model ({tail[0] if tail else 'no reason given'})")
        if lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self.model)) != config.n_vocab:
            raise ModelFileError(f"{path}: llama.cpp and kvbench read different vocabulary sizes")
        cp = lib.llama_context_default_params()
        cp.n_ctx, cp.n_seq_max = n_ctx, n_seq_max
        cp.n_ubatch, cp.n_batch = n_ubatch, max(n_batch + n_seq_max, n_ubatch)  # prompt chunks + one token a sequence
        cp.n_threads = cp.n_threads_batch = threads
        cp.type_k, cp.type_v = int(CACHE_TYPES[type_k]), int(CACHE_TYPES[type_v])
        cp.kv_unified, cp.swa_full = kv_unified, swa_full
        if type_v not in ("f32", "f16", "bf16"):
            cp.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_ENABLED  # llama.cpp stores quantized V only with it
        with LogCapture() as log:
            self.ctx = lib.llama_init_from_model(self.model, cp)
        if not self.ctx:
            self.close()
            raise ConfigError(f"{path}: llama.cpp could not create a context (n_ctx {n_ctx}, n_seq_max {n_seq_max}, "
                              f"K {type_k}, V {type_v}): {' '.join(ln.strip() for ln in log.lines[-2:])}")
        self.log = log.text()
        kv = parse_kv_log(self.log)
        n_attn = len(config.attn_layers)  # K and V row bytes of a token, summed over the attention layers
        rk = n_attn * kernels.row_bytes(CACHE_TYPES[type_k], config.n_embd_k_gqa)
        rv = n_attn * kernels.row_bytes(CACHE_TYPES[type_v], config.n_embd_v_gqa)
        n_cells = kv["cells_per_stream"] * kv["n_stream"]
        self.kv_buffer_bytes = round(kv["buffer_mib"] * 2**20)
        # the buffer llama.cpp logs (0.01 MiB resolution) holds every cell's K and V rows, nothing else
        if abs(n_cells * (rk + rv) - self.kv_buffer_bytes) > 0.005 * 2**20 * max(1, kv["n_buffers"]):
            raise AssertionError(f"llama.cpp's KV buffer ({kv['buffer_mib']} MiB) is not {n_cells} cells x "
                                 f"{rk + rv} bytes: its layout changed; update engine/llamacpp")
        self.n_ctx_requested = n_ctx
        self.memory = LlamaCppMemory(lib, self.ctx, n_seq_max, kv_unified, kv["cells_per_stream"], kv["n_stream"],
                                     rk + rv, (rk, rv), kv["n_buffers"])
        self.weight_bytes = int(lib.llama_model_size(self.model))
        self._batch = lib.llama_batch_init(cp.n_batch, 0, 1)
        self._batch_cap = cp.n_batch

    @property
    def kernels(self) -> str:
        return f"llama.cpp (llama-cpp-python {self.lib.__version__})"

    def decode(self, batch: Batch) -> torch.Tensor:
        """Run a batch; float32 logits (n_outputs, n_vocab) in batch order."""
        self._check_batch(batch)
        n = len(batch)
        if n > self._batch_cap:
            raise ConfigError(f"batch of {n} tokens is larger than n_batch {self._batch_cap}")
        b = self._batch
        for i, (t, p, s, o) in enumerate(zip(batch.token, batch.pos, batch.seq_id, batch.output)):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = t, p, 1, o
            b.seq_id[i][0] = s
        b.n_tokens = n
        rc = self.lib.llama_decode(self.ctx, b)
        if rc == 1:
            st = self.memory.stats()
            raise MemoryFullError(f"memory full: llama.cpp found no KV slot for a batch of {n} tokens "
                                  f"({st.used_cells}/{st.n_cells} cells used, {self.memory.kind})")
        if rc != 0:
            raise ConfigError(f"llama_decode failed with status {rc} on a batch of {n} tokens")
        self.memory.committed(batch.pos, batch.seq_id)
        n_out = sum(batch.output)
        if n_out == 0:
            return torch.empty(0)
        ptr = self.lib.llama_get_logits(self.ctx)
        return torch.from_numpy(np.ctypeslib.as_array(ptr, shape=(n_out, self.n_vocab)).copy())

    def run_metrics(self) -> dict:
        self.memory.usage()  # the last step's growth, if no tracker asked since
        return {"llamacpp.state_seq_peak_bytes": self.memory.peak_seq_state_bytes}

    def close(self) -> None:
        if getattr(self, "_batch", None) is not None:
            self.lib.llama_batch_free(self._batch)
            self._batch = None
        if self.ctx:
            self.lib.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            self.lib.llama_model_free(self.model)
            self.model = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 -- interpreter shutdown: the binding may already be gone
            pass
