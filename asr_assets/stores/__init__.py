"""Feature stores: one frontend's features by utterance id, in a storage backend chosen by name.

Entry points:
    - :func:`open_feature_store` — a reader found from what is on disk alone: the
      ``storage_type`` of ``<path>/asr_assets_store.json``, or ``sharded_parquet`` for a split
      root of the Parquet cache (``<path>/feature_shards/``; upstream wrote no metadata file).
    - :func:`export_feature_store` — copy one frontend's features of a split from the Parquet
      cache into another backend, atomically.
    - :func:`register_store`, :func:`get_store_reader`, :func:`get_store_writer`,
      :func:`available_stores`, :func:`store_statuses` — the registry (lhotse's
      ``register_reader``/``register_writer``: a reader and a writer class paired by one name).
    - :class:`FeatureStore`, :class:`FeatureStoreWriter` — the interfaces (:mod:`.base`).

Built-in backends (their modules are imported on first use):

    ``sharded_parquet``  the upstream cache, read for one frontend (:mod:`.sharded_parquet`; no writer here)
    ``numpy_memmap``     flat float32 files + Parquet offset index, read through mmap (:mod:`.numpy_memmap`)
    ``hdf5``             one HDF5 dataset per utterance, needs h5py (:mod:`.hdf5`)

Every reader has ``load(utterance_id)`` and ``read(utterance_id)`` -> float32 ``(num_frames,
feature_dim)`` or None, ``in``, ``len``, ``keys()``/``utterance_ids()``, ``close()`` and ``with``;
readers open files lazily and pickle without open handles (DataLoader workers).

Example::

    from asr_assets.stores import export_feature_store, open_feature_store

    export_feature_store("artifacts/feature-cache/train", "/data/train-mm", backend="numpy_memmap",
                         frontend="squeezeformer")
    with open_feature_store("/data/train-mm") as store:
        feats = store.load("utt-1")        # read-only float32 view [frames, 80], or None
"""

from __future__ import annotations

import importlib
import importlib.util
import itertools
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, TypeVar

from .._fs import _HOST, TMP_MARK, _pid_alive, _tmp_owner, tmp_suffix
from .base import (
    METADATA_NAME,
    FeatureStore,
    FeatureStoreWriter,
    StoreCorruptError,
    StoreError,
    StoreNotFoundError,
    UnknownStoreError,
    fsync_dir,
    read_metadata,
)

__all__ = [
    "METADATA_NAME", "ExportSummary", "FeatureStore", "FeatureStoreWriter", "StoreCorruptError", "StoreError",
    "StoreInfo", "StoreNotFoundError", "UnknownStoreError", "available_stores", "export_feature_store",
    "get_store_reader", "get_store_writer", "open_feature_store", "register_store", "store_statuses",
]

#: built-in storage types -> their module (imported when the name is first looked up)
_BUILTIN = {"sharded_parquet": "sharded_parquet", "numpy_memmap": "numpy_memmap", "hdf5": "hdf5"}
_READERS: dict[str, type[FeatureStore]] = {}
_WRITERS: dict[str, type[FeatureStoreWriter]] = {}
_REQUIRES: dict[str, tuple[str, str]] = {}

T = TypeVar("T", bound=type)


def register_store(name: str, *, requires: str | None = None, install_hint: str = "",
                   replace: bool = False) -> Callable[[T], T]:
    """Class decorator registering a :class:`FeatureStore` (reader) or a
    :class:`FeatureStoreWriter` under a storage type name.

    Args:
        name: the ``storage_type`` written into ``asr_assets_store.json``.
        requires: an optional module the backend needs (checked by :func:`store_statuses`).
        install_hint: how to install it.
        replace: allow redefining a name registered by another class.

    Raises:
        TypeError: the class is neither a reader nor a writer.
        StoreError: ``name`` is taken by another class (and not ``replace``).

    Example::

        @register_store("my_store")
        class MyStoreReader(FeatureStore): ...
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"storage type name must be a non-empty str, got {name!r}")

    def decorate(cls: T) -> T:
        if isinstance(cls, type) and issubclass(cls, FeatureStoreWriter):
            table: dict = _WRITERS
        elif isinstance(cls, type) and issubclass(cls, FeatureStore):
            table = _READERS
        else:
            raise TypeError(f"register_store needs a FeatureStore or FeatureStoreWriter subclass, got {cls!r}")
        old = table.get(name)
        same = old is not None and (old.__module__, old.__qualname__) == (cls.__module__, cls.__qualname__)
        if old is not None and not same and not replace:
            raise StoreError(f"storage type {name!r} is already registered to {old.__qualname__}; pass replace=True")
        table[name] = cls
        cls.storage_type = name
        if requires:
            _REQUIRES[name] = (requires, install_hint)
        return cls

    return decorate


def _load_builtin(name: str) -> None:
    if name in _BUILTIN and name not in _READERS:
        importlib.import_module(f".{_BUILTIN[name]}", __name__)


def available_stores(*, writable: bool = False) -> list[str]:
    """Registered storage type names, sorted; with ``writable``, only those with a writer
    (what :func:`export_feature_store` can produce)."""
    if writable:
        for name in _BUILTIN:
            _load_builtin(name)
        return sorted(_WRITERS)
    return sorted({*_BUILTIN, *_READERS})


@dataclass(frozen=True)
class StoreInfo:
    """One backend: whether its optional dependency is installed, and how to install it."""

    name: str
    available: bool
    writable: bool
    install_hint: str


def store_statuses() -> list[StoreInfo]:
    """:class:`StoreInfo` of every registered backend (lhotse's ``storage_backend_statuses``)."""
    available_stores(writable=True)  # imports the built-in backends
    infos = []
    for name in available_stores():
        module, hint = _REQUIRES.get(name, (None, ""))
        ok = module is None or importlib.util.find_spec(module) is not None
        infos.append(StoreInfo(name, ok, name in _WRITERS, "" if ok else hint))
    return infos


def _unknown(name: str, what: str, names: list[str]) -> UnknownStoreError:
    return UnknownStoreError(f"unknown {what} {name!r}; available: {', '.join(names)}")


def get_store_reader(name: str) -> type[FeatureStore]:
    """The reader class of a storage type.

    Raises:
        UnknownStoreError: ``name`` is not registered (the message lists the names that are).
    """
    _load_builtin(name)
    if name not in _READERS:
        raise _unknown(name, "storage type", available_stores())
    return _READERS[name]


def get_store_writer(name: str) -> type[FeatureStoreWriter]:
    """The writer class of a storage type.

    Raises:
        UnknownStoreError: ``name`` is not registered or has no writer (``sharded_parquet`` is
            written by the feature extraction); the message lists the writable names.
    """
    _load_builtin(name)
    if name not in _WRITERS:
        writable = available_stores(writable=True)
        if name in _READERS:
            raise UnknownStoreError(f"storage type {name!r} cannot be written by export; writable: {', '.join(writable)}")
        raise _unknown(name, "storage type", writable)
    return _WRITERS[name]


def open_feature_store(path: str | os.PathLike, *, frontend=None, **options) -> FeatureStore:
    """Open the feature store at ``path`` with the reader its metadata names.

    Args:
        path: a store folder (or its ``asr_assets_store.json``), or a split root of the Parquet
            cache, ``<output>/feature-cache/<split>``.
        frontend: name, Frontend or hash12. Needed for a Parquet cache whose parts do not name
            exactly one frontend; for other stores it is checked against the recorded hash.
        **options: passed to the reader (``copy=True`` for ``numpy_memmap``;
            ``record_cache=``, ``max_open_parts=`` ... for ``sharded_parquet``).

    Returns:
        A :class:`FeatureStore` (files opened on first use).

    Raises:
        StoreNotFoundError: nothing at ``path``, or a folder with neither a metadata file nor
            ``feature_shards/`` (e.g. an export that was interrupted).
        StoreCorruptError: the metadata file is not JSON or names no ``storage_type``.
        UnknownStoreError: its ``storage_type`` is not registered (the message lists those that are).
        StoreError: ``frontend`` differs from the store's, or a Parquet cache's frontend is ambiguous.
    """
    path = Path(path)
    if path.name == METADATA_NAME and path.is_file():
        path = path.parent
    if not path.is_dir():
        raise StoreNotFoundError(f"no feature store at {str(path)!r}: "
                                 + ("it is a file" if path.exists() else "it does not exist"))
    metadata = read_metadata(path)
    if metadata is None:
        if (path / "feature_shards").is_dir():
            return get_store_reader("sharded_parquet")(path, {}, frontend=frontend, **options)
        raise StoreNotFoundError(f"{str(path)!r} is not a feature store: it has no {METADATA_NAME} (written last, "
                                 "so an interrupted export has none: export again) and no feature_shards/ folder")
    storage_type = metadata["storage_type"]
    try:
        reader = get_store_reader(storage_type)
    except UnknownStoreError as exc:
        raise UnknownStoreError(f"{str(path / METADATA_NAME)!r} names storage type {storage_type!r}, which is not "
                                f"registered; available: {', '.join(available_stores())}") from exc
    if storage_type == "sharded_parquet":
        return reader(path, metadata, frontend=frontend, **options)
    if frontend is not None:
        from .sharded_parquet import _resolve_hash

        wanted = _resolve_hash(frontend)[1]
        if wanted != metadata.get("frontend_hash"):
            raise StoreError(f"{str(path)!r} holds frontend {metadata.get('frontend')!r} (hash "
                             f"{metadata.get('frontend_hash')}), not {frontend!r} (hash {wanted})")
    return reader(path, metadata, **options)


@dataclass(frozen=True)
class ExportSummary:
    """What :func:`export_feature_store` wrote.

    Attributes:
        path: the store folder.
        storage_type, frontend, frontend_hash: what it holds.
        written: utterances written.
        missing: utterances asked for that the cache had no features for (skipped).
        missing_examples: the first (up to 10) of them.
        nbytes: float32 bytes written.
        seconds: wall-clock time of the export.
    """

    path: Path
    storage_type: str
    frontend: str | None
    frontend_hash: str
    written: int
    missing: int
    missing_examples: tuple[str, ...]
    nbytes: int
    seconds: float


def _remove_stale_staging(target: Path) -> None:
    """Remove staging folders of exports to ``target`` whose process (on this host) is gone."""
    prefix = f".{target.name}{TMP_MARK}"
    for entry in target.parent.iterdir() if target.parent.is_dir() else ():
        owner = _tmp_owner(entry.name) if entry.name.startswith(prefix) else None
        if owner is not None and owner[0] == _HOST and not _pid_alive(owner[1]):
            shutil.rmtree(entry, ignore_errors=True)


def _resolve_output(frontend, output: str | None):
    """``(Frontend, extra store metadata)`` when a named output is exported, else ``(None, {})``;
    refuses what a float32 store cannot hold (see :func:`export_feature_store`)."""
    import numpy as np

    from ..errors import FeatureConfigError

    fe = frontend
    if isinstance(frontend, str):
        if len(frontend) == 12 and all(c in "0123456789abcdef" for c in frontend):
            if output is not None:
                raise StoreError(f"output={output!r} needs the frontend's name, not the hash12 {frontend!r}")
            return None, {}
        from ..frontends import get_frontend

        fe = get_frontend(frontend)
    if getattr(fe, "outputs", None) is None and output is None:
        return None, {}
    try:
        fe.check_output(output)
    except FeatureConfigError as exc:
        raise StoreError(f"cannot export: {exc} (--output-name)") from exc
    dtype = fe.outputs[output]
    if np.dtype(dtype).kind != "f":
        raise StoreError(f"cannot export output {output!r} of {fe.name!r}: it is {dtype}, and stores hold float32 "
                         "(num_frames, feature_dim); read it from the feature cache with "
                         "ShardedParquetFeatureCache.load(utterance_id, frontend, output=...)")
    return fe, {"output": output, "source_dtype": dtype}


def export_feature_store(split_root: str | os.PathLike, to: str | os.PathLike, *, backend: str, frontend,
                         utterance_ids: Iterable[str] | None = None, record_cache: str | os.PathLike | None = None,
                         batch_size: int = 256, output: str | None = None, **options) -> ExportSummary:
    """Write one frontend's features of a split from the Parquet cache into a new store.

    The store is built in a staging folder ``<parent>/.<name>.tmp.<host>-<pid>`` beside ``to``
    (its metadata file last) and renamed to ``to`` when complete, so ``to`` appears complete or
    not at all; on an error the staging folder is removed (a killed export's is removed by the
    next export to the same path).

    Args:
        split_root: ``<output>/feature-cache/<split>``.
        to: the new store's folder: must not exist, or be an empty folder.
        backend: a writable storage type (:func:`available_stores` with ``writable=True``).
        frontend: name, Frontend object or hash12 of the features to export.
        utterance_ids: the utterances, in store order; default: every record of ``record_cache``.
        record_cache: a record-cache JSONL; default ``<output>/record_cache/<split>.jsonl``.
        batch_size: utterances read from the cache at a time (reads grouped by part).
        output: for a frontend with named outputs (given as a name or Frontend), the one to
            export. Stores hold float32 ``(num_frames, feature_dim)``, so only a float output
            of 2-D arrays can be exported (float16 becomes float32 exactly); the store's
            metadata names it (``output``, ``source_dtype``) and its ``frontend_hash`` is the
            output's hash.
        **options: passed to the writer (e.g. ``max_shard_bytes`` for ``numpy_memmap``).

    Returns:
        :class:`ExportSummary`; utterances without features are counted in ``missing``.

    Raises:
        UnknownStoreError: ``backend`` is unknown or not writable.
        StoreNotFoundError: no Parquet cache at ``split_root``, or no record cache.
        StoreError: ``to`` is a file or a folder that is not empty; a frontend with named outputs
            without ``output``, an unknown or non-float output, ``output`` for a single-output
            frontend or a hash12.
    """
    from ..feature_cache import ShardedParquetFeatureCache
    from .sharded_parquet import _resolve_hash, default_record_cache, is_sharded_parquet_cache

    started = time.perf_counter()
    writer_class = get_store_writer(backend)
    split_root, to = Path(split_root), Path(os.path.abspath(to))
    if not is_sharded_parquet_cache(split_root):
        raise StoreNotFoundError(f"no feature cache at {str(split_root)!r} (no feature_shards/ folder): "
                                 "run asr-assets materialize first")
    if to.exists() and not to.is_dir():
        raise StoreError(f"cannot export to {str(to)!r}: it is a file")
    if to.is_dir() and any(to.iterdir()):
        raise StoreError(f"cannot export to {str(to)!r}: the folder is not empty (give a new or empty folder)")
    name, frontend_hash = _resolve_hash(frontend)
    fe, extra = _resolve_output(frontend, output)
    if fe is not None:
        frontend_hash = fe.output_hash(output)
    if utterance_ids is None:
        from ..record_cache import RecordStore

        source = Path(record_cache) if record_cache is not None else default_record_cache(split_root)
        if not source.is_file():
            raise StoreNotFoundError(f"no record cache at {str(source)!r} to take the utterance ids from")
        utterance_ids = (r["utterance_id"] for r in RecordStore(source))
    to.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(to)
    staging = to.parent / f".{to.name}{tmp_suffix()}"
    shutil.rmtree(staging, ignore_errors=True)
    cache = ShardedParquetFeatureCache(split_root)
    writer = None
    missing: list[str] = []
    try:
        writer = writer_class(staging, frontend=name, frontend_hash=frontend_hash,
                              extra_metadata={"source": str(split_root.resolve()), **extra}, **options)
        batch: list[str] = []
        for utterance_id in itertools.chain(utterance_ids, [None]):  # None: flush the last batch
            if utterance_id is not None:
                batch.append(utterance_id)
                if len(batch) < batch_size:
                    continue
            loaded = cache.load_many(batch, fe, output) if fe is not None else cache.load_many(batch, frontend_hash)
            for uid, features in zip(batch, loaded):
                if features is None:
                    missing.append(uid)
                    continue
                try:
                    writer.write(uid, features)
                except ValueError as exc:  # e.g. a width unlike the utterances before it
                    raise StoreCorruptError(f"cannot export {uid!r} from {str(split_root)!r}: {exc}") from exc
            batch = []
        writer.close()
        try:
            os.replace(staging, to)  # an empty folder at ``to`` is replaced; a non-empty one fails
        except OSError as exc:
            raise StoreError(f"cannot move the finished store into {str(to)!r}: {exc.strerror or exc}") from exc
        fsync_dir(to.parent)
    except BaseException:
        if writer is not None:
            writer.abort()
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        cache.close()
    return ExportSummary(to, writer.storage_type, name, frontend_hash, writer.num_utterances, len(missing),
                         tuple(missing[:10]), writer.nbytes, time.perf_counter() - started)
