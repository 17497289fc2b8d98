"""Sparse upcycling (Komatsuzaki et al. 2023): a trained dense model becomes an MoE model.

Every chosen dense FFN is copied into E identical experts and gets a new router; everything else
(embeddings, attention, norms, LM head, the FFNs left dense) is kept. Continued training then
lets the experts diverge; the paper finds this beats continued dense training at equal extra
compute.

    moe = upcycle_model(dense, "decoder", num_experts=8, top_k=2)      # layers="every_other": 1, 3, ...

With renormalized top-k weights (routers "topk" with norm_topk_prob, or "topk_then_softmax") the
chosen experts' weights sum to 1, and since all experts equal the dense FFN the MoE layer outputs
sum_k w_k FFN(x) = FFN(x): the upcycled model starts with exactly the dense model's outputs (up to
float rounding). Routers whose weights do not sum to 1 (Switch's p_max, sigmoid scores) would
change the outputs and are refused. The MoE layers are dropless (no capacity, nothing dropped);
set a capacity for continued training if wanted.

`noise` > 0 adds N(0, (noise * std(W))^2) to every expert's copy of each matrix W, independently
per expert, so experts start apart (the outputs then differ slightly from the dense model's).

Fused layout: the dense FFN holds w1 (gate or up) and w3 (up, GLU only) as [F, D] Linear weights
and w2 as [D, F]; an expert bank holds w_in_EDF[e] = [w1^T | w3^T] ([D, 2F], gate first) and
w_out_EFD[e] = w2^T ([F, D]).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moekit.adapt.checkpoints import Source, export_model, refuse_overwrite, run_config_for
from moekit.model import ModelConfig
from moekit.model.layers import Block, FeedForward
from moekit.moe import MoE, MoEConfig
from moekit.moe.experts import ExpertBank
from moekit.train.checkpoint import CheckpointError, build_model

LAYERS = {"every": 1, "every_other": 2}  # -> ModelConfig.moe_every (every_other: layers 1, 3, 5, ...)
ROUTERS = ("topk", "topk_then_softmax")  # routers whose chosen weights sum to 1


def upcycled_config(
    dense: ModelConfig,
    num_experts: int,
    top_k: int,
    *,
    layers: str = "every",
    router: str = "topk",
    causal: bool = True,
    **moe_kwargs: Any,
) -> ModelConfig:
    """The MoE ModelConfig of an upcycled `dense` config: experts the size of the dense FFN."""
    if dense.moe is not None:
        raise ValueError(
            f"upcycling needs a dense checkpoint; this one already has MoE layers "
            f"(moe.num_experts={dense.moe.num_experts})"
        )
    if layers not in LAYERS:
        raise ValueError(f"--layers={layers!r} is invalid: expected one of {list(LAYERS)}")
    if router not in ROUTERS:
        raise ValueError(
            f"--router={router!r} cannot upcycle exactly (its chosen weights do not sum to 1): "
            f"expected one of {list(ROUTERS)}"
        )
    moe = MoEConfig(
        dim=dense.dim,
        hidden_dim=dense.ffn_hidden_dim,
        num_experts=num_experts,
        top_k=top_k,
        router=router,
        norm_topk_prob=True,
        activation=dense.ffn_activation,
        causal=causal,
        **moe_kwargs,
    )
    return dataclasses.replace(
        dense,
        moe=moe,
        moe_every=LAYERS[layers],
        n_dense_first=0,
        sparse_layers=None,
        encoder_sparse_layers=None,
    )


@torch.no_grad()
def experts_from_ffn(
    ffn: FeedForward, bank: ExpertBank, noise: float = 0.0, generator: torch.Generator | None = None
) -> None:
    """Fill every expert of `bank` with a copy of the dense FFN (plus optional relative noise)."""
    w_in_DH = (
        ffn.w1.weight.t() if ffn.w3 is None else torch.cat([ffn.w1.weight.t(), ffn.w3.weight.t()], dim=1)
    )
    w_out_FD = ffn.w2.weight.t()
    if tuple(bank.w_in_EDF.shape[1:]) != tuple(w_in_DH.shape) or tuple(bank.w_out_EFD.shape[1:]) != tuple(
        w_out_FD.shape
    ):
        raise ValueError(
            f"expert shapes {tuple(bank.w_in_EDF.shape[1:])}/{tuple(bank.w_out_EFD.shape[1:])} do not match "
            f"the dense FFN's {tuple(w_in_DH.shape)}/{tuple(w_out_FD.shape)}"
        )
    for target, source in ((bank.w_in_EDF, w_in_DH), (bank.w_out_EFD, w_out_FD)):
        target.copy_(source.unsqueeze(0).expand_as(target))  # [E, ...] identical copies
        if noise > 0:
            eps = torch.randn(target.shape, generator=generator, dtype=torch.float32)
            target.add_((noise * source.float().std() * eps).to(target.dtype))


def upcycle_model(
    dense: nn.Module,
    arch: str,
    num_experts: int,
    top_k: int,
    *,
    noise: float = 0.0,
    layers: str = "every",
    router: str = "topk",
    seed: int = 0,
    **moe_kwargs: Any,
) -> nn.Module:
    """A new MoE model: the dense model's weights, its chosen FFNs copied into experts, fresh routers."""
    if not noise >= 0:
        raise ValueError(f"--noise={noise!r} is invalid: expected a number >= 0")
    cfg = upcycled_config(
        dense.config, num_experts, top_k, layers=layers, router=router, causal=arch == "decoder", **moe_kwargs
    )
    torch.manual_seed(seed)  # the routers' init
    model = build_model(arch, cfg)
    generator = torch.Generator().manual_seed(seed)
    dense_state = dense.state_dict()
    copied: set[str] = set()
    with torch.no_grad():
        for name, target in model.state_dict().items():
            if name in dense_state:
                target.copy_(dense_state[name])
                copied.add(name)
        for name, block in model.named_modules():
            if isinstance(block, Block) and block.is_moe:
                ffn = dense.get_submodule(name).ffn
                assert isinstance(block.ffn, MoE) and isinstance(ffn, FeedForward)
                experts_from_ffn(ffn, block.ffn.experts, noise, generator)
                copied.update(f"{name}.ffn.{k}" for k in ("w1.weight", "w2.weight", "w3.weight"))
    unused = sorted(set(dense_state) - copied)
    if unused:
        raise CheckpointError(f"upcycling left dense tensors unused (unknown model layout): {unused[:8]}")
    return model


def upcycle_checkpoint(
    ckpt: str | Path,
    out: str | Path,
    num_experts: int,
    top_k: int,
    *,
    noise: float = 0.0,
    layers: str = "every",
    router: str = "topk",
    seed: int = 0,
) -> tuple[Path, nn.Module, nn.Module]:
    """Upcycle a dense checkpoint into `out` (written atomically); returns (folder, dense, upcycled)."""
    source = Source.open(ckpt)
    refuse_overwrite(source.folder, Path(out))
    dense = source.load_weights(build_model(source.arch, source.model_config)).eval()
    model = upcycle_model(
        dense, source.arch, num_experts, top_k, noise=noise, layers=layers, router=router, seed=seed
    ).eval()
    run_cfg = run_config_for(source.arch, model.config, source.run)
    info = {
        "source": str(source.folder),
        "experts": num_experts,
        "top_k": top_k,
        "noise": noise,
        "layers": layers,
        "router": router,
        "seed": seed,
    }
    folder = export_model(Path(out), model, source.arch, run_cfg, source.tokenizer(), {"upcycled_from": info})
    return folder, dense, model
