"""The training job: loss falls, exact resume, checkpoints, config errors, CLI, report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moekit.cli import main as cli_main
from moekit.train import Trainer, load_config, lr_at
from moekit.train import checkpoint as ckpt
from moekit.train.config import RunConfig, parse_override
from tests.adapt_helpers import stdlib_corpus
from tests.adapt_helpers import tiny_run_overrides as tiny_overrides


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    """A small user corpus: 45 stdlib modules copied as text files (fast to tokenize)."""
    return stdlib_corpus(tmp_path_factory.mktemp("corpus"), 45, 2000, 10**9, val_every=9)


def test_tiny_model_trains_and_loss_falls(corpus_dir, tmp_path):
    cfg = load_config(None, tiny_overrides(corpus_dir, tmp_path))
    result = Trainer(cfg).fit()
    losses = result.train_losses
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    assert result.val_loss < result.summary["unigram_val_loss"] + 0.5
    records = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "loss" in r]
    assert [r["step"] for r in logged] == list(range(5, 41, 5))
    assert all(len(r["load"]) == 2 and len(r["load"][0]) == 4 for r in logged)
    assert any("val_loss" in r for r in records)
    saved = load_config(result.run_dir / "config.toml")  # the resolved config rebuilds the run
    assert saved.to_dict() == cfg.to_dict()


def test_resume_gives_identical_losses(corpus_dir, tmp_path):
    """N steps straight == N/2 steps, a fresh process-like restart from the checkpoint, N/2 more."""
    extra = {
        "train.steps": "8",
        "moe.expert_dropout": "0.2",  # RNG in play: the restored RNG state must be exact
        "model.dropout": "0.1",
        "moe.router": '"switch"',
        "moe.top_k": "1",
        "moe.capacity_factor": "1.0",
    }
    straight = Trainer(
        load_config(None, tiny_overrides(corpus_dir, tmp_path, **extra, **{"train.run_name": '"a"'}))
    )
    full = straight.fit().train_losses

    cfg_b = tiny_overrides(corpus_dir, tmp_path, **extra, **{"train.run_name": '"b"'})
    first = Trainer(load_config(None, cfg_b))
    real_step = first.train_step

    def step_until_interrupted():
        if first.step == 4:
            raise KeyboardInterrupt  # the run is stopped half way (Ctrl-C saves a checkpoint)
        return real_step()

    first.train_step = step_until_interrupted
    assert first.fit().interrupted
    torch.manual_seed(999)  # a different ambient RNG state must not matter
    resumed = Trainer(load_config(None, cfg_b))
    second = resumed.fit().train_losses
    assert resumed.step == 8
    assert second == full[4:]  # bit-identical


def test_lr_schedule_warmup_and_cosine():
    cfg = RunConfig()
    cfg.train.lr, cfg.train.warmup_steps, cfg.train.steps, cfg.train.min_lr_ratio = 1.0, 10, 110, 0.1
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_at(110, cfg) == pytest.approx(0.1)
    assert lr_at(0, cfg, 20) == pytest.approx(0.25)  # planned short: warmup shrinks to a fifth (4 steps)
    assert lr_at(12, cfg, 20) == pytest.approx(0.1 + 0.9 * 0.5)


def test_checkpoint_round_trip_gives_same_logits(corpus_dir, tmp_path):
    cfg = load_config(
        None, tiny_overrides(corpus_dir, tmp_path, **{"train.steps": "3", "model.tie_embeddings": "true"})
    )
    trainer = Trainer(cfg)
    trainer.fit()
    model, config = ckpt.load_model(trainer.ckpt_dir)
    assert config["tied"] == {"output.weight": "tok_embeddings.weight"}
    x = torch.randint(0, 300, (2, 16))
    trainer.model.eval()
    torch.testing.assert_close(model(x).logits, trainer.model(x).logits, rtol=0, atol=0)


def test_ctrl_c_saves_and_exits_cleanly(corpus_dir, tmp_path, monkeypatch):
    cfg = load_config(None, tiny_overrides(corpus_dir, tmp_path, **{"train.run_name": '"ctrlc"'}))
    trainer = Trainer(cfg)
    real_step = trainer.train_step

    def step_then_interrupt():
        if trainer.step == 3:
            raise KeyboardInterrupt
        return real_step()

    monkeypatch.setattr(trainer, "train_step", step_then_interrupt)
    result = trainer.fit()
    assert result.interrupted and result.step == 3
    state = json.loads((trainer.ckpt_dir / ckpt.STATE_FILE).read_text())
    assert state["step"] == 3


def test_interrupted_save_keeps_last_good_checkpoint(corpus_dir, tmp_path, monkeypatch):
    cfg = load_config(None, tiny_overrides(corpus_dir, tmp_path, **{"train.steps": "2"}))
    trainer = Trainer(cfg)
    trainer.fit()
    before = (trainer.ckpt_dir / ckpt.MODEL_FILE).read_bytes()

    def broken(folder, state_dict, config):
        (folder / ckpt.MODEL_FILE).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_state_files", broken)
    with pytest.raises(OSError, match="disk full"):
        trainer.save()
    assert (trainer.ckpt_dir / ckpt.MODEL_FILE).read_bytes() == before
    assert not list(trainer.ckpt_dir.parent.glob("checkpoint.tmp-*"))


def test_resume_refuses_checkpoint_of_another_model(corpus_dir, tmp_path):
    Trainer(load_config(None, tiny_overrides(corpus_dir, tmp_path, **{"train.steps": "2"}))).fit()
    ckpt_file = tmp_path / "runs" / "default" / "checkpoint" / ckpt.MODEL_FILE
    before = ckpt_file.read_bytes()
    other = load_config(None, tiny_overrides(corpus_dir, tmp_path, **{"model.dim": "48"}))
    with pytest.raises(ckpt.CheckpointError, match="another model config"):
        Trainer(other).fit()
    assert ckpt_file.read_bytes() == before  # nothing overwritten


def test_corrupt_and_mismatched_checkpoints_are_named(corpus_dir, tmp_path):
    trainer = Trainer(load_config(None, tiny_overrides(corpus_dir, tmp_path, **{"train.steps": "1"})))
    trainer.fit()
    folder = trainer.ckpt_dir
    data = (folder / ckpt.MODEL_FILE).read_bytes()
    (folder / ckpt.MODEL_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(ckpt.CheckpointError, match=r"model.safetensors.*corrupt or truncated"):
        ckpt.load_model(folder)
    (folder / ckpt.MODEL_FILE).write_bytes(data)
    config = json.loads((folder / ckpt.CONFIG_FILE).read_text())
    config["model"]["moe"]["hidden_dim"] = 48
    (folder / ckpt.CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(
        ckpt.CheckpointError, match=r"w_in_EDF' has shape \(4, 32, 64\) but the model expects \(4, 32, 96\)"
    ):
        ckpt.load_model(folder)
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        ckpt.load_model(tmp_path / "nope")


def test_config_overrides_and_errors(tmp_path):
    assert parse_override("train.lr=1e-3") == ("train", "lr", 1e-3)
    assert parse_override("data.paths=['a.txt', 'b/*.jsonl']") == ("data", "paths", ["a.txt", "b/*.jsonl"])
    assert parse_override("train.run_name=exp1") == ("train", "run_name", "exp1")
    cfg = load_config(None, ["train.run_name=123", "moe.capacity_factor=1.25", "moe.enabled=false"])
    assert cfg.train.run_name == "123" and cfg.moe["capacity_factor"] == 1.25
    assert cfg.model_config(100).moe is None
    with pytest.raises(ValueError, match=r"unknown key train\.stepz; valid keys are \[.*'steps'"):
        load_config(None, ["train.stepz=3"])
    with pytest.raises(ValueError, match=r"train\.steps='ten': expected an integer"):
        load_config(None, ["train.steps=ten"])
    with pytest.raises(ValueError, match=r"moe\.top_k=2\.5: expected an integer"):
        load_config(None, ["moe.top_k=2.5"])
    with pytest.raises(ValueError, match="expected SECTION.KEY=VALUE"):
        load_config(None, ["lr=3"])
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nsteps = 'x'\n")
    with pytest.raises(ValueError, match=r"bad.toml.*train\.steps='x'"):
        load_config(bad)
    bad.write_text("[trainn]\nsteps = 3\n")
    with pytest.raises(ValueError, match=r"unknown section \[trainn\]"):
        load_config(bad)
    with pytest.raises(FileNotFoundError, match="nope.toml"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(ValueError, match="data.seq_len=2048 exceeds model.max_seq_len=1024"):
        load_config(None, ["data.seq_len=2048"])
    with pytest.raises(
        ValueError, match=r"parallel\.data_parallel='fsdp' is invalid: expected one of \['ddp'"
    ):
        load_config(None, ["parallel.data_parallel=fsdp"])


def test_bad_data_paths(corpus_dir, tmp_path):
    cfg = load_config(
        None, tiny_overrides(corpus_dir, tmp_path, **{"data.paths": f'["{tmp_path}/missing/*.txt"]'})
    )
    with pytest.raises(FileNotFoundError, match="missing"):
        Trainer(cfg)
    small = tmp_path / "small"
    small.mkdir()
    (small / "a.txt").write_text("x = 1\n")
    (small / "b.txt").write_text("y = 2\n")
    cfg = load_config(
        None,
        tiny_overrides(
            corpus_dir,
            tmp_path,
            **{"data.paths": f'["{small}/a.txt"]', "data.validation_paths": f'["{small}/b.txt"]'},
        ),
    )
    with pytest.raises(ValueError, match=r"training token stream has \d+ tokens but one window needs 33"):
        Trainer(cfg)


def test_encoder_decoder_trains(corpus_dir, tmp_path):
    cfg = load_config(
        None,
        tiny_overrides(
            corpus_dir,
            tmp_path,
            **{
                "model.arch": '"encdec"',
                "train.steps": "25",
                "train.run_name": '"encdec"',
                "moe.top_k": "1",
                "moe.router": '"switch"',
                "model.moe_every": "2",
            },
        ),
    )
    trainer = Trainer(cfg)
    result = trainer.fit()
    losses = result.train_losses
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3
    assert len(trainer.moe_layers) == 2  # one sparse layer in each stack of 2
    model, config = ckpt.load_model(result.checkpoint_dir)
    assert config["arch"] == "encdec"


def test_cli_train_eval_generate(corpus_dir, tmp_path, capsys):
    args = tiny_overrides(corpus_dir, tmp_path, **{"train.steps": "10", "train.run_name": '"cli"'})
    assert cli_main(["train", *sum((["--set", a] for a in args), [])]) == 0
    out = capsys.readouterr().out
    assert "validation loss" in out and "moekit generate --ckpt" in out
    run = tmp_path / "runs" / "cli"
    for f in (
        "report/summary.md",
        "report/loss_curves.png",
        "report/expert_load.png",
        "checkpoint/model.safetensors",
    ):
        assert (run / f).is_file(), f
    assert cli_main(["eval", "--ckpt", str(run / "checkpoint"), "--batches", "2"]) == 0
    assert "perplexity" in capsys.readouterr().out
    # --data: any files, even the training files, become the evaluation set
    assert (
        cli_main(["eval", "--ckpt", str(run), "--data", str(corpus_dir / "val" / "*.txt"), "--batches", "2"])
        == 0
    )
    first = capsys.readouterr().out
    assert cli_main(["eval", "--ckpt", str(run), "--data", str(corpus_dir / "*.txt"), "--batches", "2"]) == 0
    assert "perplexity" in first and capsys.readouterr().out != first
    assert (
        cli_main(
            ["generate", "--ckpt", str(run), "--prompt", "def ", "--max-tokens", "12", "--temperature", "0"]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert text.startswith("def ")
    assert cli_main(["generate", "--ckpt", str(tmp_path / "nothing"), "--prompt", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_time_limit_plan_never_adds_steps_past_train_steps(corpus_dir, tmp_path):
    """A run of train.steps = 6 under the default time limit plans after its 6th step (the first one
    is not timed) and must stop there: the plan once gave 7, a step past the end of the schedule."""
    overrides = tiny_overrides(corpus_dir, tmp_path, **{"train.steps": "6", "train.time_limit_minutes": "9"})
    trainer = Trainer(load_config(None, overrides))
    result = trainer.fit()
    assert trainer.planned and trainer.total_steps == 6
    assert result.step == 6 and len(result.train_losses) == 6


def test_time_limit_plans_the_schedule_into_the_budget(corpus_dir, tmp_path, monkeypatch):
    """A time-limited run fixes its length after a few timed steps; the cosine ends inside the budget.

    A fake clock makes every step take exactly 1 s: 6 timed steps, then the plan
    6 + floor((0.97 * 30 s - 6 s) / 1 s) = 29 steps, which end inside the 30 s limit."""
    import types

    from moekit.train import trainer as trainer_module

    ticks = iter(range(10**6))
    monkeypatch.setattr(
        trainer_module, "time", types.SimpleNamespace(perf_counter=lambda: float(next(ticks)))
    )
    cfg = load_config(
        None,
        tiny_overrides(
            corpus_dir,
            tmp_path,
            **{
                "train.steps": "100000",
                "train.time_limit_minutes": "0.5",
                "train.warmup_steps": "2",
                "train.log_every": "1000",
            },
        ),
    )
    trainer = Trainer(cfg)
    result = trainer.fit()
    assert trainer.planned and trainer.total_steps == 29 and result.step == 29
    assert result.summary["training_seconds"] == 29.0
    state = json.loads((trainer.ckpt_dir / ckpt.STATE_FILE).read_text())
    assert state["total_steps"] == 29  # a resumed run keeps the plan
    records = [json.loads(x) for x in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if "lr" in r][-1]
    assert last["step"] == 29 and last["lr"] == pytest.approx(lr_at(28, cfg, 29))
    assert lr_at(29, cfg, 29) == pytest.approx(cfg.train.lr * cfg.train.min_lr_ratio)  # the cosine ends there


def test_optimizer_is_fused_adamw_with_the_same_steps_as_the_reference():
    # fused AdamW on CPU float32; its updates equal torch's plain for-loop AdamW with the same
    # groups (decay on matrices only), over three steps
    from moekit.train.trainer import build_optimizer

    cfg = RunConfig()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))
    twin = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))
    twin.load_state_dict(model.state_dict())
    opt = build_optimizer(model, cfg)
    assert opt.defaults["fused"] is True
    ref = torch.optim.AdamW(
        [
            {"params": [p for p in twin.parameters() if p.ndim >= 2], "weight_decay": cfg.train.weight_decay},
            {"params": [p for p in twin.parameters() if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=cfg.train.lr,
        betas=(cfg.train.beta1, cfg.train.beta2),
        foreach=False,
    )
    for step in range(3):
        x = torch.randn(5, 8, generator=torch.Generator().manual_seed(step))
        for m, o in ((model, opt), (twin, ref)):
            o.zero_grad()
            m(x).square().sum().backward()
            o.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
