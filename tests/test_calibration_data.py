"""Text sources, tokenization and calibration windows (service.text_data, service.calibration_data)."""

import json
import re
import sys
from pathlib import Path

import pytest
import torch

import service.text_data as text_data
from service.calibration_data import calibration_tokens
from service.text_data import load_tokenizer, read_texts, tokenize

FIXTURES = Path(__file__).parent / "fixtures"
MODEL_DIR = FIXTURES / "models" / "stories260K"
WIKI_VALID = FIXTURES / "data" / "wikitext-2" / "valid.txt"
WIKI_TEST = FIXTURES / "data" / "wikitext-2" / "test.txt"
STORIES = FIXTURES / "data" / "tinystories" / "valid-subset.txt"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(MODEL_DIR)


def whole_text_ids(tok, text: str) -> torch.Tensor:
    return torch.tensor(tok(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def stories_lines() -> list[str]:
    return STORIES.read_text(encoding="utf-8").splitlines(keepends=True)


# --- tokenize -------------------------------------------------------------------------------------------------


def test_tokenize_is_whole_text_without_bos(tok):
    text = STORIES.read_text(encoding="utf-8")
    ids = tokenize(tok, read_texts(STORIES))
    assert ids.dtype == torch.long and ids.dim() == 1
    assert torch.equal(ids, whole_text_ids(tok, text))
    assert ids[0].item() != tok.bos_token_id


@pytest.mark.parametrize("source", [STORIES, WIKI_TEST], ids=["tinystories", "wikitext"])
def test_tokenize_in_small_pieces_equals_whole_file(tok, source, monkeypatch, tmp_path):
    # The head of test.txt keeps the test fast; tinystories lines start without a space (the SentencePiece dummy
    # prefix would show at every cut), wikitext lines with one.
    text = source.read_text(encoding="utf-8")[:60_000]
    path = tmp_path / "head.txt"
    path.write_text(text, encoding="utf-8")
    monkeypatch.setattr(text_data, "_READ_CHARS", 700)
    monkeypatch.setattr(text_data, "_ENCODE_CHARS", 1000)
    assert len(list(read_texts(path))) > 10
    expected = whole_text_ids(tok, text)
    assert torch.equal(tokenize(tok, read_texts(path)), expected)
    assert torch.equal(tokenize(tok, [text]), expected)  # one long text, cut into pieces by tokenize itself
    assert torch.equal(tokenize(tok, [text], max_tokens=5000), expected[:5000])


def test_tokenize_max_tokens_stops_early(tok, monkeypatch):
    line = stories_lines()[0]
    consumed = 0

    def texts():
        nonlocal consumed
        for _ in range(1000):
            consumed += 1
            yield line

    monkeypatch.setattr(text_data, "_ENCODE_CHARS", 4 * len(line))
    ids = tokenize(tok, texts(), max_tokens=300)
    assert len(ids) == 300
    assert torch.equal(ids, whole_text_ids(tok, line * 10)[:300])
    assert consumed <= 5


def test_tokenize_max_tokens_tokenizes_little_of_one_long_text(tok, monkeypatch):
    text = WIKI_TEST.read_text(encoding="utf-8")
    tokenized_chars = 0

    def counting_tok(s, **kwargs):
        nonlocal tokenized_chars
        tokenized_chars += len(s)
        return tok(s, **kwargs)

    monkeypatch.setattr(text_data, "_ENCODE_CHARS", 2000)
    ids = tokenize(counting_tok, [text], max_tokens=1000)
    assert torch.equal(ids, whole_text_ids(tok, text[:10_000])[:1000])
    assert tokenized_chars < 10_000  # of 1.25 MB


def test_tokenize_accepts_a_single_string(tok):
    assert torch.equal(tokenize(tok, "Once upon a time"), whole_text_ids(tok, "Once upon a time"))
    assert tokenize(tok, []).shape == (0,)
    assert tokenize(tok, "Once upon a time", max_tokens=0).shape == (0,)


# --- read_texts -------------------------------------------------------------------------------------------------


def test_read_texts_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        read_texts(tmp_path / "nope.txt")


def test_read_texts_unsupported_source(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("text\nhello\n")
    with pytest.raises(ValueError, match=r"\.txt.*\.jsonl.*save_to_disk"):
        read_texts(path)
    with pytest.raises(ValueError, match="save_to_disk"):
        read_texts(tmp_path)  # a plain directory


def test_jsonl_missing_field_names_line_and_field(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "a"}\n\n{"content": "b"}\n')
    with pytest.raises(ValueError, match=r"line 3: no 'text' field"):
        list(read_texts(path))
    with pytest.raises(ValueError, match=r"line 1: no 'content' field"):
        list(read_texts(path, text_field="content"))


def test_jsonl_bad_json_names_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(ValueError, match="line 2: not valid JSON"):
        list(read_texts(path))


def test_dataset_dir_without_datasets_package(tmp_path, monkeypatch):
    (tmp_path / "dataset_info.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(ImportError, match="pip install datasets"):
        list(read_texts(tmp_path))


# --- calibration_tokens -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampling", ["head", "random"])
def test_calibration_shape(tok, sampling):
    batch = calibration_tokens(STORIES, tok, num_samples=4, seq_len=16, sampling=sampling)
    assert batch.shape == (4, 16) and batch.dtype == torch.long


def test_head_windows_are_the_start_of_the_stream(tok):
    batch = calibration_tokens(WIKI_VALID, tok, num_samples=8, seq_len=32)
    head = whole_text_ids(tok, WIKI_VALID.read_text(encoding="utf-8")[:20_000])[:256]
    assert torch.equal(batch, head.view(8, 32))


def test_random_sampling_deterministic_per_seed(tok):
    stream = tokenize(tok, read_texts(STORIES))
    seq_len = 64
    windows = stream[: len(stream) // seq_len * seq_len].view(-1, seq_len)

    a = calibration_tokens(STORIES, tok, 16, seq_len, sampling="random", seed=1)
    b = calibration_tokens(STORIES, tok, 16, seq_len, sampling="random", seed=1)
    c = calibration_tokens(STORIES, tok, 16, seq_len, sampling="random", seed=2)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)

    # Each sample is one of the aligned windows, none drawn twice, and not simply the head.
    matches = (a[:, None, :] == windows[None, :, :]).all(-1)  # [16, num_windows]
    assert (matches.sum(1) >= 1).all()
    indices = matches.float().argmax(1)
    assert len(set(indices.tolist())) == 16
    assert indices.tolist() != list(range(16))


def test_random_sampling_can_take_every_window(tok):
    stream = tokenize(tok, read_texts(STORIES))
    n = len(stream) // 512
    batch = calibration_tokens(STORIES, tok, n, 512, sampling="random", seed=0)
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
        calibration_tokens(STORIES, tok, **kwargs)


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
