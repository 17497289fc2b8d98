"""Sparse upcycling: the upcycled model's initial outputs equal the dense model's, experts are
exact copies of the dense FFN, noise, refusals, checkpoint round trip and the CLI."""

from __future__ import annotations

import pytest
import torch

from moekit.adapt.upcycle import upcycle_model, upcycled_config
from moekit.cli import main as cli_main
from moekit.model import ModelConfig, MoEEncoderDecoder, MoETransformer
from moekit.train import checkpoint as ckpt
from tests.adapt_helpers import tiny_corpus, tiny_model_config, train_checkpoint


def dense_model(**kw) -> MoETransformer:
    torch.manual_seed(0)
    return MoETransformer(tiny_model_config(moe=False, **kw)).eval()


@pytest.mark.parametrize(
    ("activation", "layers", "router", "top_k"),
    [
        ("swiglu", "every", "topk", 2),
        ("swiglu", "every_other", "topk_then_softmax", 2),
        ("relu", "every", "topk", 3),
        ("gelu", "every_other", "topk", 1),
    ],
)
def test_upcycled_outputs_equal_the_dense_model(activation, layers, router, top_k):
    dense = dense_model(ffn_activation=activation, n_layers=4)
    moe = upcycle_model(dense, "decoder", 4, top_k, layers=layers, router=router, seed=3).eval()
    assert moe.config.moe_layer_ids() == ([0, 1, 2, 3] if layers == "every" else [1, 3])
    x = torch.randint(0, dense.config.vocab_size, (3, 20))
    out = moe(x)
    torch.testing.assert_close(out.logits, dense(x).logits, rtol=1e-5, atol=1e-5)
    assert len(out.router_stats) == len(moe.config.moe_layer_ids())
    assert out.aux_loss > 0  # new routers, real balance losses from the first step
    ffn, bank = dense.layers[1].ffn, moe.layers[1].ffn.experts
    for e in range(4):  # every expert an exact copy: [w1^T | w3^T] and w2^T
        w3 = [] if ffn.w3 is None else [ffn.w3.weight.t()]
        assert torch.equal(bank.w_in_EDF[e], torch.cat([ffn.w1.weight.t(), *w3], dim=1))
        assert torch.equal(bank.w_out_EFD[e], ffn.w2.weight.t())


def test_upcycled_encoder_decoder_equals_dense():
    torch.manual_seed(1)
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, ffn_hidden_dim=40, max_seq_len=32)
    dense = MoEEncoderDecoder(cfg).eval()
    moe = upcycle_model(dense, "encdec", 3, 2, layers="every_other").eval()
    enc, dec = torch.randint(0, 64, (2, 12)), torch.randint(0, 64, (2, 7))
    assert len(moe.encoder_moe_layers) == len(moe.decoder_moe_layers) == 1
    torch.testing.assert_close(moe(enc, dec).logits, dense(enc, dec).logits, rtol=1e-5, atol=1e-5)


def test_noise_separates_the_experts():
    dense = dense_model()
    moe = upcycle_model(dense, "decoder", 4, 2, noise=0.05).eval()
    w = moe.layers[0].ffn.experts.w_in_EDF
    assert not torch.equal(w[0], w[1])
    rel = (w[0] - w[1]).std() / w[0].std()
    assert 0.03 < rel < 0.12  # two independent draws of 5% noise: about 7% apart
    x = torch.randint(0, 64, (2, 10))
    assert 0 < (moe(x).logits - dense(x).logits).abs().max() < 0.5


def test_refusals_name_the_value():
    dense = dense_model()
    with pytest.raises(ValueError, match=r"--router='switch' cannot upcycle exactly"):
        upcycle_model(dense, "decoder", 4, 1, router="switch")
    with pytest.raises(
        ValueError, match=r"--layers='odd' is invalid: expected one of \['every', 'every_other'\]"
    ):
        upcycle_model(dense, "decoder", 4, 2, layers="odd")
    with pytest.raises(ValueError, match="already has MoE layers"):
        upcycled_config(tiny_model_config(), 4, 2)
    with pytest.raises(ValueError, match=r"top_k=5 is invalid"):
        upcycle_model(dense, "decoder", 4, 5)
    with pytest.raises(ValueError, match="--noise=-0.1 is invalid"):
        upcycle_model(dense, "decoder", 4, 2, noise=-0.1)


def test_cli_upcycle_round_trip_and_refusals(tmp_path, capsys):
    corpus = tiny_corpus(tmp_path / "corpus", files=8)
    dense_dir = train_checkpoint(corpus, tmp_path, "dense", **{"moe.enabled": "false"})
    before = (dense_dir / ckpt.MODEL_FILE).read_bytes()
    out = tmp_path / "upcycled"
    assert (
        cli_main(["upcycle", "--ckpt", str(dense_dir), "--out", str(out), "--experts", "4", "--top-k", "2"])
        == 0
    )
    assert "max |logit difference| to the dense model" in capsys.readouterr().out
    moe, config = ckpt.load_model(out)
    dense, _ = ckpt.load_model(dense_dir)
    assert config["upcycled_from"]["experts"] == 4 and (out / ckpt.TOKENIZER_FILE).is_file()
    x = torch.randint(0, 300, (2, 16))
    torch.testing.assert_close(moe(x).logits, dense(x).logits, rtol=1e-5, atol=1e-5)
    assert cli_main(["eval", "--ckpt", str(out), "--batches", "1"]) == 0  # the run config came along
    for bad_out in (dense_dir, dense_dir.parent):  # the checkpoint itself, or the run folder holding it
        assert cli_main(["upcycle", "--ckpt", str(dense_dir), "--out", str(bad_out), "--experts", "4"]) == 2
        assert "would overwrite the input checkpoint" in capsys.readouterr().err
    assert cli_main(["upcycle", "--ckpt", str(out), "--out", str(tmp_path / "again"), "--experts", "4"]) == 2
    assert "already has MoE layers" in capsys.readouterr().err
    assert (dense_dir / ckpt.MODEL_FILE).read_bytes() == before
