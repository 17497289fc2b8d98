"""Instruction data: the loss mask covers exactly the response, padding, splits, errors, resume."""

from __future__ import annotations

import json

import pytest
import torch

from moekit.data.instruct import (
    InstructionSampler,
    collate,
    encode_example,
    load_instruction_data,
    validation_batches,
)
from moekit.model import MoETransformer
from tests.adapt_helpers import tiny_model_config


class CharTokenizer:
    """One id per character (ord), eos 0, pad 1: small enough to check every position by hand."""

    eos_id, pad_id, vocab_size, fingerprint = 0, 1, 128, "chars"

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]


def test_targets_mask_exactly_the_prompt():
    ex = encode_example(CharTokenizer(), "ab", "cd", max_len=16)
    # ids: a=97 b=98 | c=99 d=100 eos=0; inputs drop the last id, targets drop the first
    assert ex.input_ids.tolist() == [97, 98, 99, 100]
    assert ex.targets.tolist() == [-100, 99, 100, 0]  # "a" -> b is prompt; b -> c, c -> d, d -> eos trained
    ex = encode_example(CharTokenizer(), "xyz", "q", max_len=16)
    assert ex.input_ids.tolist() == [120, 121, 122, 113]
    assert ex.targets.tolist() == [-100, -100, 113, 0]
    ex = encode_example(CharTokenizer(), "", "hi", max_len=16)  # no prompt: every next token trained
    assert ex.input_ids.tolist() == [104, 105] and ex.targets.tolist() == [105, 0]


def test_truncation_and_skipped_examples():
    ex = encode_example(CharTokenizer(), "ab", "cdefgh", max_len=4)  # ids cut to max_len + 1 = 5
    assert ex.input_ids.tolist() == [97, 98, 99, 100] and ex.targets.tolist() == [-100, 99, 100, 101]
    assert encode_example(CharTokenizer(), "abcdef", "g", max_len=4) is None  # prompt fills the window
    assert encode_example(CharTokenizer(), "ab", "", max_len=4) is None  # nothing to learn


def test_collate_pads_right_with_ignored_targets():
    tok = CharTokenizer()
    a, b = encode_example(tok, "ab", "cd", 16), encode_example(tok, "x", "y", 16)
    inputs, mask, targets = collate([a, b], tok.pad_id)
    assert inputs.tolist() == [[97, 98, 99, 100], [120, 121, 1, 1]]
    assert mask.tolist() == [[True] * 4, [True, True, False, False]]
    assert targets.tolist() == [[-100, 99, 100, 0], [121, 0, -100, -100]]


def test_model_loss_is_the_response_cross_entropy():
    torch.manual_seed(0)
    model = MoETransformer(tiny_model_config(vocab_size=128)).eval()
    tok = CharTokenizer()
    inputs, mask, targets = collate(
        [encode_example(tok, "ab", "cd", 16), encode_example(tok, "x", "yz", 16)], 1
    )
    out = model(inputs, targets=targets, attention_mask=mask)
    logits = model(inputs, attention_mask=mask).logits
    picked = [
        (0, 1, 99),
        (0, 2, 100),
        (0, 3, 0),
        (1, 0, 121),
        (1, 1, 122),
        (1, 2, 0),
    ]  # (row, position, target)
    manual = torch.stack([-logits[r, t].log_softmax(-1)[y] for r, t, y in picked]).mean()
    torch.testing.assert_close(out.ce_loss, manual)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_load_split_and_errors(tmp_path):
    rows = [{"prompt": f"q{i}:", "response": f"a{i}", "task": "t"} for i in range(60)]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    data = load_instruction_data(train, CharTokenizer(), 16, validation_fraction=0.2)
    assert len(data.train) + len(data.validation) == 60 and 0 < len(data.validation) < 30
    again = load_instruction_data(train, CharTokenizer(), 16, validation_fraction=0.2)
    assert [e.input_ids.tolist() for e in again.validation] == [e.input_ids.tolist() for e in data.validation]
    val = write_jsonl(tmp_path / "val.jsonl", rows[:3])
    assert len(load_instruction_data(train, CharTokenizer(), 16, validation_paths=val).validation) == 3
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x", "response": "y"}, {"question": "x"}])
    with pytest.raises(ValueError, match=r"bad.jsonl line 2: the record has no field 'prompt'"):
        load_instruction_data(bad, CharTokenizer(), 16)
    with pytest.raises(ValueError, match=r"bad.jsonl line 1.*no field 'input'.*set --prompt-field"):
        load_instruction_data(bad, CharTokenizer(), 16, prompt_field="input")
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_instruction_data(tmp_path / "missing.jsonl", CharTokenizer(), 16)
    long = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "p" * 40, "response": "r"}] * 4)
    with pytest.raises(
        ValueError, match="training split of the instruction data.*no example with a response"
    ):
        load_instruction_data(long, CharTokenizer(), 16, validation_paths=val)


def test_sampler_resumes_exactly_and_refuses_other_data(tmp_path):
    tok = CharTokenizer()
    examples = [encode_example(tok, f"p{i}", "r" * (1 + i % 5), 16) for i in range(11)]
    a = InstructionSampler(examples, 3, tok.pad_id, seed=5)
    for _ in range(5):  # past the first epoch (11 examples)
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))
    expected = [a.next_batch() for _ in range(4)]
    b = InstructionSampler(examples, 3, tok.pad_id, seed=5)
    b.load_state_dict(state)
    for want, got in zip(expected, (b.next_batch() for _ in range(4))):
        for x, y in zip(want, got):
            assert torch.equal(x, y)
    seen = [
        int(row[1])
        for batch in (InstructionSampler(examples, 11, 1, seed=1).next_batch(),)
        for row in batch[0]
    ]
    assert sorted(seen) == sorted(int(e.input_ids[1]) for e in examples)  # an epoch visits every example once
    other = InstructionSampler(examples[:-1] + [encode_example(tok, "p", "rrrrrrr", 16)], 3, 1, seed=5)
    with pytest.raises(ValueError, match="num_targets"):
        other.load_state_dict(state)
    batches = validation_batches(examples, 4, 1, max_examples=6)
    assert [len(b[0]) for b in batches] == [4, 2]
