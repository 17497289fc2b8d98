"""Tests for moekit.hf.switch against transformers' own Switch Transformers (the reference).

Tiny random models built by transformers in float32 are saved, loaded into moekit's
MoEEncoderDecoder and compared: logits with and without padding, with a capacity small enough to
drop tokens and one large enough to drop none; greedy decoding; moekit -> transformers round trips;
router losses against `router_z_loss_func` / `load_balancing_loss_func`; malformed folders.

Run: python -m pytest tests/test_hf_switch.py
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")
hf_switch = pytest.importorskip("transformers.models.switch_transformers.modeling_switch_transformers")

from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import moekit  # noqa: E402
from moekit.hf import CheckpointFormatError  # noqa: E402
from moekit.hf.switch import (  # noqa: E402
    hf_switch_router_losses,
    load_switch,
    save_switch,
    switch_config_from_hf,
    switch_config_to_hf,
    switch_sparse_layers,
    switch_token_ids,
)
from moekit.model import ModelConfig, MoEEncoderDecoder, relative_position_bucket  # noqa: E402
from moekit.moe import MoE  # noqa: E402
from moekit.moe import losses as L  # noqa: E402

V, TOL = 50, 1e-4
SMALL_CAPACITY, LARGE_CAPACITY = 2, 64


def hf_config(**kw):
    base = dict(
        vocab_size=V,
        d_model=32,
        d_kv=8,
        d_ff=16,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        num_experts=4,
        expert_capacity=LARGE_CAPACITY,
        num_sparse_encoder_layers=1,
        num_sparse_decoder_layers=1,
        dropout_rate=0.0,
        decoder_start_token_id=0,
    )
    return transformers.SwitchTransformersConfig(**{**base, **kw})


def build_hf(seed: int = 0, **kw):
    torch.manual_seed(seed)
    return transformers.SwitchTransformersForConditionalGeneration(hf_config(**kw)).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{capacity: (hf model, folder)} for a small (drops tokens) and a large (drops none) capacity."""
    out = {}
    for cap in (SMALL_CAPACITY, LARGE_CAPACITY):
        model = build_hf(expert_capacity=cap)
        folder = tmp_path_factory.mktemp(f"switch_cap{cap}")
        model.save_pretrained(folder)
        out[cap] = (model, folder)
    return out


def batch(seed: int = 1, left_pad: bool = False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(2, V, (3, 12), generator=g)
    y = torch.randint(2, V, (3, 8), generator=g)
    mask = torch.ones_like(x)
    mask[1, 8:] = 0
    mask[2, 5:] = 0
    if left_pad:
        mask = mask.flip(1)
    return x, y, mask


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ---------------------------------------------------------------------- logits and decoding


@pytest.mark.parametrize("cap", [SMALL_CAPACITY, LARGE_CAPACITY])
@pytest.mark.parametrize("padded", [False, True])
def test_logits_match_transformers(saved, cap, padded):
    hf, folder = saved[cap]
    model = load_switch(folder)
    x, y, mask = batch()
    mask = mask if padded else None
    with torch.no_grad():
        ref = hf(input_ids=x, attention_mask=mask, decoder_input_ids=y).logits
        out = model(x, y, attention_mask=mask)
    assert max_diff(out.logits, ref) <= TOL
    dropped = [s.dropped_fraction.item() for s in out.encoder_router_stats + out.decoder_router_stats]
    if cap == SMALL_CAPACITY:
        assert max(dropped) > 0.1  # the comparison really exercised dropping
    else:
        assert max(dropped) == 0.0


def test_left_padding_matches_when_nothing_is_dropped(saved):
    hf, folder = saved[LARGE_CAPACITY]
    model = load_switch(folder)
    x, y, mask = batch(left_pad=True)
    with torch.no_grad():
        assert (
            max_diff(
                model(x, y, attention_mask=mask).logits,
                hf(input_ids=x, attention_mask=mask, decoder_input_ids=y).logits,
            )
            <= TOL
        )


def lively_hf(capacity: int):
    """A model whose greedy tokens change along the sequence (transformers' tiny random init keeps
    repeating one token, which would not show a wrong cache): an untied random LM head, and the
    decoder's attention values and output projections scaled up."""
    hf = build_hf(expert_capacity=capacity, tie_word_embeddings=False)
    with torch.no_grad():
        hf.encoder.embed_tokens.weight.copy_(hf.shared.weight)  # moekit shares one embedding
        hf.decoder.embed_tokens.weight.copy_(hf.shared.weight)
        for name, p in hf.named_parameters():
            if name.startswith("decoder") and name.endswith(("o.weight", "v.weight")):
                p.mul_(10)
    return hf


@pytest.mark.parametrize("cap", [SMALL_CAPACITY, LARGE_CAPACITY])
def test_greedy_generation_matches_transformers(tmp_path, cap):
    hf = lively_hf(cap)
    hf.save_pretrained(tmp_path)
    model = moekit.from_pretrained(tmp_path)  # the top-level entry dispatches to load_switch
    assert isinstance(model, MoEEncoderDecoder) and not model.training
    x, _, mask = batch(seed=2)
    with torch.no_grad():
        ref = hf.generate(input_ids=x, attention_mask=mask, max_new_tokens=20, do_sample=False, num_beams=1)
    ids = switch_token_ids(model.config.extra["hf_config"])
    assert ids == {"decoder_start_id": 0, "eos_id": 1, "pad_id": 0}
    got = model.generate(x, 20, mask, **ids)
    assert got.tolist() == ref.tolist()
    assert got.shape[1] == 21 and any(len(set(row[3:])) > 1 for row in got.tolist())  # not one token repeated


def test_bfloat16_router_matches_transformers(tmp_path):
    hf = build_hf(seed=15, expert_capacity=3, router_dtype="bfloat16")
    hf.save_pretrained(tmp_path)
    model = load_switch(tmp_path)
    assert model.config.moe.router_dtype == "bfloat16"
    x, y, mask = batch(seed=16)
    with torch.no_grad():
        ref = hf(input_ids=x, attention_mask=mask, decoder_input_ids=y).logits
        assert max_diff(model(x, y, attention_mask=mask).logits, ref) <= TOL


def test_sparse_mlp_semantics_match_transformers(saved):
    """One sparse layer on the same hidden states: per-sequence capacity, position priority, dropped
    tokens get exactly zero (transformers 5.23; 4.x passed them through scaled by p_max)."""
    hf, folder = saved[SMALL_CAPACITY]
    model = load_switch(folder)
    hf_mlp = hf.encoder.block[1].layer[1].mlp
    moe: MoE = model.encoder[1].ffn
    h = torch.randn(3, 10, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf_mlp(h)
        out = moe(h)
        expert_mask, _, _ = hf_mlp.router(h.clone())
    assert max_diff(out.output, ref) <= 1e-5
    dropped = expert_mask.sum(-1) == 0  # [B, S] tokens transformers dropped
    assert dropped.any() and (ref[dropped] == 0).all() and (out.output[dropped] == 0).all()
    assert out.stats.routed_per_expert.sum() == 30 and out.stats.tokens_per_expert.sum() == (~dropped).sum()


# ---------------------------------------------------------------------- round trips and layouts


@pytest.mark.parametrize("tied", [True, False])
def test_round_trip_moekit_to_transformers(tmp_path, tied):
    hf = build_hf(
        seed=4,
        expert_capacity=3,
        tie_word_embeddings=tied,
        router_bias=True,
        num_layers=4,
        num_sparse_encoder_layers=2,
    )
    if not tied:  # transformers 5.x unties encoder/decoder.embed_tokens too; moekit shares one matrix
        with torch.no_grad():
            hf.encoder.embed_tokens.weight.copy_(hf.shared.weight)
            hf.decoder.embed_tokens.weight.copy_(hf.shared.weight)
    hf.save_pretrained(tmp_path / "hf")
    model = load_switch(tmp_path / "hf")
    assert [b.is_moe for b in model.encoder] == [False, True, False, True]
    save_switch(model, tmp_path / "moekit")
    again = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "moekit").eval()
    x, y, mask = batch(seed=5)
    with torch.no_grad():
        ref = hf(input_ids=x, attention_mask=mask, decoder_input_ids=y).logits
        assert max_diff(model(x, y, attention_mask=mask).logits, ref) <= TOL
        assert max_diff(again(input_ids=x, attention_mask=mask, decoder_input_ids=y).logits, ref) <= TOL
    written = json.loads((tmp_path / "moekit" / "config.json").read_text())
    assert dataclasses.replace(switch_config_from_hf(written), extra={}) == dataclasses.replace(
        model.config, extra={}
    )
    assert switch_token_ids(written) == switch_token_ids(model.config.extra["hf_config"])


def test_moekit_built_model_saves_and_reloads(tmp_path):
    """A Switch model configured in moekit (not converted) goes to transformers with equal logits."""
    cfg = switch_config_from_hf(
        hf_config(
            expert_capacity=3, num_layers=3, num_decoder_layers=4, num_sparse_decoder_layers=2
        ).to_dict()
    )
    torch.manual_seed(6)
    model = MoEEncoderDecoder(cfg).eval()
    save_switch(model, tmp_path, max_shard_bytes=20_000)  # sharded, with an index
    assert (tmp_path / "model.safetensors.index.json").is_file()
    hf = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path).eval()
    x, y, mask = batch(seed=7)
    with torch.no_grad():
        assert (
            max_diff(
                model(x, y, attention_mask=mask).logits,
                hf(input_ids=x, attention_mask=mask, decoder_input_ids=y).logits,
            )
            <= TOL
        )
    reloaded = load_switch(tmp_path)
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_top_level_save_pretrained_and_resave(tmp_path, saved):
    """moekit.from_pretrained -> model.save_pretrained (sharded, bfloat16 on request) -> transformers'
    AutoModelForSeq2SeqLM gives the same logits; saving again into the same folder as one file
    leaves no stale shard or index behind and keeps files that are not weights."""
    hf, folder = saved[SMALL_CAPACITY]
    model = moekit.from_pretrained(folder)
    out = tmp_path / "out"
    assert model.save_pretrained(out, max_shard_size="20KB") == out.absolute()
    assert (out / "model.safetensors.index.json").is_file()
    x, y, mask = batch(seed=17)
    with torch.no_grad():
        ref = hf(input_ids=x, attention_mask=mask, decoder_input_ids=y).logits
        back = transformers.AutoModelForSeq2SeqLM.from_pretrained(out).eval()
        assert max_diff(back(input_ids=x, attention_mask=mask, decoder_input_ids=y).logits, ref) == 0.0
    (out / "tokenizer.json").write_text("{}")
    model.save_pretrained(out, dtype=torch.bfloat16)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    again = moekit.from_pretrained(out)
    assert again.tok_embeddings.weight.dtype == torch.bfloat16
    assert torch.equal(again.tok_embeddings.weight, model.tok_embeddings.weight.bfloat16())
    with pytest.raises(ValueError, match="saves only as 'switch_transformers'"):
        model.save_pretrained(tmp_path / "other", model_type="mixtral")
    with pytest.raises(ValueError, match="aux_loss='transformers' applies to the decoder families"):
        moekit.from_pretrained(folder, aux_loss="transformers")
    assert not (tmp_path / "other").exists()


def test_cli_convert_round_trip(tmp_path, saved):
    from moekit.cli import main
    from moekit.train import checkpoint as ckpt

    hf, folder = saved[SMALL_CAPACITY]
    assert main(["convert", "--from-hf", str(folder), "--out", str(tmp_path / "ckpt")]) == 0
    model, config = ckpt.load_model(tmp_path / "ckpt")
    assert config["arch"] == "encdec"
    x, y, mask = batch(seed=18)
    with torch.no_grad():
        ref = hf(input_ids=x, attention_mask=mask, decoder_input_ids=y).logits
        assert max_diff(model.eval()(x, y, attention_mask=mask).logits, ref) <= TOL
    assert main(["convert", "--to-hf", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")]) == 0
    back = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        assert max_diff(back(input_ids=x, attention_mask=mask, decoder_input_ids=y).logits, ref) == 0.0


def test_sharded_checkpoint_and_fused_format_flag(tmp_path, saved):
    hf, _ = saved[SMALL_CAPACITY]
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    hf.save_pretrained(tmp_path / "fused", save_original_format=False)
    with safe_open(tmp_path / "fused" / "model.safetensors", "pt") as f:  # Switch has no fused layout
        names = f.keys()  # a safe_open handle is not iterable
        assert any(".experts.expert_0.wi.weight" in k for k in names)
    x, y, mask = batch(seed=8)
    with torch.no_grad():
        ref = hf(input_ids=x, attention_mask=mask, decoder_input_ids=y).logits
        for name in ("sharded", "fused"):
            assert max_diff(load_switch(tmp_path / name)(x, y, attention_mask=mask).logits, ref) <= TOL


# ---------------------------------------------------------------------- config mapping


@pytest.mark.parametrize("layers,sparse", [(2, 1), (4, 1), (6, 2), (6, 3), (8, 3), (3, 0), (4, 4), (2, 3)])
def test_sparse_layer_rule_matches_transformers(layers, sparse):
    stack = transformers.models.switch_transformers.modeling_switch_transformers.SwitchTransformersStack
    cfg = hf_config(
        d_model=8,
        d_kv=2,
        d_ff=4,
        num_heads=2,
        vocab_size=8,
        num_layers=layers,
        num_sparse_encoder_layers=sparse,
    )
    with torch.device("meta"):
        encoder = stack(cfg)
    assert switch_sparse_layers(layers, sparse) == [i for i, b in enumerate(encoder.block) if b.is_sparse]


def test_config_defaults_and_refusals(saved):
    _, folder = saved[LARGE_CAPACITY]
    hf = json.loads((folder / "config.json").read_text())
    del hf["num_decoder_layers"]  # transformers' default is 12, not num_layers
    assert switch_config_from_hf(hf).n_layers == 12
    assert switch_config_from_hf({**hf, "num_decoder_layers": None}).n_layers == hf["num_layers"]
    cfg = switch_config_from_hf(hf)
    assert cfg.output_scale == 32**-0.5 and cfg.attn_scale == 1.0 and cfg.moe.capacity_group == "sequence"
    with pytest.raises(ValueError, match="model_type"):
        switch_config_from_hf({**hf, "model_type": "t5"})
    with pytest.raises(ValueError, match="dense_act_fn"):
        switch_config_from_hf({**hf, "dense_act_fn": "gated-gelu"})
    with pytest.raises(ValueError, match="router_dtype"):
        switch_config_from_hf({**hf, "router_dtype": "float16"})
    with pytest.raises(ValueError, match="sparse_layers"):
        switch_config_to_hf(ModelConfig.from_dict({**cfg.to_dict(), "sparse_layers": [0]}))
    with pytest.raises(ValueError, match="position_encoding"):
        switch_config_to_hf(
            ModelConfig.from_dict({**cfg.to_dict(), "position_encoding": "rope", "head_dim": 8})
        )


def test_relative_position_buckets_match_transformers():
    rel = torch.arange(-300, 300)[None, :]
    bucket = hf_switch.SwitchTransformersAttention._relative_position_bucket
    for bidirectional in (True, False):
        for num_buckets, max_distance in ((32, 128), (8, 20)):
            ref = bucket(rel, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance)
            assert torch.equal(relative_position_bucket(rel, bidirectional, num_buckets, max_distance), ref)


# ---------------------------------------------------------------------- losses


def test_router_losses_equal_transformers_functions():
    g = torch.Generator().manual_seed(9)
    layers = [torch.randn(3, 7, 4, generator=g) * 2 for _ in range(3)]  # [B, S, E] per sparse layer
    pooled = torch.cat(layers, dim=1)
    z, aux = hf_switch_router_losses(layers)
    assert math.isclose(z.item(), hf_switch.router_z_loss_func(pooled).item(), rel_tol=1e-6)
    ref_aux = hf_switch.load_balancing_loss_func(pooled.softmax(-1), pooled.argmax(-1))
    assert math.isclose(aux.item(), ref_aux.item(), rel_tol=1e-6)
    # one layer: moekit's own per-layer functions are the same losses
    logits_TE = layers[0].reshape(-1, 4)
    assert math.isclose(
        L.router_z_loss(logits_TE).item(), hf_switch.router_z_loss_func(layers[0]).item(), rel_tol=1e-6
    )
    seq = L.sequence_balance_loss(logits_TE.softmax(-1), logits_TE.argmax(-1), torch.arange(21), 3)
    ref_one = hf_switch.load_balancing_loss_func(layers[0].softmax(-1), layers[0].argmax(-1))
    assert math.isclose(seq.item(), ref_one.item(), rel_tol=1e-6)


def test_model_losses_equal_transformers(saved):
    """One sparse layer per stack (sparse_step 2): moekit's weighted losses equal transformers'."""
    hf, folder = saved[SMALL_CAPACITY]
    model = load_switch(folder)
    x, y, _ = batch(seed=10)
    labels = torch.randint(0, V, y.shape, generator=torch.Generator().manual_seed(11))
    labels[0, -2:] = -100
    with torch.no_grad():
        ref = hf(input_ids=x, decoder_input_ids=y, labels=labels, output_router_logits=True)
        out = model(x, y, labels=labels)
    cfg = hf.config
    assert math.isclose(
        out.encoder_z_loss.item(), cfg.router_z_loss_coef * ref.encoder_z_loss.item(), rel_tol=1e-5
    )
    assert math.isclose(
        out.decoder_z_loss.item(), cfg.router_z_loss_coef * ref.decoder_z_loss.item(), rel_tol=1e-5
    )
    assert math.isclose(
        out.encoder_aux_loss.item(), cfg.router_aux_loss_coef * ref.encoder_aux_loss.item(), rel_tol=1e-5
    )
    assert math.isclose(
        out.decoder_aux_loss.item(), cfg.router_aux_loss_coef * ref.decoder_aux_loss.item(), rel_tol=1e-5
    )
    assert abs(out.loss.item() - ref.loss.item()) <= 1e-5
    z, aux = hf_switch_router_losses(ref.encoder_router_logits)
    assert math.isclose(z.item(), ref.encoder_z_loss.item(), rel_tol=1e-6)
    assert math.isclose(aux.item(), ref.encoder_aux_loss.item(), rel_tol=1e-6)


def test_transformers_losses_vanish_when_every_layer_is_sparse(tmp_path):
    """Known transformers bug (REFERENCE section 7): with sparse_step 1 its losses are 0; moekit's are not."""
    hf = build_hf(seed=12, num_sparse_encoder_layers=2, num_sparse_decoder_layers=2)
    hf.save_pretrained(tmp_path)
    x, y, _ = batch(seed=13)
    with torch.no_grad():
        ref = hf(input_ids=x, decoder_input_ids=y, output_router_logits=True)
        out = load_switch(tmp_path)(x, y)
    assert ref.encoder_aux_loss == 0 and ref.encoder_z_loss == 0
    z, aux = hf_switch_router_losses(ref.encoder_router_logits)  # what it should have reported
    assert aux.item() > 0.5 and out.encoder_aux_loss.item() > 0 and out.encoder_z_loss.item() > 0


def test_training_jitter_leaves_the_input_alone(saved):
    _, folder = saved[SMALL_CAPACITY]
    moe = load_switch(folder).encoder[1].ffn.train()
    h = torch.randn(2, 5, 32)
    before = h.clone()
    moe(h)
    assert torch.equal(h, before)  # transformers' router multiplies its input in place


# ---------------------------------------------------------------------- malformed folders


def test_bad_folders_name_the_file_and_key(tmp_path, saved):
    _, folder = saved[SMALL_CAPACITY]
    with pytest.raises(CheckpointFormatError, match="config.json.* is missing"):
        load_switch(tmp_path)
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(CheckpointFormatError, match="has neither model.safetensors nor"):
        load_switch(tmp_path)

    with safe_open(folder / "model.safetensors", "pt") as f:
        names = f.keys()  # a safe_open handle is not iterable
        tensors = {k: f.get_tensor(k) for k in names}
    key = "encoder.block.1.layer.1.mlp.experts.expert_2.wo.weight"
    save_file({k: v for k, v in tensors.items() if k != key}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointFormatError, match=rf"model\.safetensors.*{key}' is missing"):
        load_switch(tmp_path)

    save_file({**tensors, key: tensors[key].t().contiguous()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(
        CheckpointFormatError,
        match=rf"{key}' in .*model\.safetensors' has shape \(16, 32\).*implies \(32, 16\)",
    ):
        load_switch(tmp_path)

    save_file(
        {
            **tensors,
            "encoder.block.0.layer.1.mlp.router.classifier.weight": tensors["shared.weight"][:4].clone(),
        },
        str(tmp_path / "model.safetensors"),
    )
    with pytest.raises(CheckpointFormatError, match="does not account for.*router.classifier.*contradicts"):
        load_switch(tmp_path)

    bad = json.loads((folder / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**bad, "num_sparse_encoder_layers": 2}))
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(
        CheckpointFormatError, match=r"encoder.block.0.layer.1.mlp.router.classifier.weight.*\[0, 1\]"
    ):
        load_switch(tmp_path)  # config says every encoder layer is sparse; the checkpoint disagrees


def test_bad_sharded_folders(tmp_path, saved):
    hf, _ = saved[SMALL_CAPACITY]
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    key = "decoder.final_layer_norm.weight"
    shard = index["weight_map"][key]
    shutil.move(tmp_path / shard, tmp_path / "elsewhere.safetensors")
    with pytest.raises(CheckpointFormatError, match=rf"shard .*{shard}.* is missing"):
        load_switch(tmp_path)
    shutil.move(tmp_path / "elsewhere.safetensors", tmp_path / shard)
    del index["weight_map"][key]
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointFormatError, match=rf"index\.json.*{key}' is missing"):
        load_switch(tmp_path)


def test_untied_checkpoint_with_different_embeddings_is_refused(tmp_path):
    hf = build_hf(seed=14, tie_word_embeddings=False)  # transformers gives encoder/decoder their own
    hf.save_pretrained(tmp_path)
    with pytest.raises(CheckpointFormatError, match="encoder.embed_tokens.weight.*differs"):
        load_switch(tmp_path)
