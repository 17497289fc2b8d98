"""Multi-head latent attention (MLA, DeepSeek-V2/V3).

Keys and values are not projected per head from x. Each token gets one small latent c (width C,
RMS-normalized) and one rotary key k_rot (width R) shared by every head; per-head keys and values
are expanded from c:

    q            = W_q x                  or  W_qb RMSNorm(W_qa x)        [H, Kn + R]
    [c | k_rot]  = W_kva x                                                 [C + R]
    [k_nope | v] = W_kvb RMSNorm(c)                                        [H, Kn + Kv]
    k            = [k_nope | rotary(k_rot)],  q = [q_nope | rotary(q_rot)]

The KV cache stores only RMSNorm(c) and the rotated k_rot (C + R numbers per token instead of
2 * H * K), which is the point of MLA; keys and values are re-expanded from it at every step.

Rotary uses the half-split pairing of the rest of moekit. DeepSeek checkpoints pair dims
interleaved ((0, 1), (2, 3), ...); the checkpoint converter permutes the rotary rows of W_q / W_qb
and W_kva once (even dims first), which gives bit-for-bit the same attention.

Shape legend: B batch, S queries, T keys, D model dim, H heads, C latent width, R rotary dims,
Kn non-rotary q/k dims, Kv value dims, Q query-latent rank.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moekit.model.config import ModelConfig
from moekit.model.layers import AttentionMask, KVCache, RMSNorm, apply_rope


class MLAttention(nn.Module):
    """Self-attention with a compressed key/value latent; same call signature as `Attention`."""

    def __init__(self, cfg: ModelConfig, layer_id: int = 0) -> None:
        super().__init__()
        mla = cfg.mla
        if mla is None:
            raise ValueError("MLAttention needs ModelConfig.mla")
        self.layer_id = layer_id  # which slot of a KVCache this layer writes
        self.n_heads = cfg.n_heads
        self.nope_dim, self.rope_dim, self.v_dim = mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.v_head_dim
        self.latent_dim = mla.kv_lora_rank
        self.dropout = cfg.dropout
        self.scale = mla.softmax_scale  # None = 1/sqrt(Kn + R), SDPA's default
        self.sliding_window = cfg.layer_window(layer_id)
        qk_dim = mla.qk_head_dim
        if mla.q_lora_rank is None:
            self.wq = nn.Linear(cfg.dim, cfg.n_heads * qk_dim, bias=False)
            self.wq_a = self.q_norm = self.wq_b = None
        else:
            self.wq = None
            self.wq_a = nn.Linear(cfg.dim, mla.q_lora_rank, bias=cfg.qkv_bias)
            self.q_norm = RMSNorm(mla.q_lora_rank, mla.latent_norm_eps)
            self.wq_b = nn.Linear(mla.q_lora_rank, cfg.n_heads * qk_dim, bias=False)
        self.wkv_a = nn.Linear(cfg.dim, mla.kv_lora_rank + mla.qk_rope_head_dim, bias=cfg.qkv_bias)
        self.kv_norm = RMSNorm(mla.kv_lora_rank, mla.latent_norm_eps)
        self.wkv_b = nn.Linear(
            mla.kv_lora_rank, cfg.n_heads * (mla.qk_nope_head_dim + mla.v_head_dim), bias=False
        )
        self.wo = nn.Linear(cfg.n_heads * mla.v_head_dim, cfg.dim, bias=cfg.attn_out_bias)

    def forward(
        self,
        x_BSD: torch.Tensor,
        mask: AttentionMask,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        context_BTD: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        if context_BTD is not None or rope is None:
            raise ValueError("MLAttention is causal self-attention with rotary: no context, rope required")
        B, S, _ = x_BSD.shape
        H, Kn, R, Kv = self.n_heads, self.nope_dim, self.rope_dim, self.v_dim
        q_BSF = self.wq(x_BSD) if self.wq is not None else self.wq_b(self.q_norm(self.wq_a(x_BSD)))
        q_BHSK = q_BSF.view(B, S, H, Kn + R).transpose(1, 2)
        q_nope_BHSK, q_rot_BHSR = q_BHSK.split([Kn, R], dim=-1)
        latent_BSC, k_rot_BSR = self.wkv_a(x_BSD).split([self.latent_dim, R], dim=-1)
        latent_B1SC = self.kv_norm(latent_BSC)[:, None]  # one "head": what the cache keeps
        q_rot_BHSR, k_rot_B1SR = apply_rope(q_rot_BHSR, *rope), apply_rope(k_rot_BSR[:, None], *rope)
        if cache is not None:
            latent_B1SC, k_rot_B1SR = cache.update(self.layer_id, latent_B1SC, k_rot_B1SR)  # S -> T
        T = latent_B1SC.shape[2]
        kv_BHTF = self.wkv_b(latent_B1SC[:, 0]).view(B, T, H, Kn + Kv).transpose(1, 2)
        k_nope_BHTK, v_BHTK = kv_BHTF.split([Kn, Kv], dim=-1)
        k_BHTK = torch.cat([k_nope_BHTK, k_rot_B1SR.expand(B, H, T, R)], dim=-1)  # [B, H, T, Kn + R]
        q_BHSK = torch.cat([q_nope_BHSK, q_rot_BHSR], dim=-1)
        out_BHSV = F.scaled_dot_product_attention(
            q_BHSK,
            k_BHTK,
            v_BHTK,
            attn_mask=mask.mask,
            is_causal=mask.is_causal,
            dropout_p=self.dropout if self.training else 0.0,
            scale=self.scale,
        )
        return self.wo(out_BHSV.transpose(1, 2).reshape(B, S, H * Kv))  # [B, S, D]

    @torch.no_grad()
    def reset_parameters(self, std: float) -> None:
        for lin in (self.wq, self.wq_a, self.wq_b, self.wkv_a, self.wkv_b, self.wo):
            if lin is None:
                continue
            nn.init.normal_(lin.weight, std=std)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
