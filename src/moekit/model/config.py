"""ModelConfig: the shape of a whole transformer (dense or MoE), validated at construction.

One small dataclass serves the decoder-only LM (`MoETransformer`) and the encoder-decoder
(`MoEEncoderDecoder`). The MoE layer keeps its own `MoEConfig` nested under `moe`; `moe=None`
builds a dense model. Which layers are sparse is decided by one rule, `is_moe_layer`:

    layer i is MoE  iff  moe is set and i >= n_dense_first and (i - n_dense_first) % moe_every == moe_every - 1

    moe_every=1                -> every layer (Mixtral, OLMoE, Qwen3-MoE)
    moe_every=2                -> layers 1, 3, 5, ... (GShard, Switch, Qwen2-MoE decoder_sparse_step=2)
    moe_every=1, n_dense_first=k -> the first k layers dense, the rest MoE (DeepSeek first_k_dense_replace)

With n_dense_first=0 this is Qwen2-MoE's `(i + 1) % decoder_sparse_step == 0`, shifted by the dense prefix.
Rules that this cannot express (Switch's `i % step == 1`) take an explicit list instead:
`sparse_layers` for the decoder (the only stack of a decoder-only LM) and `encoder_sparse_layers`
for the encoder of an encoder-decoder (None = the decoder's rule).

T5/Switch options: `position_encoding="relative_bias"` (bucketed relative position bias, no rotary),
`attn_scale=1.0` (T5 folds 1/sqrt(head_dim) into the init), `ffn_activation="relu"` (plain two-matrix
FFN), `output_scale=dim**-0.5` (tied LM head rescaling). The defaults keep the Llama-style model.

Attention options of the Hugging Face decoder families (all off by default): `attn_out_bias`,
`qk_norm_scope="full"` (OLMoE normalizes the whole q/k projection), `clip_qkv` (OLMoE),
`attention_sinks` and `sliding_window` on `sliding_window_layers` (GPT-OSS, Mixtral, Qwen),
`rope_scaling` (YaRN, linear; see rope.py) and `mla` (DeepSeek's multi-head latent attention, mla.py).
`aux_loss_mode="transformers"` pools the load-balancing loss over layers the way transformers'
`load_balancing_loss_func` does (about k at balance) instead of moekit's per-layer Switch loss.

Pitfall: `n_kv_heads` and `head_dim` are filled in from `n_heads` and `dim` when left as None, so
`dataclasses.replace(cfg, dim=...)` keeps the old head_dim; pass `head_dim=None` to re-derive it.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from moekit.model.rope import check_rope_scaling
from moekit.moe import MoEConfig

POSITION_ENCODINGS = ("rope", "relative_bias")
FFN_ACTIVATIONS = ("swiglu", "geglu", "relu", "gelu", "silu")  # the first two are GLU (three matrices)
QK_NORM_SCOPES = ("head", "full")
AUX_LOSS_MODES = ("per_layer", "transformers")


def _fail(name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"ModelConfig.{name}={value!r} is invalid: expected {allowed}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass
class MLAConfig:
    """Multi-head latent attention (DeepSeek-V2/V3): keys and values are expanded per head from one
    small latent per token (what the KV cache holds); a separate rotary key is shared by all heads."""

    kv_lora_rank: int  # width of the key/value latent
    qk_nope_head_dim: int  # per-head query/key dims without rotary
    qk_rope_head_dim: int  # per-head query/key dims with rotary
    v_head_dim: int
    q_lora_rank: int | None = None  # None = q straight from x; else via a rank-r bottleneck + RMSNorm
    latent_norm_eps: float = 1e-6  # eps of the latents' RMSNorms (transformers hard-codes 1e-6)
    softmax_scale: float | None = None  # None = 1/sqrt(qk_nope_head_dim + qk_rope_head_dim)

    def __post_init__(self) -> None:
        for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            v = getattr(self, name)
            if not _is_int(v) or v < 1:
                raise ValueError(f"MLAConfig.{name}={v!r} is invalid: expected a positive integer")
        if self.qk_rope_head_dim % 2:
            raise ValueError(
                f"MLAConfig.qk_rope_head_dim={self.qk_rope_head_dim!r} is invalid: expected an even "
                "integer (rotary rotates pairs)"
            )
        if self.q_lora_rank is not None and (not _is_int(self.q_lora_rank) or self.q_lora_rank < 1):
            raise ValueError(f"MLAConfig.q_lora_rank={self.q_lora_rank!r} is invalid: expected None or > 0")
        for name in ("latent_norm_eps",) + (() if self.softmax_scale is None else ("softmax_scale",)):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"MLAConfig.{name}={v!r} is invalid: expected a finite number > 0")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


@dataclass
class ModelConfig:
    """Configuration of a transformer LM. `MoETransformer(cfg)` or `MoEEncoderDecoder(cfg)` builds it."""

    vocab_size: int = 32000
    dim: int = 512
    n_layers: int = 8
    n_heads: int = 8
    n_kv_heads: int | None = None  # grouped-query attention; None = n_heads (multi-head)
    head_dim: int | None = None  # None = dim // n_heads
    ffn_hidden_dim: int = 1408  # hidden size of the dense SwiGLU feed-forward layers
    max_seq_len: int = 2048  # rotary tables and KV caches are sized for this
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    dropout: float = 0.0  # attention-probability and residual dropout
    tie_embeddings: bool = False  # LM head shares the token embedding matrix

    # --- attention flags, so Hugging Face families map onto one attention module ---
    qkv_bias: bool = False  # bias on q, k, v projections (Qwen2)
    qk_norm: bool = False  # per-head RMSNorm on q and k before rotary (Qwen3, OLMoE-style)

    # --- mixture of experts ---
    moe: MoEConfig | None = None  # None = dense model
    moe_every: int = 1  # see the module docstring for the rule
    n_dense_first: int = 0  # the first layers stay dense (DeepSeek)

    n_encoder_layers: int | None = None  # encoder-decoder only; None = n_layers
    init_std: float = 0.02  # std of the normal init of linear and embedding weights

    # --- T5 / Switch Transformers options (defaults: rotary, 1/sqrt(K) scaling, SwiGLU) ---
    position_encoding: str = "rope"  # "rope" or "relative_bias" (T5 bucketed bias, first layer's, shared)
    rel_pos_buckets: int = 32  # relative_bias: buckets (half per direction in bidirectional attention)
    rel_pos_max_distance: int = 128  # relative_bias: distances past this share the last bucket
    attn_scale: float | None = None  # scale on q.k; None = 1/sqrt(head_dim); T5 uses 1.0
    ffn_activation: str = "swiglu"  # dense FFNs: swiglu/geglu (gate, up, down) or relu/gelu/silu (up, down)
    output_scale: float = 1.0  # final hidden state times this before the LM head (T5 tied: dim**-0.5)
    sparse_layers: list[int] | None = None  # explicit MoE layers of the decoder stack; None = the rule
    encoder_sparse_layers: list[int] | None = None  # explicit MoE layers of the encoder; None = as decoder

    # --- attention variants of Hugging Face decoder families (defaults: plain GQA) ---
    attn_out_bias: bool = False  # bias on the output projection (GPT-OSS, Qwen3-MoE/OLMoE attention_bias)
    qk_norm_scope: str = "head"  # qk_norm per head ("head", Qwen3) or whole projection ("full", OLMoE)
    clip_qkv: float | None = None  # clamp q, k, v to [-clip_qkv, clip_qkv] after projection and norm (OLMoE)
    attention_sinks: bool = False  # a learned per-head logit joins every softmax's denominator (GPT-OSS)
    sliding_window: int | None = None  # a query sees this many keys, itself included; None = all
    sliding_window_layers: list[int] | None = None  # layers that use the window; None = every layer
    rope_scaling: dict[str, Any] | None = None  # transformers rope_parameters besides the theta (rope.py)
    mla: MLAConfig | None = None  # multi-head latent attention (DeepSeek-V3) instead of GQA
    aux_loss_mode: str = "per_layer"  # or "transformers": load balance pooled over layers (module docstring)
    extra: dict[str, Any] = field(default_factory=dict)  # free-form metadata (e.g. the source HF config)

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):
            self.moe = MoEConfig.from_dict(self.moe)
        if isinstance(self.mla, dict):
            self.mla = MLAConfig(**self.mla)
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None and _is_int(self.dim) and _is_int(self.n_heads) and self.n_heads > 0:
            self.head_dim = self.dim // self.n_heads
        self.validate()

    def validate(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "ffn_hidden_dim", "max_seq_len"):
            v = getattr(self, name)
            if not _is_int(v) or v < 1:
                _fail(name, v, "a positive integer")
        if not _is_int(self.n_kv_heads) or self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads:
            _fail("n_kv_heads", self.n_kv_heads, f"a positive divisor of n_heads={self.n_heads}")
        if self.position_encoding not in POSITION_ENCODINGS:
            _fail("position_encoding", self.position_encoding, f"one of {list(POSITION_ENCODINGS)}")
        if self.position_encoding == "rope":
            if not _is_int(self.head_dim) or self.head_dim < 2 or self.head_dim % 2:
                _fail("head_dim", self.head_dim, "a positive even integer (rotary rotates pairs)")
        elif not _is_int(self.head_dim) or self.head_dim < 1:
            _fail("head_dim", self.head_dim, "a positive integer")
        for name in ("rel_pos_buckets", "rel_pos_max_distance"):
            v = getattr(self, name)
            if not _is_int(v) or v < 4:
                _fail(name, v, "an integer >= 4")
        if self.ffn_activation not in FFN_ACTIVATIONS:
            _fail("ffn_activation", self.ffn_activation, f"one of {list(FFN_ACTIVATIONS)}")
        for name in ("output_scale",) + (() if self.attn_scale is None else ("attn_scale",)):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                _fail(name, v, "a finite number > 0" + (" (or None)" if name == "attn_scale" else ""))
        for name in ("rope_theta", "norm_eps", "init_std"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                _fail(name, v, "a finite number > 0")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            _fail("dropout", self.dropout, "a float in [0, 1)")
        for name in ("tie_embeddings", "qkv_bias", "qk_norm", "attn_out_bias", "attention_sinks"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, getattr(self, name), "a bool")
        self._validate_attention_variants()
        if not _is_int(self.moe_every) or self.moe_every < 1:
            _fail("moe_every", self.moe_every, "a positive integer (1 = every layer, 2 = every other)")
        if self.n_encoder_layers is not None and (
            not _is_int(self.n_encoder_layers) or self.n_encoder_layers < 1
        ):
            _fail("n_encoder_layers", self.n_encoder_layers, "None (= n_layers) or a positive integer")
        for name, n in (("sparse_layers", self.n_layers), ("encoder_sparse_layers", self.encoder_layers)):
            ids = getattr(self, name)
            if ids is not None and (
                not isinstance(ids, (list, tuple))
                or not all(_is_int(i) and 0 <= i < n for i in ids)
                or len(set(ids)) != len(ids)
            ):
                _fail(name, ids, f"None or a list of distinct layer indices in [0, {n})")
        deepest = max(self.n_layers, self.encoder_layers)  # the longer stack of an encoder-decoder
        if not _is_int(self.n_dense_first) or not 0 <= self.n_dense_first <= deepest:
            _fail(
                "n_dense_first",
                self.n_dense_first,
                f"an integer in [0, {deepest}] (layers in the deeper stack)",
            )
        if self.moe is not None:
            if not isinstance(self.moe, MoEConfig):
                _fail("moe", type(self.moe).__name__, "None, a MoEConfig or its dict")
            if self.moe.dim != self.dim:
                _fail("moe.dim", self.moe.dim, f"equal to dim={self.dim}")
            if self.sparse_layers is not None or self.encoder_sparse_layers is not None:
                if not self.moe_layer_ids() and not self.moe_layer_ids(self.encoder_layers, encoder=True):
                    _fail(
                        "sparse_layers",
                        self.sparse_layers,
                        "at least one MoE layer; use moe=None for a dense model",
                    )
            elif not any(self.is_moe_layer(i) for i in range(deepest)):
                _fail(
                    "moe_every",
                    self.moe_every,
                    f"a value that makes at least one of {deepest} layers MoE "
                    f"(n_dense_first={self.n_dense_first}); use moe=None for a dense model",
                )

    def _validate_attention_variants(self) -> None:
        if self.qk_norm_scope not in QK_NORM_SCOPES:
            _fail("qk_norm_scope", self.qk_norm_scope, f"one of {list(QK_NORM_SCOPES)}")
        if self.clip_qkv is not None and (
            not isinstance(self.clip_qkv, (int, float))
            or not math.isfinite(self.clip_qkv)
            or self.clip_qkv <= 0
        ):
            _fail("clip_qkv", self.clip_qkv, "None or a finite number > 0")
        if self.sliding_window is not None and (not _is_int(self.sliding_window) or self.sliding_window < 1):
            _fail("sliding_window", self.sliding_window, "None or a positive integer")
        ids = self.sliding_window_layers
        if ids is not None and (
            not isinstance(ids, (list, tuple)) or not all(_is_int(i) and 0 <= i < self.n_layers for i in ids)
        ):
            _fail("sliding_window_layers", ids, f"None or a list of layer indices in [0, {self.n_layers})")
        try:
            check_rope_scaling(self.rope_scaling)
        except ValueError as exc:
            _fail("rope_scaling", self.rope_scaling, f"None or a supported scaling dict ({exc})")
        if self.mla is not None and not isinstance(self.mla, MLAConfig):
            _fail("mla", type(self.mla).__name__, "None, an MLAConfig or its dict")
        if self.mla is not None and self.position_encoding != "rope":
            _fail("mla", "MLAConfig", "None unless position_encoding='rope'")
        if self.aux_loss_mode not in AUX_LOSS_MODES:
            _fail("aux_loss_mode", self.aux_loss_mode, f"one of {list(AUX_LOSS_MODES)}")
        if not isinstance(self.extra, dict):
            _fail("extra", self.extra, "a dict")

    # ------------------------------------------------------------------ attention
    def layer_window(self, i: int) -> int | None:
        """The sliding window of decoder layer `i` (None = full causal attention)."""
        if self.sliding_window is None:
            return None
        if self.sliding_window_layers is not None and i not in self.sliding_window_layers:
            return None
        return self.sliding_window

    @property
    def rope_head_dim(self) -> int:
        """Dims of a query/key head that rotary rotates (all of head_dim except under MLA)."""
        return self.mla.qk_rope_head_dim if self.mla is not None else self.head_dim

    def kv_cache_dims(self) -> tuple[int, int, int]:
        """(heads, key dim, value dim) that one layer's KV cache holds per position.

        MLA caches the normalized latent (as the "key") and the rotated shared key (as the "value")."""
        if self.mla is not None:
            return 1, self.mla.kv_lora_rank, self.mla.qk_rope_head_dim
        return self.n_kv_heads, self.head_dim, self.head_dim

    # ------------------------------------------------------------------ layer rule
    def is_moe_layer(self, i: int, encoder: bool = False) -> bool:
        """Whether layer `i` (0-based, within one stack) has an MoE feed-forward; see module docstring.

        encoder=True asks about the encoder stack of an encoder-decoder (differs only when
        `encoder_sparse_layers` is set)."""
        if self.moe is None:
            return False
        explicit = self.encoder_sparse_layers if encoder and self.encoder_sparse_layers is not None else None
        explicit = self.sparse_layers if explicit is None else explicit
        if explicit is not None:
            return i in explicit
        if i < self.n_dense_first:
            return False
        return (i - self.n_dense_first) % self.moe_every == self.moe_every - 1

    def moe_layer_ids(self, n_layers: int | None = None, encoder: bool = False) -> list[int]:
        """Indices of the MoE layers in a stack of `n_layers` (default: the decoder's n_layers)."""
        n = self.n_layers if n_layers is None else n_layers
        return [i for i in range(n) if self.is_moe_layer(i, encoder)]

    @property
    def encoder_layers(self) -> int:
        return self.n_layers if self.n_encoder_layers is None else self.n_encoder_layers

    # ------------------------------------------------------------------ serialization
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; `from_dict(to_dict())` rebuilds an equal config."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["moe"] = None if self.moe is None else self.moe.to_dict()
        d["mla"] = None if self.mla is None else dataclasses.asdict(self.mla)
        for name in ("sparse_layers", "encoder_sparse_layers", "sliding_window_layers"):
            d[name] = None if d[name] is None else list(d[name])
        d["rope_scaling"] = None if self.rope_scaling is None else dict(self.rope_scaling)
        d["extra"] = copy.deepcopy(self.extra)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - valid)
        if unknown:
            raise ValueError(f"unknown ModelConfig keys {unknown}; valid keys are {sorted(valid)}")
        d = dict(d)
        if isinstance(d.get("moe"), dict):
            d["moe"] = MoEConfig.from_dict(d["moe"])
        if isinstance(d.get("mla"), dict):
            d["mla"] = MLAConfig(**d["mla"])
        return cls(**d)
