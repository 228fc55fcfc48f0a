"""Object stores (local folder and S3 on a real moto server) and trajectory shards."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pytest
from botocore.exceptions import ClientError

from maestro_core.errors import ConfigError, StorageError
from maestro_core.objectstore import (LocalObjectStore, ObjectNotFound, S3ObjectStore, open_object_store,
                                      parse_s3_uri, resolve_endpoint)
from maestro_core.shards import list_shards, parse_shard_key, read_shard, shard_key, write_shard
from maestro_core.trajectory import from_arrow
from tests.store_helpers import free_port, make_chunk, moto_endpoint, new_bucket, s3_env  # noqa: F401 (fixtures)


# -- local ------------------------------------------------------------------------------

def test_local_put_get_list_delete(tmp_path: Path) -> None:
    st = LocalObjectStore(tmp_path / "objs")
    assert st.list() == [] and not st.exists("a/b.bin")
    st.put_bytes("b/2.bin", b"two")
    st.put_bytes("a/1.bin", b"one")
    st.put_bytes("a/sub/3.bin", b"three")
    st.put_bytes("ab.bin", b"x")
    assert st.get_bytes("a/1.bin") == b"one" and st.exists("a/1.bin")
    assert st.list() == ["a/1.bin", "a/sub/3.bin", "ab.bin", "b/2.bin"]
    assert st.list("a/") == ["a/1.bin", "a/sub/3.bin"]
    assert st.list("a") == ["a/1.bin", "a/sub/3.bin", "ab.bin"]  # a plain string prefix, as in S3
    assert st.list("zzz/") == []
    st.put_bytes("a/1.bin", b"uno")  # replace
    assert st.get_bytes("a/1.bin") == b"uno"
    st.delete("a/1.bin")
    st.delete("a/1.bin")  # missing: not an error
    assert not st.exists("a/1.bin")
    with pytest.raises(ObjectNotFound, match="a/1.bin"):
        st.get_bytes("a/1.bin")
    assert st.uri("b/2.bin") == (tmp_path / "objs" / "b" / "2.bin").as_uri()


@pytest.mark.parametrize("key", ["", "/abs", "a//b", "a/../b", "./a", "a\\b", "a/.maestro-tmp-x"])
def test_invalid_keys_are_refused(tmp_path: Path, key: str) -> None:
    with pytest.raises(ValueError):
        LocalObjectStore(tmp_path).put_bytes(key, b"x")


def test_local_put_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    st = LocalObjectStore(tmp_path)
    st.put_bytes("k/obj.bin", b"old")

    def crash(src, dst):  # the process dies between writing the temp file and renaming it
        raise OSError("simulated crash")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(StorageError, match="cannot write"):
        st.put_bytes("k/obj.bin", b"new" * 1000)
    monkeypatch.undo()
    assert st.get_bytes("k/obj.bin") == b"old"  # the old object whole, never half the new one
    assert sorted(p.name for p in (tmp_path / "k").iterdir()) == ["obj.bin"]  # temp file removed
    # a temp file a killed process left behind is never listed as an object
    (tmp_path / "k" / ".maestro-tmp-obj.bin.abc").write_bytes(b"half")
    assert st.list() == ["k/obj.bin"]


def test_open_object_store_dispatch(tmp_path: Path) -> None:
    assert isinstance(open_object_store(tmp_path), LocalObjectStore)
    assert isinstance(open_object_store(str(tmp_path)), LocalObjectStore)
    assert open_object_store(tmp_path.as_uri()).root == tmp_path
    with pytest.raises(ConfigError, match="s3://bucket/prefix"):
        open_object_store("gs://bucket/x")
    st = LocalObjectStore(tmp_path)
    assert open_object_store(st) is st


def test_parse_s3_uri_and_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_s3_uri("s3://b") == ("b", "")
    assert parse_s3_uri("s3://b/p/q/") == ("b", "p/q/")
    with pytest.raises(ConfigError):
        parse_s3_uri("s3:///x")
    monkeypatch.delenv("MAESTRO_S3_ENDPOINT_URL", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://aws-env")
    assert resolve_endpoint() == "http://aws-env"
    monkeypatch.setenv("MAESTRO_S3_ENDPOINT_URL", "http://maestro-env")
    assert resolve_endpoint() == "http://maestro-env"
    assert resolve_endpoint("http://arg") == "http://arg"


# -- shards -----------------------------------------------------------------------------

def test_shard_keys_sort_numerically() -> None:
    assert shard_key("r1", 2, 7) == "trajectories/run=r1/iteration=000002/chunk=000007.parquet"
    assert parse_shard_key(shard_key("r1", 12, 3)) == ("r1", 12, 3)
    keys = [shard_key("r", i, c) for i in (10, 2, 1) for c in (11, 0)]
    assert sorted(keys) == [shard_key("r", i, c) for i in (1, 2, 10) for c in (0, 11)]
    with pytest.raises(ValueError, match="run_id"):
        shard_key("bad/run", 0, 0)
    with pytest.raises(ValueError):
        shard_key("r", -1, 0)


def test_write_read_list_shards_local(tmp_path: Path) -> None:
    st = LocalObjectStore(tmp_path)
    chunk = make_chunk("r1", 0, 1, n=3)
    key = write_shard(st, chunk, "r1", 0, 1)
    write_shard(st, make_chunk("r1", 1, 0, n=2), "r1", 1, 0)
    write_shard(st, make_chunk("r10", 0, 0, n=1), "r10", 0, 0)  # "r1" must not list "r10"
    assert list_shards(st, "r1") == [shard_key("r1", 0, 1), shard_key("r1", 1, 0)]
    assert list_shards(st, "r1", iteration=1) == [shard_key("r1", 1, 0)]
    assert from_arrow(read_shard(st, key)) == chunk
    # a retried chunk replaces its shard
    write_shard(st, make_chunk("r1", 0, 1, n=1), "r1", 0, 1)
    assert read_shard(st, key).num_rows == 1 and len(list_shards(st, "r1")) == 2
    # an empty chunk is a valid shard
    write_shard(st, [], "r1", 0, 1)
    assert read_shard(st, key).num_rows == 0


def test_write_shard_refuses_rows_of_another_chunk(tmp_path: Path) -> None:
    st = LocalObjectStore(tmp_path)
    with pytest.raises(ValueError, match="chunk"):
        write_shard(st, make_chunk("r1", 0, chunk=2), "r1", 0, 1)
    with pytest.raises(ValueError, match="run_id"):
        write_shard(st, make_chunk("r2", 0, 0), "r1", 0, 0)
    assert st.list() == []


def test_read_shard_of_garbage_is_a_storage_error(tmp_path: Path) -> None:
    st = LocalObjectStore(tmp_path)
    st.put_bytes(shard_key("r1", 0, 0), b"not parquet")
    with pytest.raises(StorageError, match="Parquet"):
        read_shard(st, shard_key("r1", 0, 0))
    with pytest.raises(StorageError, match="lacks columns"):
        write_shard(st, pa.table({"x": [1]}), "r1", 0, 0)


# -- S3 (moto server on 127.0.0.1) ------------------------------------------------------

def test_s3_put_get_list_delete(s3_env: str) -> None:
    bucket = new_bucket(s3_env)
    st = S3ObjectStore(f"s3://{bucket}/pre/fix")  # endpoint from MAESTRO_S3_ENDPOINT_URL
    assert st.endpoint_url == s3_env
    st.put_bytes("b/2.bin", b"two")
    st.put_bytes("a/1.bin", b"one")
    st.put_bytes("ab.bin", b"x")
    assert st.get_bytes("a/1.bin") == b"one"
    assert st.exists("a/1.bin") and not st.exists("a/none.bin")
    assert st.list() == ["a/1.bin", "ab.bin", "b/2.bin"]
    assert st.list("a/") == ["a/1.bin"]
    assert st.uri("a/1.bin") == f"s3://{bucket}/pre/fix/a/1.bin"
    st.delete("a/1.bin")
    assert not st.exists("a/1.bin")
    with pytest.raises(ObjectNotFound, match=f"s3://{bucket}/pre/fix/a/1.bin"):
        st.get_bytes("a/1.bin")
    # the prefix really is a prefix in the bucket
    import boto3
    raw = boto3.client("s3", endpoint_url=s3_env).list_objects_v2(Bucket=bucket)
    assert sorted(o["Key"] for o in raw["Contents"]) == ["pre/fix/ab.bin", "pre/fix/b/2.bin"]


def test_s3_shards(s3_env: str) -> None:
    st = open_object_store(f"s3://{new_bucket(s3_env)}/maestro")
    chunks = {c: make_chunk("r1", 3, c, n=2, start=10 * c) for c in (0, 1, 2)}
    for c, trajs in chunks.items():
        write_shard(st, trajs, "r1", 3, c)
    keys = list_shards(st, "r1", iteration=3)
    assert keys == [shard_key("r1", 3, c) for c in (0, 1, 2)]
    assert from_arrow(read_shard(st, keys[1])) == chunks[1]


def test_s3_missing_bucket_is_a_clear_error(s3_env: str) -> None:
    with pytest.raises(StorageError) as e:
        S3ObjectStore("s3://no-such-bucket-maestro/x")
    msg = str(e.value)
    assert "s3://no-such-bucket-maestro/x/" in msg and "does not exist" in msg and "create_bucket=True" in msg
    # nothing was created implicitly
    import boto3
    names = [b["Name"] for b in boto3.client("s3", endpoint_url=s3_env).list_buckets()["Buckets"]]
    assert "no-such-bucket-maestro" not in names
    # unless asked
    st = S3ObjectStore("s3://made-on-request/x", create_bucket=True)
    st.put_bytes("k", b"v")
    assert S3ObjectStore("s3://made-on-request/x", create_bucket=True).get_bytes("k") == b"v"


def test_s3_connection_refused_is_a_clear_error(s3_env: str) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(StorageError) as e:
        S3ObjectStore("s3://bucket/p", endpoint_url=endpoint, max_attempts=1, connect_timeout_s=2)
    msg = str(e.value)
    assert "cannot connect" in msg and "s3://bucket/p/" in msg and endpoint in msg
    assert "MAESTRO_S3_ENDPOINT_URL" in msg


def test_s3_access_denied_is_a_clear_error(s3_env: str) -> None:
    st = S3ObjectStore(f"s3://{new_bucket(s3_env)}/p")
    # moto does not enforce IAM, so feed the translator the error S3 sends for a bad key pair
    err = ClientError({"Error": {"Code": "AccessDenied", "Message": "Access Denied"}}, "PutObject")
    msg = str(st.translate(err, "k.bin"))
    assert "access denied" in msg and f"s3://{st.bucket}/p/k.bin" in msg and "AWS_ACCESS_KEY_ID" in msg
