"""Finding and reading manifest files (spec §2).

Entry points:
    - :func:`scan_manifests` — what a source (file or folder) contributes: the files read, the
      files skipped by the TSV-wins rule, the entries that could not be listed.
    - :func:`discover_manifests` — just the files read.
    - :func:`iter_manifest_rows` — every row of every source as a :class:`ManifestRow`, streamed.
    - :func:`manifest_fingerprint` — stats-only change detector of a source (the sensor's).

A *source* (manifest root) is a ``.tsv`` / ``.parquet`` file or a folder searched recursively in
sorted path order; if a folder holds any TSV, only its TSVs are read (the "TSV wins" rule),
otherwise all its Parquet files. Relative audio paths are resolved against the root that
contributed them (a folder itself, or a file's parent folder) unless ``source_base`` is given.

Columns (first present wins): transcript ``sentence|transcript|transcription|text|normalized_text``;
duration (s) ``duration|duration_seconds|audio_duration``; segment offset (s) ``offset|start``
(a row with an offset is a segment of ``duration`` seconds into its audio file, see
:attr:`ManifestRow.offset_s`); speaker ``client_id|speaker_id|speaker``; id ``id|utterance_id``; audio ``path`` (string) or ``audio`` (Hugging Face ``{bytes, path}``
struct, or plain binary). A file without a transcript column or without an audio column cannot
give a single record: it is a file-level problem (:class:`~asr_assets.errors.ManifestColumnsError`
naming the columns found and expected), reported like an unreadable file. So is a file in which a
column that would be read appears twice (:class:`DuplicateColumnsError`). Nothing here decodes
audio.

Hostile input costs as little as the format allows:
    - TSV rows are physical lines (``\\n``, ``\\r\\n`` or ``\\r``), as Common Voice's own tools
      read them: a ``"`` never joins lines. A cell that is entirely quoted (``"..."`` with inner
      quotes doubled, as a CSV writer quotes) is unquoted, so quoted files read as upstream's
      quote-aware readers read them; any other ``"`` is a plain character (an unbalanced quote
      stays in its own cell). A line that is not valid UTF-8 or has the wrong number of cells is
      skipped and reported with its line number; the other lines are read.
    - Parquet cells of a wrong type are coerced where that is unambiguous (numeric strings as
      durations, UTF-8 binary as text) and otherwise make that row unusable with a reason
      (:attr:`ManifestRow.audio_error`, :attr:`ManifestRow.duration_error`), e.g. ``audio.bytes``
      typed string. Embedded audio over ``max_blob_bytes`` is refused per row from its length
      (pyarrow compute) before it becomes a Python object.
    - Any other error while reading one file is a file-level problem after the rows already read;
      the next file is read as usual.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import hashlib
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import storage
from .errors import ManifestColumnsError, ManifestError

TRANSCRIPT_COLUMNS = ("sentence", "transcript", "transcription", "text", "normalized_text")
DURATION_COLUMNS = ("duration", "duration_seconds", "audio_duration")
OFFSET_COLUMNS = ("offset", "start")
SPEAKER_COLUMNS = ("client_id", "speaker_id", "speaker")
ID_COLUMNS = ("id", "utterance_id")
AUDIO_COLUMNS = ("path", "audio")
MANIFEST_SUFFIXES = (".tsv", ".parquet")
_BATCH_ROWS = 1024
#: Parquet rows per batch are chosen so that a batch holds about this much embedded audio.
_BATCH_AUDIO_BYTES = 64 * 2**20
EMBEDDED = "<embedded bytes>"


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
        audio_error: why the row's embedded audio cannot be used (over the blob limit, a cell of
            the wrong type), or None; the row is usable only through a readable ``audio_path``.
        file_row: where the row is in ``manifest_path``: the physical line number for a TSV
            (the header is line 1), the 1-based row index for Parquet.
        transcript_error: why a present transcript cell is not text (a Parquet number, binary
            that is not UTF-8), or None.
        offset_s: the ``offset``/``start`` cell in seconds, or None when the column is absent or
            the cell is empty. A row with an offset is a *segment*: samples from ``offset_s`` for
            ``duration_s`` seconds of its audio file (LibriHeavy/GigaSpeech layout); a row without
            one is the whole file, as before (its duration only describes the file).
        offset_error: why a present offset cell could not be parsed, or None.
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
    audio_error: str | None = None
    file_row: int = 0
    transcript_error: str | None = None
    offset_s: float | None = None
    offset_error: str | None = None


class SkippedManifest(ManifestError):
    """A manifest file that is deliberately not read (the TSV-wins rule); ``stage`` names it in
    reports."""

    stage = "skipped_manifest"


class ManifestLineError(ManifestError):
    """One line of a TSV manifest that was skipped (bad UTF-8, wrong number of cells).

    Attributes:
        line: the physical line number (the header is line 1).
    """

    def __init__(self, message: str, line: int = 0):
        self.line = line
        super().__init__(message)

    def __reduce__(self):
        return type(self), (str(self), self.line)


class DuplicateColumnsError(ManifestColumnsError):
    """A column the reader needs appears more than once, so which one holds the data is ambiguous."""


@dataclass
class ManifestScan:
    """What one source contributes (:func:`scan_manifests`).

    Attributes:
        files: the manifest files read, in reading order.
        skipped: ``(file, reason)`` of manifest files not read (the TSV-wins rule).
        problems: ``(path, reason)`` of folders or manifest files that could not be listed or
            opened (permission denied, symlink loop, not a regular file).
    """

    files: list[Path]
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)


def _is_url(value: str) -> bool:
    return storage.is_url(value)


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


#: ``{folder: walk}`` inside :func:`one_walk_per_folder`, else None.
_WALKS: contextvars.ContextVar[dict | None] = contextvars.ContextVar("asr_assets_manifest_walks", default=None)


@contextlib.contextmanager
def one_walk_per_folder(walks: dict | None = None) -> Iterator[dict]:
    """Within the block, each manifest folder is walked once: :func:`manifest_fingerprint` and
    :func:`scan_manifests` reuse the first walk of a folder, so a record-cache build lists an
    audio folder of millions of files once (not once to fingerprint, once to read), and the
    fingerprint it records describes exactly the files it read.

    Args:
        walks: the dict yielded by an enclosing block (e.g. of a parent process, whose walks
            are then reused); None starts empty.

    Yields:
        ``{folder: walk}``, filled as folders are walked (picklable).
    """
    memo = {} if walks is None else walks
    token = _WALKS.set(memo)
    try:
        yield memo
    finally:
        _WALKS.reset(token)


def _walk_manifests(root: Path) -> tuple[list[tuple[Path, os.stat_result]], list[tuple[str, str]]]:
    """Every regular file with a manifest suffix below ``root`` (symlinks to files followed,
    symlinks to folders not descended, as ``Path.rglob``), and what could not be listed; inside
    :func:`one_walk_per_folder`, the first walk of ``root`` there."""
    memo = _WALKS.get()
    if memo is None:
        return _walk(root)
    key = os.path.realpath(root)
    if key not in memo:
        memo[key] = (str(root), _walk(root))
    walked, (found, problems) = memo[key]
    if walked == str(root):
        return found, problems

    def rebased(path: str) -> str:  # the same folder named another way (relative, through a symlink)
        return os.path.join(str(root), os.path.relpath(path, walked))

    return ([(Path(rebased(str(p))), st) for p, st in found], [(rebased(p), reason) for p, reason in problems])


def _walk(root: Path) -> tuple[list[tuple[Path, os.stat_result]], list[tuple[str, str]]]:
    """The files of :func:`_walk_manifests`, in ``os.walk``'s top-down order (a folder's files,
    then its subfolders one by one), read with ``os.scandir`` one entry at a time: ``os.walk``
    first lists every name of a folder, ~80 B each, which is 240 MB at the peak for a Common
    Voice ``clips/`` folder of 3M files (measured: 952 MiB peak RSS for a 3M-row build)."""
    problems: list[tuple[str, str]] = []
    found: list[tuple[Path, os.stat_result]] = []

    def unlistable(exc: OSError, folder: str) -> None:
        if exc.errno != errno.ENOENT:  # a folder removed while walking is simply gone
            problems.append((exc.filename or folder, f"cannot list folder: {_reason(exc)}"))

    stack = [os.fspath(root)]
    while stack:
        folder = stack.pop()
        subfolders: list[str] = []
        try:
            entries = os.scandir(folder)
        except OSError as exc:
            unlistable(exc, folder)
            continue
        with entries:
            while True:
                try:
                    entry = next(entries)
                except StopIteration:
                    break
                except OSError as exc:  # the folder went bad mid-listing: what was read stands
                    unlistable(exc, folder)
                    break
                try:
                    is_folder = entry.is_dir()
                except OSError:
                    is_folder = False
                if is_folder:  # as os.walk(followlinks=False): a symlink to a folder is not descended
                    try:
                        if not entry.is_symlink():
                            subfolders.append(entry.path)
                    except OSError:
                        pass
                    continue
                name = entry.name
                if not name.lower().endswith(MANIFEST_SUFFIXES):  # cheap first: audio folders hold millions of files
                    continue
                if os.path.splitext(name)[1].lower() not in MANIFEST_SUFFIXES:
                    continue
                path = entry.path
                try:
                    st = os.stat(path)
                except FileNotFoundError:
                    continue  # removed (or a dangling symlink): not a manifest
                except OSError as exc:
                    problems.append((path, f"cannot open manifest: {_reason(exc)}"))
                    continue
                if stat.S_ISREG(st.st_mode):
                    found.append((Path(path), st))
                else:
                    problems.append((path, "not a regular file (a FIFO, device or socket is never read)"))
        stack.extend(reversed(subfolders))
    return found, problems


def scan_manifests(source: str | os.PathLike) -> ManifestScan:
    """The manifest files one source contributes, those it skips, and what could not be listed.

    Args:
        source: a ``.tsv``/``.parquet`` file or a folder.

    Returns:
        :class:`ManifestScan`. For a folder: every ``*.tsv`` below it (suffix matched
        case-insensitively), sorted, if there is any (the Parquet files are then ``skipped``, with
        a reason naming the TSV that won), otherwise every ``*.parquet``. Folders that cannot be
        listed and manifest files that cannot be opened are ``problems``; the rest is read.

    Raises:
        ManifestError: the source does not exist or cannot be opened, is not a manifest file,
            or a folder holds no readable manifest.
    """
    if storage.is_url(source):
        return _scan_remote(str(source))
    path = Path(source)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ManifestError(f"manifest source {str(path)!r} does not exist") from None
    except OSError as exc:
        raise ManifestError(f"manifest source {str(path)!r} cannot be opened: {_reason(exc)}") from exc
    if stat.S_ISREG(st.st_mode):
        if path.suffix.lower() not in MANIFEST_SUFFIXES:
            raise ManifestError(f"manifest {str(path)!r} is neither .tsv nor .parquet")
        return ManifestScan([path])
    if not stat.S_ISDIR(st.st_mode):
        raise ManifestError(f"manifest source {str(path)!r} is neither a file nor a folder")
    found, problems = _walk_manifests(path)
    return _tsv_wins(path, sorted(p for p, _ in found), problems)


def _tsv_wins(path, files: list, problems: list[tuple[str, str]]) -> ManifestScan:
    """The TSV-wins rule over the sorted manifest ``files`` found below the folder ``path``."""
    tsvs = [p for p in files if p.suffix.lower() == ".tsv"]
    if not (tsvs or files):
        unreadable = f" ({len(problems)} unreadable: {problems[0][0]!r}: {problems[0][1]})" if problems else ""
        raise ManifestError(f"manifest folder {str(path)!r} holds no .tsv or .parquet file{unreadable}")
    skipped = []
    if tsvs:
        winner = f"{str(tsvs[0])!r}" + (f" and {len(tsvs) - 1} more .tsv" if len(tsvs) > 1 else "")
        skipped = [(p, f"not read: TSV wins — the manifest root {str(path)!r} holds {winner}, and a root with "
                       "any .tsv is read from its TSVs only") for p in files if p.suffix.lower() != ".tsv"]
    return ManifestScan(tsvs or files, skipped, problems)


def _scan_remote(url: str) -> ManifestScan:
    """:func:`scan_manifests` of a URL: a ``.tsv``/``.parquet`` object, or a folder listed
    recursively (one listing; same suffix, sort and TSV-wins rules as local folders)."""
    if url.rstrip("/").lower().endswith(MANIFEST_SUFFIXES):
        try:
            return ManifestScan([storage.info(url)])
        except FileNotFoundError:
            raise ManifestError(f"manifest source {url!r} does not exist") from None
        except IsADirectoryError:
            pass  # a folder named like a manifest
        except OSError as exc:
            raise ManifestError(f"manifest source {url!r} cannot be opened: {_reason(exc)}") from exc
    try:
        found = [f for f in storage.list_files(url, recursive=True)
                 if os.path.splitext(f.name)[1].lower() in MANIFEST_SUFFIXES]
    except OSError as exc:
        raise ManifestError(f"manifest source {url!r} cannot be listed: {_reason(exc)}") from exc
    if not found:
        raise ManifestError(f"manifest source {url!r} does not exist or holds no .tsv or .parquet file")
    return _tsv_wins(url, found, [])


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
    return scan_manifests(source).files


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


def _used_columns(path: str | os.PathLike, names: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """``({role: column}, speaker columns)`` of a manifest with columns ``names``.

    Raises:
        ManifestColumnsError: no transcript or no audio column.
        DuplicateColumnsError: a column that would be read appears more than once (columns that
            are not read may repeat).
    """
    names = [str(n) for n in names]
    check_columns(path, names)
    wanted = {
        "transcript": _first_column(names, TRANSCRIPT_COLUMNS),
        "duration": _first_column(names, DURATION_COLUMNS),
        "offset": _first_column(names, OFFSET_COLUMNS),
        "id": _first_column(names, ID_COLUMNS),
        "path": "path" if "path" in names else None,
        "audio": "audio" if "audio" in names else None,
    }
    wanted = {role: col for role, col in wanted.items() if col}
    speakers = [c for c in SPEAKER_COLUMNS if c in names]
    repeated = sorted({c for c in (*wanted.values(), *speakers) if names.count(c) > 1})
    if repeated:
        raise DuplicateColumnsError(
            f"manifest {str(path)!r} has duplicate column names {repeated} "
            f"({', '.join(f'{c!r} {names.count(c)} times' for c in repeated)}): which one holds the data is "
            "ambiguous, so no row of this file is read; rename or drop the extra columns",
            str(path), tuple(names), (),
        )
    return wanted, speakers


# ----------------------------------------------------------------------------- cell values


def _text(value) -> str | None:
    """A cell as text: strings as they are, UTF-8 binary decoded, numbers etc. through ``str``."""
    if value is None or type(value) is str:
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return None
    return value if isinstance(value, str) else str(value)


def _clean_str(value) -> str | None:
    text = value if value is None or type(value) is str else _text(value)
    return text if text is not None and text.strip() else None


def _parse_duration(value, what: str = "duration") -> tuple[float | None, str | None]:
    if value is None:
        return None, None
    if type(value) is float:
        return value, None
    if isinstance(value, bool):
        return None, f"{what} is a boolean ({value!r}), not a number of seconds"
    if isinstance(value, (int, float)):
        return float(value), None
    text = _text(value)
    text = text.strip() if text is not None else ""
    if not text:
        return None, None
    try:
        return float(text), None
    except ValueError:
        return None, f"unparseable {what} {text[:100]!r}"


def _resolve(path_value: str | None, base: Path) -> str | None:
    if path_value is None:
        return None
    if _is_url(path_value) or os.path.isabs(path_value):
        return path_value
    if isinstance(base, str):  # a URL root: same scheme and bucket prefix
        return storage.resolve(path_value, base)
    return str(base / path_value)


# ----------------------------------------------------------------------------- TSV


def _quoted_cell(line: str, pos: int) -> tuple[str, int] | None:
    """The quoted cell starting at ``line[pos] == '"'``, unquoted, and the position right after
    its closing quote (a tab or the end of the line); None when it is not a well-formed quoted
    cell (no closing quote, or text after it)."""
    n, parts, k = len(line), [], pos + 1
    while True:
        q = line.find('"', k)
        if q < 0:
            return None
        parts.append(line[k:q])
        if q + 1 < n and line[q + 1] == '"':  # a doubled quote inside
            parts.append('"')
            k = q + 2
            continue
        if q + 1 == n or line[q + 1] == "\t":
            return "".join(parts), q + 1
        return None


def split_tsv_line(line: str) -> list[str]:
    """The tab-separated cells of one physical TSV line.

    A cell that is entirely quoted (``"..."`` closed right before a tab or the end of the line,
    inner quotes doubled, as CSV writers quote) is unquoted, so such files read as upstream's
    quote-aware readers read them; every other ``"`` is a plain character, so an unbalanced quote
    stays in its cell and never joins lines. Linear in the line length.
    """
    if '"' not in line:
        return line.split("\t")
    cells: list[str] = []
    pos, n = 0, len(line)
    while True:
        quoted = _quoted_cell(line, pos) if line.startswith('"', pos) else None
        if quoted is not None:
            cell, end = quoted
        else:
            end = line.find("\t", pos)
            end = n if end < 0 else end
            cell = line[pos:end]
        cells.append(cell)
        if end >= n:
            return cells
        pos = end + 1


def _physical_lines(handle) -> Iterator[tuple[int, bytes]]:
    """``(line number, bytes)`` of a binary file, line breaks removed; ``\\n``, ``\\r\\n`` and a
    lone ``\\r`` each end a line (as pyarrow's and Python's readers count them)."""
    number = 0
    for raw in handle:
        if raw.endswith(b"\n"):
            raw = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1]
        for piece in (raw.split(b"\r") if b"\r" in raw else (raw,)):
            number += 1
            yield number, piece


def _tsv_cells(path: Path, line_error: Callable[[int, str], None]) -> Iterator[tuple[int, dict]]:
    """``(line number, {role: cell})`` of every usable line of a TSV; empty lines are skipped, and
    a line that is not UTF-8 or has the wrong number of cells goes to ``line_error``."""
    with storage.open_input(path) as handle:
        lines = _physical_lines(handle)
        number, raw = next(((n, r) for n, r in lines if r), (0, b""))
        try:
            header = raw.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise ManifestError(f"manifest {str(path)!r}: header line {number} is not valid UTF-8 "
                                f"(byte 0x{raw[exc.start]:02x} at offset {exc.start})") from None
        names = split_tsv_line(header) if raw else []
        wanted, speakers = _used_columns(path, names)
        audio = wanted.pop("audio", None)
        index = {role: names.index(column) for role, column in wanted.items()}
        audio_index = names.index(audio) if audio else None
        speaker_index = [names.index(c) for c in speakers]
        width, items = len(names), list(index.items())
        for number, raw in lines:
            if not raw:
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                line_error(number, f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start}): {raw[:200]!r}")
                continue
            cells = split_tsv_line(text)
            if len(cells) != width:
                line_error(number, f"expected {width} cells, got {len(cells)}: {text[:200]!r}")
                continue
            row = {role: cells[i] or None for role, i in items}
            row["speaker"] = next((c for c in (cells[i] for i in speaker_index) if c and not c.isspace()), None)
            if audio_index is not None and cells[audio_index].strip():
                row["audio_error"] = "the TSV's 'audio' cell is text, not audio (TSV rows carry audio as 'path')"
            yield number, row


# ----------------------------------------------------------------------------- Parquet


def _is_binary(kind: pa.DataType) -> bool:
    return (pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_fixed_size_binary(kind)
            or pa.types.is_binary_view(kind))


def _is_text(kind: pa.DataType) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)


def _batch_rows(parquet: pq.ParquetFile, audio_column: str | None) -> int:
    """Rows per batch such that a batch holds about ``_BATCH_AUDIO_BYTES`` of embedded audio
    (from the row groups' uncompressed column sizes), at most ``_BATCH_ROWS``, at least 1."""
    if audio_column is None:
        return _BATCH_ROWS
    meta, worst = parquet.metadata, 0.0
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        if group.num_rows:
            size = sum(group.column(c).total_uncompressed_size for c in range(group.num_columns)
                       if group.column(c).path_in_schema.split(".")[0] == audio_column)
            worst = max(worst, size / group.num_rows)
    return max(1, min(_BATCH_ROWS, int(_BATCH_AUDIO_BYTES // worst))) if worst else _BATCH_ROWS


def _audio_cells(array: pa.Array, needed: list[bool], max_blob_bytes: int | None,
                 read_bytes: bool) -> tuple[list, list, list]:
    """``(paths, bytes, errors)`` per row of an ``audio`` column (a ``{bytes, path}`` struct or
    plain binary), for the rows in ``needed`` (no top-level ``path``).

    Lengths are checked with pyarrow compute first: a blob over ``max_blob_bytes`` and a
    ``bytes`` field that is not binary give an error for that row and never become Python objects.
    """
    n = len(array)
    paths: list = [None] * n
    blobs: list = [None] * n
    errors: list = [None] * n
    if pa.types.is_struct(array.type):
        children = dict(zip((array.type.field(i).name for i in range(array.type.num_fields)), array.flatten()))
        if "path" in children:
            paths = children["path"].to_pylist()
        data, where = children.get("bytes"), "audio.bytes"
    else:
        data, where = array, "column 'audio'"
    if data is None or not any(needed):
        return paths, blobs, errors
    kind = data.type
    if _is_binary(kind) or _is_text(kind):
        lengths = pc.binary_length(data).fill_null(0).to_numpy(zero_copy_only=False)
    else:
        lengths = data.is_valid().to_numpy(zero_copy_only=False).astype("int64")
    rows = [i for i in range(n) if needed[i] and lengths[i] > 0]
    if not _is_binary(kind):
        expected = "a {bytes: binary, path: string} struct or binary" if where.startswith("column") else "binary"
        fix = ("if it holds file paths, name the column 'path'; if audio bytes, re-export it as binary"
               if _is_text(kind) else "re-export the column as binary")
        for i in rows:
            errors[i] = f"{where} is typed {kind}, not {expected}: its value cannot be used as audio bytes ({fix})"
        return paths, blobs, errors
    limit = max_blob_bytes
    over = [i for i in rows if limit is not None and lengths[i] > limit]
    for i in over:
        errors[i] = (f"embedded audio ({where}) is {lengths[i] / 2**20:.2f} MiB ({int(lengths[i]):,} bytes), over the "
                     f"{limit / 2**20:.4g} MiB limit (max_blob_mb): refused before it was read")
    if not read_bytes:
        return paths, blobs, errors
    if not over and len(rows) == n:
        blobs = data.to_pylist()
    else:
        skip = set(over)
        for i in rows:
            if i not in skip:
                blobs[i] = data[i].as_py()
    return paths, blobs, errors


def _remote_input(url):
    """A remote Parquet manifest for pyarrow: object stores are read in ranges (only the columns
    used); an http(s) file is downloaded once into the local content cache first, as upstream's
    Python loader does (web servers need not serve ranges)."""
    if storage.scheme(url) in ("http", "https"):
        return str(storage.fetch(str(url)))
    return storage.open_input(url, getattr(url, "size", None))


def _parquet_cells(path: Path, max_blob_bytes: int | None, read_bytes: bool) -> Iterator[tuple[int, dict]]:
    """``(1-based row index, {role: value})`` of every row of a Parquet manifest, reading only
    the columns used."""
    parquet = pq.ParquetFile(_remote_input(path) if storage.is_url(path) else path)
    wanted, speakers = _used_columns(path, parquet.schema_arrow.names)
    audio = wanted.pop("audio", None)
    columns = list(dict.fromkeys([*wanted.values(), *speakers, *([audio] if audio else [])]))
    index = 0
    for batch in parquet.iter_batches(batch_size=_batch_rows(parquet, audio), columns=columns):
        n = batch.num_rows
        values = {role: batch.column(column).to_pylist() for role, column in wanted.items()}
        spoken = [batch.column(c).to_pylist() for c in speakers]
        if audio is not None:
            needed = [_clean_str(v) is None for v in values.get("path", [None] * n)]
            audio_paths, blobs, errors = _audio_cells(batch.column(audio), needed, max_blob_bytes, read_bytes)
        for i in range(n):
            index += 1
            row = {role: column[i] for role, column in values.items()}
            row["speaker"] = next((_text(v) for v in (s[i] for s in spoken) if _clean_str(v)), None)
            if audio is not None:
                row["audio_path"], row["audio_bytes"], row["audio_error"] = audio_paths[i], blobs[i], errors[i]
            yield index, row


# ----------------------------------------------------------------------------- rows


def _raise_or_report(on_error, manifest: str, rows_read: int, error: ManifestError) -> None:
    if on_error is None:
        raise error
    on_error(manifest, rows_read, error)


def iter_manifest_rows(
    sources: Sequence[str | os.PathLike],
    *,
    source_base: str | os.PathLike | None = None,
    on_error: Callable[[str, int, ManifestError], None] | None = None,
    max_blob_bytes: int | None = None,
    read_audio_bytes: bool = True,
) -> Iterator[ManifestRow]:
    """Stream every row of every source, sources in the given order (duplicates removed).

    Args:
        sources: manifest files or folders.
        source_base: if set, the base of every relative audio path instead of each root.
        on_error: called as ``on_error(path, rows_read, error)`` for every problem that costs
            rows but not the run; without it the first such error is raised. The problems:
            a manifest file that cannot be read, lacks the columns a record needs
            (:class:`~asr_assets.errors.ManifestColumnsError`) or repeats a column it needs
            (:class:`DuplicateColumnsError`) — reading goes on with the next file, after the
            rows already read; a TSV line that is not UTF-8 or has the wrong number of cells
            (:class:`ManifestLineError` with its ``line``; that line is skipped); a folder or
            manifest file below a root that cannot be listed or opened; and, with ``on_error``
            only, each file not read because of the TSV-wins rule (:class:`SkippedManifest`).
        max_blob_bytes: embedded audio longer than this is not read; the row gets an
            ``audio_error`` instead (None: no limit).
        read_audio_bytes: False leaves ``audio_bytes`` None without reading the bytes (enough
            to learn utterance ids).

    Yields:
        :class:`ManifestRow` per row. Audio resolution (spec §2.3): a non-empty ``path`` wins and
        carries no bytes; otherwise the ``audio`` struct's path (resolved) and bytes.

    Raises:
        ManifestError: a source is missing or cannot be opened, or (without ``on_error``) one of
            the problems above.
    """
    seen: set[str] = set()
    for source in sources:
        try:
            root = str(source).rstrip("/") if storage.is_url(source) else Path(source).resolve()
        except (OSError, RuntimeError):  # a symlink loop: scan_manifests names the problem
            root = Path(os.path.abspath(source))
        if str(root) in seen:
            continue
        seen.add(str(root))
        scan = scan_manifests(root)
        for where, reason in scan.problems:
            _raise_or_report(on_error, where, 0, ManifestError(f"{where!r} skipped: {reason}"))
        if on_error is not None:
            for skipped, reason in scan.skipped:
                on_error(str(skipped), 0, SkippedManifest(reason))
        base = _source_base(root, scan, source_base)
        counter, source_name = 0, str(root)
        for manifest in scan.files:
            read, manifest_name = 0, str(manifest)

            def line_error(line: int, problem: str) -> None:
                _raise_or_report(on_error, str(manifest), read, ManifestLineError(f"line {line} skipped: {problem}", line))

            try:
                if manifest.suffix.lower() == ".tsv":
                    cells_of_rows = _tsv_cells(manifest, line_error)
                else:
                    cells_of_rows = _parquet_cells(manifest, max_blob_bytes, read_audio_bytes)
                for file_row, cells in cells_of_rows:
                    counter += 1
                    read += 1
                    yield _make_row(cells, source_name, manifest_name, counter, file_row, base)
            except (ManifestColumnsError, ManifestLineError) as exc:  # columns: checked before the first row
                _raise_or_report(on_error, str(manifest), read, exc)
            except Exception as exc:  # noqa: BLE001 - any failure of one file is reported, the next file is read
                detail = str(exc) if isinstance(exc, (ManifestError, OSError, pa.ArrowException)) else f"{type(exc).__name__}: {exc}"
                if not isinstance(exc, ManifestError):
                    detail = f"cannot read manifest {str(manifest)!r}: {detail}"
                error = ManifestError(f"manifest file unreadable after {read} rows: {detail}")
                if on_error is None:
                    raise error from exc
                on_error(str(manifest), read, error)


def _source_base(root, scan: ManifestScan, source_base) -> Path | str:
    """Where relative audio paths of ``root`` are resolved: ``source_base``, else the root
    folder, or a manifest file's folder (URLs alike: the same bucket prefix)."""
    if source_base:
        return str(source_base).rstrip("/") if storage.is_url(source_base) else Path(source_base).resolve()
    if isinstance(root, str):  # a URL
        return storage.parent(root) if [str(f) for f in scan.files] == [root] else root
    return root if root.is_dir() else root.parent


def _make_row(cells: dict, source: str, manifest: str, counter: int, file_row: int, base: Path) -> ManifestRow:
    audio_path, audio_bytes, audio_error = None, None, None
    top_path = _clean_str(cells.get("path"))
    if top_path is not None:
        audio_path = _resolve(top_path.strip(), base)
    else:
        audio_path = _resolve(_clean_str(cells.get("audio_path")), base)
        audio_bytes = cells.get("audio_bytes") or None
        audio_error = cells.get("audio_error")
    duration, duration_error = _parse_duration(cells.get("duration"))
    offset, offset_error = _parse_duration(cells.get("offset"), "offset")
    raw_id = _clean_str(cells.get("id"))
    transcript, transcript_error = cells.get("transcript"), None
    if transcript is not None and type(transcript) is not str:
        text = _text(transcript) if isinstance(transcript, (bytes, bytearray, memoryview)) else None
        if text is None:
            shown = f"{bytes(transcript)[:60]!r}" if isinstance(transcript, (bytes, bytearray, memoryview)) else repr(transcript)[:60]
            transcript_error = f"transcript cell is {type(transcript).__name__} {shown}, not text"
        transcript = text
    return ManifestRow(
        source=source,
        manifest_path=manifest,
        row_number=counter,
        utterance_id=raw_id.strip() if raw_id else None,
        audio_path=audio_path,
        audio_bytes=audio_bytes,
        transcript=transcript,
        speaker_id=cells.get("speaker"),
        duration_s=duration,
        duration_error=duration_error,
        audio_error=audio_error,
        file_row=file_row,
        transcript_error=transcript_error,
        offset_s=offset,
        offset_error=offset_error,
    )


def manifest_fingerprint(source: str | os.PathLike) -> dict:
    """Cheap change detector of one source: stats only, no file is opened.

    Returns:
        ``{"digest": sha256 hex of the sorted (relative path, size, mtime_ns) of every manifest
        file (and of every entry that could not be listed or opened), "files": count, "bytes":
        total size, "problems": ["<path>: <reason>", ...]}``. The digest is ``"missing"`` when
        the source does not exist and ``"unreadable"`` when it cannot be opened (a symlink loop,
        permission denied); ``problems`` then says why. Never raises for a file-system problem.
        Thousands of files cost one directory walk.
    """
    empty = {"files": 0, "bytes": 0}
    if storage.is_url(source):
        return _remote_fingerprint(str(source), empty)
    root = Path(source)
    try:
        st = os.stat(root)
    except FileNotFoundError:
        return {"digest": "missing", **empty, "problems": [f"{root}: does not exist"]}
    except OSError as exc:
        return {"digest": "unreadable", **empty, "problems": [f"{root}: cannot be opened: {_reason(exc)}"]}
    problems: list[tuple[str, str]] = []
    if stat.S_ISREG(st.st_mode):
        entries = [(root.name, st.st_size, st.st_mtime_ns)]
    elif stat.S_ISDIR(st.st_mode):
        found, problems = _walk_manifests(root)
        for path, reason in problems:
            if path == str(root):  # the root itself cannot be listed
                return {"digest": "unreadable", **empty, "problems": [f"{root}: {reason}"]}
        entries = [(os.path.relpath(p, root), s.st_size, s.st_mtime_ns) for p, s in found]
        entries += [(os.path.relpath(p, root), -1, 0) for p, _ in problems]  # unreadable is a state too
    else:
        return {"digest": "unreadable", **empty, "problems": [f"{root}: neither a file nor a folder"]}
    entries.sort()
    digest = hashlib.sha256(repr(entries).encode("utf-8")).hexdigest()
    readable = [e for e in entries if e[1] >= 0]
    shown = [f"{p}: {r}" for p, r in problems[:20]] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
    return {"digest": digest, "files": len(readable), "bytes": sum(e[1] for e in readable), "problems": shown}


def _remote_fingerprint(url: str, empty: dict) -> dict:
    """:func:`manifest_fingerprint` of a URL: one listing; (relative name, size, ETag or
    modification time) of every manifest object."""
    try:
        found = storage.list_files(url, recursive=True) or [storage.info(url)]
    except FileNotFoundError:
        return {"digest": "missing", **empty, "problems": [f"{url}: does not exist"]}
    except OSError as exc:
        return {"digest": "unreadable", **empty, "problems": [f"{url}: cannot be listed: {_reason(exc)}"]}
    entries = sorted((str(f)[len(url):].lstrip("/") or f.name, f.size, f.etag or f.mtime_ns) for f in found
                     if os.path.splitext(f.name)[1].lower() in MANIFEST_SUFFIXES)
    digest = hashlib.sha256(repr(entries).encode("utf-8")).hexdigest()
    return {"digest": digest, "files": len(entries), "bytes": sum(e[1] for e in entries), "problems": []}
