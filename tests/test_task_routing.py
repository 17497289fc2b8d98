"""Task-level routing: the task router against a per-token reference, task ids through the model,
the multi-task corpus and sampler, and bit-exact extraction of a task's sub-network."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moekit import MoE
from moekit.cli import main as cli_main
from moekit.model import ModelConfig, MoETransformer
from moekit.moe import MoEConfig
from moekit.tasks import TaskBatchSampler, extract_task, task_expert_table
from moekit.tasks.data import split_code_and_prose
from moekit.tasks.extract import extract_checkpoint
from moekit.train.checkpoint import load_model, save_model_files
from tests.moe_reference import expert_forward


def task_model(num_tasks=3, experts=6, top_k=2, **moe_kw) -> MoETransformer:
    torch.manual_seed(0)
    moe = MoEConfig(
        dim=32, hidden_dim=24, num_experts=experts, top_k=top_k, router="task", num_tasks=num_tasks, **moe_kw
    )
    cfg = ModelConfig(
        vocab_size=64, dim=32, n_layers=3, n_heads=4, ffn_hidden_dim=48, max_seq_len=32, moe=moe
    )
    return MoETransformer(cfg).eval()


def test_task_router_matches_table_lookup():
    torch.manual_seed(0)
    moe = MoE(8, 4, 6, top_k=2, router="task", num_tasks=3, router_bias=True).eval()
    torch.nn.init.normal_(moe.router.gate.bias)
    x = torch.randn(2, 5, 8)
    task_ids = torch.tensor([2, 0])
    out = moe(x, task_ids=task_ids)
    table = moe.router.gate.weight.detach().t() + moe.router.gate.bias.detach()  # [tasks, E]
    for b in range(2):
        row = table[task_ids[b]].tolist()
        chosen = sorted(range(6), key=lambda e: -row[e])[:2]
        z = [torch.exp(torch.tensor(row[e]) - max(row[c] for c in chosen)) for e in chosen]
        weights = [v / sum(z) for v in z]
        for s in range(5):
            expected = sum(w * expert_forward(moe, e, x[b, s]) for e, w in zip(chosen, weights))
            torch.testing.assert_close(out.output[b, s], expected, atol=1e-5, rtol=1e-5)
        assert moe.router.task_experts(int(task_ids[b])) == sorted(chosen)


def test_task_experts_table_restricts_choice():
    moe = MoE(8, 4, 6, top_k=2, router="task", num_tasks=2, task_experts=[[0, 1, 2], [3, 5]])
    routing = moe.router(torch.randn(10, 8), None, torch.tensor([0] * 5 + [1] * 5))
    experts = routing.expert_idx_A.view(10, 2)
    assert set(experts[:5].flatten().tolist()) <= {0, 1, 2}
    assert set(experts[5:].flatten().tolist()) == {3, 5}


def test_task_ids_flow_through_the_model_and_token_routers_ignore_them():
    model = task_model()
    x = torch.randint(0, 64, (3, 10))
    out = model(x, targets=x, task_ids=torch.tensor([0, 1, 2]))
    assert torch.isfinite(out.loss)
    for layer, stats in enumerate(out.router_stats):
        used = {e for t in range(3) for e in task_expert_table(model)[layer][t]}
        assert {e for e, n in enumerate(stats.routed_per_expert.tolist()) if n > 0} == used
    token_cfg = dataclasses.replace(model.config, moe=MoEConfig(dim=32, hidden_dim=24, num_experts=6))
    token_model = MoETransformer(token_cfg).eval()
    torch.testing.assert_close(
        token_model(x, task_ids=torch.tensor([0, 1, 2])).logits, token_model(x).logits, rtol=0, atol=0
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_tasks=0), "num_tasks"),
        (dict(num_tasks=2, capacity_factor=1.0), "capacity_factor"),
        (dict(num_tasks=2, task_experts=[[0, 1]]), "task_experts"),
        (dict(num_tasks=2, task_experts=[[0, 1], [2]]), r"task_experts\[1\]"),
        (dict(num_tasks=2, task_experts=[[0, 1], [2, 9]]), r"task_experts\[1\]"),
    ],
)
def test_task_config_errors_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MoEConfig(dim=8, hidden_dim=4, num_experts=4, top_k=2, router="task", **kwargs)


def test_task_ids_errors():
    model = task_model()
    x = torch.randint(0, 64, (2, 6))
    with pytest.raises(ValueError, match="needs task ids"):
        model(x)
    with pytest.raises(ValueError, match="task id 3 is out of range"):
        model(x, task_ids=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="task_ids has shape"):
        model(x, task_ids=torch.tensor([0, 1, 2]))


@pytest.mark.parametrize("moe_kw", [{}, {"router_bias": True, "num_shared_experts": 1}])
def test_extracted_task_model_is_bit_identical(moe_kw, tmp_path):
    model = task_model(**moe_kw)
    if model.layers[0].ffn.router.gate.bias is not None:
        for layer in model.moe_layers:
            torch.nn.init.normal_(layer.router.gate.bias)
    x = torch.randint(0, 64, (4, 16))
    for task in range(3):
        small = extract_task(model, task)
        assert small.config.moe.num_experts == 2 and small.config.moe.num_tasks == 1
        full_logits = model(x, task_ids=torch.full((4,), task)).logits
        assert torch.equal(small(x).logits, full_logits)  # no task ids needed, same bits
        if task == 1:  # decoding through the KV cache too
            gen_full = model.generate(x[:2, :4], 4, temperature=0, task_ids=torch.full((2,), task))
            assert torch.equal(small.generate(x[:2, :4], 4, temperature=0), gen_full)
    # through a checkpoint folder, as `moekit extract` does
    src = tmp_path / "full"
    src.mkdir()
    config = {"arch": "decoder", "model": model.config.to_dict(), "tasks": {"names": ["a", "b", "c"]}}
    save_model_files(src, model, config)
    out, _, _ = extract_checkpoint(src, "b", tmp_path / "b")
    loaded, saved = load_model(out)
    assert saved["tasks"]["names"] == ["b"] and saved["derived_from"][0]["op"] == "extract"
    assert torch.equal(loaded(x).logits, model(x, task_ids=torch.full((4,), 1)).logits)
    with pytest.raises(ValueError, match="would overwrite the input"):
        extract_checkpoint(src, "b", src)
    with pytest.raises(ValueError, match="not a task of this checkpoint"):
        extract_checkpoint(src, "zzz", tmp_path / "z")


def test_extract_refuses_token_routed_models():
    cfg = ModelConfig(
        vocab_size=64, dim=16, n_layers=1, n_heads=2, moe=MoEConfig(dim=16, hidden_dim=8, num_experts=4)
    )
    with pytest.raises(ValueError, match="router='task'"):
        extract_task(MoETransformer(cfg), 0)


def test_task_batch_sampler_is_balanced_and_resumable():
    streams = [torch.arange(500).numpy() + 1000 * t for t in range(3)]
    sampler = TaskBatchSampler(streams, batch_size=6, seq_len=8, seed=1)
    x, task_ids, y = sampler.next_batch()
    assert x.shape == (6, 8) and task_ids.tolist() == [0, 0, 1, 1, 2, 2]
    assert all(int(x[i, 0]) // 1000 == int(task_ids[i]) for i in range(6))
    torch.testing.assert_close(x[:, 1:], y[:, :-1])
    state = sampler.state_dict()
    expected = sampler.next_batch()
    again = TaskBatchSampler(streams, batch_size=6, seq_len=8, seed=1)
    again.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(again.next_batch(), expected))
    with pytest.raises(ValueError, match="multiple of the number of tasks"):
        TaskBatchSampler(streams, batch_size=4, seq_len=8)


def test_split_code_and_prose():
    source = '"""Module doc."""\nimport os  # a comment\n\n\ndef f(x):\n    """Doc of f."""\n    return "not a doc"\n'
    code, prose = split_code_and_prose(source)
    assert code == 'import os  \ndef f(x):\n    return "not a doc"\n'
    assert "Module doc." in prose and "a comment" in prose and "Doc of f." in prose
    assert "not a doc" not in prose


def test_cli_train_tasks_then_extract(tmp_path, capsys):
    sets = {
        "data.cache_dir": f'"{tmp_path / "cache"}"',
        "data.vocab_size": "300",
        "data.seq_len": "16",
        "data.batch_size": "4",
        "data.eval_batch_size": "4",
        "model.dim": "32",
        "model.n_layers": "2",
        "model.n_heads": "4",
        "model.n_kv_heads": "2",
        "model.ffn_hidden_dim": "32",
        "model.max_seq_len": "32",
        "moe.num_experts": "4",
        "moe.hidden_dim": "16",
        "moe.router": '"task"',
        "train.steps": "3",
        "train.warmup_steps": "1",
        "train.eval_every": "3",
        "train.eval_batches": "1",
        "train.out_dir": f'"{tmp_path / "runs"}"',
        "train.run_name": '"mt"',
        "train.progress": "false",
    }
    argv = ["train-tasks", "--tasks", "code,prose", "--max-chars", "20000"]
    argv += [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    assert cli_main(argv) == 0
    ckpt = tmp_path / "runs" / "mt" / "checkpoint"
    assert (
        cli_main(["extract", "--ckpt", str(ckpt), "--task", "prose", "--out", str(tmp_path / "prose")]) == 0
    )
    assert "outputs identical to the full model on a random batch: True" in capsys.readouterr().out
    assert cli_main(["extract", "--ckpt", str(ckpt), "--task", "prose", "--out", str(ckpt)]) == 2
    assert "would overwrite the input" in capsys.readouterr().err
