"""The two steps of the graph as plain functions (the Dagster assets call these; so can you).

Entry points:
    - :func:`build_record_cache` — manifests -> ``record_cache/<split>.jsonl`` + report.
    - :func:`build_record_caches` — every split in one pass over the manifests.
    - :func:`record_config` — the record filters, split and caps of some settings.
    - :func:`build_feature_shards` — record cache -> feature shards of one frontend + reports.
    - :func:`write_jsonl_report` — atomic JSONL report writer.

Example (no Dagster)::

    from asr_assets.pipeline import build_record_cache, build_feature_shards
    from asr_assets.settings import Settings
    s = Settings(manifests=("data/cv",), output="artifacts")
    for split in ("train", "validation", "test"):
        build_record_cache(s, split)
        build_feature_shards(s, "squeezeformer", split, range(s.num_shards))
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import storage
from ._fs import file_lock, tmp_path_for
from .audio import probe_duration
from .extraction import ExtractionConfig, ShardStats, extract_shards
from .frontends import Frontend
from .logs import TRACE, native_stderr, trace
from .manifest_batches import ManifestProblem, read_ahead_manifest_batches
from .manifests import ManifestRow, one_walk_per_folder
from .record_batches import BatchRecordBuilder, SplitRecords
from .record_cache import RecordCacheWriter, RecordStore, WriteSummary, duration_counts
from .records import RecordConfig, Rejection
from .settings import SPLITS, Settings

logger = logging.getLogger(__name__)


def write_jsonl_report(path: str | os.PathLike, rows: Iterable[dict]) -> int:
    """Write ``rows`` as UTF-8 JSONL to ``path`` atomically (temp file + ``os.replace``).

    Returns the number of rows. An empty report is written as an empty file, so a re-run that
    fixed every failure also clears the old report. On an object store (a URL): one PUT.
    """
    if storage.is_url(path):
        lines = [json.dumps(row, ensure_ascii=False) + "\n" for row in rows]
        storage.put(str(path), "".join(lines).encode("utf-8"))
        return len(lines)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path_for(path)
    count = 0
    with open(tmp, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    os.replace(tmp, path)
    return count


class DurationProbe:
    """Durations read from audio headers, remembered across builds in
    ``<output>/record_cache/probed_durations.parquet`` keyed by (path, size, mtime_ns), so a
    corpus without a duration column (Common Voice) is probed once, not at every manifest drop.

    Embedded bytes are probed every time (cheap: no file system access). The cache file is
    replaced atomically; two builds saving at once may drop each other's new entries, which are
    then probed again.

    Remote audio (``s3://...``) is fetched once into the local content cache
    (:func:`asr_assets.storage.fetch`) and probed there, keyed by (URL, size, modification time);
    on a remote output the cache file is an object (read and written with one request each).
    """

    def __init__(self, path: Path, workers: int = 1):
        self.path = path
        self.workers = max(1, workers)
        self.known: dict[tuple[str, int, int], float] = {}
        self.added = 0
        self._pool = None
        self.remote = storage.is_url(path)
        if self.remote or path.exists():
            try:
                table = (storage.read_table(str(path)) if self.remote else pq.read_table(path)).to_pydict()
                self.known = dict(zip(zip(table["path"], table["size"], table["mtime_ns"]), table["duration_s"]))
            except (pa.ArrowException, KeyError, OSError):
                self.known = {}  # a damaged cache is only a cache

    def __call__(self, row: ManifestRow) -> float:
        if row.audio_bytes:
            return probe_duration(row.audio_bytes, hint=row.audio_path)
        if row.audio_path is None:
            raise ValueError("no audio to probe")
        if storage.is_url(row.audio_path):
            meta = storage.info(row.audio_path)
            key = (row.audio_path, meta.size, meta.mtime_ns)
            if key not in self.known:
                self.known[key] = probe_duration(str(storage.fetch(row.audio_path, known=meta)), hint=row.audio_path)
                self.added += 1
            return self.known[key]
        st = os.stat(row.audio_path)
        key = (row.audio_path, st.st_size, st.st_mtime_ns)
        if key not in self.known:
            self.known[key] = probe_duration(row.audio_path)
            self.added += 1
        return self.known[key]

    def probe_many(self, rows: Sequence[ManifestRow]) -> list:
        """Per row what ``float(self(row))`` returns, or the exception it raises; a file is
        probed once, and with :attr:`workers` > 1 and at least ``_POOL_MIN_PROBES`` headers to
        read, in that many processes."""
        results: list = [None] * len(rows)
        jobs: list[tuple] = []  # (source, hint, cache key or None, row indexes)
        pending: dict[tuple, list[int]] = {}
        for k, row in enumerate(rows):
            if row.audio_bytes:
                jobs.append((row.audio_bytes, row.audio_path, None, [k]))
                continue
            remote = storage.is_url(row.audio_path)
            try:
                if row.audio_path is None:
                    raise ValueError("no audio to probe")
                meta = storage.info(row.audio_path) if remote else None
                st = meta.stat() if remote else os.stat(row.audio_path)
                key = (row.audio_path, st.st_size, st.st_mtime_ns)
                if remote and key not in self.known and key not in pending:  # fetched once, probed locally
                    source = str(storage.fetch(row.audio_path, known=meta))
                else:
                    source = row.audio_path
            except Exception as exc:  # noqa: BLE001 - the row's reason
                results[k] = exc
                continue
            if key in self.known:
                results[k] = self._seconds(self.known[key])
            elif key in pending:
                pending[key].append(k)
            else:
                pending[key] = [k]
                jobs.append((source, None, key, pending[key]))
        if not jobs:
            return results
        if self.workers > 1 and len(jobs) >= _POOL_MIN_PROBES:
            if self._pool is None:
                import concurrent.futures
                import multiprocessing

                self._pool = concurrent.futures.ProcessPoolExecutor(
                    self.workers, mp_context=multiprocessing.get_context("forkserver"))
            chunk = max(1, min(64, len(jobs) // (4 * self.workers)))
            outcomes = list(self._pool.map(_probe_in_worker, [(s, h) for s, h, _, _ in jobs], chunksize=chunk))
        else:
            outcomes = []
            for source, hint, _, _ in jobs:
                try:
                    value = probe_duration(source, hint=hint) if isinstance(source, bytes) else probe_duration(source)
                    outcomes.append((value, None))
                except Exception as exc:  # noqa: BLE001 - the row's reason
                    outcomes.append((None, exc))
        for (source, hint, key, indexes), (value, error, *said) in zip(jobs, outcomes):
            if said and said[0]:
                name = key[0] if key is not None else f"{hint or 'embedded audio'} ({len(source)} bytes)"
                logger.warning("probing %s: the decoder wrote: %s", name, said[0])
            if error is None and key is not None:
                self.known[key] = value
                self.added += 1
            if error is None:
                try:
                    value = self._seconds(value)
                except Exception as exc:  # noqa: BLE001
                    value, error = None, exc
            for k in indexes:
                results[k] = error if error is not None else value
        return results

    @staticmethod
    def _seconds(value) -> float:
        return float(value)

    def close(self) -> None:
        """Stop the probing processes (if any were started)."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def save(self) -> None:
        if not self.added:
            return
        paths, sizes, mtimes = zip(*self.known) if self.known else ((), (), ())
        table = pa.table({"path": list(paths), "size": list(sizes), "mtime_ns": list(mtimes),
                          "duration_s": list(self.known.values())})
        storage.write_atomic(self.path, storage.parquet_bytes(table))


#: Fewer headers than this to read in one batch are read in the building process.
_POOL_MIN_PROBES = 32


class ProbeError(Exception):
    """A probe that failed in a worker process, with the worker's error message."""


def _probe_in_worker(job: tuple) -> tuple:
    """``(seconds, None, stderr)`` or ``(None, ProbeError, stderr)``, in a probe process: what the
    decoder libraries wrote to stderr (libmpg123's warnings name no file) comes back to be logged
    with the file's name."""
    source, hint = job
    with native_stderr() as said:
        try:
            value, error = (probe_duration(source, hint=hint) if isinstance(source, bytes) else probe_duration(source)), None
        except Exception as exc:  # noqa: BLE001 - sent back as the row's reason
            value, error = None, ProbeError(str(exc))
    return value, error, said.text


@dataclass
class RecordCacheResult:
    """Outcome of :func:`build_record_cache`; ``up_to_date``: nothing changed, nothing written."""

    split: str
    summary: WriteSummary
    rejections: list[Rejection] = field(default_factory=list)
    report_path: str = ""
    seconds: float = 0.0
    up_to_date: bool = False


#: Bump when the record-building code changes what a manifest row becomes: every split is then
#: rebuilt once although its inputs did not change.
RECORD_CACHE_CODE_VERSION = "3"  # 3: segment rows (offset/start column); the one-pass build writes the same bytes
#: Settings that decide the records (the rest — workers, frontends, ... — do not).
_RECORD_SETTINGS = ("manifests", "validation_manifests", "source_base", "require_readable_audio",
                    "confine_audio_paths", "allowed_audio_roots", "max_blob_mb")


def record_cache_inputs(settings: Settings, split: str, *, _prints: list[str] | None = None) -> dict | None:
    """What one split's record cache is a function of: the code version, the record settings and a
    stat-only fingerprint of every manifest source (:func:`~asr_assets.manifests.manifest_fingerprint`:
    path, size and mtime of each manifest file; nothing is opened). None when a source is missing
    or unreadable (then the build runs and reports it). Audio files are not fingerprinted: one
    deleted without a manifest change is reported by the feature step when it fails to decode."""
    prints = _manifest_prints(settings) if _prints is None else _prints
    if prints is None:
        return None
    values = {k: getattr(settings, k) for k in _RECORD_SETTINGS}
    values = {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
    values["allowed_audio_roots"] = [str(r) for r in settings.audio_roots()] if settings.confine_audio_paths else []
    if settings.record_options:  # only when set: caches built without them stay up to date
        values["record_options"] = json.loads(json.dumps(dict(settings.record_options), sort_keys=True))
    return {"code_version": RECORD_CACHE_CODE_VERSION, "split": split, "settings": values, "manifests": list(prints)}


def _manifest_prints(settings: Settings) -> list[str] | None:
    """The fingerprint digest of every source, or None when one is missing or unreadable."""
    from .manifests import manifest_fingerprint

    prints = []
    for source in (*settings.manifests, *settings.validation_manifests):
        digest = manifest_fingerprint(source)["digest"]
        if digest in ("missing", "unreadable"):
            return None
        prints.append(digest)
    return prints


def _inputs_path(settings: Settings, split: str) -> Path:
    return settings.record_cache_path(split).with_suffix(".inputs.json")


def _up_to_date(settings: Settings, split: str, inputs: dict | None) -> RecordCacheResult | None:
    """The stored result of the last build of ``split`` if its inputs are ``inputs`` and its files
    are intact, else None."""
    from .record_cache import record_store_is_valid

    path, report = settings.record_cache_path(split), settings.records_report_path(split)
    if storage.is_url(path):
        return _remote_up_to_date(settings, split, inputs)
    try:
        state = json.loads(_inputs_path(settings, split).read_text(encoding="utf-8"))
        if inputs is None or state.get("inputs") != inputs or not report.is_file():
            return None
        if path.stat().st_size != state["summary"]["jsonl_bytes"]:
            return None
        if path.stat().st_size and not record_store_is_valid(path):
            return None
        count = 0
        with open(report, encoding="utf-8") as handle:  # every line must parse; none is kept
            for line in handle:
                if line.strip():
                    Rejection.from_report(json.loads(line))
                    count += 1
    except (OSError, ValueError, KeyError, TypeError):
        return None
    samples = RecordStore(path).sidecars["num_samples"]  # sidecar only: the JSONL is not parsed
    summary = WriteSummary(str(path), state["summary"]["utterances"], state["summary"]["audio_seconds"],
                           state["summary"]["blobs"], _sample_duration_counts(samples), state["summary"]["sha256"])
    return RecordCacheResult(split, summary, RejectionLog(report, count), str(report), 0.0, up_to_date=True)


def _sample_duration_counts(samples: np.ndarray | None, chunk: int = 1 << 20) -> list[int]:
    """:func:`~asr_assets.record_cache.duration_counts` of a ``num_samples`` sidecar (16 kHz
    samples), a chunk at a time."""
    counts = duration_counts([])
    for start in range(0, 0 if samples is None else len(samples), chunk):
        part = duration_counts(np.asarray(samples[start:start + chunk], dtype=np.float64) / 16000.0)
        counts = [a + b for a, b in zip(counts, part)]
    return counts


def _remote_up_to_date(settings: Settings, split: str, inputs: dict | None) -> RecordCacheResult | None:
    """:func:`_up_to_date` of a record cache on an object store: the inputs object names the
    version the commit object still names, and the report exists."""
    from .errors import CacheCorruptError
    from .record_cache import read_commit

    path, report = str(settings.record_cache_path(split)), str(settings.records_report_path(split))
    try:
        state = json.loads(storage.read_bytes(str(_inputs_path(settings, split))))
        commit = read_commit(path)
        if inputs is None or state.get("inputs") != inputs or commit is None:
            return None
        if state["summary"].get("version") != commit["version"]:
            return None
        text = storage.read_bytes(report).decode("utf-8")
        rejections = [Rejection.from_report(json.loads(line)) for line in text.splitlines() if line]
        store = RecordStore(path)
    except (OSError, ValueError, KeyError, TypeError, CacheCorruptError):
        return None
    summary = WriteSummary(path, state["summary"]["utterances"], state["summary"]["audio_seconds"],
                           state["summary"]["blobs"], _sample_duration_counts(store.sidecars["num_samples"]),
                           state["summary"]["sha256"])
    return RecordCacheResult(split, summary, rejections, report, 0.0, up_to_date=True)


def _save_inputs(settings: Settings, split: str, inputs: dict | None, summary: WriteSummary) -> None:
    """Write ``<split>.inputs.json`` (what the build read, and its summary), last: the record of
    a complete build. On an object store the summary names the commit's version, locally the
    JSONL's size (what :func:`_up_to_date` / :func:`_remote_up_to_date` compare)."""
    target = _inputs_path(settings, split)
    remote = storage.is_url(target)
    if inputs is None:
        storage.remove(str(target)) if remote else target.unlink(missing_ok=True)
        return
    check = ({"version": summary.version} if remote
             else {"jsonl_bytes": settings.record_cache_path(split).stat().st_size})
    state = {"inputs": inputs, "summary": {
        "utterances": summary.utterances, "audio_seconds": summary.audio_seconds, "blobs": summary.blobs,
        "sha256": summary.sha256, **check}}
    storage.write_atomic(target, json.dumps(state, indent=1, sort_keys=True).encode("utf-8"))


def record_config(settings: Settings) -> tuple[RecordConfig, dict[str, int]]:
    """The :class:`RecordConfig` of ``settings`` (its ``record_options`` applied) and the
    per-split record caps (``record_options["max_records"]``).

    Raises:
        ConfigError: an unknown option or a value RecordConfig refuses.
    """
    from .errors import ConfigError

    options = dict(settings.record_options)
    caps = {str(k): int(v) for k, v in (options.pop("max_records", None) or {}).items() if v is not None}
    try:
        config = RecordConfig(require_readable_audio=settings.require_readable_audio,
                              max_audio_file_bytes=settings.max_blob_bytes, **options)
    except TypeError as exc:
        raise ConfigError(f"record_options: {exc}") from None
    return config, caps


class RejectionLog(Sequence):
    """The rejections of a record-cache build, read back from its report when used (a build keeps
    no per-row object: ``len`` is known, iteration and indexing parse the report JSONL).

    Items are :class:`~asr_assets.records.Rejection` (``Rejection.from_report``: ``source`` is the
    manifest path, as for a split found up to date).
    """

    def __init__(self, report_path: str | os.PathLike, count: int):
        self.path = report_path if storage.is_url(report_path) else Path(report_path)
        self.count = count
        self._items: list[Rejection] | None = None

    def _lines(self) -> Iterable[str]:
        if storage.is_url(self.path):  # an object: one GET
            yield from storage.read_bytes(str(self.path)).decode("utf-8").splitlines()
            return
        with open(self.path, encoding="utf-8") as handle:
            yield from handle

    def _load(self) -> list[Rejection]:
        if self._items is None:
            self._items = [Rejection.from_report(json.loads(line)) for line in self._lines() if line.strip()]
        return self._items

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index):
        return self._load()[index]

    def __iter__(self):
        if self._items is not None:
            return iter(self._items)
        return self._stream()

    def _stream(self):
        for line in self._lines():
            if line.strip():
                yield Rejection.from_report(json.loads(line))


def _local_staging() -> Path:
    """``<cache_dir>/staging`` (created): local files of a build whose output is on an object store."""
    staging = storage.cache_dir() / "staging"
    staging.mkdir(parents=True, exist_ok=True)
    return staging


class _SplitBuild:
    """One split of a single-pass build: its store writer, its report (streamed to a temporary
    file), its cap and counts."""

    def __init__(self, settings: Settings, split: str, cap: int | None):
        self.split, self.cap = split, cap
        self.open = cap is None or cap > 0
        self.report = settings.records_report_path(split)
        self.remote = storage.is_url(self.report)
        if self.remote:  # streamed to a local file, published with one PUT
            self._report_tmp = tmp_path_for(_local_staging() / f"records-{split}-{uuid.uuid4().hex[:8]}.jsonl")
        else:
            self.report.parent.mkdir(parents=True, exist_ok=True)
            self._report_tmp = tmp_path_for(self.report)
        self.records = self.rejected = self.file_level = self.skipped = self.duplicates = 0
        self.writer = RecordCacheWriter(settings.record_cache_path(split))
        self._report = open(self._report_tmp, "w", encoding="utf-8")
        self._trace = logger.isEnabledFor(TRACE)

    def problem(self, problem: ManifestProblem) -> None:
        error = problem.error
        self._reject(Rejection(None, self.split, problem.manifest, problem.manifest, problem.rows_read + 1, None,
                               getattr(error, "stage", "manifest"), str(error), line=getattr(error, "line", None)))

    def _reject(self, item: Rejection) -> None:
        self._count(item)
        if self._trace:
            self._trace_rejection(item)

    def _count(self, item: Rejection) -> None:
        """Write a rejection to the report and count it."""
        self._report.write(json.dumps(item.to_report(), ensure_ascii=False) + "\n")
        self.rejected += 1
        if item.utterance_id is None:
            if item.stage == "skipped_manifest":
                self.skipped += 1
            else:
                self.file_level += 1
        elif item.duplicate_of is not None:
            self.duplicates += 1

    def _trace_rejection(self, item: Rejection) -> None:
        trace(logger, "record cache %s: row %d of %s utterance_id=%s not cached (%s): %s", self.split,
              item.row_number, item.manifest_path, item.utterance_id, item.stage, item.reason)

    def add(self, part: SplitRecords) -> None:
        """One batch's records and Rejections of this split (:class:`~asr_assets.record_batches.SplitRecords`);
        stops at the cap (upstream ``--max-*-samples``: what comes after the cap-th record is not
        looked at)."""
        if self.cap is not None and self.records + len(part.rows) >= self.cap:
            part = part.head(self.cap - self.records)
            self.open = False
        if self._trace:
            self._trace_rows(part)
        for item in part.rejections:
            self._count(item)
        self.records += len(part.rows)
        self.writer.add_columns(part.records)

    def _trace_rows(self, part: SplitRecords) -> None:
        """One trace line per row of ``part``, in row order."""
        r = part.records
        records = [(row, k) for k, row in enumerate(part.rows)]
        rejections = [(row, -1 - k) for k, row in enumerate(part.rejection_rows)]
        for _, k in sorted(records + rejections):
            if k < 0:
                self._trace_rejection(part.rejections[-1 - k])
                continue
            blob = r.audio_bytes[k] if r.audio_bytes is not None else None
            trace(logger, "record cache %s: utterance_id=%s audio=%s duration=%.3f s", self.split, r.utterance_id[k],
                  r.audio_path[k] or f"<{len(blob or b'')} embedded bytes>", r.duration_s[k])

    def finish(self) -> WriteSummary:
        summary = self.writer.close()
        self._report.close()
        return summary

    def publish_report(self) -> None:
        if self.remote:
            storage.put(str(self.report), self._report_tmp.read_bytes())
            self._report_tmp.unlink()
            return
        os.replace(self._report_tmp, self.report)

    def abort(self) -> None:
        self.writer.abort()
        self._report.close()
        with contextlib.suppress(OSError):
            self._report_tmp.unlink()


def build_record_caches(settings: Settings, splits: Sequence[str] = SPLITS, *, also: Sequence[str] = (),
                        log: Callable[[str], None] | None = None, progress_interval: int = 1000,
                        progress_level: int = logging.DEBUG) -> dict[str, RecordCacheResult]:
    """Build every split of ``splits`` that is not up to date, reading each manifest once for all.

    One pass streams every manifest in batches (:func:`~asr_assets.manifest_batches.iter_manifest_batches`, parsed by a child process for large manifests: :func:`~asr_assets.manifest_batches.read_ahead_manifest_batches`),
    normalizes and filters each batch (:class:`~asr_assets.record_batches.BatchRecordBuilder`),
    assigns each row its split and appends it to that split's writer (one
    :class:`~asr_assets.record_cache.RecordCacheWriter` per split open at once). Memory stays flat
    in the number of rows apart from the duplicate-id index (12 bytes per id in memory, the rest
    in a temporary file: :class:`~asr_assets.record_batches.DigestClaims`); durations are kept as
    per-bin counts and rejections go to the report as they come. The output of
    every split (JSONL, sidecars, blobs, report) is that of the per-row reference
    (``asr_assets_tests/reference_record_cache.py``) byte for byte.

    Durations missing from the manifest are probed with every core
    (:attr:`Settings.effective_workers <asr_assets.settings.Settings.effective_workers>` processes
    once a batch has enough of them) and remembered in ``record_cache/probed_durations.parquet``.

    Builds of one record-cache folder are serialized by ``record_cache/build.lock`` (on an object
    store a lease lock object, :class:`~asr_assets.storage.ObjectLock`): a second build waiting
    for the first finds its splits up to date.

    ``also``: more splits to build in the same pass if they are stale (not returned; a failure of
    theirs is not raised), as :func:`build_record_cache` does with every split.

    Returns:
        ``{split: RecordCacheResult}`` for ``splits``.

    Raises:
        ManifestError: a manifest source is missing or cannot be opened (the splits that do not
            read it are still written, as their own per-split builds would be).
    """
    results, failed = _record_caches(settings, splits, also, log, progress_interval, progress_level)
    for split in splits:
        if split in failed:
            raise failed[split]
    return results


def _record_caches(settings: Settings, splits: Sequence[str], also: Sequence[str], log, progress_interval: int,
                   progress_level: int) -> tuple[dict[str, RecordCacheResult], dict[str, BaseException]]:
    """Results of ``splits`` (built if stale, together with the stale ones of ``also``) and the
    failure of each split that could not be built."""
    results: dict[str, RecordCacheResult] = {}
    failed: dict[str, BaseException] = {}
    folder = settings.record_cache_path(SPLITS[0]).parent
    lock = (storage.ObjectLock(storage.join(str(folder), "build.lock")) if storage.is_url(folder)
            else file_lock(folder / "build.lock"))
    with lock, one_walk_per_folder():  # one walk of each source: to fingerprint it and to read it
        prints = _manifest_prints(settings)
        inputs = {split: record_cache_inputs(settings, split, _prints=prints) for split in SPLITS}
        stale = []
        for split in dict.fromkeys([*splits, *also]):
            start = time.perf_counter()
            unchanged = _up_to_date(settings, split, inputs[split])
            if unchanged is None:
                stale.append(split)
                continue
            unchanged.seconds = time.perf_counter() - start
            results[split] = unchanged
            if log and split in splits:
                log(f"record_cache[{split}]: up to date ({unchanged.summary.utterances} utterances; manifests, "
                    f"settings and code unchanged since the last build): nothing rewritten")
        if stale:
            built, failed = _build_splits(settings, stale, inputs, log, progress_interval, progress_level)
            results.update(built)
    return {split: results[split] for split in splits if split in results}, failed


def _build_splits(settings: Settings, stale: list[str], inputs: dict, log, progress_interval: int,
                  progress_level: int) -> tuple[dict[str, RecordCacheResult], dict[str, BaseException]]:
    start = time.perf_counter()
    config, caps = record_config(settings)
    external = bool(settings.validation_manifests)
    if external:  # upstream external validation: no hashing into validation/test
        config = replace(config, val_fraction=0.0, test_fraction=0.0)
    folder = settings.record_cache_path(SPLITS[0]).parent
    probe = DurationProbe(folder / "probed_durations.parquet", workers=settings.effective_workers)
    # the duplicate-id table (29 B per id) goes to disk beside the cache, not to a /tmp that may be RAM
    scratch = _local_staging() if storage.is_url(folder) else folder
    scratch.mkdir(parents=True, exist_ok=True)
    builder = BatchRecordBuilder(config, allowed_audio_roots=settings.audio_roots(), probe_many=probe.probe_many,
                                 scratch_dir=str(scratch))
    # (sources, fixed split, splits fed): the validation sources come after the train sources in
    # discovery order, so their ids are claimed after every train row.
    if external:
        passes = [(settings.manifests, None, [s for s in stale if s != "validation"]),
                  (settings.validation_manifests, "validation", [s for s in stale if s == "validation"])]
    else:
        passes = [(settings.manifests, None, list(stale))]
    states: dict[str, _SplitBuild] = {}
    failed: dict[str, BaseException] = {}
    scanned = 0
    try:
        for split in stale:
            states[split] = _SplitBuild(settings, split, caps.get(split))
        for number, (sources, fixed_split, fed) in enumerate(passes):
            later = [s for _, _, f in passes[number + 1:] for s in f]
            if not any(states[s].open for s in (*fed, *later)):
                break
            try:
                read_bytes = any(states[s].open for s in fed)
                for item in read_ahead_manifest_batches(
                        sources, source_base=settings.source_base,
                        max_blob_bytes=settings.max_blob_bytes if read_bytes else None, read_audio_bytes=read_bytes,
                        stat_audio=builder.roots is None):  # confined: nothing outside the roots is stat-ed
                    if isinstance(item, ManifestProblem):
                        for split in fed:
                            if states[split].open:
                                states[split].problem(item)
                        continue
                    wanted = {s for s in fed if states[s].open}
                    if not wanted and not any(states[s].open for s in later):
                        break
                    for split, part in builder.build(item, wanted, fixed_split).items():
                        states[split].add(part)
                    before, scanned = scanned, scanned + len(item)
                    if progress_interval and logger.isEnabledFor(progress_level):  # counts as of the batch's end
                        for mark in range(before // progress_interval + 1, scanned // progress_interval + 1):
                            for split in stale:
                                logger.log(progress_level, "record cache progress split=%s scanned=%d selected=%d "
                                           "not_cached=%d", split, mark * progress_interval, states[split].records,
                                           states[split].rejected)
            except Exception as exc:  # noqa: BLE001 - a missing source fails the splits that read it
                for split in (*fed, *later):
                    failed.setdefault(split, exc)
                break
        summaries = {}
        for split in stale:
            if split in failed:
                states.pop(split).abort()
            else:
                summaries[split] = states[split].finish()
        probe.save()
    except BaseException:
        for state in states.values():
            state.abort()
        raise
    finally:
        probe.close()
        builder.claims.close()
    results = {}
    for split, summary in summaries.items():
        state = states[split]
        state.publish_report()
        _save_inputs(settings, split, inputs[split], summary)  # last: the record of a complete build
        if log:
            problems = f", {state.file_level} manifest file/line problems" if state.file_level else ""
            problems += f", {state.duplicates} duplicate utterance ids" if state.duplicates else ""
            problems += f", {state.skipped} manifest files not read (TSV wins)" if state.skipped else ""
            log(f"record_cache[{split}]: {summary.utterances} utterances, {summary.audio_seconds / 3600:.3f} h, "
                f"{state.rejected - state.file_level - state.skipped} rows not cached{problems} (see {state.report})")
        results[split] = RecordCacheResult(split, summary, RejectionLog(state.report, state.rejected), str(state.report),
                                           time.perf_counter() - start)
    return results, failed


def build_record_cache(settings: Settings, split: str, *, log: Callable[[str], None] | None = None,
                       progress_interval: int = 1000, progress_level: int = logging.DEBUG) -> RecordCacheResult:
    """Build ``<output>/record_cache/<split>.jsonl`` from every manifest of ``settings``.

    Every manifest row of this split that is not cached (filtered, missing audio, unreadable
    header, duplicate id, embedded audio over ``max_blob_mb``) is written to
    ``<output>/reports/records-<split>.jsonl`` with its manifest, row number, line, audio source
    and reason; a duplicate also names the row that keeps the id (``duplicate_of``). So is every
    manifest file that cannot be read, has no usable columns or repeats a column, every skipped
    TSV line (bad UTF-8, wrong cell count), every folder that cannot be listed (stage
    ``manifest``) and every file the TSV-wins rule leaves unread (stage ``skipped_manifest``),
    all with ``utterance_id`` null; the other manifests are read as usual, so no manifest file
    can stop the build.

    A split whose inputs (:func:`record_cache_inputs`) are those of its last complete build is
    not rebuilt: nothing is read or written and the result says ``up_to_date``. Otherwise every
    split that is not up to date is built in the same single pass over the manifests
    (:func:`build_record_caches`), so the calls for the other splits find them up to date.

    Every ``progress_interval`` manifest rows (0: never) a progress line is logged at
    ``progress_level`` (logger ``asr_assets.pipeline``); at trace level, one line per row.

    Raises:
        ManifestError: a manifest source (a root given in the settings) is missing or cannot be
            opened.
    """
    results, failed = _record_caches(settings, [split], SPLITS, log, progress_interval, progress_level)
    if split in failed:
        raise failed[split]
    return results[split]


def record_cache_sha256(settings: Settings, split: str) -> str | None:
    """sha256 of ``split``'s JSONL as of its last complete build (from ``<split>.inputs.json``;
    nothing else is read), or None when there is no such record."""
    try:
        state = json.loads(storage.read_bytes(str(_inputs_path(settings, split))))
        return str(state["summary"]["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def record_cache_is_up_to_date(settings: Settings, split: str) -> bool:
    """Would :func:`build_record_cache` find ``split`` up to date (inputs unchanged, files intact)?"""
    return _up_to_date(settings, split, record_cache_inputs(settings, split)) is not None


def listed_failure_reports(settings: Settings, frontend_name: str, split: str) -> set[str] | None:
    """File names of the shard failure reports of ``frontend_name`` in ``split`` when they are on
    an object store, from one listing (not a request per shard); None for a local output (look at
    each file)."""
    folder = settings.features_report_path(frontend_name, split, 0).parent
    return {f.name for f in storage.list_files(str(folder))} if storage.is_url(folder) else None


def reported_failures(settings: Settings, frontend_name: str, split: str, shard: int) -> set[str]:
    """Utterance ids in a shard's failure report (written by :func:`build_feature_shards`)."""
    report = settings.features_report_path(frontend_name, split, shard)
    if storage.is_url(report):
        try:
            text = storage.read_bytes(str(report)).decode("utf-8")
        except FileNotFoundError:
            return set()
    elif not report.is_file():
        return set()
    else:
        text = report.read_text(encoding="utf-8")
    return {json.loads(line)["utterance_id"] for line in text.splitlines() if line}


def feature_shards_with_work(settings: Settings, frontend: str | Frontend, split: str) -> list[int]:
    """Shards of ``split`` where :func:`build_feature_shards` has something to compute or
    tombstone; utterances already in a shard's failure report do not count (a run of their
    shard retries them). Reads the record store, part footers and reports, no payload."""
    from .extraction import shards_with_work
    from .record_cache import record_store_is_valid

    fe = settings.frontend(frontend) if isinstance(frontend, str) else frontend
    path = settings.record_cache_path(split)
    if storage.is_url(path):
        if not record_store_is_valid(path):
            return []
    elif not path.is_file() or (path.stat().st_size and not record_store_is_valid(path)):
        return []
    failed: set[str] = set()
    listed = listed_failure_reports(settings, fe.name, split)
    for shard in range(settings.num_shards):
        if listed is None or settings.features_report_path(fe.name, split, shard).name in listed:
            failed |= reported_failures(settings, fe.name, split, shard)
    return shards_with_work(RecordStore(path), settings.feature_split_root(split), fe,
                            settings.num_shards, failed)


#: tqdm bars of :func:`build_feature_shards` (see :func:`progress_bars`): ``enabled`` None means
#: "when the stream is a terminal"; ``file`` None means ``sys.stderr`` at the time of the call.
_PROGRESS: dict = {"enabled": None, "file": None}


@contextlib.contextmanager
def progress_bars(enabled: bool | None = None, file=None):
    """Within the block, :func:`build_feature_shards` shows a tqdm bar over utterances (rate and
    ETA) on ``file`` (default: ``sys.stderr``) when ``enabled`` is True, never when False, and
    when ``file`` is a terminal when None (the default outside the block too). While a bar shows,
    the progress log lines every ``log_every_s`` are left out (the final one is kept)."""
    previous = dict(_PROGRESS)
    _PROGRESS.update(enabled=enabled, file=file)
    try:
        yield
    finally:
        _PROGRESS.update(previous)


def _progress_stream():
    """The stream a bar would go to, or None when no bar should show."""
    import sys

    stream = _PROGRESS["file"] if _PROGRESS["file"] is not None else sys.stderr
    if _PROGRESS["enabled"] is None:
        isatty = getattr(stream, "isatty", None)
        try:
            return stream if isatty is not None and isatty() else None
        except ValueError:  # a closed stream
            return None
    return stream if _PROGRESS["enabled"] else None


def build_feature_shards(
    settings: Settings,
    frontend: str | Frontend,
    split: str,
    shards: Sequence[int],
    *,
    log: Callable[[str], None] | None = None,
    log_every_s: float = 10.0,
) -> dict[int, ShardStats]:
    """Compute the missing features of ``frontend`` (a name, resolved with the settings'
    overrides and plugins, or a Frontend) for ``shards`` of ``split``.

    Requires ``record_cache/<split>.jsonl`` (see :func:`build_record_cache`). Failures of each
    shard are written to ``<output>/reports/<frontend>/<split>/shard_NN.jsonl``; what the run did
    in each shard (counts, the parts it wrote, per-bin feature sums) to the shard's stats sidecar
    (:func:`shard_stats_path`), which :mod:`asr_assets.summary` merges.

    Progress: ``log(...)`` every ``log_every_s`` seconds and at the end, or a tqdm bar (see
    :func:`progress_bars`).

    Returns:
        ``{shard: ShardStats}``.
    """
    if isinstance(frontend, str):
        frontend = settings.frontend(frontend)
    frontend_name = frontend.name
    store = RecordStore(settings.record_cache_path(split))
    config = ExtractionConfig(
        workers=settings.effective_workers, rows_per_part=settings.rows_per_part, num_shards=settings.num_shards,
        ffmpeg_fallback=settings.ffmpeg_fallback, max_decode_s=settings.max_decode_s, fail_fast=settings.fail_fast,
        duration_tolerance=settings.duration_tolerance, utterance_timeout_s=settings.utterance_timeout_s,
        timeout_per_audio_s=settings.timeout_per_audio_s,
    )
    last = [time.monotonic()]
    stream = _progress_stream()
    bar = None
    if stream is not None:  # started now, so rate and ETA include the workers' start-up
        from tqdm import tqdm

        bar = tqdm(total=None, desc=f"{frontend_name}[{split}]", unit="utt", file=stream, disable=False,
                   dynamic_ncols=True, mininterval=0.5, smoothing=0.1)

    def progress(done: int, total: int) -> None:
        if bar is not None:
            if bar.total != total:  # known from the first utterance on
                bar.total = total
            bar.update(done - bar.n)
        if log and (done == total or (bar is None and time.monotonic() - last[0] >= log_every_s)):
            last[0] = time.monotonic()
            log(f"{frontend_name}[{split}]: {done}/{total} utterances featurized")

    split_root = settings.feature_split_root(split)
    start = time.perf_counter()
    try:
        stats = extract_shards(store, split_root, frontend, shards, config, progress=progress)
    finally:
        if bar is not None:
            bar.leave = bar.n > 0  # nothing to compute: no bar left behind
            bar.close()
    run = {"run": uuid.uuid4().hex[:16], "finished_at": round(time.time(), 3),
           "wall_seconds": round(time.perf_counter() - start, 3),
           "audio_seconds": round(sum(s.audio_seconds for s in stats.values()), 3)}
    reports = listed_failure_reports(settings, frontend_name, split)
    listed = None  # on an object store, what each shard holds now: one listing, not one per shard
    if storage.is_url(split_root):
        from .feature_cache import list_shard_files

        listed = {shard: {f.name for f in files} for shard, files in list_shard_files(split_root).items()}
    for shard, shard_stats in stats.items():
        report = settings.features_report_path(frontend_name, split, shard)
        if shard_stats.failures:
            write_jsonl_report(report, (
                {"utterance_id": f.utterance_id, "audio_source": f.audio_source, "stage": f.stage, "error": f.error,
                 "split": split, "shard": shard, "frontend": frontend_name,
                 **({"limit_s": f.limit_s} if f.limit_s is not None else {})} for f in shard_stats.failures))
        elif reports is not None:
            if report.name in reports:
                storage.remove(str(report))  # every earlier failure of this shard has features now
        elif report.exists():
            report.unlink()  # every earlier failure of this shard has features now
        record_shard_stats(split_root, shard, frontend, shard_stats, run,
                           listed=None if listed is None else listed.get(shard, set()))
    return stats


# --- per-shard stats sidecar (feature side) -----------------------------------------------------

#: Format of the shard stats sidecar; readers ignore a sidecar of another format.
SHARD_STATS_FORMAT = 1


def shard_stats_path(split_root: str | os.PathLike, shard: int, frontend_hash: str) -> Path | str:
    """``<split_root>/feature_shards/features_NN/.stats-<hash12>.json``: what feature runs wrote in
    one shard for one frontend (readers of the cache list ``part_*.parquet`` only).

    Content (JSON)::

        {"format": 1, "frontend": "squeezeformer", "frontend_hash": "...", "feature_dim": 80,
         "moments": [{"parts": [part file names], "utterances": n, "frames": F,
                      "sum": [float64 x dim], "sumsq": [float64 x dim]}, ...],
         "last_run": {"run", "finished_at" (unix s), "wall_seconds", "audio_seconds" (of the whole
                      run), "records", "computed", "skipped", "failed", "tombstoned",
                      "shard_audio_seconds", "worker_seconds", "frames", "parts": [names]}}

    One ``moments`` entry per run that computed something: per-bin sums over the frames it
    wrote, valid while all its parts exist (compaction replaces them, and the entry is dropped).
    """
    from .feature_cache import shard_dir

    if storage.is_url(split_root):
        return storage.join(shard_dir(split_root, shard), f".stats-{frontend_hash}.json")
    return shard_dir(split_root, shard) / f".stats-{frontend_hash}.json"


def read_shard_stats(split_root: str | os.PathLike, shard: int, frontend_hash: str) -> dict | None:
    """The shard stats sidecar (:func:`shard_stats_path`), or None if absent, unreadable or of
    another format (it is a summary, never needed to read features)."""
    path = shard_stats_path(split_root, shard, frontend_hash)
    try:
        data = json.loads(storage.read_bytes(path) if storage.is_url(path) else path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == SHARD_STATS_FORMAT else None


def record_shard_stats(split_root: str | os.PathLike, shard: int, frontend: Frontend, stats: ShardStats,
                       run: dict, listed: set[str] | None = None) -> None:
    """Update a shard's stats sidecar after a feature run: ``last_run`` from ``stats`` and ``run``
    (run id, time, wall seconds, audio seconds of the whole run), one ``moments`` entry more if it
    computed anything, entries whose parts are gone dropped. Atomic; locally under the shard's
    writer lock, on an object store one PUT (last writer wins). ``listed``: on an object store,
    the names of the shard's files as listed after the run (no sidecar GET when it has none, and
    no listing of its own)."""
    from .feature_cache import shard_dir, shard_lock

    fhash = frontend.frontend_hash()
    directory = shard_dir(split_root, shard)
    # On an object store without the lock (it costs several requests): two runs finishing one
    # shard at once may drop each other's entry, and the summary then has no moments for it.
    with storage.nothing() if storage.is_url(split_root) else shard_lock(split_root, shard, fhash):
        never = listed is not None and storage.basename(str(shard_stats_path(split_root, shard, fhash))) not in listed
        old = None if never else read_shard_stats(split_root, shard, fhash)
        if old is None and not stats.records and not stats.tombstoned:
            return  # an empty shard, never described: nothing to say
        old = old or {}
        if storage.is_url(split_root):  # one listing of the shard, unless the caller listed it
            present = listed if listed is not None else {f.name for f in storage.list_files(directory)}
        else:
            present = {name for m in old.get("moments", []) for name in m.get("parts", ())
                       if (directory / name).is_file()}
        moments = [m for m in old.get("moments", []) if m.get("parts") and all(name in present for name in m["parts"])]
        if stats.computed and stats.feature_sum is not None:
            moments.append({"parts": list(stats.part_names), "utterances": stats.computed, "frames": stats.frames,
                            "sum": stats.feature_sum.tolist(), "sumsq": stats.feature_sumsq.tolist()})
        state = {
            "format": SHARD_STATS_FORMAT, "frontend": frontend.name, "frontend_hash": fhash,
            "feature_dim": frontend.feature_dim, "moments": moments,
            "last_run": {**run, "records": stats.records, "computed": stats.computed, "skipped": stats.skipped,
                         "failed": stats.failed, "tombstoned": stats.tombstoned,
                         "shard_audio_seconds": round(stats.audio_seconds, 3),
                         "worker_seconds": round(stats.worker_seconds, 3), "frames": stats.frames,
                         "parts": list(stats.part_names)},
        }
        # not synced (one fsync per shard per run, ~0.2-0.4 s of a 1-hour first run): a summary of
        # the parts, which read_shard_stats treats as absent when a power loss leaves it short
        storage.write_atomic(shard_stats_path(split_root, shard, fhash), json.dumps(state).encode("utf-8"),
                             durable=False)


# --- verification of what a run wrote (feature side) --------------------------------------------


@dataclass
class ShardVerification:
    """Outcome of :func:`verify_feature_shard` for one shard.

    Attributes:
        records: records of the split in this shard.
        with_features: of them, with a live key in the shard index.
        reported: of them, without features but in the shard's failure report.
        unaccounted: utterance ids with neither (at most all of them).
        parts_read: parts whose payloads were read (the new parts named by the caller).
        payloads_read: payloads decoded and checked.
        invalid: ``"<utterance or key>: why"`` for each payload that failed.
        tombstoned: keys tombstoned for recompute (the invalid ones).
    """

    shard: int
    records: int = 0
    with_features: int = 0
    reported: int = 0
    unaccounted: list[str] = field(default_factory=list)
    parts_read: int = 0
    payloads_read: int = 0
    invalid: list[str] = field(default_factory=list)
    tombstoned: int = 0


def verify_feature_shard(settings: Settings, frontend: Frontend, split: str, shard: int, new_parts: Iterable[str],
                         tasks: Sequence | None = None, cache=None) -> ShardVerification:
    """Check one shard after a feature run, without reading the features it did not write.

    * Counts, from the index alone (part footers, no payload): every record of the split in this
      shard has a live key, or a line in the shard's failure report.
    * Payloads of ``new_parts`` only (file names in the shard's folder, as the run reported them):
      each live row there decodes as SFCF32L1 ``[frames > 0, feature_dim]`` with finite values.
      Those that do not are tombstoned, so the next run of the shard computes them again.

    Args:
        tasks: the shard's records as :func:`~asr_assets.extraction.plan_shard_tasks` gives them
            (planned here if None).
        cache: the split's :class:`~asr_assets.feature_cache.ShardedParquetFeatureCache`, e.g.
            one whose :meth:`~asr_assets.feature_cache.ShardedParquetFeatureCache.prefetch`
            built the indexes of every shard to verify at once (a new one if None).
    """
    from .extraction import plan_shard_tasks
    from .feature_cache import CacheCorruptError, ShardedParquetFeatureCache, tombstone_keys

    fhash = frontend.frontend_hash()
    split_root = settings.feature_split_root(split)
    if tasks is None:
        tasks = plan_shard_tasks(RecordStore(settings.record_cache_path(split)), fhash, [shard],
                                 settings.num_shards)[shard]
    result = ShardVerification(shard=shard, records=len(tasks))
    if cache is None:
        cache = ShardedParquetFeatureCache(split_root, settings.num_shards)
    live = cache.keys(shard, frontend_hash=fhash)
    # the failure report is read only when a record has no features (on an object store a GET)
    complete = not frontend.outputs and all(task.key in live for task in tasks)
    failed = set() if complete else reported_failures(settings, frontend.name, split, shard)
    if frontend.outputs:  # named outputs: a record has features when all its output keys are live
        return _verify_named_outputs(result, cache, frontend, split_root, shard, new_parts, tasks, live, failed)
    for task in tasks:
        if task.key in live:
            result.with_features += 1
        elif task.utterance_id in failed:
            result.reported += 1
        else:
            result.unaccounted.append(task.utterance_id)
    names = set(new_parts)
    entries = cache.shard_entries(shard)
    fresh = [key for key, where in entries.items() if where is not None and where[0].name in names and key in live]
    result.parts_read = len({entries[key][0] for key in fresh})
    ids = {task.key: task.utterance_id for task in tasks}
    invalid_keys = []

    def judge(key: str, feats) -> None:
        if feats is None:  # superseded meanwhile by a newer part (a concurrent writer): not this run's
            return
        result.payloads_read += 1
        finite = bool(np.isfinite(feats).all())
        if feats.ndim != 2 or feats.shape[0] == 0 or feats.shape[1] != frontend.feature_dim or not finite:
            result.invalid.append(f"{ids.get(key, 'key ' + key[:12])}: shape {feats.shape}, finite={finite}")
            invalid_keys.append(key)

    for batch in (fresh[i:i + 256] for i in range(0, len(fresh), 256)):
        try:
            loaded = cache.load_keys(list(batch))
        except CacheCorruptError:  # find which: one by one
            loaded = None
        if loaded is not None:
            for key, feats in zip(batch, loaded):
                judge(key, feats)
            continue
        for key in batch:
            try:
                (feats,) = cache.load_keys([key])
            except CacheCorruptError as exc:
                result.payloads_read += 1
                result.invalid.append(f"{ids.get(key, 'key ' + key[:12])}: {exc}")
                invalid_keys.append(key)
                continue
            judge(key, feats)
    tombstone_keys(split_root, shard, fhash, invalid_keys,
                   metadata={"frontend": frontend.name, "reason": "invalid payload found by check"})
    result.tombstoned = len(invalid_keys)
    return result


def _verify_named_outputs(result: ShardVerification, cache, frontend: Frontend, split_root: Path, shard: int,
                          new_parts: Iterable[str], tasks: Sequence, live: set[str], failed: set[str]) -> ShardVerification:
    """:func:`verify_feature_shard` for a frontend with named outputs: counts from the index, and
    :func:`~asr_assets.feature_cache.check_stored_outputs` (presence of every output, dtype,
    frames, finite) for each record with an output in ``new_parts``."""
    from .feature_cache import check_stored_outputs, output_keys, tombstone_keys

    names = set(new_parts)
    entries = cache.shard_entries(shard)
    invalid_keys: list[str] = []
    parts = set()
    for task in tasks:
        keys = list(output_keys(task.utterance_id, frontend).values())
        if all(k in live for k in keys):
            result.with_features += 1
        elif task.utterance_id in failed:
            result.reported += 1
            continue
        elif not any(k in live for k in keys):
            result.unaccounted.append(task.utterance_id)
            continue
        fresh = {entries[k][0] for k in keys if entries.get(k) is not None and entries[k][0].name in names}
        if not fresh and all(k in live for k in keys):
            continue  # written by an earlier run: not re-read
        parts |= fresh
        verdict = check_stored_outputs(cache, frontend, task.utterance_id)
        result.payloads_read += len(keys)
        if not verdict.ok:
            result.invalid.append(f"{task.utterance_id}: {'; '.join(verdict.problems) or 'outputs missing'}")
            invalid_keys.extend(verdict.invalid_keys)
    result.parts_read = len(parts)
    tombstone_keys(split_root, shard, frontend.frontend_hash(), invalid_keys,
                   metadata={"frontend": frontend.name, "reason": "invalid payload found by check"})
    result.tombstoned = len(invalid_keys)
    return result
