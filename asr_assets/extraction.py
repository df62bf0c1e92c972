"""The extraction loop: record store -> audio -> features -> feature shards (deterministic, parallel).

Entry points:
    - :class:`ExtractionConfig` — workers, part size, decode options, fail_fast.
    - :func:`extract_shards` — compute the missing features of some shards of one split.
    - :class:`ShardStats`, :class:`Failure`.

Work is split across ``workers`` processes (one thread each: per-utterance DSP does not gain
from threads on small machines); results are consumed in record order, so the rows of every part
are the same whatever the number of workers. At most ``4 * workers`` utterances are in flight,
which bounds memory to that many decoded clips (each capped by ``max_decode_s``).
Tasks are ordered shard by shard and a shard's writer commits as soon as its last utterance is
done, so the main process holds at most ``rows_per_part`` payloads of about two shards.
Peak memory is therefore bounded by roughly
``workers x (decoded clip at its native rate <= max_decode_s + DSP buffers)`` in the workers
plus ``(4 x workers + 2 x rows_per_part) x payload`` in the main process, whatever the corpus
size (measured in the README's reliability section).
An utterance that cannot be decoded or featurized becomes a :class:`Failure` and the loop goes
on, unless ``fail_fast``.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import resource
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np
import threadpoolctl

from ._fs import remove_stale_tmp
from .audio import DecodeConfig, load_audio
from .errors import AsrAssetsError
from .feature_cache import ShardWriter, ShardedParquetFeatureCache, cache_key, encode_payload, shard_dir, shard_index, shard_lock
from .frontends import Frontend
from .record_cache import RecordStore


@dataclass(frozen=True)
class ExtractionConfig:
    """Runtime settings of feature extraction (none of them changes the cache key).

    Attributes:
        workers: worker processes; 1 runs in-process. Default: every core.
        rows_per_part: rows per Parquet part (upstream Rust default 256).
        num_shards: shards per split (64).
        ffmpeg_fallback: decode with PyAV when libsndfile cannot.
        max_decode_s: refuse audio longer than this many seconds, before holding it in memory.
        fail_fast: raise on the first failing utterance instead of reporting it.
        duration_tolerance: relative difference allowed between the decoded length and the
            record's duration (at least 0.5 s is always allowed); a bigger one fails the
            utterance, since a truncated file with a full transcript is a harmful training
            example. None disables the check.
    """

    workers: int = len(os.sched_getaffinity(0)) or 1
    rows_per_part: int = 256
    num_shards: int = 64
    ffmpeg_fallback: bool = True
    max_decode_s: float = 60.0
    fail_fast: bool = False
    duration_tolerance: float | None = 0.1


@dataclass
class Failure:
    """One utterance that has no features, and why (a line of the failure report)."""

    utterance_id: str
    audio_source: str | None
    stage: str
    error: str
    shard: int


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
    worker_peak_rss_mib: float = 0.0
    failures: list[Failure] = field(default_factory=list)

    @property
    def xrt_per_core(self) -> float:
        """Seconds of audio featurized per second of worker time (decode + features)."""
        return self.audio_seconds / self.worker_seconds if self.worker_seconds > 0 else 0.0

    def summary(self) -> dict:
        data = asdict(self)
        data.pop("failures")
        return data


@dataclass(frozen=True)
class _Task:
    utterance_id: str
    source: str | None
    hint: str | None
    shard: int
    key: str
    expected_samples: int = 0  # at 16 kHz, from the record cache (manifest or header duration)


_STATE: dict = {}


def _init_worker(frontend: Frontend, decode_config: DecodeConfig, duration_tolerance: float | None) -> None:
    # One BLAS/OpenMP thread per worker: the pool already uses every core. numpy is imported
    # (fork-server preload), so environment variables would do nothing; threadpoolctl sets the
    # loaded libraries themselves (numpy's and scipy's OpenBLAS alike).
    threadpoolctl.threadpool_limits(limits=1)
    _STATE.update(frontend=frontend, decode=decode_config, duration_tolerance=duration_tolerance)


def _featurize(task: _Task) -> tuple:
    """-> (payload, audio seconds, frames, failed stage, error, worker seconds, worker peak RSS MiB)."""
    start = time.perf_counter()
    result = _featurize_timed(task)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    return (*result, time.perf_counter() - start, peak_mib)


def _featurize_timed(task: _Task) -> tuple[bytes | None, float, int, str | None, str | None]:
    frontend: Frontend = _STATE["frontend"]
    if task.source is None:
        return None, 0.0, 0, "decode", "record has neither audio_path nor audio_blob_path"
    try:
        samples = load_audio(task.source, hint=task.hint, config=_STATE["decode"], target_rate=frontend.sample_rate)
    except AsrAssetsError as exc:
        return None, 0.0, 0, "decode", str(exc)
    except Exception as exc:  # a decoder bug on hostile input must not stop the run
        return None, 0.0, 0, "decode", f"{type(exc).__name__}: {exc}"
    seconds = len(samples) / frontend.sample_rate
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
    except Exception as exc:
        return None, seconds, 0, "featurize", f"{type(exc).__name__}: {exc}"
    if features.ndim != 2 or features.shape[0] == 0 or features.shape[1] != frontend.feature_dim:
        return None, seconds, 0, "featurize", f"implausible feature shape {features.shape} (want [frames>0, {frontend.feature_dim}])"
    if not np.isfinite(features).all():
        return None, seconds, 0, "featurize", f"{int((~np.isfinite(features)).sum())} non-finite feature values"
    return encode_payload(features), seconds, int(features.shape[0]), None, None


def plan_shard_tasks(store: RecordStore, frontend_hash: str, shards: Iterable[int], num_shards: int) -> dict[int, list[_Task]]:
    """Records of ``store`` that fall in ``shards``, as tasks in record order."""
    wanted = set(shards)
    plan: dict[int, list[_Task]] = {s: [] for s in sorted(wanted)}
    for item in store:
        key = cache_key(item["utterance_id"], frontend_hash)
        shard = shard_index(key, num_shards)
        if shard in wanted:
            source = item.get("audio_blob_abspath") or item.get("audio_path")
            plan[shard].append(_Task(item["utterance_id"], source, item.get("audio_path"), shard, key,
                                     int(item.get("num_samples") or 0)))
    return plan


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
    with contextlib.ExitStack() as locks:
        for shard in sorted(plan):  # sorted: two runs over overlapping shards cannot deadlock
            locks.enter_context(shard_lock(split_root, shard, fhash))
        return _extract_locked(plan, split_root, frontend, fhash, config, progress)


def _extract_locked(plan, split_root, frontend: Frontend, fhash: str, config: ExtractionConfig, progress) -> dict[int, ShardStats]:
    reader = ShardedParquetFeatureCache(split_root, config.num_shards)
    stats = {s: ShardStats(shard=s, records=len(tasks)) for s, tasks in plan.items()}
    todo: list[_Task] = []
    orphans: dict[int, list[str]] = {}
    for shard, tasks in plan.items():
        remove_stale_tmp(shard_dir(split_root, shard))  # left by killed writers
        present = reader.keys(shard, frontend_hash=fhash)
        wanted = {task.key for task in tasks}
        orphans[shard] = sorted(present - wanted)  # records gone from the record cache
        for task in tasks:
            if task.key in present:
                stats[shard].skipped += 1
            else:
                todo.append(task)
    metadata = {"frontend": frontend.name, "frontend_hash": fhash, "config_repr": frontend.config_repr(),
                "feature_dim": frontend.feature_dim, "sample_rate_hz": frontend.sample_rate}
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
    try:
        for done, (task, result) in enumerate(_run(todo, (frontend, decode, config.duration_tolerance), config.workers), start=1):
            payload, seconds, frames, stage, error, busy, peak_mib = result
            shard_stats = stats[task.shard]
            shard_stats.worker_seconds += busy
            shard_stats.worker_peak_rss_mib = max(shard_stats.worker_peak_rss_mib, peak_mib)
            if payload is None:
                failure = Failure(task.utterance_id, task.source, stage or "featurize", error or "unknown", task.shard)
                if config.fail_fast:
                    raise AsrAssetsError(f"utterance {task.utterance_id!r} ({task.source}): {failure.stage}: {failure.error}")
                shard_stats.failed += 1
                shard_stats.failures.append(failure)
            else:
                writers[task.shard].add_payload(task.key, payload)
                shard_stats.computed += 1
                shard_stats.audio_seconds += seconds
                shard_stats.frames += frames
            remaining[task.shard] -= 1
            if remaining[task.shard] == 0:
                writers[task.shard].close()  # tasks come shard by shard: at most ~2 writers hold rows
            if progress is not None:
                progress(done, len(todo))
    finally:
        for shard, writer in writers.items():
            writer.close()
            stats[shard].parts_written = len(writer.parts_written)
    return stats


_CRASHED = "worker process died (killed by a signal, e.g. a decoder crash) while decoding or featurizing this utterance"


def _pool(workers: int, state: tuple) -> ProcessPoolExecutor:
    # forkserver, not fork: the caller may be a Dagster step with threads. Preloading this module
    # in the fork server (numpy, scipy, soundfile, soxr, PyAV) makes each new worker a cheap fork
    # instead of a fresh interpreter that imports everything again (~1 s per pool otherwise).
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["asr_assets.extraction", "av"])
    return ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_init_worker, initargs=state)


def _isolated(task: _Task, state: tuple):
    """Run one task alone in a fresh worker; a crash there is this task's own."""
    with _pool(1, state) as pool:
        try:
            return pool.submit(_featurize, task).result()
        except BrokenProcessPool:
            return None, 0.0, 0, "worker", _CRASHED, 0.0, 0.0


def _ping() -> bool:
    return True


def _check_workers_start(state: tuple) -> None:
    """Raise if a fresh worker cannot even run a no-op (a broken environment, not bad audio)."""
    with _pool(1, state) as pool:
        try:
            pool.submit(_ping).result()
        except BrokenProcessPool as exc:
            raise AsrAssetsError(
                "feature worker processes die at start-up (multiprocessing re-imports __main__: run from a "
                "file or a notebook, not stdin; or run with workers=1 to see the error in-process)"
            ) from exc


def _run(tasks: list[_Task], state: tuple, workers: int):
    """Yield ``(task, result)`` in task order, with at most ``4 * workers`` in flight.

    ``workers <= 1`` runs in this process (no crash isolation). Otherwise, when a worker dies
    (segfault or OOM kill on hostile input), the utterances that were in flight are re-run one
    by one in fresh workers, the culprit is reported as a failure, and the run goes on.
    """
    if workers <= 1:
        _STATE.update(frontend=state[0], decode=state[1], duration_tolerance=state[2])
        for task in tasks:
            yield task, _featurize(task)
        return
    pending = deque(tasks)
    healthy = False  # has any worker ever finished a task?
    while pending:
        with _pool(min(workers, len(pending)), state) as pool:
            window: deque = deque()
            while pending and len(window) < 4 * workers:
                task = pending.popleft()
                window.append((task, pool.submit(_featurize, task)))
            while window:
                task, future = window.popleft()
                try:
                    result = future.result()
                except BrokenProcessPool:
                    if not healthy:
                        _check_workers_start(state)
                        healthy = True
                    for suspect in [task, *(t for t, _ in window)]:
                        yield suspect, _isolated(suspect, state)
                    window.clear()
                    break  # a new pool for what is left
                healthy = True
                yield task, result
                if pending:
                    nxt = pending.popleft()
                    window.append((nxt, pool.submit(_featurize, nxt)))
