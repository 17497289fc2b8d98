"""MoETransformer: a decoder-only language model whose FFNs are MoE or dense per `ModelConfig`.

    embedding -> n_layers x Block(pre-norm causal attention, MoE-or-dense FFN) -> RMSNorm -> LM head

Every MoE layer returns its losses and statistics; the model gathers them explicitly into
`ModelOutput` (no globals, no hooks): loss = ce_loss + aux_loss + z_loss, where aux_loss and
z_loss are sums over the MoE layers, each already scaled by its MoEConfig coefficient.

Incremental decoding: `cache = model.new_cache(batch_size)`, then `model(prompt, cache=cache)` and
`model(next_token, cache=cache)` one step at a time; `generate` does exactly that.

With `aux_loss_mode="transformers"` the load-balancing part of aux_loss is transformers'
`load_balancing_loss_func` over all MoE layers pooled (times `moe.load_balance_coef`), for exact
fine-tuning parity with models imported from Hugging Face; `ModelOutput.router_logits` holds the
per-layer logits it is computed from. `save_pretrained(path)` writes a Hugging Face folder (moekit.hf).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moekit.model.config import ModelConfig
from moekit.model.cross_entropy import LogitsOutput, head_and_loss
from moekit.model.layers import (
    Attention,
    Block,
    FeedForward,
    KVCache,
    RMSNorm,
    Rotary,
    build_attention_mask,
    full_rope,
    linear,
)
from moekit.model.mla import MLAttention
from moekit.moe import MoE, MoEConfig, MoEOutput, MoEStats
from moekit.moe.losses import pooled_load_balancing_loss


@dataclass
class ModelOutput(LogitsOutput):
    # logits [B, S, V] first, read as `.logits` (see LogitsOutput: with targets, computed when read)
    loss: torch.Tensor | None  # ce_loss + aux_loss + z_loss; None without targets
    ce_loss: torch.Tensor | None  # mean over targets != -100; None without targets
    # (aux_loss, z_loss), each summed over the MoE layers (0 for a dense model); or, for an
    # inference call without targets, the function computing them when first read (a decode step
    # never reads them), as MoEOutput does for its layer's losses
    router_losses: tuple[torch.Tensor, torch.Tensor] | Callable[[], tuple[torch.Tensor, torch.Tensor]]
    router_stats: list[MoEStats] = field(default_factory=list)  # one per MoE layer, in layer order
    router_logits: list[torch.Tensor] = field(default_factory=list)  # [B*S, E] float32 per MoE layer

    @property
    def aux_loss(self) -> torch.Tensor:
        return self._router_losses()[0]

    @property
    def z_loss(self) -> torch.Tensor:
        return self._router_losses()[1]

    def _router_losses(self) -> tuple[torch.Tensor, torch.Tensor]:
        if callable(self.router_losses):
            self.router_losses = self.router_losses()
        return self.router_losses


def sum_router_losses(
    moe_outputs: Sequence[MoEOutput], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, list[MoEStats]]:
    """(aux_loss, z_loss, stats) summed / listed over the MoE layers of one stack."""
    aux = torch.zeros((), device=device)
    z = torch.zeros((), device=device)
    for out in moe_outputs:
        aux = aux + out.aux_loss.float()
        z = z + out.z_loss.float()
    return aux, z, [out.stats for out in moe_outputs]


def pooled_aux_loss(
    moe_outputs: Sequence[MoEOutput], moe_cfg: MoEConfig, token_mask_BS: torch.Tensor | None
) -> torch.Tensor:
    """aux_loss with transformers' pooled load balance in place of the per-layer Switch losses.

    The layers' other balance losses (importance, load, sequence-wise) stay as they are."""
    coef = moe_cfg.load_balance_coef
    others = sum(out.aux_loss.float() - coef * out.losses["load_balance"].float() for out in moe_outputs)
    mask_T = None if token_mask_BS is None else token_mask_BS.reshape(-1)
    logits = [out.router_logits for out in moe_outputs]
    return others + coef * pooled_load_balancing_loss(logits, moe_cfg.top_k, mask_T)


def init_weights(model: nn.Module, std: float) -> None:
    """Normal(0, std) for embeddings, attention and dense FFNs. MoE layers keep their own init
    (the router's small init in particular) and norms stay at one; the caller inits its LM head."""
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, (Attention, MLAttention, FeedForward)):
            module.reset_parameters(std)


def moe_layers(blocks: nn.ModuleList) -> list[MoE]:
    return [block.ffn for block in blocks if block.is_moe]


def update_router_biases(layers: Sequence[MoE], stats_list: Sequence[MoEStats]) -> None:
    """Aux-loss-free balancing: each MoE layer's `update_bias` with its own routed load.

    The load is `stats.routed_per_expert` (before capacity drops), as `MoE.update_bias` expects:
    a dropped token was still routed there, and steering must see it.
    """
    if len(stats_list) != len(layers):
        raise ValueError(
            f"stats_list has {len(stats_list)} entries; expected one per MoE layer ({len(layers)})"
        )
    for moe, stats in zip(layers, stats_list):
        moe.update_bias(stats.routed_per_expert)


def decoding(generate: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Run a `generate` method under `torch.inference_mode` and hand back a normal tensor.

    Inference mode makes every small op of a decode step cheaper than `no_grad` does (no version
    counters, no view tracking): a batch-1 step is a few hundred of them, and it measured 8-14%
    faster per token here. The tokens are cloned on the way out, since an inference tensor may not
    be used where autograd records (e.g. as the next training batch)."""

    @functools.wraps(generate)
    def wrapper(*args: Any, **kwargs: Any) -> torch.Tensor:
        with torch.inference_mode():
            tokens = generate(*args, **kwargs)
        return tokens.clone()

    return wrapper


def sample_next_token(
    logits_BV: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token per row [B]: argmax when temperature == 0, else sample after top-k / top-p filtering."""
    if temperature == 0:
        return logits_BV.argmax(dim=-1)
    logits_BV = logits_BV.float() / temperature
    if top_k is not None and top_k < logits_BV.shape[-1]:
        kth_B1 = logits_BV.topk(top_k, dim=-1).values[:, -1:]  # [B, 1]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_BV, order_BV = logits_BV.sort(dim=-1, descending=True)
        probs_BV = sorted_BV.softmax(dim=-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass (keeps the first)
        drop_BV = probs_BV.cumsum(dim=-1) - probs_BV >= top_p
        sorted_BV = sorted_BV.masked_fill(drop_BV, float("-inf"))
        logits_BV = torch.full_like(logits_BV, float("-inf")).scatter(-1, order_BV, sorted_BV)
    probs_BV = logits_BV.softmax(dim=-1)
    return torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1)


class MoETransformer(nn.Module):
    """Decoder-only LM. `forward(input_ids, targets, attention_mask, cache) -> ModelOutput`.

    `fused_loss` (default True): with targets, the LM head and its cross-entropy run together over
    row chunks (`linear_cross_entropy`) and the logits are only computed if `.logits` is read. Set it
    False when every call with targets also reads the logits (distillation does)."""

    fused_loss = True

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i, causal=True) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.rope = Rotary(cfg.rope_head_dim, cfg.max_seq_len, cfg.rope_theta, cfg.rope_scaling)
        init_weights(self, cfg.init_std)
        nn.init.normal_(self.output.weight, std=cfg.init_std)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    @property
    def moe_layers(self) -> list[MoE]:
        return moe_layers(self.layers)

    def new_cache(self, batch_size: int, max_seq_len: int | None = None) -> KVCache:
        """An empty KV cache on the model's device and dtype (default length: config.max_seq_len)."""
        cfg = self.config
        weight = self.tok_embeddings.weight
        heads, key_dim, value_dim = cfg.kv_cache_dims()
        return KVCache(
            cfg.n_layers,
            batch_size,
            max_seq_len or cfg.max_seq_len,
            heads,
            key_dim,
            dtype=weight.dtype,
            device=weight.device,
            v_head_dim=value_dim,
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        task_ids: torch.Tensor | None = None,
    ) -> ModelOutput:
        """input_ids, targets, attention_mask: [B, S]. attention_mask: 1/True = real token, 0 = padding
        (keys and routing exclude padding; mask padded targets yourself with -100). With `cache`,
        input_ids are the next S tokens after the cache's `pos` and only their mask is passed.
        task_ids [B]: the task of every sequence, read by task routers (router='task') only."""
        B, S = input_ids.shape
        start = 0 if cache is None else cache.pos
        if start + S > self.config.max_seq_len:
            raise ValueError(
                f"sequence of {start + S} positions exceeds max_seq_len={self.config.max_seq_len}"
            )
        device = input_ids.device
        token_mask_BS = None if attention_mask is None else attention_mask.bool()
        key_mask_BT = token_mask_BS if cache is None else cache.add_mask(token_mask_BS, S)  # [B, start + S]
        masks = {  # one mask per distinct sliding window (None = full causal attention)
            window: build_attention_mask(
                S,
                start + S,
                causal=True,
                key_mask_BT=key_mask_BT,
                q_offset=start,
                device=device,
                sliding_window=window,
            )
            for window in {block.attn.sliding_window for block in self.layers}
        }
        rope = self.rope(torch.arange(start, start + S, device=device))  # cos, sin: [S, K] (full_rope)

        x_BSD = self.tok_embeddings(input_ids)  # [B, S, D]
        moe_outputs: list[MoEOutput] = []
        for block in self.layers:
            x_BSD, moe_out = block(
                x_BSD, masks[block.attn.sliding_window], rope, token_mask_BS, cache=cache, task_ids=task_ids
            )
            if moe_out is not None:
                moe_outputs.append(moe_out)
        if cache is not None:
            cache.advance(S)
        # with targets the head and the loss run in one pass, the logits only when read (fused_loss)
        logits_BSV, ce_loss = head_and_loss(self.output, self.norm(x_BSD), targets, self.fused_loss)

        def router_losses() -> tuple[torch.Tensor, torch.Tensor]:
            aux_loss, z_loss, _ = sum_router_losses(moe_outputs, device)
            if self.config.aux_loss_mode == "transformers" and moe_outputs:
                aux_loss = pooled_aux_loss(moe_outputs, self.config.moe, token_mask_BS)
            return aux_loss, z_loss

        loss = None
        losses = router_losses() if targets is not None or torch.is_grad_enabled() else router_losses
        if targets is not None:
            aux_loss, z_loss = losses
            loss = ce_loss + aux_loss + z_loss
        stats = [out.stats for out in moe_outputs]
        router_logits = [out.router_logits for out in moe_outputs]
        return ModelOutput(logits_BSV, loss, ce_loss, losses, stats, router_logits)

    def decode_ready(self) -> bool:
        """Whether a batch-1 decode step may take `decode_one`: eval mode and blocks that support it."""
        return not self.training and all(block.decode_ready() for block in self.layers)

    def decode_one(self, token_11: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits [1, 1, V] of the next token of one unpadded sequence, writing its keys and values to
        `cache`: `forward(token_11, cache=cache).logits` without the masks, losses and statistics that
        a decode step never reads, and without autograd. Only where `decode_ready()` and the cache
        has no padding."""
        if cache.has_padding or token_11.shape != (1, 1):
            raise ValueError(
                f"decode_one takes one token of one unpadded sequence: got input {tuple(token_11.shape)}"
                f"{' and a padded cache' if cache.has_padding else ''}; use forward"
            )
        start = cache.pos
        cache.add_mask(None, 1)  # checks the cache has room
        rope = full_rope(self.rope.cos[start : start + 1], self.rope.sin[start : start + 1])
        x_11D = self.tok_embeddings(token_11)
        for block in self.layers:
            x_11D = block.decode_one(x_11D, rope, cache)
        cache.advance(1)
        return linear(self.output, self.norm(x_11D))

    def update_router_biases(self, stats_list: Sequence[MoEStats]) -> None:
        """Call after the optimizer step with `output.router_stats` (aux-loss-free balancing)."""
        update_router_biases(self.moe_layers, stats_list)

    def save_pretrained(self, path: str | Path, **kwargs: Any) -> Path:
        """Write a Hugging Face folder (config.json + safetensors) that transformers'
        `AutoModelForCausalLM` loads; keyword arguments as `moekit.hf.save_pretrained`."""
        from moekit.hf import save_pretrained  # the interop package builds on this module

        return save_pretrained(self, path, **kwargs)

    @decoding
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_id: int | None = None,
        generator: torch.Generator | None = None,
        attention_mask: torch.Tensor | None = None,
        task_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Prompt [B, S] -> [B, S + n] with n <= max_new_tokens, decoding through a KV cache.
        task_ids [B]: the task of every row, for task-routed models.

        Greedy when temperature == 0. Batched prompts of different lengths must be left-padded
        (with attention_mask). A row that has produced eos_id continues with eos_id; decoding stops
        early once every row has. Dropout is active in training mode: call `model.eval()` first.
        """
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={max_new_tokens!r} is invalid: expected an integer >= 0")
        if temperature < 0:
            raise ValueError(f"temperature={temperature!r} is invalid: expected >= 0 (0 = greedy)")
        B, S = input_ids.shape
        cache = self.new_cache(B, S + max_new_tokens)
        out = self(input_ids, attention_mask=attention_mask, cache=cache, task_ids=task_ids)
        logits_BV = out.logits[:, -1]
        # one sequence, no padding, no task routing: the lean step (the same logits, fewer calls)
        lean = B == 1 and task_ids is None and not cache.has_padding and self.decode_ready()
        tokens = [input_ids]
        done_B = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        for step in range(max_new_tokens):
            next_B = sample_next_token(logits_BV, temperature, top_k, top_p, generator)
            if eos_id is not None:
                next_B = next_B.masked_fill(done_B, eos_id)
                done_B = done_B | (next_B == eos_id)
            tokens.append(next_B[:, None])
            if step == max_new_tokens - 1 or (eos_id is not None and bool(done_B.all())):
                break
            if lean:
                logits_BV = self.decode_one(next_B[:, None], cache)[:, -1]
            else:
                logits_BV = self(next_B[:, None], cache=cache, task_ids=task_ids).logits[:, -1]
        return torch.cat(tokens, dim=1)
