"""Finding and reading manifest files (spec §2).

Entry points:
    - :func:`discover_manifests` — the manifest files a source (file or folder) contributes.
    - :func:`iter_manifest_rows` — every row of every source as a :class:`ManifestRow`, streamed.

A *source* (manifest root) is a ``.tsv`` / ``.parquet`` file or a folder searched recursively in
sorted path order; if a folder holds any TSV, only its TSVs are read (the "TSV wins" rule),
otherwise all its Parquet files. Relative audio paths are resolved against the root that
contributed them (a folder itself, or a file's parent folder) unless ``source_base`` is given.

Columns (first present wins): transcript ``sentence|transcript|transcription|text|normalized_text``;
duration (s) ``duration|duration_seconds|audio_duration``; speaker ``client_id|speaker_id|speaker``;
id ``id|utterance_id``; audio ``path`` (string) or ``audio`` (Hugging Face ``{bytes, path}``
struct, or plain binary). A file without a transcript column or without an audio column cannot
give a single record: it is a file-level problem (:class:`~asr_assets.errors.ManifestColumnsError`
naming the columns found and expected), reported like an unreadable file. Nothing here decodes
audio.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from .errors import ManifestColumnsError, ManifestError

TRANSCRIPT_COLUMNS = ("sentence", "transcript", "transcription", "text", "normalized_text")
DURATION_COLUMNS = ("duration", "duration_seconds", "audio_duration")
SPEAKER_COLUMNS = ("client_id", "speaker_id", "speaker")
ID_COLUMNS = ("id", "utterance_id")
AUDIO_COLUMNS = ("path", "audio")
MANIFEST_SUFFIXES = (".tsv", ".parquet")
_BATCH_ROWS = 1024


@dataclass(frozen=True)
class ManifestRow:
    """One manifest row, before normalization and filtering.

    Attributes:
        source: the manifest root (file or folder) as given, resolved.
        manifest_path: the file the row came from.
        row_number: 1-based row counter per source, across all of its files (upstream ``scanned``).
        utterance_id: the ``id``/``utterance_id`` cell, or None.
        audio_path: resolved audio location (absolute local path or http(s) URL), or None.
        audio_bytes: embedded container bytes (Parquet ``audio.bytes``), or None.
        transcript: raw transcript cell, or None.
        speaker_id: first non-empty speaker cell as ``str``, or None.
        duration_s: duration in seconds, or None when the column is absent or the cell is empty.
        duration_error: why a present duration cell could not be parsed, or None.
    """

    source: str
    manifest_path: str
    row_number: int
    utterance_id: str | None
    audio_path: str | None
    audio_bytes: bytes | None
    transcript: str | None
    speaker_id: str | None
    duration_s: float | None
    duration_error: str | None = None


def _is_url(value: str) -> bool:
    return value.startswith(("http://", "https://"))


def discover_manifests(source: str | os.PathLike) -> list[Path]:
    """Manifest files contributed by one source, in the order they are read.

    Args:
        source: a ``.tsv``/``.parquet`` file or a folder.

    Returns:
        Sorted list of files. For a folder: every ``*.tsv`` below it (suffix matched
        case-insensitively) if there is any, otherwise every ``*.parquet``.

    Raises:
        ManifestError: the source does not exist, is not a manifest file, or a folder holds none.
    """
    path = Path(source)
    if path.is_file():
        if path.suffix.lower() not in MANIFEST_SUFFIXES:
            raise ManifestError(f"manifest {str(path)!r} is neither .tsv nor .parquet")
        return [path]
    if not path.is_dir():
        raise ManifestError(f"manifest source {str(path)!r} does not exist")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in MANIFEST_SUFFIXES)
    tsvs = [p for p in files if p.suffix.lower() == ".tsv"]
    chosen = tsvs or files
    if not chosen:
        raise ManifestError(f"manifest folder {str(path)!r} holds no .tsv or .parquet file")
    return chosen


def _first_column(names: Sequence[str], candidates: Sequence[str]) -> str | None:
    return next((c for c in candidates if c in names), None)


def check_columns(path: str | os.PathLike, names: Sequence[str]) -> None:
    """Raise :class:`ManifestColumnsError` when a manifest with columns ``names`` can give no record.

    A record needs a transcript column and an audio column (``path`` or ``audio``); the id column
    is optional (the audio path stands in). The message names the file, the columns found and
    every accepted alias.
    """
    missing = tuple(what for what, candidates in (("transcript", TRANSCRIPT_COLUMNS), ("audio", AUDIO_COLUMNS))
                    if _first_column(names, candidates) is None)
    if not missing:
        return
    found = tuple(str(n) for n in names if str(n).strip())
    shown = ", ".join(repr(n if len(n) <= 60 else n[:57] + "...") for n in found[:20])
    shown += f", ... ({len(found)} in all)" if len(found) > 20 else ""
    known = (*TRANSCRIPT_COLUMNS, *AUDIO_COLUMNS)
    hint = ""
    if len(found) == 1 and ("," in found[0] or ";" in found[0]):
        hint = " (one column holding separators: is the file comma- or semicolon-separated? TSV needs tabs)"
    elif any(n not in known and n.strip().lower() in known for n in found):
        hint = " (column names are case-sensitive)"
    raise ManifestColumnsError(
        f"manifest {str(path)!r} has no usable columns ({', '.join(f'no {m} column' for m in missing)}): "
        f"found [{shown or 'none'}]{hint}; "
        f"expected transcript ({'|'.join(TRANSCRIPT_COLUMNS)}), audio ({'|'.join(AUDIO_COLUMNS)}), "
        f"optional id ({'|'.join(ID_COLUMNS)})",
        str(path), found, missing,
    )


def _clean_str(value) -> str | None:
    if value is None:
        return None
    text = str(value)
    return text if text.strip() else None


def _parse_duration(value) -> tuple[float | None, str | None]:
    if value is None:
        return None, None
    if isinstance(value, (int, float)):
        return float(value), None
    text = str(value).strip()
    if not text:
        return None, None
    try:
        return float(text), None
    except ValueError:
        return None, f"unparseable duration {text!r}"


def _resolve(path_value: str | None, base: Path) -> str | None:
    if path_value is None:
        return None
    if _is_url(path_value) or os.path.isabs(path_value):
        return path_value
    return str(base / path_value)


def _read_batches(path: Path, invalid_rows: list | None = None) -> Iterator[pa.RecordBatch]:
    """Record batches of one manifest; a TSV row with the wrong number of cells is skipped and
    appended to ``invalid_rows`` as ``(line number, description)`` (raised without the list)."""

    def invalid(row) -> str:
        if invalid_rows is None:
            return "error"
        invalid_rows.append((row.number, f"expected {row.expected_columns} cells, got {row.actual_columns}: {row.text[:200]!r}"))
        return "skip"

    try:
        if path.suffix.lower() == ".tsv":
            # Every column typed as string: a stray value never breaks type inference, and
            # durations are parsed per cell, so one bad cell costs one row. Quote char '"' as upstream.
            with open(path, "rb") as handle:
                header = handle.readline().decode("utf-8-sig").rstrip("\r\n").split("\t")
            # A block must hold the longest row: one block for files up to 256 MiB, so a 10 MB
            # transcript cell never splits across blocks.
            block_size = max(1 << 22, min(path.stat().st_size + 1, 1 << 28))
            reader = pacsv.open_csv(
                path,
                read_options=pacsv.ReadOptions(block_size=block_size, use_threads=False),
                parse_options=pacsv.ParseOptions(delimiter="\t", quote_char='"', invalid_row_handler=invalid),
                convert_options=pacsv.ConvertOptions(
                    column_types={name: pa.string() for name in header},
                    strings_can_be_null=True, null_values=[""],
                ),
            )
            check_columns(path, reader.schema.names)
            yield from reader
        else:
            parquet = pq.ParquetFile(path)
            check_columns(path, parquet.schema_arrow.names)
            yield from parquet.iter_batches(batch_size=_BATCH_ROWS)
    except (pa.ArrowException, OSError) as exc:
        raise ManifestError(f"cannot read manifest {str(path)!r}: {exc}") from exc


def _rows_of_batch(batch: pa.RecordBatch) -> Iterator[dict]:
    names = batch.schema.names
    wanted = {
        "transcript": _first_column(names, TRANSCRIPT_COLUMNS),
        "duration": _first_column(names, DURATION_COLUMNS),
        "id": _first_column(names, ID_COLUMNS),
        "path": "path" if "path" in names else None,
        "audio": "audio" if "audio" in names else None,
    }
    speaker_cols = [c for c in SPEAKER_COLUMNS if c in names]
    columns = {key: batch.column(col).to_pylist() for key, col in wanted.items() if col}
    speakers = [batch.column(c).to_pylist() for c in speaker_cols]
    for i in range(batch.num_rows):
        row = {key: values[i] for key, values in columns.items()}
        row["speaker"] = next((str(v) for v in (s[i] for s in speakers) if _clean_str(v)), None)
        yield row


def iter_manifest_rows(
    sources: Sequence[str | os.PathLike],
    *,
    source_base: str | os.PathLike | None = None,
    on_error: Callable[[str, int, ManifestError], None] | None = None,
) -> Iterator[ManifestRow]:
    """Stream every row of every source, sources in the given order (duplicates removed).

    Args:
        sources: manifest files or folders.
        source_base: if set, the base of every relative audio path instead of each root.
        on_error: called as ``on_error(manifest_path, rows_read, error)`` when one manifest file
            cannot be parsed or lacks the columns a record needs (a
            :class:`~asr_assets.errors.ManifestColumnsError`; reading goes on with the next file),
            or one TSV line has the wrong number of cells (that line is skipped). Without it the
            error is raised.

    Yields:
        :class:`ManifestRow` per row. Audio resolution (spec §2.3): a non-empty ``path`` wins and
        carries no bytes; otherwise the ``audio`` struct's path (resolved) and bytes.

    Raises:
        ManifestError: a source is missing or (without ``on_error``) a file cannot be parsed or
            has no usable columns.
    """
    seen: set[str] = set()
    for source in sources:
        root = Path(source).resolve()
        if str(root) in seen:
            continue
        seen.add(str(root))
        files = discover_manifests(root)
        base = Path(source_base).resolve() if source_base else (root if root.is_dir() else root.parent)
        counter = 0
        for manifest in files:
            read = 0
            invalid_rows: list | None = [] if on_error is not None else None
            try:
                for batch in _read_batches(manifest, invalid_rows):
                    for line, problem in invalid_rows or ():
                        on_error(str(manifest), read, ManifestError(f"line {line} skipped: {problem}"))
                    if invalid_rows:
                        invalid_rows.clear()
                    for cells in _rows_of_batch(batch):
                        counter += 1
                        read += 1
                        yield _make_row(cells, str(root), str(manifest), counter, base)
            except ManifestColumnsError as exc:  # checked before the first row: nothing was read
                if on_error is None:
                    raise
                on_error(str(manifest), read, exc)
            except ManifestError as exc:
                if on_error is None:
                    raise
                on_error(str(manifest), read, ManifestError(f"manifest file unreadable after {read} rows: {exc}"))


def _make_row(cells: dict, source: str, manifest: str, counter: int, base: Path) -> ManifestRow:
    audio_path, audio_bytes = None, None
    top_path = _clean_str(cells.get("path"))
    audio = cells.get("audio")
    if top_path is not None:
        audio_path = _resolve(top_path.strip(), base)
    elif isinstance(audio, dict):
        audio_path = _resolve(_clean_str(audio.get("path")), base)
        audio_bytes = audio.get("bytes") or None
    elif isinstance(audio, (bytes, bytearray)) and audio:
        audio_bytes = bytes(audio)
    duration, duration_error = _parse_duration(cells.get("duration"))
    raw_id = cells.get("id")
    return ManifestRow(
        source=source,
        manifest_path=manifest,
        row_number=counter,
        utterance_id=str(raw_id).strip() if _clean_str(raw_id) else None,
        audio_path=audio_path,
        audio_bytes=audio_bytes,
        transcript=cells.get("transcript") if isinstance(cells.get("transcript"), str) else None,
        speaker_id=cells.get("speaker"),
        duration_s=duration,
        duration_error=duration_error,
    )


def manifest_fingerprint(source: str | os.PathLike) -> dict:
    """Cheap change detector of one source: stats only, no file is opened.

    Returns:
        ``{"digest": sha256 hex of the sorted (relative path, size, mtime_ns) of every manifest
        file, "files": count, "bytes": total size}``; ``{"digest": "missing", ...}`` when the
        source does not exist. Thousands of files cost one directory walk.
    """
    root = Path(source)
    entries = []
    if root.is_file():
        st = root.stat()
        entries.append((root.name, st.st_size, st.st_mtime_ns))
    elif root.is_dir():
        for dirpath, _, filenames in os.walk(root):
            for name in filenames:
                if os.path.splitext(name)[1].lower() in MANIFEST_SUFFIXES:
                    path = os.path.join(dirpath, name)
                    st = os.stat(path)
                    entries.append((os.path.relpath(path, root), st.st_size, st.st_mtime_ns))
    else:
        return {"digest": "missing", "files": 0, "bytes": 0}
    entries.sort()
    digest = hashlib.sha256(repr(entries).encode("utf-8")).hexdigest()
    return {"digest": digest, "files": len(entries), "bytes": sum(e[1] for e in entries)}
