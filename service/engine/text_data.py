"""Text sources and their token stream, shared by calibration and perplexity.

A source is one of:

- a ``.txt`` file: its text, read in line-aligned chunks so that only the head of a large file is read when only
  the head is needed;
- a ``.jsonl`` file: one JSON object per line, the text in ``text_field``; blank lines are skipped;
- a directory written by ``datasets.Dataset.save_to_disk`` or ``DatasetDict.save_to_disk`` (the "train" split if
  there is one, else the first), the text in column ``text_field``.

The token stream of a source is the tokenization of its texts joined as strings with no separator and no special
tokens (no BOS/EOS): a ``.txt`` file gives exactly the tokens of the whole file tokenized at once, and the same
text gives the same tokens whether it is stored as a ``.txt`` file, as jsonl records or as a dataset. Records are
not marked off from each other: records that end with a newline (as WikiText rows do) concatenate back into the
original file; records without one run into the next record's first word.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

ACCEPTED_SOURCES = (
    "a .txt file, a .jsonl file with a text field per line, or a directory written by "
    "datasets.Dataset.save_to_disk / DatasetDict.save_to_disk"
)

# .txt files are read in chunks of about this many characters, cut after a newline.
_READ_CHARS = 1 << 20
# Text is tokenized in pieces of about this many characters so that tokenize(max_tokens=...) stops after the
# piece that reaches max_tokens instead of tokenizing a whole corpus.
_ENCODE_CHARS = 1 << 18


def read_texts(source: str | Path, *, text_field: str = "text") -> Iterator[str]:
    """Yield the texts of a source (see the module docstring), lazily and in order."""
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"text source not found: {path}")
    if path.is_dir():
        return _read_dataset_dir(path, text_field)
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return _read_txt(path)
    if suffix == ".jsonl":
        return _read_jsonl(path, text_field)
    raise ValueError(f"unsupported text source {path}: expected {ACCEPTED_SOURCES}")


def _read_txt(path: Path) -> Iterator[str]:
    with path.open(encoding="utf-8") as f:
        lines: list[str] = []
        size = 0
        for line in f:
            lines.append(line)
            size += len(line)
            if size >= _READ_CHARS:
                yield "".join(lines)
                lines, size = [], 0
        if lines:
            yield "".join(lines)


def _read_jsonl(path: Path, text_field: str) -> Iterator[str]:
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or text_field not in record:
                raise ValueError(f"{path}, line {lineno}: no {text_field!r} field")
            text = record[text_field]
            if not isinstance(text, str):
                raise ValueError(
                    f"{path}, line {lineno}: field {text_field!r} is {type(text).__name__}, expected a string"
                )
            yield text


def _read_dataset_dir(path: Path, text_field: str) -> Iterator[str]:
    if not any((path / name).is_file() for name in ("dataset_dict.json", "dataset_info.json", "state.json")):
        raise ValueError(
            f"unsupported text source {path}: a directory that is not a saved dataset; expected {ACCEPTED_SOURCES}"
        )
    try:
        import datasets  # optional dependency: only this kind of source needs it
    except ImportError:
        raise ImportError(
            f"reading the saved dataset {path} needs the `datasets` package: pip install datasets"
        ) from None
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        split = "train" if "train" in ds else next(iter(ds))
        ds = ds[split]
    if text_field not in ds.column_names:
        raise ValueError(f"{path}: no column {text_field!r}; the columns are {ds.column_names}")

    def rows() -> Iterator[str]:
        row = 0
        for batch in ds.select_columns([text_field]).iter(batch_size=1000):
            for text in batch[text_field]:
                if not isinstance(text, str):
                    raise ValueError(
                        f"{path}: row {row}, column {text_field!r} is {type(text).__name__}, expected a string"
                    )
                row += 1
                yield text

    return rows()


def tokenize(tokenizer, texts: Iterable[str] | str, max_tokens: int | None = None) -> torch.Tensor:
    """Token ids of the texts joined as strings, without special tokens.

    Returns a 1-D int64 tensor equal to ``tokenizer("".join(texts), add_special_tokens=False).input_ids``,
    truncated to ``max_tokens`` when given. The text is tokenized in pieces of about 256K characters, so with
    ``max_tokens`` only the texts needed are read, and at most about one piece more than needed is tokenized.
    Pieces are cut after a newline followed by a non-space character or by one space and a non-space character,
    and each piece after the first is tokenized behind a "\\n" whose tokens are then dropped, so that it gets none
    of the start-of-text treatment (the SentencePiece dummy prefix "▁") it would not get inside the whole text.
    The result is exact when no token or pre-token spans such a line break: checked on stories260K's SentencePiece
    BPE (byte fallback) and on GPT-2- and Llama-3-style byte-level BPE. A tokenizer that merges that "\\n" with the
    text after it raises RuntimeError.
    """
    if max_tokens is not None and max_tokens < 0:
        raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
    if max_tokens == 0:
        return torch.empty(0, dtype=torch.long)
    if isinstance(texts, str):
        texts = [texts]
    chunks: list[torch.Tensor] = []
    count = 0
    parts: list[str] = []  # text read but not yet tokenized
    size = 0
    threshold = _ENCODE_CHARS
    after_newline = False  # whether the pending text follows a "\n" already tokenized

    for text in texts:
        parts.append(text)
        size += len(text)
        if size < threshold:
            continue
        buf = "".join(parts)
        start = 0
        while len(buf) - start >= _ENCODE_CHARS and (max_tokens is None or count < max_tokens):
            cut = _line_cut(buf, start, start + _ENCODE_CHARS)
            if cut is None:
                break
            ids = _encode(tokenizer, buf[start:cut], after_newline)
            chunks.append(ids)
            count += len(ids)
            start, after_newline = cut, True
        if max_tokens is not None and count >= max_tokens:
            break
        parts = [buf[start:]]
        size = len(parts[0])
        # With no line break to cut at (one very long line), look again only once the text has doubled, so that
        # the searching stays linear overall.
        threshold = _ENCODE_CHARS if size < _ENCODE_CHARS else 2 * size
    else:
        if size:
            chunks.append(_encode(tokenizer, "".join(parts), after_newline))
    ids = torch.cat(chunks) if chunks else torch.empty(0, dtype=torch.long)
    return ids[:max_tokens] if max_tokens is not None else ids


# A cut point: just after a "\n" that is followed by a non-space character or by one space and a non-space.
_CUT = re.compile(r"\n(?= ?\S)")


def _line_cut(text: str, lo: int, target: int) -> int | None:
    """The last cut point in (lo, target], else the first one after target, else None."""
    i = text.rfind("\n", lo, target)
    while i >= lo:
        if _CUT.match(text, i):
            return i + 1
        i = text.rfind("\n", lo, i)
    m = _CUT.search(text, target)
    return m.start() + 1 if m else None


def _encode(tokenizer, text: str, after_newline: bool) -> torch.Tensor:
    # verbose=False: silences the "longer than model_max_length" warning; the stream is cut into windows later.
    if not after_newline:
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        return torch.tensor(ids, dtype=torch.long)
    prefix = tokenizer("\n", add_special_tokens=False, verbose=False)["input_ids"]
    ids = tokenizer("\n" + text, add_special_tokens=False, verbose=False)["input_ids"]
    if ids[: len(prefix)] != prefix:
        raise RuntimeError(
            f"{type(tokenizer).__name__} tokenizes a line break together with the text after it, "
            "so a long text cannot be tokenized piece by piece"
        )
    return torch.tensor(ids[len(prefix):], dtype=torch.long)


def load_tokenizer(model_dir: str | Path, trust_remote_code: bool = False):
    """The Hugging Face tokenizer (AutoTokenizer) saved in a local model directory."""
    from transformers import AutoTokenizer

    path = Path(model_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory not found: {path}")
    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
