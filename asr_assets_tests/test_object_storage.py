"""Object storage against a real S3 API server (moto's server mode on 127.0.0.1, started here):
the storage module's conditional writes, ranged reads and lease lock; manifests and audio from
``s3://``; the feature cache and record cache on ``s3://`` with their commit protocols; and an
end-to-end ``asr-assets materialize --manifests s3://... --output s3://...`` compared key for
key with a local run."""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("s3fs", reason="the s3 extra (pip install 'asr_assets[s3]') is needed for these tests")
pytest.importorskip("moto.server", reason="moto[server] (the test extra) is needed for these tests")

from asr_assets import storage  # noqa: E402


from .conftest import rows_per_key  # noqa: E402
from .servers import moto_s3  # noqa: E402 - the moto server, shared with test_distributed


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1 (free port) for the whole session; yields its endpoint and
    the request counter (``servers.moto_s3``, also used by ``test_distributed``)."""
    with moto_s3() as (endpoint, counter):
        yield endpoint, counter


@pytest.fixture
def s3(s3_server, monkeypatch, tmp_path):
    """Environment pointing botocore at the server (the standard variables only) and a fresh
    bucket; yields ``(bucket URL, request counter)``."""
    endpoint, counter = s3_server
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("ASR_ASSETS_CACHE_DIR", str(tmp_path / "content-cache"))
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    import fsspec

    fsspec.filesystem("s3").clear_instance_cache()
    bucket = f"b{time.time_ns()}"
    fs, _ = storage.filesystem(f"s3://{bucket}")
    fs.mkdir(bucket)
    yield f"s3://{bucket}", counter


def _upload_tree(local: Path, url: str) -> None:
    for path in sorted(local.rglob("*")):
        if path.is_file():
            storage.put(storage.join(url, path.relative_to(local).as_posix()), path.read_bytes())


# ----------------------------------------------------------------------------- storage module


def test_url_detection_keeps_local_paths_local():
    for url in ("s3://b/k", "gs://b/k", "az://c/k", "https://h/x.tsv", "hf://datasets/o/r"):
        assert storage.is_url(url), url
    for local in ("/tmp/x", "relative/x.tsv", "file:///tmp/x", Path("/tmp/x"), "C_drive/x"):
        assert not storage.is_url(local), local
    assert storage.local_path("file:///tmp/x") == "/tmp/x"
    assert storage.resolve("clips/a.ogg", "s3://b/m/cv") == "s3://b/m/cv/clips/a.ogg"
    assert storage.resolve("../audio/./b.wav", "s3://b/m/cv") == "s3://b/m/audio/b.wav"
    assert storage.resolve("https://h/x.wav", "s3://b/m") == "https://h/x.wav"


def test_s3_timeouts_come_from_defaults_and_fsspec_config(monkeypatch):
    import fsspec.config

    options = storage.storage_options("s3")
    assert options["config_kwargs"]["connect_timeout"] == storage.DEFAULT_CONNECT_TIMEOUT_S
    assert options["config_kwargs"]["read_timeout"] == storage.DEFAULT_READ_TIMEOUT_S
    monkeypatch.setitem(fsspec.config.conf, "s3", {"config_kwargs": {"read_timeout": 7}, "anon": False})
    options = storage.storage_options("s3")
    assert options["config_kwargs"]["read_timeout"] == 7  # the user's config wins ...
    assert options["config_kwargs"]["connect_timeout"] == storage.DEFAULT_CONNECT_TIMEOUT_S  # ... key by key
    assert options["anon"] is False


def test_put_new_is_conditional_and_ranged_reads_are_one_request(s3):
    bucket, counter = s3
    url = storage.join(bucket, "dir", "x.bin")
    data = bytes(range(256)) * 4
    assert storage.put_new(url, data)
    with pytest.raises(FileExistsError):
        storage.put_new(url, b"other")
    assert storage.read_bytes(url) == data  # the first write stands
    before = counter.count("GET")
    assert storage.read_bytes(url, 10, 20) == data[10:20]
    assert counter.count("GET") - before == 1
    assert storage.read_ranges([url, url], [0, 1000], [4, 1024]) == [data[:4], data[1000:1024]]
    listed = storage.list_files(storage.join(bucket, "dir"))
    assert [(i.name, i.size) for i in listed] == [("x.bin", len(data))]
    assert listed[0].mtime_ns > 0 and listed[0].etag


def test_fetch_downloads_once_per_content(s3, tmp_path):
    bucket, counter = s3
    url = storage.join(bucket, "audio", "a.wav")
    storage.put(url, b"RIFF-one")
    first = storage.fetch(url)
    gets = counter.count("GET", "/audio/a.wav")
    assert storage.fetch(url) == first and first.read_bytes() == b"RIFF-one"
    assert counter.count("GET", "/audio/a.wav") == gets  # cached: a HEAD, no GET
    storage.put(url, b"RIFF-two!")
    second = storage.fetch(url)
    assert second != first and second.read_bytes() == b"RIFF-two!"
    assert not [p for p in first.parent.parent.rglob("*") if ".tmp." in p.name]


def test_object_lock_excludes_renews_and_takes_over_an_expired_lease(s3):
    bucket, _ = s3
    url = storage.join(bucket, "shard", ".lock-x")
    order: list[str] = []
    a = storage.ObjectLock(url, lease_s=3.0, poll_s=0.05)
    a.acquire()
    b = storage.ObjectLock(url, lease_s=3.0, wait_s=0.3, poll_s=0.05)
    with pytest.raises(storage.LockTimeout):
        b.acquire()  # a live lease is not taken
    time.sleep(1.5)  # longer than a third of the lease: renewed meanwhile
    c = storage.ObjectLock(url, lease_s=3.0, wait_s=10, poll_s=0.05)

    def second():
        with c:
            order.append("c")

    thread = threading.Thread(target=second)
    thread.start()
    time.sleep(2.0)  # > the original lease: only the renewals keep c out
    order.append("a")
    a.release()
    thread.join(10)
    assert order == ["a", "c"]
    # a holder that died (no renewal, no release) is taken over once its lease ran out
    dead = storage.ObjectLock(url, lease_s=0.5)
    dead.acquire()
    dead._stop.set()
    dead._thread.join()
    successor = storage.ObjectLock(url, lease_s=5.0, wait_s=5, poll_s=0.05)
    start = time.monotonic()
    successor.acquire()
    assert time.monotonic() - start >= 0.2
    with pytest.raises(PermissionError):  # the dead holder's token no longer matches
        storage.put_if_match(url, b"{}", dead.etag)
    successor.release()


def test_concurrent_lock_contenders_never_overlap(s3):
    bucket, _ = s3
    url = storage.join(bucket, "shard", ".lock-y")
    inside, overlaps, entered = [0], [0], []
    guard = threading.Lock()

    def contend(name):
        with storage.ObjectLock(url, lease_s=30, wait_s=60, poll_s=0.02):
            with guard:
                inside[0] += 1
                overlaps[0] = max(overlaps[0], inside[0])
            entered.append(name)
            time.sleep(0.1)
            with guard:
                inside[0] -= 1

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(entered) == [0, 1, 2, 3] and overlaps[0] == 1


# ----------------------------------------------------------------------------- manifests from URLs


def _rows(sources, **kwargs):
    from asr_assets.manifests import iter_manifest_rows

    problems = []
    rows = list(iter_manifest_rows(sources, on_error=lambda *a: problems.append(a), **kwargs))
    return rows, problems


def test_manifest_folders_from_s3_read_like_local_ones(s3, test_data, tmp_path):
    """Discovery by listing (recursive, sorted, TSV wins), rows equal to the local read with audio
    paths resolved against the manifest's URL, and the fingerprint follows the objects."""
    import shutil

    from asr_assets.manifests import discover_manifests, manifest_fingerprint, scan_manifests

    bucket, _ = s3
    local = tmp_path / "m"
    shutil.copytree(test_data / "formats", local / "formats")
    shutil.copytree(test_data / "en_hf", local / "formats" / "hf")  # Parquet below a TSV root: skipped
    shutil.copytree(test_data / "en_hf", local / "en_hf")
    _upload_tree(local, f"{bucket}/m")
    for name in ("formats", "en_hf"):
        url = f"{bucket}/m/{name}"
        local_scan, remote_scan = scan_manifests(local / name), scan_manifests(url)
        assert [str(p)[len(str(local / name)):] for p in local_scan.files] == \
               [str(p)[len(url):] for p in remote_scan.files]
        assert len(remote_scan.skipped) == len(local_scan.skipped)
        local_rows, local_problems = _rows([local / name])
        remote_rows, remote_problems = _rows([url])
        assert len(remote_rows) == len(local_rows) > 0 and len(remote_problems) == len(local_problems)
        for a, b in zip(local_rows, remote_rows):
            assert (a.utterance_id, a.transcript, a.duration_s, a.audio_bytes, a.file_row) == \
                   (b.utterance_id, b.transcript, b.duration_s, b.audio_bytes, b.file_row)
            if a.audio_path is not None:
                assert b.audio_path == url + a.audio_path[len(str(local / name)):]
    single = f"{bucket}/m/formats/manifest.tsv"
    assert [str(p) for p in discover_manifests(single)] == [single]
    rows, _ = _rows([single])
    assert rows[0].audio_path.startswith(f"{bucket}/m/formats/audio/")
    before = manifest_fingerprint(f"{bucket}/m/formats")
    assert before["files"] == 2 and before == manifest_fingerprint(f"{bucket}/m/formats")
    storage.put(single, (local / "formats" / "manifest.tsv").read_bytes() + b"\n")
    assert manifest_fingerprint(f"{bucket}/m/formats")["digest"] != before["digest"]
    assert manifest_fingerprint(f"{bucket}/nothing")["digest"] == "missing"
    from asr_assets.errors import ManifestError

    with pytest.raises(ManifestError, match="does not exist"):
        scan_manifests(f"{bucket}/nothing")


# ----------------------------------------------------------------------------- feature cache on s3


def _features(n: int, shard: int, seed: int = 0, fhash: str = "abcdef012345") -> dict[str, np.ndarray]:
    """``n`` utterance ids whose keys fall in ``shard``, with real-size log-mel-like arrays:
    [frames, 80] float32, a different length each."""
    from asr_assets.feature_cache import cache_key, shard_index

    rng = np.random.default_rng(seed)
    uids = (f"utt-{seed}-{i}" for i in range(100_000))
    chosen = [u for u in uids if shard_index(cache_key(u, fhash)) == shard][:n]
    return {u: rng.standard_normal((50 + 7 * i, 80)).astype(np.float32) for i, u in enumerate(chosen)}


def _write_shard(root, shard: int, items: dict[str, np.ndarray], rows_per_part: int, fhash: str = "abcdef012345",
                 tombstones=()):
    from asr_assets.feature_cache import ShardWriter, cache_key

    writer = ShardWriter(root, shard, rows_per_part=rows_per_part, metadata={"frontend_hash": fhash})
    for uid, feats in items.items():
        writer.add(cache_key(uid, fhash), feats)
    for uid in tombstones:
        writer.delete(cache_key(uid, fhash))
    writer.close()
    return writer


def test_feature_parts_go_up_in_one_put_each_and_read_back_with_ranged_gets(s3, tmp_path):
    from asr_assets.feature_cache import SHARD_INDEX_NAME, ShardedParquetFeatureCache, cache_key, list_parts, shard_dir

    bucket, counter = s3
    root = f"{bucket}/fc/train"
    items = _features(10, 3)
    puts = counter.count("PUT")
    writer = _write_shard(root, 3, items, rows_per_part=4)
    assert len(writer.parts_written) == 3
    # 3 parts + the persisted index, one PUT each; the parts conditional
    assert counter.count("PUT") - puts == 4
    names = [p.name for p in list_parts(shard_dir(root, 3))]
    assert len(names) == 3 and all(n.startswith("part_") and n.endswith(".parquet") for n in names)
    assert storage.exists(storage.join(shard_dir(root, 3), SHARD_INDEX_NAME))
    # local twin: same rows, same reads
    _write_shard(tmp_path, 3, items, rows_per_part=4)
    remote, local = ShardedParquetFeatureCache(root), ShardedParquetFeatureCache(tmp_path)
    keys = [cache_key(u, "abcdef012345") for u in items]
    before = {m: counter.count(m) for m in ("GET", "HEAD")}
    loaded = remote.load_keys(keys)
    gets, heads = counter.count("GET") - before["GET"], counter.count("HEAD") - before["HEAD"]
    for got, want, twin in zip(loaded, items.values(), local.load_keys(keys)):
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(got, twin)
    # one listing + one index GET for the shard, then one ranged GET per payload; no HEAD
    assert gets == 1 + 1 + len(keys) and heads == 0, (gets, heads)
    assert remote.keys(3, frontend_hash="abcdef012345") == set(keys)
    before = counter.count("GET")
    remote.load_keys(keys[:2])
    assert counter.count("GET") - before == 2  # the shard's index is reused within refresh_interval_s


def test_prefetch_lists_every_shard_of_a_split_at_once_and_reads_the_same(s3):
    """``prefetch`` of a split on S3: one recursive listing of ``feature_shards/`` (not one per
    shard) and the indexes of the shards read by threads; the same keys and payloads as a
    reader that visits each shard itself; a part written later is seen after ``refresh``."""
    from asr_assets.feature_cache import ShardedParquetFeatureCache, cache_key

    bucket, counter = s3
    root = f"{bucket}/fc-prefetch/train"
    written = {shard: _features(3, shard, seed=shard) for shard in (0, 5, 9, 40, 63)}
    for shard, items in written.items():
        _write_shard(root, shard, items, rows_per_part=2)  # 2 parts each, and a persisted index
    lists = counter.count("GET", "list-type=2")
    cache = ShardedParquetFeatureCache(root)
    cache.prefetch(range(64))
    assert counter.count("GET", "list-type=2") - lists == 1  # 15 objects: one page
    twin = ShardedParquetFeatureCache(root)
    for shard in range(64):
        want = {cache_key(u, "abcdef012345") for u in written.get(shard, {})}
        assert cache.keys(shard, frontend_hash="abcdef012345") == want == twin.keys(shard, frontend_hash="abcdef012345")
    keys = [cache_key(u, "abcdef012345") for items in written.values() for u in items]
    for got, want in zip(cache.load_keys(keys), (f for items in written.values() for f in items.values())):
        np.testing.assert_array_equal(got, want)
    later = _features(1, 5, seed=99)
    _write_shard(root, 5, later, rows_per_part=2)
    cache.refresh()
    cache.prefetch(range(64))
    assert cache_key(next(iter(later)), "abcdef012345") in cache.keys(5)


def test_shard_stats_sidecar_from_the_split_listing_keeps_every_runs_moments(s3):
    """After a feature run on S3 the stats sidecars are updated from one listing of the split:
    a shard that never had one is not read (no GET), one that has one is read and extended, and
    a run's moments stay while its parts exist."""
    from asr_assets.extraction import ShardStats
    from asr_assets.feature_cache import list_shard_files
    from asr_assets.pipeline import read_shard_stats, record_shard_stats
    from asr_assets.settings import Settings

    bucket, counter = s3
    root = f"{bucket}/fc-stats/train"
    frontend = Settings().frontend("squeezeformer")
    fhash = frontend.frontend_hash()

    def run(shard: int, items: dict, name: str) -> None:
        writer = _write_shard(root, shard, items, rows_per_part=10, fhash=fhash)
        stats = ShardStats(shard=shard, records=len(items), computed=len(items), frames=sum(len(f) for f in items.values()),
                           part_names=[storage.basename(str(p)) for p in writer.parts_written])
        for feats in items.values():
            stats.add_moments(b"SFCF32L1" + struct.pack("<II", *feats.shape) + feats.tobytes())
        listed = {s: {f.name for f in files} for s, files in list_shard_files(root).items()}
        gets = counter.count("GET", ".stats-")
        record_shard_stats(root, shard, frontend, stats, {"run": name}, listed=listed.get(shard, set()))
        return counter.count("GET", ".stats-") - gets

    first, second = _features(2, 4, seed=1, fhash=fhash), _features(3, 4, seed=2, fhash=fhash)
    assert run(4, first, "r1") == 0  # none yet: not read
    assert run(4, second, "r2") == 1  # read once, extended
    state = read_shard_stats(root, 4, fhash)
    assert [m["utterances"] for m in state["moments"]] == [2, 3] and state["last_run"]["run"] == "r2"
    want = sum(f.astype(np.float64).sum(axis=0) for f in second.values())
    np.testing.assert_allclose(state["moments"][1]["sum"], want, rtol=1e-5, atol=1e-4)  # float32 within an utterance


def test_feature_cache_on_s3_keeps_upstream_read_rules(s3, tmp_path):
    """Newest part wins (LastModified, then the time-ordered name), tombstones hide keys; the
    downloaded copy, read by the local reader, gives the same answers."""
    from asr_assets.feature_cache import ShardedParquetFeatureCache, cache_key

    bucket, _ = s3
    root = f"{bucket}/fc2/train"
    first = _features(3, 0, seed=1)
    _write_shard(root, 0, first, rows_per_part=10)
    uids = list(first)
    newer = {uids[0]: first[uids[0]] * 2}
    _write_shard(root, 0, newer, rows_per_part=10, tombstones=[uids[1]])  # same second, later name
    cache = ShardedParquetFeatureCache(root, refresh_interval_s=0)
    got = cache.load_keys([cache_key(u, "abcdef012345") for u in uids])
    np.testing.assert_array_equal(got[0], first[uids[0]] * 2)
    assert got[1] is None
    np.testing.assert_array_equal(got[2], first[uids[2]])
    storage.download_tree(root, tmp_path / "copy")
    local = ShardedParquetFeatureCache(tmp_path / "copy").load_keys([cache_key(u, "abcdef012345") for u in uids])
    np.testing.assert_array_equal(local[0], got[0])
    assert local[1] is None


def test_killed_feature_writer_leaves_only_complete_parts_and_the_lock_excludes_a_second_writer(s3):
    from asr_assets.feature_cache import ShardWriter, ShardedParquetFeatureCache, cache_key, list_parts, shard_dir, shard_lock

    bucket, _ = s3
    root = f"{bucket}/fc3/train"
    items = _features(9, 5, seed=2)
    with pytest.raises(RuntimeError, match="killed"):
        with shard_lock(root, 5, "abcdef012345"):
            writer = ShardWriter(root, 5, rows_per_part=4, metadata={"frontend_hash": "abcdef012345"}, update_index=False)
            for n, (uid, feats) in enumerate(items.items()):
                if n == 6:
                    raise RuntimeError("killed")
                writer.add(cache_key(uid, "abcdef012345"), feats)
    parts = list_parts(shard_dir(root, 5))
    assert len(parts) == 1  # rows 0-3 were flushed, rows 4-5 never left the process
    cache = ShardedParquetFeatureCache(root)
    assert cache.keys(5) == {cache_key(u, "abcdef012345") for u in list(items)[:4]}
    # the lock was released by the failing writer: the next one gets it at once
    lock = shard_lock(root, 5, "abcdef012345")
    lock.wait_s = 2.0
    with lock:
        other = shard_lock(root, 5, "abcdef012345")
        other.wait_s, other.poll_s = 0.5, 0.05
        with pytest.raises(storage.LockTimeout):
            other.acquire()
    # a writer whose lease was taken over stops before its next PUT
    stale = shard_lock(root, 6, "abcdef012345")
    stale.lease_s = 0.3
    with stale:
        stale._stop.set()
        stale._thread.join()  # renewals stop, as in a paused process
        time.sleep(0.4)
        thief = shard_lock(root, 6, "abcdef012345")
        thief.acquire()
        stale._lost.set()  # what the next (failing) If-Match renewal records
        writer = ShardWriter(root, 6, rows_per_part=1, metadata={"frontend_hash": "abcdef012345"}, update_index=False)
        with pytest.raises(storage.LockLost):
            writer.add(cache_key("x", "abcdef012345"), np.zeros((3, 80), np.float32))
        writer._pending.clear()
        thief.release()
    assert list_parts(shard_dir(root, 6)) == []


# ----------------------------------------------------------------------------- record cache on s3


def _records(test_data, split_of=lambda i: "train"):
    from asr_assets.manifests import iter_manifest_rows
    from asr_assets.records import Record

    rows = iter_manifest_rows([test_data / "en_hf", test_data / "formats"], on_error=lambda *a: None)
    return [Record(r.utterance_id or f"row{r.row_number}", split_of(i), r.transcript or "x", r.audio_path,
                   r.audio_bytes, r.speaker_id, r.duration_s or 1.0, r.source)
            for i, r in enumerate(rows)]


def test_record_cache_on_s3_is_visible_only_through_its_commit_object(s3, test_data, tmp_path):
    from asr_assets.errors import CacheCorruptError
    from asr_assets.record_cache import (RecordStore, commit_url, download_record_cache, read_commit,
                                         record_store_is_valid, write_record_cache)

    bucket, counter = s3
    url = f"{bucket}/out/record_cache/train.jsonl"
    records = _records(test_data)
    assert any(r.audio_bytes for r in records) and any(r.audio_bytes is None for r in records)
    with pytest.raises(CacheCorruptError, match="no commit object"):
        RecordStore(url)
    assert not record_store_is_valid(url)
    local_summary = write_record_cache(tmp_path / "local" / "train.jsonl", records)
    puts = counter.count("PUT")
    summary = write_record_cache(url, records)
    blobs = len(list((tmp_path / "local" / "train_audio_blobs").iterdir()))
    # blobs + JSONL + 6 sidecars + the commit object, one PUT each
    assert counter.count("PUT") - puts == blobs + 1 + 6 + 1
    assert summary.sha256 == local_summary.sha256 and summary.utterances == len(records)
    commit = read_commit(url)
    assert commit["jsonl"]["sha256"] == summary.sha256 and len(commit["sidecars"]) == 6
    remote, local = RecordStore(url), RecordStore(tmp_path / "local" / "train.jsonl")
    assert record_store_is_valid(url) and len(remote) == len(local) == len(records)
    for a, b in zip(remote, local):
        blob_a, blob_b = a.pop("audio_blob_abspath"), b.pop("audio_blob_abspath")
        assert a == b
        if blob_b is not None:
            assert blob_a == f"{bucket}/out/record_cache/{b['audio_blob_path']}"
            assert storage.read_bytes(blob_a) == Path(blob_b).read_bytes()
    # a copy in the local layout reads with the local reader (upstream's layout)
    copy = download_record_cache(url, tmp_path / "copy")
    assert record_store_is_valid(copy)
    assert [dict(i, audio_blob_abspath=None) for i in RecordStore(copy)] == \
           [dict(i, audio_blob_abspath=None) for i in local]
    # a writer killed mid-way leaves the committed version in place, and no new version is named
    def dying():
        for n, record in enumerate(reversed(records)):
            if n == 3:
                raise RuntimeError("killed")
            yield record

    with pytest.raises(RuntimeError, match="killed"):
        write_record_cache(url, dying())
    assert read_commit(url)["version"] == commit["version"]
    assert [i["utterance_id"] for i in RecordStore(url)] == [r.utterance_id for r in records]
    # a complete rewrite replaces it; the replaced version's files are removed, blobs stay
    write_record_cache(url, records[:3])
    assert len(RecordStore(url)) == 3
    assert not storage.exists(storage.join(f"{bucket}/out/record_cache", commit["jsonl"]["path"]))
    assert len(storage.list_files(f"{bucket}/out/record_cache/train_audio_blobs")) == blobs
    storage.remove(commit_url(url))
    assert not record_store_is_valid(url)


# ----------------------------------------------------------------------------- end to end


def test_materialize_from_s3_manifests_to_an_s3_cache_equals_a_local_run(s3, test_data, tmp_path, capsys):
    import shutil

    from asr_assets.cli import main as cli_main
    from asr_assets.feature_cache import ShardedParquetFeatureCache
    from asr_assets.record_cache import RecordStore, download_record_cache
    from asr_assets.settings import SPLITS

    bucket, counter = s3
    local_manifests = tmp_path / "manifests"
    for name in ("formats", "en_hf", "nl_cv"):
        shutil.copytree(test_data / name, local_manifests / name)
    # Common Voice rows have no id: upstream's utterance id is then the *resolved* audio path, which
    # differs between a local folder and a URL by design. An id column (the clip's stem) makes the
    # keys comparable; durations stay absent, so they are probed from the audio (fetched from s3).
    tsv = local_manifests / "nl_cv" / "validated.tsv"
    lines = tsv.read_text(encoding="utf-8").splitlines()
    path_col = lines[0].split("\t").index("path")
    tsv.write_text("\n".join(["id\t" + lines[0]] + [Path(l.split("\t")[path_col]).stem + "\t" + l for l in lines[1:]])
                   + "\n", encoding="utf-8")
    _upload_tree(local_manifests, f"{bucket}/manifests")
    names = ("formats", "en_hf", "nl_cv")
    local_args = [a for n in names for a in ("--manifests", str(local_manifests / n))]
    remote_args = [a for n in names for a in ("--manifests", f"{bucket}/manifests/{n}")]
    out = f"{bucket}/out"
    assert cli_main(["materialize", *local_args, "--output", str(tmp_path / "local"), "--workers", "2"]) == 0
    capsys.readouterr()
    requests_before = len(counter.requests)
    assert cli_main(["materialize", *remote_args, "--output", out, "--workers", "2"]) == 0
    captured = capsys.readouterr()
    printed = captured.out + captured.err  # a failed run is announced on stderr
    requests = counter.requests[requests_before:]
    part_puts = [t for m, t, _ in requests if m == "PUT" and "/part_" in t]
    assert "FAILED" not in printed and "STEP_FAILURE" not in printed
    keys_seen = 0
    for split in SPLITS:
        local_store = RecordStore(tmp_path / "local" / "record_cache" / f"{split}.jsonl")
        remote_store = RecordStore(f"{out}/record_cache/{split}.jsonl")
        assert [r["utterance_id"] for r in remote_store] == [r["utterance_id"] for r in local_store]
        for a, b in zip(remote_store, local_store):
            assert (a["transcript"], a["num_samples"], a["audio_blob_path"]) == \
                   (b["transcript"], b["num_samples"], b["audio_blob_path"])
            if b["audio_path"] is not None:  # the same file, resolved against the manifest's URL
                assert a["audio_path"] == f"{bucket}/manifests/" + str(Path(b["audio_path"]).relative_to(local_manifests))
        # the s3 cache, downloaded, read by the local readers (newest part wins, tombstones)
        copy = tmp_path / "copy" / split
        storage.download_tree(f"{out}/feature-cache/{split}", copy)
        copy_store = download_record_cache(f"{out}/record_cache/{split}.jsonl", tmp_path / "copy_rc" / split)
        assert len(RecordStore(copy_store)) == len(local_store)
        local_cache = ShardedParquetFeatureCache(tmp_path / "local" / "feature-cache" / split)
        copy_cache = ShardedParquetFeatureCache(copy)
        remote_cache = ShardedParquetFeatureCache(f"{out}/feature-cache/{split}")
        fhash = local_cache._frontend_hash("squeezeformer")
        for shard in range(64):
            assert copy_cache.keys(shard, fhash) == local_cache.keys(shard, fhash) == remote_cache.keys(shard, fhash)
        uids = [r["utterance_id"] for r in local_store]
        for want, got, direct in zip(local_cache.load_many(uids), copy_cache.load_many(uids), remote_cache.load_many(uids)):
            assert (want is None) == (got is None) == (direct is None)
            if want is not None:
                np.testing.assert_array_equal(got, want)
                np.testing.assert_array_equal(direct, want)
        written = rows_per_key(copy)
        assert all(n == 1 for n in written.values())  # every key written once
        keys_seen += len(written)
        # reports went to the output URL too, with the same rows
        local_report = (tmp_path / "local" / "reports" / f"records-{split}.jsonl").read_text(encoding="utf-8")
        remote_report = storage.read_bytes(f"{out}/reports/records-{split}.jsonl").decode("utf-8")
        assert len(remote_report.splitlines()) == len(local_report.splitlines())
    assert keys_seen > 40 and len(part_puts) >= 1
    # the training reader straight from the bucket (ranged GETs of the payloads)
    from asr_assets.data import FeatureDataset

    remote_ds, local_ds = FeatureDataset(out, "train"), FeatureDataset(tmp_path / "local", "train")
    present = [i for i, f in enumerate(local_ds.cache.load_many([r["utterance_id"] for r in local_ds.records]))
               if f is not None]
    assert len(remote_ds) == len(local_ds) and len(present) > 10
    for a, b in zip(remote_ds.__getitems__(present), local_ds.__getitems__(present)):
        assert a["utterance_id"] == b["utterance_id"] and a["num_frames"] == b["num_frames"]
        np.testing.assert_array_equal(np.asarray(a["features"]), np.asarray(b["features"]))
    local_failures = sorted(p.relative_to(tmp_path / "local").as_posix()
                            for p in (tmp_path / "local" / "reports").rglob("shard_*.jsonl"))
    remote_failures = sorted(str(f)[len(out) + 1:] for f in storage.list_files(f"{out}/reports", recursive=True)
                             if f.name.startswith("shard_"))
    assert remote_failures == local_failures
    # the split summary read from the bucket (one listing of the shard folders) says what the local one says
    from asr_assets.settings import Settings
    from asr_assets.summary import summarize_split

    for split in SPLITS:
        local_sum = summarize_split(Settings(output=str(tmp_path / "local")), split, ["squeezeformer"])
        remote_sum = summarize_split(Settings(output=out), split, ["squeezeformer"])
        (lf,), (rf,) = local_sum.features, remote_sum.features
        assert (remote_sum.utterances, remote_sum.speakers, round(remote_sum.audio_seconds, 3)) == \
            (local_sum.utterances, local_sum.speakers, round(local_sum.audio_seconds, 3))
        assert (rf.records, rf.with_features, rf.failures_by_stage, rf.moments_utterances) == \
            (lf.records, lf.with_features, lf.failures_by_stage, lf.moments_utterances)
        assert lf.with_features > 0 or split != "train"
    # a second run over unchanged inputs writes nothing
    before = len(counter.requests)
    assert cli_main(["materialize", *remote_args, "--output", out, "--workers", "2"]) == 0
    assert "up to date" in capsys.readouterr().out
    assert not [t for m, t, _ in counter.requests[before:] if m in ("PUT", "DELETE", "POST")]


_WRITER = """
import json, sys, time
start = time.time()
from asr_assets.pipeline import build_feature_shards
from asr_assets.settings import Settings
settings = Settings(manifests=(sys.argv[1],), output=sys.argv[2], workers=1)
stats = build_feature_shards(settings, "squeezeformer", "train", range(64))
print(json.dumps({"computed": sum(s.computed for s in stats.values()), "skipped": sum(s.skipped for s in stats.values()),
                  "failed": sum(s.failed for s in stats.values()), "start": start, "end": time.time()}))
"""


def test_two_concurrent_writers_of_the_same_shards_cannot_both_win(s3, test_data, tmp_path):
    """Two processes (as on two machines) featurize the same split's shards of one s3 cache at
    once: the shard lease locks let one compute each key; the other finds it cached."""
    import json
    import subprocess
    import sys

    from asr_assets.pipeline import build_record_cache
    from asr_assets.record_cache import RecordStore
    from asr_assets.settings import Settings

    bucket, _ = s3
    out = f"{bucket}/conc"
    manifests = str(test_data / "formats")
    settings = Settings(manifests=(manifests,), output=out, workers=1)
    build_record_cache(settings, "train")
    records = len(RecordStore(settings.record_cache_path("train")))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, manifests, out], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=env, text=True) for _ in range(2)]
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr[-3000:]
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    first, second = results
    assert first["start"] < second["end"] and second["start"] < first["end"]  # they did run at the same time
    copy = tmp_path / "copy"
    storage.download_tree(f"{out}/feature-cache/train", copy)
    written = rows_per_key(copy)
    assert all(n == 1 for n in written.values()), [k for k, n in written.items() if n > 1]
    computed = sorted(r["computed"] for r in results)
    assert computed[0] == 0 and computed[1] == len(written)  # one winner computed each key, once
    assert len(written) + max(r["failed"] for r in results) == records


def test_whole_reads_are_one_get_also_for_empty_and_missing_objects(s3):
    bucket, counter = s3
    storage.put(f"{bucket}/e/empty.jsonl", b"")
    storage.put(f"{bucket}/e/full.jsonl", b"x" * 100)
    before = len(counter.requests) if counter.count() is not None else 0
    assert storage.read_bytes(f"{bucket}/e/full.jsonl") == b"x" * 100
    assert counter.count() - before == 1
    assert storage.read_bytes(f"{bucket}/e/empty.jsonl") == b""
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(f"{bucket}/e/missing.jsonl")


def test_manifest_file_over_http_reads_like_upstreams_url_source(test_data):
    """Upstream's Python loader reads an http(s) URL to one .tsv/.parquet; relative audio paths
    resolve against the URL's folder (http audio is then decoded only with remote_audio)."""
    import functools
    import http.server

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(test_data))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        for name in ("formats/manifest.tsv", "en_hf/data/train-00000-of-00001.parquet"):
            local_rows, _ = _rows([test_data / name])
            remote_rows, _ = _rows([f"{base}/{name}"])
            assert len(remote_rows) == len(local_rows) > 0
            for a, b in zip(local_rows, remote_rows):
                assert (a.utterance_id, a.transcript, a.duration_s, a.audio_bytes) == \
                       (b.utterance_id, b.transcript, b.duration_s, b.audio_bytes)
                folder = storage.parent(f"{base}/{name}")
                assert b.audio_path == folder + a.audio_path[len(str((test_data / name).parent)):]
    finally:
        server.shutdown()
        server.server_close()


def test_settings_take_urls_for_manifests_and_output():
    from asr_assets.settings import Settings

    settings = Settings.from_env({"ASR_ASSETS_MANIFESTS": "s3://b/m/cv:/data/x:https://h/a.tsv",
                                  "ASR_ASSETS_OUTPUT": "s3://b/out/"})
    assert settings.manifests == ("s3://b/m/cv", "/data/x", "https://h/a.tsv")
    assert settings.output_is_remote and not Settings(output="out").output_is_remote
    assert str(settings.record_cache_path("train")) == "s3://b/out/record_cache/train.jsonl"
    assert str(settings.features_report_path("squeezeformer", "test", 3)) == "s3://b/out/reports/squeezeformer/test/shard_03.jsonl"
    assert str(settings.feature_split_root("train") / "feature_shards") == "s3://b/out/feature-cache/train/feature_shards"


def test_a_stalled_store_fails_within_the_read_timeout(monkeypatch):
    """A server that accepts connections and never answers: a read fails after its attempts
    (botocore's 3, each bounded by the read timeout), it does not hang."""
    import fsspec
    import fsspec.config

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    accepted = []
    stop = threading.Event()

    def accept():
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])  # held open, never answered
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{listener.getsockname()[1]}")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        monkeypatch.setenv("ASR_ASSETS_IO_READ_TIMEOUT_S", "1")
        fsspec.filesystem("s3").clear_instance_cache()
        assert storage.storage_options("s3")["config_kwargs"]["read_timeout"] == 1.0
        start = time.monotonic()
        with pytest.raises(Exception) as err:
            storage.read_bytes("s3://stalled/x.bin", 0, 10)
        elapsed = time.monotonic() - start
        assert 2.9 < elapsed < 3 * 1 + 10, (elapsed, repr(err.value))  # 3 attempts x 1 s, plus backoff
        assert 1 <= len(accepted) <= storage.S3_ATTEMPTS + 1  # not 5 x 5 x 3 (s3fs's own nested retry loops)
        assert "timeout" in f"{type(err.value).__name__} {err.value}".lower() and accepted
    finally:
        stop.set()
        thread.join(2)
        for conn in accepted:
            conn.close()
        listener.close()
        fsspec.filesystem("s3").clear_instance_cache()
