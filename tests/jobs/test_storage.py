"""Object storage against a real S3-compatible server (moto's threaded server on loopback) and a local folder."""

from __future__ import annotations

import hashlib
import json
import os
import urllib.request
import uuid
from pathlib import Path

import pytest

from service.jobs import storage
from service.jobs.storage import (MANIFEST_NAME, LocalStore, Publisher, S3Store, StorageError, check_key, fetch,
                             open_store, parse_uri, publish_directory)

# Files of a small model output: nested folders, an empty file, a name with a space.
TREE = {
    "config.json": b'{"model_type": "llama"}\n',
    "model-00001-of-00002.safetensors": os.urandom(200_000),
    "model-00002-of-00002.safetensors": os.urandom(70_001),
    "tokenizer/tokenizer.json": b'{"version": "1.0"}',
    "tokenizer/deep/er/special tokens.txt": b"<s>\n</s>\n",
    "empty.txt": b"",
}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_tree(root: Path, files: dict[str, bytes] = TREE) -> Path:
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def bucket(s3) -> str:
    name = f"llmpress-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    return name


def bucket_keys(s3, bucket: str) -> list[str]:
    return sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", []))


# --------------------------------------------------------------------------------------------------- URIs


def test_parse_uri_accepts_the_documented_forms(tmp_path, monkeypatch):
    assert parse_uri("s3://bucket/jobs/42/") == ("s3", "bucket", "jobs/42")
    assert parse_uri("s3://bucket/jobs/42") == ("s3", "bucket", "jobs/42")
    assert parse_uri("S3://bucket") == ("s3", "bucket", "")
    assert parse_uri("s3://bucket/") == ("s3", "bucket", "")
    assert parse_uri(f"file://{tmp_path}/out") == ("file", str(tmp_path.resolve() / "out"), "")
    assert parse_uri(f"file://localhost{tmp_path}/out") == ("file", str(tmp_path.resolve() / "out"), "")
    assert parse_uri(str(tmp_path / "abs")) == ("file", str(tmp_path.resolve() / "abs"), "")
    assert parse_uri("runs/a", local_root=tmp_path) == ("file", str(tmp_path.resolve() / "runs/a"), "")
    monkeypatch.chdir(tmp_path)
    assert parse_uri("job1") == ("file", str(tmp_path.resolve() / "artifacts/job1"), "")


@pytest.mark.parametrize("uri, why", [
    ("gs://bucket/x", "scheme 'gs:' is not supported"),
    ("https://example.com/x", "scheme 'https:' is not supported"),
    ("hf:org/model", "scheme 'hf:' is not supported"),
    ("", "is empty"),
    ("s3://", "empty bucket"),
    ("s3:///prefix", "empty bucket"),
    ("s3:bucket/x", "s3://bucket/prefix"),
    ("s3://bad bucket/x", "not a valid S3 bucket name"),
    # S3's naming rules: a name real S3 refuses only at the first request is refused here, naming the field.
    ("s3://Upper/x", "not a valid S3 bucket name"),
    ("s3://under_score/x", "not a valid S3 bucket name"),
    ("s3://ab/x", "not a valid S3 bucket name"),
    (f"s3://{'b' * 64}/x", "not a valid S3 bucket name"),
    ("s3://-dash/x", "not a valid S3 bucket name"),
    ("s3://dash-/x", "not a valid S3 bucket name"),
    ("s3://two..dots/x", "not a valid S3 bucket name"),
    ("s3://192.168.0.1/x", "not a valid S3 bucket name"),
    ("s3://xn--bucket/x", "not a valid S3 bucket name"),
    ("s3://bucket-s3alias/x", "not a valid S3 bucket name"),
    ("s3://bucket/a/../b", "'..' segment"),
    ("s3://bucket/..", "'..' segment"),
    ("s3://bucket/a/./b", "'.' segment"),
    ("s3://bucket/a//b", "empty segment"),
    ("s3://bucket//a", "starts with '/'"),
    ("s3://bucket/a\\..\\b", "backslash"),
    ("s3://bucket/a\x00b", "NUL"),
    ("../outside", "'..' segment"),
    ("runs/../../outside", "'..' segment"),
    ("/tmp/../etc", "'..' segment"),
    ("runs\\x", "backslash"),
    ("runs/x\x00", "NUL"),
    ("file:///tmp/../etc", "'..' segment"),
    ("file:///tmp/%2e%2e/etc", "'..' segment"),
    ("file:///tmp/%00x", "NUL"),
    ("file://otherhost/tmp/x", "host 'otherhost'"),
    ("file:relative/x", "file:///absolute/path"),
    (".", "the artifacts folder itself"),
    ("runs/..", "'..' segment"),
    ("/", "filesystem root"),
    ("file:///", "filesystem root"),
])
def test_parse_uri_rejects_escapes_and_other_forms_naming_the_field(uri, why, tmp_path):
    with pytest.raises(StorageError) as info:
        parse_uri(uri, field="dataset", local_root=tmp_path)
    message = str(info.value)
    assert message.startswith("dataset: ")
    assert why in message
    if "scheme" in why or "is empty" in why:
        assert "s3://bucket/prefix" in message and "file:///" in message  # the allowed forms are listed


def test_confine_holds_absolute_locations_to_the_artifacts_folder(tmp_path):
    root = tmp_path / "artifacts"
    inside = parse_uri(str(root / "job"), local_root=root, confine=True)
    assert inside == ("file", str(root.resolve() / "job"), "")
    assert parse_uri((root / "job").as_uri(), local_root=root, confine=True) == inside
    for uri in ("/etc/cron.d", f"file://{tmp_path}/elsewhere", str(root)):
        with pytest.raises(StorageError, match="^output: .*artifacts folder"):
            parse_uri(uri, local_root=root, confine=True)
    assert parse_uri("/etc/cron.d", local_root=root) == ("file", "/etc/cron.d", "")  # not confined by default


def test_parse_uri_never_echoes_credentials_in_the_uri():
    with pytest.raises(StorageError) as info:
        parse_uri("s3://AKIAEXAMPLE:wJalrXUtnFEMI@bucket/x", field="model")
    assert "wJalrXUtnFEMI" not in str(info.value) and "AKIAEXAMPLE" not in str(info.value)
    assert str(info.value).startswith("model: credentials in the URI")


def test_relative_path_through_a_symlink_out_of_the_root_is_refused(tmp_path):
    root, outside = tmp_path / "artifacts", tmp_path / "elsewhere"
    root.mkdir()
    outside.mkdir()
    (root / "link").symlink_to(outside)
    with pytest.raises(StorageError, match=r"^output: 'link/out' resolves outside the artifacts folder"):
        parse_uri("link/out", local_root=root)
    # A write through a symlinked folder inside an existing store is refused as well.
    store = LocalStore(root)
    src = make_tree(tmp_path / "src", {"a": b"x"}) / "a"
    with pytest.raises(StorageError, match="through a symlink"):
        store.upload_file(src, "link/a")
    assert not (outside / "a").exists()


@pytest.mark.parametrize("key", ["../x", "a/../../x", "/etc/passwd", "a//b", "a\\b", "a\x00b", "./a", ""])
def test_store_methods_refuse_keys_that_leave_the_root(key, tmp_path):
    store = LocalStore(tmp_path / "store", field="output")
    with pytest.raises(StorageError, match="^output: "):
        store.exists(key)
    with pytest.raises(StorageError, match="^output: "):
        check_key(key, "output")


# ----------------------------------------------------------------------------------------------- local folder


def test_local_publish_round_trip(tmp_path):
    src = make_tree(tmp_path / "src")
    out = tmp_path / "artifacts" / "job1"
    manifest = publish_directory(src, "job1", extra_manifest={"job": "job1", "sparsity": 0.5},
                                 local_root=tmp_path / "artifacts")
    assert read_tree(out) == {**TREE, MANIFEST_NAME: (out / MANIFEST_NAME).read_bytes()}
    assert not [p for p in out.rglob("*") if p.name.endswith(".llmpress-tmp")]
    assert {f.key: (f.size, f.sha256) for f in manifest.files} == {k: (len(v), sha256(v)) for k, v in TREE.items()}
    document = json.loads((out / MANIFEST_NAME).read_text())
    assert document["extra"] == {"job": "job1", "sparsity": 0.5}
    assert {f["key"]: f["sha256"] for f in document["files"]} == {k: sha256(v) for k, v in TREE.items()}
    assert document["total_size"] == sum(map(len, TREE.values()))

    store = open_store(out.as_uri())
    assert store.read_manifest() == manifest
    assert store.presigned_url("tokenizer/tokenizer.json").startswith("file:///")
    with urllib.request.urlopen(store.presigned_url("tokenizer/tokenizer.json")) as response:
        assert response.read() == TREE["tokenizer/tokenizer.json"]
    copy = store.download_prefix("tokenizer", tmp_path / "copy")
    assert read_tree(copy) == {"tokenizer.json": TREE["tokenizer/tokenizer.json"],
                               "deep/er/special tokens.txt": TREE["tokenizer/deep/er/special tokens.txt"]}

    with pytest.raises(StorageError, match="already holds a published output"):
        publish_directory(src, out)
    # Overwrite: the new output replaces the old one, and files only the old one had are gone.
    new_src = make_tree(tmp_path / "src2", {"config.json": b"{}", "weights.safetensors": b"w" * 10})
    manifest2 = publish_directory(new_src, out, overwrite=True)
    assert read_tree(out) == {"config.json": b"{}", "weights.safetensors": b"w" * 10,
                              MANIFEST_NAME: (out / MANIFEST_NAME).read_bytes()}
    assert [f.key for f in manifest2.files] == ["config.json", "weights.safetensors"]
    # While an overwrite uploads, no manifest vouches for the half-replaced files.
    with Publisher(out, staging=tmp_path / "staging", overwrite=True) as publisher:
        assert not (out / MANIFEST_NAME).exists()
        publisher.add(new_src / "config.json", "config.json")
        publisher.finish(new_src)
    assert (out / MANIFEST_NAME).exists()

    store.delete_prefix("")
    assert not out.exists()


def test_local_publish_in_place_hashes_without_copying(tmp_path):
    out = make_tree(tmp_path / "out", {"a.bin": b"abc", "sub/b.bin": b"defg"})
    manifest = publish_directory(out, out)
    assert {f.key: f.sha256 for f in manifest.files} == {"a.bin": sha256(b"abc"), "sub/b.bin": sha256(b"defg")}
    assert read_tree(out)["a.bin"] == b"abc"


def test_local_failed_publish_leaves_nothing(tmp_path, monkeypatch):
    src = make_tree(tmp_path / "src")
    real, calls = LocalStore.upload_file, []

    def flaky(self, path, key):
        calls.append(key)
        if len(calls) == 3:
            raise OSError("disk full")
        return real(self, path, key)

    monkeypatch.setattr(LocalStore, "upload_file", flaky)
    with pytest.raises(OSError, match="disk full"):
        publish_directory(src, tmp_path / "out")
    assert len(calls) == 3
    assert not (tmp_path / "out").exists()


def test_publish_refuses_a_reserved_name_and_an_unserializable_extra(tmp_path):
    src = make_tree(tmp_path / "src", {MANIFEST_NAME: b"{}", "a": b"a"})
    with pytest.raises(StorageError, match="reserved name manifest.json"):
        publish_directory(src, tmp_path / "out")
    src = make_tree(tmp_path / "src2", {"a": b"a"})
    with pytest.raises(TypeError):
        publish_directory(src, tmp_path / "out", extra_manifest={"when": object()})
    assert not (tmp_path / "out").exists()


def test_read_manifest_of_an_unfinished_output_is_a_clear_error(tmp_path):
    make_tree(tmp_path / "out", {"model.safetensors": b"x"})
    with pytest.raises(StorageError, match=r"^output: no manifest.json at file://.*never completed"):
        open_store(tmp_path / "out").read_manifest()


# ---------------------------------------------------------------------------------------------------- S3


def test_s3_publish_round_trip_and_manifest_last(s3, bucket, tmp_path, monkeypatch):
    src = make_tree(tmp_path / "src")
    writes: list[str] = []
    upload, put = S3Store.upload_file, S3Store._put_new
    monkeypatch.setattr(S3Store, "upload_file", lambda self, p, k: (writes.append(k), upload(self, p, k))[1])
    monkeypatch.setattr(S3Store, "_put_new", lambda self, k, d: (writes.append(k), put(self, k, d))[1])

    manifest = publish_directory(src, f"s3://{bucket}/jobs/7/", extra_manifest={"job": "7"})
    assert writes[-1] == MANIFEST_NAME and sorted(writes[:-1]) == sorted(TREE)
    assert manifest.uri == f"s3://{bucket}/jobs/7/" and manifest.key == MANIFEST_NAME
    assert bucket_keys(s3, bucket) == sorted(f"jobs/7/{k}" for k in [*TREE, MANIFEST_NAME])
    # What the server holds is byte-exact and matches the manifest's checksums.
    document = json.loads(s3.get_object(Bucket=bucket, Key=f"jobs/7/{MANIFEST_NAME}")["Body"].read())
    assert document["extra"] == {"job": "7"}
    for entry in document["files"]:
        body = s3.get_object(Bucket=bucket, Key=f"jobs/7/{entry['key']}")["Body"].read()
        assert body == TREE[entry["key"]]
        assert entry["sha256"] == sha256(body) and entry["size"] == len(body)

    store = open_store(f"s3://{bucket}/jobs/7")
    assert store.read_manifest() == manifest
    assert store.exists("tokenizer/tokenizer.json") and not store.exists("tokenizer/nope.json")
    assert store.list("tokenizer") == ["tokenizer/deep/er/special tokens.txt", "tokenizer/tokenizer.json"]
    out = store.download_prefix("", tmp_path / "download")
    assert read_tree(out) == {**TREE, MANIFEST_NAME: store._get_bytes(MANIFEST_NAME)}
    with pytest.raises(StorageError, match="already holds a published output"):
        publish_directory(src, f"s3://{bucket}/jobs/7")


def test_s3_failed_publish_leaves_no_manifest_and_no_objects(s3, bucket, tmp_path, monkeypatch):
    src = make_tree(tmp_path / "src")
    real, calls = S3Store.upload_file, []

    def flaky(self, path, key):
        calls.append(key)
        if len(calls) == 4:
            raise StorageError("output: S3 error SlowDown while uploading")
        return real(self, path, key)

    monkeypatch.setattr(S3Store, "upload_file", flaky)
    with pytest.raises(StorageError, match="SlowDown"):
        publish_directory(src, f"s3://{bucket}/jobs/8")
    assert len(calls) == 4
    assert bucket_keys(s3, bucket) == []


def test_s3_multipart_upload_round_trips_byte_exact(s3, bucket, tmp_path, monkeypatch):
    # 5 MiB is S3's smallest part; 12 MiB makes three parts.
    monkeypatch.setattr(storage, "MULTIPART_THRESHOLD", 5 * 1024 * 1024)
    monkeypatch.setattr(storage, "MULTIPART_CHUNKSIZE", 5 * 1024 * 1024)
    data = os.urandom(12 * 1024 * 1024 + 123)
    (tmp_path / "big.safetensors").write_bytes(data)
    store = open_store(f"s3://{bucket}/big")
    entry = store.upload_file(tmp_path / "big.safetensors", "shards/big.safetensors")
    assert (entry.key, entry.size, entry.sha256) == ("shards/big.safetensors", len(data), sha256(data))
    head = s3.head_object(Bucket=bucket, Key="big/shards/big.safetensors")
    assert head["ETag"].strip('"').endswith("-3")  # a multipart ETag: three parts
    out = store.download_prefix("shards", tmp_path / "down")
    assert (out / "big.safetensors").read_bytes() == data


def test_s3_retries_a_failing_part_and_still_hashes_the_file(s3, bucket, tmp_path, monkeypatch):
    from botocore.awsrequest import AWSResponse

    monkeypatch.setattr(storage, "MULTIPART_THRESHOLD", 5 * 1024 * 1024)
    monkeypatch.setattr(storage, "MULTIPART_CHUNKSIZE", 5 * 1024 * 1024)
    data = os.urandom(11 * 1024 * 1024)
    (tmp_path / "big").write_bytes(data)
    store = open_store(f"s3://{bucket}")
    assert store.client.meta.config.retries == {"mode": "standard", "total_max_attempts": 5}
    attempts: list[str] = []

    class Raw:
        def stream(self, **_):
            yield b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"

    def fail_part_2_twice(request, **_):
        if "partNumber=2" in request.url:
            attempts.append(request.url)
            if len(attempts) <= 2:
                return AWSResponse(request.url, 503, {}, Raw())
        return None

    store.client.meta.events.register("before-send.s3.UploadPart", fail_part_2_twice)
    entry = store.upload_file(tmp_path / "big", "big")
    assert len(attempts) == 3  # two 503s, then the retry that went through
    assert (entry.size, entry.sha256) == (len(data), sha256(data))
    assert s3.get_object(Bucket=bucket, Key="big")["Body"].read() == data


def test_s3_small_upload_hashes_exactly_once(s3, bucket, tmp_path):
    # A single PUT is read more than once (checksum, then send): the digest must still be the file's.
    data = os.urandom(3 * 1024 * 1024 + 7)
    (tmp_path / "f").write_bytes(data)
    entry = open_store(f"s3://{bucket}").upload_file(tmp_path / "f", "f")
    assert (entry.size, entry.sha256) == (len(data), sha256(data))
    assert s3.get_object(Bucket=bucket, Key="f")["Body"].read() == data


def test_s3_download_refuses_a_key_that_escapes(s3, bucket, tmp_path):
    s3.put_object(Bucket=bucket, Key="models/m/config.json", Body=b"{}")
    s3.put_object(Bucket=bucket, Key="models/m/../../../evil.txt", Body=b"owned")
    assert "models/m/../../../evil.txt" in bucket_keys(s3, bucket)  # the server kept the key as written
    dest = tmp_path / "work" / "model"
    with pytest.raises(StorageError, match=r"^model: refusing to download .*would escape"):
        open_store(f"s3://{bucket}/models/m", field="model").download_prefix("", dest)
    assert not list(tmp_path.rglob("evil.txt"))
    assert not dest.exists() or not any(dest.iterdir())  # checked before anything was written


@pytest.mark.parametrize("key", ["models/m//etc/cron.d/x", "models/m/sub\\..\\..\\x"])
def test_s3_download_refuses_absolute_and_backslashed_keys(s3, bucket, tmp_path, key):
    s3.put_object(Bucket=bucket, Key=key, Body=b"owned")
    with pytest.raises(StorageError, match="refusing to download"):
        open_store(f"s3://{bucket}/models/m", field="model").download_prefix("", tmp_path / "d")


def test_missing_bucket_is_a_clear_error(s3, tmp_path):
    src = make_tree(tmp_path / "src", {"a.bin": b"a"})
    store = open_store("s3://no-such-bucket-llmpress/out")
    for call in (lambda: store.upload_file(src / "a.bin", "a.bin"),
                 lambda: store.exists("a.bin"),
                 lambda: store.list(),
                 lambda: store.read_manifest(),
                 lambda: store.download_prefix("", tmp_path / "d"),
                 lambda: publish_directory(src, "s3://no-such-bucket-llmpress/out")):
        with pytest.raises(StorageError) as info:
            call()
        assert str(info.value).startswith("output: bucket 'no-such-bucket-llmpress' does not exist"), info.value
        assert info.value.__cause__ is None and info.value.__suppress_context__  # no botocore traceback


def test_missing_credentials_is_a_clear_error(s3, bucket, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    store = open_store(f"s3://{bucket}/x", field="dataset")
    with pytest.raises(StorageError, match=r"^dataset: no S3 credentials found .*AWS_ACCESS_KEY_ID"):
        store.list()
    with pytest.raises(StorageError, match="no S3 credentials"):
        store.presigned_url("a")


def test_wrong_credentials_do_not_leak(s3, bucket, monkeypatch):
    # moto accepts any key by default; what matters here is that no message carries the secret.
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-value")
    store = open_store("s3://no-such-bucket-llmpress/x")
    with pytest.raises(StorageError) as info:
        store.list()
    assert "very-secret-value" not in str(info.value)


def test_presigned_url_fetches_the_object_with_plain_http(s3, bucket, tmp_path):
    data = os.urandom(50_000)
    (tmp_path / "shard").write_bytes(data)
    store = open_store(f"s3://{bucket}/jobs/9")
    store.upload_file(tmp_path / "shard", "model.safetensors")
    url = store.presigned_url("model.safetensors", expires=120)
    assert url.startswith(os.environ["AWS_ENDPOINT_URL"]) and "X-Amz-Signature" in url
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.read() == data
    with pytest.raises(StorageError, match="lifetime"):
        store.presigned_url("model.safetensors", expires=8 * 24 * 3600)


def test_delete_prefix_removes_everything_under_it_and_nothing_beside_it(s3, bucket, tmp_path):
    src = make_tree(tmp_path / "src")
    publish_directory(src, f"s3://{bucket}/jobs/1")
    publish_directory(src, f"s3://{bucket}/jobs/10")
    open_store(f"s3://{bucket}/jobs/1").delete_prefix()
    keys = bucket_keys(s3, bucket)
    assert keys and all(k.startswith("jobs/10/") for k in keys)
    open_store(f"s3://{bucket}/jobs").delete_prefix("10")
    assert bucket_keys(s3, bucket) == []


def test_delete_prefix_never_empties_a_whole_bucket(s3, bucket):
    s3.put_object(Bucket=bucket, Key="keep/me", Body=b"x")
    with pytest.raises(StorageError, match=f"refusing to delete every object in bucket '{bucket}'"):
        open_store(f"s3://{bucket}").delete_prefix()
    assert bucket_keys(s3, bucket) == ["keep/me"]


def test_delete_prefix_cleans_up_malformed_keys(s3, bucket):
    s3.put_object(Bucket=bucket, Key="jobs/2/../x", Body=b"x")
    s3.put_object(Bucket=bucket, Key="jobs/2/a//b", Body=b"x")
    open_store(f"s3://{bucket}/jobs/2").delete_prefix()
    assert bucket_keys(s3, bucket) == []


def test_fetch_reads_models_and_single_dataset_files_from_s3(s3, bucket, tmp_path):
    s3.put_object(Bucket=bucket, Key="models/tiny/config.json", Body=b"{}")
    s3.put_object(Bucket=bucket, Key="models/tiny/model.safetensors", Body=b"weights")
    s3.put_object(Bucket=bucket, Key="data/calib.txt", Body=b"once upon a time")
    model = fetch(f"s3://{bucket}/models/tiny", tmp_path / "model", field="model")
    assert read_tree(model) == {"config.json": b"{}", "model.safetensors": b"weights"}
    text = fetch(f"s3://{bucket}/data/calib.txt", tmp_path / "data", field="dataset")
    assert text == (tmp_path / "data" / "calib.txt").resolve() and text.read_bytes() == b"once upon a time"
    with pytest.raises(StorageError, match=r"^dataset: nothing found at s3://"):
        fetch(f"s3://{bucket}/data/missing.txt", tmp_path / "data", field="dataset")
    assert fetch(str(tmp_path / "model"), tmp_path / "unused") == tmp_path / "model"
    with pytest.raises(StorageError, match="does not exist"):
        fetch(str(tmp_path / "nope"), tmp_path / "unused")


# ------------------------------------------------------------------------------ who may delete what, both stores


@pytest.fixture(params=["local", "s3"])
def location(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "out")
    name = request.getfixturevalue("bucket")
    return f"s3://{name}/jobs/shared"


def test_location_keys_name_one_folder_one_way(tmp_path):
    assert storage.location_key("s3://b-1/a/b") == storage.location_key("S3://b-1/a/b/") == "s3://b-1/a/b/"
    assert storage.location_key("runs/x", local_root=tmp_path) == (tmp_path / "runs" / "x").resolve().as_uri() + "/"
    assert storage.location_key(f"file://{tmp_path}/runs/x/", local_root=tmp_path) == \
        storage.location_key("runs/x", local_root=tmp_path)
    with pytest.raises(StorageError, match="a whole bucket"):
        parse_uri("s3://releases/", folder=True)


def test_a_second_writer_cannot_publish_over_a_manifest_that_appeared_meanwhile(location, tmp_path):
    # Both pass the up-front check (no manifest yet); the first to write its manifest wins, the second fails and
    # takes back only what it wrote: the winner's manifest and files stay as they are.
    first = Publisher(location, staging=tmp_path / "s1")
    second = Publisher(location, staging=tmp_path / "s2")
    mine = make_tree(tmp_path / "mine", {"a.safetensors": b"first", "config.json": b"{}"})
    theirs = make_tree(tmp_path / "theirs", {"b.safetensors": b"second"})
    with first:
        published = first.finish(mine)
    with pytest.raises(StorageError, match="already holds a published output") as info:
        with second:
            second.finish(theirs)
    assert "jobs/shared" not in str(info.value) and str(tmp_path) not in str(info.value)  # no location shown
    store = open_store(location)
    assert store.read_manifest() == published
    assert store.list() == ["a.safetensors", "config.json", MANIFEST_NAME]


def test_abort_deletes_only_what_this_publisher_wrote(location, tmp_path):
    store = open_store(location)
    (tmp_path / "other.txt").write_bytes(b"someone else's")
    store.upload_file(tmp_path / "other.txt", "notes/other.txt")  # not this publisher's: must survive
    with Publisher(location, staging=tmp_path / "s") as publisher:
        publisher.finish(make_tree(tmp_path / "src", {"w.safetensors": b"w", "config.json": b"{}"}))
        # The job was ended elsewhere meanwhile: take the output back. The manifest goes (it is ours) ...
        publisher.abort()
    assert store.list() == ["notes/other.txt"]

    # ... but a manifest somebody else wrote since ours is never touched.
    with Publisher(location, staging=tmp_path / "s2") as publisher:
        publisher.finish(make_tree(tmp_path / "src2", {"w.safetensors": b"w2"}))
        store.delete_keys([MANIFEST_NAME])
        store.write_manifest("", [], {"writer": "another"})
        publisher.abort()
    assert store.read_manifest().extra == {"writer": "another"}
    assert store.list() == [MANIFEST_NAME, "notes/other.txt"]


def test_a_failed_upload_leaves_files_it_never_started_alone(location, tmp_path, monkeypatch):
    store = open_store(location)
    for name in ("z-1.safetensors", "z-2.safetensors"):  # already there, by another writer
        (tmp_path / name).write_bytes(b"keep")
        store.upload_file(tmp_path / name, name)
    real = type(store).upload_file

    def failing(self, path, key):
        if key == "a.safetensors":
            raise StorageError("output: S3 error SlowDown while uploading")
        return real(self, path, key)

    monkeypatch.setattr(type(store), "upload_file", failing)
    src = make_tree(tmp_path / "src", {"a.safetensors": b"a", "z-1.safetensors": b"new", "z-2.safetensors": b"new"})
    with pytest.raises(StorageError, match="SlowDown"):
        publish_directory(src, location)
    # The publish stopped at its first failure: the names it never wrote are still the other writer's files.
    assert store._get_bytes("z-1.safetensors") == b"keep" and store._get_bytes("z-2.safetensors") == b"keep"
    assert not store.exists(MANIFEST_NAME)
