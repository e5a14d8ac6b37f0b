"""Kernels torch lacks: matmul and row lookup over weights kept in their GGUF block format.

Two implementations behind one interface:

* ``_qmm`` (qmm.cpp, built by ``pip install --no-build-isolation``): int8 dot products over the
  GGML blocks for small batches (decode), dequantization to bf16 for large ones (prefill, then
  torch's GEMM), F16/BF16 converted in registers. Threads come from torch's own pool.
* the fallback, pure torch and numpy (``gguf.quants`` dequantizes): the same results within the
  activation-quantization error, one dequantization per call, so slow. Used when the extension
  was not built (an isolated ``pip install``), and by the tests as a second implementation.

``KERNEL_TYPES`` is the one list of GGUF types that stay packed in ``compute=fast``; every other
type is dequantized at load (engine/model/weights.py says to what).
"""

from __future__ import annotations

import importlib.util
import os
import statistics
import time
from functools import lru_cache

import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from gguf import quants as gguf_quants
from gguf.constants import GGML_QUANT_SIZES

from engine.errors import ConfigError

KERNEL_TYPES: frozenset[T] = frozenset({T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1,
                                        T.Q4_K, T.Q5_K, T.Q6_K})
QUANTIZED: frozenset[T] = KERNEL_TYPES - {T.F16, T.BF16}
MAX_QMM_ROWS = 16  # qmm.cpp's MAXM: larger batches go through dequant + GEMM


def row_bytes(ggml_type: T, k: int) -> int:
    block, size = GGML_QUANT_SIZES[ggml_type]
    if k % block:
        raise ConfigError(f"a {ggml_type.name} row of {k} weights is not a whole number of {block}-weight blocks")
    return k // block * size


class Autotune:
    """Picks, per shape, the fastest of implementations that compute the same product, from timings of
    the real calls on the running machine.

    Which GEMM shape MKL serves best at decode sizes differs between machines: on one VM mm(W, x^T)
    beat F.linear 1.9x at one row, on another it lost 1.9x, and at 4 rows the order flips again. A
    tight-loop micro-benchmark misleads as well: in the engine, with other ops between the calls,
    F.linear's threaded GEMV took 54 us a call where a loop measured 9 us (its threads had gone to
    sleep). So the first ``TRIALS`` calls of each candidate are the real calls of the run, in turn,
    timed where they happen; then the one with the lowest median serves the rest of the process.
    Nothing is fixed from one machine, and no extra work is done: exploring costs only the slower
    candidates' extra time on a few calls per shape."""

    TRIALS = 5

    def __init__(self) -> None:
        self.state: dict[tuple, list[list[float]] | int] = {}

    def __call__(self, key: tuple, fns, *args):
        """(result, the chosen function once decided, else None): callers may keep the choice themselves."""
        st = self.state.get(key)
        if isinstance(st, int):
            return fns[st](*args), fns[st]
        if st is None:
            st = self.state[key] = [[] for _ in fns]
        i = min(range(len(fns)), key=lambda j: len(st[j]))  # the least-tried candidate serves this call
        t0 = time.perf_counter()
        y = fns[i](*args)
        st[i].append(time.perf_counter() - t0)
        if len(st[-1]) >= self.TRIALS:
            best = self.state[key] = min(range(len(fns)), key=lambda j: statistics.median(st[j]))
            return y, fns[best]
        return y, None

    def choices(self) -> dict[tuple, int]:
        """The decided shapes: key -> index of the chosen implementation."""
        return {k: v for k, v in self.state.items() if isinstance(v, int)}


autotune = Autotune()


@lru_cache(maxsize=1)
def _load() -> bool:
    """Load the compiled ops once; False when the extension is absent or disabled (KVBENCH_KERNELS=torch)."""
    if os.environ.get("KVBENCH_KERNELS", "auto") == "torch":
        return False
    spec = importlib.util.find_spec("engine.kernels._qmm")
    if spec is None or spec.origin is None:
        if os.environ.get("KVBENCH_KERNELS") == "native":
            raise ConfigError("KVBENCH_KERNELS=native but the C++ kernels are not built; reinstall with "
                              "`pip install --no-build-isolation -e .` (torch must be installed first)")
        return False
    torch.ops.load_library(spec.origin)
    return True


def backend() -> str:
    """'native-avx512' (AVX2 plus the AVX-512 4/5-bit tables), 'native-avx2', 'native-scalar' (built without
    AVX2/FMA/F16C) or 'torch' (the fallback): what a record's run.kernels says."""
    if not _load():
        return "torch"
    if not torch.ops.kvbench.simd():
        return "native-scalar"
    return "native-avx512" if torch.ops.kvbench.simd512() else "native-avx2"


# How qmm takes the activations of quantized weights (F32/F16/BF16 weights always meet float32 x):
#   f32: as they are, weights widened to float32 in registers (float32 GEMV accuracy)
#   q8:  int8 per 32 values, dotted in integers, as llama.cpp's CPU backend does (|x - x'| <= max|x| / 254)
#   q16: 16-bit fixed point per 32 values as two int8 halves, two integer dots (|x - x'| <= max|x| / 65024)
ACTIVATIONS = {"f32": 0, "q8": 1, "q16": 2}


def qmm(x: torch.Tensor, data: torch.Tensor, ggml_type: T | int, n: int, k: int, act: str = "f32") -> torch.Tensor:
    """x (M, K) float -> (M, N) float32 = x @ W^T, W given as its GGUF bytes (uint8), M <= MAX_QMM_ROWS.
    ``ggml_type`` is a KERNEL_TYPE, F32 (plain float32 rows, read as they are), or an X16 id (native only). ``act``: one of
    ACTIVATIONS (docs/engine.md has what each costs in speed and accuracy). The fallback always
    multiplies in float32 against the dequantized W."""
    if _load():
        return torch.ops.kvbench.qmm(x, data, int(ggml_type), n, k, ACTIVATIONS[act])
    if ggml_type == T.F32:
        return x.float() @ data.view(torch.float32).view(n, k).t()
    return x.float() @ dequant(data, ggml_type, n, k).t()


def dequant(data: torch.Tensor, ggml_type: T | int, n: int, k: int, rows: torch.Tensor | None = None,
            bf16: bool = False) -> torch.Tensor:
    """Rows ``rows`` (default all) of W (N, K) as float32, or bfloat16 with ``bf16``."""
    if _load():
        return torch.ops.kvbench.dequant(data, int(ggml_type), n, k, rows, bf16)
    raw = data.numpy().reshape(n, -1)
    if rows is not None:
        raw = raw[rows.cpu().numpy()]
    if ggml_type in (T.F16, T.BF16):
        x = torch.from_numpy(np.ascontiguousarray(raw)).view(torch.float16 if ggml_type == T.F16 else torch.bfloat16)
    else:
        x = torch.from_numpy(gguf_quants.dequantize(raw, ggml_type))
    x = x.reshape(-1, k)
    return x.to(torch.bfloat16 if bf16 else torch.float32)


# Interleaved layouts ("x16", qmm.cpp): the same blocks, 16 rows at a time, read by the AVX-512 VNNI decode kernel.
# kvbench's own type ids, accepted wherever a kernel type is: GGUF type -> its x16 id.
X16: dict[T, int] = {T.Q4_0: 1002, T.Q4_1: 1003, T.Q8_0: 1008}


def x16_available() -> bool:
    """Whether this build has the interleaved decode kernel (AVX-512 VNNI)."""
    return _load() and bool(torch.ops.kvbench.x16())


def repack_x16(data: torch.Tensor, ggml_type: T, n: int, k: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """The file's ``ggml_type`` blocks (a key of X16) of a (n, k) matrix, n % 16 == 0, interleaved 16 rows at a
    time: into ``out`` (uint8, the same size, apart from data) or a new uint8 tensor. Native only."""
    _load()
    return torch.ops.kvbench.repack_x16(data, X16[ggml_type], n, k, out)


def fused_available() -> bool:
    """Whether rms_norm and rope below run as single native ops (else they are torch expressions)."""
    return _load()


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * w over the last dim, float32, one op (the sum of squares in double).
    Native only, as ``rope``: callers use either where ``fused_available()``."""
    return torch.ops.kvbench.rms_norm(x, w, eps)


def attend_small(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                 scale: float) -> torch.Tensor:
    """Attention for a few query rows: q (T, H, d) float32, k (n, Hkv, d), v (n, Hkv, dv) float32, float16 or
    bfloat16 (widened in registers), mask (T, n) bool or None
    (causal, rows at the end of k/v) -> (T, H * dv) float32. Native only, as ``rope``."""
    _load()
    return torch.ops.kvbench.attend_small(q, k, v, mask, scale)


def kv_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor,
              slots: torch.Tensor | None, slot0: int, cells: torch.Tensor | None, n_kv: int,
              mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """A decode layer's memory step in one op over a float cache's storage (f32, f16, bf16): write k (T, Hkv, d)
    and v (T, Hkv, dv) into rows ``slots`` (or [slot0, slot0 + T)) of kc, vc (size, Hkv * d), then
    attend_small(q, rows ``cells`` (or [0, n_kv)), mask). Equal bit for bit to the store, read and attend_small
    done apart (engine/memory/base.py KVStorage says who decides what). Native only, as ``rope``."""
    _load()
    return torch.ops.kvbench.kv_attend(q, k, v, kc, vc, slots, slot0, cells, n_kv, mask, scale)


def decode_stack(embd: tuple, inv_freq: torch.Tensor | None, ws: list[torch.Tensor], types: list[int], rows: list[int],
                 nparts: list[int], norms: list[torch.Tensor], biases: list[torch.Tensor], neox: bool, n_head: int,
                 n_head_kv: int, d_k: int, d_v: int, eps: float, scale: float, act: str, head: tuple):
    """A LLaMA model as the one-op decode forward reads it, held natively: ``.forward(token, pos, kcs, vcs, slots,
    slot0, cells, n_kv, mask, out_rows)`` -> logits (n_out, n_vocab) of a decode-sized ubatch. It runs rows ``token``
    of the embedding ``embd`` (bytes, type, rows), rope angles of ``pos`` from ``inv_freq`` (float64; None: no rope),
    per layer attn_qkv, kv_attend into that layer's storage (kcs, vcs) at the places (KVStorage's slots, slot0,
    cells, n_kv, mask, shared by every layer) and ffn_block; then rows ``out_rows`` (all where None) through the
    final norm and the output matrix. Per layer, ws holds nparts[l] q/k/v parts, then wo, w1, w3, w2 (types, rows
    alike: w1's rows are n_ff); norms the attention and feed-forward norm weights; biases one q/k/v bias per layer
    or none. ``head``: (norm weight, eps, output matrix bytes, type, n_vocab). Equal bit for bit to the module
    path's ops. The model's part is passed once: per step only what changes crosses into the op (qmm.cpp,
    DecodeStack). Native only, as ``rope``."""
    _load()
    ew, et, en = embd
    norm_w, out_eps, hw, ht, n_vocab = head
    return torch.classes.kvbench.DecodeStack(ew, int(et), en, inv_freq, ws, [int(t) for t in types], rows, nparts,
                                             norms, biases, neox, n_head, n_head_kv, d_k, d_v, eps, scale,
                                             ACTIVATIONS[act], norm_w, out_eps, hw, int(ht), n_vocab)


def ssm_scan(dA: torch.Tensor, dBx: torch.Tensor, C: torch.Tensor, s0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mamba-1's scan: s_t = dA_t * s_{t-1} + dBx_t over (S, T, di, ds), y_t = s_t . C_t -> (y (S, T, di), s_T).
    Native only, as ``rope``: s is bit-identical to the sequential torch loop (engine/model/mamba.py)."""
    _load()
    y, s = torch.ops.kvbench.ssm_scan(dA, dBx, C, s0)
    return y, s


def wkv7(r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
         s0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RWKV-7's recurrence over (S, T, H, N) inputs from the state s0 (S, H, N[value], N[key]) -> (y (S, T, H, N),
    s_T), in parallel over sequence x head x state row. Native only, as ``rope``; engine/model/rwkv7.py's
    wkv7_loop is the torch reference."""
    _load()
    y, s = torch.ops.kvbench.wkv7(r, w, k, v, a, b, s0)
    return y, s


def silu_mul(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """silu(g) * u (float32, CPU): torch's formula g / (1 + exp(-g)) * u in one op, SLEEF's exp (qmm.cpp)."""
    if _load():
        return torch.ops.kvbench.silu_mul(g, u)
    return torch.nn.functional.silu(g) * u


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, neox: bool) -> torch.Tensor:
    """Rotate x (T, H, D) by cos/sin (T, n_rot/2): NEOX halves or NORM adjacent pairs; returns a new tensor."""
    return torch.ops.kvbench.rope(x, cos, sin, neox)


def attn_qkv(x: torch.Tensor, norm_w: torch.Tensor, eps: float, w: list[tuple[torch.Tensor, T | int, int]],
             bias: torch.Tensor | None, cs: tuple[torch.Tensor, torch.Tensor] | None, neox: bool,
             n_head: int, n_head_kv: int, d_k: int, d_v: int, act: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A decode block's first half in one op: RMS norm, the q/k/v matmul (+ bias), rope on q and k (none where
    ``cs`` is None). ``w``: the fused matrix as parts stacked along its rows, (GGUF bytes, type, rows) each (one
    part, or several of mixed types: a Q4_K_M file's Q6_K v beside Q4_K q and k). x (M <= MAX_QMM_ROWS, n_embd)
    float32 -> q (M, H, d_k), k (M, Hkv, d_k), v (M, Hkv, d_v), equal bit for bit to the unfused ops. Native
    only, as ``rope``."""
    _load()
    cos, sin = cs if cs is not None else (None, None)
    q, k, v = torch.ops.kvbench.attn_qkv(x, norm_w, eps, [p[0] for p in w], [int(p[1]) for p in w], [p[2] for p in w],
                                         bias, cos, sin, neox, n_head, n_head_kv, d_k, d_v, ACTIVATIONS[act])
    return q, k, v


def ffn_block(x: torch.Tensor, a: torch.Tensor, wo: tuple[torch.Tensor, T | int], norm_w: torch.Tensor, eps: float,
              w1: tuple[torch.Tensor, T | int], w3: tuple[torch.Tensor, T | int], w2: tuple[torch.Tensor, T | int],
              n_ff: int, act: str) -> torch.Tensor:
    """A decode block's second half in one op: h = x + a Wo^T, then h + W2 (silu(W1 n(h)) * W3 n(h)) with n the
    RMS norm. Matrices as (GGUF bytes, type); equal bit for bit to the unfused ops. Native only, as ``rope``."""
    _load()
    return torch.ops.kvbench.ffn_block(x, a, wo[0], int(wo[1]), norm_w, eps, w1[0], int(w1[1]), w3[0], int(w3[1]),
                                       w2[0], int(w2[1]), n_ff, ACTIVATIONS[act])
