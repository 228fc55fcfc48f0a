"""Object store: named blobs (trajectory shards, checkpoints, reports) in a local folder or S3.

Work that runs in other processes (Prefect task runners, GPU workers) cannot write the
DuckDB file, so it writes its results here; the one process that owns the DuckDB file
loads them (see `shards.py` and `Store.load_shards`).

    store = open_object_store("s3://bucket/maestro")     # or a folder: open_object_store("out/objects")
    store.put_bytes("trajectories/x.parquet", data)
    store.list("trajectories/")                          # sorted keys
    store.get_bytes("trajectories/x.parquet")

Keys are relative, '/'-separated paths ("a/b/c.parquet"); `list(prefix)` matches a plain
string prefix, as S3 does. A put replaces the object whole: a reader sees the old object or
the new one, never half of one (local: temp file + os.replace; S3: PUT is atomic).

S3 settings: the endpoint comes from the argument, else MAESTRO_S3_ENDPOINT_URL, else
AWS_ENDPOINT_URL (unset: real AWS); credentials and region come from the usual AWS
environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION / AWS_DEFAULT_REGION,
AWS_PROFILE). Nothing is created implicitly: a missing bucket is an error unless
`create_bucket=True`. Transient failures (throttling, 5xx, dropped connections) are retried by
botocore; the rest become a `StorageError` that names the URI and the fix (`StorageUnavailable`
when the store could not be reached or had a server error: worth trying again later).

Outages: `open_object_store("s3://...")` puts the S3 store behind a `SpoolingObjectStore`. A
write the server cannot take (after retries with backoff) goes to a local spool folder
(`<home>/spool/<bucket>/<prefix>`, or $MAESTRO_SPOOL_DIR) with a `SPOOLED ...` warning in the
log, reads consult the spool, and the spool is uploaded by the next put that reaches the
server (or `flush_spool()`), with an `UPLOADED ...` line. The S3 server must be reachable when
the store is opened (the bucket is checked then).
"""

from __future__ import annotations

import logging
import os
import random
import tempfile
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from maestro_core.errors import ConfigError, StorageError
from maestro_core.home import resolve_home

log = logging.getLogger(__name__)

_TMP_PREFIX = ".maestro-tmp-"
"""Name prefix of the temp files a local put writes before renaming; `list` never shows them."""


class ObjectNotFound(StorageError):
    """`get_bytes` of a key that does not exist."""


class StorageUnavailable(StorageError):
    """The object store could not be reached or answered with a server error (connection
    refused or dropped, timeout, 5xx, throttling) after its retries: worth trying again later,
    unlike a missing bucket or denied access."""


def check_key(key: str) -> str:
    """A key must be a relative '/'-separated path without empty, '.' or '..' parts, so that
    the same key means the same object on a local disk and in S3."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"object key must be a non-empty string, got {key!r}")
    parts = key.split("/")
    if key.startswith("/") or "\\" in key or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"invalid object key {key!r}: use a relative path like 'a/b/c.parquet' "
                         "(no leading '/', no '\\', no empty, '.' or '..' parts)")
    if parts[-1].startswith(_TMP_PREFIX):
        raise ValueError(f"invalid object key {key!r}: names starting with {_TMP_PREFIX!r} are reserved")
    return key


class ObjectStore(ABC):
    """A flat namespace of keys -> bytes."""

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None:
        """Write (or replace) the object at `key`, atomically."""

    @abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """The object's bytes; `ObjectNotFound` when there is none."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Every key that starts with `prefix` (a plain string prefix), sorted."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object; a missing key is not an error (as in S3)."""

    @abstractmethod
    def uri(self, key: str = "") -> str:
        """Where the object lives, for messages and logs (file:///... or s3://...)."""

    def close(self) -> None:
        """Finish pending work (a spool's uploads); nothing to do by default."""


# ---------------------------------------------------------------------------------------
# local folder
# ---------------------------------------------------------------------------------------

class LocalObjectStore(ObjectStore):
    """Objects are files under `root` (created on the first write)."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().absolute()

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*check_key(key).split("/"))

    def put_bytes(self, key: str, data: bytes) -> None:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # the temp file sits in the same folder so os.replace is a rename on one file
            # system, atomic: a crash leaves the old object or a stray temp file, never half a file
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_TMP_PREFIX + path.name + ".")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as e:
            raise StorageError(f"cannot write {self.uri(key)}: {e}. Fix: check that the folder "
                               f"{self.root} is writable and the disk is not full.") from e

    def get_bytes(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except FileNotFoundError as e:
            raise ObjectNotFound(f"no object at {self.uri(key)}.") from e
        except OSError as e:
            raise StorageError(f"cannot read {self.uri(key)}: {e}.") from e

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        # walk only the folder the prefix names, not the whole root
        folder = prefix.rpartition("/")[0]
        base = self.root.joinpath(*folder.split("/")) if folder else self.root
        if not base.is_dir():
            return []
        out = []
        for dirpath, _dirs, files in os.walk(base):
            rel = Path(dirpath).relative_to(self.root).as_posix()
            for name in files:
                if name.startswith(_TMP_PREFIX):
                    continue
                key = name if rel == "." else f"{rel}/{name}"
                if key.startswith(prefix):
                    out.append(key)
        return sorted(out)

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink(missing_ok=True)
        except OSError as e:
            raise StorageError(f"cannot delete {self.uri(key)}: {e}.") from e

    def uri(self, key: str = "") -> str:
        return (self.root / key).as_uri() if key else self.root.as_uri()

    def __repr__(self) -> str:
        return f"LocalObjectStore({str(self.root)!r})"


# ---------------------------------------------------------------------------------------
# S3 (and S3-compatible: MinIO, moto, R2...)
# ---------------------------------------------------------------------------------------

def parse_s3_uri(location: str) -> tuple[str, str]:
    """'s3://bucket/some/prefix' -> ('bucket', 'some/prefix/'); the prefix is '' or ends with '/'."""
    if not location.startswith("s3://"):
        raise ConfigError(f"not an S3 location: {location!r}.", fix="write it as s3://bucket/prefix.")
    bucket, _, prefix = location[len("s3://"):].partition("/")
    if not bucket:
        raise ConfigError(f"no bucket in {location!r}.", fix="write it as s3://bucket/prefix.")
    prefix = prefix.strip("/")
    return bucket, (prefix + "/" if prefix else "")


def resolve_endpoint(endpoint_url: str | None = None) -> str | None:
    """The argument, else MAESTRO_S3_ENDPOINT_URL, else AWS_ENDPOINT_URL, else None (AWS)."""
    return (endpoint_url or os.environ.get("MAESTRO_S3_ENDPOINT_URL")
            or os.environ.get("AWS_ENDPOINT_URL") or None)


_DENIED = {"AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch",
           "ExpiredToken", "InvalidToken", "AllAccessDisabled"}
_NOT_FOUND = {"NoSuchKey", "404", "NotFound"}
_UNAVAILABLE = {"500", "502", "503", "504", "InternalError", "ServiceUnavailable", "SlowDown", "Throttling",
                "ThrottlingException", "RequestTimeout"}


class S3ObjectStore(ObjectStore):
    """Objects under `s3://bucket/prefix/`. See the module docstring for settings.

    `max_attempts` counts the first try (botocore 'standard' retry mode: throttling, 5xx and
    connection errors, with exponential backoff). `check_bucket` verifies the bucket once at
    construction, so a wrong name fails at startup, not in the middle of a run.
    """

    def __init__(self, location: str, endpoint_url: str | None = None, *, create_bucket: bool = False,
                 max_attempts: int = 5, connect_timeout_s: float = 10.0, read_timeout_s: float = 60.0,
                 check_bucket: bool = True, client: Any = None):
        import boto3  # imported here: local-only users never pay for boto3's import
        from botocore.config import Config

        self.location = location
        self.bucket, self.prefix = parse_s3_uri(location)
        self.endpoint_url = resolve_endpoint(endpoint_url)
        if client is None:
            config = Config(
                retries={"max_attempts": max_attempts, "mode": "standard"},
                connect_timeout=connect_timeout_s, read_timeout=read_timeout_s,
                # custom endpoints (MinIO, moto, an IP) rarely resolve bucket.host names
                s3={"addressing_style": "path"} if self.endpoint_url else None,
            )
            client = boto3.session.Session().client("s3", endpoint_url=self.endpoint_url, config=config)
        self.client = client
        if create_bucket:
            self._create_bucket()
        elif check_bucket:
            with self._errors(""):
                self.client.head_bucket(Bucket=self.bucket)

    # -- helpers --------------------------------------------------------------------------
    def _key(self, key: str) -> str:
        return self.prefix + check_key(key)

    def _where(self) -> str:
        return f" (endpoint {self.endpoint_url})" if self.endpoint_url else ""

    def _create_bucket(self) -> None:
        from botocore.exceptions import ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as e:
            if _error_code(e) not in ("404", "NoSuchBucket", "NotFound"):
                raise self.translate(e, "") from e
        region = self.client.meta.region_name
        kw: dict[str, Any] = {"Bucket": self.bucket}
        if region and region != "us-east-1":  # us-east-1 rejects an explicit LocationConstraint
            kw["CreateBucketConfiguration"] = {"LocationConstraint": region}
        with self._errors(""):
            try:
                self.client.create_bucket(**kw)
            except ClientError as e:
                if _error_code(e) not in ("BucketAlreadyOwnedByYou",):
                    raise

    def translate(self, exc: BaseException, key: str) -> StorageError:
        """Turn a boto3/botocore failure into a StorageError naming the URI and the fix."""
        from botocore.exceptions import ClientError
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import (EndpointConnectionError, HTTPClientError, NoCredentialsError,
                                         PartialCredentialsError)

        uri = self.uri(key)
        if isinstance(exc, ClientError):
            code = _error_code(exc)
            if code == "NoSuchBucket" or (code in ("404", "NotFound") and not key):
                return StorageError(
                    f"S3 bucket '{self.bucket}' does not exist{self._where()} (while accessing {uri}). "
                    f"Fix: create it (aws s3 mb s3://{self.bucket}), correct the bucket name, or pass "
                    "create_bucket=True; check MAESTRO_S3_ENDPOINT_URL / AWS_ENDPOINT_URL if it is not on AWS.")
            if code in _NOT_FOUND:
                return ObjectNotFound(f"no object at {uri}.")
            if code in _DENIED:
                return StorageError(
                    f"access denied to {uri}{self._where()} ({code}). Fix: check AWS_ACCESS_KEY_ID / "
                    "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) and that their policy allows s3:GetObject, "
                    f"s3:PutObject, s3:ListBucket and s3:DeleteObject on bucket '{self.bucket}'.")
            status = getattr(exc, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            if code in _UNAVAILABLE or status >= 500:
                return StorageUnavailable(f"S3 request for {uri}{self._where()} failed: {code}: {exc}. "
                                          "Fix: wait for the object store to recover; retries were used up.")
            return StorageError(f"S3 request for {uri}{self._where()} failed: {code}: {exc}.")
        if isinstance(exc, EndpointConnectionError):
            return StorageUnavailable(
                f"cannot connect to the S3 endpoint for {uri}{self._where()}: {exc}. Fix: start the "
                "object store server or correct MAESTRO_S3_ENDPOINT_URL / AWS_ENDPOINT_URL.")
        if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
            return StorageError(
                f"no AWS credentials to access {uri}: {exc}. Fix: set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE).")
        kind = StorageUnavailable if isinstance(exc, (BotoConnectionError, HTTPClientError)) else StorageError
        return kind(f"S3 request for {uri}{self._where()} failed: {type(exc).__name__}: {exc}. "
                    "Fix: check the network and the endpoint; transient errors were already retried.")

    @contextmanager
    def _errors(self, key: str) -> Iterator[None]:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except (ClientError, BotoCoreError) as e:
            raise self.translate(e, key) from e

    # -- ObjectStore ----------------------------------------------------------------------
    def put_bytes(self, key: str, data: bytes) -> None:
        k = self._key(key)
        with self._errors(key):
            self.client.put_object(Bucket=self.bucket, Key=k, Body=data)

    def get_bytes(self, key: str) -> bytes:
        k = self._key(key)
        with self._errors(key):
            return self.client.get_object(Bucket=self.bucket, Key=k)["Body"].read()

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        k = self._key(key)
        with self._errors(key):
            try:
                self.client.head_object(Bucket=self.bucket, Key=k)
                return True
            except ClientError as e:
                # HEAD has no body, so a missing object and a missing bucket both read "404";
                # the bucket was checked at construction
                if _error_code(e) in _NOT_FOUND:
                    return False
                raise

    def list(self, prefix: str = "") -> list[str]:
        out: list[str] = []
        with self._errors(prefix):
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.prefix + prefix)
            for page in pages:
                out.extend(o["Key"][len(self.prefix):] for o in page.get("Contents", ()))
        return sorted(out)

    def delete(self, key: str) -> None:
        k = self._key(key)
        with self._errors(key):
            self.client.delete_object(Bucket=self.bucket, Key=k)

    def uri(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{self.prefix}{key}"

    def __repr__(self) -> str:
        return f"S3ObjectStore({self.uri()!r}, endpoint_url={self.endpoint_url!r})"


def _error_code(e: Any) -> str:
    return str(getattr(e, "response", {}).get("Error", {}).get("Code", ""))


# ---------------------------------------------------------------------------------------
# spool: writes that survive an outage of the object store
# ---------------------------------------------------------------------------------------

_SPOOL_LOCK = _TMP_PREFIX + "spool.lock"
"""The spool's lock file (in the spool folder; its name is never listed as an object)."""


class SpoolingObjectStore(ObjectStore):
    """A remote store (S3) with a local spool folder for the writes it cannot take.

    A put goes to `inner`, retried `retries` times with exponential backoff (`backoff_s`,
    doubling, capped at `backoff_cap_s`, jitter 50-100%) on `StorageUnavailable` (connection
    refused or dropped, timeouts, 5xx, throttling; on top of the retries the inner client
    makes itself). When the retries run out, the object is written to the spool instead
    (atomically, like LocalObjectStore) and a warning says so: the put returns normally and
    the run goes on. Other errors (access denied, missing bucket, a bad key) are raised as is.

    While the spool holds objects, a put first uploads the spool (oldest key order, each
    deleted from the spool only after its upload succeeded), then writes its own object, so a
    key written twice ends with its newest version. After a failed upload the store is taken
    to be down for `probe_interval_s`: puts in that window go straight to the spool, without
    waiting for retries. `flush_spool()` uploads the spool on demand (raises
    `StorageUnavailable` while the store is still down); `close()` tries once.

    Reads see spooled objects: `get_bytes`, `exists` and `list` consult the spool first,
    then the inner store (a spooled object is deleted only after its upload, so it is never
    missing from both). `list` and a `get_bytes` of an object that is not spooled still need
    the inner store. Several processes may share one spool folder: uploads and spool writes
    are serialised by a lock file (`fcntl.flock`) in it.

    `spooled_total` / `uploaded_total` count the objects this instance spooled / uploaded.
    """

    def __init__(self, inner: ObjectStore, spool_dir: str | Path, *, retries: int = 3, backoff_s: float = 0.5,
                 backoff_cap_s: float = 8.0, probe_interval_s: float = 10.0):
        if retries < 0 or backoff_s < 0 or backoff_cap_s < 0 or probe_interval_s < 0:
            raise ValueError("retries, backoff_s, backoff_cap_s and probe_interval_s must be >= 0")
        self.inner = inner
        self.spool = LocalObjectStore(spool_dir)
        self.retries, self.backoff_s, self.backoff_cap_s = retries, backoff_s, backoff_cap_s
        self.probe_interval_s = probe_interval_s
        self.spooled_total = 0
        self.uploaded_total = 0
        self._lock = threading.RLock()
        self._down_until = 0.0

    @property
    def spool_dir(self) -> Path:
        return self.spool.root

    # -- helpers --------------------------------------------------------------------------
    def _retrying(self, fn: Any, attempts: int) -> Any:
        delay = self.backoff_s
        for attempt in range(attempts):
            try:
                return fn()
            except StorageUnavailable as e:
                if attempt == attempts - 1:
                    raise
                log.debug("object store unavailable (attempt %d of %d): %s; retrying in ~%.2f s",
                          attempt + 1, attempts, e, delay)
                time.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(self.backoff_cap_s, delay * 2)
        raise AssertionError("unreachable")

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """This instance's threads and every process sharing the spool folder, one at a time."""
        import fcntl

        with self._lock:
            try:
                self.spool.root.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.spool.root / _SPOOL_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise StorageError(f"cannot use the spool folder {self.spool.root}: {e}. Fix: make it "
                                   "writable, or pass another spool folder.") from e
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)  # closing releases the flock

    def pending(self) -> list[str]:
        """Keys waiting in the spool (written by any process sharing it)."""
        return self.spool.list()

    def _spool_put(self, key: str, data: bytes, why: BaseException | None) -> None:
        with self._locked():
            self.spool.put_bytes(key, data)
            self.spooled_total += 1
            waiting = len(self.spool.list())
        cause = f"unavailable after {1 + self.retries} attempts ({why})" if why else "still unavailable"
        log.warning("SPOOLED %s (%d bytes): the object store %s is %s; kept in the spool %s "
                    "(%d object(s) waiting), uploaded by the next put that reaches the store or by "
                    "flush_spool()", key, len(data), self.inner.uri(), cause, self.spool_path(key), waiting)

    def spool_path(self, key: str) -> Path:
        return self.spool._path(key)

    def _try_flush(self) -> bool:
        """Upload the spool with one attempt per object; False (and the store marked down for
        probe_interval_s) when the store is still unavailable."""
        if time.monotonic() < self._down_until:
            return False
        try:
            self.flush_spool(attempts=1)
            return True
        except StorageUnavailable as e:
            self._down_until = time.monotonic() + self.probe_interval_s
            log.info("object store %s still unavailable (%s); next try in %g s", self.inner.uri(), e,
                     self.probe_interval_s)
            return False

    def flush_spool(self, attempts: int | None = None) -> int:
        """Upload every spooled object (each retried like a put), deleting each from the spool
        once uploaded; returns how many were uploaded. Raises `StorageUnavailable` when the
        store is still down (what was uploaded before stays uploaded)."""
        n = 0
        with self._locked():
            try:
                for key in self.spool.list():
                    try:
                        data = self.spool.get_bytes(key)
                    except ObjectNotFound:
                        continue
                    self._retrying(lambda: self.inner.put_bytes(key, data), attempts or 1 + self.retries)
                    self.spool.delete(key)
                    n += 1
                    self.uploaded_total += 1
            finally:
                if n:
                    log.warning("UPLOADED %d spooled object(s) from %s to %s (%d still waiting)", n,
                                self.spool.root, self.inner.uri(), len(self.spool.list()))
        self._down_until = 0.0
        return n

    # -- ObjectStore ----------------------------------------------------------------------
    def put_bytes(self, key: str, data: bytes) -> None:
        check_key(key)
        if self.pending() and not self._try_flush():
            self._spool_put(key, data, None)  # behind the objects already waiting, in order
            return
        try:
            self._retrying(lambda: self.inner.put_bytes(key, data), 1 + self.retries)
        except StorageUnavailable as e:
            self._down_until = time.monotonic() + self.probe_interval_s
            self._spool_put(key, data, e)

    def get_bytes(self, key: str) -> bytes:
        if self.spool.exists(key):
            try:
                return self.spool.get_bytes(key)
            except ObjectNotFound:
                pass  # uploaded meanwhile: it is in the inner store now
        return self.inner.get_bytes(key)

    def exists(self, key: str) -> bool:
        return self.spool.exists(key) or self.inner.exists(key)

    def list(self, prefix: str = "") -> list[str]:
        spooled = self.spool.list(prefix)  # first: an object leaves the spool only once uploaded
        return sorted(set(spooled) | set(self.inner.list(prefix)))

    def delete(self, key: str) -> None:
        with self._locked():
            self.inner.delete(key)
            self.spool.delete(key)

    def uri(self, key: str = "") -> str:
        return self.inner.uri(key)

    def close(self) -> None:
        """Try once to upload what the spool holds; what cannot be uploaded stays there (and
        a warning says where), for the next process that uses this spool."""
        if not self.pending():
            return
        if not self._try_flush():
            log.warning("%d object(s) stay in the spool %s: the object store %s is unavailable. Fix: "
                        "they are uploaded by the next run that uses this spool, or call flush_spool() "
                        "once the store is back", len(self.pending()), self.spool.root, self.inner.uri())

    def __repr__(self) -> str:
        return f"SpoolingObjectStore({self.inner!r}, spool={str(self.spool.root)!r})"


def default_spool_root() -> Path:
    """$MAESTRO_SPOOL_DIR, else <home>/spool."""
    env = os.environ.get("MAESTRO_SPOOL_DIR")
    return Path(env).expanduser().absolute() if env else resolve_home() / "spool"


def open_object_store(location: str | Path | ObjectStore, *, spool: str | Path | bool | None = None,
                      **kwargs: Any) -> ObjectStore:
    """'s3://bucket/prefix' -> S3ObjectStore (kwargs go to it) behind a SpoolingObjectStore
    whose spool is `<spool>/<bucket>/<prefix>` (`spool`: a folder; None or True:
    $MAESTRO_SPOOL_DIR, else <home>/spool; False: no spool, the bare S3ObjectStore);
    'file:///x' or a path -> LocalObjectStore; an ObjectStore is returned as is."""
    if isinstance(location, ObjectStore):
        return location
    if isinstance(location, Path):
        return LocalObjectStore(location)
    loc = str(location)
    if loc.startswith("s3://"):
        s3 = S3ObjectStore(loc, **kwargs)
        if spool is False:
            return s3
        root = default_spool_root() if spool is None or spool is True else Path(spool).expanduser().absolute()
        return SpoolingObjectStore(s3, root.joinpath(s3.bucket, *filter(None, s3.prefix.split("/"))))
    if loc.startswith("file://"):
        from urllib.parse import unquote, urlparse

        return LocalObjectStore(Path(unquote(urlparse(loc).path)))
    if "://" in loc:
        raise ConfigError(f"unsupported object store location {loc!r}.",
                          fix="use s3://bucket/prefix or a local folder path.")
    return LocalObjectStore(Path(loc))
