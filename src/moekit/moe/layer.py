"""The sparse MoE layer: route -> dispatch -> experts -> combine (+ shared experts), with its losses.

Follow one token through `MoE.forward`:
  1. the router scores it against every expert (float32) and picks its experts and weights;
  2. the dispatcher sorts all assignments by expert, drops those past capacity, and gathers the
     kept tokens into contiguous per-expert groups;
  3. the expert bank runs each group through its expert with grouped matrix products;
  4. the combine scales each result by its routing weight and sums it into the token's output;
  5. shared experts, if any, add their output for every token.
Losses and statistics of the call come back in the `MoEOutput`; nothing is kept in globals.

Shape legend: T tokens, D model dim, E experts, K experts per token, A assignments, N kept rows.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules import module as torch_module

from moekit.moe import losses as L
from moekit.moe import native
from moekit.moe.config import MoEConfig
from moekit.moe.dispatch import LocalDispatcher, capacity_keep_mask, priority_order
from moekit.moe.experts import ExpertBank, HierarchicalExperts, SharedExperts
from moekit.moe.router import Routing, TopKRouter, build_router


class _ReadOnce:
    """An attribute kept in `slot` as its value, or as a function giving it that the first read calls
    (and replaces by its value)."""

    def __init__(self, slot: str):
        self.slot = slot

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        value = getattr(obj, self.slot)
        if callable(value):
            value = value()
            setattr(obj, self.slot, value)
        return value


class MoEStats:
    """Routing statistics of one call (detached tensors; no host sync needed to build them).

    The counts come from the dispatch; the derived statistics (dropped fraction, router entropy,
    max load violation) are computed when first read, so a decode step that never looks at them
    does not pay their dozen small ops. Pass them explicitly (e.g. reduced over ranks) to skip that.
    The counts themselves may be given as functions computing them when first read (a decode step).
    """

    def __init__(
        self,
        # [E] assignments each expert computed (after capacity)
        tokens_per_expert: Tensor | Callable[[], Tensor],
        # [E] assignments routed to each expert (before capacity): the load
        routed_per_expert: Tensor | Callable[[], Tensor],
        dropped_fraction: Tensor | None = None,  # share of routed assignments dropped by capacity
        router_entropy: Tensor | None = None,  # mean entropy (nats) of the router over real tokens
        max_load_violation: Tensor | None = None,  # max load / mean load - 1 (0 = perfectly balanced)
        *,
        probs_TE: Tensor | None = None,  # router probabilities, for the entropy when not given
        mask_T: Tensor | None = None,
    ):
        if router_entropy is None and probs_TE is None:
            raise ValueError("MoEStats needs router_entropy or the router probabilities probs_TE")
        self._kept, self._routed = tokens_per_expert, routed_per_expert
        self._dropped, self._entropy, self._violation = dropped_fraction, router_entropy, max_load_violation
        self._probs_TE = probs_TE.detach() if probs_TE is not None and probs_TE.requires_grad else probs_TE
        self._mask_T = mask_T

    tokens_per_expert = _ReadOnce("_kept")  # Tensor [E]
    routed_per_expert = _ReadOnce("_routed")  # Tensor [E]

    @property
    def dropped_fraction(self) -> Tensor:
        if self._dropped is None:
            with torch.no_grad():
                total = self.routed_per_expert.sum()  # (0 / 1 = 0 when nothing was routed)
                self._dropped = (total - self.tokens_per_expert.sum()) / total.clamp_min(1.0)
        return self._dropped

    @property
    def router_entropy(self) -> Tensor:
        if self._entropy is None:
            with torch.no_grad():
                self._entropy = L.router_entropy(self._probs_TE, self._mask_T)
            self._probs_TE = self._mask_T = None
        return self._entropy

    @property
    def max_load_violation(self) -> Tensor:
        if self._violation is None:
            with torch.no_grad():
                self._violation = L.max_load_violation(self.routed_per_expert)
        return self._violation

    def to_dict(self) -> dict[str, Any]:
        return {
            "tokens_per_expert": self.tokens_per_expert.tolist(),
            "routed_per_expert": self.routed_per_expert.tolist(),
            "dropped_fraction": float(self.dropped_fraction),
            "router_entropy": float(self.router_entropy),
            "max_load_violation": float(self.max_load_violation),
        }


class MoEOutput:
    """What one MoE call returns: the output, its losses, statistics and router logits.

        output        [..., D], same shape and dtype as the input
        aux_loss      balance losses times their coefficients, summed (float32 scalar)
        z_loss        router z-loss times its coefficient (float32 scalar)
        stats         MoEStats
        losses        every loss unweighted: load_balance, z, importance, load, seq_balance
        router_logits [T, E] float32 raw router logits (pooled losses, HF interop)

    When the call ran with autograd recording, the losses were computed in it (they carry the graph
    to the router). Without autograd (inference) nothing can be backpropagated, so they are computed
    when first read: a decode step that never reads them skips their ops; the values are the same.
    """

    __slots__ = ("output", "_stats", "_router_logits", "_compute_losses", "_losses")

    def __init__(
        self,
        output: Tensor,
        stats: MoEStats | Callable[[], MoEStats],  # (stats and logits: or a function giving them
        router_logits: Tensor | Callable[[], Tensor] | None,  # when first read)
        compute_losses: Callable[[], tuple[dict[str, Tensor], Tensor, Tensor]],
    ):
        self.output, self._stats, self._router_logits = output, stats, router_logits
        self._compute_losses, self._losses = compute_losses, None
        if torch.is_grad_enabled():
            self._read()

    stats = _ReadOnce("_stats")  # MoEStats
    router_logits = _ReadOnce("_router_logits")  # Tensor [T, E] | None

    def _read(self) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        if self._losses is None:
            self._losses, self._compute_losses = self._compute_losses(), None
        return self._losses

    @property
    def losses(self) -> dict[str, Tensor]:
        return self._read()[0]

    @property
    def aux_loss(self) -> Tensor:
        return self._read()[1]

    @property
    def z_loss(self) -> Tensor:
        return self._read()[2]

    def __iter__(self):  # unpacks like the named tuple it once was
        return iter((self.output, self.aux_loss, self.z_loss, self.stats, self.losses, self.router_logits))


class MoE(nn.Module):
    """A sparse Mixture-of-Experts feed-forward layer mapping [..., dim] -> [..., dim].

    Build it from a config or keyword arguments:
        MoE(MoEConfig(dim=512, hidden_dim=1408, num_experts=8, top_k=2))
        MoE(512, 1408, 8, 2, router="switch", capacity_factor=1.25)
    Components are attributes you may swap: `router`, `dispatcher`, `experts`, `shared`.
    """

    def __init__(
        self,
        dim: int | MoEConfig | None = None,
        hidden_dim: int | None = None,
        num_experts: int | None = None,
        top_k: int = 2,
        *,
        config: MoEConfig | None = None,
        dispatcher: Any = None,
        **kwargs: Any,
    ):
        super().__init__()
        if isinstance(dim, MoEConfig):
            config, dim = dim, None
        if config is None:
            if dim is None or hidden_dim is None or num_experts is None:
                raise ValueError("MoE needs a MoEConfig or dim, hidden_dim and num_experts")
            config = MoEConfig(dim=dim, hidden_dim=hidden_dim, num_experts=num_experts, top_k=top_k, **kwargs)
        elif kwargs or hidden_dim is not None or num_experts is not None:
            raise ValueError("pass either a MoEConfig or keyword arguments, not both")
        self.config = config
        self.router = build_router(config)
        self.dispatcher = dispatcher if dispatcher is not None else LocalDispatcher()
        self.experts: nn.Module = (
            HierarchicalExperts(config) if config.inner is not None else ExpertBank.from_config(config)
        )
        self.shared = SharedExperts(config) if config.num_shared_experts > 0 else None
        # Data parallel: (layer, losses, x, routing, real_A, mask_T) -> the losses of the batch of all
        # ranks (moekit.parallel.GlobalLosses, installed by shard_model); None: this call's batch.
        self.loss_reduction: Callable[..., dict[str, Tensor]] | None = None

    # ------------------------------------------------------------------ forward
    def __call__(self, *args: Any, **kwargs: Any) -> MoEOutput:
        """nn.Module's call (hooks, a compiled forward), except for a decode-size inference call on
        [T, D] that nothing hooks: that one goes straight to the native call (`_native_inference`;
        where the C++ call was built, its guards and the kernel in that one call). On caches flushed
        by the other layers of a decode step, nn.Module's call and forward's checks around the native
        call cost as much as reading a small expert's weights."""
        if len(args) == 1 and not kwargs:
            x = args[0]
            out = self._direct(x)
            if out is not None:
                return out
            if not _has_hooks(self, call=True):
                native_out = self._native_inference(x) if isinstance(x, Tensor) and x.ndim == 2 else None
                if native_out is not None:
                    return self._native_output(x, *native_out)
        return super().__call__(*args, **kwargs)

    def forward(self, x: Tensor, mask: Tensor | None = None, task_ids: Tensor | None = None) -> MoEOutput:
        """x [..., D]; mask [...] (True = real token); task_ids: the task of every sequence, a leading
        part of x's shape (e.g. [B] for x [B, S, D]), read only by task routers (router='task')."""
        cfg = self.config
        x_TD, mask_T = self._check_input(x, mask)

        # 1. route (decode-size inference behind a top-k softmax router: 1.-4. in one native call)
        native_out = self._native_inference(x_TD) if mask_T is None else None
        if native_out is not None:
            return self._native_output(x, *native_out)
        if getattr(self.router, "uses_task_ids", False):
            routing = self.router(x_TD, mask_T, _task_of_tokens(task_ids, x))
        else:
            routing = self.router(x_TD, mask_T)
        # assignments of real (non-padding) tokens
        real_A = None if mask_T is None else mask_T[routing.token_index()]
        valid_A = _and(real_A, routing.keep_A)

        # 2. dispatch (with capacity for token-choice routers; expert choice has its own)
        capacity, order_A = None, None
        routed_E = None  # load before capacity, when capacity is applied per group below
        if routing.top_k > 0:
            num_real = x_TD.shape[0] if mask_T is None else int(mask_T.sum())
            num_groups = math.prod(x.shape[:-2]) if cfg.capacity_group == "sequence" and x.ndim >= 3 else 1
            if num_groups > 1:  # capacity per sequence: C slots per expert in every row (HF Switch)
                num_assignments = math.ceil(num_real / num_groups) * routing.top_k
            else:
                num_assignments = num_real * routing.top_k
            capacity = cfg.capacity(num_assignments, self.training)
            if capacity is not None and num_groups == 1:
                # One batch-wide capacity is shared by every process feeding the same experts (EP).
                capacity = cfg.capacity(self.dispatcher.group_assignments(num_assignments), self.training)
            if capacity is not None:
                order_A = priority_order(routing, cfg.drop_policy)
            if capacity is not None and num_groups > 1:
                group_A = routing.token_index() // x.shape[-2]  # [A] sequence of each assignment
                routed_E = L.expert_counts(routing.expert_idx_A, valid_A, cfg.num_experts)
                valid_A = capacity_keep_mask(
                    routing.expert_idx_A, group_A, valid_A, cfg.num_experts, num_groups, capacity, order_A
                )
                capacity, order_A = None, None
        inner_aux = inner_z = None
        # 2.-4. straight from the routing where a path serves: a GPU's grouped products on the
        # device, or decode-size inference
        straight = self._straight(x_TD, routing) if self._dropless_local(routing, valid_A, capacity) else None
        if straight is not None:
            out_TD, routed_E = straight
            kept_E = routed_E
        elif self._fused_local():
            # 2.-4. on one process, gather, experts and combine run fused block by block (with their
            # own backward): no [N, D] copy of the routed rows, outputs or gradients is ever made
            _, counts, state = self.dispatcher.dispatch(
                x_TD, routing, valid_A, capacity, order_A, cfg.num_experts, gather=False
            )
            out_TD = self.experts.forward_tokens(x_TD, state.token_N, state.weight_N, counts)
            routed_E, kept_E = state.routed_E if routed_E is None else routed_E, state.kept_E
        else:
            x_ND, counts, state = self.dispatcher.dispatch(
                x_TD, routing, valid_A, capacity, order_A, cfg.num_experts
            )

            # 3. experts
            expert_out = self.experts(x_ND, counts)
            if isinstance(expert_out, tuple):  # hierarchical experts also return their inner losses
                y_ND, inner_aux, inner_z = expert_out
            else:
                y_ND = expert_out

            # 4. combine
            out_TD = self.dispatcher.combine(y_ND, state)
            routed_E, kept_E = state.routed_E if routed_E is None else routed_E, state.kept_E

        return self._output(x, x_TD, out_TD, routing, routed_E, kept_E, real_A, mask_T, inner_aux, inner_z)

    def _output(
        self,
        x: Tensor,
        x_TD: Tensor,
        out_TD: Tensor,
        routing: Routing,
        routed_E: Tensor | None,
        kept_E: Tensor | None,
        real_A: Tensor | None,
        mask_T: Tensor | None,
        inner_aux: Tensor | None = None,
        inner_z: Tensor | None = None,
    ) -> MoEOutput:
        """Step 5 (the shared experts) and the output: the routing's statistics, and its losses
        (computed when read without autograd). Without counts (routed_E, kept_E None: inference
        straight from the routing, every assignment computed) the statistics are computed when read
        too. (A native call's output: `_native_output`.)"""
        if self.shared is not None:
            out_TD = out_TD + self.shared(x_TD)
        compute_losses = functools.partial(self._aux_losses, x, routing, real_A, mask_T, inner_aux, inner_z)
        out = out_TD if x.ndim == 2 else out_TD.view(x.shape)
        if routed_E is None or kept_E is None:
            stats = lambda: self._stats(routing, None, None, None)  # noqa: E731
            return MoEOutput(out, stats, routing.logits_TE, compute_losses)
        return MoEOutput(
            out, self._stats(routing, routed_E, kept_E, mask_T), routing.logits_TE, compute_losses
        )

    def _aux_losses(
        self,
        x: Tensor,
        routing: Routing,
        real_A: Tensor | None,
        mask_T: Tensor | None,
        inner_aux: Tensor | None = None,
        inner_z: Tensor | None = None,
    ) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        """(every loss unweighted, the balance losses weighted and summed, the weighted z-loss)."""
        cfg = self.config
        losses = self._losses(x, routing, real_A, mask_T)
        if self.loss_reduction is not None:
            losses = self.loss_reduction(self, losses, x, routing, real_A, mask_T)
        aux_loss = _weighted_sum(
            (cfg.load_balance_coef, losses["load_balance"]),
            (cfg.importance_coef, losses["importance"]),
            (cfg.load_coef, losses["load"]),
            (cfg.seq_balance_coef, losses["seq_balance"]),
        )
        z_loss = cfg.z_loss_coef * losses["z"]
        if inner_aux is not None:
            aux_loss, z_loss = aux_loss + inner_aux, z_loss + inner_z
        return losses, aux_loss, z_loss

    def forward_one_token(self, x_1D: Tensor) -> Tensor | None:
        """Steps 1-5 for one token without autograd (a decode step) -> [1, D], or None where the
        general path is needed (capacity, expert choice, task routing, another dispatcher or expert
        bank). The output of `forward`, without its losses and statistics."""
        out = self._direct(x_1D)
        if out is not None:
            return out.output
        if torch.is_grad_enabled() or getattr(self.router, "uses_task_ids", False):
            return None
        native_out = self._native_inference(x_1D)
        if native_out is not None:
            out_1D = native_out[0]
            return out_1D if self.shared is None else out_1D + self.shared(x_1D)
        routing = self.router(x_1D)
        capacity = self.config.capacity(routing.top_k, self.training) if routing.top_k > 0 else None
        straight = (
            self._straight(x_1D, routing) if self._dropless_local(routing, routing.keep_A, capacity) else None
        )
        if straight is None:
            return None
        return straight[0] if self.shared is None else straight[0] + self.shared(x_1D)

    def _direct(self, x: Tensor) -> MoEOutput | None:
        """The whole call on x [T, D] by the prepared C++ call (native.TopKLayer.fast, shared experts
        added after it), or None: no such call, one of its guards fails, or the layer's call does
        more than forward (hooks: not prepared direct). (torch.compile traces the layer's forward:
        dynamo reads is_dynamo_compiling() as True; other tracers' tensors are not plain CPU tensors,
        which the call turns away.)"""
        call = self.__dict__.get("_native_call")
        fast = None if call is None else call.fast
        if fast is None or _is_dynamo_compiling():
            return None
        out = fast(self, x)
        if out is not None:
            shared = self._modules.get("shared")
            if shared is not None:
                out.output = out.output + shared(x)
        return out

    def _native_inference(self, x_TD: Tensor) -> tuple[Tensor, native.KernelRouting, int] | None:
        """Steps 1-4 of an inference call in one native call (native.TopKLayer), where they can run
        there: no autograd, no capacity, the top-k softmax router (float32, no hooks: analysis and
        calibration hook the router's output) and the fused local expert bank, at the kernel's batch
        sizes -> (out [T, D], the kernel's routing, top_k); None otherwise. Its routing is the
        router's own, computed in C (the same decisions and weights up to float32 rounding), and
        copied out of the kernel's buffers when first read (native.KernelRouting).

        The call is prepared once and kept (a plain attribute; copies and pickles drop it) with the
        guards of what it was prepared for (`_native_guards`); a call whose guards no longer hold
        is prepared again. A decode step runs every other layer between two calls of this one, and
        their weights flush the caches: each Python and torch step of checking and building the
        call then misses on torch's code and data (see docs/benchmarks.md)."""
        if not x_TD.is_cpu or torch.is_grad_enabled() or torch.compiler.is_compiling():
            return None  # (the kernels are the CPU's; traced tensors have no memory)
        call = self.__dict__.get("_native_call")
        if call is None or not call.holds(self, x_TD):
            call = self._prepare_native(x_TD)
            self.__dict__["_native_call"] = call
        result = call(x_TD)
        return None if result is None else (*result, call.top_k)

    def _native_guards(self) -> native.Guards:
        """What `_prepare_native` reads, as it is now: the submodules (the objects: a replaced one
        prepares again), the dispatcher, the training flags, the hooks (how many the layer, the
        router and torch's globals have), a compiled forward, the config (the object and its count of
        field assignments: one number instead of every field), the router's and bank's settings and
        parameters, and the memory of the tensors the call reads (a parameter moved or converted
        has new memory). On the caches a decode step flushes, each guard costs a few cache misses."""
        modules, attrs = self._modules, self.__dict__
        router, experts = modules["router"], modules["experts"]
        hooks = (
            torch_module._global_forward_hooks,
            torch_module._global_forward_pre_hooks,
            torch_module._global_backward_hooks,
            torch_module._global_backward_pre_hooks,
            *(getattr(m, name) for m in (self, router) for name in _HOOKS),
        )
        same = [
            *native.same(modules, *modules),
            *native.same(attrs, "dispatcher", "training", "config", "_compiled_call_impl", holder=True),
            *native.same(self.config.__dict__, "_assignments"),
        ]
        sizes = [(modules, len(modules)), *((d, len(d)) for d in hooks)]
        if type(router) is not TopKRouter or type(experts) is not ExpertBank:
            return native.Guards(tuple(same), tuple(sizes))
        gate = router._modules["gate"]
        params = experts._parameters
        dropout = experts._modules["dropout"]
        same += [
            *native.same(router.__dict__, "top_k"),
            *native.same(router._modules, "gate"),
            *native.same(gate._parameters, "weight", "bias"),
            *native.same(experts.__dict__, "strategy", "activation", "is_glu"),
            *native.same(experts._modules, "dropout"),
            *native.same(dropout.__dict__, "training"),
            *native.same(params, *params),
        ]
        sizes += [(params, len(params))]
        tensors = tuple(t for t in (gate.weight, gate.bias, *params.values()) if t is not None)
        return native.Guards(tuple(same), tuple(sizes), tensors)

    def _prepare_native(self, x_TD: Tensor) -> native.TopKLayer:
        """The native call for x_TD and the layer as it is; one that answers None where it cannot run."""
        router, experts = self.router, self.experts
        guards = self._native_guards()
        if not (
            x_TD.ndim == 2
            and x_TD.shape[1] == self.config.dim
            and type(router) is TopKRouter
            and self.config.router_dtype == "float32"
            and self.config.capacity(1, self.training) is None
            and not _has_hooks(router)
            and self._fused_local()
        ):
            return native.TopKLayer.declined(x_TD, guards)
        gate_ED, bias_E = router.gate.weight, router.gate.bias
        top_k, renormalize = router.top_k, self.config.norm_topk_prob
        bank = experts._native_bank()
        direct = None if _has_hooks(self, call=True) else _NativeOutput
        return native.TopKLayer(
            x_TD, gate_ED, bias_E, top_k, renormalize, bank, experts.strategy, guards, direct
        )

    def _native_output(
        self, x: Tensor, out_TD: Tensor, kernel_routing: native.KernelRouting, top_k: int
    ) -> MoEOutput:
        """Step 5 and the output of a native call on x [..., D]: its routing, statistics and losses
        computed when read (`_NativeOutput`)."""
        flat = x.ndim == 2
        shared = self._modules.get("shared")
        if shared is not None:
            out_TD = out_TD + shared(x if flat else x.reshape(-1, x.shape[-1]))
        return _NativeOutput(out_TD if flat else out_TD.view(x.shape), self, x, kernel_routing, top_k)

    def _straight(self, x_TD: Tensor, routing: Routing) -> tuple[Tensor, Tensor | None] | None:
        """Steps 2-4 straight from a dropless routing, where a path serves -> (out [T, D],
        assignments per expert, or None: counted when read), else None. On a GPU the device's
        grouped products (ExpertBank.forward_device: no host sync, with autograd); for inference
        the decode-size paths (ExpertBank.forward_routed: one token, or the native kernel's sizes)."""
        device_out = self.experts.forward_device(x_TD, routing.expert_idx_A, routing.weight_A, routing.top_k)
        if device_out is not None:
            return device_out
        if torch.is_grad_enabled():
            return None
        out_TD = self.experts.forward_routed(x_TD, routing.expert_idx_A, routing.weight_A, routing.top_k)
        return None if out_TD is None else (out_TD, None)

    def _dropless_local(self, routing: Routing, valid_A: Tensor | None, capacity: int | None) -> bool:
        """Whether steps 2-4 may go straight from the routing (ExpertBank.forward_device on a GPU,
        forward_routed for inference): a token-choice routing whose every assignment counts (no
        padding mask, no random drop, no capacity: `valid_A` None), and the fused local bank."""
        return (
            valid_A is None
            and capacity is None
            and routing.top_k > 0
            and routing.token_idx_A is None
            and self._fused_local()
        )

    def _fused_local(self) -> bool:
        """Whether steps 2-4 run fused: local dispatch and an expert bank without active dropout."""
        return (
            type(self.dispatcher) is LocalDispatcher
            and isinstance(self.experts, ExpertBank)
            and not self.experts.dropout_active()
        )

    def _check_input(self, x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        # (attribute reads where they do: a decode step's layer call is a few dozen steps, each a
        # trip through torch's bindings, and every one counts when the caches were flushed)
        if not torch.is_tensor(x) or not x.dtype.is_floating_point:
            dtype = getattr(x, "dtype", type(x).__name__)
            raise ValueError(f"MoE input must be a floating-point tensor, got {dtype}")
        if x.ndim < 1 or x.shape[-1] != self.config.dim:
            raise ValueError(f"MoE input has shape {tuple(x.shape)}: expected [..., dim={self.config.dim}]")
        x_TD = x if x.ndim == 2 else x.reshape(-1, self.config.dim)
        if mask is None:
            return x_TD, None
        if tuple(mask.shape) != tuple(x.shape[:-1]):
            raise ValueError(
                f"mask has shape {tuple(mask.shape)}: expected the input's leading shape {tuple(x.shape[:-1])}"
            )
        return x_TD, mask.reshape(-1).to(torch.bool)

    def _losses(
        self, x: Tensor, routing: Routing, real_A: Tensor | None, mask_T: Tensor | None
    ) -> dict[str, Tensor]:
        cfg, num_experts = self.config, self.config.num_experts
        zero = routing.logits_TE.new_zeros(())
        # f_i counts every selection of a real token, before random routing or capacity drops.
        selected_E = L.expert_counts(routing.expert_idx_A, real_A, num_experts)
        losses = {
            "load_balance": L.switch_load_balance_loss(routing.probs_TE, selected_E, mask_T),
            "z": L.router_z_loss(routing.logits_TE, mask_T),
            "importance": zero,
            "load": zero,
            "seq_balance": zero,
        }
        if cfg.importance_coef > 0:
            losses["importance"] = L.importance_loss(
                routing.weight_A, routing.expert_idx_A, real_A, num_experts
            )
        if cfg.load_coef > 0:
            losses["load"] = L.load_loss(routing.load_E if routing.load_E is not None else selected_E)
        if cfg.seq_balance_coef > 0:
            num_sequences = math.prod(x.shape[:-2]) if x.ndim >= 3 else 1
            losses["seq_balance"] = L.sequence_balance_loss(
                routing.probs_TE, routing.expert_idx_A, routing.token_index(), num_sequences, mask_T
            )
        return losses

    def _stats(
        self, routing: Routing, routed_E: Tensor | None, kept_E: Tensor | None, mask_T: Tensor | None
    ) -> MoEStats:
        """The call's statistics; without counts, every assignment of the routing counts."""
        if routed_E is None or kept_E is None:
            routed_E = kept_E = L.expert_counts(routing.expert_idx_A, None, self.config.num_experts)
        return MoEStats(kept_E.detach(), routed_E.detach(), probs_TE=routing.probs_TE, mask_T=mask_T)

    # ------------------------------------------------------------------ training hooks
    def update_bias(self, tokens_per_expert_E: Tensor) -> None:
        """Aux-loss-free balancing: call after the optimizer step with the routed load
        (`stats.routed_per_expert`, summed over accumulation steps). No-op for other routers."""
        self.router.update_bias(tokens_per_expert_E)

    def extra_repr(self) -> str:
        c = self.config
        cf = "dropless" if c.capacity_factor is None else f"capacity_factor={c.capacity_factor}"
        if c.expert_capacity is not None:
            cf = f"expert_capacity={c.expert_capacity} per {c.capacity_group}"
        return f"dim={c.dim}, hidden_dim={c.hidden_dim}, experts={c.num_experts}, top_k={c.top_k}, router={c.router}, {cf}"


def _weighted_sum(*terms: tuple[float, Tensor]) -> Tensor:
    """sum of coef * loss over the terms with a non-zero coefficient (a float32 zero if none)."""
    total = None
    for coef, loss in terms:
        if coef:
            total = coef * loss if total is None else total + coef * loss
    return terms[0][1].new_zeros(()) if total is None else total


def _task_of_tokens(task_ids: Tensor | None, x: Tensor) -> Tensor | None:
    """[T] task of every token from the task of every sequence (a leading part of x's shape)."""
    if task_ids is None:
        return None
    lead = tuple(x.shape[:-1])
    if tuple(task_ids.shape) != lead[: task_ids.ndim]:
        raise ValueError(
            f"task_ids has shape {tuple(task_ids.shape)}: expected a leading part of the input's "
            f"shape {lead}, e.g. [B] for [B, S, D]"
        )
    view = task_ids.reshape(*task_ids.shape, *([1] * (len(lead) - task_ids.ndim)))
    return view.expand(lead).reshape(-1)


class _NativeOutput(MoEOutput):
    """A native call's output: its Routing (the tensors copied out of the kernel's buffers),
    statistics, router logits and losses computed when first read. One object built in one step: on
    the flushed caches of a decode step, each closure, cell or frame a call builds costs
    microseconds. (The C++ call, csrc/decode.cpp, fills in a new one's slots as __init__ does:
    output, _layer, _x, _kernel_routing and _top_k given, the others None.)"""

    __slots__ = ("_layer", "_x", "_kernel_routing", "_top_k", "_routing")

    def __init__(
        self, output: Tensor, layer: MoE, x: Tensor, kernel_routing: native.KernelRouting, top_k: int
    ):
        self.output, self._layer, self._x = output, layer, x
        self._kernel_routing, self._top_k = kernel_routing, top_k
        self._routing = self._stats = self._router_logits = self._compute_losses = self._losses = None

    def routing(self) -> Routing:
        if self._routing is None:
            self._routing = Routing(*self._kernel_routing.tensors(), self._top_k)
        return self._routing

    @property
    def stats(self) -> MoEStats:  # type: ignore[override]
        if self._stats is None:
            self._stats = self._layer._stats(self.routing(), None, None, None)
        return self._stats

    @property
    def router_logits(self) -> Tensor:  # type: ignore[override]
        return self.routing().logits_TE

    def _read(self) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        if self._losses is None:
            self._losses = self._layer._aux_losses(self._x, self.routing(), None, None)
        return self._losses


# (dynamo reads it as True while it traces, by the function's identity: bound here, a decode step's
# call skips two attribute lookups on cold caches)
_is_dynamo_compiling = torch.compiler.is_dynamo_compiling

# nn.Module's hook dicts that `_has_hooks` reads
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _has_hooks(module: nn.Module, call: bool = False) -> bool:
    """Whether calling `module` runs forward hooks, its own or global ones (torch's own test); with
    `call`, whether nn.Module's call does anything but call forward (backward hooks too, or a
    compiled forward: Module.compile)."""
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or torch_module._global_forward_hooks
        or torch_module._global_forward_pre_hooks
        or (
            call
            and (
                module._backward_hooks
                or module._backward_pre_hooks
                or torch_module._global_backward_hooks
                or torch_module._global_backward_pre_hooks
                or module._compiled_call_impl is not None
            )
        )
    )


def _and(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None:
        return b
    if b is None:
        return a
    return a & b
