"""The record cache: ``<dir>/<split>.jsonl`` + little-endian sidecars + audio blobs (spec §1).

Entry points:
    - :func:`write_record_cache` — write one split's store atomically from records.
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
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

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


@dataclass
class WriteSummary:
    """What :func:`write_record_cache` wrote."""

    path: str
    utterances: int = 0
    audio_seconds: float = 0.0
    blobs: int = 0
    durations_s: list[float] = field(default_factory=list)
    sha256: str = ""  # of the JSONL bytes: the split's data version


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
    """
    jsonl_path = Path(jsonl_path)
    jsonl_path.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(jsonl_path.with_name(jsonl_path.name + ".lock")):
        return _write_locked(jsonl_path, records)


def _write_locked(jsonl_path: Path, records: Iterable[Record]) -> WriteSummary:
    remove_stale_tmp(jsonl_path.parent, prefix=jsonl_path.name)
    tmp = tmp_path_for(jsonl_path)
    columns: dict[str, list[int]] = {suffix: [] for suffix in SIDECARS}
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
            summary.durations_s.append(record.duration_s)
        handle.flush()
        os.fsync(handle.fileno())
    for suffix, dtype in SIDECARS.items():
        values = np.asarray(columns[suffix], dtype=np.int64).clip(0)
        atomic_write_bytes(sidecar_path(jsonl_path, suffix), values.astype(dtype).tobytes())
    os.replace(tmp, jsonl_path)  # last: a reader that sees this JSONL sees its sidecars
    summary.sha256 = digest.hexdigest()
    return summary


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
    non-empty, aligned and of equal count; each optional sidecar, if present, of that count."""
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
        jsonl_path: ``<output>/record_cache/<split>.jsonl``.

    Raises:
        CacheCorruptError: the offsets sidecar is missing or misaligned, or a sidecar's entry
            count differs from the offsets'.

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
        item["audio_blob_abspath"] = str(self.path.parent / blob) if blob and not os.path.isabs(blob) else blob
        return item
