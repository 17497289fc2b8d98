"""Hugging Face interop of the decoder MoE families against transformers itself (an extra, `hf`).

For every family a tiny random model is built with transformers (float32, eager experts and
attention), its biases and norm weights randomized so that a mis-mapped tensor cannot hide, and
saved in both expert layouts. moekit must load both and give the same logits with and without
left padding, the same greedy tokens, the same pooled balance loss, and a `save_pretrained` that
transformers loads back. Bad folders must fail with errors that name the key, file and shapes.

Run: python -m pytest tests/test_hf_decoders.py
"""

from __future__ import annotations

import importlib
import json
import shutil
import sysconfig
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

import moekit  # noqa: E402
from moekit.hf import CheckpointFormatError, convert_from_hf, convert_to_hf, from_pretrained  # noqa: E402
from moekit.moe.losses import pooled_load_balancing_loss  # noqa: E402

TOL = 1e-4
V = 64
BASE = dict(
    vocab_size=V,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=24,
    initializer_range=0.1,
    output_router_logits=True,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=2,
)
FAMILIES = {  # each exercises its family's options: windows, dense layers, biases, groups, YaRN, sinks
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=5),
    "qwen2_moe": dict(
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=12,
        shared_expert_intermediate_size=20,
        mlp_only_layers=[1],
        use_sliding_window=True,
        sliding_window=5,
        max_window_layers=2,
    ),
    "qwen3_moe": dict(
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=12,
        decoder_sparse_step=2,
        norm_topk_prob=True,
        attention_bias=True,
    ),
    "olmoe": dict(num_experts=6, num_experts_per_tok=2, clip_qkv=0.6, attention_bias=True),
    "deepseek_v3": dict(
        n_routed_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=12,
        n_group=4,
        topk_group=2,
        q_lora_rank=16,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=8,
        first_k_dense_replace=1,
        num_key_value_heads=4,
        max_position_embeddings=64,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 16,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
    ),
    "gpt_oss": dict(
        num_local_experts=4,
        num_experts_per_tok=2,
        head_dim=8,
        sliding_window=5,
        max_position_embeddings=64,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 150000.0,
            "factor": 4.0,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "truncate": False,
            "original_max_position_embeddings": 16,
        },
    ),
}


class Case:
    """One family's transformers model, its two saved folders, inputs and reference outputs."""

    def __init__(self, family: str, root: Path, expert_scale: float = 1.0) -> None:
        self.family = family
        torch.manual_seed(0)
        config = transformers.AutoConfig.for_model(family, **{**BASE, **FAMILIES[family]})
        kwargs = dict(dtype=torch.float32, attn_implementation="eager")
        if family != "gpt_oss":  # GPT-OSS has one experts implementation
            kwargs["experts_implementation"] = "eager"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.hf = transformers.AutoModelForCausalLM.from_config(config, **kwargs).eval()
        with torch.no_grad():  # zero-initialized biases and unit norms would hide mapping mistakes
            for name, t in list(self.hf.named_parameters()) + list(self.hf.named_buffers()):
                if "inv_freq" in name:
                    continue
                if "norm" in name:
                    t.copy_(1 + 0.2 * torch.randn_like(t))
                elif name.endswith("bias") or name.endswith("sinks"):
                    t.copy_(0.3 * torch.randn_like(t))
                elif name.endswith("experts.gate_up_proj"):
                    t.mul_(expert_scale)
        self.config = config
        self.per_expert, self.fused = root / "per_expert", root / "fused"
        self.hf.save_pretrained(self.per_expert)
        self.hf.save_pretrained(self.fused, save_original_format=False)
        self.ids = torch.randint(3, V, (2, 12))
        self.mask = torch.ones(2, 12, dtype=torch.long)
        self.mask[1, :4] = 0  # left padding
        with torch.no_grad():
            self.ref = self.hf(self.ids).logits
            self.ref_padded = self.hf(self.ids, attention_mask=self.mask).logits

    def hf_loss(self, labels: torch.Tensor) -> torch.Tensor:
        return self.hf(self.ids, attention_mask=self.mask, labels=labels, output_router_logits=True).loss


@pytest.fixture(scope="module", params=list(FAMILIES))
def case(request, tmp_path_factory) -> Case:
    return Case(request.param, tmp_path_factory.mktemp(request.param))


def max_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    d = (a - b).abs()
    return float((d[mask.bool()] if mask is not None else d).max())


# ---------------------------------------------------------------------- parity with transformers
@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_logits_match_transformers(case, layout):
    model = from_pretrained(getattr(case, layout))
    assert not model.training and model.config.extra["hf_config"]["model_type"] == case.family
    with torch.no_grad():
        plain = model(case.ids).logits
        padded = model(case.ids, attention_mask=case.mask).logits
    assert max_diff(plain, case.ref) <= TOL
    assert max_diff(padded, case.ref_padded, case.mask) <= TOL


def test_gpt_oss_clamped_activation_matches_transformers(tmp_path):
    """GPT-OSS experts with large enough weights that the clamps bind (gate above 7, up outside
    [-7, 7]): logits with and without padding and greedy tokens still equal transformers'."""
    case = Case("gpt_oss", tmp_path, expert_scale=8.0)
    seen = []
    hooks = [
        m.register_forward_hook(lambda m, args, out: seen.append((args[0], m)))
        for n, m in case.hf.named_modules()
        if n.endswith("mlp.experts")
    ]
    with torch.no_grad():
        case.hf(case.ids)
    for h in hooks:
        h.remove()
    for x, experts in seen:  # every expert's pre-activation on every token of the batch
        gate_up = torch.einsum("td,edf->tef", x.reshape(-1, x.shape[-1]), experts.gate_up_proj)
        gate_up = gate_up + experts.gate_up_proj_bias
        assert (gate_up[..., 0::2] > 7).float().mean() > 0.01
        assert (gate_up[..., 1::2].abs() > 7).float().mean() > 0.01
    model = from_pretrained(case.per_expert)
    with torch.no_grad():
        assert max_diff(model(case.ids).logits, case.ref) <= TOL
        assert max_diff(model(case.ids, attention_mask=case.mask).logits, case.ref_padded, case.mask) <= TOL
    test_greedy_generation_matches_transformers(case)


def test_greedy_generation_matches_transformers(case):
    model = from_pretrained(case.per_expert)
    prompt = case.ids[:, :6].clone()
    prompt_mask = torch.ones_like(prompt)
    prompt_mask[1, :2] = 0  # a left-padded row
    prompt[1, :2] = 0
    expected = case.hf.generate(
        prompt,
        attention_mask=prompt_mask,
        max_new_tokens=20,
        do_sample=False,
        eos_token_id=None,
        output_router_logits=False,  # transformers' cached decode fails with router logits on
    )
    got = model.generate(prompt, 20, temperature=0, attention_mask=prompt_mask)
    assert torch.equal(got, expected)


def test_load_balancing_loss_matches_transformers(case):
    model = from_pretrained(case.per_expert, aux_loss="transformers")
    out = model(case.ids, attention_mask=case.mask)
    hf_out = case.hf(case.ids, attention_mask=case.mask, output_router_logits=True)
    top_k = case.config.num_experts_per_tok
    mixtral = importlib.import_module("transformers.models.mixtral.modeling_mixtral")
    num_experts = out.router_logits[0].shape[-1]
    expected = mixtral.load_balancing_loss_func(hf_out.router_logits, num_experts, top_k, case.mask)
    mask_T = case.mask.bool().reshape(-1)
    got = pooled_load_balancing_loss(out.router_logits, top_k, mask_T)
    assert abs(float(got) - float(expected)) <= 1e-5
    assert 0.9 * top_k < float(got) < 2 * top_k  # about k near balance, not 1
    if hf_out.aux_loss is not None:  # DeepSeek-V3 has none in transformers
        assert abs(float(hf_out.aux_loss) - float(got)) <= 1e-5
        coef = case.config.router_aux_loss_coef
        assert abs(float(out.aux_loss) - coef * float(got)) <= 1e-6


def test_default_balance_loss_is_per_layer(case):
    """aux_loss="moekit" (the default): each layer's Switch balance loss on its own, summed over
    layers, times router_aux_loss_coef; a layer's loss is transformers' load_balancing_loss_func of
    that layer's router logits alone divided by k (1 at balance, not k). DeepSeek-V3: none."""
    model = from_pretrained(case.per_expert)
    out = model(case.ids, attention_mask=case.mask)
    hf_out = case.hf(case.ids, attention_mask=case.mask, output_router_logits=True)
    mixtral = importlib.import_module("transformers.models.mixtral.modeling_mixtral")
    k, num_experts = case.config.num_experts_per_tok, hf_out.router_logits[0].shape[-1]
    assert len(hf_out.router_logits) == len(model.moe_layers)
    per_layer = [
        float(mixtral.load_balancing_loss_func((logits,), num_experts, k, case.mask)) / k
        for logits in hf_out.router_logits
    ]
    assert all(0.9 < x < num_experts for x in per_layer)  # 1 at balance, E at collapse
    coef = model.config.moe.load_balance_coef
    if case.family == "deepseek_v3":
        assert coef == 0.0 and float(out.aux_loss) == 0.0
        return
    assert coef == case.config.router_aux_loss_coef > 0
    assert float(out.aux_loss) == pytest.approx(coef * sum(per_layer), rel=1e-5)


def test_transformers_mode_training_loss_matches(case):
    """ce + router_aux_loss_coef * pooled aux, and its gradients, as transformers computes them."""
    if case.family == "deepseek_v3":
        pytest.skip("transformers adds no balance loss to DeepSeek-V3")
    model = from_pretrained(case.per_expert, aux_loss="transformers")
    labels = case.ids.masked_fill(case.mask == 0, -100)
    labels[1, 4] = -100  # its logits come from a padding position, which no implementation defines
    targets = torch.full_like(labels, -100)
    targets[:, :-1] = labels[:, 1:]  # transformers shifts labels inside its loss
    ours = model(case.ids, targets=targets, attention_mask=case.mask).loss
    theirs = case.hf_loss(labels)
    assert abs(float(ours) - float(theirs)) <= 1e-5
    ours.backward()
    theirs.backward()
    routers = [
        p.grad for n, p in case.hf.named_parameters() if n.endswith(("mlp.gate.weight", "mlp.router.weight"))
    ]
    case.hf.zero_grad(set_to_none=True)
    mine = [layer.router.gate.weight.grad for layer in model.moe_layers]
    assert len(mine) == len(routers) > 0
    for a, b in zip(mine, routers):
        assert max_diff(a, b) <= 1e-5


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_streaming_in_small_slabs_loads_the_same(case, layout):
    """Tensors read a few rows at a time (as large ones are) and converted to another dtype."""
    from moekit.hf import config_from_hf, empty_model, family, moekit_shapes, plan_for
    from moekit.hf.io import SafetensorsReader
    from moekit.hf.plan import check_plan, load_plan

    folder = getattr(case, layout)
    cfg = config_from_hf(json.loads((folder / "config.json").read_text()))
    reader = SafetensorsReader(folder)
    plan = plan_for(cfg, family(case.family), reader.keys())
    check_plan(plan, moekit_shapes(cfg))
    for dtype in (torch.float32, torch.float64):
        model = empty_model(cfg, dtype).eval()
        load_plan(plan, reader, dict(model.state_dict()), slab_bytes=300)
        with torch.no_grad():
            assert max_diff(model(case.ids).logits.float(), case.ref) <= TOL


# ---------------------------------------------------------------------- saving
@pytest.mark.parametrize("fused", [False, True])
def test_save_pretrained_loads_back_in_transformers(case, fused, tmp_path):
    model = from_pretrained(case.per_expert)
    model.save_pretrained(tmp_path, fused=fused, max_shard_size="30KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()  # sharded
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    with torch.no_grad():
        assert max_diff(back(case.ids).logits, case.ref) <= 1e-6
    again = from_pretrained(tmp_path)  # and moekit reads its own sharded output
    with torch.no_grad():
        assert max_diff(again(case.ids).logits, case.ref) <= TOL


def test_saving_again_replaces_the_weights_atomically(mixtral_dir, tmp_path, monkeypatch):
    """A save into a folder that holds an earlier (sharded) save leaves none of its weight files,
    keeps the files that are not weights, and a save that fails leaves the old folder as it was."""
    import moekit.hf.io as hf_io

    first = from_pretrained(mixtral_dir)
    out = tmp_path / "out"
    first.save_pretrained(out, max_shard_size="20KB")
    (out / "tokenizer.json").write_text("{}")
    second = from_pretrained(mixtral_dir)
    with torch.no_grad():
        for p in second.parameters():
            p.mul_(-1)
    second.save_pretrained(out)  # one file now: the old index must not shadow it
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    ids = torch.randint(3, V, (1, 8))
    with torch.no_grad():
        assert torch.equal(from_pretrained(out)(ids).logits, second(ids).logits)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls = []

    def failing_save_file(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise OSError("disk full")
        save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(hf_io, "save_file", failing_save_file)
    with pytest.raises(OSError, match="disk full"):
        first.save_pretrained(out, max_shard_size="20KB")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no partial folder left


def test_pure_conversion_round_trip_is_exact(case):
    hf_state = load_file(case.per_expert / "model.safetensors")
    hf_config = json.loads((case.per_expert / "config.json").read_text())
    state, cfg = convert_from_hf(hf_state, hf_config)
    back, back_config = convert_to_hf(state, cfg)
    assert set(back) == set(hf_state)
    for key, value in hf_state.items():
        assert torch.equal(back[key], value), key
    assert back_config["model_type"] == case.family
    fused_state, _ = convert_to_hf(state, cfg, fused=True)
    if case.family != "gpt_oss":  # the fused form is a different set of keys
        assert any(k.endswith("experts.gate_up_proj") for k in fused_state)


def test_cli_convert_round_trip(case, tmp_path):
    from moekit.cli import main
    from moekit.train import checkpoint as ckpt

    assert main(["convert", "--from-hf", str(case.fused), "--out", str(tmp_path / "ckpt")]) == 0
    model, config = ckpt.load_model(tmp_path / "ckpt")
    assert config["arch"] == "decoder"
    with torch.no_grad():
        assert max_diff(model(case.ids).logits, case.ref) <= TOL
    assert main(["convert", "--to-hf", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")]) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        assert max_diff(back(case.ids).logits, case.ref) <= 1e-6


# ---------------------------------------------------------------------- sparse-layer rules
def _hf_sparse_layers(family: str, **fields) -> list[int]:
    """The layers transformers itself builds with an MoE block (a meta-device model)."""
    config = transformers.AutoConfig.for_model(family, **{**BASE, **FAMILIES[family], **fields})
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_config(config)
    return [i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")]


@pytest.mark.parametrize(
    "family, fields",
    [
        *[
            (family, dict(num_hidden_layers=8, decoder_sparse_step=step, mlp_only_layers=dense))
            for family in ("qwen2_moe", "qwen3_moe")
            for step, dense in (
                (1, []),
                (2, []),
                (3, [2]),
                (2, [1, 5]),
                (1, [0, 7]),
                (4, [3]),
                (2, [0, 2, 4]),
            )
        ],
        *[("deepseek_v3", dict(num_hidden_layers=5, first_k_dense_replace=k)) for k in (0, 1, 4)],
    ],
)
def test_sparse_layer_rules_match_transformers(family, fields):
    """decoder_sparse_step with mlp_only_layers (Qwen2/3-MoE) and first_k_dense_replace (DeepSeek-V3):
    moekit's MoE layers are the ones transformers builds, before and after a save's config."""
    from moekit.hf import config_from_hf, config_to_hf

    expected = _hf_sparse_layers(family, **fields)
    config = transformers.AutoConfig.for_model(family, **{**BASE, **FAMILIES[family], **fields})
    cfg = config_from_hf(config.to_dict())
    assert cfg.moe_layer_ids() == expected
    written = config_to_hf(cfg)
    keys = ("decoder_sparse_step", "mlp_only_layers", "first_k_dense_replace")
    assert (
        _hf_sparse_layers(family, **{**fields, **{k: written[k] for k in keys if k in written}}) == expected
    )


@pytest.mark.parametrize(
    "family, fields",
    [
        ("qwen2_moe", dict(mlp_only_layers=[0, 1, 2])),
        ("qwen3_moe", dict(decoder_sparse_step=4)),
        ("deepseek_v3", dict(first_k_dense_replace=3)),
    ],
)
def test_config_without_a_sparse_layer_is_refused(family, fields):
    from moekit.hf import config_from_hf

    config = transformers.AutoConfig.for_model(family, **{**BASE, **FAMILIES[family], **fields})
    assert _hf_sparse_layers(family, **fields) == []  # transformers builds a dense model
    with pytest.raises(
        CheckpointFormatError, match=f"{family} config.json makes no layer sparse.*MoE models only"
    ):
        config_from_hf(config.to_dict())


# ---------------------------------------------------------------------- config variants
def _rewrite_config(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    edit(config)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_config_name_variants_load_the_same(case, tmp_path):
    """Hub-style names: Qwen3-MoE's num_experts (5.23 writes num_local_experts); 4.x rope_theta +
    rope_scaling with "type" instead of rope_parameters (DeepSeek-V3)."""
    family = case.family
    if family not in ("qwen3_moe", "deepseek_v3"):
        pytest.skip("the variants concern Qwen3-MoE and DeepSeek-V3")

    def edit(c):
        if family == "qwen3_moe":
            c["num_experts"] = c.pop("num_local_experts")
        else:
            rope = c.pop("rope_parameters")
            c["rope_theta"] = rope.pop("rope_theta")
            c["rope_scaling"] = {"type": rope.pop("rope_type"), **rope}

    model = from_pretrained(_rewrite_config(case.per_expert, tmp_path / "variant", edit))
    with torch.no_grad():
        assert max_diff(model(case.ids).logits, case.ref) <= TOL


# ---------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory) -> Path:
    return Case("mixtral", tmp_path_factory.mktemp("mixtral_bad")).per_expert


def test_unsupported_model_type_lists_the_supported(mixtral_dir, tmp_path):
    folder = _rewrite_config(mixtral_dir, tmp_path / "llama", lambda c: c.update(model_type="llama"))
    with pytest.raises(CheckpointFormatError, match="'llama' is not supported.*mixtral.*qwen2_moe.*gpt_oss"):
        from_pretrained(folder)


def test_missing_tensor_is_named(mixtral_dir, tmp_path):
    folder = tmp_path / "missing"
    shutil.copytree(mixtral_dir, folder)
    state = load_file(folder / "model.safetensors")
    del state["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        CheckpointFormatError, match=r"model\.safetensors': tensor .*experts\.2\.w3\.weight' is missing"
    ):
        from_pretrained(folder)


def test_missing_shard_is_named(mixtral_dir, tmp_path):
    model = from_pretrained(mixtral_dir)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    shard = sorted((tmp_path / "sharded").glob("model-0000*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointFormatError, match=f"shard .*{shard.name}.* is missing"):
        from_pretrained(tmp_path / "sharded")


def test_wrong_shape_names_key_and_both_shapes(mixtral_dir, tmp_path):
    folder = tmp_path / "shape"
    shutil.copytree(mixtral_dir, folder)
    state = load_file(folder / "model.safetensors")
    state["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(8, 32)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointFormatError, match=r"k_proj\.weight.*shape \(8, 32\).*implies \(16, 32\)"):
        from_pretrained(folder)


@pytest.mark.parametrize(
    "edit, message",
    [
        (dict(num_hidden_layers=2), r"does not account for.*layers\.2\..*contradicts"),
        (dict(num_local_experts=3), r"contradicts"),
        (dict(intermediate_size=20), r"shape \(24, 32\) but config.json implies \(20, 32\)"),
    ],
)
def test_config_contradicting_the_tensors_is_refused(mixtral_dir, tmp_path, edit, message):
    folder = _rewrite_config(mixtral_dir, tmp_path / "contradiction", lambda c: c.update(edit))
    with pytest.raises(CheckpointFormatError, match=message):
        from_pretrained(folder)


def test_truncated_file_is_reported_before_loading(mixtral_dir, tmp_path):
    folder = tmp_path / "truncated"
    shutil.copytree(mixtral_dir, folder)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointFormatError, match="truncated"):
        from_pretrained(folder)


def test_failed_convert_writes_nothing(mixtral_dir, tmp_path, capsys):
    from moekit.cli import main

    folder = _rewrite_config(mixtral_dir, tmp_path / "bad", lambda c: c.update(num_hidden_layers=2))
    assert main(["convert", "--from-hf", str(folder), "--out", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()
    assert "contradicts" in capsys.readouterr().err


def test_model_a_family_cannot_express_is_refused(mixtral_dir, tmp_path):
    import dataclasses

    from moekit.model import MoETransformer

    model = from_pretrained(mixtral_dir)
    cfg = dataclasses.replace(model.config, qkv_bias=True)
    with pytest.raises(ValueError, match="cannot be saved as mixtral: qkv_bias: model has True"):
        MoETransformer(cfg).save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="not imported from Hugging Face: pass model_type"):
        MoETransformer(dataclasses.replace(cfg, extra={})).save_pretrained(tmp_path / "out")


def test_top_level_export():
    assert moekit.from_pretrained is from_pretrained


# ---------------------------------------------------------------------- fine-tuning with moekit's trainer
@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    root = Path(sysconfig.get_paths()["stdlib"])
    out = tmp_path_factory.mktemp("hf_corpus")
    (out / "val").mkdir()
    files = sorted(p for p in root.glob("*.py") if p.stat().st_size > 2000)[:20]
    for i, p in enumerate(files):
        shutil.copy(p, out / ("val" if i % 9 == 0 else ".") / (p.stem + ".txt"))
    return out


def test_imported_mixtral_finetunes_with_the_trainer(corpus_dir, tmp_path):
    from moekit.train import Trainer, load_config

    config = transformers.AutoConfig.for_model(
        "mixtral", **{**BASE, **FAMILIES["mixtral"], "vocab_size": 300, "num_hidden_layers": 2}
    )
    hf = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    hf.save_pretrained(tmp_path / "hf")
    model = from_pretrained(tmp_path / "hf", aux_loss="transformers").train()
    overrides = {
        "data.paths": f'["{corpus_dir}/*.txt"]',
        "data.validation_paths": f'["{corpus_dir}/val/*.txt"]',
        "data.cache_dir": f'"{tmp_path / "cache"}"',
        "data.vocab_size": "300",
        "data.seq_len": "32",
        "data.batch_size": "4",
        "data.eval_batch_size": "4",
        "train.steps": "20",
        "train.lr": "1e-2",
        "train.warmup_steps": "2",
        "train.log_every": "10",
        "train.eval_every": "1000",
        "train.eval_batches": "1",
        "train.save_every": "1000",
        "train.out_dir": f'"{tmp_path / "runs"}"',
        "train.progress": "false",
    }
    result = Trainer(load_config(None, [f"{k}={v}" for k, v in overrides.items()]), model=model).fit()
    losses = result.train_losses
    assert len(losses) == 20
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.5
