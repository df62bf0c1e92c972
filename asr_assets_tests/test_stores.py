"""Feature stores (``asr_assets.stores``) on a real cache built by the CLI from the bundled sample.

Covers: for ``sharded_parquet``, ``numpy_memmap`` and ``hdf5``, opened through
``open_feature_store(path)`` from what is on disk alone, every utterance loads bit-identical to
``ShardedParquetFeatureCache.load`` (float32, same shape and bytes), ``read == load``, misses
give None, ``in``/``len``/``keys`` follow the record order, readers pickle mid-use and are
context managers; the metadata file names the storage type; a store whose metadata file is
missing, not JSON, nameless or of an unknown type gives a clear error (never None), and so do
truncated or missing data files; an export that fails midway leaves nothing that opens (and a
killed one's staging folder is removed by the next export); ``numpy_memmap`` returns read-only
views (``copy=True``: writable copies) across several shards and zero-frame utterances; HDF5
dataset names escape ``/``; the registry (names, writable names, a user backend, unknown names);
``asr-assets export`` (summary line; every error exits 2 with one line on stderr).
"""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from asr_assets.cli import main as cli_main
from asr_assets.feature_cache import ShardedParquetFeatureCache, ShardWriter, cache_key, shard_index
from asr_assets.record_cache import RecordStore
from asr_assets.stores import (
    METADATA_NAME,
    FeatureStore,
    StoreCorruptError,
    StoreError,
    StoreNotFoundError,
    UnknownStoreError,
    available_stores,
    export_feature_store,
    get_store_reader,
    get_store_writer,
    open_feature_store,
    register_store,
    store_statuses,
)
from asr_assets.stores import numpy_memmap as memmap_module
from asr_assets.stores.hdf5 import Hdf5Store, Hdf5Writer, dataset_name, utterance_id_of
from asr_assets.stores.numpy_memmap import NumpyMemmapStore, NumpyMemmapWriter
from asr_assets.stores.sharded_parquet import ShardedParquetStore

SQUEEZEFORMER = "0a48384efcf3"
BACKENDS = ("sharded_parquet", "numpy_memmap", "hdf5")
EXPORTED = ("numpy_memmap", "hdf5")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """``asr-assets materialize`` of the bundled sample (squeezeformer), once per module."""
    root = tmp_path_factory.mktemp("stores")
    with pytest.MonkeyPatch.context() as mp:
        for var in ("ASR_ASSETS_MANIFESTS", "ASR_ASSETS_OUTPUT", "ASR_ASSETS_FRONTENDS", "ASR_ASSETS_WORKERS",
                    "ASR_ASSETS_FRONTEND_OVERRIDES", "ASR_ASSETS_PLUGINS"):
            mp.delenv(var, raising=False)
        mp.setenv("DAGSTER_HOME", str(root / "dagster_home"))
        assert cli_main(["materialize", "--output", str(root / "out"), "--workers", "1"]) == 0
    return root / "out"


@pytest.fixture(scope="module")
def stores(built, tmp_path_factory) -> dict[str, Path]:
    """The train split as every backend: the Parquet split root itself, and one export each."""
    root = tmp_path_factory.mktemp("exported")
    paths = {"sharded_parquet": built / "feature-cache" / "train"}
    for backend in EXPORTED:
        summary = export_feature_store(paths["sharded_parquet"], root / backend, backend=backend, frontend="squeezeformer")
        assert (summary.written, summary.missing) == (20, 0)
        paths[backend] = summary.path
    return paths


@pytest.fixture(scope="module")
def train_ids(built) -> list[str]:
    return [r["utterance_id"] for r in RecordStore(built / "record_cache" / "train.jsonl")]


@pytest.fixture(scope="module")
def reference(built, train_ids) -> dict[str, np.ndarray]:
    cache = ShardedParquetFeatureCache(built / "feature-cache" / "train")
    arrays = {u: cache.load(u, "squeezeformer") for u in train_ids}
    assert all(a is not None for a in arrays.values())
    return arrays


def _error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == np.float32 and b.dtype == np.float32 and a.shape == b.shape and a.tobytes() == b.tobytes()


# ----------------------------------------------------------------------------- reading every backend

@pytest.mark.parametrize("backend", BACKENDS)
def test_every_utterance_loads_bit_identical(stores, train_ids, reference, backend):
    with open_feature_store(stores[backend]) as store:
        assert store.storage_type == backend and store.frontend_hash == SQUEEZEFORMER
        for utterance_id in train_ids:
            features = store.load(utterance_id)
            assert _same(features, reference[utterance_id]), utterance_id
            assert _same(store.read(utterance_id), features)
            assert utterance_id in store
        assert all(_same(a, reference[u]) for u, a in zip(train_ids, store.load_many(train_ids)))
        assert store.keys() == store.utterance_ids() == list(store) == train_ids  # record order
        assert len(store) == 20


@pytest.mark.parametrize("backend", BACKENDS)
def test_misses_give_none(stores, backend):
    store = open_feature_store(stores[backend])
    for missing in ("no-such-utterance", "", "a/b", ".hidden"):
        assert store.load(missing) is None and store.read(missing) is None and missing not in store
    assert store.load_many(["no-such-utterance"]) == [None]


@pytest.mark.parametrize("backend", BACKENDS)
def test_pickling_a_reader_mid_use(stores, train_ids, reference, backend):
    store = open_feature_store(stores[backend])
    assert _same(store.load(train_ids[0]), reference[train_ids[0]])  # files are open now
    clone = pickle.loads(pickle.dumps(store))
    assert type(clone) is type(store) and clone.metadata == store.metadata
    for utterance_id in train_ids[::3]:
        assert _same(clone.load(utterance_id), reference[utterance_id])
        assert _same(store.load(utterance_id), reference[utterance_id])  # the original goes on
    store.close()
    assert _same(store.load(train_ids[-1]), reference[train_ids[-1]])  # reopened lazily after close
    assert _same(pickle.loads(pickle.dumps(store)).load(train_ids[1]), reference[train_ids[1]])


@pytest.mark.parametrize("backend", EXPORTED)
def test_metadata_names_the_storage_type(stores, backend):
    metadata = json.loads((stores[backend] / METADATA_NAME).read_text(encoding="utf-8"))
    assert metadata["storage_type"] == backend and metadata["format_version"] == 1
    assert (metadata["frontend"], metadata["frontend_hash"], metadata["feature_dim"]) == ("squeezeformer", SQUEEZEFORMER, 80)
    assert (metadata["dtype"], metadata["num_utterances"]) == ("float32", 20)
    assert isinstance(open_feature_store(stores[backend] / METADATA_NAME), get_store_reader(backend))
    assert not [p.name for p in stores[backend].parent.iterdir() if ".tmp." in p.name]


def test_sharded_parquet_opens_without_metadata_and_checks_the_frontend(stores, train_ids, reference):
    root = stores["sharded_parquet"]
    assert not (root / METADATA_NAME).exists()  # upstream writes none
    store = open_feature_store(root)  # the one frontend the parts name
    assert isinstance(store, ShardedParquetStore)
    assert (store.metadata["frontend"], store.feature_dim) == ("squeezeformer", 80)
    assert _same(open_feature_store(root, frontend=SQUEEZEFORMER).load(train_ids[0]), reference[train_ids[0]])
    other = open_feature_store(root, frontend="zipformer")
    assert other.load(train_ids[0]) is None and train_ids[0] not in other and len(other) == 0
    with pytest.raises(StoreError, match="holds frontend 'squeezeformer'"):
        open_feature_store(stores["numpy_memmap"], frontend="zipformer")
    assert open_feature_store(stores["hdf5"], frontend="squeezeformer").frontend_hash == SQUEEZEFORMER


def test_sharded_parquet_needs_a_frontend_when_the_parts_do_not_name_one(tmp_path):
    features = np.arange(12, dtype=np.float32).reshape(3, 4)
    for frontend_hash in (SQUEEZEFORMER, "4d9c4bc8f09a"):
        key = cache_key("utt-1", frontend_hash)
        with ShardWriter(tmp_path / "two", shard_index(key), metadata={"frontend_hash": frontend_hash}) as writer:
            writer.add(key, features)
    with pytest.raises(StoreError, match=r"2 frontend hashes .*pass frontend="):
        open_feature_store(tmp_path / "two")
    assert _same(open_feature_store(tmp_path / "two", frontend="zipformer").load("utt-1"), features)
    key = cache_key("utt-1", SQUEEZEFORMER)
    with ShardWriter(tmp_path / "upstream", shard_index(key), metadata={"storage_type": "x"}) as writer:
        writer.add(key, features)
    with pytest.raises(StoreError, match="could be any frontend"):
        open_feature_store(tmp_path / "upstream")
    store = open_feature_store(tmp_path / "upstream", frontend="squeezeformer")
    assert _same(store.load("utt-1"), features)
    with pytest.raises(StoreError, match="record_cache="):  # no record cache beside it to list ids
        store.utterance_ids()


# ----------------------------------------------------------------------------- numpy_memmap details

def test_memmap_load_is_a_read_only_view_unless_copy(stores, train_ids, reference):
    store = open_feature_store(stores["numpy_memmap"])
    view = store.load(train_ids[0])
    assert type(view) is np.ndarray and not view.flags.writeable and not view.flags.owndata
    with pytest.raises(ValueError):
        view[0, 0] = 1.0
    store.close()
    assert _same(view, reference[train_ids[0]])  # the view keeps its mapping alive
    copied = open_feature_store(stores["numpy_memmap"], copy=True).load(train_ids[0])
    assert copied.flags.writeable and copied.flags.owndata and _same(copied, view)
    copied[0, 0] = 1.0  # a copy: the store is unchanged
    assert _same(open_feature_store(stores["numpy_memmap"]).load(train_ids[0]), reference[train_ids[0]])


def test_memmap_shards_and_zero_frame_utterances(tmp_path, reference):
    items = list(reference.items())[:7] + [("empty", np.zeros((0, 80), dtype=np.float32))]
    with NumpyMemmapWriter(tmp_path / "mm", frontend="squeezeformer", frontend_hash=SQUEEZEFORMER,
                           max_shard_bytes=300_000) as writer:
        writer.write_many(items)
    metadata = json.loads((tmp_path / "mm" / METADATA_NAME).read_text())
    assert len(metadata["shards"]) >= 3 and sum(s["num_utterances"] for s in metadata["shards"]) == 8
    store = open_feature_store(tmp_path / "mm")
    assert store.keys() == [u for u, _ in items]
    for utterance_id, features in items:
        assert _same(store.load(utterance_id), features)
    assert store.load("empty").shape == (0, 80)


def test_memmap_damaged_data_files(stores, tmp_path, train_ids):
    copy = shutil.copytree(stores["numpy_memmap"], tmp_path / "mm")
    data = copy / "shard_0000.f32"
    data.write_bytes(data.read_bytes()[:-4])
    with pytest.raises(StoreCorruptError, match="truncated or replaced"):
        open_feature_store(copy).load(train_ids[0])
    data.unlink()
    with pytest.raises(StoreCorruptError, match="is missing"):
        open_feature_store(copy).load(train_ids[0])
    (copy / "shard_0000.index.parquet").unlink()
    with pytest.raises(StoreCorruptError, match="cannot be read"):
        open_feature_store(copy).load(train_ids[0])


# ----------------------------------------------------------------------------- hdf5 details

@pytest.mark.parametrize("utterance_id, name", [
    ("plain-id_1", "plain-id_1"), ("spk/utt", "spk%2Futt"), ("100%", "100%25"), (".", "%2E"), ("..x", "%2E.x"),
    ("a.b", "a.b"), ("nul\x00", "nul%00"), ("%2F", "%252F"), ("ünï", "ünï"),
])
def test_hdf5_dataset_names(utterance_id, name):
    assert dataset_name(utterance_id) == name and utterance_id_of(name) == utterance_id


def test_hdf5_ids_with_slashes_round_trip(tmp_path):
    items = [("spk/utt/1", np.ones((2, 3), np.float32)), ("50%/x", np.zeros((1, 3), np.float32)),
             (".dot", np.full((4, 3), 2.5, np.float32))]
    with Hdf5Writer(tmp_path / "h5", frontend=None, frontend_hash=SQUEEZEFORMER) as writer:
        writer.write_many(items)
    store = open_feature_store(tmp_path / "h5")
    assert isinstance(store, Hdf5Store) and store.keys() == [u for u, _ in items] and len(store) == 3
    assert all(_same(store.load(u), a) and u in store for u, a in items)
    assert store.load("spk") is None  # the escaped name is one dataset, not a group


def test_hdf5_missing_data_file(stores, tmp_path, train_ids):
    copy = shutil.copytree(stores["hdf5"], tmp_path / "h5")
    (copy / "features.h5").write_bytes(b"not hdf5")
    with pytest.raises(StoreCorruptError, match="cannot be opened as HDF5"):
        open_feature_store(copy).load(train_ids[0])
    (copy / "features.h5").unlink()
    with pytest.raises(StoreCorruptError, match="is missing"):
        open_feature_store(copy).load(train_ids[0])


# ----------------------------------------------------------------------------- metadata errors

@pytest.mark.parametrize("backend", EXPORTED)
def test_damaged_or_missing_metadata_is_a_clear_error(stores, tmp_path, backend):
    copy = shutil.copytree(stores[backend], tmp_path / backend)
    metadata = copy / METADATA_NAME
    cases = [("{not json", StoreCorruptError, "is not valid JSON"),
             ("[1, 2]", StoreCorruptError, "names no storage_type"),
             ('{"format_version": 1}', StoreCorruptError, "names no storage_type"),
             ('{"storage_type": "lilcom_chunky"}', UnknownStoreError, "'lilcom_chunky'.*available: hdf5, numpy_memmap"),
             (json.dumps({**json.loads(metadata.read_text()), "format_version": 99}), StoreCorruptError, "format_version 99")]
    for text, error, message in cases:
        metadata.write_text(text, encoding="utf-8")
        with pytest.raises(error, match=message):
            open_feature_store(copy)
    metadata.unlink()
    with pytest.raises(StoreNotFoundError, match=f"no {METADATA_NAME}.*interrupted"):
        open_feature_store(copy)
    with pytest.raises(StoreNotFoundError, match="does not exist"):
        open_feature_store(tmp_path / "nothing")
    with pytest.raises(StoreNotFoundError, match="is a file"):
        open_feature_store(copy / next(p.name for p in copy.iterdir()))


# ----------------------------------------------------------------------------- export

@pytest.mark.parametrize("backend", EXPORTED)
@pytest.mark.parametrize("target_exists", [False, True])
def test_interrupted_export_leaves_no_store(stores, tmp_path, monkeypatch, backend, target_exists):
    writer_class = get_store_writer(backend)
    real_write, calls = writer_class._write, []

    def failing_write(self, utterance_id, array):
        calls.append(utterance_id)
        if len(calls) == 5:
            raise RuntimeError("disk on fire")
        real_write(self, utterance_id, array)

    monkeypatch.setattr(writer_class, "_write", failing_write)
    target = tmp_path / "store"
    if target_exists:
        target.mkdir()
    with pytest.raises(RuntimeError, match="disk on fire"):
        export_feature_store(stores["sharded_parquet"], target, backend=backend, frontend="squeezeformer")
    assert len(calls) == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == (["store"] if target_exists else [])  # no staging left
    assert not target.exists() or not any(target.iterdir())
    with pytest.raises(StoreNotFoundError):
        open_feature_store(target)
    monkeypatch.undo()
    assert export_feature_store(stores["sharded_parquet"], target, backend=backend, frontend="squeezeformer").written == 20


def test_writer_without_commit_is_never_opened_and_stale_staging_is_removed(stores, tmp_path, reference):
    writer = NumpyMemmapWriter(tmp_path / "killed", frontend="squeezeformer", frontend_hash=SQUEEZEFORMER,
                               max_shard_bytes=1)
    writer.write_many(list(reference.items())[:3])  # shards renamed into place, no metadata yet: "killed"
    assert (tmp_path / "killed" / "shard_0000.f32").exists()
    with pytest.raises(StoreNotFoundError, match="interrupted"):
        open_feature_store(tmp_path / "killed")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    from asr_assets._fs import _HOST

    stale = tmp_path / f".store.tmp.{_HOST}-{int(dead.stdout)}"
    stale.mkdir()
    (stale / "shard_0000.f32").write_bytes(b"\0" * 8)
    export_feature_store(stores["sharded_parquet"], tmp_path / "store", backend="numpy_memmap", frontend=SQUEEZEFORMER)
    assert not stale.exists() and (tmp_path / "store" / METADATA_NAME).exists()


def test_export_counts_utterances_without_features(stores, tmp_path, train_ids):
    summary = export_feature_store(stores["sharded_parquet"], tmp_path / "mm", backend="numpy_memmap",
                                   frontend="squeezeformer", utterance_ids=["ghost", *train_ids[:4], "ghost-2"],
                                   batch_size=2)
    assert (summary.written, summary.missing, summary.missing_examples) == (4, 2, ("ghost", "ghost-2"))
    assert open_feature_store(tmp_path / "mm").keys() == train_ids[:4]
    assert summary.nbytes == sum(open_feature_store(tmp_path / "mm").load(u).nbytes for u in train_ids[:4])


def test_writers_refuse_a_used_folder_and_bad_arrays(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    (tmp_path / "file").write_text("")
    for path, message in ((tmp_path / "full", "not empty"), (tmp_path / "file", "is a file")):
        with pytest.raises(StoreError, match=message):
            NumpyMemmapWriter(path, frontend=None, frontend_hash=None)
    writer = NumpyMemmapWriter(tmp_path / "new", frontend=None, frontend_hash=None)
    writer.write("a", np.zeros((2, 3), np.float32))
    for utterance_id, features, error in (("a", np.zeros((1, 3)), ValueError), ("b", np.zeros((1, 4)), ValueError),
                                          ("c", np.zeros(3), ValueError), ("d", np.array([["x"]]), TypeError)):
        with pytest.raises(error):
            writer.write(utterance_id, features)
    writer.close()
    assert len(open_feature_store(tmp_path / "new")) == 1


# ----------------------------------------------------------------------------- registry

def test_registry_names_and_unknown_names():
    assert available_stores() == ["hdf5", "numpy_memmap", "sharded_parquet"]
    assert available_stores(writable=True) == ["hdf5", "numpy_memmap"]
    assert {s.name: (s.available, s.writable) for s in store_statuses()} == {
        "hdf5": (True, True), "numpy_memmap": (True, True), "sharded_parquet": (True, False)}
    assert get_store_reader("numpy_memmap") is NumpyMemmapStore and get_store_writer("hdf5") is Hdf5Writer
    with pytest.raises(UnknownStoreError, match="'lilcom'; available: hdf5, numpy_memmap, sharded_parquet"):
        get_store_reader("lilcom")
    with pytest.raises(UnknownStoreError, match="cannot be written by export; writable: hdf5, numpy_memmap"):
        get_store_writer("sharded_parquet")


def test_a_registered_backend_opens_from_its_metadata(tmp_path, monkeypatch):
    import asr_assets.stores as stores_module

    monkeypatch.setattr(stores_module, "_READERS", dict(stores_module._READERS))

    @register_store("constant")
    class ConstantStore(FeatureStore):
        def load(self, utterance_id):
            return np.full((1, 2), 7, np.float32) if utterance_id == "only" else None

        def utterance_ids(self):
            return ["only"]

    (tmp_path / METADATA_NAME).write_text(json.dumps({"storage_type": "constant"}))
    with open_feature_store(tmp_path) as store:
        assert isinstance(store, ConstantStore) and store.read("only")[0, 1] == 7 and "only" in store and len(store) == 1
    with pytest.raises(StoreError, match="already registered"):
        register_store("numpy_memmap")(ConstantStore)
    with pytest.raises(TypeError):
        register_store("thing")(dict)


def test_importing_stores_loads_no_backend_module():
    code = ("import sys, asr_assets.stores as s\n"
            "assert s.available_stores() == ['hdf5', 'numpy_memmap', 'sharded_parquet']\n"
            "print(sorted(m for m in ('h5py', 'pyarrow', 'asr_assets.stores.hdf5') if m in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
    assert memmap_module.NumpyMemmapStore.storage_type == "numpy_memmap"


# ----------------------------------------------------------------------------- the CLI

def test_cli_export_writes_a_store_and_one_summary_line(built, tmp_path, capsys, train_ids, reference):
    assert cli_main(["export", "--output", str(built), "--split", "train", "--backend", "numpy_memmap",
                     "--to", str(tmp_path / "mm")]) == 0
    out = capsys.readouterr().out.strip()
    assert "\n" not in out and "train [squeezeformer 0a48384efcf3]" in out and "(numpy_memmap)" in out
    assert "20 utterances written, 0 without features (skipped)" in out and " MB, " in out and out.endswith(" s")
    store = open_feature_store(tmp_path / "mm")
    assert store.keys() == train_ids and all(_same(store.load(u), reference[u]) for u in train_ids)


def test_cli_export_errors_are_one_line(built, tmp_path, capsys):
    base = ["export", "--output", str(built), "--split", "train", "--backend", "hdf5"]
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    (tmp_path / "file").write_text("")
    cases = [
        (["export", "--output", str(tmp_path / "none"), "--split", "train", "--backend", "hdf5", "--to", str(tmp_path / "a")],
         "no feature cache at"),
        ([*base[:-1], "lilcom", "--to", str(tmp_path / "a")], "unknown --backend 'lilcom'; available: hdf5, numpy_memmap"),
        ([*base[:-1], "sharded_parquet", "--to", str(tmp_path / "a")], "available: hdf5, numpy_memmap"),
        ([*base, "--to", str(tmp_path / "full")], "is not empty"),
        ([*base, "--to", str(tmp_path / "file")], "is a file"),
        ([*base, "--frontend", "zipformr", "--to", str(tmp_path / "a")], "did you mean 'zipformer'?"),
        ([*base, "--frontend", "zipformer", "--to", str(tmp_path / "a")], "holds no features of 'zipformer'"),
    ]
    for argv, message in cases:
        assert cli_main(argv) == 2, argv
        line = _error_line(capsys)
        assert line.startswith("asr-assets: error: ") and message in line, line
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["export", "--split", "train", "--to", str(tmp_path / "a")])
    assert exit_info.value.code == 2 and "--backend" in _error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "full"]
