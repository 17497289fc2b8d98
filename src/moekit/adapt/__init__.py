"""Adapting trained models: fine-tuning (freezing strategies, LoRA on attention and fused experts,
instruction data), sparse upcycling of dense checkpoints, and distillation of MoE into dense.

    freeze.py       freezing strategies by name
    lora.py         LoRA adapters, including per-expert adapters inside the grouped expert compute
    finetune.py     FinetuneTrainer and the fine-tuning run config
    upcycle.py      dense checkpoint -> MoE checkpoint with identical initial outputs
    distill.py      dense student from an MoE teacher, distillation loss and trainer
    checkpoints.py  what the three share: source checkpoints, run configs, safe outputs
    commands.py     `moekit finetune`, `moekit upcycle`, `moekit distill`
"""

from moekit.adapt.distill import DistillTrainer, dense_student, distillation_loss
from moekit.adapt.finetune import FinetuneOptions, FinetuneTrainer, finetune_config, load_finetune_model
from moekit.adapt.freeze import STRATEGIES, freeze, frozen_parameter_names, parameter_kinds
from moekit.adapt.lora import LoRAExpertBank, LoRALinear, apply_lora, merge_lora
from moekit.adapt.upcycle import upcycle_checkpoint, upcycle_model, upcycled_config

__all__ = [
    "STRATEGIES",
    "DistillTrainer",
    "FinetuneOptions",
    "FinetuneTrainer",
    "LoRAExpertBank",
    "LoRALinear",
    "apply_lora",
    "dense_student",
    "distillation_loss",
    "finetune_config",
    "freeze",
    "frozen_parameter_names",
    "load_finetune_model",
    "merge_lora",
    "parameter_kinds",
    "upcycle_checkpoint",
    "upcycle_model",
    "upcycled_config",
]
