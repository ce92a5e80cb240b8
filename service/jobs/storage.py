"""Object storage for models, datasets and job outputs: a local folder or an S3 bucket, chosen by URI.

A store is rooted at the location its URI names (``s3://bucket/prefix`` or a local directory); every key its methods
take is relative to that root, uses ``/`` and may not climb out of it. An output is published file by file and then
``manifest.json``, which lists every file with its size and sha256: the manifest is the only marker that an output
is complete, it is always written last, and a failed publish removes what it wrote, manifest included.

The S3 backend takes every setting from the standard AWS sources (credentials, region, ``AWS_ENDPOINT_URL`` or
``AWS_ENDPOINT_URL_S3`` for MinIO, Ceph, R2 and the like): boto3 reads them itself and nothing here overrides them.
Error messages name the field, the bucket and the key, never credentials or presigned query strings.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field as dc_field
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "llmpress.manifest/1"
DEFAULT_LOCAL_ROOT = Path("artifacts")
ALLOWED_FORMS = "s3://bucket/prefix, file:///absolute/path, an absolute path, or a path relative to the artifacts folder"
# Single PUT below 64 MiB (configs, tokenizers, small shards); above it 16 MiB parts, 8 in flight. Parts read from
# an open file are buffered in memory (s3transfer keeps at most 10), so 16 MiB parts cap that at 160 MiB, and
# 10,000 parts still reach 156 GiB before s3transfer grows the part size by itself.
MULTIPART_THRESHOLD = 64 * 1024 * 1024
MULTIPART_CHUNKSIZE = 16 * 1024 * 1024
MAX_CONCURRENCY = 8
RETRY_MODE = "standard"
MAX_ATTEMPTS = 5  # requests per operation, the first included
# Presigned URLs signed with SigV4 live at most 7 days.
MAX_PRESIGN_SECONDS = 7 * 24 * 3600
_TMP_SUFFIX = ".llmpress-tmp"
_COPY_CHUNK = 8 * 1024 * 1024
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
# S3's naming rules for general purpose buckets (AWS, MinIO, R2 and Ceph all take these): 3-63 characters of
# lower-case letters, digits, '.' and '-', starting and ending with a letter or digit. A name outside them fails
# on real S3 only at the first request, so it is refused here, where the field can still be named.
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_BUCKET_IP = re.compile(r"^\d+\.\d+\.\d+\.\d+$")
_BUCKET_RESERVED_PREFIXES = ("xn--", "sthree-", "amzn-s3-demo-")
_BUCKET_RESERVED_SUFFIXES = ("-s3alias", "--ol-s3", ".mrap", "--x-s3", "--table-s3")
BUCKET_RULES = "3-63 lower-case letters, digits, '.' and '-', starting and ending with a letter or digit"


class StorageError(ValueError):
    """A storage location or operation failed in a way the message explains; it never carries a botocore traceback."""


@dataclass(frozen=True)
class FileEntry:
    """One stored file. ``key`` is relative to the store's root; ``size`` in bytes; ``sha256`` lower-case hex."""

    key: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """A published output: ``files`` (keys relative to the store's root), free-form ``extra``, where it lives."""

    uri: str  # the folder the manifest describes
    key: str  # the manifest's own key
    files: list[FileEntry]
    extra: dict = dc_field(default_factory=dict)
    created_at: str = ""

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    def to_dict(self) -> dict:
        return {"uri": self.uri, "key": self.key, "created_at": self.created_at, "total_size": self.total_size,
                "files": [asdict(f) for f in self.files], "extra": self.extra}


# ----------------------------------------------------------------------------------------------- URIs and keys


def _bad(field: str, why: str) -> StorageError:
    return StorageError(f"{field}: {why}")


def _check_chars(text: str, field: str, what: str) -> None:
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise _bad(field, f"{what} contains a NUL or control character")
    if "\\" in text:
        raise _bad(field, f"{what} contains a backslash; use '/' to separate folders")


def check_key(key: str, field: str = "key", *, prefix: bool = False) -> str:
    """``key`` when it is a safe relative key ('a/b.txt'); for a prefix also '' and a trailing '/'. Else StorageError.

    Refused: control characters, backslashes, a leading '/', empty segments ('a//b') and '.' or '..' segments, so a
    key means the same thing in S3 and on disk and can never name a place outside its root.
    """
    if not isinstance(key, str):
        raise _bad(field, f"key must be a string, not {type(key).__name__}")
    _check_chars(key, field, f"key {key!r}")
    if key.startswith("/"):
        raise _bad(field, f"key {key!r} starts with '/'; keys are relative paths that stay inside their root")
    body = key[:-1] if prefix and key.endswith("/") else key
    if not body:
        if prefix:
            return ""
        raise _bad(field, "key is empty")
    for segment in body.split("/"):
        if segment in ("", ".", ".."):
            kind = "an empty segment ('//' or a leading '/')" if not segment else f"a '{segment}' segment"
            raise _bad(field, f"key {key!r} has {kind}; keys are relative paths that stay inside their root")
    return key


def _folder(prefix: str, field: str) -> str:
    """A prefix as a folder: '' or 'a/b/' (so 'jobs/1' never matches 'jobs/10/...')."""
    check_key(prefix, field, prefix=True)
    return prefix.rstrip("/") + "/" if prefix else ""


def _check_bucket(bucket: str, field: str) -> None:
    shown = bucket if len(bucket) <= 70 else bucket[:63] + "..."
    if not _BUCKET.match(bucket) or ".." in bucket or _BUCKET_IP.match(bucket) \
            or bucket.startswith(_BUCKET_RESERVED_PREFIXES) or bucket.endswith(_BUCKET_RESERVED_SUFFIXES):
        raise _bad(field, f"'{shown}' is not a valid S3 bucket name ({BUCKET_RULES}; not an IP address, no '..', "
                          "no reserved prefix or suffix such as 'xn--' or '-s3alias')")


def parse_uri(uri: str | Path, *, field: str = "output", local_root: Path | None = None,
              confine: bool = False, folder: bool = False) -> tuple[str, str, str]:
    """Split a storage URI into ``(scheme, bucket_or_root, prefix)``, refusing anything that could escape.

    ``s3://bucket/a/b`` -> ``("s3", "bucket", "a/b")``. A local location -> ``("file", "/resolved/dir", "")``: the
    root is the directory itself. Accepted local forms: ``file:///abs/path``, an absolute path, or a relative path,
    resolved against ``local_root`` (default ``./artifacts``) and refused if it resolves outside it (through a
    symlink) or onto it (a job must not own the whole folder). ``confine=True`` holds absolute paths and file://
    URIs to ``local_root`` as well: use it for locations that come from API callers. ``folder=True`` refuses a
    bucket root (``s3://bucket``): a job's output is a folder, never a whole bucket. Refused everywhere: other
    schemes, an empty or malformed bucket, credentials in the URI, '..' segments, NUL and control characters,
    backslashes, empty segments in S3 keys, and the filesystem root. Messages start with ``field``.
    """
    if isinstance(uri, Path):
        uri = str(uri)
    if not isinstance(uri, str) or not uri.strip():
        raise _bad(field, f"is empty; use {ALLOWED_FORMS}")
    _check_chars(uri, field, "location")
    match = _SCHEME.match(uri)
    if match is None:
        return "file", str(_local_dir(uri, field, local_root, confine)), ""
    scheme, rest = match.group(1).lower(), uri[match.end():]
    if scheme == "s3":
        if not rest.startswith("//"):
            raise _bad(field, f"'{uri}' is not of the form s3://bucket/prefix")
        bucket, _, key = rest[2:].partition("/")
        if "@" in bucket:  # s3://KEY:SECRET@bucket: do not echo it, it may hold a secret
            raise _bad(field, "credentials in the URI are not accepted; use the standard AWS settings "
                              "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_PROFILE)")
        if not bucket:
            raise _bad(field, f"'{uri}' has an empty bucket name; use s3://bucket/prefix")
        _check_bucket(bucket, field)
        prefix = _folder(key, field).rstrip("/")
        if folder and not prefix:
            raise _bad(field, f"'{uri}' is a whole bucket; name a folder inside it: s3://{bucket}/my-run")
        return "s3", bucket, prefix
    if scheme == "file":
        if not rest.startswith("//"):
            raise _bad(field, f"'{uri}' is not of the form file:///absolute/path")
        host, _, path = rest[2:].partition("/")
        if host not in ("", "localhost"):
            raise _bad(field, f"'{uri}' names host '{host}'; file URIs must be local: file:///absolute/path")
        path = unquote("/" + path)  # %2e%2e and %00 are checked after decoding
        _check_chars(path, field, "location")
        return "file", str(_local_dir(path, field, local_root, confine)), ""
    raise _bad(field, f"scheme '{scheme}:' is not supported; use {ALLOWED_FORMS}")


def _local_dir(path: str, field: str, local_root: Path | None, confine: bool) -> Path:
    if ".." in path.split("/"):
        raise _bad(field, f"'{path}' contains a '..' segment; give the location without climbing out of it")
    root = Path(local_root if local_root is not None else DEFAULT_LOCAL_ROOT).resolve()
    absolute = os.path.isabs(path)
    target = Path(path).resolve() if absolute else (root / path).resolve()
    if target == Path(target.anchor):
        raise _bad(field, f"'{path}' is the filesystem root; give a folder")
    if absolute and not confine:
        return target
    if not target.is_relative_to(root):
        raise _bad(field, f"'{path}' resolves outside the artifacts folder {root}")
    if target == root:
        raise _bad(field, f"'{path}' is the artifacts folder itself; give a subfolder such as 'my-run'")
    return target


def location_key(uri: str | Path, *, field: str = "output", local_root: Path | None = None,
                 confine: bool = False) -> str:
    """One spelling per storage folder, ending in '/': ``s3://bucket/a/b/`` or ``file:///resolved/dir/``.

    Two URIs name the same folder exactly when their keys are equal, and one folder lies inside another exactly
    when its key starts with the other's: what the job store's output claims compare.
    """
    scheme, where, prefix = parse_uri(uri, field=field, local_root=local_root, confine=confine)
    if scheme == "s3":
        return f"s3://{where}/{prefix}/" if prefix else f"s3://{where}/"
    return Path(where).as_uri().rstrip("/") + "/"


def open_store(uri: str | Path, *, field: str = "output", local_root: Path | None = None,
               confine: bool = False) -> ObjectStore:
    """The store rooted at ``uri`` (see parse_uri); ``field`` names the request field in every error message."""
    scheme, where, prefix = parse_uri(uri, field=field, local_root=local_root, confine=confine)
    if scheme == "s3":
        return S3Store(where, prefix, field=field)
    return LocalStore(Path(where), field=field)


# ------------------------------------------------------------------------------------------------- the interface


class ObjectStore:
    """Files under one root. Subclasses move bytes; listing, manifests and downloads of a tree are shared here."""

    field: str

    def uri(self, key: str = "") -> str:
        raise NotImplementedError

    def upload_file(self, local_path: str | Path, key: str) -> FileEntry:
        """Store one local file at ``key`` (replacing it); its sha256 is computed from the bytes read for upload."""
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        raise NotImplementedError

    def list(self, prefix: str = "") -> list[str]:
        """Every key under the folder ``prefix`` (keys relative to the root, sorted)."""
        raise NotImplementedError

    def delete_keys(self, keys) -> None:
        """Delete these keys; missing ones are not an error."""
        raise NotImplementedError

    def presigned_url(self, key: str, expires: int = 3600) -> str:
        """S3: a GET URL for ``key`` valid ``expires`` seconds (a bearer credential: never log it). Local: its file://
        URI, which does not expire."""
        raise NotImplementedError

    def _put_bytes(self, key: str, data: bytes) -> None:
        raise NotImplementedError

    def _get_bytes(self, key: str) -> bytes | None:
        """The object's bytes, or None when it does not exist."""
        raise NotImplementedError

    def _put_new(self, key: str, data: bytes):
        """Create ``key`` holding ``data`` only if no object is there (one atomic step on the server: a conditional
        write); a token naming this very write, for :meth:`_delete_own`. StorageError when the key exists."""
        raise NotImplementedError

    def _delete_own(self, key: str, token) -> bool:
        """Delete ``key`` only while it is still the object the write with ``token`` made; whether it was."""
        raise NotImplementedError

    def _download(self, key: str, dest: Path) -> None:
        raise NotImplementedError

    # Shared behaviour.

    def upload_dir(self, local_dir: str | Path, prefix: str = "") -> list[FileEntry]:
        """Upload every file under ``local_dir`` to ``prefix/<relative path>``, in sorted order."""
        return [self.upload_file(path, key) for path, key in self._plan_dir(local_dir, prefix)]

    def delete_prefix(self, prefix: str = "") -> None:
        """Delete every object under the folder ``prefix`` (cleanup of a failed or cancelled job)."""
        self.delete_keys(self.list(prefix))

    def write_manifest(self, prefix: str, entries, extra: dict | None = None) -> str:
        """Write ``prefix/manifest.json`` listing ``entries`` (paths relative to ``prefix``) and ``extra``; its key.

        Call it after every file is stored: the manifest is the marker that the output is complete. It is created
        only where none exists (StorageError otherwise), so two writers can never both publish one folder.
        """
        return self._write_manifest(prefix, entries, extra)[0].key

    def _write_manifest(self, prefix: str, entries, extra: dict | None) -> tuple[Manifest, object]:
        """The manifest written, and the token of that write (see :meth:`_put_new`)."""
        folder = _folder(prefix, self.field)
        files = []
        for entry in entries:
            if not entry.key.startswith(folder) or entry.key == folder + MANIFEST_NAME:
                raise _bad(self.field, f"manifest under '{folder}' cannot list '{entry.key}'")
            files.append({"key": entry.key[len(folder):], "size": entry.size, "sha256": entry.sha256})
        document = {
            "format": MANIFEST_FORMAT,
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "total_size": sum(f["size"] for f in files),
            "files": files,
            "extra": extra or {},
        }
        key = folder + MANIFEST_NAME
        token = self._put_new(key, (json.dumps(document, indent=2) + "\n").encode())
        manifest = Manifest(self.uri(folder), key,
                            [FileEntry(folder + f["key"], f["size"], f["sha256"]) for f in files],
                            document["extra"], document["created_at"])
        return manifest, token

    def _taken(self, key: str) -> StorageError:
        # No location in the message: a job's error is shown to its tenant, and the folder may be someone else's.
        return _bad(self.field, f"the location already holds a published output ({key} appeared while this one "
                                "was being written); choose another location")

    def read_manifest(self, prefix: str = "") -> Manifest:
        """The manifest under ``prefix``; StorageError when there is none (the output is incomplete or absent)."""
        folder = _folder(prefix, self.field)
        key = folder + MANIFEST_NAME
        data = self._get_bytes(key)
        if data is None:
            raise _bad(self.field, f"no {MANIFEST_NAME} at {self.uri(folder)}: the output was never completed")
        try:
            document = json.loads(data)
            files = [FileEntry(folder + check_key(f["key"], self.field), int(f["size"]), str(f["sha256"]))
                     for f in document["files"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise _bad(self.field, f"{self.uri(key)} is not a valid manifest ({type(exc).__name__})") from None
        return Manifest(self.uri(folder), key, files, document.get("extra") or {}, document.get("created_at", ""))

    def download_prefix(self, prefix: str, local_dir: str | Path) -> Path:
        """Copy every object under ``prefix`` into ``local_dir`` (same tree); the directory.

        Every key is checked before anything is written: one that would land outside ``local_dir`` (a '..',
        absolute, empty or backslashed segment) refuses the whole download.
        """
        folder = _folder(prefix, self.field)
        dest = Path(local_dir).resolve()
        plan = []
        for key in self.list(prefix):
            relative = key[len(folder):]
            if key.endswith("/"):  # a zero-byte "folder" object made by consoles; nothing to write
                continue
            try:
                check_key(relative, self.field)
            except StorageError:
                raise _bad(self.field, f"refusing to download {self.uri(key)!r}: its key would escape {dest}") from None
            target = dest.joinpath(*relative.split("/"))
            if not target.resolve().is_relative_to(dest):  # a symlinked folder already in local_dir
                raise _bad(self.field, f"refusing to download {self.uri(key)!r}: it would be written outside {dest}")
            plan.append((key, target))
        if not plan:
            raise _bad(self.field, f"nothing found at {self.uri(folder)}")
        for key, target in plan:
            self._download_atomic(key, target)
        log.info("downloaded %d files from %s to %s", len(plan), self.uri(folder), dest)
        return dest

    def _download_atomic(self, key: str, target: Path) -> None:
        """Download into a temporary sibling and rename, so a failed download never leaves a partial file."""
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}{_TMP_SUFFIX}")
        try:
            self._download(key, tmp)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)

    def _plan_dir(self, local_dir: str | Path, prefix: str) -> list[tuple[Path, str]]:
        local_dir = Path(local_dir)
        if not local_dir.is_dir():
            raise _bad(self.field, f"'{local_dir}' is not a directory")
        folder = _folder(prefix, self.field)
        plan = []
        for dirpath, dirnames, filenames in os.walk(local_dir):
            dirnames.sort()
            for name in sorted(filenames):
                path = Path(dirpath, name)
                key = folder + path.relative_to(local_dir).as_posix()
                check_key(key, self.field)
                if key == folder + MANIFEST_NAME:
                    raise _bad(self.field, f"'{path}' uses the reserved name {MANIFEST_NAME}, written last by publish")
                plan.append((path, key))
        return plan


# --------------------------------------------------------------------------------------------- local folder


def _atomic_write(target: Path, write) -> None:
    """Call ``write(file)`` on a temporary file beside ``target``, then rename it over ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}{_TMP_SUFFIX}")
    try:
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as f:  # umask applies
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except OSError as exc:
        if exc.filename is not None:
            raise
        # A full disk fails in write() or fsync(), whose errors name no file: name the one being written.
        raise OSError(exc.errno, exc.strerror, str(target)) from exc
    finally:
        tmp.unlink(missing_ok=True)


class LocalStore(ObjectStore):
    """A directory; writes go to a temporary file in the destination folder and are renamed into place."""

    def __init__(self, root: Path, *, field: str = "output"):
        self.root = Path(root).resolve()
        self.field = field

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    def uri(self, key: str = "") -> str:
        return (self.root / key).as_uri() if key else self.root.as_uri()

    def _path(self, key: str, *, write: bool = False) -> Path:
        check_key(key, self.field)
        path = self.root.joinpath(*key.split("/"))
        # Reads may follow symlinks out (a Hub cache snapshot links into its blobs); writes may not.
        if write and not path.parent.resolve().is_relative_to(self.root):
            raise _bad(self.field, f"key '{key}' leads outside {self.root} through a symlink")
        return path

    def upload_file(self, local_path: str | Path, key: str) -> FileEntry:
        target = self._path(key, write=True)
        digest, size = hashlib.sha256(), 0
        with open(local_path, "rb") as src:
            if target.exists() and os.path.samefile(local_path, target):  # publishing a folder in place
                while chunk := src.read(_COPY_CHUNK):
                    digest.update(chunk)
                    size += len(chunk)
                return FileEntry(key, size, digest.hexdigest())

            def copy(dst):
                nonlocal size
                while chunk := src.read(_COPY_CHUNK):
                    digest.update(chunk)
                    dst.write(chunk)
                    size += len(chunk)

            _atomic_write(target, copy)
        return FileEntry(key, size, digest.hexdigest())

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        folder = _folder(prefix, self.field)
        base = self.root.joinpath(*folder.split("/")[:-1]) if folder else self.root
        if not base.is_dir():
            return []
        keys = []
        for dirpath, dirnames, filenames in os.walk(base):
            for name in filenames:
                if not name.endswith(_TMP_SUFFIX):
                    keys.append(Path(dirpath, name).relative_to(self.root).as_posix())
        return sorted(keys)

    def delete_keys(self, keys) -> None:
        parents = set()
        for key in keys:
            path = self._path(key, write=True)
            path.unlink(missing_ok=True)
            parents.add(path.parent)
        self._prune(parents)

    def delete_prefix(self, prefix: str = "") -> None:
        folder = _folder(prefix, self.field)
        base = self.root.joinpath(*folder.split("/")[:-1]) if folder else self.root
        if base.is_symlink() or not base.resolve().is_relative_to(self.root):
            raise _bad(self.field, f"'{prefix}' leads outside {self.root} through a symlink")
        if base.is_dir():
            shutil.rmtree(base)  # also removes temporary files a crashed write left behind
        self._prune({base.parent} if base != self.root else set())

    def _prune(self, folders) -> None:
        """Remove folders left empty, walking up to and including the root."""
        for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
            while folder.is_relative_to(self.root):
                try:
                    folder.rmdir()
                except OSError:  # not empty, or already gone
                    break
                folder = folder.parent

    def presigned_url(self, key: str, expires: int = 3600) -> str:
        return self._path(key).absolute().as_uri()

    def _put_bytes(self, key: str, data: bytes) -> None:
        _atomic_write(self._path(key, write=True), lambda f: f.write(data))

    def _put_new(self, key: str, data: bytes) -> tuple:
        # Written in full beside the target, then hard-linked into place: link() fails when the name exists, so
        # the manifest appears complete and only if nobody else's is there. The token is the file's identity and
        # its content's hash: a file deleted and written again may get the same inode number.
        target = self._path(key, write=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}{_TMP_SUFFIX}")
        try:
            with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, target)
            except FileExistsError:
                raise self._taken(key) from None
            return self._identity(target)
        finally:
            tmp.unlink(missing_ok=True)

    @staticmethod
    def _identity(path: Path) -> tuple:
        stat = path.stat()
        return stat.st_dev, stat.st_ino, stat.st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest()

    def _delete_own(self, key: str, token) -> bool:
        path = self._path(key, write=True)
        try:
            if self._identity(path) != tuple(token):
                return False
        except FileNotFoundError:
            return False
        path.unlink(missing_ok=True)
        self._prune({path.parent})
        return True

    def _get_bytes(self, key: str) -> bytes | None:
        path = self._path(key)
        return path.read_bytes() if path.is_file() else None

    def _download(self, key: str, dest: Path) -> None:
        shutil.copyfile(self._path(key), dest)


# ---------------------------------------------------------------------------------------------------- S3


class _HashingReader:
    """An open file handed to s3transfer that hashes each byte the first time it is read.

    s3transfer reads multipart parts in order, but a single PUT may be read twice (botocore's checksum, then the
    send, or a retry): only bytes past the high-water mark are hashed, so the digest covers the file exactly once
    and describes the bytes that were sent.
    """

    def __init__(self, f):
        self._f = f
        self._hash = hashlib.sha256()
        self._hashed = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._f.tell()

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def close(self) -> None:
        """s3transfer closes the body after a single PUT; the caller's ``with open`` owns the file."""

    def read(self, size: int = -1) -> bytes:
        start = self._f.tell()
        data = self._f.read(size)
        if start <= self._hashed < start + len(data):
            self._hash.update(memoryview(data)[self._hashed - start:])
            self._hashed = start + len(data)
        return data

    def finish(self) -> tuple[int, str]:
        """(size, sha256); bytes that were never read in order are read now."""
        self._f.seek(self._hashed)
        while chunk := self._f.read(_COPY_CHUNK):
            self._hash.update(chunk)
            self._hashed += len(chunk)
        return self._hashed, self._hash.hexdigest()


def _endpoint_for_messages(url: str | None) -> str:
    if not url:
        return "the default AWS endpoint"
    parts = urlsplit(url)  # drop any user:password@ and query string
    host = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=host, query=""))


_botocore_loader = None


def _s3_client():
    """A new S3 client, configured only by the standard AWS settings, read afresh (credentials, region, endpoint).

    No endpoint, region or credentials are passed: boto3 takes them from the environment and config files, which
    is how AWS_ENDPOINT_URL(_S3) reaches MinIO, Ceph or R2. SigV4 is pinned because botocore otherwise presigns with
    the deprecated SigV2 in us-east-1, which R2 and newer regions refuse. Each client gets a new session but shares
    the parsed service models: a session from scratch took 70 ms per store, this 8 ms (measured), which counts
    when the API opens a store per request.
    """
    global _botocore_loader
    import boto3
    import botocore.session
    from botocore.config import Config
    from botocore.loaders import create_loader

    if _botocore_loader is None:
        _botocore_loader = create_loader(os.environ.get("AWS_DATA_PATH"))
    core = botocore.session.get_session()
    core.register_component("data_loader", _botocore_loader)
    return boto3.session.Session(botocore_session=core).client(
        # total_max_attempts counts the first try; botocore's "max_attempts" key would mean 5 retries, 6 requests.
        "s3", config=Config(signature_version="s3v4",
                            retries={"mode": RETRY_MODE, "total_max_attempts": MAX_ATTEMPTS})
    )


_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
                     "TokenRefreshRequired", "InvalidClientTokenId"}


class S3Store(ObjectStore):
    """Keys under ``s3://bucket/prefix/`` through one boto3 client (standard retry mode, 5 attempts in all)."""

    def __init__(self, bucket: str, prefix: str = "", *, field: str = "output"):
        from boto3.s3.transfer import TransferConfig

        self.bucket = bucket
        self.base = _folder(prefix, field)
        self.field = field
        self.client = _s3_client()
        self.transfer = TransferConfig(
            multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_CHUNKSIZE,
            max_concurrency=MAX_CONCURRENCY,
        )

    def __repr__(self) -> str:
        return f"S3Store({self.uri()!r})"

    def uri(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{self.base}{key}"

    def _key(self, key: str) -> str:
        return self.base + check_key(key, self.field)

    @contextmanager
    def _errors(self, action: str, key: str = ""):
        """Turn boto3 and botocore failures into a StorageError that names the field, bucket and key."""
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except (BotoCoreError, ClientError, Boto3Error) as exc:
            raise self._storage_error(exc, action, key) from None

    def _storage_error(self, exc: Exception, action: str, key: str) -> StorageError:
        from botocore.exceptions import (ClientError, ConnectTimeoutError, EndpointConnectionError,
                                         NoCredentialsError, PartialCredentialsError)

        where = self.uri(key)
        # S3UploadFailedError wraps the ClientError only as its context.
        cause = exc if isinstance(exc, ClientError) else exc.__cause__ or exc.__context__
        if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
            return _bad(self.field, f"no S3 credentials found while {action} {where}: set AWS_ACCESS_KEY_ID and "
                                    "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or run with an instance or pod role")
        if isinstance(exc, (EndpointConnectionError, ConnectTimeoutError)):
            endpoint = _endpoint_for_messages(self.client.meta.endpoint_url)
            return _bad(self.field, f"cannot reach the S3 endpoint {endpoint} while {action} {where}: "
                                    "check AWS_ENDPOINT_URL and the network")
        if isinstance(cause, ClientError):
            error = cause.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = cause.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("404", "NoSuchKey", "NotFound") and not self._bucket_exists():
                code = "NoSuchBucket"
            if code == "NoSuchBucket":
                return _bad(self.field, f"bucket '{self.bucket}' does not exist (while {action} {where}); "
                                        "create it or correct the URI")
            if code in ("404", "NoSuchKey", "NotFound"):
                return _bad(self.field, f"{where} does not exist")
            if code in _CREDENTIAL_CODES:
                return _bad(self.field, f"the S3 endpoint rejected the credentials ({code}) while {action} {where}")
            if code == "AccessDenied" or status == 403:
                return _bad(self.field, f"access denied while {action} {where}: the credentials lack permission")
            return _bad(self.field, f"S3 error {code or status} while {action} {where}: {error.get('Message', '')}")
        return _bad(self.field, f"S3 failure while {action} {where}: {type(exc).__name__}: {exc}")

    def _bucket_exists(self) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            return str(exc.response.get("Error", {}).get("Code")) not in ("404", "NoSuchBucket", "NotFound")
        except Exception:  # unreachable, no credentials: not this question's business
            return True
        return True

    def upload_file(self, local_path: str | Path, key: str) -> FileEntry:
        full = self._key(key)
        with open(local_path, "rb") as f, self._errors("uploading to", key):
            reader = _HashingReader(f)
            # upload_fileobj (not upload_file) so the bytes s3transfer reads are the bytes hashed: one pass.
            self.client.upload_fileobj(reader, self.bucket, full, Config=self.transfer)
            size, sha256 = reader.finish()
        log.debug("uploaded %s (%d bytes)", self.uri(key), size)
        return FileEntry(key, size, sha256)

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        full = self._key(key)
        with self._errors("checking", key):
            try:
                self.client.head_object(Bucket=self.bucket, Key=full)
            except ClientError as exc:
                # A HEAD of a missing key and of a missing bucket both answer a bare 404: tell them apart.
                if str(exc.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound") \
                        and self._bucket_exists():
                    return False
                raise
        return True

    def list(self, prefix: str = "") -> list[str]:
        folder = self.base + _folder(prefix, self.field)
        keys = []
        with self._errors("listing", _folder(prefix, self.field)):
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=folder):
                keys.extend(obj["Key"][len(self.base):] for obj in page.get("Contents", []))
        return sorted(keys)

    def delete_prefix(self, prefix: str = "") -> None:
        if not self.base + _folder(prefix, self.field):
            raise _bad(self.field, f"refusing to delete every object in bucket '{self.bucket}'; name a prefix")
        super().delete_prefix(prefix)

    def delete_keys(self, keys) -> None:
        keys = [self.base + key for key in keys]  # listed keys may be malformed; they are deleted as they are
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = keys[start:start + 1000]
            with self._errors("deleting under", ""):
                response = self.client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True}
                )
            if response.get("Errors"):
                first = response["Errors"][0]
                raise _bad(self.field, f"could not delete {len(response['Errors'])} objects under {self.uri()}, "
                                       f"e.g. '{first.get('Key')}': {first.get('Code')}")

    def presigned_url(self, key: str, expires: int = 3600) -> str:
        """A GET URL for ``key`` valid ``expires`` seconds. It is a bearer credential: never log it."""
        if not 1 <= int(expires) <= MAX_PRESIGN_SECONDS:
            raise _bad(self.field, f"presigned URL lifetime must be 1..{MAX_PRESIGN_SECONDS} seconds")
        with self._errors("signing a URL for", key):
            return self.client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": self._key(key)}, ExpiresIn=int(expires)
            )

    def _put_bytes(self, key: str, data: bytes) -> None:
        with self._errors("writing", key):
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data,
                                   ContentType="application/json")

    def _put_new(self, key: str, data: bytes) -> str:
        """PUT with ``If-None-Match: *`` (S3 since 2024, MinIO, R2, moto): the server refuses it with 412 when the
        key exists, so the check and the write are one step. The token is the ETag the server gave this write."""
        from botocore.exceptions import ClientError

        with self._errors("writing", key):
            try:
                response = self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data,
                                                  ContentType="application/json", IfNoneMatch="*")
            except ClientError as exc:
                code = str(exc.response.get("Error", {}).get("Code", ""))
                status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                # 409 ConditionalRequestConflict: a concurrent conditional write to the same key won.
                if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
                    # Or botocore retried this very PUT after its reply was lost, and finds the object it wrote.
                    own = self._holding(key, data)
                    if own is not None:
                        return own
                    raise self._taken(key) from None
                raise
        return response["ETag"]

    def _holding(self, key: str, data: bytes) -> str | None:
        """The ETag of the object at ``key`` if it holds exactly ``data``, else None. A manifest names its job and
        the second it was written, so another writer's that matches byte for byte vouches for the same files."""
        from botocore.exceptions import ClientError

        try:
            found = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            return found["ETag"] if found["Body"].read() == data else None
        except ClientError:
            return None

    def _delete_own(self, key: str, token) -> bool:
        """DELETE with ``If-Match: <ETag of our write>``: a manifest somebody else wrote since is left alone."""
        from botocore.exceptions import ClientError

        with self._errors("deleting", key):
            try:
                self.client.delete_object(Bucket=self.bucket, Key=self._key(key), IfMatch=token)
            except ClientError as exc:
                code = str(exc.response.get("Error", {}).get("Code", ""))
                if code in ("PreconditionFailed", "NoSuchKey", "404", "NotFound"):
                    return False
                if code != "NotImplemented":
                    raise
                # A store without conditional deletes: compare the ETag first (a small window, no better offer).
                try:
                    head = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
                except ClientError:
                    return False
                if head.get("ETag") != token:
                    return False
                self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
        return True

    def _get_bytes(self, key: str) -> bytes | None:
        from botocore.exceptions import ClientError

        with self._errors("reading", key):
            try:
                return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") == "NoSuchKey":
                    return None
                raise

    def _download(self, key: str, dest: Path) -> None:
        with self._errors("downloading", key):
            self.client.download_file(self.bucket, self.base + key, str(dest), Config=self.transfer)


# -------------------------------------------------------------------------------------------------- workflows


class Publisher:
    """Publishes one output to ``uri`` file by file as the files become ready, and the manifest last.

    ``add(path, key)`` takes a finished file at once (a hard link into the publisher's own staging folder, so the
    caller may move or delete its copy) and uploads it in a background thread while the caller goes on working;
    ``finish(local_dir)`` uploads what was not added yet, waits for every upload, then writes the manifest.
    ``abort()`` (also what leaving the ``with`` block on an exception does) stops, waits for the upload in flight
    and deletes what this publisher wrote in this attempt and nothing else: the keys whose upload it started, and
    the manifest only if it is still the one this publisher created. A failed or cancelled job leaves no manifest
    of its own behind and, as far as deletes succeed, none of its files; it never deletes by name what another
    writer put there.

    A location that already holds a manifest is refused up front unless ``overwrite`` (then the old manifest goes
    first and the files it listed that the new output lacks go last). The manifest itself is created with a
    conditional write, so a second writer that reached the same folder meanwhile fails instead of publishing a
    manifest that does not match the files. (In the service, a folder is claimed by one job at submit time:
    ``JobStore.create_job``; this is the store-level guard under that.)
    """

    def __init__(self, uri: str | Path, *, staging: str | Path, overwrite: bool = False, field: str = "output",
                 local_root: Path | None = None, confine: bool = False):
        from concurrent.futures import ThreadPoolExecutor

        self.store = open_store(uri, field=field, local_root=local_root, confine=confine)
        self.field = field
        self._old = None
        if self.store.exists(MANIFEST_NAME):
            if not overwrite:
                # No location in the message: it reaches the job's tenant, and the folder may be another's.
                raise _bad(field, f"the location already holds a published output ({MANIFEST_NAME}); choose "
                                  "another location or overwrite it explicitly")
            self._old = self.store.read_manifest("")
            # The old output stops being complete as soon as the first file is replaced: no manifest may vouch for it.
            self.store.delete_keys([MANIFEST_NAME])
        self._staging = Path(staging)
        self._staging.mkdir(parents=True, exist_ok=True)
        # One upload at a time: the point is to overlap uploading with compressing, not to saturate the link.
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="llmpress-upload")
        self._uploads: dict[str, object] = {}  # key -> Future[FileEntry], in the order added
        self._started: list[str] = []  # keys this publisher began to write: the only ones abort() may delete
        self._manifest_token = None  # set once our manifest exists: abort() deletes it only while it is ours
        self._failed: BaseException | None = None
        self._done = False
        # Keys that are a finished block's checkpoint (service.jobs.checkpoints): abort() leaves them for the job's
        # next attempt, unless told to discard everything (a cancel).
        self.kept: set[str] = set()
        self._awaited: set[str] = set()  # keys with a when_uploaded callback: a failed run still finishes them

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and not self._done:
            self.abort()
        self._close()

    def adopt(self, entry: FileEntry) -> None:
        """Take a file an earlier attempt of the same job uploaded (``entry`` as it was uploaded, its sha256 checked
        by the caller) into this output as it is: listed in the manifest, not uploaded again."""
        from concurrent.futures import Future

        check_key(entry.key, self.field)
        if entry.key in self._uploads:
            raise _bad(self.field, f"'{entry.key}' was added twice")
        done: Future = Future()
        done.set_result(entry)
        self._uploads[entry.key] = done
        self.kept.add(entry.key)

    def when_uploaded(self, key: str, callback) -> None:
        """Call ``callback(entry)`` (in the upload thread) once ``key``, added before, is uploaded; not on failure."""
        def done(future):
            if not future.cancelled() and future.exception() is None:
                callback(future.result())

        self._awaited.add(key)
        self._uploads[key].add_done_callback(done)

    def add(self, path: str | Path, key: str) -> None:
        """Upload the finished file ``path`` to ``key`` soon, in the background; raises the error of an earlier
        upload that failed, so the caller stops early."""
        if self._failed is not None:
            raise self._failed
        check_key(key, self.field)
        if key == MANIFEST_NAME:
            raise _bad(self.field, f"'{path}' uses the reserved name {MANIFEST_NAME}, written last by publish")
        if key in self._uploads:
            raise _bad(self.field, f"'{key}' was added twice")
        staged = self._staging / uuid.uuid4().hex
        try:
            os.link(path, staged)
        except OSError:  # another file system: a copy costs disk but keeps the guarantee
            shutil.copyfile(path, staged)
        self._uploads[key] = self._pool.submit(self._upload, staged, key)

    def _upload(self, staged: Path, key: str) -> FileEntry:
        try:
            if self._failed is not None:  # one upload failed: the publish is lost, send nothing more
                raise self._failed
            self._started.append(key)  # before the write: a failed upload may still have landed
            return self.store.upload_file(staged, key)
        except BaseException as exc:
            self._failed = self._failed or exc
            raise
        finally:
            staged.unlink(missing_ok=True)

    def wait(self) -> None:
        """Block until every file added so far is uploaded; raises the first upload's error."""
        for future in list(self._uploads.values()):
            future.result()

    def finish(self, local_dir: str | Path, extra_manifest: dict | None = None) -> Manifest:
        """Upload the files of ``local_dir`` that were not added, wait for all uploads, write the manifest."""
        extra = dict(extra_manifest or {})
        json.dumps(extra)  # a value JSON cannot hold fails here, before the manifest
        plan = self.store._plan_dir(local_dir, "")
        if not plan and not self._uploads:
            raise _bad(self.field, f"'{local_dir}' holds no files to publish")
        for path, key in plan:
            if key not in self._uploads:
                self.add(path, key)
        entries = sorted((future.result() for future in self._uploads.values()), key=lambda e: e.key)
        manifest, self._manifest_token = self.store._write_manifest("", entries, extra)
        self._done = True
        if self._old is not None:
            stale = {f.key for f in self._old.files} - set(self._uploads)
            if stale:
                try:
                    self.store.delete_keys(sorted(stale))
                except StorageError as exc:  # the new manifest is authoritative; leftovers are harmless
                    log.warning("could not delete %d files of the replaced output at %s: %s", len(stale),
                                self.store.uri(), exc)
        log.info("published %d files (%d bytes) to %s", len(manifest.files), manifest.total_size, self.store.uri())
        return manifest

    def abort(self, *, discard_kept: bool = False) -> None:
        """Stop uploading and delete what this publisher wrote: the manifest if it is still ours, then every key
        whose upload it started; also after ``finish``, to take back an output whose job was ended elsewhere.
        Checkpointed keys (``kept``) stay for the job's next attempt unless ``discard_kept`` (then adopted ones
        go too)."""
        for key, future in self._uploads.items():
            # A failed run's finished blocks still reach the output (their checkpoints with them): a retry then
            # does not compute them again. A cancel sends nothing more.
            if discard_kept or key not in self._awaited:
                future.cancel()
        self._pool.shutdown(wait=True)
        started = set(self._started) | (self.kept if discard_kept else set())
        if not discard_kept:
            started -= self.kept
        try:
            # The manifest first: once it is gone nothing vouches for files about to disappear.
            if self._manifest_token is not None:
                self.store._delete_own(MANIFEST_NAME, self._manifest_token)
                self._manifest_token = None
            # Every key we began to write, not only those known to be done: a failed upload may have landed.
            if started:
                self.store.delete_keys(sorted(started))
        except Exception as cleanup:  # noqa: BLE001 - the original error matters more; say the cleanup failed
            log.warning("publish to %s failed and its cleanup failed too: %s", self.store.uri(), cleanup)
        self._done = True

    def _close(self) -> None:
        self._pool.shutdown(wait=True)
        shutil.rmtree(self._staging, ignore_errors=True)


def publish_directory(local_dir: str | Path, uri: str | Path, *, extra_manifest: dict | None = None,
                      overwrite: bool = False, field: str = "output", local_root: Path | None = None,
                      confine: bool = False) -> Manifest:
    """Upload every file of a finished output directory to ``uri``, then its manifest; the manifest.

    See :class:`Publisher` for the guarantees: nothing half-published survives a failure (any exception,
    KeyboardInterrupt included).
    """
    import tempfile

    with tempfile.TemporaryDirectory(prefix="llmpress-publish-") as staging:
        with Publisher(uri, staging=staging, overwrite=overwrite, field=field, local_root=local_root,
                       confine=confine) as publisher:
            return publisher.finish(local_dir, extra_manifest)


def fetch(uri: str | Path, local_dir: str | Path, *, field: str = "model", local_root: Path | None = None,
          confine: bool = False) -> Path:
    """A local path for a model or dataset location: local paths as they are, S3 objects downloaded into ``local_dir``.

    An S3 URI naming a folder is downloaded as a tree (the directory is returned); one naming a single object (a
    dataset file) is downloaded to ``local_dir/<name>`` (that file is returned).
    """
    scheme, where, prefix = parse_uri(uri, field=field, local_root=local_root, confine=confine)
    if scheme == "file":
        path = Path(where)
        if not path.exists():
            raise _bad(field, f"'{uri}' does not exist")
        return path
    store = S3Store(where, prefix, field=field)
    if store.list(""):
        return store.download_prefix("", local_dir)
    parent, _, name = prefix.rpartition("/")
    if name:
        single = S3Store(where, parent, field=field)
        if single.exists(name):
            target = Path(local_dir).resolve() / name
            single._download_atomic(name, target)
            return target
    raise _bad(field, f"nothing found at {store.uri()}")
