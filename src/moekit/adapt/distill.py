"""Distilling an MoE teacher into a dense student (Switch Transformer section 4.2).

The student is the teacher without experts: same embeddings, attention, norms, LM head and dense
layers (all copied: Switch's "initialize with the teacher's non-expert weights"), and a dense FFN
in place of every MoE layer. That FFN is the size of one expert (so the student has the teacher's
active FLOPs per token) and is initialized by `ffn_init`:

    "average"  the mean of the teacher's experts, matrix by matrix (mean of w_in_EDF over E -> w1|w3,
               mean of w_out_EFD -> w2). A heuristic start, not the mean of the experts' functions;
               it needs experts of the FFN's shape and no shared experts.
    "fresh"    the usual random init.

The student trains on a mix of the teacher's probabilities and the ground truth:

    loss = alpha * CE(p_teacher, p_student) + (1 - alpha) * CE(y, p_student)

i.e. cross-entropy against the target distribution alpha * p_teacher + (1 - alpha) * onehot(y),
averaged over the target positions (targets != -100). Switch used alpha = 0.25. With a temperature
T != 1 both distributions of the soft term are softened by T and the term is scaled by T^2
(Hinton et al.); Switch used T = 1. The teacher runs in eval mode without gradients.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.data.loader import IGNORE_INDEX
from moekit.model import ModelConfig
from moekit.model.config import FFN_ACTIVATIONS
from moekit.model.layers import Block, FeedForward
from moekit.moe import MoE
from moekit.moe.experts import ExpertBank
from moekit.train.checkpoint import build_model
from moekit.train.config import RunConfig
from moekit.train.trainer import Trainer, autocast_for

FFN_INITS = ("average", "fresh")


def distillation_loss(
    student_logits_BSV: Tensor,
    teacher_logits_BSV: Tensor,
    targets_BS: Tensor,
    alpha: float = 0.25,
    temperature: float = 1.0,
) -> Tensor:
    """alpha * soft cross-entropy to the teacher + (1 - alpha) * hard cross-entropy, in float32."""
    check_alpha(alpha)
    valid_N = targets_BS.reshape(-1) != IGNORE_INDEX
    V = student_logits_BSV.shape[-1]
    s_NV = student_logits_BSV.float().reshape(-1, V)[valid_N]
    t_NV = teacher_logits_BSV.float().reshape(-1, V)[valid_N]
    hard = F.cross_entropy(s_NV, targets_BS.reshape(-1)[valid_N])
    soft = -(F.softmax(t_NV / temperature, dim=-1) * F.log_softmax(s_NV / temperature, dim=-1)).sum(-1).mean()
    return alpha * temperature**2 * soft + (1.0 - alpha) * hard


def check_alpha(alpha: float) -> None:
    if not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"--alpha={alpha!r} is invalid: expected a number in [0, 1]")


def dense_student_config(teacher: ModelConfig) -> ModelConfig:
    """The teacher's config without experts; FFNs of one expert's size (or of its dense layers')."""
    moe = teacher.moe
    if moe is None:
        raise ValueError("distillation needs an MoE teacher; this checkpoint is dense (moe is None)")
    has_dense = any(not teacher.is_moe_layer(i) for i in range(teacher.n_layers))
    hidden, activation = (
        (teacher.ffn_hidden_dim, teacher.ffn_activation) if has_dense else (moe.hidden_dim, moe.activation)
    )
    if activation not in FFN_ACTIVATIONS:
        raise ValueError(
            f"the teacher's expert activation {activation!r} has no dense FFN: expected one of {list(FFN_ACTIVATIONS)}"
        )
    return dataclasses.replace(
        teacher,
        moe=None,
        ffn_hidden_dim=hidden,
        ffn_activation=activation,
        moe_every=1,
        n_dense_first=0,
        sparse_layers=None,
        encoder_sparse_layers=None,
    )


@torch.no_grad()
def ffn_from_experts(moe: MoE, ffn: FeedForward) -> None:
    """Set the dense FFN to the matrix-wise mean of the MoE layer's experts."""
    bank = moe.experts
    if not isinstance(bank, ExpertBank) or moe.shared is not None:
        raise ValueError(
            "--ffn-init average needs plain expert banks without shared experts; use --ffn-init fresh"
        )
    w_in_DH = bank.w_in_EDF.mean(0)  # [D, H]
    w_out_FD = bank.w_out_EFD.mean(0)  # [F, D]
    if ffn.w2.weight.shape != w_out_FD.t().shape or (ffn.w3 is not None) != bank.is_glu:
        raise ValueError(
            f"--ffn-init average: the experts ({tuple(w_out_FD.shape)}, {bank.activation}) do not match the "
            f"student's FFN ({tuple(ffn.w2.weight.t().shape)}, {ffn.activation}); use --ffn-init fresh"
        )
    if ffn.w3 is None:
        ffn.w1.weight.copy_(w_in_DH.t())
    else:
        gate_DF, up_DF = w_in_DH.chunk(2, dim=1)
        ffn.w1.weight.copy_(gate_DF.t())
        ffn.w3.weight.copy_(up_DF.t())
    ffn.w2.weight.copy_(w_out_FD.t())


def dense_student(teacher: nn.Module, arch: str, ffn_init: str = "average", seed: int = 0) -> nn.Module:
    """A dense model with the teacher's non-expert weights and FFNs initialized by `ffn_init`."""
    if ffn_init not in FFN_INITS:
        raise ValueError(f"--ffn-init={ffn_init!r} is invalid: expected one of {list(FFN_INITS)}")
    torch.manual_seed(seed)
    student = build_model(arch, dense_student_config(teacher.config))
    teacher_state = teacher.state_dict()
    with torch.no_grad():
        for name, target in student.state_dict().items():
            source = teacher_state.get(name)
            if source is not None and source.shape == target.shape:
                target.copy_(source)
        if ffn_init == "average":
            for name, block in teacher.named_modules():
                if isinstance(block, Block) and block.is_moe:
                    ffn_from_experts(block.ffn, student.get_submodule(name).ffn)
    return student


class DistillTrainer(Trainer):
    """Trains `model` (the student) on alpha * teacher probabilities + (1 - alpha) * ground truth.

    The logged "loss" stays the ground-truth cross-entropy (comparable with any other run); the
    optimized loss is the mix. Evaluation is the student's ground-truth validation loss."""

    def __init__(
        self,
        cfg: RunConfig,
        model: nn.Module,
        teacher: nn.Module,
        alpha: float = 0.25,
        temperature: float = 1.0,
        record: dict[str, Any] | None = None,
    ) -> None:
        """record: extra facts for the checkpoint's config.json (teacher path, student init)."""
        check_alpha(alpha)
        if not temperature > 0:
            raise ValueError(f"--temperature={temperature!r} is invalid: expected a number > 0")
        if teacher.config.vocab_size != model.config.vocab_size:
            raise ValueError(
                f"teacher vocab_size={teacher.config.vocab_size} differs from the student's {model.config.vocab_size}"
            )
        self.alpha, self.temperature = alpha, temperature
        self.record = dict(record or {})
        self.teacher = teacher.eval().requires_grad_(False)
        model.fused_loss = (
            False  # every training step reads the student's logits (see MoETransformer.fused_loss)
        )
        super().__init__(cfg, model=model)
        self.teacher.to(self.device)

    def forward_batch(self, batch: tuple[Tensor, ...]) -> Any:
        out = super().forward_batch(batch)
        if not self.model.training:
            return out
        batch = tuple(b.to(self.device) for b in batch)
        with torch.no_grad(), autocast_for(self.device, self.cfg.train.dtype):
            if self.cfg.arch == "encdec":
                enc, dec_in, targets = batch
                teacher_logits = self.teacher(enc, dec_in, attention_mask=enc != self.tokenizer.pad_id).logits
            else:
                inputs, targets = batch
                teacher_logits = self.teacher(inputs).logits
        loss = distillation_loss(out.logits, teacher_logits, targets, self.alpha, self.temperature)
        out.loss = loss + out.aux_loss + out.z_loss
        return out

    def checkpoint_config(self) -> dict[str, Any]:
        info = {"alpha": self.alpha, "temperature": self.temperature, **self.record}
        return {**super().checkpoint_config(), "distill": info}
