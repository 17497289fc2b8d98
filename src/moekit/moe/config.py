"""MoEConfig: every knob of one sparse MoE layer, validated at construction.

One small dataclass so that a layer can be described in TOML/JSON, saved next to a checkpoint and
rebuilt exactly. Validation happens here, once, with errors that name the field, the value and
what is allowed, so a typo fails before any tensor is allocated.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

ROUTERS = (
    "topk",  # softmax, then top-k (Mixtral, Qwen, OLMoE)
    "topk_then_softmax",  # top-k of logits, softmax over the chosen (GPT-OSS)
    "switch",  # top-1 with input jitter (Switch Transformer)
    "gshard",  # top-2 with random routing of the second expert (GShard)
    "noisy_topk",  # Shazeer 2017 noisy gating with learned noise scale
    "sigmoid_bias",  # sigmoid scores + non-gradient bias, aux-loss-free balancing (DeepSeek-V3)
    "expert_choice",  # each expert picks its top-C tokens (Zhou 2022)
    "task",  # a whole sequence goes to its task's experts, given task ids (Task-MoE, Kudugunta 2021)
)
ACTIVATIONS = ("swiglu", "geglu", "relu", "gelu", "silu", "gpt_oss")
GLU_ACTIVATIONS = ("swiglu", "geglu", "gpt_oss")
DROP_POLICIES = ("position", "probability")
ROUTER_DTYPES = ("float32", "bfloat16")
CAPACITY_GROUPS = ("batch", "sequence")


def _fail(name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"MoEConfig.{name}={value!r} is invalid: expected {allowed}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # True is an int to Python, not a count


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class MoEConfig:
    """Configuration of one MoE layer. `MoE(config)` or `MoE(dim=..., ...)` builds it."""

    dim: int
    hidden_dim: int
    num_experts: int
    top_k: int = 2

    # --- router ---
    router: str = "topk"
    norm_topk_prob: bool = True  # renormalize the k chosen weights to sum 1 (softmax routers)
    router_bias: bool = False  # a learned bias on the router logits (GPT-OSS)
    router_init_scale: float = 1.0  # multiply the router's init std (Switch: 0.1 stabilizes training)
    jitter_eps: float = 1e-2  # Switch multiplicative input jitter, training only; 0 disables
    random_routing: bool = True  # GShard: keep the 2nd expert with probability min(1, 2 * g2)
    noise_eps: float = 1e-2  # noisy top-k: floor added to softplus noise std
    n_group: int = 1  # sigmoid_bias: experts split into groups (group-limited routing)
    topk_group: int = 1  # sigmoid_bias: number of groups a token may use
    routed_scaling_factor: float = 1.0  # sigmoid_bias: scale on the combine weights
    bias_update_rate: float = 1e-3  # sigmoid_bias: gamma in b_i += gamma * sign(mean_load - load_i)
    causal: bool = False  # set by decoders; expert choice refuses causal use unless allowed
    allow_causal_expert_choice: bool = False
    check_finite: bool = True  # raise on NaN/Inf router logits (one host sync per call)
    router_dtype: str = "float32"  # "bfloat16" rounds router math through bf16 (Switch's unstable baseline)
    num_tasks: int = 0  # router="task": task ids 0..num_tasks-1 (with 1, task ids may be omitted)
    task_experts: list[list[int]] | None = None  # router="task": experts each task may use; None = all

    # --- capacity ---
    capacity_factor: float | None = None  # None = dropless
    eval_capacity_factor: float | None = None  # None = same as capacity_factor
    min_capacity: int = 0
    drop_policy: str = "position"  # "position" (first tokens win) or "probability" (batch priority)
    expert_capacity: int | None = None  # fixed slots per expert and group; overrides the factors (HF Switch)
    capacity_group: str = "batch"  # "batch": all tokens of a call compete; "sequence": each row has C slots

    # --- experts ---
    activation: str = "swiglu"
    expert_bias: bool = False
    expert_dropout: float = 0.0  # dropout on the experts' hidden activations, separate from the model's
    num_shared_experts: int = 0
    shared_hidden_dim: int | None = None  # default: hidden_dim * num_shared_experts
    shared_gate: bool = False  # Qwen2-MoE: shared output scaled by sigmoid(x W_s)
    inner: MoEConfig | None = None  # hierarchical MoE: every expert is an MoE layer with this config

    # --- losses (coefficients; a loss with coefficient 0 still appears in MoEOutput.losses) ---
    load_balance_coef: float = 1e-2  # Switch: E * sum_i f_i P_i
    z_loss_coef: float = 1e-3  # ST-MoE: mean (logsumexp logits)^2
    importance_coef: float = 0.0  # Shazeer: CV^2 of importance
    load_coef: float = 0.0  # Shazeer: CV^2 of (smooth) load
    seq_balance_coef: float = 0.0  # DeepSeek-V3: Switch loss per sequence, averaged

    extra: dict[str, Any] = field(default_factory=dict)  # free-form metadata, never read by the layer

    def __setattr__(self, name: str, value: Any) -> None:
        # Every assignment is counted (`assignments`): a layer's prepared native call compares the
        # count, not every field, on each decode step (MoE._native_guards).
        object.__setattr__(self, name, value)
        object.__setattr__(self, "_assignments", self.__dict__.get("_assignments", 0) + 1)

    @property
    def assignments(self) -> int:
        """How many times a field of this config was assigned (construction included)."""
        return self.__dict__.get("_assignments", 0)  # (0: unpickled from before the count)

    def __post_init__(self) -> None:
        if isinstance(self.inner, dict):
            self.inner = MoEConfig.from_dict(self.inner)
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        for name in ("dim", "hidden_dim", "num_experts"):
            v = getattr(self, name)
            if not _is_int(v) or v < 1:
                _fail(name, v, "a positive integer")
        if not _is_int(self.top_k) or not 1 <= self.top_k <= self.num_experts:
            _fail("top_k", self.top_k, f"an integer in [1, num_experts={self.num_experts}]")
        if self.router not in ROUTERS:
            _fail("router", self.router, f"one of {list(ROUTERS)}")
        if self.router_dtype not in ROUTER_DTYPES:
            _fail("router_dtype", self.router_dtype, f"one of {list(ROUTER_DTYPES)}")
        if self.activation not in ACTIVATIONS:
            _fail("activation", self.activation, f"one of {list(ACTIVATIONS)}")
        if self.drop_policy not in DROP_POLICIES:
            _fail("drop_policy", self.drop_policy, f"one of {list(DROP_POLICIES)}")
        for name in ("capacity_factor", "eval_capacity_factor"):
            v = getattr(self, name)
            if v is not None and (not _is_number(v) or v <= 0):
                _fail(name, v, "None (dropless) or a finite number > 0")
        cap = self.expert_capacity
        if cap is not None and (not _is_int(cap) or cap < 1):
            _fail("expert_capacity", self.expert_capacity, "None (use capacity_factor) or a positive integer")
        if self.capacity_group not in CAPACITY_GROUPS:
            _fail("capacity_group", self.capacity_group, f"one of {list(CAPACITY_GROUPS)}")
        if not _is_int(self.min_capacity) or self.min_capacity < 0:
            _fail("min_capacity", self.min_capacity, "an integer >= 0")
        for name in ("expert_dropout", "jitter_eps"):
            v = getattr(self, name)
            if not _is_number(v) or not 0.0 <= v < 1.0:
                _fail(name, v, "a float in [0, 1)")
        for name in ("router_init_scale", "routed_scaling_factor"):
            v = getattr(self, name)
            if not _is_number(v) or v <= 0:
                _fail(name, v, "a finite float > 0")
        for name in ("noise_eps", "bias_update_rate"):
            v = getattr(self, name)
            if not _is_number(v) or v < 0:
                _fail(name, v, "a finite float >= 0")
        if not _is_int(self.num_shared_experts) or self.num_shared_experts < 0:
            _fail("num_shared_experts", self.num_shared_experts, "an integer >= 0")
        if self.shared_hidden_dim is not None and (
            not _is_int(self.shared_hidden_dim) or self.shared_hidden_dim < 1
        ):
            _fail("shared_hidden_dim", self.shared_hidden_dim, "None or a positive integer")
        for name in ("load_balance_coef", "z_loss_coef", "importance_coef", "load_coef", "seq_balance_coef"):
            v = getattr(self, name)
            if not _is_number(v) or v < 0:
                _fail(name, v, "a finite number >= 0")
        if self.router == "switch" and self.top_k != 1:
            _fail("top_k", self.top_k, "1 for router='switch' (Switch routes each token to one expert)")
        if self.router == "gshard" and self.top_k != 2:
            _fail("top_k", self.top_k, "2 for router='gshard' (GShard routes to two experts)")
        if self.router == "sigmoid_bias":
            if not _is_int(self.n_group) or self.n_group < 1 or self.num_experts % self.n_group:
                _fail("n_group", self.n_group, f"a divisor of num_experts={self.num_experts}")
            if not _is_int(self.topk_group) or not 1 <= self.topk_group <= self.n_group:
                _fail("topk_group", self.topk_group, f"an integer in [1, n_group={self.n_group}]")
            if self.top_k > self.topk_group * (self.num_experts // self.n_group):
                _fail("top_k", self.top_k, "<= topk_group * experts per group")
        if self.router == "expert_choice":
            if self.causal and not self.allow_causal_expert_choice:
                raise ValueError(
                    "MoEConfig.router='expert_choice' with causal=True is refused: each expert picks its "
                    "tokens by looking at the whole batch, which leaks future tokens into a causal "
                    "decoder. Use it in encoders, or set allow_causal_expert_choice=True to accept that."
                )
            if self.inner is not None:
                _fail("inner", "MoEConfig", "None with router='expert_choice'")
        if self.router == "task":
            self._validate_task_routing()
        if self.inner is not None and self.inner.dim != self.dim:
            _fail("inner.dim", self.inner.dim, f"equal to dim={self.dim}")

    def _validate_task_routing(self) -> None:
        if not isinstance(self.num_tasks, int) or isinstance(self.num_tasks, bool) or self.num_tasks < 1:
            _fail("num_tasks", self.num_tasks, "a positive integer with router='task'")
        if self.capacity_factor is not None or self.expert_capacity is not None:
            _fail(
                "capacity_factor" if self.capacity_factor is not None else "expert_capacity",
                self.capacity_factor if self.capacity_factor is not None else self.expert_capacity,
                "None with router='task' (all tokens of a task share its experts; capacity would drop most)",
            )
        table = self.task_experts
        if table is None:
            return
        if not isinstance(table, (list, tuple)) or len(table) != self.num_tasks:
            _fail("task_experts", table, f"None or one list of experts per task ({self.num_tasks} lists)")
        for t, experts in enumerate(table):
            ok = isinstance(experts, (list, tuple)) and len(set(experts)) == len(experts) >= self.top_k
            if not ok or not all(isinstance(e, int) and 0 <= e < self.num_experts for e in experts):
                _fail(
                    f"task_experts[{t}]",
                    experts,
                    f"at least top_k={self.top_k} distinct expert indices in [0, {self.num_experts})",
                )

    # ------------------------------------------------------------------ helpers
    @property
    def is_glu(self) -> bool:
        return self.activation in GLU_ACTIVATIONS

    def active_capacity_factor(self, training: bool) -> float | None:
        """capacity_factor while training; eval_capacity_factor in evaluation when set, else the same."""
        if training or self.eval_capacity_factor is None:
            return self.capacity_factor
        return self.eval_capacity_factor

    def capacity(self, num_assignments: int, training: bool) -> int | None:
        """Slots per expert for `num_assignments` = k * T routed assignments; None when dropless.

        C = ceil(CF * k * T / E), at least `min_capacity` (and at least 1); `expert_capacity`, when
        set, is returned as is in training and evaluation (T is then irrelevant).
        """
        if self.expert_capacity is not None:
            return self.expert_capacity
        cf = self.active_capacity_factor(training)
        if cf is None:
            return None
        return max(1, self.min_capacity, math.ceil(cf * num_assignments / self.num_experts))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if self.inner is not None:
            d["inner"] = self.inner.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MoEConfig:
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - valid)
        if unknown:
            raise ValueError(f"unknown MoEConfig keys {unknown}; valid keys are {sorted(valid)}")
        return cls(**d)
