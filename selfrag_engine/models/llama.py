"""The Llama-2 forward pass over a paged KV cache, in plain torch.

Module names mirror Hugging Face's `LlamaForCausalLM`, except that each layer holds q|k|v in one `qkv_proj` and
gate|up in one `gate_up_proj` (one GEMV each per decode step); checkpoints, `state_dict()` and
`load_state_dict()` still use the Hugging Face names (see layers/fused_linear.py).
Tokens of a batch are flattened: `input_ids` and `positions` are [T] over all sequences, and the
`AttentionMetadata` says which tokens belong to which sequence and where their K/V live in the pool.
Each layer asks its `backend` (set once for the whole model by `set_backend`) whether to run a Triton kernel;
the torch code here is the reference and the CPU path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from selfrag_engine.backend import TORCH, Backend
from selfrag_engine.config import LlamaConfig
from selfrag_engine.kernels.activation import silu_and_mul
from selfrag_engine.kernels.rmsnorm import rms_norm
from selfrag_engine.kernels.rotary_kv import rotary_and_store_kv
from selfrag_engine.layers.attention import (
    AttentionMetadata,
    KVCache,
    paged_attention,
    store_kv,
)
from selfrag_engine.layers.fp8_linear import Fp8Linear
from selfrag_engine.layers.fused_linear import Shard, ShardedLinears


def rope_tables(config: LlamaConfig, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables [max_positions, head_dim // 2] in float32 (linear rope scaling folded in)."""
    half = config.head_dim // 2
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, half, dtype=torch.float64, device=device) / half))
    positions = torch.arange(config.max_position_embeddings, dtype=torch.float64, device=device)
    angles = torch.outer(positions / config.rope_scaling_factor, inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF's rotate-half rotary on x [T, heads, head_dim] with cos/sin [T, head_dim // 2]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    cos, sin = cos[:, None, :], sin[:, None, :]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


class RMSNorm(nn.Module):
    backend: Backend = TORCH

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """Normalizes x, or x + residual when a residual is given, returning (out, x + residual) then."""
        if self.backend.kernels:
            return rms_norm(x, self.weight, self.eps, residual)
        if residual is not None:
            x = x + residual
            residual = x
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # Every step of HF's arithmetic is float32 here: torch's one operator gives the same bits in one
            # pass instead of five (the CPU path's norms, per token and per step).
            out = F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        else:
            # As HF: variance and normalization in float32, cast back, then scale.
            h = x.float()
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
            out = self.weight * h.to(x.dtype)
        return out if residual is None else (out, residual)

    def project(self, linear: nn.Module, x: torch.Tensor,
                residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(linear(self(x [+ residual])), the new residual: x + residual, or x when none is given). An FP8 linear
        takes the norm as its GEMV's prologue on decode-sized inputs, saving the norm's own launch."""
        if isinstance(linear, Fp8Linear) and linear.fuses_rms_norm(x):
            out = linear.forward_rms_norm(x, self.weight, self.eps, residual)
            return out if residual is not None else (out, x)
        if residual is None:
            return linear(self(x)), x
        h, residual = self(x, residual)
        return linear(h), residual


class Attention(ShardedLinears):
    backend: Backend = TORCH

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim ** -0.5
        h, q, kv = config.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_sizes = (q, kv, kv)
        self.qkv_proj = nn.Linear(h, q + 2 * kv, bias=False)
        self.o_proj = nn.Linear(q, h, bias=False)
        self.set_shards({"q_proj": Shard("qkv_proj", 0, q), "k_proj": Shard("qkv_proj", q, q + kv),
                         "v_proj": Shard("qkv_proj", q + kv, q + 2 * kv), "o_proj": Shard("o_proj", 0, h)})

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                meta: AttentionMetadata, kv: KVCache) -> torch.Tensor:
        """x [T, hidden]; rope: the full cos/sin tables [max_positions, head_dim // 2]."""
        return self.attend(self.qkv_proj(x), positions, rope, meta, kv)

    def attend(self, qkv: torch.Tensor, positions: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
               meta: AttentionMetadata, kv: KVCache) -> torch.Tensor:
        """`forward` from the q|k|v projection's output qkv [T, q + 2 * kv] on (rotary, KV store, attention, o)."""
        t = qkv.shape[0]
        # Strided views of the one GEMV's output; the kernels take any strides.
        q, k, v = qkv.split(self.qkv_sizes, dim=-1)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if self.backend.kernels:
            q = q.view(t, self.num_heads, self.head_dim)
            k = k.view(t, self.num_kv_heads, self.head_dim)
            rotary_and_store_kv(q, k, v, positions, rope[0], rope[1], kv.k, kv.v, meta.slot_mapping,
                                kv.k_scale, kv.v_scale)
        else:
            cos, sin = rope[0][positions], rope[1][positions]
            # q's and k's heads side by side in qkv, rotated as one tensor: each operator once, not twice.
            heads = self.num_heads + self.num_kv_heads
            qk = apply_rotary(qkv[:, :heads * self.head_dim].view(t, heads, self.head_dim), cos, sin)
            q, k = qk.split((self.num_heads, self.num_kv_heads), dim=1)
            store_kv(k, v, kv, meta.slot_mapping)
        o = paged_attention(q, kv, meta, self.scale, self.backend)
        return self.o_proj(o.reshape(t, self.num_heads * self.head_dim))

    def forward_dense(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Causal attention over whole sequences x [B, L, hidden] without a cache (training, analysis)."""
        b, l, _ = x.shape
        q, k, v = self.qkv_proj(x).split(self.qkv_sizes, dim=-1)
        q = apply_rotary(q.reshape(b, l, self.num_heads, self.head_dim), cos, sin)
        k = apply_rotary(k.reshape(b, l, self.num_kv_heads, self.head_dim), cos, sin)
        v = v.reshape(b, l, self.num_kv_heads, self.head_dim)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True, scale=self.scale,
                                           enable_gqa=self.num_heads != self.num_kv_heads)
        return self.o_proj(o.transpose(1, 2).reshape(b, l, self.num_heads * self.head_dim))


class MLP(ShardedLinears):
    backend: Backend = TORCH

    def __init__(self, config: LlamaConfig):
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.gate_up_proj = nn.Linear(h, 2 * i, bias=False)
        self.down_proj = nn.Linear(i, h, bias=False)
        self.set_shards({"gate_proj": Shard("gate_up_proj", 0, i), "up_proj": Shard("gate_up_proj", i, 2 * i),
                         "down_proj": Shard("down_proj", 0, h)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.gate_up_proj(x))

    def down(self, gate_up: torch.Tensor) -> torch.Tensor:
        """`forward` from the gate|up projection's output gate_up [..., 2 * intermediate] on."""
        if isinstance(self.down_proj, Fp8Linear) and self.down_proj.fuses_silu_mul(gate_up):
            # The activation as the down GEMV's prologue (decode on FP8): one launch for both.
            return self.down_proj.forward_silu_mul(gate_up)
        # The kernel has no backward: training through forward_dense takes the torch ops.
        if self.backend.kernels and not gate_up.requires_grad:
            h = silu_and_mul(gate_up.reshape(-1, gate_up.shape[-1])).view(*gate_up.shape[:-1], -1)
        else:
            gate, up = gate_up.chunk(2, dim=-1)
            h = F.silu(gate) * up
        return self.down_proj(h)


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, residual, positions, rope, meta: AttentionMetadata, kv: KVCache):
        # Each norm runs through the projection after it, which fuses the two where it can (FP8 decode).
        qkv, residual = self.input_layernorm.project(self.self_attn.qkv_proj, x, residual)
        h = self.self_attn.attend(qkv, positions, rope, meta, kv)
        gate_up, residual = self.post_attention_layernorm.project(self.mlp.gate_up_proj, h, residual)
        return self.mlp.down(gate_up), residual

    def forward_dense(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn.forward_dense(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Llama(nn.Module):
    """Llama-2 for causal LM. Build on the meta device, move with `to_empty`, then load weights and call
    `init_rope()`; the checkpoint loader does all three."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.register_buffer("rope_cos", torch.empty(config.max_position_embeddings, config.head_dim // 2),
                             persistent=False)
        self.register_buffer("rope_sin", torch.empty(config.max_position_embeddings, config.head_dim // 2),
                             persistent=False)
        for name, module in self.named_modules():
            if isinstance(module, ShardedLinears):
                module.name = name

    def set_backend(self, backend: Backend) -> None:
        """Every layer that can run a kernel (norms, attention, the MLP's activation, FP8 linears) asks this
        backend from now on."""
        for module in self.modules():
            if hasattr(type(module), "backend"):
                module.backend = backend

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def init_rope(self) -> None:
        # Assigned, not copied: the tables stay float32 whatever dtype the weights were cast to.
        self.rope_cos, self.rope_sin = rope_tables(self.config, self.rope_cos.device)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_caches: list[KVCache]) -> torch.Tensor:
        """input_ids, positions: [T] int64 -> final hidden states [T, hidden] (norm applied)."""
        rope = (self.rope_cos, self.rope_sin)
        x, residual = self.model.embed_tokens(input_ids), None
        for layer, kv in zip(self.model.layers, kv_caches):
            x, residual = layer(x, residual, positions, rope, meta, kv)
        x, _ = self.model.norm(x, residual)
        return x

    def forward_dense(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, L] -> logits [B, L, vocab]: whole sequences from position 0, no KV cache. Autograd
        works through it, so the same module trains."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        x = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            x = layer.forward_dense(x, cos, sin)
        return self.lm_head(self.model.norm(x))

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] -> logits [N, vocab] in float32."""
        return self.lm_head(hidden).float()
