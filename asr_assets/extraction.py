"""The extraction loop: record store -> audio -> features -> feature shards (deterministic, parallel).

Entry points:
    - :class:`ExtractionConfig` — workers, part size, decode options, fail_fast.
    - :func:`extract_shards` — compute the missing features of some shards of one split.
    - :class:`ShardStats`, :class:`Failure`.

Work is split across ``workers`` processes (one thread each: per-utterance DSP does not gain
from threads on small machines); results are consumed in record order, so the rows of every part
are the same whatever the number of workers. Each worker holds one decoded clip (capped by
``max_decode_s``) and at most ``4 * workers`` results wait to be consumed.

A record with ``offset_seconds`` is a segment of a long recording: only the segment is decoded
(:class:`asr_assets.audio.SegmentReader`: seek + trim), the caps and the time limit are the
segment's, and each worker keeps its last 8 files open, so the segments of one file that reach a
worker one after another (record order, which is file order in LibriHeavy/GigaSpeech-style
manifests, is kept within a shard) cost one open and one seek each, not a decode from the start.
Tasks are ordered shard by shard and a shard's writer commits as soon as its last utterance is
done, so the main process holds at most ``rows_per_part`` payloads of about two shards.
Peak memory is therefore bounded by roughly
``workers x (decoded clip at its native rate <= max_decode_s + DSP buffers)`` in the workers
plus ``(4 x workers + 2 x rows_per_part) x payload`` in the main process, whatever the corpus
size (measured in the README's reliability section).
An utterance that cannot be decoded or featurized becomes a :class:`Failure` and the loop goes
on, unless ``fail_fast``.

Hostile input cannot stop the run:

* **Crashes.** Each worker runs its tasks one at a time from its own pipe, so the utterance a
  worker was running when it died (segfault, OOM kill) is known exactly. It is run once more in
  another worker (the kill may have been someone else's fault) and reported with stage
  ``"worker"`` if that one dies too; the other workers carry on.
* **Hangs.** Every utterance has a wall-clock limit,
  ``max(utterance_timeout_s, timeout_per_audio_s x min(duration, max_decode_s))`` (defaults
  60 s and 10 s per second of audio; see :meth:`ExtractionConfig.time_limit_s`). A worker that
  overruns it (a FIFO or device that never delivers data, a stalled network file system, a
  decoder or frontend stuck in a loop) is killed with SIGKILL and replaced; the utterance is
  reported with stage ``"timeout"`` and its limit, and the utterances queued behind it are
  computed as usual. With ``workers=1`` the work also runs in one worker process, so it is
  bounded too; only ``workers=1`` with ``utterance_timeout_s=None`` runs in this process.
* **Orphans.** Workers and the fork server die with the main process, even when it is killed
  with SIGKILL and even when a worker is stuck in C code holding the GIL: on Linux the fork
  server gets ``PR_SET_PDEATHSIG`` (checked against a re-parenting, so the exit of the thread that
  started it is harmless) and workers get ``PR_SET_PDEATHSIG(SIGKILL)`` towards the fork server.
  On every platform a thread in each worker also ends it when the main process's end of a pipe
  closes (enough for a worker that is not stuck holding the GIL).
"""

from __future__ import annotations

import contextlib
import ctypes
import heapq
import logging
import math
import multiprocessing
import os
import pickle
import resource
import signal
import struct
import sys
import threading
import time
import traceback
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import wait as _wait_ready
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import threadpoolctl

from ._fs import remove_stale_tmp
from .audio import DecodeConfig, SegmentReader, load_audio
from .errors import AsrAssetsError, ConfigError
from .feature_cache import (ShardWriter, ShardedParquetFeatureCache, cache_key, encode_features, encode_payload,
                            part_metadata, shard_dir, shard_index, shard_lock)
from .key_index import record_keys, records_in_shards
from .storage import local_source
from .frontends import Frontend
from .logs import configure_worker, native_stderr, trace, worker_config
from .record_cache import RecordStore

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExtractionConfig:
    """Runtime settings of feature extraction (none of them changes the cache key).

    Attributes:
        workers: worker processes (1 still runs in one worker process, so that a crash or a hang
            costs one utterance; only with ``utterance_timeout_s=None`` does it run in this
            process). Default: every core.
        rows_per_part: rows per Parquet part (upstream Rust default 256).
        num_shards: shards per split (64).
        ffmpeg_fallback: decode with PyAV when libsndfile cannot.
        max_decode_s: refuse audio longer than this many seconds, before holding it in memory.
        fail_fast: raise on the first failing utterance instead of reporting it.
        duration_tolerance: relative difference allowed between the decoded length and the
            record's duration (at least 0.5 s is always allowed); a bigger one fails the
            utterance, since a truncated file with a full transcript is a harmful training
            example. None disables the check.
        utterance_timeout_s: wall-clock limit of one utterance (decode + features) in seconds,
            the floor of :meth:`time_limit_s`; a worker that overruns it is killed and the
            utterance reported with stage ``"timeout"``. None: no limit (and ``workers=1``
            then runs in this process, e.g. to debug a frontend).
        timeout_per_audio_s: seconds allowed per second of audio, for clips long enough that
            ``timeout_per_audio_s x duration`` exceeds the floor (10 s per second is 0.1x real
            time, about 100x slower than the built-in frontends; raise it for a slow custom
            frontend).
    """

    workers: int = len(os.sched_getaffinity(0)) or 1
    rows_per_part: int = 256
    num_shards: int = 64
    ffmpeg_fallback: bool = True
    max_decode_s: float = 60.0
    fail_fast: bool = False
    duration_tolerance: float | None = 0.1
    utterance_timeout_s: float | None = 60.0
    timeout_per_audio_s: float = 10.0

    def __post_init__(self) -> None:
        floor = self.utterance_timeout_s
        if floor is not None and not (isinstance(floor, (int, float)) and math.isfinite(floor) and floor > 0):
            raise ConfigError(f"utterance_timeout_s must be a positive number of seconds or None, got {floor!r}")
        rate = self.timeout_per_audio_s
        if not (isinstance(rate, (int, float)) and math.isfinite(rate) and rate >= 0):
            raise ConfigError(f"timeout_per_audio_s must be a finite number >= 0, got {rate!r}")

    def time_limit_s(self, expected_samples: int) -> float | None:
        """Wall-clock limit of an utterance of ``expected_samples`` samples at 16 kHz (the record
        cache's ``num_samples``; 0 if unknown): ``max(utterance_timeout_s, timeout_per_audio_s x
        seconds)``, the seconds capped at ``max_decode_s`` (decoding never goes further, so a
        manifest that claims an hour does not buy an hour). None when ``utterance_timeout_s`` is None.
        """
        if self.utterance_timeout_s is None:
            return None
        seconds = max(int(expected_samples), 0) / 16000
        if self.max_decode_s is not None:
            seconds = min(seconds, self.max_decode_s)
        return max(float(self.utterance_timeout_s), self.timeout_per_audio_s * seconds)

    def describe_limit(self, expected_samples: int) -> str:
        """How :meth:`time_limit_s` came about, for the failure report."""
        seconds = max(int(expected_samples), 0) / 16000
        capped = self.max_decode_s is not None and seconds > self.max_decode_s
        shown = f"{self.max_decode_s:g} s (max_decode_s)" if capped else f"{seconds:.2f} s"
        return f"max({self.utterance_timeout_s:g} s, {self.timeout_per_audio_s:g} s per audio second x {shown})"


@dataclass
class Failure:
    """One utterance that has no features, and why (a line of the failure report).

    ``stage`` is ``"decode"``, ``"featurize"``, ``"worker"`` (the worker process died on it twice)
    or ``"timeout"`` (no result within ``limit_s`` seconds; the worker was killed).
    """

    utterance_id: str
    audio_source: str | None
    stage: str
    error: str
    shard: int
    limit_s: float | None = None


@dataclass
class ShardStats:
    """Outcome of one shard: counts, seconds of audio computed, failures."""

    shard: int
    records: int = 0
    computed: int = 0
    skipped: int = 0
    failed: int = 0
    audio_seconds: float = 0.0
    frames: int = 0
    parts_written: int = 0
    tombstoned: int = 0
    worker_seconds: float = 0.0
    #: wall seconds the main process spent writing the shard's parts and index (encode, zstd,
    #: fsync, rename): the write stage, beside ``worker_seconds`` of decoding and featurizing
    write_seconds: float = 0.0
    worker_peak_rss_mib: float = 0.0
    failures: list[Failure] = field(default_factory=list)
    #: file names of the parts written in the shard's folder (features and tombstones)
    part_names: list[str] = field(default_factory=list)
    #: per-bin sum and sum of squares (float64 ``[feature_dim]``) over every frame computed
    #: (``frames`` of them); None when nothing was computed
    feature_sum: np.ndarray | None = None
    feature_sumsq: np.ndarray | None = None

    def add_moments(self, payload: bytes) -> None:
        """Add the frames of one ``SFCF32L1`` payload to :attr:`feature_sum` / :attr:`feature_sumsq`."""
        rows, cols = _PAYLOAD_SHAPE.unpack_from(payload, 8)
        features = np.frombuffer(payload, dtype="<f4", count=rows * cols, offset=16).reshape(rows, cols)
        if self.feature_sum is None:
            self.feature_sum, self.feature_sumsq = np.zeros(cols), np.zeros(cols)
        # float32 within one utterance (relative error <~1e-5, 3x faster than float64 in this
        # serial main-process loop), float64 across utterances
        self.feature_sum += features.sum(axis=0)
        self.feature_sumsq += np.einsum("ij,ij->j", features, features)

    @property
    def xrt_per_core(self) -> float:
        """Seconds of audio featurized per second of worker time (decode + features)."""
        return self.audio_seconds / self.worker_seconds if self.worker_seconds > 0 else 0.0

    def summary(self) -> dict:
        data = asdict(self)
        for name in ("failures", "feature_sum", "feature_sumsq"):
            data.pop(name)
        return data


_PAYLOAD_SHAPE = struct.Struct("<II")  # rows, cols after the 8-byte SFCF32L1 magic


@dataclass(frozen=True)
class _Task:
    utterance_id: str
    source: str | None
    hint: str | None
    shard: int
    key: str
    expected_samples: int = 0  # at 16 kHz, from the record cache (manifest or header duration)
    offset_s: float | None = None  # a segment of a long recording: start (s) into the file ...
    duration_s: float | None = None  # ... and its length (s); None: the whole file


_STATE: dict = {}


def _init_worker(frontend: Frontend, decode_config: DecodeConfig, duration_tolerance: float | None,
                 log_levels: dict | None = None) -> None:
    # One BLAS/OpenMP thread per worker: the pool already uses every core. numpy is imported
    # (fork-server preload), so environment variables would do nothing; threadpoolctl sets the
    # loaded libraries themselves (numpy's and scipy's OpenBLAS alike).
    threadpoolctl.threadpool_limits(limits=1)
    configure_worker(log_levels)  # the main process's log levels (asr_assets.logs), if it set any
    _STATE.update(frontend=frontend, decode=decode_config, duration_tolerance=duration_tolerance,
                  capture_stderr=True)  # one thread decodes here: fd 2 may be borrowed per utterance
    _segment_reader()


def _segment_reader() -> SegmentReader:
    """This process's open files for segments (the last few long recordings stay open, so the
    segments of one file that reach this worker one after another cost one open)."""
    reader = _STATE.get("segments")
    if reader is None:
        reader = _STATE["segments"] = SegmentReader(max_open=_OPEN_FILES)
    return reader


def _featurize(task: _Task) -> tuple:
    """-> (payload, audio seconds, frames, failed stage, error, worker seconds, worker peak RSS MiB,
    what the decoder libraries wrote to stderr); the payload is ``{output name: payload}`` for a
    frontend with named outputs. In a worker process, native stderr output (libmpg123's warnings,
    which name no file) is captured and sent back, for :func:`_results` to log with the utterance."""
    start = time.perf_counter()
    if _STATE.get("capture_stderr"):
        with native_stderr() as stderr:
            result = _featurize_timed(task)
        said = stderr.text
    else:
        result, said = _featurize_timed(task), ""
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    return (*result, time.perf_counter() - start, peak_mib, said)


def _results(results: Iterator[tuple]) -> Iterator[tuple]:
    """``(task, 7-tuple result)`` of ``(task, result)``: a decoder's stderr output (the 8th
    element) is logged here as a warning naming the utterance."""
    try:
        for task, result in results:
            if result[7]:
                logger.warning("utterance %s (%s): the decoder wrote: %s", task.utterance_id,
                               _label(task.source), result[7])
            yield task, result[:7]
    finally:
        results.close()  # now, not when collected: the caller's close() stops the workers


def _label(source) -> str:
    """A source for log lines: ``path:<path>`` or ``bytes:<length>`` (upstream's labels)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"bytes:{len(source)}"
    return f"path:{source}" if source is not None else "none"


def _featurize_timed(task: _Task) -> tuple[bytes | dict[str, bytes] | None, float, int, str | None, str | None]:
    frontend: Frontend = _STATE["frontend"]
    start = time.perf_counter()
    if task.source is None:
        return None, 0.0, 0, "decode", "record has neither audio_path nor audio_blob_path"
    try:
        source = local_source(task.source)  # object-store audio/blobs: fetched once into the local content cache
        if task.offset_s is not None:
            samples = load_audio(source, hint=task.hint, config=_STATE["decode"], target_rate=frontend.sample_rate,
                                 offset_s=task.offset_s, duration_s=task.duration_s, reader=_segment_reader())
        else:
            samples = load_audio(source, hint=task.hint, config=_STATE["decode"], target_rate=frontend.sample_rate)
    except AsrAssetsError as exc:
        return None, 0.0, 0, "decode", str(exc)
    except Exception as exc:  # a decoder bug on hostile input must not stop the run
        return None, 0.0, 0, "decode", f"{type(exc).__name__}: {exc}"
    seconds = len(samples) / frontend.sample_rate
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug("decoded utterance_id=%s source=%s samples=%d at sample_rate=%d (decode + resample %.1f ms)",
                     task.utterance_id, _label(task.source), len(samples), frontend.sample_rate,
                     1e3 * (time.perf_counter() - start))
    tolerance = _STATE.get("duration_tolerance")
    if tolerance is not None and task.expected_samples:
        expected = task.expected_samples * frontend.sample_rate / 16000
        if abs(len(samples) - expected) > max(0.5 * frontend.sample_rate, tolerance * expected):
            return None, seconds, 0, "decode", (
                f"decoded {seconds:.2f} s but the record says {expected / frontend.sample_rate:.2f} s "
                "(truncated file or wrong manifest duration: the transcript would not match the audio)")
    if len(samples) < frontend.min_num_samples:
        return None, seconds, 0, "featurize", (
            f"{len(samples)} samples at {frontend.sample_rate} Hz < {frontend.min_num_samples} needed for one {frontend.name} frame"
        )
    try:
        features = frontend(samples, frontend.sample_rate)
        if frontend.outputs is not None:  # named outputs -> {name: payload}, all rows of one part
            outputs = frontend.check_outputs(features)  # in declared order
            return _named_payloads(outputs), seconds, _first_frames(outputs), None, None
    except Exception as exc:
        return None, seconds, 0, "featurize", f"{type(exc).__name__}: {exc}"
    if features.ndim != 2 or features.shape[0] == 0 or features.shape[1] != frontend.feature_dim:
        return None, seconds, 0, "featurize", f"implausible feature shape {features.shape} (want [frames>0, {frontend.feature_dim}])"
    if not np.isfinite(features).all():
        return None, seconds, 0, "featurize", f"{int((~np.isfinite(features)).sum())} non-finite feature values"
    logger.debug("computed %s features utterance_id=%s frames=%d dim=%d (%.1f ms in all)", frontend.name,
                 task.utterance_id, features.shape[0], features.shape[1], 1e3 * (time.perf_counter() - start))
    return encode_payload(features), seconds, int(features.shape[0]), None, None


def _named_payloads(outputs: dict[str, np.ndarray]) -> dict[str, bytes]:
    """``{name: encode_features(array)}`` of a frontend's checked named outputs."""
    return {name: encode_features(array) for name, array in outputs.items()}


def _first_frames(outputs: dict[str, np.ndarray]) -> int:
    """The ``frames`` statistic of named outputs: rows of the first one."""
    return int(np.shape(next(iter(outputs.values())))[0])


def _record_keys(task: _Task, output_hashes: dict[str | None, str]) -> dict[str | None, str]:
    """Keys a record's features are stored under: ``{None: task.key}``, or one per named output
    (all in ``task.shard``, the frontend key's shard; see :mod:`asr_assets.feature_cache`)."""
    if None in output_hashes:
        return {None: task.key}
    return {name: cache_key(task.utterance_id, h) for name, h in output_hashes.items()}


def plan_shard_tasks(store: RecordStore, frontend_hash: str, shards: Iterable[int], num_shards: int) -> dict[int, list[_Task]]:
    """Records of ``store`` that fall in ``shards``, as tasks in record order.

    Only those records are read: the split's key index (:mod:`asr_assets.key_index`) says
    which they are, so planning one shard of a 10M-record split parses 1/64 of its lines.
    """
    wanted = set(shards)
    plan: dict[int, list[_Task]] = {s: [] for s in sorted(wanted)}
    keys = record_keys(store, frontend_hash, num_shards)
    for index, item in zip(chosen := records_in_shards(store, frontend_hash, wanted, num_shards),
                           store.iter_indices(chosen)):
        shard = int(keys.shards[index])
        source = item.get("audio_blob_abspath") or item.get("audio_path")
        plan[shard].append(_Task(item["utterance_id"], source, item.get("audio_path"), shard, keys.hex(index),
                                 int(item.get("num_samples") or 0), item.get("offset_seconds"),
                                 item.get("duration_seconds")))
    return plan


def shards_with_work(store: RecordStore, split_root: str | os.PathLike, frontend_hash: str | Frontend, num_shards: int,
                     known_failed: set[str] | frozenset = frozenset()) -> list[int]:
    """Shards in which :func:`extract_shards` would compute or tombstone something: a record
    whose key is not cached (and not in ``known_failed``, utterance ids that failed before), or a
    key this frontend cached for a record that is gone. Reads the split's key index and each
    shard's index (persisted, or part footers); no payload, and a record line only for a key
    that is missing (to check it against ``known_failed``). ``frontend_hash`` may be the
    Frontend itself, which a frontend with named outputs needs (its outputs' keys derive from
    its config; such a frontend's records are all read)."""
    output_hashes = {None: None}
    if isinstance(frontend_hash, Frontend):
        output_hashes, frontend_hash = frontend_hash.output_hashes(), frontend_hash.frontend_hash()
    reader = ShardedParquetFeatureCache(split_root, num_shards)
    reader.prefetch(range(num_shards))
    busy = []
    if None not in output_hashes:  # named outputs: every output key of every record
        for shard, tasks in plan_shard_tasks(store, frontend_hash, range(num_shards), num_shards).items():
            missing, orphans = _shard_work(reader.keys(shard, frontend_hash=frontend_hash), tasks, output_hashes)
            if orphans or any(t.utterance_id not in known_failed for t in missing):
                busy.append(shard)
        return busy
    keys = record_keys(store, frontend_hash, num_shards)
    for shard in range(num_shards):
        members = np.flatnonzero(keys.shards == shard)
        wanted = {keys.hex(i) for i in members}
        present = reader.keys(shard, frontend_hash=frontend_hash)
        if present - wanted:
            busy.append(shard)
            continue
        missing = [int(i) for i in members if keys.hex(i) not in present]
        if missing and any(item["utterance_id"] not in known_failed for item in store.iter_indices(missing)):
            busy.append(shard)
    return busy


def extract_shards(
    store: RecordStore,
    split_root: str | os.PathLike,
    frontend: Frontend,
    shards: Sequence[int],
    config: ExtractionConfig = ExtractionConfig(),
    *,
    progress: Callable[[int, int], None] | None = None,
) -> dict[int, ShardStats]:
    """Compute and store the features that ``shards`` of ``split_root`` are missing.

    Keys already present (live) in a shard are skipped; new rows are appended as new parts, so
    existing parts are never rewritten and a run with nothing new writes nothing. Keys this
    frontend wrote for records no longer in the record store get a tombstone. Writers of the
    same shard and frontend are serialized by :func:`asr_assets.feature_cache.shard_lock`.
    A frontend with named outputs stores each output under its own key, all in the shard of the
    utterance's frontend key and in the same part; a record counts as cached when every output
    is, and ``frames`` counts the first output's rows.

    Args:
        store: the split's record store.
        split_root: ``<output>/feature-cache/<split>``.
        frontend: a :class:`asr_assets.frontends.Frontend` (its hash keys the cache).
        shards: shard indexes to bring up to date.
        config: :class:`ExtractionConfig`.
        progress: called as ``progress(done, total)`` after each utterance.

    Returns:
        ``{shard: ShardStats}``.

    Raises:
        AsrAssetsError: only with ``config.fail_fast``, on the first failing utterance.
    """
    fhash = frontend.frontend_hash()
    plan = plan_shard_tasks(store, fhash, shards, config.num_shards)
    # A shard with nothing to compute or tombstone, as seen without its lock, is left alone (no
    # lock taken: on an object store a lock is several requests). Another writer can only have
    # added keys since, which the next run sees.
    reader = ShardedParquetFeatureCache(split_root, config.num_shards)
    output_hashes = frontend.output_hashes()
    reader.prefetch(plan)
    idle = {shard: ShardStats(shard=shard, records=len(tasks), skipped=len(tasks))
            for shard, tasks in plan.items() if _up_to_date(reader, shard, fhash, tasks, output_hashes)}
    busy = {shard: tasks for shard, tasks in plan.items() if shard not in idle}
    with contextlib.ExitStack() as locks:
        for shard in sorted(busy):  # sorted: two runs over overlapping shards cannot deadlock
            locks.enter_context(shard_lock(split_root, shard, fhash))
        reader.refresh()  # what the shards hold now that they are ours
        reader.prefetch(busy)
        stats = _extract_locked(busy, reader, split_root, frontend, fhash, config, progress)
    return {shard: idle.get(shard) or stats[shard] for shard in plan}


def _shard_work(present: set[str], tasks: list[_Task], output_hashes: dict[str | None, str]) -> tuple[list[_Task], list[str]]:
    """What a shard holding the cache keys ``present`` (of one frontend) still needs: the tasks
    whose keys are not all there (to compute), and the keys of no task (records gone: to
    tombstone), sorted."""
    keys = {task.key: _record_keys(task, output_hashes).values() for task in tasks}
    wanted = set().union(*keys.values())
    return [task for task in tasks if not present.issuperset(keys[task.key])], sorted(present - wanted)


def _up_to_date(reader: ShardedParquetFeatureCache, shard: int, fhash: str, tasks: list[_Task],
                output_hashes: dict[str | None, str]) -> bool:
    """Whether every record of ``tasks`` has its keys in ``shard`` and the shard holds no key of
    this frontend for a record that is gone."""
    missing, orphans = _shard_work(reader.keys(shard, frontend_hash=fhash), tasks, output_hashes)
    return not missing and not orphans


def _extract_locked(plan, reader: ShardedParquetFeatureCache, split_root, frontend: Frontend, fhash: str,
                    config: ExtractionConfig, progress) -> dict[int, ShardStats]:
    stats = {s: ShardStats(shard=s, records=len(tasks)) for s, tasks in plan.items()}
    todo: list[_Task] = []
    orphans: dict[int, list[str]] = {}
    output_hashes = frontend.output_hashes()  # {None: fhash}, or one hash per named output
    for shard, tasks in plan.items():
        remove_stale_tmp(shard_dir(split_root, shard))  # left by killed writers
        missing, orphans[shard] = _shard_work(reader.keys(shard, frontend_hash=fhash), tasks, output_hashes)
        stats[shard].skipped += len(tasks) - len(missing)
        todo.extend(missing)
    metadata = part_metadata(frontend)
    if logger.isEnabledFor(logging.DEBUG):
        for shard in plan:
            logger.debug("%s shard %02d of %s: %d records, %d to compute, %d already cached, %d to tombstone",
                         frontend.name, shard, split_root, stats[shard].records,
                         stats[shard].records - stats[shard].skipped, stats[shard].skipped, len(orphans[shard]))
    writers = {s: ShardWriter(split_root, s, rows_per_part=config.rows_per_part, metadata=metadata) for s in plan}
    for shard, keys in orphans.items():
        for key in keys:
            writers[shard].delete(key)
        stats[shard].tombstoned = len(keys)
    decode = DecodeConfig(ffmpeg_fallback=config.ffmpeg_fallback, max_duration_s=config.max_decode_s)
    remaining = {s: 0 for s in plan}
    for task in todo:
        remaining[task.shard] += 1
    for shard, count in remaining.items():
        if count == 0:
            writers[shard].close()  # tombstones only (or nothing): commit now
    results = _run(todo, (frontend, decode, config.duration_tolerance, worker_config()), config.workers, config)
    try:
        for done, (task, result) in enumerate(results, start=1):
            payload, seconds, frames, stage, error, busy, peak_mib = result
            shard_stats = stats[task.shard]
            shard_stats.worker_seconds += busy
            shard_stats.worker_peak_rss_mib = max(shard_stats.worker_peak_rss_mib, peak_mib)
            if payload is None:
                failure = Failure(task.utterance_id, task.source, stage or "featurize", error or "unknown", task.shard,
                                  config.time_limit_s(task.expected_samples) if stage == "timeout" else None)
                if config.fail_fast:
                    raise AsrAssetsError(f"utterance {task.utterance_id!r} ({task.source}): {failure.stage}: {failure.error}")
                trace(logger, "utterance_id=%s shard=%02d failed (%s): %s", task.utterance_id, task.shard,
                      failure.stage, failure.error)
                shard_stats.failed += 1
                shard_stats.failures.append(failure)
            else:
                trace(logger, "utterance_id=%s shard=%02d source=%s frames=%d audio=%.2f s", task.utterance_id,
                      task.shard, _label(task.source), frames, seconds)
                if isinstance(payload, dict):  # named outputs: the same part, under their own keys
                    names = _record_keys(task, output_hashes)
                    writers[task.shard].add_payloads([(names[name], value) for name, value in payload.items()])
                else:
                    writers[task.shard].add_payload(task.key, payload)
                    shard_stats.add_moments(payload)  # per-bin sums of the split summary (single output)
                shard_stats.computed += 1
                shard_stats.audio_seconds += seconds
                shard_stats.frames += frames
            remaining[task.shard] -= 1
            if remaining[task.shard] == 0:
                writers[task.shard].close()  # tasks come shard by shard: at most ~2 writers hold rows
            if progress is not None:
                progress(done, len(todo))
    finally:
        results.close()  # stops the workers now, also when fail_fast raised or the caller was interrupted
        for shard, writer in writers.items():
            writer.close()
            stats[shard].parts_written = len(writer.parts_written)
            stats[shard].write_seconds = writer.write_seconds
            stats[shard].part_names = [os.path.basename(str(p)) for p in writer.parts_written]
    return stats


# --- worker processes -------------------------------------------------------------------------
#
# Why not concurrent.futures.ProcessPoolExecutor: it cannot stop one task (only the whole pool),
# a dead worker breaks the pool without saying which task killed it, and its workers block on a
# queue that every worker holds open, so they outlive a main process killed with SIGKILL. Here
# each worker has its own pipe and runs at most ``_DEPTH`` tasks queued on it, first in first
# out: the task at the head is the one running, the main process times it and knows which
# utterance a dead or killed worker had.

_CRASHED = "worker process died ({how}) while decoding or featurizing this utterance, twice"
_OPEN_FILES = 8  # long recordings each worker keeps open for their segments (audio.SegmentReader)
_DEPTH = 2  # tasks queued per worker: one running, one waiting (keeps workers busy while the main process writes)
_START_LIMIT_S = 300.0  # a worker that cannot even start in this long means a broken environment, not bad audio
_START_FAILURES = 3  # workers dying before they are ready, in a row, after some worked: give up
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
#: Signal the fork server gets when its parent thread exits; its handler exits only when the main
#: *process* is gone (a thread that started the fork server may end long before the process).
_FORK_SERVER_PDEATHSIG = signal.SIGUSR2
_fork_server_parent: int | None = None


def _set_parent_death_signal(sig: int) -> bool:
    """``prctl(PR_SET_PDEATHSIG, sig)``: the kernel sends ``sig`` to this process when the thread
    that created it exits. False where that is unavailable (not Linux, no libc prctl)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return False
    return prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0


def _fork_server_parent_died(signum, frame) -> None:
    if os.getppid() != _fork_server_parent:  # re-parented: the main process is gone, not just a thread of it
        os._exit(0)  # our workers follow: their PR_SET_PDEATHSIG(SIGKILL) points at this process


def _arm_fork_server() -> None:
    """Make the fork server die with the main process (run when it preloads this module)."""
    global _fork_server_parent
    _fork_server_parent = os.getppid()
    signal.signal(_FORK_SERVER_PDEATHSIG, _fork_server_parent_died)
    if _set_parent_death_signal(_FORK_SERVER_PDEATHSIG) and os.getppid() != _fork_server_parent:
        os._exit(0)  # the main process died before prctl took effect
    # Without prctl the fork server still exits by itself once the main process and every worker
    # are gone (they hold its "alive" pipe), and each worker watches the main process (below).


def _in_fork_server() -> bool:
    """Is this module being preloaded by ``multiprocessing.forkserver.main`` (in the fork server
    itself, not in a worker it forked, which has ``main`` on its stack too)?"""
    forkserver = sys.modules.get("multiprocessing.forkserver")
    codes = {name: getattr(getattr(forkserver, name, None), "__code__", None) for name in ("main", "_serve_one")}
    if codes["main"] is None:
        return False
    seen = set()
    frame = sys._getframe(1)
    while frame is not None:
        seen.add(frame.f_code)
        frame = frame.f_back
    return codes["main"] in seen and codes["_serve_one"] not in seen


def _watch_main_process(lifeline) -> None:
    """Exit this worker when the main process is gone: only the main process holds the write end
    of ``lifeline`` and never writes, so a read returns (EOF) exactly when it has died or closed
    the pool. A backstop for PR_SET_PDEATHSIG; it needs the GIL, the kernel signal does not."""
    def watch() -> None:
        with contextlib.suppress(EOFError, OSError):
            lifeline.recv_bytes()
        os._exit(1)

    threading.Thread(target=watch, name="asr-assets-main-watch", daemon=True).start()


#: Environment variables a worker takes from the process that starts it, not from the fork server
#: (which keeps the environment of its own start, possibly long ago in a long-lived process):
#: object-store credentials and endpoints, fsspec configuration, our own settings.
_ENVIRONMENT_PREFIXES = ("AWS_", "FSSPEC_", "ASR_ASSETS_", "GOOGLE_", "AZURE_", "HF_")


def _environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(_ENVIRONMENT_PREFIXES)}


def _apply_environment(environ: dict[str, str]) -> None:
    for key in [k for k in os.environ if k.startswith(_ENVIRONMENT_PREFIXES) and k not in environ]:
        del os.environ[key]
    os.environ.update(environ)


def _worker_main(conn, lifeline, state: tuple, environ: dict[str, str] | None = None) -> None:
    """A feature worker: ``("ready", pid)``, then for each ``(index, fn, args)`` received, runs
    ``fn(*args)`` and sends ``("ok", index, result)`` or ``("error", index, exception, traceback)``.
    ``None`` or EOF ends it. ``environ``: the starting process's variables of
    :data:`_ENVIRONMENT_PREFIXES`, which replace the fork server's."""
    if environ is not None:
        _apply_environment(environ)
    parent = os.getppid()
    if _set_parent_death_signal(signal.SIGKILL) and os.getppid() != parent:
        os._exit(1)  # the fork server died before prctl took effect
    signal.signal(_FORK_SERVER_PDEATHSIG, signal.SIG_DFL)  # the fork server's handler, inherited
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle; it stops us
    _watch_main_process(lifeline)
    _init_worker(*state)
    conn.send(("ready", os.getpid()))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        index, fn, args = message
        try:
            reply = ("ok", index, fn(*args))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main process
            text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            try:
                pickle.loads(pickle.dumps(exc))
            except Exception:  # noqa: BLE001 - e.g. an exception class with a custom __init__
                exc = RuntimeError(f"{type(exc).__name__}: {exc}")
            reply = ("error", index, exc, text)
        conn.send(reply)


class _RemoteTraceback(Exception):
    def __init__(self, text: str):
        super().__init__(text)

    def __str__(self) -> str:
        return f"\n\"\"\"\n{self.args[0]}\"\"\""


class _Worker:
    """One worker process, its pipe, and the tasks queued on it (the head is running)."""

    def __init__(self, context, lifeline, state: tuple):
        self.conn, child = context.Pipe(duplex=True)
        self.process = context.Process(target=_worker_main, args=(child, lifeline, state, _environment()), daemon=True,
                                       name="asr-assets-feature-worker")
        self.process.start()
        child.close()  # our copy: the worker's exit must read as EOF here
        self.spawned = time.monotonic()
        self.ready = False
        self.queued: list[int] = []  # task indexes in the order sent
        self.deadline = math.inf  # of the head task

    def send(self, index: int, fn, args: tuple) -> None:
        self.conn.send((index, fn, args))
        self.queued.append(index)

    def kill(self) -> None:
        with contextlib.suppress(OSError, ValueError, AttributeError):
            self.process.kill()
        self.reap()

    def reap(self) -> int | None:
        with contextlib.suppress(OSError, ValueError, AssertionError):
            self.process.join(10)
        with contextlib.suppress(OSError):
            self.conn.close()
        if self.process.exitcode is None:
            # Still there 10 s after SIGKILL: stuck in the kernel (uninterruptible I/O, e.g. a hard
            # NFS mount). Give up on it, and keep multiprocessing's exit handler from joining it
            # forever when this process exits.
            getattr(multiprocessing.process, "_children", set()).discard(self.process)
        return self.process.exitcode

    def describe_exit(self) -> str:
        code = self.process.exitcode
        if code is not None and code < 0:
            with contextlib.suppress(ValueError):
                return f"killed by {signal.Signals(-code).name}, e.g. a decoder crash or the OOM killer"
            return f"killed by signal {-code}"
        return f"exit status {code}"


#: Modules the fork server imports once, so every worker it forks has them.
WORKER_PRELOAD = ("asr_assets.extraction", "av", "scipy.fft", "scipy.linalg.blas")


def start_fork_server(also: Sequence[str] = ()) -> None:
    """Start the fork server that forks the feature workers now, from the calling (main) thread,
    rather than when the first pool spawns a worker: its imports of :data:`WORKER_PRELOAD`
    (~0.5 s) and of the modules ``also`` names then run in their own process beside the caller's
    start-up (Dagster's import and instance, the record cache) instead of before the first
    utterance. Idempotent (``also`` counts only for the call that starts the server); the
    server exits with this process. ``asr-assets materialize`` calls it when a run will
    featurize, with ``also`` = :data:`asr_assets.summary.PLOT_MODULES` for the summary's plot
    workers."""
    from multiprocessing import forkserver

    multiprocessing.get_context("forkserver").set_forkserver_preload(list(dict.fromkeys((*WORKER_PRELOAD, *also))))
    forkserver.ensure_running()


class _WorkerPool:
    """Worker processes made by a fork server that preloads this module (numpy, scipy, soundfile,
    soxr, PyAV), so each new worker is a cheap fork, not a fresh interpreter that imports
    everything again (~1 s per worker otherwise). Not fork: the caller may be a Dagster step
    with threads."""

    def __init__(self, state: tuple):
        self.state = state
        self.context = multiprocessing.get_context("forkserver")
        self.context.set_forkserver_preload(list(WORKER_PRELOAD))
        self._lifeline_r, self._lifeline_w = self.context.Pipe(duplex=False)
        self.workers: list[_Worker] = []
        self.started_any = False  # has any worker of this pool ever become ready?
        self.start_failures = 0  # workers that died before being ready, since the last one that started

    def spawn(self) -> _Worker:
        for attempt in range(3):
            try:
                worker = _Worker(self.context, self._lifeline_r, self.state)
                break
            except (EOFError, OSError) as exc:
                # The fork server died (killed, OOM) and multiprocessing has not noticed yet; the
                # next attempt's ensure_running() starts a new one.
                if attempt == 2:
                    raise AsrAssetsError(f"cannot start a feature worker process: {type(exc).__name__}: {exc}") from exc
                time.sleep(0.2 * (attempt + 1))
        self.workers.append(worker)
        return worker

    def receive(self, worker: _Worker):
        """The next message of ``worker`` (None: it has died); handles ``ready`` itself."""
        try:
            message = worker.conn.recv()
        except (EOFError, OSError):
            return None
        if message[0] == "ready":
            worker.ready = True
            self.started_any = True
            self.start_failures = 0
        elif message[0] == "error":
            _, _, exc, text = message
            raise exc from _RemoteTraceback(text)
        return message

    def buried(self, worker: _Worker) -> None:
        """Forget ``worker`` (dead or killed); raise if workers cannot even start."""
        worker.reap()
        self.workers.remove(worker)
        if worker.ready:
            return
        self.start_failures += 1
        if not self.started_any or self.start_failures >= _START_FAILURES:
            raise AsrAssetsError(
                f"feature worker processes die at start-up ({worker.describe_exit()}; multiprocessing re-imports "
                "__main__: run from a file or a notebook, not stdin; or run with workers=1 and "
                "utterance_timeout_s=None to see the error in-process)")

    def check_start(self, now: float) -> None:
        for worker in self.workers:
            if not worker.ready and now - worker.spawned > _START_LIMIT_S:
                raise AsrAssetsError(f"a feature worker process did not start within {_START_LIMIT_S:g} s "
                                     "(a frontend or plugin that blocks when it is unpickled?)")

    def submit(self, fn, *args) -> Future:
        """Run ``fn(*args)`` in a worker and wait for it (for one-off calls: diagnostics, tests)."""
        worker = next((w for w in self.workers if not w.queued), None) or self.spawn()
        future: Future = Future()
        while not worker.ready:
            if not _wait_ready([worker.conn], _START_LIMIT_S):
                self.check_start(time.monotonic())
            if self.receive(worker) is None:
                self.buried(worker)
                raise AsrAssetsError(f"the feature worker died ({worker.describe_exit()})")
        worker.send(-1, fn, args)
        try:
            message = self.receive(worker)
        except BaseException as exc:
            future.set_exception(exc)
            return future
        finally:
            worker.queued.clear()
        if message is None:
            self.buried(worker)
            future.set_exception(AsrAssetsError(f"the feature worker died ({worker.describe_exit()})"))
        else:
            future.set_result(message[2])
        return future

    def close(self) -> None:
        """Stop every worker: idle ones are asked to exit, busy ones are killed."""
        for worker in self.workers:
            if worker.queued:
                with contextlib.suppress(OSError, ValueError, AttributeError):
                    worker.process.kill()
            else:
                with contextlib.suppress(OSError, ValueError):
                    worker.conn.send(None)
        for worker in self.workers:
            with contextlib.suppress(OSError, ValueError, AssertionError):
                worker.process.join(5)
            if worker.process.exitcode is None:
                worker.kill()
            else:
                worker.reap()
        self.workers.clear()
        for end in (self._lifeline_w, self._lifeline_r):
            with contextlib.suppress(OSError):
                end.close()

    def __enter__(self) -> "_WorkerPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _pool(workers: int, state: tuple) -> _WorkerPool:
    """A pool for ``state`` (frontend, decode config, duration tolerance); workers are started on
    demand (``workers`` is kept for the call sites' readability)."""
    return _WorkerPool(state)


def _timeout_result(task: _Task, config: ExtractionConfig, limit: float) -> tuple:
    return (None, 0.0, 0, "timeout",
            f"no result within {limit:g} s (limit {config.describe_limit(task.expected_samples)}): the worker was "
            "killed and replaced (a hung decoder or frontend: a FIFO or device that never delivers data, "
            "a stalled network or file system, a pathological input)", 0.0, 0.0, "")


def _run(tasks: list[_Task], state: tuple, workers: int, config: ExtractionConfig = ExtractionConfig()):
    """Yield ``(task, result)`` in task order, with at most ``4 * workers`` results held.

    ``workers <= 1`` without a time limit (``config.utterance_timeout_s=None``) runs in this
    process (no crash isolation, no time limit). Otherwise in worker processes (see
    :class:`_WorkerPool`): a worker that dies costs the utterance it was running (after one
    retry in a fresh worker), one that overruns the utterance's time limit is killed and the
    utterance reported as a ``"timeout"``; queued utterances go to other workers.
    """
    if workers <= 1 and config.utterance_timeout_s is None:
        _STATE.update(frontend=state[0], decode=state[1], duration_tolerance=state[2])
        logger.debug("featurizing %d utterances in this process (workers=1, no time limit)", len(tasks))
        try:
            yield from _results((task, _featurize(task)) for task in tasks)
        finally:
            reader = _STATE.pop("segments", None)
            if reader is not None:
                reader.close()  # no file stays open in this process after the run
        return
    if not tasks:
        return
    logger.debug("featurizing %d utterances in up to %d worker processes", len(tasks),
                 min(max(1, workers), len(tasks)))
    with _WorkerPool(state) as pool:
        yield from _results(_schedule(pool, tasks, max(1, workers), config))


def _schedule(pool: _WorkerPool, tasks: list[_Task], workers: int, config: ExtractionConfig) -> Iterator[tuple]:
    limits = [config.time_limit_s(task.expected_samples) for task in tasks]
    window = 4 * workers  # results not yet yielded, at most (bounds the payloads held)
    results: dict[int, tuple] = {}
    retry: list[int] = []  # heap of indexes to run again (their worker died under them)
    crashes: dict[int, int] = {}
    fresh = 0  # next index never sent
    head = 0  # next index to yield
    outstanding = len(tasks)  # indexes without a result yet

    def next_index() -> int | None:
        nonlocal fresh
        if retry:
            return heapq.heappop(retry)
        if fresh < len(tasks) and fresh < head + window:
            fresh += 1
            return fresh - 1
        return None

    def start_head(worker: _Worker, now: float) -> None:
        limit = limits[worker.queued[0]] if worker.queued else None
        worker.deadline = now + limit if limit is not None else math.inf

    def requeue(indexes: Iterable[int]) -> None:
        for index in indexes:
            heapq.heappush(retry, index)

    def finish(index: int, result: tuple) -> None:
        nonlocal outstanding
        results[index] = result
        outstanding -= 1

    def lost(worker: _Worker, *, timed_out: bool) -> None:
        """``worker`` is dead or was killed: settle its head task, requeue the rest, forget it."""
        worker.reap()  # its exit status, for the report
        if worker.queued:
            culprit, *waiting = worker.queued
            if timed_out:
                finish(culprit, _timeout_result(tasks[culprit], config, limits[culprit]))
            else:
                crashes[culprit] = crashes.get(culprit, 0) + 1
                if crashes[culprit] >= 2:
                    finish(culprit, (None, 0.0, 0, "worker", _CRASHED.format(how=worker.describe_exit()), 0.0, 0.0, ""))
                else:
                    waiting.append(culprit)  # once more, in another worker: the kill may not be its fault
            requeue(waiting)
            worker.queued.clear()
        pool.buried(worker)

    while head < len(tasks):
        while head in results:
            yield tasks[head], results.pop(head)
            head += 1
        if head >= len(tasks):
            break
        now = time.monotonic()
        # Enough workers for the work that is left (replacing dead and killed ones).
        while len(pool.workers) < min(workers, outstanding):
            pool.spawn()
        for worker in pool.workers:
            while worker.ready and len(worker.queued) < _DEPTH:
                index = next_index()
                if index is None:
                    break
                try:
                    worker.send(index, _featurize, (tasks[index],))
                except (OSError, ValueError):  # died meanwhile: noticed below through its sentinel
                    requeue([index])
                    break
                if len(worker.queued) == 1:
                    start_head(worker, now)
        deadline = min([w.deadline for w in pool.workers]
                       + [w.spawned + _START_LIMIT_S for w in pool.workers if not w.ready])
        timeout = None if deadline == math.inf else max(0.0, deadline - now)
        handles = {}
        for worker in pool.workers:
            handles[worker.conn] = worker
            handles[worker.process.sentinel] = worker
        ready = _wait_ready(list(handles), timeout)
        now = time.monotonic()
        dead: list[_Worker] = []
        for handle in ready:
            worker = handles[handle]
            if worker in dead:
                continue
            while True:  # every message already there (a result may precede the worker's death)
                try:
                    pending = worker.conn.poll()
                except (OSError, ValueError):
                    pending = False
                if not pending:
                    if handle is worker.process.sentinel:
                        dead.append(worker)  # exited, and nothing left to read
                    break
                message = pool.receive(worker)
                if message is None:
                    dead.append(worker)
                    break
                if message[0] == "ok":
                    index = worker.queued.pop(0)
                    assert index == message[1], (index, message[1])
                    finish(index, message[2])
                    start_head(worker, now)  # the next queued task starts now (or later: never early)
        for worker in dead:
            lost(worker, timed_out=False)
        for worker in [w for w in pool.workers if w.queued and now >= w.deadline]:
            worker.kill()
            lost(worker, timed_out=True)
        pool.check_start(now)


if _in_fork_server():
    _arm_fork_server()
