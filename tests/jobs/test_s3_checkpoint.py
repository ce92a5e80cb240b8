"""A model folder on S3 read tensor by tensor (moto's server on loopback): same tensors as the local reader, only
the requested bytes fetched, hostile files refused by name."""

from __future__ import annotations

import json
import pickle
import struct
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from service.engine.model_source import (
    CheckpointError,
    SafetensorsCheckpoint,
    StreamedModel,
)
from service.jobs import s3_checkpoint
from service.jobs.s3_checkpoint import (
    COALESCE_GAP_BYTES,
    MAX_HEADER_BYTES,
    S3Checkpoint,
    fetch_side_files,
)
from service.jobs.storage import StorageError
from tests.fixture_paths import STORIES


@pytest.fixture
def bucket(s3) -> str:
    name = f"llmpress-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    return name


def upload(s3, bucket: str, prefix: str, folder: Path) -> str:
    """Every file of ``folder`` under ``prefix/``; the folder's URI."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            s3.put_object(Bucket=bucket, Key=f"{prefix}/{path.relative_to(folder).as_posix()}", Body=path.read_bytes())
    return f"s3://{bucket}/{prefix}/"


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (float8 has no torch.equal on the CPU; NaNs compare by their bits)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.is_floating_point and a.dtype.itemsize == 1:
        return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    return torch.equal(a, b)


def every_dtype() -> dict[str, torch.Tensor]:
    """One small tensor of each dtype the reader maps, plus a scalar and an empty tensor."""
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(3, 5, generator=gen)
    out = {f"float.{dt}": base.to(dt) for dt in (torch.float64, torch.float32, torch.float16, torch.bfloat16)}
    ints = torch.randint(-100, 100, (4, 3), generator=gen)
    out.update({f"int.{dt}": ints.to(dt) for dt in (torch.int64, torch.int32, torch.int16, torch.int8)})
    out["uint.uint8"] = ints.abs().to(torch.uint8)
    out["bool"] = ints > 0
    out["complex"] = torch.complex(base, -base)
    for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu", "uint16",
                 "uint32", "uint64"):
        if hasattr(torch, name):
            out[f"extra.{name}"] = (ints.abs() if name.startswith("uint") else base).to(getattr(torch, name))
    out["scalar"] = torch.tensor(2.5)
    out["empty"] = torch.empty(0, 7)
    return out


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    """Two shards and an index, as save_file writes them."""
    folder = tmp_path_factory.mktemp("sharded")
    tensors = every_dtype()
    tensors.update({f"model.layers.{i}.w": torch.randn(16, 8) for i in range(3)})
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(folder / file), metadata={"format": "pt"})
        weight_map.update({k: file for k in keys})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text("{}")
    return folder


# --------------------------------------------------------------------------------------- the same tensors


@pytest.mark.parametrize("which", ["stories", "sharded"])
def test_every_tensor_equals_the_local_readers(s3, bucket, sharded, which):
    folder = STORIES if which == "stories" else sharded
    local = SafetensorsCheckpoint(folder)
    remote = S3Checkpoint(upload(s3, bucket, "models/m", folder))
    assert remote.keys() == local.keys()
    keys = local.keys()
    assert all(key in remote for key in keys) and "nope" not in remote
    expected, got = local.read(local.keys()), remote.read(remote.keys())
    assert list(got) == remote.keys()
    for key in expected:
        assert same(got[key], expected[key]), key
        # Owned memory: a tensor of its own, not a view into a shared response buffer.
        assert got[key].untyped_storage().nbytes() == got[key].nbytes
    if which == "sharded":  # every dtype the reader maps is among them
        assert {t.dtype for t in got.values()} == set(s3_checkpoint.DTYPES.values())
    with pytest.raises(KeyError):
        remote.read(["not.a.tensor"])


def test_fingerprint_is_the_etag_of_each_weight_file_and_the_index(s3, bucket, sharded):
    remote = S3Checkpoint(upload(s3, bucket, "fp", sharded))
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json"]
    assert remote.fingerprint() == {n: s3.head_object(Bucket=bucket, Key=f"fp/{n}")["ETag"].strip('"') for n in names}


# --------------------------------------------------------------------------------------- a block's bytes only


def test_streamed_model_reads_a_block_with_its_own_bytes_only(s3, bucket, tmp_path):
    uri = upload(s3, bucket, "stories", STORIES)
    side = fetch_side_files(uri, tmp_path / "side")
    assert sorted(p.name for p in side.iterdir()) == sorted(p.name for p in STORIES.iterdir()
                                                            if p.suffix != ".safetensors")
    checkpoint = S3Checkpoint(uri)
    remote, local = StreamedModel(side, checkpoint=checkpoint), StreamedModel(STORIES)
    assert remote.checkpoint is checkpoint
    names = remote.parameter_names("model.layers.0")
    assert names == local.parameter_names("model.layers.0") and len(names) == 9
    before = checkpoint.bytes_read, checkpoint.requests
    remote.load(names, "cpu")
    local.load(names, "cpu")
    block_bytes = sum(remote.model.get_parameter(n).nbytes for n in names)
    read, requests = checkpoint.bytes_read - before[0], checkpoint.requests - before[1]
    assert block_bytes <= read <= block_bytes + (len(names) - 1) * COALESCE_GAP_BYTES
    assert read == block_bytes  # save_file lays a block out contiguously: no gap at all
    assert requests == 1
    for name in names:
        assert same(remote.model.get_parameter(name), local.model.get_parameter(name)), name


def test_gaps_up_to_the_limit_are_read_and_wider_ones_skipped(s3, bucket, monkeypatch):
    remote = S3Checkpoint(upload(s3, bucket, "gaps", STORIES))
    layer = "model.layers.1.self_attn."
    # k_proj, o_proj, q_proj lie in this order: reading k and q reads o's 16 KiB between them, in one GET.
    sizes = {k: t.nbytes for k, t in SafetensorsCheckpoint(STORIES).read([layer + p for p in ("k_proj.weight",
                                                                           "o_proj.weight", "q_proj.weight")]).items()}
    start = remote.bytes_read, remote.requests
    remote.read([layer + "k_proj.weight", layer + "q_proj.weight"])
    assert (remote.bytes_read - start[0], remote.requests - start[1]) == (sum(sizes.values()), 1)
    monkeypatch.setattr(s3_checkpoint, "COALESCE_GAP_BYTES", 0)
    start = remote.bytes_read, remote.requests
    remote.read([layer + "k_proj.weight", layer + "q_proj.weight"])
    assert (remote.bytes_read - start[0], remote.requests - start[1]) == (sum(sizes.values())
                                                                           - sizes[layer + "o_proj.weight"], 2)


def test_a_body_that_breaks_off_is_resumed_from_the_first_missing_byte(s3, bucket, monkeypatch):
    from botocore.exceptions import ResponseStreamingError

    remote = S3Checkpoint(upload(s3, bucket, "resume", STORIES))
    real_get, ranges = remote._get, []

    class Breaks:
        """The first body gives 1000 bytes, then the connection drops."""

        def __init__(self, body):
            self.body, self.left = body, 1000

        def read(self, n):
            if self.left <= 0:
                raise ResponseStreamingError(error="connection reset (injected)")
            chunk = self.body.read(min(n, self.left))
            self.left -= len(chunk)
            return chunk

        def close(self):
            self.body.close()

    def get(name, start, end):
        ranges.append((start, end))
        body = real_get(name, start, end)
        return Breaks(body) if len(ranges) == 1 else body

    monkeypatch.setattr(remote, "_get", get)
    stored = remote.keys()
    names = [k for k in stored if k.startswith("model.layers.2.")]
    got = remote.read(names)
    assert len(ranges) == 2 and ranges[1] == (ranges[0][0] + 1000, ranges[0][1])
    expected = SafetensorsCheckpoint(STORIES).read(names)
    assert all(same(got[k], expected[k]) for k in names)


def test_an_object_replaced_after_opening_is_refused(s3, bucket, sharded):
    uri = upload(s3, bucket, "changed", STORIES)
    remote = S3Checkpoint(uri)
    s3.put_object(Bucket=bucket, Key="changed/model.safetensors", Body=(STORIES / "model.safetensors").read_bytes()
                  + b" ")
    with pytest.raises(CheckpointError, match=rf"^model: {uri}model.safetensors changed since"):
        remote.read(["model.norm.weight"])


# ---------------------------------------------------------------------------------------------- pickling


def test_pickle_round_trip_carries_no_client_and_reads(s3, bucket, sharded):
    remote = S3Checkpoint(upload(s3, bucket, "pickled", sharded))
    remote.read(remote.keys()[:2])  # the client exists now
    data = pickle.dumps(remote)
    assert b"botocore" not in data and b"boto3" not in data
    copy = pickle.loads(data)
    assert (copy.bytes_read, copy.requests) == (0, 0)  # counted per process
    assert copy.keys() == remote.keys() and copy.fingerprint() == remote.fingerprint()
    got, expected = copy.read(copy.keys()), SafetensorsCheckpoint(sharded).read(copy.keys())
    assert all(same(got[k], expected[k]) for k in expected)
    assert copy.requests == 2  # one GET a shard


# ------------------------------------------------------------------------------------------ hostile input


def safetensors_bytes(header, data: bytes = b"", *, length: int | None = None) -> bytes:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + data


F32_2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize("body, why", [
    (b"\x01\x02", "is 2 bytes, too short for a safetensors header"),
    (safetensors_bytes(b"{}", length=MAX_HEADER_BYTES + 1), f"header, over the limit of {MAX_HEADER_BYTES} bytes"),
    (safetensors_bytes(b"{}", length=1000), "declares a 1000-byte header, beyond the object's 10 bytes"),
    (safetensors_bytes(b"{nope"), "has a header that is not valid JSON"),
    (safetensors_bytes(b"\xff\xfe"), "has a header that is not valid JSON"),
    (safetensors_bytes(b"[" * 100_000), "has a header that is not valid JSON (maximum recursion depth"),
    (safetensors_bytes([1, 2]), "has a header that is not a JSON object"),
    (safetensors_bytes({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4),
     "tensor 'a' has data_offsets [0, 8] that lie outside the object's data (4 bytes)"),
    (safetensors_bytes({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, b"\0" * 8),
     "tensor 'a' has data_offsets [8, 0] that end before they start"),
    (safetensors_bytes({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8),
     "tensor 'a' spans 8 bytes, but F32 of shape [3] is 12"),
    (safetensors_bytes({"a": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8),
     "tensor 'a' has dtype 'Q4', which this reader does not know"),
    (safetensors_bytes({"a": {"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8),
     "tensor 'a' has dtype ['F32'], which this reader does not know"),
    (safetensors_bytes({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8),
     "tensor 'a' has shape [-2], not a list of non-negative integers"),
    (safetensors_bytes({"a": {"dtype": "F32", "shape": [2], "data_offsets": ["0", 8]}}, b"\0" * 8),
     "tensor 'a' has data_offsets that are not integers"),
    (safetensors_bytes({"a": {"dtype": "F32"}}, b"\0" * 8), "tensor 'a' needs dtype, shape and two data_offsets"),
    (safetensors_bytes({"a": F32_2, "b": {**F32_2, "data_offsets": [4, 12]}}, b"\0" * 12),
     "tensors 'a' and 'b' overlap"),
])
def test_a_hostile_header_is_refused_naming_the_object(s3, bucket, body, why):
    s3.put_object(Bucket=bucket, Key="bad/model.safetensors", Body=body)
    with pytest.raises(CheckpointError) as info:
        S3Checkpoint(f"s3://{bucket}/bad")
    assert str(info.value).startswith(f"model: s3://{bucket}/bad/model.safetensors")
    assert why in str(info.value)


def index_bytes(weight_map) -> bytes:
    return json.dumps({"metadata": {}, "weight_map": weight_map}).encode()


@pytest.mark.parametrize("index, why", [
    (index_bytes({"a": "model-00002.safetensors"}), "names 'model-00002.safetensors', which is not in s3://"),
    (index_bytes(["a", "model-00001.safetensors"]), "weight_map must map tensor names to file names"),
    (index_bytes({"a": 1}), "weight_map must map tensor names to file names"),
    (index_bytes({"a": "../other/model.safetensors"}),
     "names '../other/model.safetensors', which is not a file inside the model folder"),
    (b'{"weight_map": {', "is not a valid index (JSONDecodeError"),
    (b'{"metadata": {}}', "is not a valid index (KeyError"),
    (b'{"weight_map": ' * 100_000, "is not a valid index (RecursionError"),
])
def test_a_hostile_index_is_refused_naming_it(s3, bucket, index, why):
    good = safetensors_bytes({"a": F32_2}, b"\0" * 8)
    s3.put_object(Bucket=bucket, Key="idx/model-00001.safetensors", Body=good)
    s3.put_object(Bucket=bucket, Key="idx/model.safetensors.index.json", Body=index)
    with pytest.raises(CheckpointError) as info:
        S3Checkpoint(f"s3://{bucket}/idx/")
    assert str(info.value).startswith(f"model: s3://{bucket}/idx/model.safetensors.index.json")
    assert why in str(info.value)


def test_an_index_over_its_limit_is_not_fetched(s3, bucket, monkeypatch):
    s3.put_object(Bucket=bucket, Key="big/model.safetensors.index.json", Body=index_bytes({"a": "x.safetensors"}))
    monkeypatch.setattr(s3_checkpoint, "MAX_INDEX_BYTES", 10)
    with pytest.raises(CheckpointError, match=r"index.json is \d+ bytes, over the 10-byte limit for an index"):
        S3Checkpoint(f"s3://{bucket}/big/")


def test_folders_without_usable_weights_and_other_locations_are_refused(s3, bucket, tmp_path):
    s3.put_object(Bucket=bucket, Key="cfg/config.json", Body=b"{}")
    s3.put_object(Bucket=bucket, Key="pickle/pytorch_model.bin", Body=b"x")
    s3.put_object(Bucket=bucket, Key="nested/sub/model.safetensors", Body=safetensors_bytes({}))
    with pytest.raises(CheckpointError, match=rf"^model: no safetensors weights in 's3://{bucket}/cfg/'"):
        S3Checkpoint(f"s3://{bucket}/cfg")
    with pytest.raises(CheckpointError, match="holds only pickle"):
        S3Checkpoint(f"s3://{bucket}/pickle")
    with pytest.raises(CheckpointError, match="no safetensors weights"):  # like the local glob: top level only
        S3Checkpoint(f"s3://{bucket}/nested")
    with pytest.raises(StorageError, match=rf"^model: nothing found at s3://{bucket}/absent/"):
        S3Checkpoint(f"s3://{bucket}/absent")
    with pytest.raises(StorageError, match="^model: .* is a whole bucket"):
        S3Checkpoint(f"s3://{bucket}")
    with pytest.raises(StorageError, match="^model: .* is not an S3 location"):
        S3Checkpoint(str(tmp_path))


# ----------------------------------------------------------------------------------------------- side files


def test_fetch_side_files_skips_weights_at_any_depth(s3, bucket, sharded, tmp_path):
    uri = upload(s3, bucket, "side", sharded)
    s3.put_object(Bucket=bucket, Key="side/tokenizer/deep/vocab.txt", Body=b"a\nb\n")
    s3.put_object(Bucket=bucket, Key="side/extra/more.SafeTensors", Body=b"weights")
    dest = fetch_side_files(uri, tmp_path / "d")
    got = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    assert got == ["config.json", "model.safetensors.index.json", "tokenizer/deep/vocab.txt"]
    index = "model.safetensors.index.json"
    assert (dest / index).read_bytes() == (sharded / index).read_bytes()


def test_fetch_side_files_refuses_a_key_that_escapes(s3, bucket, tmp_path):
    s3.put_object(Bucket=bucket, Key="esc/m/config.json", Body=b"{}")
    s3.put_object(Bucket=bucket, Key="esc/m/../../../evil.json", Body=b"owned")
    dest = tmp_path / "work" / "model"
    with pytest.raises(StorageError, match=r"^model: refusing to download .*would escape"):
        fetch_side_files(f"s3://{bucket}/esc/m/", dest)
    assert not list(tmp_path.rglob("evil.json"))
    assert not dest.exists() or not any(dest.iterdir())  # checked before anything was written
