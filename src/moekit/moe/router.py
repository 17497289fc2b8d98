"""Routers: which experts each token goes to, and with what combine weight.

Every router maps tokens `x_TD` to a `Routing`: a flat list of A assignments (token, expert,
weight). Token-choice routers produce A = T * K assignments in token-major order (token t owns
rows t*K .. t*K+K-1); expert choice produces A = E * C assignments, C tokens per expert. The
dispatcher, the experts and the combine only ever see that flat list, so every router works with
every dispatcher.

All router math runs in float32 whatever the experts' dtype (Switch's "selective precision":
bf16 routers diverge). `MoEConfig.router_dtype="bfloat16"` emulates such a low-precision router
for experiments: input, gate, logits, probabilities and combine weights are rounded through bf16.
Routers are picked by name through `build_router(config)`.

Shape legend: T tokens, D model dim, E experts, K experts per token, A assignments, C capacity.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.moe import native
from moekit.moe.config import MoEConfig


@dataclass
class Routing:
    """What a router decided for T tokens."""

    logits_TE: Tensor  # float32 raw router logits (for the z-loss)
    probs_TE: Tensor  # float32 router probabilities; their per-expert mean is P_i of the balance losses
    expert_idx_A: Tensor  # [A] long, chosen expert of each assignment
    weight_A: Tensor  # [A] float32 combine weight; gradients reach the router through it
    top_k: int  # K for token-major layouts (A = T * K); 0 for expert choice
    token_idx_A: Tensor | None = None  # [A] long; None = token-major layout, token of row a is a // K
    keep_A: Tensor | None = None  # [A] bool; False = removed by the router itself (GShard random routing)
    load_E: Tensor | None = None  # smooth differentiable load estimate (noisy top-k), for the load loss

    @property
    def num_assignments(self) -> int:
        return self.expert_idx_A.numel()

    def token_index(self) -> Tensor:
        """[A] token of every assignment."""
        if self.token_idx_A is not None:
            return self.token_idx_A
        arange_A = torch.arange(self.num_assignments, device=self.expert_idx_A.device)
        return arange_A.div(self.top_k, rounding_mode="floor")  # row a belongs to token a // K


def router_dtype(x: Tensor) -> torch.dtype:
    """float32 for every input dtype except float64 (kept, so float64 gradchecks stay exact)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class Router(nn.Module):
    """Base: a float32 linear gate `logits = x W^T (+ b)` with an optional small init."""

    uses_task_ids = False  # MoE.forward passes the tokens' task ids to routers that set this

    def __init__(self, config: MoEConfig):
        super().__init__()
        self.config = config
        self.num_experts = config.num_experts
        self.top_k = config.top_k
        self.gate = nn.Linear(config.dim, config.num_experts, bias=config.router_bias)
        self.reset_parameters()
        if config.router_dtype == "bfloat16":
            # compute_logits rounds input, gate and logits; this hook rounds what every subclass
            # derives from them (probabilities, combine weights) on the way out.
            self.register_forward_hook(_round_routing_to_bf16)

    def reset_parameters(self) -> None:
        std = self.config.router_init_scale / math.sqrt(self.config.dim)
        nn.init.normal_(self.gate.weight, std=std)
        if self.gate.bias is not None:
            nn.init.zeros_(self.gate.bias)

    def compute_logits(self, x_TD: Tensor) -> Tensor:
        dtype = router_dtype(x_TD)
        weight, bias = self.gate.weight, self.gate.bias
        if weight.dtype != dtype or (bias is not None and bias.dtype != dtype) or x_TD.dtype != dtype:
            weight, x_TD = weight.to(dtype), x_TD.to(dtype)  # (each a call even when a no-op: skipped)
            bias = None if bias is None else bias.to(dtype)
        low_precision = self.config.router_dtype == "bfloat16"
        if low_precision:  # a bf16 product: bf16 operands, float32 accumulation, bf16 result
            x_TD, weight = round_to_bf16(x_TD), round_to_bf16(weight)
            bias = None if bias is None else round_to_bf16(bias)
        # Autocast would run this product in bf16; the router's selective precision forbids that.
        # (Entering the context costs microseconds on every decode step: only when autocast is on.)
        if torch.is_autocast_enabled(x_TD.device.type):
            with torch.autocast(device_type=x_TD.device.type, enabled=False):
                logits_TE = F.linear(x_TD, weight, bias)  # [T, E] float32 (float64 for float64 input)
        elif not low_precision and native.applies_linear(x_TD, weight, bias):
            logits_TE = native.linear(x_TD, weight, bias)  # many tokens over 64+ experts: moekit's GEMM
        else:
            logits_TE = F.linear(x_TD, weight, bias)
        if low_precision:
            logits_TE = round_to_bf16(logits_TE)
        # One sum tells whether all are finite (a NaN/Inf makes it non-finite): a decode step pays
        # this in every layer, and isfinite is five ops on [T, E]. Exact count only on failure.
        checked = (
            logits_TE.detach() if logits_TE.requires_grad else logits_TE
        )  # (detach: a call, only if needed)
        if self.config.check_finite and not math.isfinite(float(checked.sum())):
            bad = (~torch.isfinite(logits_TE)).sum().item()
        else:
            bad = 0
        if bad:
            raise ValueError(
                f"router logits contain {bad} NaN/Inf values (expected finite numbers): check the layer "
                "input and the router weights for NaN/Inf"
            )
        return logits_TE

    def update_bias(self, tokens_per_expert_E: Tensor) -> None:
        """Aux-loss-free bias update; only the sigmoid_bias router has a bias to update."""

    # Subclasses define forward(x_TD, mask_T=None) -> Routing.


def round_to_bf16(t: Tensor) -> Tensor:
    """`t` rounded to the nearest bfloat16 value, in t's dtype; its gradient is rounded the same way."""
    return t.to(torch.bfloat16).to(t.dtype)


def _round_routing_to_bf16(module: nn.Module, inputs: tuple, routing: Routing) -> Routing:
    return dataclasses.replace(
        routing, probs_TE=round_to_bf16(routing.probs_TE), weight_A=round_to_bf16(routing.weight_A)
    )


def _top_k_renorm(values_TK: Tensor, renormalize: bool) -> Tensor:
    if not renormalize:
        return values_TK
    return values_TK / values_TK.sum(dim=-1, keepdim=True)


class TopKRouter(Router):
    """Softmax over all experts, then the top-k (Mixtral, Qwen-MoE, OLMoE)."""

    def forward(self, x_TD: Tensor, mask_T: Tensor | None = None) -> Routing:
        logits_TE = self.compute_logits(x_TD)
        probs_TE = logits_TE.softmax(dim=-1)
        top_vals_TK, top_idx_TK = probs_TE.topk(self.top_k, dim=-1)
        weight_TK = _top_k_renorm(top_vals_TK, self.config.norm_topk_prob)
        return Routing(logits_TE, probs_TE, top_idx_TK.reshape(-1), weight_TK.reshape(-1), self.top_k)


class TopKThenSoftmaxRouter(Router):
    """Top-k of the logits, softmax over the k chosen (GPT-OSS)."""

    def forward(self, x_TD: Tensor, mask_T: Tensor | None = None) -> Routing:
        logits_TE = self.compute_logits(x_TD)
        top_logits_TK, top_idx_TK = logits_TE.topk(self.top_k, dim=-1)
        weight_TK = top_logits_TK.softmax(dim=-1)
        return Routing(
            logits_TE, logits_TE.softmax(-1), top_idx_TK.reshape(-1), weight_TK.reshape(-1), self.top_k
        )


class SwitchRouter(Router):
    """Switch Transformer top-1: weight p_max (not renormalized); multiplicative jitter when training.

    The jitter multiplies a copy of the router's input by U(1 - eps, 1 + eps); the caller's tensor
    and the experts' input are untouched (transformers mutates the input in place).
    """

    def forward(self, x_TD: Tensor, mask_T: Tensor | None = None) -> Routing:
        eps = self.config.jitter_eps
        if self.training and eps > 0:
            dtype = router_dtype(x_TD)
            noise_TD = torch.empty_like(x_TD, dtype=dtype).uniform_(1.0 - eps, 1.0 + eps)
            x_TD = x_TD.to(dtype) * noise_TD
        logits_TE = self.compute_logits(x_TD)
        probs_TE = logits_TE.softmax(dim=-1)
        top_val_T1, top_idx_T1 = probs_TE.max(dim=-1, keepdim=True)
        return Routing(logits_TE, probs_TE, top_idx_T1.reshape(-1), top_val_T1.reshape(-1), 1)


class GShardRouter(Router):
    """GShard top-2: weights g1/(g1+g2), g2/(g1+g2); the 2nd expert is kept with probability
    min(1, 2 * g2) while training ("random routing", applied before capacity as in fairseq)."""

    def forward(self, x_TD: Tensor, mask_T: Tensor | None = None) -> Routing:
        logits_TE = self.compute_logits(x_TD)
        probs_TE = logits_TE.softmax(dim=-1)
        top_vals_T2, top_idx_T2 = probs_TE.topk(2, dim=-1)
        weight_T2 = top_vals_T2 / top_vals_T2.sum(dim=-1, keepdim=True)
        keep_A = None
        if self.training and self.config.random_routing:
            u_T = torch.rand(weight_T2.shape[0], device=weight_T2.device)
            keep_second_T = u_T < (2.0 * weight_T2[:, 1].detach()).clamp(max=1.0)
            keep_A = torch.stack([torch.ones_like(keep_second_T), keep_second_T], dim=1).reshape(-1)
        return Routing(logits_TE, probs_TE, top_idx_T2.reshape(-1), weight_T2.reshape(-1), 2, keep_A=keep_A)


class NoisyTopKRouter(Router):
    """Shazeer et al. 2017 noisy top-k gating.

    H = x Wg + N(0, 1) * softplus(x Wnoise) (noise only while training); keep the top-k of H, softmax
    over them. The smooth load estimate P(x, i) = Phi((x Wg)_i - kth_excluding_i(H)) / std_i) makes
    the load loss differentiable.
    """

    def __init__(self, config: MoEConfig):
        super().__init__(config)
        self.noise = nn.Linear(config.dim, config.num_experts, bias=False)
        nn.init.zeros_(self.noise.weight)  # Shazeer initializes Wg and Wnoise to zero; Wg keeps our init

    def forward(self, x_TD: Tensor, mask_T: Tensor | None = None) -> Routing:
        k, num_experts = self.top_k, self.num_experts
        clean_TE = self.compute_logits(x_TD)
        dtype = clean_TE.dtype
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            std_TE = F.softplus(F.linear(x_TD.to(dtype), self.noise.weight.to(dtype))) + self.config.noise_eps
        noisy = self.training
        logits_TE = clean_TE + torch.randn_like(clean_TE) * std_TE if noisy else clean_TE
        top_vals, top_idx = logits_TE.topk(min(k + 1, num_experts), dim=-1)
        weight_TK = top_vals[:, :k].softmax(dim=-1)
        idx_TK = top_idx[:, :k]
        load_E = None
        if noisy and k < num_experts:
            normal = torch.distributions.Normal(0.0, 1.0)
            threshold_if_in_T1 = top_vals[:, k : k + 1]  # (k+1)-th value: what i must beat if it is in
            threshold_if_out_T1 = top_vals[:, k - 1 : k]  # k-th value: what i must beat to get in
            in_topk_TE = torch.zeros_like(clean_TE, dtype=torch.bool).scatter_(1, idx_TK, True)
            threshold_TE = torch.where(in_topk_TE, threshold_if_in_T1, threshold_if_out_T1)
            prob_TE = normal.cdf((clean_TE - threshold_TE) / std_TE)
            if mask_T is not None:
                prob_TE = prob_TE * mask_T[:, None]
            load_E = prob_TE.sum(dim=0)
        return Routing(
            clean_TE, clean_TE.softmax(-1), idx_TK.reshape(-1), weight_TK.reshape(-1), k, load_E=load_E
        )


class SigmoidBiasRouter(Router):
    """DeepSeek-V3: sigmoid scores; a non-gradient per-expert bias steers the selection only.

    Selection uses s + b (optionally group-limited: experts split into n_group groups, a group scores
    the sum of its top-2, only the best topk_group groups are eligible). The combine weights are the
    unbiased scores of the chosen experts, normalized, times routed_scaling_factor. The trainer calls
    `update_bias(tokens_per_expert)` after the optimizer step: b_i += gamma * sign(mean_load - load_i).
    """

    def __init__(self, config: MoEConfig):
        super().__init__(config)
        self.register_buffer("expert_bias", torch.zeros(config.num_experts, dtype=torch.float32))

    def forward(self, x_TD: Tensor, mask_T: Tensor | None = None) -> Routing:
        cfg = self.config
        logits_TE = self.compute_logits(x_TD)
        scores_TE = logits_TE.sigmoid()
        choice_TE = scores_TE.detach() + self.expert_bias.to(scores_TE.dtype)
        if cfg.n_group > 1:
            num_tokens = choice_TE.shape[0]
            grouped_TGe = choice_TE.view(num_tokens, cfg.n_group, -1)
            top_in_group = min(2, grouped_TGe.shape[-1])
            group_score_TG = grouped_TGe.topk(top_in_group, dim=-1).values.sum(dim=-1)
            group_idx = group_score_TG.topk(cfg.topk_group, dim=-1).indices
            group_mask_TG = torch.zeros_like(group_score_TG, dtype=torch.bool).scatter_(1, group_idx, True)
            expert_mask_TE = group_mask_TG.repeat_interleave(grouped_TGe.shape[-1], dim=1)
            choice_TE = choice_TE.masked_fill(~expert_mask_TE, float("-inf"))
        idx_TK = choice_TE.topk(self.top_k, dim=-1).indices
        weight_TK = scores_TE.gather(1, idx_TK)
        if cfg.norm_topk_prob:
            weight_TK = weight_TK / (weight_TK.sum(dim=-1, keepdim=True) + 1e-20)
        weight_TK = weight_TK * cfg.routed_scaling_factor
        probs_TE = scores_TE / scores_TE.sum(dim=-1, keepdim=True)
        return Routing(logits_TE, probs_TE, idx_TK.reshape(-1), weight_TK.reshape(-1), self.top_k)

    @torch.no_grad()
    def update_bias(self, tokens_per_expert_E: Tensor) -> None:
        load_E = tokens_per_expert_E.to(self.expert_bias.device, torch.float32)
        self.expert_bias += self.config.bias_update_rate * torch.sign(load_E.mean() - load_E)


class ExpertChoiceRouter(Router):
    """Zhou et al. 2022: every expert takes its top-C tokens by router probability.

    C = ceil(cf * T / E) with cf the active capacity factor (train or eval; top_k when unset), at
    most T. Balanced by construction; a token may get 0..E experts. Looks at the whole batch, so it
    is refused in causal models unless the config explicitly allows it.
    """

    def forward(self, x_TD: Tensor, mask_T: Tensor | None = None) -> Routing:
        logits_TE = self.compute_logits(x_TD)
        probs_TE = logits_TE.softmax(dim=-1)
        num_tokens, num_experts = probs_TE.shape
        cf = self.config.active_capacity_factor(self.training)
        cf = self.top_k if cf is None else cf
        capacity = min(num_tokens, max(1, math.ceil(cf * num_tokens / num_experts)))
        eligible_TE = probs_TE.detach()
        if mask_T is not None:  # padding is picked last and then marked not kept
            eligible_TE = eligible_TE.masked_fill(~mask_T[:, None], -1.0)
        token_idx_EC = eligible_TE.t().topk(capacity, dim=-1).indices  # [E, C]
        token_idx_A = token_idx_EC.reshape(-1)
        expert_idx_A = torch.arange(num_experts, device=x_TD.device).repeat_interleave(capacity)
        weight_A = probs_TE[token_idx_A, expert_idx_A]
        keep_A = None if mask_T is None else mask_T[token_idx_A]
        return Routing(logits_TE, probs_TE, expert_idx_A, weight_A, 0, token_idx_A=token_idx_A, keep_A=keep_A)


class TaskRouter(Router):
    """Task-level routing (Task-MoE, Kudugunta et al. 2021): every token goes to its task's experts.

    The gate reads a one-hot task vector instead of the token: `logits = W[:, task] (+ b)`, a learned
    [E, num_tasks] table (`gate.weight`), optionally restricted to a fixed task -> experts table
    (`MoEConfig.task_experts`; other experts get -inf). A task's top-k experts get the softmax of
    their logits as combine weights (GPT-OSS order: top-k, then softmax over the chosen). Since the
    choice depends on the task only, a trained task's experts are fixed and can be cut out into a
    smaller standalone model (`moekit extract`). `task_T` may be omitted when num_tasks == 1.
    """

    uses_task_ids = True  # MoE.forward passes the tokens' task ids to routers that set this

    def __init__(self, config: MoEConfig):
        super().__init__(config)
        self.gate = nn.Linear(config.num_tasks, config.num_experts, bias=config.router_bias)
        allowed_SE = torch.ones(config.num_tasks, config.num_experts, dtype=torch.bool)
        if config.task_experts is not None:
            allowed_SE.zero_()
            for task, experts in enumerate(config.task_experts):
                allowed_SE[task, list(experts)] = True
        self.register_buffer("allowed_SE", allowed_SE, persistent=False)  # rebuilt from the config
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # std = router_init_scale: distinct random task preferences from the start, like a random
        # assignment of tasks to experts that training then refines (the input is one-hot, not x).
        nn.init.normal_(self.gate.weight, std=self.config.router_init_scale)
        if self.gate.bias is not None:
            nn.init.zeros_(self.gate.bias)

    def task_logits(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """[num_tasks, E] logits of every task (-inf outside its allowed experts)."""
        table_SE = self.gate.weight.t().to(dtype)
        if self.gate.bias is not None:
            table_SE = table_SE + self.gate.bias.to(dtype)
        return table_SE.masked_fill(~self.allowed_SE, float("-inf"))

    def task_experts(self, task: int) -> list[int]:
        """The experts task `task` is routed to, in increasing index order."""
        return sorted(self.task_logits()[task].topk(self.top_k).indices.tolist())

    def forward(self, x_TD: Tensor, mask_T: Tensor | None = None, task_T: Tensor | None = None) -> Routing:
        num_tasks = self.config.num_tasks
        if task_T is None:
            if num_tasks != 1:
                raise ValueError(
                    f"router='task' with num_tasks={num_tasks} needs task ids: pass task_ids=[B] "
                    "(the task of every sequence) to the model or layer"
                )
            task_T = torch.zeros(x_TD.shape[0], dtype=torch.long, device=x_TD.device)
        if task_T.numel() and (int(task_T.min()) < 0 or int(task_T.max()) >= num_tasks):
            bad = task_T[(task_T < 0) | (task_T >= num_tasks)][0].item()
            raise ValueError(f"task id {bad} is out of range: expected 0 <= task < num_tasks={num_tasks}")
        logits_TE = self.task_logits(router_dtype(x_TD))[task_T.long()]  # [T, E]
        top_logits_TK, top_idx_TK = logits_TE.topk(self.top_k, dim=-1)
        weight_TK = top_logits_TK.softmax(dim=-1)
        return Routing(
            logits_TE, logits_TE.softmax(-1), top_idx_TK.reshape(-1), weight_TK.reshape(-1), self.top_k
        )


ROUTER_CLASSES: dict[str, type[Router]] = {
    "topk": TopKRouter,
    "topk_then_softmax": TopKThenSoftmaxRouter,
    "switch": SwitchRouter,
    "gshard": GShardRouter,
    "noisy_topk": NoisyTopKRouter,
    "sigmoid_bias": SigmoidBiasRouter,
    "expert_choice": ExpertChoiceRouter,
    "task": TaskRouter,
}


def build_router(config: MoEConfig) -> Router:
    """The router named by `config.router`."""
    if config.router not in ROUTER_CLASSES:
        raise ValueError(f"unknown router {config.router!r}: expected one of {sorted(ROUTER_CLASSES)}")
    return ROUTER_CLASSES[config.router](config)
