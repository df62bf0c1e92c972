"""lhotse bridge: ``cut.load_features()`` reads the asr_assets feature cache.

Entry points:
    - :class:`ShardedParquetReader` — lhotse ``FeaturesReader`` registered as
      ``asr_assets_sharded_parquet``: ``storage_path`` is a split root of the Parquet cache
      (``<output>/feature-cache/<split>``), ``storage_key`` is ``"<utterance_id>:<hash12>"``
      (the preimage of the cache key, spec §3.2), read with
      ``ShardedParquetFeatureCache(storage_path).load(utterance_id, hash12)``.
    - :class:`FeatureStoreReader` — registered as ``asr_assets_store``: ``storage_path`` is any
      folder :func:`asr_assets.stores.open_feature_store` opens (an exported ``numpy_memmap`` or
      ``hdf5`` store, ...), ``storage_key`` the utterance id.
    - :func:`export_cuts` — write a lhotse ``CutSet`` manifest (``.jsonl.gz``) of a split whose
      ``Features`` point at the cache (``asr-assets export --backend lhotse``).
    - :func:`frame_shift_s` — a frontend's frame shift, from its exact frame count.
    - :func:`close_cached_stores` — release the readers this process opened.

**Importing this module registers the readers** (lhotse 1.33 has no entry-point mechanism for
storage backends: ``Features.load`` looks ``storage_type`` up in ``lhotse.features.io``'s
registry, which only ``@register_reader`` fills). A training script reading such a manifest
needs this one line, at the top level of the script (so DataLoader workers started with
``spawn`` import it too)::

    import asr_assets.bridges.lhotse  # noqa: F401  registers the asr_assets storage types

lhotse builds a new reader for every ``Features.load``; the readers here are thin and share one
opened cache or store per path, per process and per thread (lhotse's
``lookup_cache_or_open``; PyTorch DataLoader workers and lhotse's thread pools each open their
own files), so a load costs one cache lookup, not an open.

Needs lhotse (``pip install "asr_assets[lhotse]"``) and torch (lhotse's own dependency).
"""

from __future__ import annotations

import gzip
import json
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np

try:
    from lhotse import Features, MonoCut, Recording, SupervisionSegment
    from lhotse.features.io import FeaturesReader, register_reader
except ImportError as _exc:  # pragma: no cover - exercised only without lhotse
    raise ImportError('asr_assets.bridges.lhotse needs lhotse: pip install "asr_assets[lhotse]" '
                      "(or pip install lhotse)") from _exc

from .._fs import fsync_file, remove_stale_tmp, tmp_path_for
from ..data import FeaturesNotCachedError
from ..errors import ConfigError, FeatureConfigError
from ..feature_cache import ShardedParquetFeatureCache
from ..frontends import Frontend, get_frontend
from ..record_cache import RecordStore
from ..stores import FeatureStore, open_feature_store

__all__ = [
    "PARQUET_STORAGE_TYPE", "STORE_STORAGE_TYPE", "CutsSummary", "FeatureStoreReader", "ShardedParquetReader",
    "close_cached_stores", "export_cuts", "frame_shift_s",
]

#: ``Features.storage_type`` of cuts read from the sharded Parquet cache.
PARQUET_STORAGE_TYPE = "asr_assets_sharded_parquet"
#: ``Features.storage_type`` of cuts read from a store :func:`open_feature_store` opens.
STORE_STORAGE_TYPE = "asr_assets_store"
_HASH12 = re.compile(r"[0-9a-f]{12}")

_LOCAL = threading.local()  # .pid, .opened: {(storage_type, storage_path): cache or store}


def _opened(storage_type: str, storage_path: str):
    """The cache or store at ``storage_path``, opened once per process and thread."""
    if getattr(_LOCAL, "pid", None) != os.getpid():  # new thread, or a forked child: open anew
        _LOCAL.pid, _LOCAL.opened = os.getpid(), {}
    reader = _LOCAL.opened.get((storage_type, storage_path))
    if reader is None:
        if storage_type == PARQUET_STORAGE_TYPE:
            if not (Path(storage_path) / "feature_shards").is_dir():
                raise FileNotFoundError(f"no asr_assets feature cache at {storage_path!r} (no feature_shards/ "
                                        "folder): the manifest's storage_path must be a split root, "
                                        "<output>/feature-cache/<split>")
            reader = ShardedParquetFeatureCache(storage_path)
        else:
            reader = open_feature_store(storage_path)
        _LOCAL.opened[(storage_type, storage_path)] = reader
    return reader


def close_cached_stores() -> None:
    """Close the caches and stores this thread of this process opened (lhotse's
    ``close_cached_file_handles``); the next load opens them again."""
    for reader in getattr(_LOCAL, "opened", {}).values():
        reader.close()
    _LOCAL.pid, _LOCAL.opened = os.getpid(), {}


def _trimmed(features: np.ndarray, left_offset_frames: int, right_offset_frames: Optional[int]) -> np.ndarray:
    """Rows ``[left, right)`` (lhotse's partial read; time is the first axis) as a writable
    float32 array (a memory-mapped store's read-only view is copied)."""
    part = features[left_offset_frames:right_offset_frames]
    if part.dtype != np.float32 or not part.flags.writeable:
        part = np.array(part, dtype=np.float32)
    return part


@register_reader
class ShardedParquetReader(FeaturesReader):
    """Reads ``Features`` stored in the sharded Parquet cache (``storage_type``
    ``asr_assets_sharded_parquet``).

    Args:
        storage_path: the split root, ``<output>/feature-cache/<split>``.

    ``read(storage_key, left_offset_frames, right_offset_frames)`` returns float32
    ``(num_frames, num_features)``, rows ``[left, right)``.

    Raises (from ``read``):
        ValueError: ``storage_key`` is not ``"<utterance_id>:<hash12>"``.
        FileNotFoundError: ``storage_path`` is no split root of the cache.
        FeaturesNotCachedError: the cache holds no features for the key (not computed, or
            tombstoned since the manifest was written).
    """

    name = PARQUET_STORAGE_TYPE

    def __init__(self, storage_path, *args, **kwargs):
        super().__init__()
        self.storage_path = str(storage_path)

    def read(self, key: str, left_offset_frames: int = 0, right_offset_frames: Optional[int] = None) -> np.ndarray:
        utterance_id, sep, frontend_hash = key.rpartition(":")
        if not sep or not utterance_id or not _HASH12.fullmatch(frontend_hash):
            raise ValueError(f"storage_key {key!r} of {self.name} is not '<utterance_id>:<hash12>'")
        features = _opened(self.name, self.storage_path).load(utterance_id, frontend_hash)
        if features is None:
            raise FeaturesNotCachedError(
                f"no features of frontend hash {frontend_hash} for utterance {utterance_id!r} in the feature cache "
                f"{self.storage_path!r} (storage_key {key!r}): materialize them, or export the manifest again",
                utterance_id=utterance_id, frontend=frontend_hash, location=self.storage_path)
        return _trimmed(features, left_offset_frames, right_offset_frames)


@register_reader
class FeatureStoreReader(FeaturesReader):
    """Reads ``Features`` from any store :func:`asr_assets.stores.open_feature_store` opens
    (``storage_type`` ``asr_assets_store``; the store's own metadata picks its backend).

    Args:
        storage_path: the store's folder.

    ``read(storage_key, left_offset_frames, right_offset_frames)``: ``storage_key`` is the
    utterance id; returns float32 ``(num_frames, num_features)``, rows ``[left, right)``.

    Raises (from ``read``):
        StoreError: the folder is no store (``StoreNotFoundError``) or is damaged.
        FeaturesNotCachedError: the store holds no features for the utterance.
    """

    name = STORE_STORAGE_TYPE

    def __init__(self, storage_path, *args, **kwargs):
        super().__init__()
        self.storage_path = str(storage_path)

    def read(self, key: str, left_offset_frames: int = 0, right_offset_frames: Optional[int] = None) -> np.ndarray:
        store = _opened(self.name, self.storage_path)
        features = store.load(key)
        if features is None:
            raise FeaturesNotCachedError(f"no features for utterance {key!r} in the store {self.storage_path!r}",
                                         utterance_id=key, frontend=store.metadata.get("frontend"),
                                         location=self.storage_path)
        return _trimmed(features, left_offset_frames, right_offset_frames)


# ------------------------------------------------------------------------------------ export

def frame_shift_s(frontend: Frontend) -> float:
    """Seconds between consecutive frames of ``frontend``: from its exact frame count
    (:meth:`Frontend.num_frames` of 1 s and 3 s of audio), else, for frontends that pad to a
    fixed length (the Ludwig types), from its config's ``window_shift_in_s`` or ``hop_length``
    (samples). 0.01 for ``squeezeformer``/``zipformer``, 0.02 for ``w2v-bert`` and ``ludwig-fbank``.

    Raises:
        FeatureConfigError: no shift is found that is a whole number of samples (lhotse needs
            ``frame_shift * sampling_rate`` to be an integer), e.g. ``ludwig-raw``.
    """
    rate = int(frontend.sample_rate)
    frames = frontend.num_frames(3 * rate) - frontend.num_frames(rate)
    hop = 2 * rate / frames if frames > 0 else 0.0
    if not (hop > 0 and hop == int(hop)):
        config = frontend.config_dict()
        if isinstance(config.get("window_shift_in_s"), (int, float)):
            hop = config["window_shift_in_s"] * rate
        elif isinstance(config.get("hop_length"), int):
            hop = config["hop_length"]
        hop = round(hop, 9)
    if not (hop > 0 and hop == int(hop)):
        raise FeatureConfigError(f"frontend {frontend.name!r} has no fixed frame shift of whole samples (1 s -> "
                                 f"{frontend.num_frames(rate)} frames, 3 s -> {frontend.num_frames(3 * rate)}, no "
                                 "window_shift_in_s or hop_length in its config), which lhotse needs")
    return int(hop) / rate


@dataclass(frozen=True)
class CutsSummary:
    """What :func:`export_cuts` wrote.

    Attributes:
        path: the manifest.
        storage_type, storage_path: where its ``Features`` point.
        frontend, frontend_hash: whose features.
        written: cuts written (one per utterance with features, in record order).
        missing: records without features (skipped); missing_examples: the first 10 of them.
        without_recording: cuts written without a ``Recording`` (no audio file lhotse can read).
        seconds: wall-clock time of the export.
    """

    path: Path
    storage_type: str
    storage_path: str
    frontend: str
    frontend_hash: str
    written: int
    missing: int
    missing_examples: tuple[str, ...]
    without_recording: int
    seconds: float


def _recording(record: dict, sample_rate_hz: int) -> Recording | None:
    """A ``Recording`` of the record's audio as lhotse reads it (its file's own rate and channels,
    resampled to the frontend's rate), or None when lhotse cannot read it (gone, a URL, a format
    no installed lhotse backend reads)."""
    source = record.get("audio_blob_abspath") or record.get("audio_path")
    if not source or "://" in source or not os.path.isfile(source):
        return None
    try:
        recording = Recording.from_file(os.path.abspath(source), recording_id=record["utterance_id"])
    except Exception:  # lhotse raises whatever its backends raise; the cut is written without audio
        return None
    return recording if recording.sampling_rate == sample_rate_hz else recording.resample(sample_rate_hz)


def _cut(record: dict, features: np.ndarray, *, frontend: Frontend, shift: float, storage_type: str,
         storage_path: str, storage_key: str) -> MonoCut:
    uid = record["utterance_id"]
    num_frames, num_features = (int(n) for n in features.shape)
    # The cut lasts exactly its frames, so lhotse's compute_num_frames(duration) gives them all back
    # (the audio's own duration can be up to one frame shorter: center-padded frames).
    duration = num_frames * shift
    recording = _recording(record, frontend.sample_rate)
    spoken = int(record.get("num_samples") or 0) / 16000 or duration  # num_samples is at 16 kHz
    return MonoCut(
        id=uid, start=0.0, duration=duration, channel=0, recording=recording,
        features=Features(type=frontend.name, num_frames=num_frames, num_features=num_features, frame_shift=shift,
                          sampling_rate=frontend.sample_rate, start=0.0, duration=duration,
                          storage_type=storage_type, storage_path=storage_path, storage_key=storage_key,
                          recording_id=uid, channels=0),
        supervisions=[SupervisionSegment(id=uid, recording_id=uid, start=0.0, duration=min(spoken, duration),
                                         channel=0, text=record.get("transcript"), speaker=record.get("speaker_id"))],
    )


def _batches(items: Iterable[dict], size: int) -> Iterator[list[dict]]:
    batch: list[dict] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def export_cuts(split_root: str | os.PathLike, to: str | os.PathLike, *, frontend: str | Frontend = "squeezeformer",
                record_cache: str | os.PathLike | None = None, store: str | os.PathLike | None = None,
                batch_size: int = 256) -> CutsSummary:
    """Write a lhotse ``CutSet`` manifest of one split whose ``Features`` point at our features.

    One ``MonoCut`` per record that has features, in record order: id = utterance id;
    ``duration`` = ``num_frames * frame_shift`` (so ``cut.num_frames`` is the stored frame count
    and ``cut.load_features()`` returns the stored array whole; it is up to one frame longer
    than the audio); ``features`` with the frontend's name as ``type``, its frame shift
    (:func:`frame_shift_s`) and rate, ``storage_type`` ``asr_assets_sharded_parquet``
    (``storage_path`` = the absolute split root, ``storage_key`` = ``"<utterance_id>:<hash12>"``)
    or, with ``store``, ``asr_assets_store`` (``storage_path`` = the store, ``storage_key`` = the
    utterance id); one supervision over the audio with ``text`` = the record's transcript and
    ``speaker`` = its speaker id; a ``recording`` of the audio file (or the record's audio blob)
    as lhotse reads it, resampled to the frontend's rate when the file's differs, when lhotse can
    read it. Features are computed from the mono average of all channels; ``cut.load_audio()``
    of a multi-channel file gives channel 0.

    Every feature matrix is read once (to learn its shape and skip utterances without
    features). The manifest is written to a temporary file beside ``to``, synced and renamed.

    Args:
        split_root: ``<output>/feature-cache/<split>``.
        to: the manifest file, ``*.jsonl.gz`` (gzip) or ``*.jsonl``; must not exist.
        frontend: name or :class:`Frontend` (not a bare hash12: the frame shift comes from it).
        record_cache: the split's record-cache JSONL; default ``<output>/record_cache/<split>.jsonl``.
        store: point the cuts at this exported store (read instead of the Parquet cache).
        batch_size: utterances read at a time.

    Returns:
        :class:`CutsSummary`; records without features are counted in ``missing``.

    Raises:
        ConfigError: ``to`` exists or has another suffix; ``frontend`` is a hash12; no record
            cache or no feature cache.
        StoreError: ``store`` is no store, or holds another frontend's features.
    """
    started = time.perf_counter()
    to = Path(os.path.abspath(to))
    if not to.name.endswith((".jsonl.gz", ".jsonl")):
        raise ConfigError(f"the lhotse manifest {str(to)!r} must be named *.jsonl.gz (or *.jsonl), the suffixes "
                          "lhotse's load_manifest reads")
    if to.exists():
        raise ConfigError(f"{str(to)!r} exists: give a new file name (or remove it first)")
    if isinstance(frontend, str):
        if _HASH12.fullmatch(frontend):
            raise ConfigError(f"a lhotse export needs the frontend by name, not the hash {frontend!r} "
                              "(the frame shift comes from the frontend)")
        frontend = get_frontend(frontend)
    frontend_hash, shift = frontend.frontend_hash(), frame_shift_s(frontend)
    split_root = Path(os.path.abspath(split_root))
    if record_cache is None:
        from ..stores.sharded_parquet import default_record_cache

        record_cache = default_record_cache(split_root)
    if not Path(record_cache).is_file():
        raise ConfigError(f"no record cache at {str(record_cache)!r} to take the utterances from")
    if store is not None:
        reader: FeatureStore | ShardedParquetFeatureCache = open_feature_store(store, frontend=frontend_hash)
        storage_type, storage_path = STORE_STORAGE_TYPE, str(Path(os.path.abspath(store)))
        load_many = reader.load_many
        key_of = str
    else:
        if not (split_root / "feature_shards").is_dir():
            raise ConfigError(f"no feature cache at {str(split_root)!r} (no feature_shards/ folder): "
                              "run asr-assets materialize first")
        reader = ShardedParquetFeatureCache(split_root)
        storage_type, storage_path = PARQUET_STORAGE_TYPE, str(split_root)
        load_many = lambda ids: reader.load_many(ids, frontend_hash)  # noqa: E731
        key_of = lambda uid: f"{uid}:{frontend_hash}"  # noqa: E731
    to.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(to.parent, prefix=to.name)
    tmp = tmp_path_for(to)
    written, without_recording, missing = 0, 0, []
    try:
        with open(tmp, "wb") as raw:
            out = gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") if to.name.endswith(".gz") else raw
            for batch in _batches(RecordStore(record_cache), batch_size):
                for record, features in zip(batch, load_many([r["utterance_id"] for r in batch])):
                    if features is None or features.shape[0] == 0:
                        missing.append(record["utterance_id"])
                        continue
                    cut = _cut(record, features, frontend=frontend, shift=shift, storage_type=storage_type,
                               storage_path=storage_path, storage_key=key_of(record["utterance_id"]))
                    without_recording += cut.recording is None
                    out.write((json.dumps(cut.to_dict(), ensure_ascii=False) + "\n").encode("utf-8"))
                    written += 1
            if out is not raw:
                out.close()
        fsync_file(tmp)
        os.replace(tmp, to)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        reader.close()
    return CutsSummary(to, storage_type, storage_path, frontend.name, frontend_hash, written, len(missing),
                       tuple(missing[:10]), without_recording, time.perf_counter() - started)
