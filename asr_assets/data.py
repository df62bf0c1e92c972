"""PyTorch readers for training: a feature dataset, a length-bucketing batch sampler, a padding collate.

Entry points (all need the optional ``torch`` extra: ``pip install -e ".[torch]"``):
    - :class:`FeatureDataset` — a map-style ``torch.utils.data.Dataset`` over one split of an
      output root: cached features (``"eager"``, Ludwig's name for preloaded/precomputed
      features), features computed from the audio every time (``"lazy"``), or read with
      compute-and-write-back on a miss (``"lazy_cached"``); or any exported store (``store=``).
    - :class:`DynamicBucketingSampler` — batches of similar length, bounded in total frames,
      from the record cache's ``estimated_frames`` sidecar alone (after lhotse's sampler of
      that name), deterministic per seed and epoch, sharded across DDP ranks.
    - :func:`collate_padded` — zero-padded ``[B, T_max, D]`` features with their lengths.
    - :class:`FeaturesNotCachedError`, :class:`FeatureComputeError`.

Typical use::

    from torch.utils.data import DataLoader
    from asr_assets.data import DynamicBucketingSampler, FeatureDataset, collate_padded

    dataset = FeatureDataset("artifacts", "train", frontend="squeezeformer", mode="eager")
    sampler = DynamicBucketingSampler(dataset, max_frames=20_000, shuffle=True, seed=0)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_padded, num_workers=4)
    for epoch in range(10):
        sampler.set_epoch(epoch)
        for batch in loader:
            batch["features"]          # float32 [B, T_max, 80], zero padded
            batch["feature_lengths"]   # int64 [B], frames

Nothing in the core library imports this module, so ``asr-assets`` and the Dagster graph never
need torch. Everything here pickles without open files (the record store holds arrays and a
path, the feature cache drops its open parts when pickled), so ``DataLoader(num_workers>0)``
workers open what they read themselves.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

try:
    import torch
    from torch.utils.data import Dataset, Sampler
except ImportError as _exc:  # pragma: no cover - exercised by a subprocess test
    raise ImportError(
        'asr_assets.data needs PyTorch, which is an optional extra: pip install -e ".[torch]" '
        "(or pip install torch); the rest of asr_assets works without it"
    ) from _exc

import numpy as np

from .audio import DecodeConfig, SegmentReader, load_audio
from .errors import AsrAssetsError
from .feature_cache import (
    DEFAULT_NUM_SHARDS,
    ShardWriter,
    ShardedParquetFeatureCache,
    cache_key,
    encode_features,
    output_keys,
    part_metadata,
    shard_index,
    shard_lock,
)
from .frontends import Frontend, get_frontend
from .record_cache import RecordStore
from .settings import Settings

__all__ = [
    "MODES",
    "DynamicBucketingSampler",
    "FeatureComputeError",
    "FeatureDataset",
    "FeaturesNotCachedError",
    "collate_padded",
]

#: ``FeatureDataset`` modes.
MODES = ("eager", "lazy", "lazy_cached")


class FeaturesNotCachedError(AsrAssetsError, LookupError):
    """An utterance has no features in the cache (or store) that an ``"eager"`` read requires.

    Attributes:
        utterance_id: the utterance.
        frontend: the frontend name (its hash is in the message).
        location: the feature cache folder (``<output>/feature-cache/<split>``) or the store's repr.

    Constructible from the message alone, so a DataLoader worker can re-raise it in the main
    process under its own type.
    """

    def __init__(self, message: str, utterance_id: str | None = None, frontend: str | None = None,
                 location: str | None = None):
        super().__init__(message)
        self.utterance_id = utterance_id
        self.frontend = frontend
        self.location = location

    def __reduce__(self):
        return type(self), (str(self), self.utterance_id, self.frontend, self.location)


class FeatureComputeError(AsrAssetsError):
    """Features of an utterance could not be computed from its audio (``"lazy"`` modes).

    ``stage`` is ``"decode"`` (no audio source, undecodable, or not the record's duration) or
    ``"featurize"`` (too short for one frame, the frontend failed, wrong shape, non-finite
    values): the same verdicts the extractor reports in ``reports/<frontend>/<split>/``.
    """

    def __init__(self, message: str, utterance_id: str | None = None, stage: str | None = None):
        super().__init__(message)
        self.utterance_id = utterance_id
        self.stage = stage

    def __reduce__(self):
        return type(self), (str(self), self.utterance_id, self.stage)


_THREADS_LIMITED_IN: int | None = None  # pid of the DataLoader worker whose BLAS pools were limited


def _limit_threads_in_worker() -> None:
    """One BLAS/OpenMP thread in a DataLoader worker that computes features (as the extractor's
    workers; torch itself sets one intra-op thread there). The main process is left alone."""
    global _THREADS_LIMITED_IN
    if _THREADS_LIMITED_IN == os.getpid() or torch.utils.data.get_worker_info() is None:
        return
    import threadpoolctl

    threadpoolctl.threadpool_limits(limits=1)
    _THREADS_LIMITED_IN = os.getpid()


def _as_tensor(features) -> torch.Tensor:
    """A tensor of a named output's own dtype (float16, int32 ...) owning writable memory."""
    if isinstance(features, torch.Tensor):
        return features.detach().contiguous()
    array = np.asarray(features)
    if not array.flags.c_contiguous or not array.flags.writeable or isinstance(array, np.memmap):
        array = np.array(array, order="C", copy=True)
    return torch.from_numpy(array)


def _as_float32_tensor(features) -> torch.Tensor:
    """``[frames, dims]`` float32 tensor owning writable memory (memmaps and read-only arrays are copied)."""
    if isinstance(features, torch.Tensor):
        return features.detach().to(torch.float32).contiguous()
    array = np.asarray(features)
    if array.dtype != np.float32 or not array.flags.c_contiguous or not array.flags.writeable \
            or isinstance(array, np.memmap):
        array = np.array(array, dtype=np.float32, order="C", copy=True)
    return torch.from_numpy(array)


class FeatureDataset(Dataset):
    """One split of an output root as a map-style dataset of feature matrices.

    ``dataset[i]`` is the ``i``-th record of ``<output>/record_cache/<split>.jsonl`` (record
    cache order) as a dict:

    ============== ======================================================================
    key            value
    ============== ======================================================================
    utterance_id   str
    features       ``torch.float32 [frames, dims]`` (dims = the frontend's feature_dim;
                   frames of 10 ms for the log-mel frontends, 20 ms for ``w2v-bert``); for a
                   frontend with named outputs, the output ``output`` with its own dtype and
                   shape (e.g. ``torch.float16 [frames, 768]``, ``torch.int32 [frames]``)
    num_frames     int, ``features.shape[0]``
    transcript     str (normalized, as in the record cache)
    speaker_id     str or None
    ============== ======================================================================

    Modes:
        ``"eager"`` (Ludwig's name): cached features only, read from
            ``<output>/feature-cache/<split>`` (the sharded Parquet cache); a miss raises
            :class:`FeaturesNotCachedError` naming the utterance, the frontend and the cache path.
        ``"lazy"``: decoded from the record's audio (:func:`asr_assets.audio.load_audio`; for a
            segment record only the segment, seeking in the long file) and
            computed by the frontend on every access, never written. The code path is the
            extractor's, so the result equals the cached features bit for bit.
        ``"lazy_cached"``: read from the cache; a miss is computed as in ``"lazy"`` and written
            back so later reads (the next epoch, other workers, other datasets) find it. The
            write is a new part under the shard's writer lock
            (:func:`asr_assets.feature_cache.shard_lock`) with the extractor's part metadata, so
            ``keys()``, the asset checks and ``asr-assets compact`` treat it as that frontend's
            features. The key is looked up again under the lock, so concurrent DataLoader
            workers (or trainings, or an extraction run) write it once. Computing happens
            outside the lock: two processes that miss the same utterance at the same moment may
            both compute it, but only the first writes. Each write is one part per shard touched
            by a batch (see :meth:`__getitems__`): after a first epoch that computed much, run
            ``asr-assets compact`` to merge the small parts.

    Named outputs: a frontend registered with ``outputs=`` stores several arrays per utterance;
    ``output=`` picks the one ``features`` holds (one dataset per output: zip two datasets of
    the same split, whose indexes are the same records, to read features and tokens). The lazy
    modes compute every output once per miss and ``"lazy_cached"`` writes all of them back
    together (one part, the frontend key's shard), as the extractor does.

    Args:
        output_root: the ``--output`` folder of ``asr-assets materialize``.
        split: ``"train"``, ``"validation"`` or ``"test"``.
        frontend: registry name (plugins must be imported first) or a
            :class:`asr_assets.frontends.Frontend` (e.g. with overrides); its hash keys the cache.
        mode: one of :data:`MODES`.
        store: an object with ``load(utterance_id) -> array [frames, dims] | None`` (e.g. an
            exported numpy-memmap or HDF5 store) read instead of the Parquet cache, with
            ``"eager"`` semantics (None or ``KeyError`` is a miss). It must pickle for
            ``num_workers > 0`` (open its files lazily). Only with ``mode="eager"``.
        num_shards: shards of the feature cache (64 unless it was written with another count).
        decode_config: decoding options of the lazy modes (default: the extractor's defaults,
            FFmpeg fallback on, audio over 60 s refused).
        duration_tolerance: relative mismatch allowed between the decoded audio and the
            record's duration (plus 0.5 s), as the extractor's; None disables the check.
        output: for a frontend with named outputs, the output ``features`` holds (required
            there); None for single-output frontends.

    Raises:
        FileNotFoundError: the split has no record cache under ``output_root``.
        ValueError: unknown ``mode``, ``store`` with a mode other than ``"eager"`` or with
            ``output``.
        FeatureConfigError: ``output`` missing for a frontend with named outputs (the message
            lists them), unknown, or given for a single-output frontend.
        UnknownFrontendError: ``frontend`` is not a registered name.

    ``__getitem__`` raises :class:`FeaturesNotCachedError` (eager, store) or
    :class:`FeatureComputeError` (lazy modes), ``IndexError`` outside ``[-len, len)``.

    The dataset holds no open file: the record cache's sidecars are arrays, the feature cache
    opens parts lazily (per DataLoader worker) and pickles without them.
    """

    def __init__(self, output_root: str | os.PathLike, split: str, frontend: str | Frontend = "squeezeformer",
                 mode: str = "eager", store: Any = None, *, num_shards: int = DEFAULT_NUM_SHARDS,
                 decode_config: DecodeConfig | None = None, duration_tolerance: float | None = 0.1,
                 output: str | None = None):
        if mode not in MODES:
            raise ValueError(f"unknown FeatureDataset mode {mode!r}; use one of {', '.join(MODES)}")
        if store is not None and mode != "eager":
            raise ValueError(f"store= is read with eager semantics; mode {mode!r} cannot be combined with it")
        if store is not None and output is not None:
            raise ValueError("store= holds one array per utterance; output= selects a named output of the feature cache")
        if store is not None and not callable(getattr(store, "load", None)):
            raise TypeError(f"store must have a load(utterance_id) method, got {type(store).__name__}")
        settings = Settings(output=str(output_root))
        self.output_root = settings.output_path
        self.split = split
        self.mode = mode
        self.store = store
        record_path = settings.record_cache_path(split)
        if not (settings.output_is_remote or record_path.is_file()):  # a remote store: RecordStore checks its commit
            raise FileNotFoundError(
                f"no record cache for split {split!r} at {str(record_path)!r}: run "
                f"`asr-assets materialize --output {self.output_root}` first")
        self.records = RecordStore(record_path)
        self.frontend = get_frontend(frontend) if isinstance(frontend, str) else frontend
        self.frontend_hash = self.frontend.frontend_hash()
        self.output = self.frontend.check_output(output) if store is None else None
        self.feature_root = settings.feature_split_root(split)
        self.num_shards = num_shards
        self.cache = ShardedParquetFeatureCache(self.feature_root, num_shards)
        self.decode_config = decode_config or DecodeConfig(ffmpeg_fallback=True, max_duration_s=60.0)
        self.duration_tolerance = duration_tolerance

    # -- metadata ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.records)

    @property
    def estimated_frames(self) -> np.ndarray:
        """uint32 ``[len(self)]``: the record cache's ``estimated_frames`` sidecar
        (``max(num_samples, 400) // 160 + 1``, 10 ms frames whatever the frontend), read once,
        no feature access. :class:`DynamicBucketingSampler` batches by it."""
        values = self.records.sidecars.get("estimated_frames")
        if values is None:  # pragma: no cover - RecordStore requires the sidecar through its validity rule
            raise FileNotFoundError(f"{self.records.path} has no estimated_frames sidecar")
        return values

    def __repr__(self) -> str:
        source = f"store={self.store!r}" if self.store is not None else f"cache={str(self.feature_root)!r}"
        return (f"FeatureDataset(split={self.split!r}, records={len(self)}, frontend={self.frontend.name!r} "
                f"({self.frontend_hash}), mode={self.mode!r}, {source})")

    def part_metadata(self) -> dict:
        """The Parquet key-value metadata the extractor writes on its parts (and lazy_cached on its)."""
        return part_metadata(self.frontend)

    # -- items --------------------------------------------------------------------------------
    def __getitem__(self, index: int) -> dict:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict]:
        """Items of several indexes (the DataLoader calls this with a whole batch): cache reads
        grouped by part, and in ``"lazy_cached"`` one write (one lock, one part) per shard."""
        records = [self.records[int(i)] for i in indices]
        features = self._features(records)
        tensor = _as_float32_tensor if self.output is None else _as_tensor
        return [{"utterance_id": r["utterance_id"], "features": tensor(f), "num_frames": int(f.shape[0]),
                 "transcript": r["transcript"], "speaker_id": r.get("speaker_id")}
                for r, f in zip(records, features)]

    def _features(self, records: list[dict]) -> list:
        ids = [r["utterance_id"] for r in records]
        if self.store is not None:
            return [self._from_store(uid) for uid in ids]
        if self.mode == "lazy":
            return [self._selected(self.compute(r)) for r in records]
        found = self.cache.load_many(ids, frontend=self.frontend if self.output else self.frontend_hash,
                                     output=self.output)
        if self.mode == "eager":
            for uid, feats in zip(ids, found):
                if feats is None:
                    raise self._missing(uid, f"the feature cache {str(self.feature_root)!r}", str(self.feature_root))
            return found
        return self._fill_and_write_back(records, found)

    def _missing(self, uid: str, where: str, location: str) -> FeaturesNotCachedError:
        return FeaturesNotCachedError(
            f"no {self.frontend.name!r} features (frontend hash {self.frontend_hash}) for utterance {uid!r} "
            f"of split {self.split!r} in {where}; run `asr-assets materialize --output {self.output_root} "
            f"--frontend {self.frontend.name}` or read with mode='lazy_cached'",
            utterance_id=uid, frontend=self.frontend.name, location=location)

    def _from_store(self, uid: str):
        try:
            feats = self.store.load(uid)
        except KeyError:
            feats = None
        if feats is None:
            raise self._missing(uid, f"store {self.store!r}", repr(self.store))
        return feats

    def _selected(self, computed):
        """The array ``features`` holds, of what :meth:`compute` returned."""
        return computed if self.output is None else computed[self.output]

    def compute(self, record: dict):
        """float32 ``[frames, dims]`` of a record (a :class:`RecordStore` item) from its audio:
        the extractor's decode, checks and frontend call. Never writes. For a frontend with
        named outputs: every output, ``{name: array of its dtype}`` (checked as the extractor does).

        Raises:
            FeatureComputeError: naming the utterance, its audio and the stage.
        """
        _limit_threads_in_worker()
        fe = self.frontend
        uid = record["utterance_id"]
        source = record.get("audio_blob_abspath") or record.get("audio_path")

        def fail(stage: str, reason: str) -> FeatureComputeError:
            return FeatureComputeError(f"cannot compute {fe.name!r} features of utterance {uid!r} ({source}): "
                                       f"{stage}: {reason}", utterance_id=uid, stage=stage)

        if source is None:
            raise fail("decode", "record has neither audio_path nor audio_blob_path")
        try:
            if record.get("offset_seconds") is not None:  # a segment of a long recording: only it is decoded
                reader = self.__dict__.get("_segments")
                if reader is None:  # per process (pickles without open files): the last 4 files stay open
                    reader = self._segments = SegmentReader(max_open=4)
                samples = load_audio(source, hint=record.get("audio_path"), config=self.decode_config,
                                     target_rate=fe.sample_rate, offset_s=record["offset_seconds"],
                                     duration_s=record.get("duration_seconds"), reader=reader)
            else:
                samples = load_audio(source, hint=record.get("audio_path"), config=self.decode_config,
                                     target_rate=fe.sample_rate)
        except Exception as exc:
            raise fail("decode", f"{type(exc).__name__}: {exc}") from exc
        expected_16k = int(record.get("num_samples") or 0)
        if self.duration_tolerance is not None and expected_16k:
            expected = expected_16k * fe.sample_rate / 16000
            if abs(len(samples) - expected) > max(0.5 * fe.sample_rate, self.duration_tolerance * expected):
                raise fail("decode", f"decoded {len(samples) / fe.sample_rate:.2f} s but the record says "
                                     f"{expected / fe.sample_rate:.2f} s")
        if len(samples) < fe.min_num_samples:
            raise fail("featurize", f"{len(samples)} samples at {fe.sample_rate} Hz < {fe.min_num_samples} "
                                    f"needed for one frame")
        try:
            features = fe(samples, fe.sample_rate)
            if fe.outputs is not None:
                return fe.check_outputs(features)
        except Exception as exc:
            raise fail("featurize", f"{type(exc).__name__}: {exc}") from exc
        if features.ndim != 2 or features.shape[0] == 0 or features.shape[1] != fe.feature_dim:
            raise fail("featurize", f"implausible feature shape {features.shape} (want [frames>0, {fe.feature_dim}])")
        if not np.isfinite(features).all():
            raise fail("featurize", f"{int((~np.isfinite(features)).sum())} non-finite feature values")
        return np.ascontiguousarray(features, dtype=np.float32)

    def _fill_and_write_back(self, records: list[dict], found: list) -> list:
        """lazy_cached: compute the misses, write them back (grouped by shard), then raise the
        first compute failure, if any (what was computed is written first)."""
        results = list(found)
        pending: dict[int, dict[str, np.ndarray]] = {}
        error: FeatureComputeError | None = None
        for i, (record, feats) in enumerate(zip(records, found)):
            if feats is not None:
                continue
            try:
                computed = self.compute(record)
            except FeatureComputeError as exc:
                error = error or exc
                continue
            results[i] = self._selected(computed)
            key = cache_key(record["utterance_id"], self.frontend_hash)
            rows = pending.setdefault(shard_index(key, self.num_shards), {})
            if self.output is None:
                rows[key] = computed
            else:  # every named output, in the frontend key's shard (they are written together)
                keys = output_keys(record["utterance_id"], self.frontend)
                rows.update((keys[name], array) for name, array in computed.items())
        for shard in sorted(pending):
            self._write_back(shard, pending[shard])
        if error is not None:
            raise error
        return results

    def _write_back(self, shard: int, rows: dict[str, np.ndarray]) -> int:
        """Write the rows still missing from ``shard`` as one part, under the shard's lock.

        The key check is repeated under the lock on a freshly listed shard, so a row another
        worker (or an extraction run, which holds the lock for its whole run) wrote meanwhile is
        not written again. Returns the rows written.
        """
        with shard_lock(self.feature_root, shard, self.frontend_hash):
            self.cache.refresh(shard)
            present = self.cache.shard_entries(shard)
            todo = [(key, feats) for key, feats in rows.items() if present.get(key) is None]
            if todo:
                # many small write-backs: readers index the new parts from their footers, the
                # persisted shard index is brought up to date by the next extraction/compaction
                writer = ShardWriter(self.feature_root, shard, rows_per_part=len(todo), metadata=self.part_metadata(),
                                     update_index=False)
                for key, feats in todo:
                    if self.output is None:
                        writer.add(key, feats)
                    else:
                        writer.add_payload(key, encode_features(feats))
                writer.close()
        self.cache.refresh(shard)  # our own part is visible to the next read
        return len(todo)


def collate_padded(items: Sequence[dict]) -> dict:
    """Stack :class:`FeatureDataset` items into a zero-padded batch.

    Args:
        items: dicts with ``features`` (float32 ``[frames, dims]``, the same ``dims`` for all;
            or a named output's tensors: one dtype for all, ``[frames]`` or ``[frames, dims]``),
            ``utterance_id``, ``transcript`` and optionally ``speaker_id``.

    Returns:
        ``{"features": float32 [B, T_max, D] (frames past an item's length are 0),
        "feature_lengths": int64 [B] (frames), "utterance_ids": list[str],
        "transcripts": list[str], "speaker_ids": list[str | None]}``, in input order. When every
        ``features`` is a tensor (as :class:`FeatureDataset` gives) the batch keeps their dtype
        (a named output's float16, int32 ...) and 1-D ones give ``[B, T_max]``; other arrays are
        converted to float32 and must be 2-D.

    Raises:
        ValueError: no items, or features that are not 2-D or differ in ``dims``, or (named
            outputs) differ in dtype or trailing shape.
    """
    if not items:
        raise ValueError("collate_padded needs at least one item")
    raw = [item["features"] for item in items]
    keep = all(isinstance(f, torch.Tensor) for f in raw)  # dataset items: keep their dtype (named outputs)
    feats = [_as_tensor(f) for f in raw] if keep else [_as_float32_tensor(f) for f in raw]
    shapes_ok = {(f.dtype, tuple(f.shape[1:])) for f in feats}
    if len(shapes_ok) != 1 or any(f.ndim not in ((1, 2) if keep else (2,)) for f in feats):
        shapes = ", ".join(f"{item['utterance_id']!r}: {tuple(f.shape)} {f.dtype}" for item, f in zip(items, feats))
        raise ValueError(f"collate_padded needs 2-D [frames, dims] features of one dims (named outputs: one "
                         f"dtype and trailing shape); got {shapes}")
    lengths = torch.tensor([f.shape[0] for f in feats], dtype=torch.int64)
    out = torch.zeros((len(feats), int(lengths.max()), *feats[0].shape[1:]), dtype=feats[0].dtype)
    for row, f in enumerate(feats):
        out[row, : f.shape[0]] = f
    return {"features": out, "feature_lengths": lengths, "utterance_ids": [item["utterance_id"] for item in items],
            "transcripts": [item["transcript"] for item in items],
            "speaker_ids": [item.get("speaker_id") for item in items]}


def _lengths_of(dataset) -> np.ndarray:
    values = getattr(dataset, "estimated_frames", None)
    if values is None and isinstance(dataset, RecordStore):
        values = dataset.sidecars.get("estimated_frames")
    if values is None:
        if not isinstance(dataset, (np.ndarray, list, tuple, range)):
            raise TypeError("DynamicBucketingSampler needs a FeatureDataset, a RecordStore or a sequence of "
                            f"frame counts, got {type(dataset).__name__}")
        values = dataset
    lengths = np.asarray(values, dtype=np.int64)
    if lengths.ndim != 1 or (len(lengths) and lengths.min() < 0):
        raise ValueError("frame counts must be a 1-D sequence of integers >= 0")
    return lengths


def _bucket_bins(lengths: np.ndarray, num_buckets: int) -> np.ndarray:
    """Lower bounds of buckets 1..K-1 such that each bucket holds about the same total frames
    (lhotse's ``estimate_duration_buckets`` rule, in frames); bucket ``k`` is
    ``bins[k-1] <= length < bins[k]``."""
    if num_buckets <= 1 or len(lengths) == 0:
        return np.zeros(0, dtype=np.int64)
    ordered = np.sort(lengths)
    cumulative = np.cumsum(ordered)
    if cumulative[-1] == 0:
        return np.zeros(0, dtype=np.int64)
    targets = cumulative[-1] * np.arange(1, num_buckets) / num_buckets
    ends = np.searchsorted(cumulative, targets, side="left")  # the item that completes each bucket
    starts = ends + 1
    bins = ordered[starts[starts < len(ordered)]]
    return np.unique(bins[bins > ordered[0]])


class DynamicBucketingSampler(Sampler):
    """Batches of similar-length utterances, bounded in total frames (lhotse's
    ``DynamicBucketingSampler``, with ``max_frames`` for ``max_duration``).

    Yields lists of dataset indexes; pass it as ``DataLoader(batch_sampler=...)``. Lengths are
    the record cache's ``estimated_frames`` sidecar (10 ms frames, known before any feature is
    read; for ``w2v-bert``, whose frames are 20 ms, a batch holds about half that many of its
    frames). Every epoch:

    1. utterances are put in ``num_buckets`` length buckets, whose bounds are fixed at
       construction so that each bucket holds about the same total frames;
    2. within each bucket (shuffled with ``shuffle``) utterances are taken in order into batches
       while the batch's total ``estimated_frames`` stays ``<= max_frames`` (and its size
       ``<= max_items``). **An utterance longer than ``max_frames`` becomes a batch of its own**
       (it is never dropped or split), so that is the only way a batch exceeds ``max_frames``;
    3. the batch count is made a multiple of ``world_size``: without ``drop_last`` by splitting
       the batches with the most utterances in two (every utterance still appears exactly once);
       with ``drop_last`` by dropping batches (see below);
    4. batches are grouped in runs of ``world_size`` from one bucket (so the ranks' batches of
       a step have similar lengths, lhotse's ``sync_buckets``), the runs shuffled with
       ``shuffle``, and rank ``r`` takes batches ``r, r + world_size, ...`` (lhotse's rule).

    So every rank gets the same number of batches (``len(sampler)``), the ranks' batches are
    disjoint, and across ranks every utterance appears exactly once per epoch unless
    ``drop_last``. Only when that is impossible — fewer utterances than the batches needed, e.g.
    a split smaller than ``world_size`` — are a few of the shortest utterances repeated, as
    ``torch.utils.data.DistributedSampler`` pads, with a warning.

    The order depends only on ``(seed, epoch)`` and the lengths (``numpy`` PCG64), so every
    rank computes the same plan; call :meth:`set_epoch` before each epoch (as for lhotse's and
    torch's samplers), or every epoch repeats epoch 0's order.

    Args:
        dataset: a :class:`FeatureDataset`, a :class:`asr_assets.record_cache.RecordStore`, or a
            sequence of frame counts (one per index).
        max_frames: largest total ``estimated_frames`` of a batch (sum over its utterances, not
            ``B x T_max``), > 0.
        shuffle: shuffle utterances within buckets and the order of batches.
        seed: int >= 0, the same on every rank.
        num_buckets: length buckets (lhotse's default 10; fewer when lengths repeat).
        drop_last: drop each bucket's last batch when it is not full (another utterance of its
            mean length would still have fitted: lhotse's "incomplete batch"), and the fewer
            than ``world_size`` batches left over at the end, instead of splitting.
        world_size: data-parallel ranks (default: ``torch.distributed``'s when initialized, else 1).
        rank: this process's rank in ``[0, world_size)`` (default likewise, else 0).
        max_items: optional cap on utterances per batch (lhotse's ``max_cuts``).

    Raises:
        ValueError: ``max_frames`` <= 0, ``num_buckets`` < 1, ``seed`` < 0, a rank outside
            ``[0, world_size)``.
        TypeError: ``dataset`` gives no frame counts.
    """

    def __init__(self, dataset, max_frames: int, shuffle: bool = True, seed: int = 0, num_buckets: int = 10,
                 drop_last: bool = False, world_size: int | None = None, rank: int | None = None,
                 *, max_items: int | None = None):
        super().__init__()
        if not max_frames > 0:
            raise ValueError(f"max_frames must be > 0, got {max_frames!r}")
        if num_buckets < 1:
            raise ValueError(f"num_buckets must be >= 1, got {num_buckets!r}")
        if int(seed) < 0:
            raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
        if max_items is not None and max_items < 1:
            raise ValueError(f"max_items must be >= 1 or None, got {max_items!r}")
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.world_size = int(world_size if world_size is not None else
                              (torch.distributed.get_world_size() if distributed else 1))
        self.rank = int(rank if rank is not None else (torch.distributed.get_rank() if distributed else 0))
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in [0, world_size={self.world_size})")
        self.lengths = _lengths_of(dataset)
        self.max_frames = max_frames
        self.max_items = max_items
        self.shuffle = shuffle
        self.seed = int(seed)
        self.drop_last = drop_last
        self.num_buckets = num_buckets
        self.bins = _bucket_bins(self.lengths, num_buckets)
        self.buckets = np.searchsorted(self.bins, self.lengths, side="right")
        self.epoch = 0
        self._plan_cache: tuple[int, list[list[int]]] | None = None

    def set_epoch(self, epoch: int) -> None:
        """Use the order of ``epoch`` for the next iteration (and :func:`len`)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        """Batches this rank yields in the current epoch (the same on every rank)."""
        return len(self._plan()) // self.world_size

    def __iter__(self) -> Iterator[list[int]]:
        plan = self._plan()
        for batch in plan[self.rank::self.world_size]:
            yield list(batch)

    # -- planning -----------------------------------------------------------------------------
    def _plan(self) -> list[list[int]]:
        """All ranks' batches of the current epoch, in order; length a multiple of world_size."""
        if self._plan_cache is not None and self._plan_cache[0] == self.epoch:
            return self._plan_cache[1]
        rng = np.random.default_rng([self.seed, self.epoch])
        per_bucket: list[list[list[int]]] = []
        for bucket in range(len(self.bins) + 1):
            members = np.flatnonzero(self.buckets == bucket)
            if self.shuffle:
                members = rng.permutation(members)
            batches = self._batches(members)
            if self.drop_last and batches and not self._full(batches[-1]):
                batches.pop()
            per_bucket.append(batches)
        world = self.world_size
        if not self.drop_last:
            self._equalize(per_bucket)
        runs, leftover = [], []
        for batches in per_bucket:
            cut = len(batches) - len(batches) % world
            runs.extend(batches[i:i + world] for i in range(0, cut, world))
            leftover.extend(batches[cut:])
        runs.extend(leftover[i:i + world] for i in range(0, len(leftover), world))
        if runs and len(runs[-1]) < world:  # only with drop_last: fewer than world_size batches left
            runs.pop()
        if self.shuffle:
            runs = [runs[i] for i in rng.permutation(len(runs))]
        plan = [batch for run in runs for batch in run]
        self._plan_cache = (self.epoch, plan)
        return plan

    def _batches(self, members: np.ndarray) -> list[list[int]]:
        batches: list[list[int]] = []
        current: list[int] = []
        total = 0
        for index in members.tolist():
            length = int(self.lengths[index])
            if current and (total + length > self.max_frames
                            or (self.max_items is not None and len(current) >= self.max_items)):
                batches.append(current)
                current, total = [], 0
            current.append(index)
            total += length
        if current:
            batches.append(current)
        return batches

    def _full(self, batch: list[int]) -> bool:
        if self.max_items is not None and len(batch) >= self.max_items:
            return True
        total = int(self.lengths[batch].sum())
        return total + total / len(batch) > self.max_frames

    def _equalize(self, per_bucket: list[list[list[int]]]) -> None:
        """Make the batch count a multiple of world_size by splitting the batches with the most
        utterances (halves stay under max_frames); repeat short utterances only if that cannot."""
        world = self.world_size
        deficit = -sum(len(b) for b in per_bucket) % world
        while deficit:
            sizes = [(len(batch), bucket, i) for bucket, batches in enumerate(per_bucket)
                     for i, batch in enumerate(batches)]
            if not sizes:
                return  # nothing at all to sample
            size, bucket, i = max(sizes, key=lambda s: (s[0], -s[1], -s[2]))
            if size < 2:
                break
            batch = per_bucket[bucket][i]
            per_bucket[bucket][i:i + 1] = [batch[: size // 2], batch[size // 2:]]
            deficit -= 1
        if deficit:
            shortest = np.argsort(self.lengths, kind="stable")
            repeats = [[int(shortest[k % len(shortest)])] for k in range(deficit)]
            warnings.warn(f"DynamicBucketingSampler: {len(self.lengths)} utterances cannot fill a multiple of "
                          f"world_size={world} batches; {deficit} short utterance(s) are repeated this epoch "
                          "so that every rank gets the same number of batches", stacklevel=3)
            per_bucket[0].extend(repeats)
