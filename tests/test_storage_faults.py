"""Storage faults (issue #7): the S3 server stops in the middle of a run and comes back.

Each test has its own moto S3 server on loopback (a werkzeug server around moto's app, in
this process, so the buckets and objects survive a restart), stopped for real: the listening
socket closes and open keep-alive connections are shut down, so the client sees refused
connections. Writes during the outage are retried with backoff, then spooled to a local folder
(`SpoolingObjectStore`, which `open_object_store` and `Store` put in front of every S3 store);
reads see the spooled objects; once the server is back the spool is uploaded (by the next put,
`flush_spool()` or `Store.close()`) and every shard is in the bucket, byte for byte.
"""

from __future__ import annotations

import io
import logging
import socket
import threading
import time
from pathlib import Path

import boto3
import pyarrow.parquet as pq
import pytest

from maestro_core.objectstore import (ObjectNotFound, S3ObjectStore, SpoolingObjectStore, StorageUnavailable,
                                      open_object_store)
from maestro_core.shards import list_shards, read_shard, shard_key, write_shard
from maestro_core.store import Store
from maestro_core.trajectory import from_arrow
from tests.reliability_figures import figures  # noqa: F401 (fixture)
from tests.store_helpers import free_port, make_chunk, new_bucket, s3_env  # noqa: F401 (fixtures)


class RestartableMotoServer:
    """moto's S3 on 127.0.0.1:`port`; stop() really stops it (refused connections, open
    connections cut) and start() brings it back on the same port with the same objects
    (moto keeps its state per process)."""

    def __init__(self) -> None:
        self.port = free_port()
        self._server = None
        self._thread: threading.Thread | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
        from werkzeug.serving import make_server

        owner = self

        class Handler(MotoRequestHandler):
            def setup(self) -> None:
                super().setup()
                with owner._lock:
                    owner._conns.add(self.connection)

            def finish(self) -> None:
                with owner._lock:
                    owner._conns.discard(self.connection)
                super().finish()

        self._server = make_server("127.0.0.1", self.port, DomainDispatcherApplication(create_backend_app),
                                   threaded=True, request_handler=Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()  # serve_forever returns and closes the listening socket
        assert self._thread is not None
        self._thread.join()
        with self._lock:
            conns, self._conns = list(self._conns), set()
        for c in conns:  # keep-alive connections would otherwise still be served
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._server = None

    def refuses(self) -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) != 0


@pytest.fixture
def moto_server():
    srv = RestartableMotoServer()
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def moto_endpoint(moto_server):  # s3_env (store_helpers) takes the endpoint of this test's own server
    return moto_server.endpoint


def _fast(store: SpoolingObjectStore) -> SpoolingObjectStore:
    """Test timings: 2 retries 50 ms apart, then the spool; probe again after 0.2 s."""
    store.retries, store.backoff_s, store.probe_interval_s = 2, 0.05, 0.2
    return store


def _s3(location: str, spool: Path, **kw) -> SpoolingObjectStore:
    # one attempt per request in botocore (its own backoff would add seconds per attempt)
    store = open_object_store(location, spool=spool, max_attempts=1, connect_timeout_s=1, read_timeout_s=5, **kw)
    assert isinstance(store, SpoolingObjectStore) and isinstance(store.inner, S3ObjectStore)
    return _fast(store)


def _bucket_shards(endpoint: str, bucket: str, prefix: str) -> dict[str, bytes]:
    client = boto3.client("s3", endpoint_url=endpoint)
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])]
    return {k[len(prefix):]: client.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


def _decode(data: bytes):
    return from_arrow(pq.read_table(io.BytesIO(data)))


def _spool_files(spool: Path) -> list[Path]:
    return [p for p in spool.rglob("*") if p.is_file() and not p.name.startswith(".maestro-tmp-")]


def test_open_object_store_spools_s3_under_the_home(s3_env, tmp_path, monkeypatch):
    bucket = new_bucket(s3_env)
    monkeypatch.delenv("MAESTRO_SPOOL_DIR", raising=False)
    monkeypatch.setenv("MAESTRO_HOME", str(tmp_path / "h"))
    st = open_object_store(f"s3://{bucket}/a/b")
    assert isinstance(st, SpoolingObjectStore) and st.spool_dir == tmp_path / "h" / "spool" / bucket / "a" / "b"
    monkeypatch.setenv("MAESTRO_SPOOL_DIR", str(tmp_path / "elsewhere"))
    assert open_object_store(f"s3://{bucket}/a/b").spool_dir == tmp_path / "elsewhere" / bucket / "a" / "b"
    assert isinstance(open_object_store(f"s3://{bucket}/a/b", spool=False), S3ObjectStore)
    with Store(tmp_path / "home", object_store=f"s3://{bucket}/x") as store:
        assert store.objects.spool_dir == tmp_path / "home" / "spool" / bucket / "x"
    # a local store has nothing to spool
    assert not isinstance(open_object_store(tmp_path / "objs"), SpoolingObjectStore)


def test_server_stops_mid_run_shards_spool_then_upload(moto_server, s3_env, tmp_path, caplog, figures):  # noqa: F811
    bucket = new_bucket(s3_env)
    spool = tmp_path / "spool"
    st = _s3(f"s3://{bucket}/maestro", spool)
    written: dict[str, list] = {}

    def write(chunk: int, n: int = 3) -> float:
        trajs = make_chunk("out", 0, chunk, n=n, start=10 * chunk)
        t0 = time.perf_counter()
        key = write_shard(st, trajs, "out", 0, chunk)
        written[key] = trajs
        return time.perf_counter() - t0

    # 1. server up: shards go straight to the bucket
    for c in range(4):
        write(c)
    assert st.spooled_total == 0 and _spool_files(spool) == []

    # 2. the server stops: writes are retried, then spooled; nothing raises
    moto_server.stop()
    assert moto_server.refuses()
    caplog.set_level(logging.INFO, logger="maestro_core.objectstore")
    outage_times = [write(c) for c in range(4, 9)]
    outage_times.append(write(1, n=1))  # chunk 1 rewritten during the outage: the newest version must win
    assert st.spooled_total == 6 and len(_spool_files(spool)) == 6
    spooled_lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("SPOOLED")]
    assert len(spooled_lines) == 6 and "unavailable after 3 attempts" in spooled_lines[0]
    assert str(spool) in spooled_lines[0]

    # reads during the outage see the spooled objects
    k5 = shard_key("out", 0, 5)
    assert st.exists(k5) and from_arrow(read_shard(st, k5)) == written[k5]
    assert from_arrow(read_shard(st, shard_key("out", 0, 1))) == written[shard_key("out", 0, 1)]
    # ...but what only the server holds, and a listing, need the server
    with pytest.raises(StorageUnavailable, match="cannot connect"):
        st.get_bytes(shard_key("out", 0, 0))
    with pytest.raises(StorageUnavailable):
        st.list("trajectories/")
    with pytest.raises(StorageUnavailable):
        st.flush_spool()
    assert len(_spool_files(spool)) == 6

    # 3. the server is back on the same port; the next put uploads the spool first
    moto_server.start()
    time.sleep(0.25)  # past probe_interval_s
    t0 = time.perf_counter()
    write(9)
    first_put_after = time.perf_counter() - t0
    assert st.uploaded_total == 6 and st.flush_spool() == 0
    assert _spool_files(spool) == []
    assert any(r.getMessage().startswith("UPLOADED 6 spooled") for r in caplog.records)

    # 4. every shard is in the bucket (plain boto3 against the server), contents equal
    in_bucket = _bucket_shards(moto_server.endpoint, bucket, "maestro/")
    assert sorted(in_bucket) == sorted(written) == list_shards(st, "out")
    for key, trajs in written.items():
        assert _decode(in_bucket[key]) == trajs, key
    assert len(_decode(in_bucket[shard_key("out", 0, 1)])) == 1  # the outage's version of chunk 1

    figures.update({
        "shards_before_outage": 4, "puts_during_outage": 6, "spooled": st.spooled_total,
        "uploaded_after_restart": st.uploaded_total, "shards_in_bucket": len(in_bucket),
        "contents_equal": len(written), "spool_files_left": len(_spool_files(spool)),
        "put_during_outage_s_max": round(max(outage_times), 3),
        "first_put_after_restart_s": round(first_put_after, 3), "retries": st.retries, "backoff_s": st.backoff_s,
    })


def test_store_write_and_ingest_during_outage(moto_server, s3_env, tmp_path, caplog, figures):  # noqa: F811
    bucket = new_bucket(s3_env)
    location = f"s3://{bucket}/maestro"
    home = tmp_path / "home"
    spool = home / "spool" / bucket / "maestro"
    caplog.set_level(logging.INFO, logger="maestro_core.objectstore")

    def open_store(**kw) -> Store:
        objects = _s3(location, home / "spool", **kw)  # the same spool folder Store(home, location) uses
        assert objects.spool_dir == spool
        return Store(home, object_store=objects)

    chunks = {c: make_chunk("ing", 0, c, n=4, start=10 * c) for c in range(5)}
    with open_store() as st:
        st.write_and_ingest(chunks[0], "ing", 0, 0)
        moto_server.stop()
        for c in (1, 2, 3):  # the outage: the shards are spooled, the chunks still reach DuckDB
            st.write_and_ingest(chunks[c], "ing", 0, c)
        assert st.objects.spooled_total == 3
        assert st.count_episodes("ing") == 16 and st.count_steps("ing") == 48
        with pytest.raises(StorageUnavailable):  # listing the run needs the server
            st.load_shards("ing")
        # close() during the outage: one try, the spool stays (with a warning saying where)
    assert len(_spool_files(spool)) == 3
    assert any("stay in the spool" in r.getMessage() for r in caplog.records)

    # another process of the same home, still in the outage (opened without the bucket check,
    # which needs the server): a spooled shard is readable
    with open_store(check_bucket=False) as st:
        assert from_arrow(read_shard(st.objects, shard_key("ing", 0, 2))) == chunks[2]
        with pytest.raises(ObjectNotFound):
            st.objects.spool.get_bytes(shard_key("ing", 0, 0))  # chunk 0 reached the bucket, not the spool

    moto_server.start()
    with open_store() as st:
        # the server is back: the listing is the bucket plus the spool, and loading it is exact
        assert st.load_shards("ing") == [shard_key("ing", 0, c) for c in range(4)]
        assert st.count_episodes("ing") == 16
        st.write_and_ingest(chunks[4], "ing", 0, 4)  # uploads the spool, then its own shard
        uploaded = st.objects.uploaded_total
    assert uploaded == 3 and _spool_files(spool) == []
    in_bucket = _bucket_shards(moto_server.endpoint, bucket, "maestro/")
    assert sorted(in_bucket) == [shard_key("ing", 0, c) for c in range(5)]
    assert all(_decode(in_bucket[shard_key("ing", 0, c)]) == chunks[c] for c in range(5))

    # a fresh home (another machine) rebuilds the run from the bucket alone
    with Store(tmp_path / "reader", object_store=_s3(location, tmp_path / "reader-spool")) as st:
        assert len(st.load_shards("ing")) == 5
        assert st.count_episodes("ing") == 20 and st.count_steps("ing") == 60

    figures.update({"write_and_ingest_during_outage": 3, "episodes_ingested_during_outage": 12,
                    "spooled": 3, "uploaded_after_restart": uploaded, "shards_in_bucket": len(in_bucket),
                    "episodes_rebuilt_from_bucket": 20, "rows_lost": 0})


def test_flush_spool_uploads_after_restart_and_other_errors_are_not_spooled(moto_server, s3_env, tmp_path):
    bucket = new_bucket(s3_env)
    st = _s3(f"s3://{bucket}/p", tmp_path / "spool")
    moto_server.stop()
    st.put_bytes("a/1.bin", b"one")
    st.put_bytes("a/2.bin", b"two")
    assert st.pending() == ["a/1.bin", "a/2.bin"] and st.get_bytes("a/2.bin") == b"two"
    moto_server.start()
    assert st.flush_spool() == 2 and st.pending() == []
    assert st.list() == ["a/1.bin", "a/2.bin"] and st.inner.get_bytes("a/1.bin") == b"one"
    # a missing bucket is a configuration error, never spooled
    gone = S3ObjectStore(f"s3://{bucket}/p", max_attempts=1)
    boto3.client("s3", endpoint_url=s3_env).delete_object(Bucket=bucket, Key="p/a/1.bin")
    boto3.client("s3", endpoint_url=s3_env).delete_object(Bucket=bucket, Key="p/a/2.bin")
    boto3.client("s3", endpoint_url=s3_env).delete_bucket(Bucket=bucket)
    wrapped = _fast(SpoolingObjectStore(gone, tmp_path / "spool2"))
    with pytest.raises(Exception, match="does not exist") as e:
        wrapped.put_bytes("k.bin", b"x")
    assert not isinstance(e.value, StorageUnavailable) and wrapped.pending() == []
