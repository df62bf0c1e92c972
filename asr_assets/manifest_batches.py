"""Manifest rows in columnar batches, every file read once (the record-cache build's reader).

Entry point: :func:`iter_manifest_batches` — the rows of :func:`asr_assets.manifests.iter_manifest_rows`
(same discovery, columns, cell rules, row numbers and per-file/per-line problems, in the same
order) as :class:`ManifestBatch` columns of up to ``batch_rows`` rows, with every problem as a
:class:`ManifestProblem` at its place in the stream (a batch never spans a problem).

TSV files are read in blocks of a few MiB: a block is split into physical lines
(``\\n``, ``\\r\\n``, lone ``\\r``) and decoded at once; only a block holding invalid UTF-8 is
decoded line by line (each bad line is reported as the per-row reader reports it). Cells are
split with ``str.split("\\t")``; a line holding a ``"`` goes through
:func:`asr_assets.manifests.split_tsv_line`. Parquet rows go through the per-row reader's own
cell code. :func:`asr_assets.manifests.iter_manifest_rows` stays the reference: the tests run
both on the same manifests and compare every row and problem.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISREG
from typing import Iterator, Sequence

import pyarrow as pa

from . import storage
from .errors import ManifestColumnsError, ManifestError
from .manifests import (
    ManifestLineError,
    ManifestRow,
    SkippedManifest,
    _make_row,
    _parquet_cells,
    _source_base,
    _used_columns,
    scan_manifests,
    split_tsv_line,
)

#: Bytes read from a TSV at a time (the lines of one block form at most a few batches).
_BLOCK_BYTES = 4 * 2**20
_BATCH_ROWS = 65536


@dataclass
class ManifestBatch:
    """Consecutive rows of one manifest file, as columns (one list entry per row).

    The fields are those of :class:`~asr_assets.manifests.ManifestRow`, per row; the optional
    columns are None when no row of the batch has a value (``audio_bytes``, ``audio_error``,
    ``duration_error``, ``transcript_error``, ``offset_s``, ``offset_error``).
    """

    source: str
    manifest_path: str
    row_number: list[int]
    file_row: list[int]
    utterance_id: list[str | None]
    audio_path: list[str | None]
    transcript: list[str | None]
    speaker_id: list[str | None]
    duration_s: list[float | None]
    audio_bytes: list[bytes | None] | None = None
    audio_error: list[str | None] | None = None
    duration_error: list[str | None] | None = None
    transcript_error: list[str | None] | None = None
    offset_s: list[float | None] | None = None
    offset_error: list[str | None] | None = None
    #: With ``stat_audio``: per row the size in bytes of the local regular file at
    #: ``audio_path``, None when there is none (missing, not a regular file, a URL, no path);
    #: None without ``stat_audio``.
    audio_size: list[int | None] | None = None

    def __len__(self) -> int:
        return len(self.row_number)

    def row(self, i: int) -> ManifestRow:
        """Row ``i`` as the per-row reader yields it."""
        return ManifestRow(
            self.source, self.manifest_path, self.row_number[i], self.utterance_id[i], self.audio_path[i],
            self.audio_bytes[i] if self.audio_bytes else None, self.transcript[i], self.speaker_id[i],
            self.duration_s[i], self.duration_error[i] if self.duration_error else None,
            self.audio_error[i] if self.audio_error else None, self.file_row[i],
            self.transcript_error[i] if self.transcript_error else None,
            self.offset_s[i] if self.offset_s else None, self.offset_error[i] if self.offset_error else None,
        )

    @classmethod
    def from_rows(cls, source: str, manifest: str, rows: Sequence[ManifestRow]) -> "ManifestBatch":
        def column(name):
            values = [getattr(r, name) for r in rows]
            return values if any(v is not None for v in values) else None

        return cls(source, manifest, [r.row_number for r in rows], [r.file_row for r in rows],
                   [r.utterance_id for r in rows], [r.audio_path for r in rows], [r.transcript for r in rows],
                   [r.speaker_id for r in rows], [r.duration_s for r in rows], column("audio_bytes"),
                   column("audio_error"), column("duration_error"), column("transcript_error"), column("offset_s"),
                   column("offset_error"))


@dataclass
class ManifestProblem:
    """A problem that costs rows but not the run, where ``on_error(manifest, rows_read, error)``
    of :func:`~asr_assets.manifests.iter_manifest_rows` would be called."""

    manifest: str
    rows_read: int
    error: ManifestError


# ----------------------------------------------------------------------------- TSV


def _blocks(handle, block_bytes: int) -> Iterator[bytes]:
    """The file in pieces that each end right after a line break (the last one: at the end of
    the file), so no ``\\r\\n`` is cut in two."""
    rest = b""
    while True:
        data = handle.read(block_bytes)
        if not data:
            if rest:
                yield rest
            return
        data = rest + data if rest else data
        cut = max(data.rfind(b"\n"), data.rfind(b"\r", 0, len(data) - 1)) + 1
        if cut == 0:
            rest = data  # no line break yet: one long line
            continue
        rest = data[cut:]
        yield data[:cut] if rest else data


def _physical_lines(block: bytes) -> list[str] | list[bytes]:
    """The physical lines of a block (as ``manifests._physical_lines`` cuts them; an empty last
    piece after a final break is dropped: it is an empty line, which is never read), decoded
    when the whole block is valid UTF-8, else as bytes."""
    try:
        text = block.decode("utf-8")
    except UnicodeDecodeError:
        return block.splitlines()
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = text.split("\n")
    if lines and not lines[-1]:
        lines.pop()
    return lines


def _tsv_batches(path: Path, source: str, base: Path, counter: int, batch_rows: int,
                 block_bytes: int) -> Iterator[ManifestBatch | ManifestLineError]:
    manifest = str(path)
    with storage.open_input(path, getattr(path, "size", None)) as handle:  # a local file or an object
        blocks = _blocks(handle, block_bytes)
        number = 0
        header = None
        pending: list = []  # lines of the current block not yet read
        for block in blocks:
            pending = _physical_lines(block)
            start = 0
            while start < len(pending) and not pending[start]:
                start += 1
            number += start
            if start < len(pending):
                number += 1
                header = pending[start]
                pending = pending[start + 1:]
                break
        if header is None:
            _used_columns(path, [])
            return
        raw = header if isinstance(header, bytes) else header.encode("utf-8")
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise ManifestError(f"manifest {manifest!r}: header line {number} is not valid UTF-8 "
                                f"(byte 0x{raw[exc.start]:02x} at offset {exc.start})") from None
        names = split_tsv_line(text)
        wanted, speakers = _used_columns(path, names)
        audio = wanted.pop("audio", None)
        width = len(names)
        ti = names.index(wanted["transcript"])
        di = names.index(wanted["duration"]) if "duration" in wanted else None
        oi = names.index(wanted["offset"]) if "offset" in wanted else None
        ii = names.index(wanted["id"]) if "id" in wanted else None
        pi = names.index(wanted["path"]) if "path" in wanted else None
        si = [names.index(c) for c in speakers]
        ai = names.index(audio) if audio else None
        base_prefix = str(base).rstrip("/") + "/"
        base_prefix = "/" if base_prefix == "//" else base_prefix

        def lines_of(first):
            yield first
            for b in blocks:
                yield _physical_lines(b)

        cells_rows: list[list[str]] = []
        numbers: list[int] = []

        def flush(count: int | None = None):
            """A batch of the first ``count`` (default: all) rows read and not yet batched."""
            nonlocal counter, cells_rows, numbers
            if not cells_rows:
                return None
            count = len(cells_rows) if count is None else count
            batch = _tsv_batch(cells_rows[:count], numbers[:count], source, manifest, counter, ti, di, oi, ii, pi, si,
                               ai, base, base_prefix)
            counter += count
            cells_rows, numbers = cells_rows[count:], numbers[count:]
            return batch

        chunks = lines_of(pending)
        while True:
            try:
                lines = next(chunks)
            except StopIteration:
                break
            except Exception:  # a read error: the rows before it are yielded, as the per-row reader does
                batch = flush()
                if batch is not None:
                    yield batch
                raise
            if width > 1 and lines and type(lines[0]) is str:  # a decoded block: every line at once
                cells = [line.split("\t") if '"' not in line else split_tsv_line(line) for line in lines]
                if set(map(len, cells)) == {width}:  # no short, long or empty line (an empty one has 1 cell)
                    cells_rows.extend(cells)
                    numbers.extend(range(number + 1, number + len(lines) + 1))
                    number += len(lines)
                    while len(cells_rows) >= batch_rows:
                        yield flush(batch_rows)
                    continue
            for line in lines:  # line by line: the block has a line to skip or report
                number += 1
                if not line:
                    continue
                if type(line) is bytes:
                    try:
                        line = line.decode("utf-8")
                    except UnicodeDecodeError as exc:
                        batch = flush()
                        if batch is not None:
                            yield batch
                        yield ManifestLineError(f"line {number} skipped: not valid UTF-8 (byte 0x{line[exc.start]:02x} "
                                                f"at offset {exc.start}): {line[:200]!r}", number)
                        continue
                cells = line.split("\t") if '"' not in line else split_tsv_line(line)
                if len(cells) != width:
                    batch = flush()
                    if batch is not None:
                        yield batch
                    yield ManifestLineError(f"line {number} skipped: expected {width} cells, got {len(cells)}: "
                                            f"{line[:200]!r}", number)
                    continue
                cells_rows.append(cells)
                numbers.append(number)
                if len(cells_rows) >= batch_rows:
                    yield flush()
        batch = flush()
        if batch is not None:
            yield batch


def _fast_join(base: Path | str, base_prefix: str, value: str) -> str:
    """``str(base / value)`` for a relative ``value`` (pathlib drops empty and ``.`` parts); for a
    URL ``base`` (a remote manifest folder), :func:`asr_assets.storage.resolve`."""
    if isinstance(base, str):
        return storage.resolve(value, base)
    if "//" in value or value.startswith("./") or value.endswith(("/", "/.")) or "/./" in value or value == ".":
        return str(base / value)
    return base_prefix + value


def _tsv_batch(rows: list[list[str]], numbers: list[int], source: str, manifest: str, counter: int,
               ti: int, di: int | None, oi: int | None, ii: int | None, pi: int | None, si: list[int],
               ai: int | None, base: Path, base_prefix: str) -> ManifestBatch:
    n = len(rows)
    transcript = [r[ti] or None for r in rows]
    if ii is None:
        ids: list = [None] * n
    else:
        ids = [(c.strip() or None) if c else None for c in (r[ii] for r in rows)]
    if pi is None:
        paths: list = [None] * n
        has_top = [False] * n
    else:
        paths = []
        for r in rows:
            value = r[pi]
            value = value.strip() if value else value
            if not value:
                paths.append(None)
            elif value.startswith(("http://", "https://", "/")) or ("://" in value and storage.is_url(value)):
                paths.append(value)
            else:
                paths.append(_fast_join(base, base_prefix, value))
        has_top = [p is not None for p in paths]
    audio_error = None
    if ai is not None:
        message = "the TSV's 'audio' cell is text, not audio (TSV rows carry audio as 'path')"
        audio_error = [message if not top and r[ai].strip() else None for r, top in zip(rows, has_top)]
        if not any(audio_error):
            audio_error = None
    if si:
        speakers = [c if c and not c.isspace() else None for c in (r[si[0]] for r in rows)]
        if len(si) > 1:  # the first speaker column with a non-blank cell
            for k in [k for k, c in enumerate(speakers) if c is None]:
                speakers[k] = next((c for c in (rows[k][i] for i in si[1:]) if c and not c.isspace()), None)
    else:
        speakers = [None] * n
    durations, duration_error = _seconds_column(rows, di, "duration")
    offsets, offset_error = _seconds_column(rows, oi, "offset") if oi is not None else (None, None)
    if offsets is not None and not any(v is not None for v in offsets):
        offsets = None
    return ManifestBatch(source, manifest, list(range(counter + 1, counter + n + 1)), numbers, ids, paths,
                         transcript, speakers, durations, None, audio_error, duration_error, None, offsets,
                         offset_error)


def _seconds_column(rows: list[list[str]], index: int | None, what: str) -> tuple[list, list | None]:
    """Cell ``index`` of every row as ``manifests._parse_duration(cell, what)`` parses a TSV cell:
    (seconds or None per row, the parse errors or None when there is none)."""
    n = len(rows)
    values: list = [None] * n
    errors = None
    if index is None:
        return values, errors
    for k, r in enumerate(rows):
        text = r[index]
        if text:
            text = text.strip()
            if text:
                try:
                    values[k] = float(text)
                except ValueError:
                    if errors is None:
                        errors = [None] * n
                    errors[k] = f"unparseable {what} {text[:100]!r}"
    return values, errors


# ----------------------------------------------------------------------------- Parquet


def _parquet_batches(path: Path, source: str, base: Path, counter: int, max_blob_bytes: int | None,
                     read_bytes: bool, batch_rows: int) -> Iterator[ManifestBatch]:
    manifest = str(path)
    rows: list[ManifestRow] = []
    for file_row, cells in _parquet_cells(path, max_blob_bytes, read_bytes):
        counter += 1
        rows.append(_make_row(cells, source, manifest, counter, file_row, base))
        if len(rows) >= batch_rows:
            yield ManifestBatch.from_rows(source, manifest, rows)
            rows = []
    if rows:
        yield ManifestBatch.from_rows(source, manifest, rows)


# ----------------------------------------------------------------------------- rows


def iter_manifest_batches(
    sources: Sequence[str | os.PathLike],
    *,
    source_base: str | os.PathLike | None = None,
    max_blob_bytes: int | None = None,
    read_audio_bytes: bool = True,
    batch_rows: int = _BATCH_ROWS,
    block_bytes: int = _BLOCK_BYTES,
    stat_audio: bool = False,
) -> Iterator[ManifestBatch | ManifestProblem]:
    """Every row of every source in batches, with every problem in its place.

    Args and semantics are those of :func:`asr_assets.manifests.iter_manifest_rows` (with an
    ``on_error``): what it would pass to ``on_error`` comes as a :class:`ManifestProblem`
    (including each file not read because of the TSV-wins rule, a
    :class:`~asr_assets.manifests.SkippedManifest`), exactly where it would be called.
    ``stat_audio`` also stats each local audio path (:attr:`ManifestBatch.audio_size`), the
    ``os.stat`` the record builder would make (so a reader process makes it instead).

    Yields:
        :class:`ManifestBatch` (1 to ``batch_rows`` rows of one file) and :class:`ManifestProblem`.

    Raises:
        ManifestError: a source is missing or cannot be opened.
    """
    seen: set[str] = set()
    for source in sources:
        try:
            root = str(source).rstrip("/") if storage.is_url(source) else Path(source).resolve()
        except (OSError, RuntimeError):
            root = Path(os.path.abspath(source))
        if str(root) in seen:
            continue
        seen.add(str(root))
        scan = scan_manifests(root)
        for where, reason in scan.problems:
            yield ManifestProblem(where, 0, ManifestError(f"{where!r} skipped: {reason}"))
        for skipped, reason in scan.skipped:
            yield ManifestProblem(str(skipped), 0, SkippedManifest(reason))
        base = _source_base(root, scan, source_base)
        counter, source_name = 0, str(root)
        for manifest in scan.files:
            read = 0
            try:
                if manifest.suffix.lower() == ".tsv":
                    items = _tsv_batches(manifest, source_name, base, counter, batch_rows, block_bytes)
                else:
                    items = _parquet_batches(manifest, source_name, base, counter, max_blob_bytes, read_audio_bytes,
                                             batch_rows)
                for item in items:
                    if isinstance(item, ManifestLineError):
                        yield ManifestProblem(str(manifest), read, item)
                        continue
                    counter += len(item)
                    read += len(item)
                    if stat_audio:
                        item.audio_size = _audio_sizes(item.audio_path)
                    yield item
            except (ManifestColumnsError, ManifestLineError) as exc:
                yield ManifestProblem(str(manifest), read, exc)
            except Exception as exc:  # noqa: BLE001 - as iter_manifest_rows: the next file is read
                detail = str(exc) if isinstance(exc, (ManifestError, OSError, pa.ArrowException)) else f"{type(exc).__name__}: {exc}"
                if not isinstance(exc, ManifestError):
                    detail = f"cannot read manifest {str(manifest)!r}: {detail}"
                yield ManifestProblem(str(manifest), read, ManifestError(f"manifest file unreadable after {read} rows: {detail}"))


def _audio_sizes(paths: Sequence[str | None]) -> list[int | None]:
    """Per path: the size of the local regular file there, else None (URLs are not stat-ed)."""
    stat, regular = os.stat, S_ISREG
    sizes: list[int | None] = []
    for path in paths:
        size = None
        if path is not None and not ("://" in path and storage.is_url(path)):
            try:
                st = stat(path)
                if regular(st.st_mode):
                    size = st.st_size
            except (OSError, ValueError):
                pass
        sizes.append(size)
    return sizes


# ----------------------------------------------------------------------------- reader process

#: Manifest bytes (local files and objects of known size) from which
#: :func:`read_ahead_manifest_batches` parses in a child process: a fresh interpreter costs
#: ~0.5 s of imports, parsing costs ~1 s per 8 MiB of TSV (~60k rows).
READER_PROCESS_MIN_BYTES = 32 * 2**20


def read_ahead_manifest_batches(sources: Sequence[str | os.PathLike], *, min_bytes: int = READER_PROCESS_MIN_BYTES,
                                **options) -> Iterator[ManifestBatch | ManifestProblem]:
    """:func:`iter_manifest_batches` ``(sources, **options)``, item for item, with the reading
    and parsing done by a child process ahead of the consumer once the manifests hold
    ``min_bytes`` or more; below that, in this process. On two cores this takes the TSV parsing
    (~40 % of a record-cache build) off the process that builds the records.

    The child is a fresh ``python -c`` interpreter (not a fork: the caller may be a Dagster step
    with threads; not ``multiprocessing`` spawn, which re-runs the caller's main script). Its
    items come pickled through a pipe, so it runs at most about one batch ahead (~15 MiB at 64k
    Common Voice rows). It walks no folder this process has walked in an enclosing
    :func:`asr_assets.manifests.one_walk_per_folder` block (the walks are handed over). It is
    killed when the consumer stops early or fails; a child that dies (killed, out of memory)
    raises ManifestError, never a silent end of the rows.

    Raises:
        ManifestError: as :func:`iter_manifest_batches`; or the reader process died.
    """
    import pickle
    import subprocess
    import sys

    from .manifests import _WALKS

    walks = _WALKS.get()
    sources = [str(s) for s in sources]
    if _manifest_bytes(sources) < min_bytes:
        yield from iter_manifest_batches(sources, **options)
        return
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)}
    reader = subprocess.Popen([sys.executable, "-c", "from asr_assets.manifest_batches import _reader_main; _reader_main()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    try:
        try:
            pickle.dump((sources, options, walks), reader.stdin, protocol=pickle.HIGHEST_PROTOCOL)
            reader.stdin.close()
        except BrokenPipeError:  # the reader died at once: its exit code is reported below
            with contextlib.suppress(OSError):
                reader.stdin.close()
        while True:
            try:
                kind, payload = pickle.load(reader.stdout)
            except EOFError:
                code = reader.wait(timeout=10)
                raise ManifestError(f"the manifest reader process exited (code {code}) before the end of the "
                                    f"manifests {sources}") from None
            if kind == "item":
                yield payload
            elif kind == "end":
                return
            else:
                raise payload
    finally:
        if reader.poll() is None:
            reader.kill()
        reader.wait(timeout=10)
        reader.stdout.close()


def _manifest_bytes(sources: Sequence[str]) -> int:
    """Total size of the manifest files of ``sources`` that are known without reading them (0
    for a source that cannot be scanned: the reader in this process then reports it)."""
    total = 0
    for source in sources:
        try:
            scan = scan_manifests(source)
        except ManifestError:
            continue
        for file in scan.files:
            size = getattr(file, "size", None)
            if size is None and not storage.is_url(file):
                try:
                    size = os.stat(file).st_size
                except OSError:
                    size = 0
            total += size or 0
    return total


def _reader_main() -> None:
    """The reader process of :func:`read_ahead_manifest_batches`: reads ``(sources, options,
    walks)`` pickled from stdin, then writes to stdout, pickled, ``("item", item)`` for every
    item of :func:`iter_manifest_batches` and ``("end", None)``, or ``("raise", exception)``.
    Anything else printed goes to stderr (file descriptor 1 is moved away first)."""
    import pickle
    import sys

    from .manifests import one_walk_per_folder

    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sources, options, walks = pickle.load(sys.stdin.buffer)

    def send(kind: str, payload) -> None:
        pickle.dump((kind, payload), out, protocol=pickle.HIGHEST_PROTOCOL)
        out.flush()

    try:
        with one_walk_per_folder(walks):
            for item in iter_manifest_batches(sources, **options):
                send("item", item)
        send("end", None)
    except BrokenPipeError:  # the consumer stopped reading
        return
    except Exception as exc:  # noqa: BLE001 - the consumer raises it
        try:
            pickle.dumps(exc)
        except Exception:  # noqa: BLE001 - an exception that does not pickle: its text
            exc = ManifestError(f"manifest reader: {type(exc).__name__}: {exc}")
        send("raise", exc)
    out.close()
