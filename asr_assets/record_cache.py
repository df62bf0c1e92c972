"""The record cache: ``<dir>/<split>.jsonl`` + little-endian sidecars + audio blobs (spec §1).

Entry points:
    - :func:`write_record_cache` — write one split's store atomically from records.
    - :class:`RecordCacheWriter` — the same store written as batches arrive (flat memory; the
      record-cache build keeps one open per split).
    - :class:`RecordStore` — random access reader (``len``, indexing) over a store.
    - :func:`record_store_is_valid` — upstream's validity rule for reusing a store.
    - :func:`sidecar_path`, :data:`SIDECARS`.

Layout of a store ``<dir>/train.jsonl``::

    train.jsonl                     one JSON object per line (Python json.dumps, ensure_ascii=False);
                                    a segment adds offset_seconds, duration_seconds (SEGMENT_KEYS)
    train.jsonl.offsets.u64         u64 LE byte offset of each line
    train.jsonl.estimated_frames.u32, .num_samples.u64, .sample_rates.u32,
    train.jsonl.transcript_lengths.u32, .token_lengths.u32
    train_audio_blobs/<sha256>.bin  embedded audio bytes kept when no readable local file exists

Atomicity: everything is written under ``<name>.tmp.<pid>`` names and renamed with
``os.replace``, sidecars first and the JSONL last, so a reader that finds the JSONL finds a
complete store; a killed writer leaves only ``*.tmp.<host>-<pid>`` files, which readers never
open and the next writer on that host removes. Blobs are content-addressed and renamed into place the same way.

On an object store (``jsonl_path`` a URL such as ``s3://bucket/out/record_cache/train.jsonl``;
no rename there) the store is built in a local staging folder with the same code, then:

1. blobs go to ``<dir>/<stem>_audio_blobs/<sha256>.bin`` (content-addressed, so the final name
   is safe: one conditional PUT each, skipped when the listing already has it);
2. the JSONL and sidecars go under a fresh version folder
   ``<dir>/<stem>.versions/<version>/`` (unique per write: ``<time_ns>_<host>_<pid>_<random>``),
   one PUT each;
3. last, the commit object ``<dir>/<stem>.commit.json`` (:data:`COMMIT_FORMAT`) is PUT: it names
   the version's files with their sizes and SHA-256, the blob folder and the counts.

Readers (:class:`RecordStore`, :func:`record_store_is_valid`) trust only what a commit object
names, so a killed writer leaves nothing they read; two writers of one split both write whole
versions and the last commit wins, as the last rename wins locally. Files of the version a new
commit replaced are deleted after it (a reader still fetching them re-reads the commit).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from json.encoder import encode_basestring
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import polars as pl

from . import storage
from ._fs import atomic_write_bytes, file_lock, remove_stale_tmp, tmp_path_for
from .errors import CacheCorruptError
from .records import Record

#: JSONL keys of a segment record (a manifest row with an offset), after upstream's six keys;
#: absent from whole-file records, whose lines stay byte for byte what they were. Seconds, as
#: the manifest gave them: the segment is ``[offset_seconds, offset_seconds + duration_seconds)``
#: of ``audio_path`` (or the blob), and the sidecars (``num_samples``, ``estimated_frames``)
#: describe the segment. Upstream's loaders ignore unknown keys, so they would decode the whole
#: file (docs/decoders.md, "Segments of long recordings").
SEGMENT_KEYS = ("offset_seconds", "duration_seconds")

SIDECARS: dict[str, str] = {
    ".offsets.u64": "<u8",
    ".estimated_frames.u32": "<u4",
    ".num_samples.u64": "<u8",
    ".sample_rates.u32": "<u4",
    ".transcript_lengths.u32": "<u4",
    ".token_lengths.u32": "<u4",
}


def sidecar_path(jsonl_path: str | os.PathLike, suffix: str) -> Path:
    """``train.jsonl`` + ``.offsets.u64`` -> ``train.jsonl.offsets.u64``."""
    jsonl_path = Path(jsonl_path)
    return jsonl_path.with_name(jsonl_path.name + suffix)


def blob_dir(jsonl_path: str | os.PathLike) -> Path:
    """``<dir>/<stem>_audio_blobs`` for ``<dir>/<stem>.jsonl``."""
    jsonl_path = Path(jsonl_path)
    return jsonl_path.parent / f"{jsonl_path.stem}_audio_blobs"


def write_blob(jsonl_path: str | os.PathLike, data: bytes) -> str:
    """Store audio bytes as ``<stem>_audio_blobs/<sha256>.bin`` (once); returns the path
    relative to the JSONL's folder, as written in ``audio_blob_path``."""
    directory = blob_dir(jsonl_path)
    directory.mkdir(parents=True, exist_ok=True)
    name = hashlib.sha256(data).hexdigest() + ".bin"
    target = directory / name
    if not (target.exists() and target.stat().st_size == len(data)):
        atomic_write_bytes(target, data)
    return f"{directory.name}/{name}"


#: Bin edges (seconds) of :attr:`WriteSummary.duration_counts`: ``[lo, hi)``, the last ``[30, inf]``.
DURATION_EDGES_S = (0.0, 1.0, 2.0, 5.0, 10.0, 15.0, 20.0, 30.0, math.inf)


def duration_counts(durations_s) -> list[int]:
    """Utterances per bin of :data:`DURATION_EDGES_S` (``numpy.histogram``'s rule: each bin
    ``[lo, hi)``, the last one closed), for seconds in any array-like."""
    counts, _ = np.histogram(np.asarray(durations_s, dtype=np.float64), bins=DURATION_EDGES_S)
    return counts.tolist()


@dataclass
class WriteSummary:
    """What :func:`write_record_cache` wrote. ``duration_counts``: utterances per bin of
    :data:`DURATION_EDGES_S`, kept as counts so the summary does not grow with the split."""

    path: str
    utterances: int = 0
    audio_seconds: float = 0.0
    blobs: int = 0
    duration_counts: list[int] = field(default_factory=lambda: [0] * (len(DURATION_EDGES_S) - 1))
    sha256: str = ""  # of the JSONL bytes: the split's data version
    version: str = ""  # object stores: the version folder its commit object names


def write_record_cache(jsonl_path: str | os.PathLike, records: Iterable[Record]) -> WriteSummary:
    """Write one split's record store atomically (spec §1.2–1.5).

    Args:
        jsonl_path: e.g. ``<output>/record_cache/train.jsonl``; the folder is created.
        records: in the order they are to be stored.

    Returns:
        :class:`WriteSummary` with counts and audio seconds.

    Embedded bytes are kept as a blob unless a readable local file exists at ``audio_path``
    (content-addressed: segments embedding the same long file share one blob). A segment
    record (``offset_s`` set) gets the :data:`SEGMENT_KEYS`.
    An existing store is replaced only once the new one is complete; concurrent writers of the
    same store are serialized by a lock on ``<split>.jsonl.lock`` and the last one wins.
    On an object store (a URL), see the module docstring: staged locally, then blobs, version
    files and the commit object, in that order.
    """
    if storage.is_url(jsonl_path):
        return _write_remote(str(jsonl_path), records)
    jsonl_path = Path(jsonl_path)
    jsonl_path.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(jsonl_path.with_name(jsonl_path.name + ".lock")):
        return _write_locked(jsonl_path, records)


def _write_locked(jsonl_path: Path, records: Iterable[Record]) -> WriteSummary:
    remove_stale_tmp(jsonl_path.parent, prefix=jsonl_path.name)
    tmp = tmp_path_for(jsonl_path)
    columns: dict[str, list[int]] = {suffix: [] for suffix in SIDECARS}
    durations: list[float] = []
    summary = WriteSummary(path=str(jsonl_path))
    digest = hashlib.sha256()
    with open(tmp, "wb") as handle:
        for record in records:
            blob_path = None
            if record.audio_bytes is not None and not (record.audio_path and os.path.isfile(record.audio_path)):
                blob_path = write_blob(jsonl_path, record.audio_bytes)
                summary.blobs += 1
            fields = {
                "audio_path": record.audio_path,
                "audio_blob_path": blob_path,
                "transcript": record.transcript,
                "utterance_id": record.utterance_id,
                "speaker_id": record.speaker_id,
                "has_speaker_id": record.speaker_id is not None,
            }
            if record.offset_s is not None:  # a segment: keys upstream's readers ignore (see SEGMENT_KEYS)
                fields["offset_seconds"] = record.offset_s
                fields["duration_seconds"] = record.duration_s
            line = json.dumps(fields, ensure_ascii=False)
            columns[".offsets.u64"].append(handle.tell())
            data = line.encode("utf-8") + b"\n"
            handle.write(data)
            digest.update(data)
            columns[".estimated_frames.u32"].append(record.estimated_frames)
            columns[".num_samples.u64"].append(record.num_samples)
            columns[".sample_rates.u32"].append(16000)
            columns[".transcript_lengths.u32"].append(len(record.transcript))
            columns[".token_lengths.u32"].append(0)
            summary.utterances += 1
            summary.audio_seconds += record.duration_s
            durations.append(record.duration_s)
        summary.duration_counts = duration_counts(durations)
        handle.flush()
        os.fsync(handle.fileno())
    for suffix, dtype in SIDECARS.items():
        values = np.asarray(columns[suffix], dtype=np.int64).clip(0)
        atomic_write_bytes(sidecar_path(jsonl_path, suffix), values.astype(dtype).tobytes())
    os.replace(tmp, jsonl_path)  # last: a reader that sees this JSONL sees its sidecars
    summary.sha256 = digest.hexdigest()
    return summary


def _json(value: str | None) -> str:
    return "null" if value is None else encode_basestring(value)


def _json_number(value: float) -> str:
    """``json.dumps(value)`` of a float (``float.__repr__``; NaN/Infinity as json writes them)."""
    return float.__repr__(value) if type(value) is float and math.isfinite(value) else json.dumps(value)


@dataclass
class RecordColumns:
    """Records as columns, in store order: what :meth:`RecordCacheWriter.add_columns` takes.

    String columns are lists or polars ``String`` series (``audio_path`` and ``speaker_id`` may
    hold None); ``duration_s`` (seconds; a segment's own) and ``chars`` (code points of the
    normalized transcript) are sequences or numpy arrays. ``audio_bytes`` and ``offset_s`` are
    None when no record has a value (``offset_s`` per record None for a whole file, else the
    line gets the :data:`SEGMENT_KEYS`).
    """

    utterance_id: Sequence[str]
    transcript: Sequence[str]
    audio_path: Sequence[str | None]
    speaker_id: Sequence[str | None]
    duration_s: Sequence[float]
    chars: Sequence[int]
    audio_bytes: Sequence[bytes | None] | None = None
    offset_s: Sequence[float | None] | None = None

    def __len__(self) -> int:
        return len(self.utterance_id)

    @classmethod
    def from_tuples(cls, records: Sequence[tuple]) -> "RecordColumns":
        """From tuples ``(utterance_id, transcript, audio_path, audio_bytes, speaker_id,
        duration_s, transcript code points, offset_s)``."""
        ids, transcripts, paths, blobs, speakers, durations, chars, offsets = (list(c) for c in zip(*records))
        return cls(ids, transcripts, paths, speakers, durations, chars,
                   blobs if any(b is not None for b in blobs) else None,
                   offsets if any(o is not None for o in offsets) else None)


#: ``json.encoder.encode_basestring`` as literal replacements (``ensure_ascii=False``: only
#: ``"``, ``\\`` and the C0 controls are escaped; short forms for ``\b \f \n \r \t``).
_JSON_ESCAPES: dict[str, str] = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t",
                                 "\b": "\\b", "\f": "\\f",
                                 **{chr(c): f"\\u{c:04x}" for c in range(32) if chr(c) not in "\n\r\t\b\f"}}


def _json_string_expr(column: str) -> pl.Expr:
    """:func:`_json` of each value of a String column: ``null`` or the escaped, quoted string."""
    col = pl.col(column)
    quoted = pl.concat_str([pl.lit('"'), col.str.replace_many(list(_JSON_ESCAPES), list(_JSON_ESCAPES.values())),
                            pl.lit('"')])
    return pl.when(col.is_null()).then(pl.lit("null")).otherwise(quoted)


def _jsonl_lines(records: RecordColumns, blob_paths: list[str | None] | None) -> pl.Series:
    """The JSONL line (``\\n`` included) of every record, as :meth:`RecordCacheWriter.add` formats
    it: the keys of :func:`write_record_cache` in its order, values as ``json.dumps`` writes them."""
    n = len(records)
    frame = pl.DataFrame({
        "audio_path": pl.Series(records.audio_path, dtype=pl.String),
        "audio_blob_path": pl.Series(blob_paths if blob_paths is not None else [None] * n, dtype=pl.String),
        "transcript": pl.Series(records.transcript, dtype=pl.String),
        "utterance_id": pl.Series(records.utterance_id, dtype=pl.String),
        "speaker_id": pl.Series(records.speaker_id, dtype=pl.String),
        "segment": pl.Series(_segment_suffixes(records), dtype=pl.String),
    })
    line = pl.concat_str([
        pl.lit('{"audio_path": '), _json_string_expr("audio_path"),
        pl.lit(', "audio_blob_path": '), _json_string_expr("audio_blob_path"),
        pl.lit(', "transcript": '), _json_string_expr("transcript"),
        pl.lit(', "utterance_id": '), _json_string_expr("utterance_id"),
        pl.lit(', "speaker_id": '), _json_string_expr("speaker_id"),
        pl.lit(', "has_speaker_id": '), pl.when(pl.col("speaker_id").is_null()).then(pl.lit("false")).otherwise(pl.lit("true")),
        pl.col("segment").fill_null(""), pl.lit("}\n"),
    ])
    return frame.select(line=line).to_series()


def _segment_suffixes(records: RecordColumns) -> list[str | None]:
    """Per record the :data:`SEGMENT_KEYS` part of its line (None for a whole file); Python's
    float repr, so the numbers are those ``json.dumps`` writes."""
    if records.offset_s is None:
        return [None] * len(records)
    durations = records.duration_s.tolist() if isinstance(records.duration_s, np.ndarray) else records.duration_s
    return [None if offset is None else
            f', "offset_seconds": {_json_number(offset)}, "duration_seconds": {_json_number(duration)}'
            for offset, duration in zip(records.offset_s, durations)]


class RecordCacheWriter:
    """One split's record store written batch by batch; the files are those of
    :func:`write_record_cache` for the same records, byte for byte.

    The JSONL and every sidecar are written to temporary files as batches arrive (memory does
    not grow with the records, apart from 8 bytes of duration each for the summary) and renamed
    by :meth:`close`, sidecars first and the JSONL last, as :func:`write_record_cache` does. The
    store's lock (``<split>.jsonl.lock``) is held from construction to :meth:`close` /
    :meth:`abort`.

    On an object store (``jsonl_path`` a URL) the store is written in a local staging folder and
    :meth:`close` publishes it as :func:`write_record_cache` does there (blobs, version files,
    then the commit object; see the module docstring); :meth:`abort` publishes nothing.

    Args:
        jsonl_path: e.g. ``<output>/record_cache/train.jsonl``; the folder is created.
    """

    def __init__(self, jsonl_path: str | os.PathLike):
        self._stack = contextlib.ExitStack()
        self._remote = str(jsonl_path) if storage.is_url(jsonl_path) else None
        if self._remote is not None:  # staged locally; close() uploads and writes the commit object
            self._staging = _staging_dir(_stem(self._remote))
            self._stack.callback(shutil.rmtree, self._staging, True)
            self.path = self._staging / f"{_stem(self._remote)}.jsonl"
        else:
            self.path = Path(jsonl_path)
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._stack.enter_context(file_lock(self.path.with_name(self.path.name + ".lock")))
        try:
            remove_stale_tmp(self.path.parent, prefix=self.path.name)
            self._tmp = tmp_path_for(self.path)
            self._handle = self._stack.enter_context(open(self._tmp, "wb"))
            self._sidecars = {suffix: (self._stack.enter_context(open(tmp_path_for(sidecar_path(self.path, suffix)), "wb")),
                                       dtype) for suffix, dtype in SIDECARS.items()}
        except BaseException:
            self.abort()
            raise
        self._position = 0
        self._digest = hashlib.sha256()
        self.summary = WriteSummary(path=str(self.path))

    def add(self, records: Sequence[tuple]) -> None:
        """Append records, each ``(utterance_id, transcript, audio_path, audio_bytes, speaker_id,
        duration_s, transcript code points, offset_s)`` (the transcript normalized; str ids;
        ``offset_s`` None for a whole file, else the line gets the :data:`SEGMENT_KEYS`)."""
        if records:
            self.add_columns(RecordColumns.from_tuples(records))

    def add_columns(self, records: "RecordColumns") -> None:
        """Append records given as columns (:class:`RecordColumns`); the same bytes as :meth:`add`
        of their tuples.

        The JSONL lines are built as polars string expressions (:func:`_jsonl_lines`), the
        sidecars with numpy: no Python object per record apart from blobs and segment floats.
        """
        n = len(records)
        if not n:
            return
        summary = self.summary
        blob_paths = None
        if records.audio_bytes is not None:  # embedded audio kept as a blob unless a readable local file exists
            blob_paths = [None] * n
            for k, (audio_path, audio_bytes) in enumerate(zip(records.audio_path, records.audio_bytes)):
                if audio_bytes is not None and not (audio_path and os.path.isfile(audio_path)):
                    blob_paths[k] = write_blob(self.path, audio_bytes)
                    summary.blobs += 1
        # large_string: the lines are one UTF-8 buffer (the JSONL bytes) and their int64 ends
        lines = _jsonl_lines(records, blob_paths).to_arrow(compat_level=pl.CompatLevel.oldest())
        _, ends_buffer, text = lines.buffers()
        ends = np.frombuffer(ends_buffer, dtype=np.int64, count=n + 1, offset=lines.offset * 8)
        data = text[int(ends[0]):int(ends[-1])]
        offsets = ends[:-1] - ends[0] + self._position
        self._handle.write(data)
        self._digest.update(data)
        self._position += data.size
        durations = np.asarray(records.duration_s, dtype=np.float64)
        seconds = summary.audio_seconds
        for duration in durations.tolist():  # in record order, as the per-record writer adds them
            seconds += duration
        summary.audio_seconds = seconds
        summary.duration_counts = [a + b for a, b in zip(summary.duration_counts, duration_counts(durations))]
        summary.utterances += n
        num_samples = np.maximum(1, np.rint(durations * 16000)).astype(np.int64)  # max(1, round(d * 16000))
        columns = {
            ".offsets.u64": offsets,
            ".estimated_frames.u32": np.maximum(num_samples, 400) // 160 + 1,
            ".num_samples.u64": num_samples,
            ".sample_rates.u32": np.full(n, 16000, dtype=np.int64),
            ".transcript_lengths.u32": np.asarray(records.chars, dtype=np.int64),
            ".token_lengths.u32": np.zeros(n, dtype=np.int64),
        }
        for suffix, (handle, dtype) in self._sidecars.items():
            handle.write(columns[suffix].clip(0).astype(dtype).tobytes())

    def close(self) -> WriteSummary:
        """Sync and rename everything into place; returns the summary (``sha256`` of the JSONL)."""
        try:
            for handle in (self._handle, *(h for h, _ in self._sidecars.values())):
                handle.flush()
                os.fsync(handle.fileno())
                handle.close()
            for suffix in SIDECARS:
                os.replace(tmp_path_for(sidecar_path(self.path, suffix)), sidecar_path(self.path, suffix))
            os.replace(self._tmp, self.path)  # last: a reader that sees this JSONL sees its sidecars
            self.summary.sha256 = self._digest.hexdigest()
            if self._remote is not None:
                _commit_remote(self.path, self._remote, self.summary)
        except BaseException:
            self.abort()
            raise
        self._stack.close()
        return self.summary

    def abort(self) -> None:
        """Drop the temporary files and release the lock; the previous store stays."""
        self._stack.close()
        for path in (tmp_path_for(self.path), *(tmp_path_for(sidecar_path(self.path, s)) for s in SIDECARS)):
            with contextlib.suppress(OSError):
                path.unlink()


# ----------------------------------------------------------------------------- object stores

#: ``format`` of a commit object.
COMMIT_FORMAT = "asr_assets.record_cache.commit/1"


def commit_url(jsonl_url: str) -> str:
    """``<dir>/<stem>.commit.json`` for ``<dir>/<stem>.jsonl``."""
    folder, stem = storage.parent(str(jsonl_url)), _stem(jsonl_url)
    return storage.join(folder, f"{stem}.commit.json")


def _stem(jsonl_url) -> str:
    name = storage.basename(str(jsonl_url))
    return name[:-len(".jsonl")] if name.endswith(".jsonl") else name


def read_commit(jsonl_url: str) -> dict | None:
    """The commit object of a remote store, or None when there is none (never written, or not
    a commit object)."""
    try:
        commit = json.loads(storage.read_bytes(commit_url(jsonl_url)))
    except (FileNotFoundError, ValueError):
        return None
    return commit if isinstance(commit, dict) and commit.get("format") == COMMIT_FORMAT else None


def record_cache_exists(jsonl) -> bool:
    """Is there a built record cache at ``jsonl`` (a local path: the JSONL file; an object-store
    URL: its commit object, which names the JSONL object, :func:`read_commit`)?"""
    return read_commit(str(jsonl)) is not None if storage.is_url(jsonl) else Path(jsonl).is_file()


def _staging_dir(stem: str) -> Path:
    """A new local folder (in the content cache's ``staging/``) where a remote store is written
    before its upload."""
    import tempfile

    staging_root = storage.cache_dir() / "staging"
    staging_root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{stem}.", dir=staging_root))


def _write_remote(jsonl_url: str, records: Iterable[Record]) -> WriteSummary:
    staging = _staging_dir(_stem(jsonl_url))
    try:
        local = staging / f"{_stem(jsonl_url)}.jsonl"
        return _commit_remote(local, jsonl_url, _write_locked(local, records))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _commit_remote(local: Path, jsonl_url: str, summary: WriteSummary) -> WriteSummary:
    """Upload a complete local store (``local`` JSONL, sidecars, blobs) to ``jsonl_url``: new blobs,
    then the version's files under new names, then the commit object (last: readers trust only
    it), then the replaced version's files are removed."""
    import time
    import uuid

    folder, stem = storage.parent(jsonl_url), _stem(jsonl_url)
    version = f"{time.time_ns()}_{storage.writer_id()}_{uuid.uuid4().hex[:8]}"
    blob_folder = storage.join(folder, f"{stem}_audio_blobs")
    local_blobs = blob_dir(local)
    if local_blobs.is_dir():
        present = {f.name for f in storage.list_files(blob_folder)}
        for blob in sorted(local_blobs.iterdir()):
            if blob.name not in present:
                try:
                    storage.put_new(storage.join(blob_folder, blob.name), blob.read_bytes())
                except FileExistsError:
                    pass  # same name, same content (another writer)
    files = {}
    for suffix in ("", *SIDECARS):
        data = (local.parent / (local.name + suffix)).read_bytes()
        relative = f"{stem}.versions/{version}/{stem}.jsonl{suffix}"
        storage.put_new(storage.join(folder, relative), data)
        files[suffix or ".jsonl"] = {"path": relative, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    previous = read_commit(jsonl_url)
    commit = {"format": COMMIT_FORMAT, "version": version, "writer": storage.writer_id(), "written_at": time.time(),
              "jsonl": files.pop(".jsonl"), "sidecars": files, "blobs": f"{stem}_audio_blobs",
              "utterances": summary.utterances, "blob_count": summary.blobs, "sha256": summary.sha256}
    storage.put(commit_url(jsonl_url), json.dumps(commit, indent=1, sort_keys=True).encode("utf-8"))
    if previous and previous.get("version") != version:  # the replaced version's files: garbage now
        for entry in (previous.get("jsonl", {}), *previous.get("sidecars", {}).values()):
            if entry.get("path", "").startswith(f"{stem}.versions/"):
                storage.remove(storage.join(folder, entry["path"]))
    summary.path, summary.version = jsonl_url, version
    return summary


def _fetch_committed(jsonl_url: str) -> tuple[Path, dict]:
    """Local copies (content cache) of the files a remote store's commit names: ``(local
    JSONL path, commit)``; the sidecars sit beside the JSONL under their usual names.

    Raises:
        CacheCorruptError: no commit object, or a named file is missing or differs from it.
    """
    for attempt in range(3):
        commit = read_commit(jsonl_url)
        if commit is None:
            raise CacheCorruptError(f"record store {jsonl_url!r} has no commit object ({commit_url(jsonl_url)}): "
                                    "never written completely")
        folder, stem = storage.parent(jsonl_url), _stem(jsonl_url)
        target = storage.cache_dir() / "record_stores" / hashlib.sha256(
            f"{jsonl_url}\n{commit['version']}".encode("utf-8")).hexdigest()[:32]
        local = target / f"{stem}.jsonl"
        entries = {"": commit["jsonl"], **commit.get("sidecars", {})}
        try:
            for suffix, entry in entries.items():
                path = local.with_name(local.name + suffix)
                if path.is_file() and path.stat().st_size == entry["size"]:
                    continue
                url = storage.join(folder, entry["path"])
                known = storage.ObjectInfo(url, entry["size"], 0, entry["sha256"])
                data = storage.fetch(url, known=known).read_bytes()
                if hashlib.sha256(data).hexdigest() != entry["sha256"]:
                    raise CacheCorruptError(f"{url} does not match its commit object (sha256)")
                target.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(path, data)
            return local, commit
        except FileNotFoundError:  # replaced by a newer commit while we fetched: read it again
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def download_record_cache(jsonl_url: str, dest: str | os.PathLike) -> Path:
    """Copy a remote store to ``dest`` in the local layout (``<stem>.jsonl``, sidecars,
    ``<stem>_audio_blobs/``) from what its commit object names; returns the local JSONL path."""
    local, commit = _fetch_committed(jsonl_url)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    stem = _stem(jsonl_url)
    for path in local.parent.iterdir():
        if path.name.startswith(f"{stem}.jsonl"):
            atomic_write_bytes(dest / path.name, path.read_bytes())
    blob_folder = storage.join(storage.parent(jsonl_url), commit["blobs"])
    for blob in storage.list_files(blob_folder):
        (dest / commit["blobs"]).mkdir(exist_ok=True)
        atomic_write_bytes(dest / commit["blobs"] / blob.name, storage.read_bytes(str(blob)))
    return dest / f"{stem}.jsonl"


def _entry_count(path: Path, itemsize: int) -> int | None:
    """Entries in a sidecar, or None when it is missing, empty or misaligned."""
    try:
        size = path.stat().st_size
    except OSError:
        return None
    if size == 0 or size % itemsize:
        return None
    return size // itemsize


def record_store_is_valid(jsonl_path: str | os.PathLike) -> bool:
    """Upstream reuse rule (spec §1.2): non-empty JSONL; offsets and estimated_frames present,
    non-empty, aligned and of equal count; each optional sidecar, if present, of that count.
    A remote store: the files its commit object names, checked the same way."""
    if storage.is_url(jsonl_path):
        try:
            jsonl_path, _ = _fetch_committed(str(jsonl_path))
        except (CacheCorruptError, OSError):
            return False
    jsonl_path = Path(jsonl_path)
    if not jsonl_path.is_file() or jsonl_path.stat().st_size == 0:
        return False
    offsets = _entry_count(sidecar_path(jsonl_path, ".offsets.u64"), 8)
    frames = _entry_count(sidecar_path(jsonl_path, ".estimated_frames.u32"), 4)
    if offsets is None or offsets != frames:
        return False
    for suffix, dtype in SIDECARS.items():
        path = sidecar_path(jsonl_path, suffix)
        if path.exists() and _entry_count(path, np.dtype(dtype).itemsize) != offsets:
            return False
    return _offsets_match_jsonl(jsonl_path, np.fromfile(sidecar_path(jsonl_path, ".offsets.u64"), dtype="<u8"))


def _offsets_match_jsonl(jsonl_path: Path, offsets: np.ndarray) -> bool:
    """The last offset starts the last line and that line ends the file (O(1) reads).

    Catches sidecars from one write paired with the JSONL of another (a writer killed between
    its renames), which equal entry counts alone do not.
    """
    size = jsonl_path.stat().st_size
    if len(offsets) == 0:
        return size == 0
    last = int(offsets[-1])
    if last >= size:
        return False
    with open(jsonl_path, "rb") as handle:
        if last:
            handle.seek(last - 1)
            if handle.read(1) != b"\n":
                return False
        handle.seek(last)
        line = handle.readline()
    return last + len(line) == size and line.endswith(b"\n")


class RecordStore:
    """Random access to a record store: ``len(store)``, ``store[i]`` -> dict.

    Each item is the JSONL object (with ``offset_seconds`` and ``duration_seconds`` for a
    segment, :data:`SEGMENT_KEYS`) plus ``estimated_frames``, ``num_samples``, ``sample_rate``,
    ``transcript_length``, ``token_length`` from the sidecars (None for a missing optional
    sidecar) and ``audio_blob_abspath`` (the blob resolved against the JSONL's folder, or None).

    Args:
        jsonl_path: ``<output>/record_cache/<split>.jsonl``, or its URL on an object store:
            the files the commit object names are fetched once into the local content cache
            (:func:`asr_assets.storage.cache_dir`), and ``audio_blob_abspath`` is the blob's URL.

    Raises:
        CacheCorruptError: the offsets sidecar is missing or misaligned, or a sidecar's entry
            count differs from the offsets' (a remote store: it has no commit object).

    An empty store (0 records: empty JSONL and empty sidecars) is valid and has length 0.
    """

    _FIELDS = {
        ".estimated_frames.u32": "estimated_frames",
        ".num_samples.u64": "num_samples",
        ".sample_rates.u32": "sample_rate",
        ".transcript_lengths.u32": "transcript_length",
        ".token_lengths.u32": "token_length",
    }

    def __init__(self, jsonl_path: str | os.PathLike):
        #: the URL of a remote store, else None
        self.url: str | None = None
        self._blob_base: str | None = None
        if storage.is_url(jsonl_path):
            self.url = str(jsonl_path)
            jsonl_path, _ = _fetch_committed(self.url)
            self._blob_base = storage.parent(self.url)
        self.path = Path(jsonl_path)
        offsets_path = sidecar_path(self.path, ".offsets.u64")
        if not self.path.is_file() or not offsets_path.is_file():
            raise CacheCorruptError(f"record store {str(self.path)!r} or its offsets sidecar is missing")
        self.offsets = self._load(offsets_path, "<u8")
        if not _offsets_match_jsonl(self.path, self.offsets):
            raise CacheCorruptError(f"offsets sidecar of {str(self.path)!r} does not match the JSONL (interrupted write?)")
        self.sidecars: dict[str, np.ndarray | None] = {}
        for suffix, name in self._FIELDS.items():
            path = sidecar_path(self.path, suffix)
            self.sidecars[name] = self._load(path, SIDECARS[suffix]) if path.exists() else None
            if self.sidecars[name] is not None and len(self.sidecars[name]) != len(self.offsets):
                raise CacheCorruptError(
                    f"sidecar {path.name!r} has {len(self.sidecars[name])} entries, offsets have {len(self.offsets)}"
                )

    @staticmethod
    def _load(path: Path, dtype: str) -> np.ndarray:
        size = path.stat().st_size
        if size % np.dtype(dtype).itemsize:
            raise CacheCorruptError(f"sidecar {str(path)!r} size {size} is not a multiple of {np.dtype(dtype).itemsize}")
        return np.fromfile(path, dtype=dtype)

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, index: int) -> dict:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"record index {index} out of range for {len(self)} records")
        with open(self.path, "rb") as handle:
            handle.seek(int(self.offsets[index]))
            return self._item(index, handle.readline())

    def iter_indices(self, indices) -> "Iterator[dict]":
        """The records at ``indices`` (ascending for sequential reads), through one open file."""
        with open(self.path, "rb") as handle:
            for index in indices:
                index = int(index)
                handle.seek(int(self.offsets[index]))
                yield self._item(index, handle.readline())

    def __iter__(self):
        """All records in order, reading the JSONL sequentially (faster than indexing)."""
        with open(self.path, "rb") as handle:
            for index, offset in enumerate(self.offsets):
                handle.seek(int(offset))
                yield self._item(index, handle.readline())

    def _item(self, index: int, line: bytes) -> dict:
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CacheCorruptError(f"{str(self.path)!r} line at offset {int(self.offsets[index])} is not JSON: {exc}") from exc
        for name, values in self.sidecars.items():
            item[name] = int(values[index]) if values is not None else None
        blob = item.get("audio_blob_path")
        if blob and self._blob_base is not None and not os.path.isabs(blob) and not storage.is_url(blob):
            item["audio_blob_abspath"] = storage.resolve(blob, self._blob_base)
        else:
            item["audio_blob_abspath"] = str(self.path.parent / blob) if blob and not os.path.isabs(blob) else blob
        return item
