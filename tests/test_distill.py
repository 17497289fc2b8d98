"""Distillation into dense: the loss is the hand-computed mix, the student keeps the teacher's
non-expert weights and averages its experts, the trainer optimizes the mix, and the CLI."""

from __future__ import annotations

import math

import pytest
import torch

from moekit.adapt.checkpoints import Source, run_config_for
from moekit.adapt.distill import DistillTrainer, dense_student, dense_student_config, distillation_loss
from moekit.cli import main as cli_main
from moekit.model import MoETransformer
from moekit.train import checkpoint as ckpt
from moekit.train.checkpoint import build_model
from tests.adapt_helpers import tiny_corpus, tiny_model_config, train_checkpoint


def test_loss_equals_the_hand_computed_mix():
    student = torch.tensor([[[1.0, 2.0, 0.5], [0.0, -1.0, 3.0], [2.0, 2.0, 2.0]]])  # [B=1, S=3, V=3]
    teacher = torch.tensor([[[0.5, 0.0, 1.0], [1.0, 1.0, -2.0], [9.0, 9.0, 9.0]]])
    targets = torch.tensor([[1, 2, -100]])  # the last position is ignored

    def softmax(row):
        z = [math.exp(v) for v in row]
        return [v / sum(z) for v in z]

    total = 0.0
    for s_row, t_row, y in zip(student[0].tolist()[:2], teacher[0].tolist()[:2], [1, 2]):
        log_ps = [math.log(p) for p in softmax(s_row)]
        soft = -sum(pt * lp for pt, lp in zip(softmax(t_row), log_ps))
        hard = -log_ps[y]
        total += 0.25 * soft + 0.75 * hard
    assert distillation_loss(student, teacher, targets, alpha=0.25).item() == pytest.approx(
        total / 2, rel=1e-6
    )
    hard_only = torch.nn.functional.cross_entropy(student[0, :2], targets[0, :2])
    torch.testing.assert_close(distillation_loss(student, teacher, targets, alpha=0.0), hard_only)
    with pytest.raises(ValueError, match=r"--alpha=1.5 is invalid"):
        distillation_loss(student, teacher, targets, alpha=1.5)


def test_student_keeps_non_expert_weights_and_averages_experts():
    torch.manual_seed(0)
    teacher = MoETransformer(tiny_model_config()).eval()
    student = dense_student(teacher, "decoder", "average")
    assert student.config.moe is None and student.config.ffn_hidden_dim == teacher.config.moe.hidden_dim
    t_state = teacher.state_dict()
    for name, value in student.state_dict().items():
        if ".ffn." not in name:
            assert torch.equal(value, t_state[name]), name
    bank, ffn = teacher.layers[1].ffn.experts, student.layers[1].ffn
    F = bank.hidden_dim
    torch.testing.assert_close(ffn.w1.weight, bank.w_in_EDF[:, :, :F].mean(0).t())  # gate
    torch.testing.assert_close(ffn.w3.weight, bank.w_in_EDF[:, :, F:].mean(0).t())  # up
    torch.testing.assert_close(ffn.w2.weight, bank.w_out_EFD.mean(0).t())
    fresh = dense_student(teacher, "decoder", "fresh")
    assert not torch.equal(fresh.layers[1].ffn.w2.weight, ffn.w2.weight)
    with pytest.raises(ValueError, match="needs an MoE teacher"):
        dense_student_config(tiny_model_config(moe=False))
    with pytest.raises(ValueError, match=r"--ffn-init='copy' is invalid"):
        dense_student(teacher, "decoder", "copy")
    shared = MoETransformer(tiny_model_config(moe_kw={"num_shared_experts": 1}))
    with pytest.raises(ValueError, match="without shared experts; use --ffn-init fresh"):
        dense_student(shared, "decoder", "average")


def test_cli_distill(tmp_path, capsys):
    corpus = tiny_corpus(tmp_path / "corpus", files=8)
    teacher_dir = train_checkpoint(corpus, tmp_path, "teacher")
    before = (teacher_dir / ckpt.MODEL_FILE).read_bytes()
    out = tmp_path / "student"
    assert (
        cli_main(["distill", "--teacher", str(teacher_dir), "--out", str(out), "--set", "train.steps=2"]) == 0
    )
    assert "validation loss" in capsys.readouterr().out
    student, config = ckpt.load_model(out)
    assert student.config.moe is None and config["distill"]["alpha"] == 0.25
    assert config["run"]["data"]["paths"] == [f"{corpus}/*.txt"]  # the teacher's data by default
    assert cli_main(["distill", "--teacher", str(teacher_dir), "--out", str(teacher_dir.parent)]) == 2
    assert "would overwrite the input checkpoint" in capsys.readouterr().err
    assert cli_main(["distill", "--teacher", str(out), "--out", str(tmp_path / "s2")]) == 2
    assert "needs an MoE teacher" in capsys.readouterr().err
    assert (teacher_dir / ckpt.MODEL_FILE).read_bytes() == before

    # the trainer optimizes the mix (the logged ce_loss stays the ground-truth loss)
    source = Source.open(teacher_dir)
    teacher = source.load_weights(build_model("decoder", source.model_config))
    flags = {"train": {"out_dir": str(tmp_path / "api"), "run_name": "api"}}
    data = {"data": {"tokenizer": str(source.tokenizer_file)}}
    cfg = run_config_for(
        "decoder", dense_student_config(source.model_config), source.run, defaults=data, flags=flags
    )
    trainer = DistillTrainer(cfg, dense_student(teacher, "decoder"), teacher, alpha=0.5)
    inputs, targets = trainer.sampler.next_batch()
    trainer.model.train()
    out = trainer.forward_batch((inputs, targets))
    with torch.no_grad():
        teacher_logits = teacher.eval()(inputs).logits
    torch.testing.assert_close(out.loss, distillation_loss(out.logits, teacher_logits, targets, 0.5))
    assert abs(float(out.loss) - float(out.ce_loss)) > 1e-4
