"""Fine-tuning: freezing strategies freeze exactly what they name and those weights stay put,
knobs vs architecture in the run config, LoRA runs export a merged model, instruction data,
bad input, and the CLI."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moekit.adapt.checkpoints import Source
from moekit.adapt.finetune import FinetuneOptions, FinetuneTrainer, finetune_config, load_finetune_model
from moekit.adapt.freeze import STRATEGIES, freeze, parameter_kinds
from moekit.cli import main as cli_main
from moekit.model import ModelConfig, MoEEncoderDecoder, MoETransformer
from moekit.train import checkpoint as ckpt
from moekit.train.config import RunConfig
from moekit.train.trainer import build_optimizer
from tests.adapt_helpers import finetune_sets, tiny_corpus, tiny_model_config, train_checkpoint

REPO = Path(__file__).resolve().parents[1]


def kind_from_name(name: str) -> str:
    """The test's own classification, from parameter names alone."""
    if ".ffn.experts." in name or ".ffn.shared." in name:
        return "expert"
    if ".ffn.router." in name:
        return "router"
    if ".attn." in name or ".cross_attn." in name or "pos_bias" in name:
        return "attention"
    return "other"


EXPECTED_FROZEN = {  # strategy -> kinds, written out independently of freeze.py
    "none": set(),
    "experts": {"expert"},
    "router": {"router"},
    "moe": {"expert", "router"},
    "non_expert": {"router", "attention", "other"},
    "non_moe": {"attention", "other"},
    "attention": {"attention"},
    "all": {"expert", "router", "attention", "other"},
}


def mixed_model() -> MoETransformer:
    """Dense layer 0, MoE layer 1 with a shared expert, q/k norms, untied head."""
    torch.manual_seed(0)
    cfg = tiny_model_config(moe_every=2, qk_norm=True, moe_kw={"num_shared_experts": 1, "router_bias": True})
    return MoETransformer(cfg)


def test_strategy_table_matches_the_names():
    assert set(STRATEGIES) == set(EXPECTED_FROZEN)


@pytest.mark.parametrize("strategy", sorted(EXPECTED_FROZEN))
def test_each_strategy_freezes_exactly_its_parameters_and_they_stay_put(strategy):
    model = mixed_model()
    names = [n for n, _ in model.named_parameters()]
    expected = {n for n in names if kind_from_name(n) in EXPECTED_FROZEN[strategy]}
    assert set(freeze(model, strategy)) == expected
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == expected
    if strategy == "all":
        return
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = RunConfig()
    cfg.train.weight_decay = 0.5  # decay would move frozen weights if they were in the optimizer
    opt = build_optimizer(model, cfg)
    x = torch.randint(0, model.config.vocab_size, (2, 10))
    for _ in range(2):
        model(x, targets=x).loss.backward()
        opt.step()
        opt.zero_grad()
    for n, p in model.named_parameters():
        changed = not torch.equal(p, before[n])
        assert changed != (n in expected), n


def test_kinds_of_an_encoder_decoder():
    cfg = ModelConfig(
        vocab_size=64, dim=32, n_layers=2, n_heads=4, ffn_hidden_dim=40, max_seq_len=32,
        moe=tiny_model_config().moe, moe_every=2, position_encoding="relative_bias",
    )  # fmt: skip
    kinds = parameter_kinds(MoEEncoderDecoder(cfg))
    assert kinds == {n: kind_from_name(n) for n in kinds}
    assert kinds["decoder.0.cross_attn.wq.weight"] == "attention"
    assert kinds["encoder_pos_bias.embedding.weight"] == "attention"


def test_unknown_strategy_lists_the_valid_ones():
    with pytest.raises(
        ValueError, match=r"unknown freezing strategy 'experts_only': expected one of \['none', "
    ):
        freeze(mixed_model(), "experts_only")
    with pytest.raises(ValueError, match="strategy 'moe' names no parameter of this model"):
        freeze(MoETransformer(tiny_model_config(moe=False)), "moe")


# ---------------------------------------------------------------------- with a trained checkpoint
@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ft")
    corpus = tiny_corpus(tmp / "corpus")
    base = train_checkpoint(corpus, tmp, "base", **{"moe.router": '"sigmoid_bias"'})
    return tmp, corpus, base


def test_trainer_keeps_frozen_weights_and_applies_knobs(setup):
    tmp, corpus, base = setup
    source = Source.open(base)
    sets = finetune_sets(corpus, tmp, "moe-frozen", steps=3)
    cfg = finetune_config(source, overrides=[*sets, "moe.expert_dropout=0.4", "moe.load_balance_coef=0"])
    assert (
        cfg.train.lr == 1e-3 and cfg.data.seq_len == 32
    )  # fine-tuning defaults; the checkpoint's data shape
    trainer = FinetuneTrainer(cfg, load_finetune_model(source, cfg), FinetuneOptions(freeze="router"))
    bias = [m.router.expert_bias.clone() for m in trainer.moe_layers]
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.fit()
    for n, p in trainer.model.named_parameters():
        assert torch.equal(p, before[n]) == (".router." in n), n
    for m, b in zip(trainer.moe_layers, bias):  # the aux-loss-free bias is router state too
        assert torch.equal(m.router.expert_bias, b)
    model, config = ckpt.load_model(trainer.ckpt_dir)
    assert model.config.moe.expert_dropout == 0.4 and model.config.moe.load_balance_coef == 0.0
    assert config["finetune"]["freeze"] == "router"
    other = FinetuneTrainer(cfg, load_finetune_model(source, cfg), FinetuneOptions(freeze="experts"))
    with pytest.raises(ckpt.CheckpointError, match="holds a run with other fine-tuning options"):
        other.fit()  # the same run folder with another strategy: refused, not resumed
    assert (Path(config["folder"]) / ckpt.MODEL_FILE).is_file()


def test_config_refuses_architecture_changes_missing_data_and_overwrites(setup):
    tmp, corpus, base = setup
    source = Source.open(base)
    sets = finetune_sets(corpus, tmp, "x")
    with pytest.raises(
        ValueError,
        match=r"moe\.num_experts=8 cannot change: the checkpoint's weights have moe\.num_experts=4",
    ):
        finetune_config(source, overrides=[*sets, "moe.num_experts=8"])
    with pytest.raises(ValueError, match=r"model\.dim=64 cannot change"):
        finetune_config(source, overrides=[*sets, "model.dim=64"])
    with pytest.raises(ValueError, match="moe.enabled=False cannot change"):
        finetune_config(source, overrides=[*sets, "moe.enabled=false"])
    with pytest.raises(ValueError, match="fine-tuning needs training data"):
        finetune_config(source)
    with pytest.raises(ValueError, match="would overwrite the input checkpoint"):
        finetune_config(source, overrides=[*sets, "train.run_name='base'"])
    with pytest.raises(ValueError, match="data.tokenizer='other.json' cannot change"):
        finetune_config(source, overrides=[*sets, "data.tokenizer='other.json'"])
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        Source.open(tmp / "nowhere")
    cfg = finetune_config(source, overrides=sets)
    with pytest.raises(ValueError, match="'all' leaves nothing to train"):
        FinetuneTrainer(cfg, load_finetune_model(source, cfg), FinetuneOptions(freeze="all"))


def test_lora_run_trains_only_adapters_and_exports_a_merged_model(setup):
    tmp, corpus, base = setup
    source = Source.open(base)
    cfg = finetune_config(source, overrides=finetune_sets(corpus, tmp, "lora", steps=3))
    trainer = FinetuneTrainer(cfg, load_finetune_model(source, cfg), FinetuneOptions(lora_rank=4))
    assert trainer.options.strategy == "all"
    assert all(".lora_" in n for n, p in trainer.model.named_parameters() if p.requires_grad)
    trainer.fit()
    merged, config = ckpt.load_model(trainer.run_dir / "merged")
    assert config["finetune"]["lora_rank"] == 4
    x = torch.randint(0, 300, (2, 16))
    trainer.model.eval()
    torch.testing.assert_close(merged(x).logits, trainer.model(x).logits, rtol=1e-5, atol=1e-5)
    assert not torch.equal(
        merged.layers[0].ffn.experts.w_in_EDF, ckpt.load_model(base)[0].layers[0].ffn.experts.w_in_EDF
    )


def test_cli_finetune_lm_and_instruct(setup, tmp_path, capsys):
    tmp, corpus, base = setup
    before = (base / ckpt.MODEL_FILE).read_bytes()
    sets = sum((["--set", s] for s in finetune_sets(corpus, tmp, "cli")), [])
    assert (
        cli_main(
            ["finetune", "--ckpt", str(base), "--freeze", "non_expert", "--expert-dropout", "0.1", *sets]
        )
        == 0
    )
    assert "validation loss" in capsys.readouterr().out
    rows = [{"prompt": f"say {w}: ", "response": w * 2} for w in ("ab", "cd", "ef", "gh", "ij", "kl")]
    data = tmp_path / "tasks.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "instruct-run"
    args = [
        "finetune",
        "--ckpt",
        str(base),
        "--instruct",
        "--data",
        str(data),
        "--val-data",
        str(data),
        "--out",
        str(out),
    ]
    assert cli_main([*args, *sets, "--aux-loss", "off"]) == 0
    _, config = ckpt.load_model(out)
    assert config["finetune"]["instruct"] is True and config["model"]["moe"]["load_balance_coef"] == 0.0
    assert cli_main(["finetune", "--ckpt", str(base), "--freeze", "routers", "--data", str(data)]) == 2
    assert "unknown freezing strategy 'routers'" in capsys.readouterr().err
    assert cli_main(["finetune", "--ckpt", str(base), "--data", str(data), "--out", str(base)]) == 2
    assert "would overwrite the input checkpoint" in capsys.readouterr().err
    assert (base / ckpt.MODEL_FILE).read_bytes() == before  # the input was never touched


def test_benchmark_smoke(tmp_path):
    """The script behind docs/techniques.md runs end to end in its smoke mode; one stage alone
    resumes the runs of the whole script and reports the same numbers."""
    script = REPO / "benchmarks" / "techniques.py"
    res = subprocess.run(
        [sys.executable, str(script), "--smoke", "--work", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert (
        "| fine-tuning |" in res.stdout and "| distillation |" in res.stdout and "| upcycling |" in res.stdout
    )
    instruct_rows = json.loads((tmp_path / "results.json").read_text())["tables"]["instruction tuning"]
    assert [r["command"].split("--instruct")[-1].split("steps=2 ")[-1] for r in instruct_rows[1:]] == [
        "--freeze none",
        "--freeze moe",
        "--lora-rank 8",
        "--lora-rank 8 --set train.lr=5e-3",
    ]
    assert all(r["raw"]["steps"] == 2 for r in instruct_rows[1:])
    # the instruction set: functions of the domain's own files, split by file like the domain
    for split in ("train", "val"):
        sources = "".join(f.read_text() for f in (tmp_path / "downstream" / split).iterdir())
        pairs = [
            json.loads(line) for line in (tmp_path / "instruct" / f"{split}.jsonl").read_text().splitlines()
        ]
        assert pairs
        for pair in pairs:
            assert pair["prompt"].startswith(("def ", "async def ")) and pair["response"].strip()
            assert pair["prompt"].splitlines()[0] in sources
    # --stage resumes the finished runs: the same losses, in their own results file
    res = subprocess.run(
        [sys.executable, str(script), "--smoke", "--work", str(tmp_path), "--stage", "instruction"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    alone = json.loads((tmp_path / "results-instruction.json").read_text())["tables"]
    assert [r["loss"] for r in alone["instruction tuning"]] == [r["loss"] for r in instruct_rows]
    assert alone["fine-tuning"] == alone["upcycling"] == []
    assert "| fine-tuning |" not in res.stdout and "| instruction tuning |" in res.stdout


def load_techniques_script(monkeypatch):
    """benchmarks/techniques.py as a module (registered while the test runs: dataclasses need it)."""
    spec = importlib.util.spec_from_file_location("techniques_bench", REPO / "benchmarks" / "techniques.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def test_instruction_pairs_from_functions(monkeypatch):
    """Prompt = the def line(s) and docstring, response = the rest of the body, dedented; functions
    without a docstring or without code are left out; decorators are not part of the prompt."""
    source = (
        "import os\n\n"
        "class Reader:\n"
        "    @staticmethod\n"
        "    def read(path,\n"
        "             mode='r'):\n"
        '        """Read a file.\n\n        All of it."""\n'
        '        text = """\n'
        "a string at column 0\n"
        '"""\n'
        "\n"
        "        return open(path, mode).read() + text\n\n"
        "def bare():\n"
        "    return 1\n\n"
        "def only_doc():\n"
        '    """Nothing else."""\n'
    )
    pairs = load_techniques_script(monkeypatch).function_examples(source)
    assert pairs == [
        {
            "prompt": 'def read(path,\n         mode=\'r\'):\n    """Read a file.\n\n    All of it."""\n',
            "response": '    text = """\na string at column 0\n"""\n\n    return open(path, mode).read() + text\n',
            "task": "docstring-to-body",
        }
    ]
