"""Calibration windows cut from a text (service.engine.calibration_data): head and seeded random sampling."""

import json
import re

import pytest
import torch

from service.engine.calibration_data import calibration_tokens
from service.engine.text_data import read_texts, tokenize
from tests.engine.texts import stories_lines, whole_text_ids
from tests.fixture_paths import TINYSTORIES, WIKI_VALID

@pytest.mark.parametrize("sampling", ["head", "random"])
def test_calibration_shape(tok, sampling):
    batch = calibration_tokens(TINYSTORIES, tok, num_samples=4, seq_len=16, sampling=sampling)
    assert batch.shape == (4, 16) and batch.dtype == torch.long


def test_head_windows_are_the_start_of_the_stream(tok):
    batch = calibration_tokens(WIKI_VALID, tok, num_samples=8, seq_len=32)
    head = whole_text_ids(tok, WIKI_VALID.read_text(encoding="utf-8")[:20_000])[:256]
    assert torch.equal(batch, head.view(8, 32))


def test_random_sampling_deterministic_per_seed(tok):
    stream = tokenize(tok, read_texts(TINYSTORIES))
    seq_len = 64
    windows = stream[: len(stream) // seq_len * seq_len].view(-1, seq_len)

    a = calibration_tokens(TINYSTORIES, tok, 16, seq_len, sampling="random", seed=1)
    b = calibration_tokens(TINYSTORIES, tok, 16, seq_len, sampling="random", seed=1)
    c = calibration_tokens(TINYSTORIES, tok, 16, seq_len, sampling="random", seed=2)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)

    # Each sample is one of the aligned windows, none drawn twice, and not simply the head.
    matches = (a[:, None, :] == windows[None, :, :]).all(-1)  # [16, num_windows]
    assert (matches.sum(1) >= 1).all()
    indices = matches.float().argmax(1)
    assert len(set(indices.tolist())) == 16
    assert indices.tolist() != list(range(16))


def test_random_sampling_can_take_every_window(tok):
    stream = tokenize(tok, read_texts(TINYSTORIES))
    n = len(stream) // 512
    batch = calibration_tokens(TINYSTORIES, tok, n, 512, sampling="random", seed=0)
    got = sorted(map(tuple, batch.tolist()))
    assert got == sorted(map(tuple, stream[: n * 512].view(n, 512).tolist()))


def test_too_little_text(tok, tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("Once upon a time there was a cat.\n")
    have = len(whole_text_ids(tok, path.read_text()))
    for sampling in ("head", "random"):
        with pytest.raises(ValueError, match=rf"need 1024 tokens, the source has {have}\b"):
            calibration_tokens(path, tok, num_samples=4, seq_len=256, sampling=sampling)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"num_samples": 0, "seq_len": 16}, "num_samples"),
        ({"num_samples": 2, "seq_len": 1}, "seq_len"),
        ({"num_samples": 2, "seq_len": 16, "sampling": "tail"}, "sampling"),
    ],
)
def test_invalid_arguments_name_the_field(tok, kwargs, field):
    with pytest.raises(ValueError, match=field):
        calibration_tokens(TINYSTORIES, tok, **kwargs)


# --- the same text from every kind of source --------------------------------------------------------------------


def test_txt_and_jsonl_give_the_same_tokens(tok, tmp_path):
    lines = stories_lines()
    txt = tmp_path / "stories.txt"
    txt.write_text("".join(lines), encoding="utf-8")
    per_line = tmp_path / "per_line.jsonl"
    per_line.write_text("".join(json.dumps({"text": line}) + "\n" for line in lines), encoding="utf-8")
    whole = tmp_path / "whole.jsonl"
    whole.write_text(json.dumps({"id": 0, "text": "".join(lines)}) + "\n", encoding="utf-8")

    expected = calibration_tokens(txt, tok, 20, 128)
    assert torch.equal(calibration_tokens(per_line, tok, 20, 128), expected)
    assert torch.equal(calibration_tokens(whole, tok, 20, 128), expected)
    assert torch.equal(
        calibration_tokens(per_line, tok, 20, 128, sampling="random", seed=3),
        calibration_tokens(txt, tok, 20, 128, sampling="random", seed=3),
    )


def test_dataset_dir_gives_the_same_tokens(tok, tmp_path):
    datasets = pytest.importorskip(
        "datasets", reason="`datasets` cannot be imported (pip install datasets)", exc_type=ImportError
    )
    lines = stories_lines()
    txt = tmp_path / "stories.txt"
    txt.write_text("".join(lines), encoding="utf-8")
    expected = calibration_tokens(txt, tok, 20, 128)

    single = tmp_path / "single"
    datasets.Dataset.from_dict({"text": lines, "n": list(range(len(lines)))}).save_to_disk(str(single))
    assert torch.equal(calibration_tokens(single, tok, 20, 128), expected)

    # A DatasetDict uses its "train" split even when it is not the first.
    split_dir = tmp_path / "dict"
    datasets.DatasetDict(
        {
            "validation": datasets.Dataset.from_dict({"text": ["Nothing to see here.\n"] * 3}),
            "train": datasets.Dataset.from_dict({"text": lines}),
        }
    ).save_to_disk(str(split_dir))
    assert torch.equal(calibration_tokens(split_dir, tok, 20, 128), expected)

    with pytest.raises(ValueError, match=re.escape("no column 'content'; the columns are ['text', 'n']")):
        calibration_tokens(single, tok, 20, 128, text_field="content")
