"""Named outputs: a user frontend returning several arrays of their own dtypes per utterance (float16
"SSL features", int32 tokens, a float32 output) through the real extraction on the bundled real speech:
keys and placement, SFCF32L1 vs ``.npy`` payloads, the raw and pyarrow read paths, incremental runs and
tombstones, the validation the feature check uses, the torch dataset, and what warm/export refuse.
"""

from __future__ import annotations

import hashlib
import io
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import asr_assets.frontends as frontends
from asr_assets import feature_cache
from asr_assets.audio import load_audio
from asr_assets.errors import ConfigError, FeatureConfigError
from asr_assets.extraction import shards_with_work
from asr_assets.feature_cache import (NPY_MAGIC, ShardedParquetFeatureCache, ShardWriter, cache_key,
                                      check_stored_outputs, decode_features, encode_features, list_parts,
                                      output_keys, shard_dir, shard_index)
from asr_assets.frontends import get_frontend, register_frontend
from asr_assets.pipeline import build_feature_shards, build_record_cache
from asr_assets.record_cache import RecordStore
from asr_assets.settings import SPLITS, Settings, bundled_sample_manifests

NAME = "mel-units"
CONFIG = {"base": "zipformer", "bins": 80, "revision": "r1"}
OUTPUTS = {"ssl_feats": "float16", "tokens": "int32", "energy": "float32"}


def mel_units(samples: np.ndarray) -> dict:
    """Stand-in for an SSL model + quantizer: zipformer log-mel as float64 'features', argmax
    bins of every second frame as int64 'tokens' (half the frame rate, cast to the declared
    int32), mean log-mel as float32 (frames, 1). Returned in another order than declared."""
    mel = frontends.get_frontend("zipformer")(samples, 16000).astype(np.float64)
    return {"tokens": mel.argmax(axis=1)[::2], "energy": mel.mean(axis=1, keepdims=True).astype(np.float32),
            "ssl_feats": mel}


def _frontend():
    return frontends.CustomFrontend(NAME, mel_units, dict(CONFIG), outputs=OUTPUTS)


def _expected(samples: np.ndarray) -> dict:
    """What the cache must hold, computed here from the built-in zipformer directly."""
    mel = get_frontend("zipformer")(samples, 16000)
    return {"ssl_feats": mel.astype(np.float64).astype(np.float16), "tokens": mel.argmax(axis=1)[::2].astype(np.int32),
            "energy": mel.astype(np.float64).mean(axis=1, keepdims=True).astype(np.float32)}


@pytest.fixture
def registry(monkeypatch):
    monkeypatch.setattr(frontends, "_FACTORIES", dict(frontends._FACTORIES))
    return frontends._FACTORIES


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Record caches of the bundled TSV corpus (8 real clips) and the extracted named outputs."""
    root = tmp_path_factory.mktemp("named")
    shutil.copytree(bundled_sample_manifests()[1], root / "corpus")
    settings = Settings(manifests=(str(root / "corpus"),), output=str(root / "out"), workers=1, rows_per_part=2)
    stats = {}
    for split in SPLITS:
        build_record_cache(settings, split)
        stats[split] = build_feature_shards(settings, _frontend(), split, range(64))
    return settings, stats


def _records(settings):
    for split in SPLITS:
        for record in RecordStore(settings.record_cache_path(split)):
            yield split, record


def _stored_rows(split_root: Path, shard: int) -> dict[str, tuple[Path, bytes | None]]:
    """key -> (part, payload) of every row of a shard, by spec §3 rules (newest part wins)."""
    rows = {}
    for part in list_parts(shard_dir(split_root, shard)):
        table = pq.read_table(part)
        for key, payload, dead in zip(*(table.column(c).to_pylist() for c in ("key", "payload", "deleted"))):
            rows[key] = (part, None if dead else payload)
    return rows


# --- keys and hashes ---------------------------------------------------------------------------


def test_single_output_hashes_are_pinned_and_unchanged():
    for name, pinned in (("squeezeformer", "0a48384efcf3"), ("zipformer", "4d9c4bc8f09a"), ("w2v-bert", "c62e513533e1")):
        fe = get_frontend(name)
        assert fe.outputs is None and fe.frontend_hash() == pinned
        assert fe.output_hash() == pinned and fe.output_hashes() == {None: pinned}
        assert output_keys("utt-1", fe) == {None: cache_key("utt-1", pinned)}
        with pytest.raises(FeatureConfigError, match="single output"):
            fe.output_hash("tokens")
    single = frontends.CustomFrontend(NAME, mel_units, dict(CONFIG))
    assert single.frontend_hash() == hashlib.sha256(
        repr({"featurizer": {"type": NAME, **CONFIG}}).encode()).hexdigest()[:12]


def test_output_hash_is_the_config_dict_plus_the_output_name():
    fe = _frontend()
    # plain Python repr renders these str/int values exactly as upstream's config_repr does
    assert fe.frontend_hash() == hashlib.sha256(repr({"featurizer": {"type": NAME, **CONFIG}}).encode()).hexdigest()[:12]
    for name in OUTPUTS:
        text = repr({"featurizer": {"type": NAME, **CONFIG, "output": name}})
        assert fe.output_hash(name) == hashlib.sha256(text.encode()).hexdigest()[:12]
    assert len(set(fe.output_hashes().values()) | {fe.frontend_hash()}) == 4
    assert list(fe.output_hashes()) == list(OUTPUTS)
    with pytest.raises(FeatureConfigError, match=r"named outputs \['ssl_feats', 'tokens', 'energy'\]"):
        fe.output_hash()
    with pytest.raises(FeatureConfigError, match="has no output 'logits'"):
        fe.output_hash("logits")


# --- extraction --------------------------------------------------------------------------------


def test_extracted_outputs_equal_the_function_bit_for_bit_with_their_dtypes(built):
    settings, stats = built
    fe = _frontend()
    fhash = fe.frontend_hash()
    seen = 0
    for split, record in _records(settings):
        uid = record["utterance_id"]
        root = settings.feature_split_root(split)
        cache = ShardedParquetFeatureCache(root)
        expected = _expected(load_audio(record["audio_path"]))
        for name, want in expected.items():
            got = cache.load(uid, fe, output=name)
            assert got.dtype == want.dtype == np.dtype(OUTPUTS[name]) and got.shape == want.shape
            assert got.tobytes() == want.tobytes()
        assert expected["tokens"].ndim == 1 and expected["ssl_feats"].shape[1] == 80
        # every output sits in the frontend key's shard, in one part; none under the frontend key itself
        shard = shard_index(cache_key(uid, fhash))
        rows = _stored_rows(root, shard)
        keys = output_keys(uid, fe)
        assert cache_key(uid, fhash) not in rows
        assert len({rows[k][0] for k in keys.values()}) == 1
        tokens = rows[keys["tokens"]][1]
        assert tokens[:6] == NPY_MAGIC == b"\x93NUMPY"
        loaded = np.load(io.BytesIO(tokens), allow_pickle=False)
        assert loaded.dtype == np.int32 and np.array_equal(loaded, expected["tokens"])
        assert rows[keys["ssl_feats"]][1][:6] == NPY_MAGIC
        assert rows[keys["energy"]][1][:8] == b"SFCF32L1"  # float32 2-D stays SFCF32L1
        assert check_stored_outputs(cache, fe, uid).ok
        assert check_stored_outputs(cache, fe, uid).frames == expected["ssl_feats"].shape[0]
        assert cache.load_outputs(uid, fe).keys() == OUTPUTS.keys()
        seen += 1
    assert seen == 8
    frames = sum(s.frames for split in stats.values() for s in split.values())
    computed = sum(s.computed for split in stats.values() for s in split.values())
    assert computed == 8 and frames == sum(  # the first declared output's frames (not tokens', at half the rate)
        _expected(load_audio(r["audio_path"]))["ssl_feats"].shape[0] for _, r in _records(settings))
    # part metadata names the outputs, their dtypes and hashes
    part = next(iter(settings.feature_split_root("train").rglob("part_*.parquet")))
    meta = pq.read_schema(part).metadata
    assert meta[b"frontend_hash"].decode() == fhash
    assert b'"tokens": {"dtype": "int32", "hash": "' + fe.output_hash("tokens").encode() in meta[b"outputs"]


def test_second_run_computes_nothing_and_removed_records_are_tombstoned(built, tmp_path):
    settings0, _ = built
    out = tmp_path / "out"
    shutil.copytree(settings0.output, out)
    shutil.copytree(Path(settings0.manifests[0]), tmp_path / "corpus")
    settings = Settings(manifests=(str(tmp_path / "corpus"),), output=str(out), workers=1, rows_per_part=2)
    parts = {p: p.read_bytes() for p in out.rglob("part_*.parquet")}
    fe = _frontend()
    for split in SPLITS:
        store = RecordStore(settings.record_cache_path(split))
        assert shards_with_work(store, settings.feature_split_root(split), fe, 64) == []
        again = build_feature_shards(settings, fe, split, range(64))
        assert sum(s.computed for s in again.values()) == 0 and sum(s.tombstoned for s in again.values()) == 0
        assert sum(s.skipped for s in again.values()) == len(store)
    assert {p: p.read_bytes() for p in out.rglob("part_*.parquet")} == parts  # nothing written

    manifest = tmp_path / "corpus" / "manifest.tsv"
    lines = manifest.read_text(encoding="utf-8").splitlines()
    gone = lines[1].split("\t")[0]
    manifest.write_text("\n".join([lines[0], *lines[2:]]) + "\n", encoding="utf-8")
    # read first: the first build_record_cache call rebuilds every stale split in one pass
    before = {split: [r["utterance_id"] for r in RecordStore(settings.record_cache_path(split))] for split in SPLITS}
    for split in SPLITS:
        build_record_cache(settings, split)
        store = RecordStore(settings.record_cache_path(split))
        root = settings.feature_split_root(split)
        busy = shards_with_work(store, root, fe, 64)
        stats = build_feature_shards(settings, fe, split, range(64))
        cache = ShardedParquetFeatureCache(root)
        if gone in before[split]:
            assert busy == [shard_index(cache_key(gone, fe.frontend_hash()))]
            assert sum(s.tombstoned for s in stats.values()) == len(OUTPUTS)
            for name, key in output_keys(gone, fe).items():
                assert cache.load(gone, fe, output=name) is None
                assert _stored_rows(root, busy[0])[key][1] is None  # a tombstone row
            assert check_stored_outputs(cache, fe, gone).missing
        else:
            assert busy == [] and sum(s.tombstoned for s in stats.values()) == 0
        for record in store:
            assert check_stored_outputs(cache, fe, record["utterance_id"]).ok


# --- payloads ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64", "int8", "int32", "int64", "uint16", "bool"])
@pytest.mark.parametrize("shape", [(1,), (7,), (1, 1), (5, 3)])
def test_payload_round_trip_keeps_dtype_and_shape(dtype, shape):
    array = (np.arange(int(np.prod(shape))).reshape(shape) % 5).astype(dtype)
    payload = encode_features(array)
    sfcf = dtype == "float32" and len(shape) == 2
    assert payload[:8] == b"SFCF32L1" if sfcf else payload[:6] == NPY_MAGIC
    if not sfcf:
        assert np.load(io.BytesIO(payload), allow_pickle=False).tobytes() == array.tobytes()
    got = decode_features(payload)
    assert got.dtype == array.dtype and got.shape == array.shape and got.tobytes() == array.tobytes()
    assert got.flags.writeable


def test_payloads_that_would_need_pickle_are_refused():
    with pytest.raises(TypeError, match="pickle"):
        encode_features(np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(TypeError, match="dtype <U1"):
        encode_features(np.array(["a", "b"]))
    # an object .npy (as np.save with allow_pickle=True writes it) is never read
    buffer = io.BytesIO()
    np.save(buffer, np.array([1, "x"], dtype=object), allow_pickle=True)
    with pytest.raises(feature_cache.CacheCorruptError, match="object dtype"):
        decode_features(buffer.getvalue())
    good = encode_features(np.arange(4, dtype=np.int32))
    with pytest.raises(feature_cache.CacheCorruptError):
        decode_features(good[:-1])
    assert feature_cache._raw_payload(bytearray(b"hdr" + (len(good) + 1).to_bytes(4, "little") + good)) is None
    chunk = bytearray(b"\x15\x00header" + len(good).to_bytes(4, "little") + good)
    assert bytes(feature_cache._raw_payload(chunk)) == good


def test_raw_and_pyarrow_reads_agree_for_npy_values(tmp_path):
    rng = np.random.default_rng(5)
    ids = [u for u in (f"u{i}" for i in range(4000)) if shard_index(cache_key(u, "aaaaaaaaaaaa")) == 3][:12]
    keys = [cache_key(u, "aaaaaaaaaaaa") for u in ids]
    arrays = [rng.standard_normal((int(rng.integers(1, 300)), 16)).astype(np.float16) if i % 2
              else rng.integers(-2**31, 2**31 - 1, int(rng.integers(1, 300)), dtype=np.int64).astype(np.int32)
              for i in range(12)]
    with ShardWriter(tmp_path, 3, rows_per_part=4) as writer:  # the raw layout
        for key, array in zip(keys[:6], arrays[:6]):
            writer.add_payload(key, encode_features(array))
    directory = shard_dir(tmp_path, 3)
    pq.write_table(pa.table({"key": keys[6:], "payload": [encode_features(a) for a in arrays[6:]],
                             "deleted": [False] * 6}), directory / "part_zz_zstd.parquet", compression="zstd",
                   row_group_size=1)  # no raw spans: read through pyarrow
    cache = ShardedParquetFeatureCache(tmp_path)
    _, _, _, spans = cache._shard(3)
    assert set(spans) == set(keys[:6])
    raw = cache.load_keys(keys)
    assert all(a.flags.writeable for a in raw)
    for key, array, got in zip(keys, arrays, raw):
        assert got.dtype == array.dtype and got.tobytes() == array.tobytes()
    # every raw span read is exactly what pyarrow reads, and both paths decode alike
    for part in list_parts(directory):
        table = pq.read_table(part)
        for key, payload in zip(table.column("key").to_pylist(), table.column("payload").to_pylist()):
            if key in spans:
                offset, length = spans[key]
                with open(part, "rb") as handle:
                    handle.seek(offset)
                    chunk = bytearray(handle.read(length))
                view = feature_cache._raw_payload(chunk)
                assert bytes(view) == payload
                assert feature_cache._decode_view(view).tobytes() == decode_features(payload).tobytes()


# --- validation for the feature check ----------------------------------------------------------


def test_check_stored_outputs_catches_wrong_dtype_non_finite_partial_and_width(tmp_path):
    fe = _frontend()
    fhash = fe.frontend_hash()
    good = {"ssl_feats": np.ones((4, 3), np.float16), "tokens": np.arange(4, dtype=np.int32),
            "energy": np.zeros((4, 1), np.float32)}
    cases = {"ok": good, "dtype": {**good, "tokens": np.arange(4, dtype=np.int64)},
             "nan": {**good, "ssl_feats": np.array([[1, np.nan, 0]] * 4, np.float16)},
             "empty": {**good, "energy": np.zeros((0, 1), np.float32)},
             "partial": {k: v for k, v in good.items() if k != "tokens"}}
    uids = {case: f"utt-{case}" for case in cases}
    for case, arrays in cases.items():
        uid = uids[case]
        shard = shard_index(cache_key(uid, fhash))
        keys = output_keys(uid, fe)
        with ShardWriter(tmp_path, shard) as writer:
            writer.add_payloads([(keys[n], encode_features(a)) for n, a in arrays.items()])
    corrupt = "utt-corrupt"
    with ShardWriter(tmp_path, shard_index(cache_key(corrupt, fhash))) as writer:
        keys = output_keys(corrupt, fe)
        writer.add_payloads([(keys["ssl_feats"], encode_features(good["ssl_feats"])[:-2]),
                             (keys["tokens"], encode_features(good["tokens"])),
                             (keys["energy"], encode_features(good["energy"]))])
    cache = ShardedParquetFeatureCache(tmp_path)
    assert check_stored_outputs(cache, fe, uids["ok"]).ok
    assert check_stored_outputs(cache, fe, uids["ok"]).frames == 4
    missing = check_stored_outputs(cache, fe, "utt-never")
    assert missing.missing and not missing.problems and not missing.invalid_keys
    for case, needle in (("dtype", "output 'tokens': dtype int64, declared int32"),
                         ("nan", "output 'ssl_feats': shape (4, 3), 4 non-finite values"),
                         ("empty", "output 'energy': shape (0, 1)"),
                         ("partial", "outputs ['tokens'] missing"),
                         ("corrupt", "output 'ssl_feats': payload")):
        uid = uids.get(case, corrupt)
        verdict = check_stored_outputs(cache, fe, uid)
        assert not verdict.ok and not verdict.missing and verdict.frames == 0
        assert any(needle in p for p in verdict.problems), verdict.problems
        present = {k for k in output_keys(uid, fe).values() if cache.shard_entries(verdict.shard).get(k)}
        assert set(verdict.invalid_keys) == present and present
        assert verdict.shard == shard_index(cache_key(uid, fhash))
    # single-output frontends: float32 of the frontend's width
    zip_fe = get_frontend("zipformer")
    with ShardWriter(tmp_path, shard_index(cache_key("z1", zip_fe.frontend_hash()))) as writer:
        writer.add(cache_key("z1", zip_fe.frontend_hash()), np.zeros((3, 79), np.float32))
    verdict = check_stored_outputs(ShardedParquetFeatureCache(tmp_path), zip_fe, "z1")
    assert verdict.problems == ["shape (3, 79), expected (frames>0, 80)"]


def test_reader_output_selection_errors(built):
    settings, _ = built
    cache = ShardedParquetFeatureCache(settings.feature_split_root("train"))
    uid = next(iter(RecordStore(settings.record_cache_path("train"))))["utterance_id"]
    fe = _frontend()
    with pytest.raises(FeatureConfigError, match="named outputs.*output=<name>"):
        cache.load(uid, fe)
    with pytest.raises(FeatureConfigError, match="needs the frontend's name or Frontend"):
        cache.load(uid, fe.frontend_hash(), output="tokens")
    assert cache.load(uid, fe.frontend_hash()) is None  # nothing under the frontend key itself
    with pytest.raises(FeatureConfigError, match="single output"):
        cache.load(uid, "zipformer", output="tokens")
    assert cache.load_many([uid, "nope"], fe, output="tokens")[1] is None


# --- frontend checks and registration ----------------------------------------------------------


def test_named_outputs_are_checked_and_cast(registry):
    x = load_audio(str(Path(bundled_sample_manifests()[1]) / "clips" / "jfk.flac"))[:16000]
    register_frontend("units-reg", mel_units, CONFIG, outputs=OUTPUTS)
    fe = get_frontend("units-reg")
    out = fe(x, 16000)
    assert {k: v.dtype.name for k, v in out.items()} == OUTPUTS
    assert get_frontend("units-reg", revision="r2").output_hash("tokens") != fe.output_hash("tokens")

    def run(result):
        return frontends.base.check_named_outputs("t", {"a": "int32", "b": "float16"}, result)

    ok = run({"a": np.arange(3, dtype=np.uint8), "b": np.ones((3, 2))})
    assert ok["a"].dtype == np.int32 and ok["b"].dtype == np.float16
    for bad, needle in (({"a": np.arange(3)}, "exactly the outputs"),
                        ([np.arange(3)], "exactly the outputs"),
                        ({"a": np.ones(3), "b": np.ones(3)}, "cannot become int32"),
                        ({"a": np.array([2**40]), "b": np.ones(3)}, "do not fit int32"),
                        ({"a": np.zeros(0, np.int32), "b": np.ones(3)}, "num_frames > 0"),
                        ({"a": np.zeros((2, 2, 2), np.int32), "b": np.ones(3)}, "shape"),
                        ({"a": np.zeros(2, np.int32), "b": np.array([1e6])}, "non-finite"),
                        ({"a": np.array(["x"]), "b": np.ones(3)}, "not a real array")):
        with pytest.raises(FeatureConfigError, match=needle):
            run(bad)
    for config, kwargs, needle in ((CONFIG, {"outputs": {"a": object}}, "pickle"),
                                   (CONFIG, {"outputs": {}}, "non-empty"),
                                   (CONFIG, {"outputs": {"a b": "int32"}}, "must match"),
                                   (CONFIG, {"outputs": {"a": "int32"}, "feature_dim": 4}, "single-output"),
                                   ({"output": 1}, {"outputs": {"a": "int32"}}, "must not contain 'output'")):
        with pytest.raises(FeatureConfigError, match=needle):
            register_frontend("bad-units", mel_units, config, **kwargs)
    assert "bad-units" not in frontends.available_frontends()


# --- torch dataset, warm, export ---------------------------------------------------------------


def test_feature_dataset_selects_an_output_and_lazy_cached_writes_all_back(built, tmp_path):
    torch = pytest.importorskip("torch")
    from asr_assets.data import FeatureDataset, collate_padded

    settings, _ = built
    fe = _frontend()
    eager = FeatureDataset(settings.output, "train", frontend=fe, output="tokens")
    cache = ShardedParquetFeatureCache(settings.feature_split_root("train"))
    items = [eager[i] for i in range(len(eager))]
    assert items and all(it["features"].dtype == torch.int32 and it["features"].ndim == 1 for it in items)
    for it in items:
        assert np.array_equal(it["features"].numpy(), cache.load(it["utterance_id"], fe, output="tokens"))
    lazy = FeatureDataset(settings.output, "train", frontend=fe, mode="lazy", output="ssl_feats")
    assert lazy[0]["features"].dtype == torch.float16
    assert torch.equal(lazy[0]["features"], torch.from_numpy(cache.load(items[0]["utterance_id"], fe, output="ssl_feats")))
    batch = collate_padded(items)
    assert batch["features"].dtype == torch.int32 and batch["features"].shape == (len(items), max(batch["feature_lengths"]))
    with pytest.raises(FeatureConfigError, match="pick one with output="):
        FeatureDataset(settings.output, "train", frontend=fe)

    out = tmp_path / "out"
    shutil.copytree(Path(settings.output) / "record_cache", out / "record_cache")
    cached = FeatureDataset(out, "train", frontend=fe, mode="lazy_cached", output="energy")
    uid = cached[0]["utterance_id"]
    fresh = ShardedParquetFeatureCache(out / "feature-cache" / "train")
    loaded = fresh.load_outputs(uid, fe)  # every output was written back, not only the selected one
    assert loaded is not None and check_stored_outputs(fresh, fe, uid).ok
    assert all(loaded[n].tobytes() == cache.load(uid, fe, output=n).tobytes() for n in OUTPUTS)
    parts = list((out / "feature-cache").rglob("part_*.parquet"))
    assert len(parts) == 1 and pq.read_metadata(parts[0]).num_rows == len(OUTPUTS)


def test_warm_refuses_and_export_takes_one_float_output(built, tmp_path):
    from asr_assets.stores import StoreError, export_feature_store, open_feature_store
    from asr_assets.warm import iter_record_cache_batches, warm_feature_cache

    settings, _ = built
    fe = _frontend()
    records = settings.record_cache_path("train")
    with pytest.raises(ConfigError, match="named outputs"):
        warm_feature_cache(iter_record_cache_batches(records), tmp_path / "warm", fe)
    split_root = settings.feature_split_root("train")
    with pytest.raises(StoreError, match="pick one with output="):
        export_feature_store(split_root, tmp_path / "a", backend="numpy_memmap", frontend=fe, record_cache=records)
    with pytest.raises(StoreError, match="it is int32"):
        export_feature_store(split_root, tmp_path / "b", backend="numpy_memmap", frontend=fe, record_cache=records,
                             output="tokens")
    with pytest.raises(StoreError, match="named outputs"):
        open_feature_store(split_root, frontend=fe)
    summary = export_feature_store(split_root, tmp_path / "c", backend="numpy_memmap", frontend=fe,
                                   record_cache=records, output="ssl_feats")
    cache = ShardedParquetFeatureCache(split_root)
    ids = [r["utterance_id"] for r in RecordStore(records)]
    assert summary.written == len(ids) and summary.missing == 0 and summary.frontend_hash == fe.output_hash("ssl_feats")
    with open_feature_store(tmp_path / "c") as store:
        assert store.metadata["output"] == "ssl_feats" and store.metadata["source_dtype"] == "float16"
        for uid in ids:  # float16 -> float32 is exact
            assert np.array_equal(store.load(uid), cache.load(uid, fe, output="ssl_feats").astype(np.float32))


def test_verify_feature_shard_counts_and_checks_named_outputs(built, monkeypatch):
    """The feature check's library call (pipeline.verify_feature_shard) on a multi-output frontend:
    every record is accounted for by all its output keys; a torn output in a new part is caught and
    all of that record's outputs are tombstoned; parts the run did not write are not read."""
    from asr_assets.extraction import plan_shard_tasks
    from asr_assets.pipeline import verify_feature_shard

    settings, _ = built
    frontend = _frontend()
    monkeypatch.setitem(frontends._FACTORIES, NAME, lambda **kw: _frontend())
    store = RecordStore(settings.record_cache_path("train"))
    plan = plan_shard_tasks(store, frontend.frontend_hash(), range(64), 64)
    shard, tasks = next((s, t) for s, t in plan.items() if t)
    root = settings.feature_split_root("train")
    old = verify_feature_shard(settings, frontend, "train", shard, [], tasks)
    assert (old.with_features, old.unaccounted, old.invalid, old.payloads_read) == (len(tasks), [], [], 0)
    # a newer part with a wrong-dtype 'tokens' output (float32 instead of int32) for the first record
    uid = tasks[0].utterance_id
    keys = output_keys(uid, frontend)
    with ShardWriter(root, shard, metadata=feature_cache.part_metadata(frontend)) as writer:
        writer.add_payload(keys["tokens"], encode_features(np.zeros(3, np.float32)))
    new = writer.parts_written[0].name
    result = verify_feature_shard(settings, frontend, "train", shard, [new], tasks)
    assert len(result.invalid) == 1 and uid in result.invalid[0] and "tokens" in result.invalid[0]
    assert result.tombstoned == len(keys) and result.parts_read == 1
    cache = ShardedParquetFeatureCache(root)
    assert all(cache.load(uid, frontend, output=name) is None for name in OUTPUTS)
    after = verify_feature_shard(settings, frontend, "train", shard, [], tasks)
    assert after.unaccounted == [uid] and after.with_features == len(tasks) - 1
    build_feature_shards(settings, frontend, "train", [shard])  # the next run computes it again
    assert verify_feature_shard(settings, frontend, "train", shard, [], tasks).with_features == len(tasks)
