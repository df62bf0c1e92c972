"""Upstream's feature warmer (``asr-features --input ... --cache-dir ...``) as a library function:
Parquet manifests or a record-cache JSONL -> one split root of the feature cache.

Entry points:
    - :func:`parquet_inputs` — the files of ``--input F`` / ``--input-folder D`` and their bases.
    - :func:`iter_parquet_batches`, :func:`iter_record_cache_batches` — the rows of an input mode
      as :class:`WarmRow` batches, with upstream's utterance ids and audio sources.
    - :func:`warm_feature_cache` — featurize batches into ``<split_root>/feature_shards``.

Rows follow the upstream warmer (spec §2.1, §2.3 and open question 6), not the record builder:

* **Parquet** (``--input``, ``--input-folder``): the audio path is the ``path`` column, else
  ``audio.path``; ``audio.bytes`` (or an ``audio`` column of plain binary) is taken even when
  ``path`` is set, and bytes are decoded in preference to the path (the path is then only the
  format hint). The utterance id is the ``id`` (else ``utterance_id``) cell, else the
  **unresolved** audio path string as written in the manifest, else the row number, 1-based and
  counted across every input of the run. Relative paths are resolved against the input's base:
  the file's folder for ``--input``, the folder given for ``--input-folder`` (not each file's own
  folder), or ``--source-base``. An http(s) path without bytes is refused (no download). No
  transcript or duration is needed and nothing is filtered.
* **Record cache** (``--input-record-cache train.jsonl``): the id is the JSON ``utterance_id``
  (a non-empty string), else the 1-based line number; ``audio_blob_path`` (resolved against the
  JSONL's folder) is decoded with ``audio_path`` as the hint, else ``audio_path`` itself
  (URLs refused). These are the keys the training loader computes.

So for a manifest with an ``id`` column every mode gives the record cache's keys; without one,
``--input`` keys (unresolved path) differ from the record cache's (resolved path): use
``--input-record-cache`` when the keys must be the loader's.

Differences from upstream, on purpose: a key already live in the cache is not computed again
(upstream recomputes and appends a newer part; the reader's answer is the same), rows are
decoded and featurized by the same worker processes as the graph (crash and hang isolation,
``max_decode_s``), and parts carry the frontend in their metadata.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from ._fs import remove_stale_tmp
from .audio import DecodeConfig
from .errors import AsrAssetsError, ConfigError
from .extraction import ExtractionConfig, Failure, _label, _run, _Task
from .feature_cache import (ShardedParquetFeatureCache, ShardWriter, cache_key, part_metadata, shard_dir, shard_index,
                            shard_lock)
from .frontends import Frontend
from .logs import trace, worker_config

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParquetInput:
    """One Parquet file to warm and the base of its relative audio paths."""

    path: Path
    base: Path


@dataclass(frozen=True)
class WarmRow:
    """One input row: its number, utterance id and audio source (or why it has none).

    Attributes:
        row: 1-based, counted across every input of the run (upstream ``scanned``).
        utterance_id: the id the cache key is made of (None only with ``error``).
        source: a local path or the embedded bytes to decode; None: no audio source (skipped).
        hint: path whose extension names the format of ``source`` (the manifest's audio path).
        error: why the row cannot be featurized (a URL without bytes, a line that is not JSON).
        offset_s, duration_s: a segment of a long recording (record-cache lines with
            ``offset_seconds`` / ``duration_seconds``): only ``[offset, offset + duration)``
            seconds are decoded, as the extractor does; None for a whole file.
    """

    row: int
    utterance_id: str | None
    source: str | bytes | None
    hint: str | None = None
    error: str | None = None
    offset_s: float | None = None
    duration_s: float | None = None


# ----------------------------------------------------------------------------- inputs


def _parquet_files(folder: Path) -> list[Path]:
    """Every ``*.parquet`` (extension in any case) below ``folder``, symlinked folders followed once."""
    found: list[Path] = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a symlink loop
            dirnames[:] = []
            continue
        seen.add(real)
        found.extend(Path(dirpath) / name for name in filenames if name.lower().endswith(".parquet"))
    return found


def parquet_inputs(input_file: str | os.PathLike | None = None,
                   input_folders: Sequence[str | os.PathLike] = ()) -> list[ParquetInput]:
    """The Parquet files of ``--input F`` or ``--input-folder D...``, in upstream's order.

    ``F``'s base is its folder; each ``D``'s files (found recursively) have ``D`` as base. All
    files are sorted by path, across folders.

    Raises:
        ConfigError: ``F`` is not a file, ``D`` is not a folder or holds no Parquet file.
    """
    if input_file is not None:
        path = Path(input_file)
        if not path.is_file():
            raise ConfigError(f"--input must point to a parquet file: {path}")
        return [ParquetInput(path, path.parent)]
    inputs: list[ParquetInput] = []
    for folder in map(Path, input_folders):
        if not folder.is_dir():
            raise ConfigError(f"--input-folder must point to a directory: {folder}")
        files = _parquet_files(folder)
        if not files:
            raise ConfigError(f"--input-folder contains no parquet files: {folder}")
        inputs.extend(ParquetInput(p, folder) for p in files)
    return sorted(inputs, key=lambda i: i.path.parts)


def _rust_float(value: float) -> str:
    """``f64::to_string``: shortest round-trip digits, never an exponent (1.0 -> "1")."""
    if value != value:
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "inf" if value > 0 else "-inf"
    text = format(Decimal(repr(value)), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


_INTEGERS = (pa.int32(), pa.int64(), pa.uint32(), pa.uint64())


def _strings(array: pa.Array) -> list[str | None]:
    """Cells as upstream's ``scalar_as_string`` reads them: text, 32/64-bit integers and float64
    as text; any other type (and null) is None."""
    kind = array.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind):
        return array.to_pylist()
    if kind in _INTEGERS:
        return [None if v is None else str(v) for v in array.to_pylist()]
    if pa.types.is_float64(kind):
        return [None if v is None else _rust_float(v) for v in array.to_pylist()]
    return [None] * len(array)


def _bytes(array: pa.Array | None, n: int) -> list[bytes | None]:
    if array is None:
        return [None] * n
    kind = array.type
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_binary_view(kind):
        return array.to_pylist()
    return [None] * n


def _is_url(path: str) -> bool:
    return path.startswith(("http://", "https://"))


def _resolve(base: Path, path: str) -> str:
    return path if os.path.isabs(path) else str(base / path)


def _batch_rows(batch: pa.RecordBatch, first_row: int, base: Path) -> list[WarmRow]:
    """Upstream ``manifest_audio_row`` for every row of ``batch`` (rows numbered from ``first_row``)."""
    names, n = batch.schema.names, batch.num_rows

    def column(name: str) -> pa.Array | None:
        return batch.column(names.index(name)) if name in names else None

    id_name = next((c for c in ("id", "utterance_id") if c in names), None)
    ids = _strings(column(id_name)) if id_name else [None] * n
    top = column("path")
    paths = [p or None for p in _strings(top)] if top is not None else [None] * n
    blobs: list[bytes | None] = [None] * n
    audio_paths: list[str | None] = [None] * n
    audio = column("audio")
    if audio is not None and pa.types.is_struct(audio.type):
        valid = audio.is_valid().to_pylist()
        children = dict(zip((audio.type.field(i).name for i in range(audio.type.num_fields)), audio.flatten()))
        blobs = [b if ok else None for b, ok in zip(_bytes(children.get("bytes"), n), valid)]
        if "path" in children:
            audio_paths = [p if ok else None for p, ok in zip(_strings(children["path"]), valid)]
    elif audio is not None:
        blobs = _bytes(audio, n)
    rows = []
    for i in range(n):
        number = first_row + i
        path = paths[i] if paths[i] is not None else audio_paths[i]  # audio.path is not checked for ""
        utterance_id = ids[i] or (path if path is not None else str(number))
        if blobs[i] is not None:
            rows.append(WarmRow(number, utterance_id, blobs[i], path))
        elif path is None:
            rows.append(WarmRow(number, utterance_id, None))
        elif _is_url(path):
            rows.append(WarmRow(number, utterance_id, None, path,
                                error=f"remote audio URLs are not supported by the warmer: {path}"))
        else:
            rows.append(WarmRow(number, utterance_id, _resolve(base, path), path))
    return rows


def iter_parquet_batches(inputs: Sequence[ParquetInput], *, source_base: str | os.PathLike | None = None,
                         batch_size: int = 1024, limit: int | None = None) -> Iterator[list[WarmRow]]:
    """The rows of every input in batches of at most ``batch_size`` (a batch never spans files),
    at most ``limit`` rows in all.

    Raises:
        AsrAssetsError: a file cannot be read as Parquet (the message names it).
    """
    scanned = 0
    for item in inputs:
        base = Path(source_base) if source_base is not None else item.base
        logger.info("warming input %s source_base=%s", item.path, base)
        try:
            parquet = pq.ParquetFile(item.path)
            wanted = [c for c in ("id", "utterance_id", "path", "audio") if c in parquet.schema_arrow.names]
            id_column = next((c for c in ("id", "utterance_id") if c in wanted), None)
            wanted = [c for c in wanted if c in (id_column, "path", "audio")]
            if wanted:
                batches = parquet.iter_batches(batch_size=batch_size, columns=wanted)
            else:  # no column upstream reads: every row is "no audio source"
                total = parquet.metadata.num_rows
                batches = (pa.RecordBatch.from_pydict({"_": [None] * min(batch_size, total - s)})
                           for s in range(0, total, batch_size))
            for index, batch in enumerate(batches):
                take = batch.num_rows if limit is None else min(batch.num_rows, max(limit - scanned, 0))
                if take == 0:
                    logger.info("row limit reached limit=%d scanned=%d", limit, scanned)
                    return
                logger.debug("processing batch input=%s batch=%d rows=%d rows_to_process=%d", item.path, index,
                             batch.num_rows, take)
                rows = _batch_rows(batch.slice(0, take), scanned + 1, base)
                scanned += take
                yield rows
        except (OSError, pa.ArrowException) as exc:
            raise AsrAssetsError(f"cannot read input parquet {str(item.path)!r}: {exc}") from exc


def _record_cache_row(line: bytes, number: int, parent: Path) -> WarmRow:
    """Upstream ``process_record_cache_feature_line`` for one JSONL line, plus segment records
    (``offset_seconds`` / ``duration_seconds``, an asr_assets extension of spec §1.3)."""
    try:
        value = json.loads(line)
        if not isinstance(value, dict):
            raise ValueError(f"a JSON {type(value).__name__}, not an object")
    except ValueError as exc:
        return WarmRow(number, None, None, error=f"failed to parse record-cache JSON row {number}: {exc}")

    def text(key: str) -> str | None:
        cell = value.get(key)
        return cell if isinstance(cell, str) and cell else None

    utterance_id = text("utterance_id") or str(number)
    audio_path, blob = text("audio_path"), text("audio_blob_path")
    if blob is not None:
        row = WarmRow(number, utterance_id, blob if os.path.isabs(blob) else str(parent / blob), audio_path)
    elif audio_path is None:
        return WarmRow(number, utterance_id, None)
    elif _is_url(audio_path):
        return WarmRow(number, utterance_id, None, audio_path,
                       error=f"remote audio URLs are not supported by the warmer: {audio_path}")
    else:
        row = WarmRow(number, utterance_id, audio_path, audio_path)
    offset, duration = value.get("offset_seconds"), value.get("duration_seconds")
    if offset is None and duration is None:
        return row
    if not (isinstance(offset, (int, float)) and isinstance(duration, (int, float)) and offset >= 0 and duration > 0):
        return WarmRow(number, utterance_id, None, audio_path,
                       error=f"segment record with offset_seconds={offset!r}, duration_seconds={duration!r}")
    return dataclasses.replace(row, offset_s=float(offset), duration_s=float(duration))


def iter_record_cache_batches(path: str | os.PathLike, *, batch_size: int = 1024,
                              limit: int | None = None) -> Iterator[list[WarmRow]]:
    """The lines of a record-cache JSONL (``train.jsonl``; no sidecar needed) as rows, in
    batches of at most ``batch_size``, at most ``limit`` rows.

    Raises:
        ConfigError: ``path`` is not a file.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--input-record-cache must point to a JSONL file: {path}")
    logger.info("warming record cache %s", path)
    parent = path.parent
    batch: list[WarmRow] = []
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            if limit is not None and number > limit:
                logger.info("row limit reached limit=%d scanned=%d", limit, number - 1)
                break
            line = line[:-1] if line.endswith(b"\n") else line
            batch.append(_record_cache_row(line[:-1] if line.endswith(b"\r") else line, number, parent))
            if len(batch) >= batch_size:
                logger.debug("processing record-cache batch input=%s rows=%d", path, len(batch))
                yield batch
                batch = []
    if batch:
        logger.debug("processing record-cache batch input=%s rows=%d", path, len(batch))
        yield batch


# ----------------------------------------------------------------------------- warming


@dataclass
class WarmSummary:
    """Outcome of :func:`warm_feature_cache`.

    ``skipped`` is upstream's count: rows without an audio source plus rows that failed.
    ``shards`` maps each shard touched to ``{"written", "cached", "failed", "parts"}``.
    """

    scanned: int = 0
    written: int = 0
    cached: int = 0
    no_audio: int = 0
    failed: int = 0
    audio_seconds: float = 0.0
    frames: int = 0
    seconds: float = 0.0
    shards: dict[int, dict] = field(default_factory=dict)
    failures: list[Failure] = field(default_factory=list)

    @property
    def skipped(self) -> int:
        return self.no_audio + self.failed


def warm_feature_cache(batches: Iterable[list[WarmRow]], split_root: str | os.PathLike, frontend: Frontend,
                       config: ExtractionConfig = ExtractionConfig(), *, progress_interval: int = 1000) -> WarmSummary:
    """Compute the features of every row of ``batches`` whose key is not in ``split_root`` yet.

    Each batch is decoded and featurized by ``config.workers`` worker processes (as in
    :func:`~asr_assets.extraction.extract_shards`: a crash or hang costs one row, results come
    back in row order, so parts are deterministic); rows go to one :class:`ShardWriter` per shard,
    which writes a part every ``config.rows_per_part`` rows and at the end. Nothing is
    tombstoned. Writers of the same frontend are excluded by the shard locks (all shards are
    locked, in order, for the whole run). Rows that cannot be featurized are logged as warnings
    and returned in ``failures`` (no duration check: a warmer row has no duration).

    Args:
        batches: from :func:`iter_parquet_batches` or :func:`iter_record_cache_batches`.
        split_root: the split cache root (``--cache-dir``); ``feature_shards/`` is made below it.
        frontend: the frontend (its hash keys the cache).
        config: workers, ``num_shards``, ``rows_per_part``, ``ffmpeg_fallback``, ``fail_fast`` ...
        progress_interval: log a progress line every this many rows (0: never).

    Raises:
        ConfigError: ``frontend`` has named outputs (refused: upstream's warmer has none; the
            graph's extractor writes them).
        AsrAssetsError: with ``config.fail_fast``, on the first row that fails (what was computed
            before it is written).
    """
    if frontend.outputs is not None:
        raise ConfigError(
            f"frontend {frontend.name!r} has named outputs {list(frontend.outputs)}; the warmer writes upstream's "
            "one float32 array per utterance key, which upstream can read. Featurize it with `asr-assets "
            "materialize --frontend ...` (asr_assets.pipeline.build_feature_shards) instead")
    start = time.perf_counter()
    split_root = Path(split_root)
    (split_root / "feature_shards").mkdir(parents=True, exist_ok=True)
    fhash = frontend.frontend_hash()
    summary = WarmSummary()
    metadata = part_metadata(frontend)
    state = (frontend, DecodeConfig(ffmpeg_fallback=config.ffmpeg_fallback, max_duration_s=config.max_decode_s),
             None, worker_config())
    writers: dict[int, ShardWriter] = {}

    def shard_counts(shard: int) -> dict:
        return summary.shards.setdefault(shard, {"written": 0, "cached": 0, "failed": 0, "parts": 0})

    def failed(row: WarmRow, stage: str, error: str, shard: int = -1) -> None:
        label = _label(row.source) if row.source is not None else (row.hint or "none")
        if config.fail_fast:
            raise AsrAssetsError(f"row {row.row} (utterance_id={row.utterance_id}, {label}): {stage}: {error}")
        logger.warning("skipping row %d: utterance_id=%s source=%s: %s: %s", row.row, row.utterance_id, label,
                       stage, error)
        summary.failed += 1
        summary.failures.append(Failure(row.utterance_id or str(row.row), row.hint or label, stage, error, shard))
        if shard >= 0:
            shard_counts(shard)["failed"] += 1

    with contextlib.ExitStack() as stack:
        for shard in range(config.num_shards):  # in order: two warmers (or a graph run) cannot deadlock
            stack.enter_context(shard_lock(split_root, shard, fhash))
        reader = ShardedParquetFeatureCache(split_root, config.num_shards)
        present: dict[int, set[str]] = {}
        for shard in range(config.num_shards):
            remove_stale_tmp(shard_dir(split_root, shard))  # left by killed writers
            present[shard] = reader.keys(shard)  # any writer's parts: the key names the frontend already
        logger.debug("cache %s holds %d live keys in %d shards before warming", split_root,
                     sum(map(len, present.values())), config.num_shards)
        try:
            for number, batch in enumerate(batches):
                tasks: list[_Task] = []
                for row in batch:
                    if row.error is None and row.source is not None:
                        key = cache_key(row.utterance_id, fhash)
                        shard = shard_index(key, config.num_shards)
                        if key not in present[shard]:
                            tasks.append(_Task(row.utterance_id, row.source, row.hint, shard, key,
                                               offset_s=row.offset_s, duration_s=row.duration_s))
                logger.debug("batch %d: %d rows, %d to featurize", number, len(batch), len(tasks))
                results = _run(tasks, state, config.workers, config)
                try:
                    for row in batch:
                        summary.scanned = row.row
                        if row.error is not None:
                            failed(row, "input", row.error)
                        elif row.source is None:
                            summary.no_audio += 1
                            trace(logger, "skipping row %d: no audio source found", row.row)
                        else:
                            key = cache_key(row.utterance_id, fhash)
                            shard = shard_index(key, config.num_shards)
                            if key in present[shard]:
                                summary.cached += 1
                                shard_counts(shard)["cached"] += 1
                                trace(logger, "row %d utterance_id=%s already cached (shard %02d)", row.row,
                                      row.utterance_id, shard)
                            else:
                                task, result = next(results)
                                payload, seconds, frames, stage, error, _, _ = result
                                if payload is None:
                                    failed(row, stage or "featurize", error or "unknown", shard)
                                else:
                                    if shard not in writers:
                                        writers[shard] = ShardWriter(split_root, shard, rows_per_part=config.rows_per_part,
                                                                     metadata=metadata)
                                    writers[shard].add_payload(key, payload)
                                    summary.written += 1
                                    summary.audio_seconds += seconds
                                    summary.frames += frames
                                    shard_counts(shard)["written"] += 1
                                    trace(logger, "row %d utterance_id=%s source=%s frames=%d dim=%d shard=%02d",
                                          row.row, row.utterance_id, _label(row.source), frames,
                                          frontend.feature_dim, shard)
                        if progress_interval and row.row % progress_interval == 0:
                            logger.info("progress scanned=%d written=%d cached=%d skipped=%d", row.row,
                                        summary.written, summary.cached, summary.skipped)
                finally:
                    results.close()  # stops this batch's workers (also on fail_fast)
        finally:
            logger.debug("flushing pending shards count=%d", sum(1 for w in writers.values() if w._pending))
            for shard, writer in writers.items():
                writer.close()
                shard_counts(shard)["parts"] = len(writer.parts_written)
    summary.seconds = time.perf_counter() - start
    return summary
