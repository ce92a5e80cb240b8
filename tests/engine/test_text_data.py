"""Text sources and their tokenization (service.engine.text_data): whole-text equality, early stops, errors."""

import sys

import pytest
import torch

import service.engine.text_data as text_data
from service.engine.text_data import read_texts, tokenize
from tests.engine.texts import stories_lines, whole_text_ids
from tests.fixture_paths import TINYSTORIES, WIKI_TEST

# --- tokenize -------------------------------------------------------------------------------------------------


def test_tokenize_is_whole_text_without_bos(tok):
    text = TINYSTORIES.read_text(encoding="utf-8")
    ids = tokenize(tok, read_texts(TINYSTORIES))
    assert ids.dtype == torch.long and ids.dim() == 1
    assert torch.equal(ids, whole_text_ids(tok, text))
    assert ids[0].item() != tok.bos_token_id


@pytest.mark.parametrize("source", [TINYSTORIES, WIKI_TEST], ids=["tinystories", "wikitext"])
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
