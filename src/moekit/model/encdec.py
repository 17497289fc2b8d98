"""MoEEncoderDecoder: a Switch/T5-style sequence-to-sequence transformer with MoE layers.

    shared embedding -> encoder: n_encoder_layers x Block(bidirectional self-attention, FFN) -> RMSNorm
                     -> decoder: n_layers x Block(causal self-attention, cross-attention, FFN) -> RMSNorm
                     -> LM head

Which FFNs are MoE follows `ModelConfig.is_moe_layer` in each stack separately; Switch Transformer
uses moe_every=2 (layers 1, 3, 5, ... of both stacks). Encoder MoE layers are built with
causal=False (so expert-choice routing is allowed there), decoder ones with causal=True.
Positions are rotary in self-attention, or with `position_encoding="relative_bias"` the T5 bucketed
bias (bidirectional in the encoder, causal in the decoder, one table per stack shared by its layers);
cross-attention uses none (T5 has no position term there).
Losses and router statistics are reported for the encoder and the decoder separately.

Decoding: `encode` once, then `decode` the target tokens, optionally step by step through a
`KVCache` from `new_cache`; `generate` does that greedily (or by sampling).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moekit.model.config import ModelConfig
from moekit.model.cross_entropy import LogitsOutput, head_and_loss
from moekit.model.decoder import (
    decoding,
    init_weights,
    moe_layers,
    sample_next_token,
    sum_router_losses,
    update_router_biases,
)
from moekit.model.layers import (
    Block,
    KVCache,
    RelativePositionBias,
    RMSNorm,
    Rotary,
    build_attention_mask,
    linear,
    with_position_bias,
)
from moekit.moe import MoE, MoEOutput, MoEStats


@dataclass
class EncDecOutput(LogitsOutput):
    # logits [B, S_dec, V] first, read as `.logits` (see LogitsOutput: with labels, computed when read)
    loss: torch.Tensor | None  # ce_loss + aux_loss + z_loss; None without labels
    ce_loss: torch.Tensor | None
    encoder_aux_loss: torch.Tensor  # sums over the encoder's MoE layers
    encoder_z_loss: torch.Tensor
    decoder_aux_loss: torch.Tensor  # sums over the decoder's MoE layers
    decoder_z_loss: torch.Tensor
    encoder_router_stats: list[MoEStats] = field(default_factory=list)
    decoder_router_stats: list[MoEStats] = field(default_factory=list)

    @property
    def aux_loss(self) -> torch.Tensor:
        return self.encoder_aux_loss + self.decoder_aux_loss

    @property
    def z_loss(self) -> torch.Tensor:
        return self.encoder_z_loss + self.decoder_z_loss


class MoEEncoderDecoder(nn.Module):
    """`forward(input_ids, decoder_input_ids, attention_mask, decoder_attention_mask, labels)`.

    `fused_loss` as `MoETransformer.fused_loss`: with labels, the LM head and its cross-entropy run
    together over row chunks and the logits are only computed if `.logits` is read."""

    fused_loss = True

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)  # shared by encoder and decoder
        self.encoder = nn.ModuleList(
            Block(cfg, i, causal=False, is_moe=cfg.is_moe_layer(i, encoder=True))
            for i in range(cfg.encoder_layers)
        )
        self.encoder_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.decoder = nn.ModuleList(
            Block(cfg, i, causal=True, cross_attention=True) for i in range(cfg.n_layers)
        )
        self.decoder_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        relative = cfg.position_encoding == "relative_bias"
        self.rope = None if relative else Rotary(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.encoder_pos_bias = self.decoder_pos_bias = None
        if relative:
            buckets, distance = cfg.rel_pos_buckets, cfg.rel_pos_max_distance
            self.encoder_pos_bias = RelativePositionBias(cfg.n_heads, buckets, distance, bidirectional=True)
            self.decoder_pos_bias = RelativePositionBias(cfg.n_heads, buckets, distance, bidirectional=False)
        init_weights(self, cfg.init_std)
        nn.init.normal_(self.output.weight, std=cfg.init_std)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    @property
    def encoder_moe_layers(self) -> list[MoE]:
        return moe_layers(self.encoder)

    @property
    def decoder_moe_layers(self) -> list[MoE]:
        return moe_layers(self.decoder)

    def new_cache(self, batch_size: int, max_seq_len: int | None = None) -> KVCache:
        """An empty decoder self-attention cache on the model's device and dtype."""
        cfg, weight = self.config, self.tok_embeddings.weight
        return KVCache(
            cfg.n_layers,
            batch_size,
            max_seq_len or cfg.max_seq_len,
            cfg.n_kv_heads,
            cfg.head_dim,
            dtype=weight.dtype,
            device=weight.device,
        )

    def _positions(
        self, seq_len: int, device: torch.device, start: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Rotary cos/sin of positions start..start+seq_len; None with the relative position bias."""
        if self.rope is None:
            return None
        if start + seq_len > self.config.max_seq_len:
            raise ValueError(
                f"sequence of {start + seq_len} positions exceeds max_seq_len={self.config.max_seq_len}"
            )
        return self.rope(torch.arange(start, start + seq_len, device=device))

    def encode(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, list[MoEOutput]]:
        """input_ids [B, T] -> encoder states [B, T, D] and the encoder's MoE outputs."""
        T = input_ids.shape[1]
        token_mask_BT = None if attention_mask is None else attention_mask.bool()
        mask = build_attention_mask(T, T, causal=False, key_mask_BT=token_mask_BT, device=input_ids.device)
        rope = self._positions(T, input_ids.device)
        x_BTD = self.tok_embeddings(input_ids)  # [B, T, D]
        if self.encoder_pos_bias is not None:  # computed once, shared by every layer (T5)
            mask = with_position_bias(mask, self.encoder_pos_bias(T, T), x_BTD.dtype)
        moe_outputs: list[MoEOutput] = []
        for block in self.encoder:
            x_BTD, moe_out = block(x_BTD, mask, rope, token_mask_BT)
            if moe_out is not None:
                moe_outputs.append(moe_out)
        return self.encoder_norm(x_BTD), moe_outputs

    def forward(
        self,
        input_ids: torch.Tensor,
        decoder_input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> EncDecOutput:
        """input_ids, attention_mask: [B, T] source; decoder_input_ids, decoder_attention_mask,
        labels: [B, S] target side (labels equal to -100 are ignored). Masks: True = real token."""
        device = input_ids.device
        enc_BTD, enc_moe = self.encode(input_ids, attention_mask)
        h_BSD, dec_moe = self.decode(
            decoder_input_ids, enc_BTD, attention_mask, decoder_attention_mask, head=False
        )
        # with labels the head and the loss run in one pass, the logits only when read (fused_loss)
        logits_BSV, ce_loss = head_and_loss(self.output, h_BSD, labels, self.fused_loss)

        enc_aux, enc_z, enc_stats = sum_router_losses(enc_moe, device)
        dec_aux, dec_z, dec_stats = sum_router_losses(dec_moe, device)
        loss = None
        if labels is not None:
            loss = ce_loss + enc_aux + dec_aux + enc_z + dec_z
        return EncDecOutput(logits_BSV, loss, ce_loss, enc_aux, enc_z, dec_aux, dec_z, enc_stats, dec_stats)

    def decode(
        self,
        decoder_input_ids: torch.Tensor,
        enc_BTD: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        *,
        head: bool = True,
    ) -> tuple[torch.Tensor, list[MoEOutput]]:
        """Target tokens [B, S] over encoder states [B, T, D] -> logits [B, S, V] and the decoder's
        MoE outputs. attention_mask: the source padding [B, T]. With `cache`, the S tokens follow the
        cache's `pos` and decoder_attention_mask covers only them. With head=False, the final hidden
        states [B, S, D] that the LM head multiplies (after the decoder norm and the output scale)."""
        device = decoder_input_ids.device
        S, T = decoder_input_ids.shape[1], enc_BTD.shape[1]
        start = 0 if cache is None else cache.pos
        dec_mask_BS = None if decoder_attention_mask is None else decoder_attention_mask.bool()
        key_mask_BT = dec_mask_BS if cache is None else cache.add_mask(dec_mask_BS, S)  # [B, start + S]
        self_mask = build_attention_mask(
            S, start + S, causal=True, key_mask_BT=key_mask_BT, q_offset=start, device=device
        )
        src_mask_BT = None if attention_mask is None else attention_mask.bool()
        cross_mask = build_attention_mask(
            S, T, causal=False, key_mask_BT=src_mask_BT, self_attention=False, device=device
        )
        rope = self._positions(S, device, start)

        x_BSD = self.tok_embeddings(decoder_input_ids)  # [B, S, D]
        if self.decoder_pos_bias is not None:
            bias_1HST = self.decoder_pos_bias(S, start + S, q_offset=start)
            self_mask = with_position_bias(self_mask, bias_1HST, x_BSD.dtype)
        dec_moe: list[MoEOutput] = []
        for block in self.decoder:
            x_BSD, moe_out = block(
                x_BSD, self_mask, rope, dec_mask_BS, cache=cache, context_BTD=enc_BTD, context_mask=cross_mask
            )
            if moe_out is not None:
                dec_moe.append(moe_out)
        if cache is not None:
            cache.advance(S)
        h_BSD = self.decoder_norm(x_BSD)
        if self.config.output_scale != 1.0:  # T5 with a tied head rescales by dim**-0.5
            h_BSD = h_BSD * self.config.output_scale
        return (linear(self.output, h_BSD) if head else h_BSD), dec_moe  # [B, S, V] or [B, S, D]

    @decoding
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        attention_mask: torch.Tensor | None = None,
        decoder_start_id: int = 0,
        eos_id: int | None = None,
        pad_id: int | None = None,
        temperature: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Source [B, T] -> decoder tokens [B, 1 + n], n <= max_new_tokens, starting with decoder_start_id.

        Greedy when temperature == 0 (the default). The encoder runs once; the decoder runs one
        token at a time through a KV cache (so a Switch decoder's capacity applies per step, as in
        transformers). A row that has produced eos_id continues with pad_id (default eos_id);
        decoding stops once every row has. Call `model.eval()` first.
        """
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={max_new_tokens!r} is invalid: expected an integer >= 0")
        if temperature < 0:
            raise ValueError(f"temperature={temperature!r} is invalid: expected >= 0 (0 = greedy)")
        B = input_ids.shape[0]
        enc_BTD, _ = self.encode(input_ids, attention_mask)
        cache = self.new_cache(B, max_new_tokens + 1)
        next_B1 = torch.full((B, 1), decoder_start_id, dtype=torch.long, device=input_ids.device)
        tokens = [next_B1]
        done_B = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        for _ in range(max_new_tokens):
            logits_B1V, _ = self.decode(next_B1, enc_BTD, attention_mask, cache=cache)
            next_B = sample_next_token(logits_B1V[:, -1], temperature, generator=generator)
            if eos_id is not None:
                next_B = next_B.masked_fill(done_B, eos_id if pad_id is None else pad_id)
                done_B = done_B | (next_B == eos_id)
            next_B1 = next_B[:, None]
            tokens.append(next_B1)
            if eos_id is not None and bool(done_B.all()):
                break
        return torch.cat(tokens, dim=1)

    def update_router_biases(
        self, encoder_stats: Sequence[MoEStats], decoder_stats: Sequence[MoEStats]
    ) -> None:
        """Call after the optimizer step with the output's encoder/decoder router stats."""
        update_router_biases(self.encoder_moe_layers, encoder_stats)
        update_router_biases(self.decoder_moe_layers, decoder_stats)

    def save_pretrained(self, path: str | Path, **kwargs: Any) -> Path:
        """Write a Hugging Face Switch Transformers folder (config.json + safetensors) that
        transformers' `AutoModelForSeq2SeqLM` loads; keyword arguments as `moekit.hf.save_pretrained`."""
        from moekit.hf import save_pretrained  # the interop package builds on this module

        return save_pretrained(self, path, **kwargs)
