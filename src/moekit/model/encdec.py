"""MoEEncoderDecoder: a Switch/T5-style sequence-to-sequence transformer with MoE layers.

    shared embedding -> encoder: n_encoder_layers x Block(bidirectional self-attention, FFN) -> RMSNorm
                     -> decoder: n_layers x Block(causal self-attention, cross-attention, FFN) -> RMSNorm
                     -> LM head

Which FFNs are MoE follows `ModelConfig.is_moe_layer` in each stack separately; Switch Transformer
uses moe_every=2 (layers 1, 3, 5, ... of both stacks). Encoder MoE layers are built with
causal=False (so expert-choice routing is allowed there), decoder ones with causal=True.
Positions are rotary in self-attention; cross-attention uses none (T5 has no position term there).
Losses and router statistics are reported for the encoder and the decoder separately.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from moekit.model.config import ModelConfig
from moekit.model.decoder import init_weights, lm_loss, moe_layers, sum_router_losses, update_router_biases
from moekit.model.layers import Block, RMSNorm, Rotary, build_attention_mask
from moekit.moe import MoE, MoEOutput, MoEStats


@dataclass
class EncDecOutput:
    logits: torch.Tensor  # [B, S_dec, V]
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
    """`forward(input_ids, decoder_input_ids, attention_mask, decoder_attention_mask, labels)`."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)  # shared by encoder and decoder
        self.encoder = nn.ModuleList(Block(cfg, i, causal=False) for i in range(cfg.encoder_layers))
        self.encoder_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.decoder = nn.ModuleList(
            Block(cfg, i, causal=True, cross_attention=True) for i in range(cfg.n_layers)
        )
        self.decoder_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.rope = Rotary(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
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

    def _positions(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if seq_len > self.config.max_seq_len:
            raise ValueError(f"sequence of {seq_len} positions exceeds max_seq_len={self.config.max_seq_len}")
        return self.rope(torch.arange(seq_len, device=device))

    def encode(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, list[MoEOutput]]:
        """input_ids [B, T] -> encoder states [B, T, D] and the encoder's MoE outputs."""
        T = input_ids.shape[1]
        token_mask_BT = None if attention_mask is None else attention_mask.bool()
        mask = build_attention_mask(T, T, causal=False, key_mask_BT=token_mask_BT, device=input_ids.device)
        rope = self._positions(T, input_ids.device)
        x_BTD = self.tok_embeddings(input_ids)  # [B, T, D]
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
        T, S = input_ids.shape[1], decoder_input_ids.shape[1]
        dec_mask_BS = None if decoder_attention_mask is None else decoder_attention_mask.bool()
        self_mask = build_attention_mask(S, S, causal=True, key_mask_BT=dec_mask_BS, device=device)
        src_mask_BT = None if attention_mask is None else attention_mask.bool()
        cross_mask = build_attention_mask(
            S, T, causal=False, key_mask_BT=src_mask_BT, self_attention=False, device=device
        )
        rope = self._positions(S, device)

        x_BSD = self.tok_embeddings(decoder_input_ids)  # [B, S, D]
        dec_moe: list[MoEOutput] = []
        for block in self.decoder:
            x_BSD, moe_out = block(
                x_BSD, self_mask, rope, dec_mask_BS, context_BTD=enc_BTD, context_mask=cross_mask
            )
            if moe_out is not None:
                dec_moe.append(moe_out)
        logits_BSV = self.output(self.decoder_norm(x_BSD))  # [B, S, V]

        enc_aux, enc_z, enc_stats = sum_router_losses(enc_moe, device)
        dec_aux, dec_z, dec_stats = sum_router_losses(dec_moe, device)
        ce_loss = loss = None
        if labels is not None:
            ce_loss = lm_loss(logits_BSV, labels)
            loss = ce_loss + enc_aux + dec_aux + enc_z + dec_z
        return EncDecOutput(logits_BSV, loss, ce_loss, enc_aux, enc_z, dec_aux, dec_z, enc_stats, dec_stats)

    def update_router_biases(
        self, encoder_stats: Sequence[MoEStats], decoder_stats: Sequence[MoEStats]
    ) -> None:
        """Call after the optimizer step with the output's encoder/decoder router stats."""
        update_router_biases(self.encoder_moe_layers, encoder_stats)
        update_router_biases(self.decoder_moe_layers, decoder_stats)
