"""ModelConfig: the typed view of a model's hyper-parameters, read from GGUF metadata.

Names follow llama.cpp's ``llama_hparams`` (n_embd, n_head_kv, n_rot, n_swa ...), so a reader
of both code bases sees the same words.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from engine.errors import ModelFileError

ROPE_NORM = "norm"  # rotate adjacent pairs (x[2i], x[2i+1]); llama.cpp's default, Q/K rows permuted
ROPE_NEOX = "neox"  # rotate halves (x[i], x[i + n_rot/2]); GPT-NeoX / HF rotate_half layout
ROPE_NONE = "none"  # no positional rotation (Jamba's attention layers)

ATTN, SSM = "attn", "ssm"  # layer kinds
# what an SSM layer is (llama.cpp: build_mamba_layer, build_mamba2_layer, build_rwkv7 time mix); its state shapes
MAMBA1, MAMBA2, RWKV7 = "mamba1", "mamba2", "rwkv7"


# ModelConfig field -> GGUF metadata key (after "{arch}."), so errors name what a user can see.
GGUF_KEYS = {
    "n_vocab": "vocab_size", "n_embd": "embedding_length", "n_layer": "block_count",
    "n_head": "attention.head_count", "n_head_kv": "attention.head_count_kv", "n_ff": "feed_forward_length",
    "n_embd_head_k": "attention.key_length", "n_rot": "rope.dimension_count",
    "ssm_d_conv": "ssm.conv_kernel", "ssm_d_inner": "ssm.inner_size", "ssm_d_state": "ssm.state_size",
    "ssm_dt_rank": "ssm.time_step_rank", "ssm_n_group": "ssm.group_count", "n_expert": "expert_count",
    "n_expert_used": "expert_used_count", "n_ff_shexp": "expert_shared_feed_forward_length",
    "wkv_head_size": "wkv.head_size", "n_lora_decay": "attention.decay_lora_rank",
    "n_lora_iclr": "attention.iclr_lora_rank", "n_lora_value_res_mix": "attention.value_residual_mix_lora_rank",
    "n_lora_gate": "attention.gate_lora_rank",
}


@dataclass
class ModelConfig:
    arch: str
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_ctx_train: int = 2048
    n_embd_head_k: int = 0  # 0: n_embd // n_head
    n_embd_head_v: int = 0  # 0: n_embd_head_k
    n_rot: int = 0  # rotary dims; 0: n_embd_head_k
    rope_type: str = ROPE_NORM
    rope_freq_base: float = 10000.0
    rope_freq_scale: float = 1.0  # linear scaling: theta = pos * freq_scale * base^(-2i/n_rot)
    rms_eps: float = 1e-5
    n_swa: int = 0  # sliding window in tokens; 0 = full attention on every layer
    swa_layers: tuple[bool, ...] = ()  # per layer: does the window apply (derived when empty)
    attn_bias: bool = False  # q/k/v projections carry biases (qwen2)
    tied_output: bool = False  # no output.weight: logits use token_embd
    name: str = ""
    bos_id: int | None = None
    eos_id: int | None = None
    weights_present: bool = True  # False for shape-only files (e.g. the llama-7b preset)
    # recurrent (Mamba-1) layers; all 0 for pure attention models
    layer_kinds: tuple[str, ...] = ()  # per layer: ATTN or SSM (derived: all ATTN when empty)
    ssm_d_conv: int = 0
    ssm_d_inner: int = 0
    ssm_d_state: int = 0
    ssm_dt_rank: int = 0
    ssm_dt_b_c_rms: bool = False  # falcon-mamba: weightless RMS norms on dt, B, C
    ssm_kind: str = MAMBA1  # what the SSM layers are: MAMBA1 | MAMBA2 | RWKV7
    ssm_n_group: int = 0  # Mamba-2: B and C are shared by groups of heads (ssm_dt_rank is then the head count)
    # RWKV-7 (llama.cpp hparams names): wkv head size, the low-rank widths of its four LoRA projections,
    # and the LayerNorm eps (RWKV's norms are LayerNorms with biases)
    wkv_head_size: int = 0
    n_lora_decay: int = 0
    n_lora_iclr: int = 0
    n_lora_value_res_mix: int = 0
    n_lora_gate: int = 0
    norm_eps: float = 1e-5
    # mixture of experts (Jamba, Granite)
    n_expert: int = 0
    n_expert_used: int = 0
    moe_layers: tuple[bool, ...] = ()  # per layer: MoE feed-forward (derived: none when empty)
    expert_weights_norm: bool = False  # renormalise the top-k router weights to sum 1 (Granite; not Jamba)
    n_ff_shexp: int = 0  # a shared expert beside the routed ones (Granite); 0: none
    # Granite's multipliers; 0 = not applied (llama.cpp's convention), attention_scale 0 = 1/sqrt(head size)
    embedding_scale: float = 0.0
    residual_scale: float = 0.0
    attention_scale: float = 0.0
    logit_scale: float = 0.0  # logits are divided by it

    # derived
    n_gqa: int = field(init=False)
    n_embd_k_gqa: int = field(init=False)
    n_embd_v_gqa: int = field(init=False)

    def _k(self, field_name: str) -> str:
        """'n_head 8 (llama.attention.head_count)': the value and the key it came from."""
        key = GGUF_KEYS.get(field_name)
        v = getattr(self, field_name)
        return f"{field_name} {v} ({self.arch}.{key})" if key else f"{field_name} {v}"

    @property
    def attn_layers(self) -> list[int]:
        return [il for il, k in enumerate(self.layer_kinds) if k == ATTN]

    @property
    def ssm_layers(self) -> list[int]:
        return [il for il, k in enumerate(self.layer_kinds) if k == SSM]

    @property
    def ssm_conv_dim(self) -> int:
        """Channels through the depthwise conv: x alone (Mamba-1), x with B and C (Mamba-2)."""
        if self.ssm_kind == MAMBA2:
            return self.ssm_d_inner + 2 * self.ssm_n_group * self.ssm_d_state
        return self.ssm_d_inner

    @property
    def r_shape(self) -> tuple[int, ...]:
        """One sequence's rolling state in one recurrent layer: Mamba's conv keeps its last d_conv - 1
        inputs; RWKV-7 the last normalised row entering the time mix and the channel mix (token shift)."""
        if self.ssm_kind == RWKV7:
            return (2, self.n_embd)
        return (self.ssm_d_conv - 1, self.ssm_conv_dim)

    @property
    def s_shape(self) -> tuple[int, ...]:
        """One sequence's SSM state in one layer: (d_inner, d_state) for Mamba (Mamba-2 reads it as (heads,
        head size, d_state), the same bytes and llama.cpp's layout); RWKV-7's wkv matrix per head, (heads,
        value, key) as llama.cpp stores it."""
        if self.ssm_kind == RWKV7:
            return (self.n_embd // self.wkv_head_size, self.wkv_head_size, self.wkv_head_size)
        return (self.ssm_d_inner, self.ssm_d_state)

    @property
    def n_embd_r(self) -> int:
        """Rolling state values per layer per sequence (llama.cpp n_embd_r)."""
        return math.prod(self.r_shape)

    @property
    def n_embd_s(self) -> int:
        """SSM state values per layer per sequence (llama.cpp n_embd_s)."""
        return math.prod(self.s_shape)

    def __post_init__(self) -> None:
        if not self.layer_kinds:
            self.layer_kinds = tuple(ATTN for _ in range(self.n_layer))
        if len(self.layer_kinds) != self.n_layer or set(self.layer_kinds) - {ATTN, SSM}:
            raise ModelFileError(f"model config: layer kinds {self.layer_kinds} do not fit {self.n_layer} layers")
        if not self.moe_layers:
            self.moe_layers = tuple(False for _ in range(self.n_layer))
        if self.ssm_layers and self.ssm_kind == RWKV7:
            for key in ("wkv_head_size", "n_lora_decay", "n_lora_iclr", "n_lora_value_res_mix", "n_lora_gate", "n_ff"):
                if getattr(self, key) <= 0:
                    raise ModelFileError(f"model config: {self._k(key)} must be positive for RWKV-7")
            if self.n_embd % self.wkv_head_size:
                raise ModelFileError(f"model config: {self._k('n_embd')} is not a multiple of {self._k('wkv_head_size')}")
        elif self.ssm_layers:
            for key in ("ssm_d_conv", "ssm_d_inner", "ssm_d_state", "ssm_dt_rank"):
                if getattr(self, key) <= 0:
                    raise ModelFileError(f"model config: {self._k(key)} must be positive for recurrent layers")
            if self.ssm_kind == MAMBA2:  # heads (time_step_rank) split d_inner; groups split the heads
                ng, nh = self.ssm_n_group, self.ssm_dt_rank
                if ng <= 0 or self.ssm_d_inner % nh or nh % ng:
                    raise ModelFileError(
                        f"model config: Mamba-2 needs {self._k('ssm_dt_rank')} heads dividing "
                        f"{self._k('ssm_d_inner')} and a multiple of {self._k('ssm_n_group')} groups")
        if any(self.moe_layers) and not 0 < self.n_expert_used <= self.n_expert:
            raise ModelFileError(f"model config: {self._k('n_expert_used')} must be in [1, {self._k('n_expert')}]")
        if not self.attn_layers:  # a pure recurrent model: no attention shapes to derive
            self.n_gqa = self.n_embd_k_gqa = self.n_embd_v_gqa = 0
            self.swa_layers = tuple(False for _ in range(self.n_layer))
            for key in ("n_vocab", "n_embd", "n_layer"):
                if getattr(self, key) <= 0:
                    raise ModelFileError(f"model config: {self._k(key)} must be positive")
            return
        keys = ("n_vocab", "n_embd", "n_layer", "n_head", "n_head_kv") + (("n_ff",) if self.arch != "mamba" else ())
        for key in keys:
            if getattr(self, key) <= 0:
                raise ModelFileError(f"model config: {self._k(key)} must be positive")
        if self.n_embd_head_k == 0:
            if self.n_embd % self.n_head:
                raise ModelFileError(
                    f"model config: {self._k('n_embd')} is not divisible by {self._k('n_head')}; "
                    f"the file must set {self.arch}.attention.key_length"
                )
            self.n_embd_head_k = self.n_embd // self.n_head
        if self.n_embd_head_v == 0:
            self.n_embd_head_v = self.n_embd_head_k
        if self.rope_type == ROPE_NONE:  # the file may still name a rope width (Granite 4 hybrids do)
            self.n_rot = 0
        elif self.n_rot == 0:
            self.n_rot = self.n_embd_head_k
        if self.n_head % self.n_head_kv:
            raise ModelFileError(f"model config: {self._k('n_head')} is not a multiple of {self._k('n_head_kv')}")
        if self.n_rot > self.n_embd_head_k or self.n_rot % 2:
            raise ModelFileError(
                f"model config: {self._k('n_rot')} must be even and at most the head size {self.n_embd_head_k}"
            )
        if self.rope_type not in (ROPE_NORM, ROPE_NEOX, ROPE_NONE):
            raise ModelFileError(f"model config: unknown rope type {self.rope_type!r}")
        if not self.swa_layers:
            self.swa_layers = tuple(self.n_swa > 0 for _ in range(self.n_layer))
        if len(self.swa_layers) != self.n_layer:
            raise ModelFileError(
                f"model config: swa_layers has {len(self.swa_layers)} entries for {self.n_layer} layers"
            )
        self.n_gqa = self.n_head // self.n_head_kv
        self.n_embd_k_gqa = self.n_embd_head_k * self.n_head_kv
        self.n_embd_v_gqa = self.n_embd_head_v * self.n_head_kv

    def kv_bytes_per_token(self, bytes_per_k: float = 4.0, bytes_per_v: float = 4.0) -> float:
        """Bytes one token occupies in the KV cache over the attention layers, for a given element size."""
        return len(self.attn_layers) * (self.n_embd_k_gqa * bytes_per_k + self.n_embd_v_gqa * bytes_per_v)

    @property
    def recurrent_bytes_per_seq(self) -> int:
        """Bytes of one sequence's recurrent state (f32 rolling + SSM state) over the recurrent layers: the
        same at 1 token and at 100k."""
        return len(self.ssm_layers) * (self.n_embd_r + self.n_embd_s) * 4
