"""The sharded Parquet feature cache (spec §3).

Entry points:
    - :func:`cache_key`, :func:`shard_index` — ``sha256(f"{utterance_id}:{hash12}")``, ``int(key[:8], 16) % 64``.
    - :func:`encode_features`, :func:`decode_features` — a payload of any stored kind (below);
      :func:`encode_payload`, :func:`decode_payload` — the ``SFCF32L1`` payload alone.
    - :func:`output_keys` — the cache key of each output of a frontend for one utterance.
    - :class:`ShardWriter` — appends parts to one shard, each part atomically renamed into place.
    - :class:`ShardedParquetFeatureCache` — reader with upstream semantics (newest part wins,
      last row of a key within a part wins, tombstones).
    - :func:`check_stored_outputs` — is one record's stored feature set complete and valid?

Layout::

    <split_root>/feature_shards/features_NN/part_<pid>_<time_ns>_<counter:06d>.parquet
        key: string, payload: binary (see below, null for a tombstone), deleted: bool

A part is written as ``.part_*.parquet.tmp.<host>-<pid>`` in the same folder and renamed, so readers,
which list ``part_*.parquet`` only, never see a half-written part. Each part carries Parquet
key-value metadata saying how it was written (format, frontend, hash, config repr, and
``outputs`` for a frontend with named outputs).

Payloads: a reader tells the kinds apart by their first bytes, nothing else:

* ``b"SFCF32L1"`` — u32 LE rows, u32 LE cols, float32 LE row-major ``[rows, cols]`` (spec §3.4).
  Every single-output frontend writes this; so does a named output that is float32 2-D.
* ``b"\x93NUMPY"`` — a ``.npy`` file (numpy format 1.0/2.0, C order, little-endian, never an
  object dtype), what ``np.save(f, array, allow_pickle=False)`` writes: any other named output
  (float16 features, int32 tokens, 1-D arrays ...). Read it with ``np.load(io.BytesIO(payload),
  allow_pickle=False)``. An asr_assets extension: upstream never writes or reads it.
* anything else — a legacy upstream Python ``torch.save`` payload, read only with torch's
  ``weights_only=True`` loader (:func:`decode_legacy_torch_payload`), never unpickled.

Named outputs (an asr_assets extension; upstream has none and never looks these keys up): the
output ``name`` of a frontend declaring ``outputs`` is stored under
``cache_key(utterance_id, frontend.output_hash(name))`` (the output hash is the frontend's
config dict plus ``"output": name``, :meth:`asr_assets.frontends.Frontend.output_hash`), but
**in the shard of the utterance's frontend key**, ``shard_index(cache_key(utterance_id,
frontend.frontend_hash()))``, not in the one its own key's prefix names; all outputs of an
utterance are written in the same part, so they appear together or not at all. A reader looks a
named output up in that shard (:meth:`ShardedParquetFeatureCache.load` with ``output=`` does).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import struct
import time
from collections import OrderedDict
from pathlib import Path
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Mapping, NamedTuple, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import storage
from ._fs import file_lock, fsync_file, tmp_suffix
from .errors import CacheCorruptError, FeatureConfigError

if TYPE_CHECKING:
    from .frontends import Frontend

logger = logging.getLogger(__name__)

#: How parts are laid out for random reads (the columns and their meaning stay spec §3's):
#: one row per row group, so reading one utterance reads and decodes one utterance's pages, and
#: each row group's ``key`` statistics (min = max = the key) let a reader index a part from its
#: footer alone; ``payload`` is stored uncompressed (zstd saved only ~8 % on float32 log-mel,
#: and cost more than the write itself), ``key``/``deleted`` are zstd. Measured on 2,000 real-size
#: utterances: 4,700 random loads/s against 10/s with 256-row groups; +8 % file size; writing
#: 20 % faster (``benchmarks/readers.py``).
PART_WRITE_OPTIONS = {
    "row_group_size": 1,
    "compression": {"key": "zstd", "payload": "none", "deleted": "zstd"},
    "use_dictionary": False,
    "write_statistics": ["key", "deleted"],
}

MAGIC = b"SFCF32L1"
#: First bytes of a ``.npy`` payload (numpy format): any named output not float32 2-D.
NPY_MAGIC = b"\x93NUMPY"
#: dtype kinds :func:`encode_features` stores as ``.npy``: bool, int, uint, float.
NPY_DTYPE_KINDS = "biuf"
_NPY_MAX_HEADER = 10000  # numpy's own default limit of np.load
DEFAULT_NUM_SHARDS = 64
#: Shard indexes built at once by :meth:`ShardedParquetFeatureCache.prefetch` (threads: the
#: work is listings and reads, mostly waiting on the file system or object store).
PREFETCH_THREADS = 8
SCHEMA = pa.schema([("key", pa.string()), ("payload", pa.binary()), ("deleted", pa.bool_())])
_HEADER = struct.Struct("<8sII")


def cache_key(utterance_id: str, frontend_hash: str) -> str:
    """64-hex ``sha256(f"{utterance_id}:{frontend_hash}")`` (spec §3.2)."""
    return hashlib.sha256(f"{utterance_id}:{frontend_hash}".encode("utf-8")).hexdigest()


def shard_index(key: str, num_shards: int = DEFAULT_NUM_SHARDS) -> int:
    """``int(key[:8], 16) % num_shards``."""
    return int(key[:8], 16) % num_shards


def shard_dir(split_root: str | os.PathLike, shard: int) -> Path:
    """``<split_root>/feature_shards/features_NN`` (a URL string for an object-store root)."""
    if storage.is_url(split_root):
        return storage.join(str(split_root), "feature_shards", f"features_{shard:02d}")
    return Path(split_root) / "feature_shards" / f"features_{shard:02d}"


def output_keys(utterance_id: str, frontend: "Frontend") -> dict[str | None, str]:
    """Cache key of each output of ``frontend`` for one utterance, in declared order.

    Returns:
        ``{None: cache_key(utterance_id, frontend_hash)}`` for a single-output frontend, else
        ``{name: cache_key(utterance_id, frontend.output_hash(name))}``. Every key lives in the
        shard ``shard_index(cache_key(utterance_id, frontend.frontend_hash()))`` (module docstring).
    """
    return {name: cache_key(utterance_id, h) for name, h in frontend.output_hashes().items()}


def encode_features(array: np.ndarray) -> bytes:
    """The payload of one stored array: ``SFCF32L1`` when it is float32 2-D (spec §3.4, what
    upstream reads), else ``.npy`` bytes (``np.save(..., allow_pickle=False)``, C order,
    little-endian), which keep any other dtype and shape exactly.

    Args:
        array: ``float32 (num_frames, dims)``, or any bool/int/uint/float array.

    Returns:
        Bytes starting with :data:`MAGIC` or :data:`NPY_MAGIC` (:func:`decode_features` reads both).

    Raises:
        TypeError: an object, string, complex or structured dtype (an object array would need
            pickle, which is never written).
    """
    a = np.asarray(array)
    if a.dtype == np.float32 and a.ndim == 2:
        return encode_payload(a)
    if a.dtype.kind not in NPY_DTYPE_KINDS or a.dtype.fields is not None or a.dtype.hasobject:
        raise TypeError(f"cannot store an array of dtype {a.dtype}: use bool, int, uint or float "
                        "(object arrays would need pickle, which the feature cache never writes)")
    a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
    buffer = io.BytesIO()
    np.save(buffer, a, allow_pickle=False)
    return buffer.getvalue()


def _npy_layout(value) -> tuple[int, np.dtype, tuple[int, ...], bool] | None:
    """``(data offset, dtype, shape, fortran_order)`` of a ``.npy`` value whose data fill it
    exactly, its header parsed by ``numpy.lib.format`` (what ``np.load`` uses); None if it is
    not one (bad magic, version or header, an object dtype, a size that disagrees)."""
    if len(value) < 10 or bytes(value[:6]) != NPY_MAGIC:
        return None
    fp = io.BytesIO(bytes(value[:_NPY_MAX_HEADER + 12]))
    try:
        version = np.lib.format.read_magic(fp)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fp)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fp)
        else:
            return None
    except (ValueError, SyntaxError, TypeError, EOFError):
        return None
    if dtype.hasobject or dtype.itemsize == 0:
        return None
    offset = fp.tell()
    if offset + math.prod(shape) * dtype.itemsize != len(value):
        return None
    return offset, dtype, shape, fortran


def _decode_npy(value, *, copy: bool) -> np.ndarray:
    layout = _npy_layout(value)
    if layout is None:
        raise CacheCorruptError(f"payload of {len(value)} bytes is not a valid .npy value without objects "
                                "(bad header, object dtype or a size that disagrees with its shape)")
    offset, dtype, shape, fortran = layout
    array = np.frombuffer(value, dtype=dtype, count=math.prod(shape), offset=offset)
    array = array.reshape(shape, order="F" if fortran else "C")
    return array.copy() if copy else array


def decode_features(payload: bytes | memoryview) -> np.ndarray:
    """Inverse of :func:`encode_features` (and reader of legacy payloads), by the first bytes:

    * ``SFCF32L1`` -> float32 ``[rows, cols]`` (:func:`decode_payload`);
    * ``\x93NUMPY`` -> the array with its stored dtype and shape (as ``np.load(...,
      allow_pickle=False)``);
    * otherwise a legacy ``torch.save`` payload (:func:`decode_legacy_torch_payload`).

    Returns:
        A new writable array.

    Raises:
        CacheCorruptError: a malformed SFCF32L1 or ``.npy`` value, or a legacy payload that
            torch is not installed for or refuses.
    """
    head = bytes(payload[:8])
    if head == MAGIC:
        return decode_payload(payload)
    if head[:6] == NPY_MAGIC:
        return _decode_npy(payload, copy=True)
    return decode_legacy_torch_payload(bytes(payload))


def encode_payload(features: np.ndarray) -> bytes:
    """``SFCF32L1`` + u32 rows + u32 cols + float32 LE row-major ``[frames, dims]`` (spec §3.4)."""
    array = np.ascontiguousarray(features, dtype="<f4")
    if array.ndim != 2:
        raise ValueError(f"features must be 2-D [frames, dims], got shape {array.shape}")
    rows, cols = array.shape
    return _HEADER.pack(MAGIC, rows, cols) + array.tobytes()


def decode_payload(payload: bytes) -> np.ndarray:
    """Inverse of :func:`encode_payload`; float32 ``[rows, cols]``.

    Raises:
        CacheCorruptError: wrong magic (e.g. a legacy ``torch.save`` payload, which is never
            unpickled here) or a size other than ``16 + rows*cols*4``.
    """
    if len(payload) < _HEADER.size or bytes(payload[:8]) != MAGIC:
        raise CacheCorruptError("payload is not SFCF32L1 (legacy torch.save payloads are not unpickled)")
    _, rows, cols = _HEADER.unpack_from(payload)
    if len(payload) != _HEADER.size + rows * cols * 4:
        raise CacheCorruptError(f"payload of {len(payload)} bytes does not hold {rows}x{cols} float32")
    return np.frombuffer(payload, dtype="<f4", offset=_HEADER.size).reshape(rows, cols).astype(np.float32)


def _decode_view(payload: memoryview) -> np.ndarray:
    """:func:`decode_features` of a writable buffer holding an SFCF32L1 or ``.npy`` value
    (as :func:`_raw_payload` returns it), as a view of it (no copy)."""
    if bytes(payload[:6]) == NPY_MAGIC:
        return _decode_npy(payload, copy=False)
    _, rows, cols = _HEADER.unpack_from(payload)
    return np.frombuffer(payload, dtype="<f4", offset=_HEADER.size, count=rows * cols).reshape(rows, cols)


def decode_legacy_torch_payload(payload: bytes) -> np.ndarray:
    """Read an upstream Python ``torch.save`` payload without executing pickled code.

    Uses ``torch.load(weights_only=True)`` (tensors and plain containers only) when torch is
    installed; never falls back to unpickling. Returns float32 ``[frames, dims]``.

    Raises:
        CacheCorruptError: torch is not installed, or the payload is not a plain 2-D tensor.
    """
    try:
        import torch
    except ImportError as exc:
        raise CacheCorruptError("legacy torch.save payload (not SFCF32L1); install torch to read it with "
                                "torch.load(weights_only=True) - it is never unpickled otherwise") from exc
    import io

    try:
        value = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only refuses arbitrary objects
        raise CacheCorruptError(f"legacy payload refused by torch.load(weights_only=True): {exc}") from exc
    if not isinstance(value, torch.Tensor) or value.ndim != 2:
        raise CacheCorruptError(f"legacy payload is not a 2-D tensor: {type(value).__name__}")
    return value.detach().to(torch.float32).numpy()


def list_shard_files(split_root: str) -> dict[int, list]:
    """On an object store: ``{shard: [ObjectInfo of every file in features_NN/]}`` of a split
    from one recursive listing of ``<split_root>/feature_shards/`` (one request per 1,000
    objects, where a listing per shard costs 64 and more), shards without files left out."""
    root = storage.join(str(split_root), "feature_shards")
    found: dict[int, list] = {}
    for info in storage.list_files(root, recursive=True):
        folder_url = storage.parent(str(info))
        folder = storage.basename(folder_url)
        if folder.startswith("features_") and folder[9:].isdigit() and storage.parent(folder_url) == root:
            found.setdefault(int(folder[9:]), []).append(info)
    return found


def _ordered_parts(files: Sequence) -> list:
    """The committed parts among a shard's listed objects (``part_*.parquet``), oldest first by
    ``(LastModified, name)``."""
    return sorted((f for f in files if f.name.startswith("part_") and f.name.endswith(".parquet")),
                  key=lambda p: (p.mtime_ns, p.name))


def map_shards(fn, shards: Sequence[int], threads: int) -> list:
    """``[fn(shard) for shard in shards]``, up to ``threads`` at once on threads (for listings and
    reads that wait on an object store); in this thread when ``threads`` <= 1 or one shard."""
    if threads <= 1 or len(shards) <= 1:
        return [fn(shard) for shard in shards]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(min(threads, len(shards)), thread_name_prefix="asr-shards") as pool:
        return list(pool.map(fn, shards))


def list_parts(directory: Path) -> list[Path]:
    """Committed parts of a shard, oldest first by ``(st_mtime_ns, name)``.

    On an object store: one listing; the parts as :class:`asr_assets.storage.ObjectInfo`
    (URL strings with size and ``LastModified``), oldest first by ``(LastModified, name)``; parts
    written there are named ``part_<time_ns>_...`` so that the name orders parts of the same
    second (S3's ``LastModified`` has whole seconds).
    """
    if storage.is_url(directory):
        return _ordered_parts(storage.list_files(str(directory)))
    try:
        entries = [e for e in os.scandir(directory) if e.name.startswith("part_") and e.name.endswith(".parquet")]
    except FileNotFoundError:
        return []
    entries.sort(key=lambda e: (e.stat().st_mtime_ns, e.name))
    return [Path(e.path) for e in entries]


_part_counter = 0


def _write_part(directory: Path, table: pa.Table, mtime_ns: int | None = None, prefix: str = "part_") -> Path:
    """Write ``table`` as a new part: temp name (never listed by readers), fsync, ``os.replace``.

    On an object store (no rename): one PUT under the final, unique name
    ``<prefix><time_ns>_<host>_<pid>_<counter>.parquet`` with ``If-None-Match: *``, so an
    interrupted upload leaves no object and no name is ever written twice; before it, the
    writer checks that its shard lock (:func:`shard_lock`) was not taken over.
    """
    global _part_counter
    _part_counter += 1
    if storage.is_url(directory):
        if mtime_ns is not None:
            raise ValueError("an object store sets modification times itself: parts there cannot be back-dated")
        storage.check_lock(str(directory))
        data = storage.parquet_bytes(table, **PART_WRITE_OPTIONS)
        for _ in range(5):
            url = storage.join(str(directory), f"{prefix}{time.time_ns()}_{storage.writer_id()}_{_part_counter:06d}.parquet")
            try:
                storage.put_new(url, data)
                return url
            except FileExistsError:  # the same nanosecond on another machine of the same name
                _part_counter += 1
        raise FileExistsError(f"{directory}: no unique part name after 5 tries (does the store refuse every create?)")
    name = f"{prefix}{os.getpid()}_{time.time_ns()}_{_part_counter:06d}.parquet"
    tmp = directory / f".{name}{tmp_suffix()}"
    pq.write_table(table, tmp, **PART_WRITE_OPTIONS)
    fsync_file(tmp)
    if mtime_ns is not None:
        os.utime(tmp, ns=(mtime_ns, mtime_ns))
    os.replace(tmp, directory / name)
    return directory / name


def shard_lock(split_root: str | os.PathLike, shard: int, frontend_hash: str):
    """Lock serializing writers (extraction, compaction) of one frontend in one shard.

    Local: ``flock`` on ``features_NN/.lock-<hash>``. Object store: a lease lock in the object
    ``features_NN/.lock-<hash>`` (:class:`asr_assets.storage.ObjectLock`: conditional create,
    ``If-Match`` renewal and takeover of an expired lease), so writers on different machines of
    one shard take turns; each part PUT checks the lease first.
    """
    if storage.is_url(split_root):
        return storage.ObjectLock(storage.join(shard_dir(split_root, shard), f".lock-{frontend_hash}"))
    return file_lock(shard_dir(split_root, shard) / f".lock-{frontend_hash}")


def part_metadata(frontend) -> dict:
    """The Parquet key-value metadata of a part written for ``frontend`` (a Frontend): name,
    hash, config repr, feature dim and sample rate, so readers and compaction know whose it is."""
    metadata = {"frontend": frontend.name, "frontend_hash": frontend.frontend_hash(), "config_repr": frontend.config_repr(),
                "feature_dim": frontend.feature_dim, "sample_rate_hz": frontend.sample_rate}
    if getattr(frontend, "outputs", None) is not None:  # {name: {"dtype", "hash"}}, named outputs only
        metadata["outputs"] = json.dumps({name: {"dtype": dtype, "hash": frontend.output_hash(name)}
                                          for name, dtype in frontend.outputs.items()})
    return metadata


class ShardWriter:
    """Writes rows of one shard as parts of at most ``rows_per_part`` rows.

    Use as a context manager; ``close()`` flushes the remainder. Each flush writes one part
    atomically (temp name + ``os.replace``). Existing parts are never rewritten.

    Args:
        split_root: ``<output>/feature-cache/<split>``.
        shard: shard index.
        rows_per_part: rows per part file (upstream Rust: 256).
        metadata: extra Parquet key-value metadata (frontend name, hash, config repr ...).
        update_index: on ``close()``, bring the shard's persisted index
            (:func:`update_shard_index`) up to date with the parts written. (Default: True)
    """

    def __init__(self, split_root: str | os.PathLike, shard: int, *, rows_per_part: int = 256, metadata: dict | None = None,
                 update_index: bool = True):
        self.split_root, self.shard, self.update_index = split_root, shard, update_index
        self.directory = shard_dir(split_root, shard)
        self.rows_per_part = rows_per_part
        self.metadata = {"storage_type": "sharded_parquet", "format_version": "SFCF32L1", **(metadata or {})}
        self._pending: list[tuple[str, bytes | None, bool]] = []
        self.parts_written: list[Path] = []
        self._indexed = 0
        #: wall seconds spent in part and index writes so far
        self.write_seconds = 0.0

    def add(self, key: str, features: np.ndarray) -> None:
        """Queue ``features`` (float32 ``[frames, dims]``) under ``key``."""
        self.add_payload(key, encode_payload(features))

    def add_payload(self, key: str, payload: bytes) -> None:
        """Queue an already encoded payload (:func:`encode_features`) under ``key``."""
        self._pending.append((key, payload, False))
        if len(self._pending) >= self.rows_per_part:
            self.flush()

    def add_payloads(self, items: Sequence[tuple[str, bytes]]) -> None:
        """Queue several encoded payloads that must land in the same part (the named outputs of
        one utterance): a part is flushed only after all of them, so it may exceed
        ``rows_per_part`` by ``len(items) - 1`` rows."""
        self._pending.extend((key, payload, False) for key, payload in items)
        if len(self._pending) >= self.rows_per_part:
            self.flush()

    def delete(self, key: str) -> None:
        """Queue a tombstone for ``key`` (payload null, deleted true)."""
        self._pending.append((key, None, True))
        if len(self._pending) >= self.rows_per_part:
            self.flush()

    def flush(self) -> Path | None:
        if not self._pending:
            return None
        start = time.perf_counter()
        if not storage.is_url(self.directory):
            self.directory.mkdir(parents=True, exist_ok=True)
        keys, payloads, deleted = zip(*self._pending)
        table = pa.table({"key": list(keys), "payload": list(payloads), "deleted": list(deleted)}, schema=SCHEMA)
        table = table.replace_schema_metadata({k: str(v) for k, v in self.metadata.items()})
        path = _write_part(self.directory, table)
        logger.debug("flushed cache shard=%s rows=%d tombstones=%d path=%s", f"{self.shard:02d}",
                     len(keys), sum(deleted), path)
        self._pending.clear()
        self.parts_written.append(path)
        self.write_seconds += time.perf_counter() - start
        return path

    def close(self) -> None:
        self.flush()
        if self.update_index and len(self.parts_written) > self._indexed:
            start = time.perf_counter()
            update_shard_index(self.split_root, self.shard)
            self._indexed = len(self.parts_written)
            self.write_seconds += time.perf_counter() - start

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # Flush what was computed even if the caller failed later: every row is complete.
        self.close()


def _binary_value(array: pa.Array, index: int) -> memoryview | None:
    """Value ``index`` of a binary array without copying it (None for null)."""
    if array.null_count and not array[index].is_valid:
        return None
    offsets = np.frombuffer(array.buffers()[1], dtype=np.int32, count=len(array) + 1, offset=array.offset * 4)
    start, end = int(offsets[index]), int(offsets[index + 1])
    return memoryview(array.buffers()[2])[start:end]


def _source(path):
    """What pyarrow opens for a part: the local path, or a file object over a URL (sized from
    the listing, so opening costs no request; reads are ranged GETs with timeouts)."""
    return storage.open_input(path, getattr(path, "size", None)) if storage.is_url(path) else path


class _Part:
    """An open part: its ``ParquetFile`` and the first row of each row group (the pyarrow read
    path, for parts whose payloads cannot be read as raw byte ranges)."""

    __slots__ = ("file", "starts")

    def __init__(self, path: Path):
        # pre_buffer off and one thread: a random read is one small row group, where pyarrow's
        # read-ahead and thread pool cost more than the read (443 -> ~110 us per load)
        self.file = pq.ParquetFile(_source(path), pre_buffer=False)
        meta = self.file.metadata
        self.starts = np.cumsum([0] + [meta.row_group(i).num_rows for i in range(meta.num_row_groups)])

    def locate(self, row: int) -> tuple[int, int]:
        """``(row group, row within it)`` of a part row."""
        group = int(np.searchsorted(self.starts, row, side="right")) - 1
        return group, row - int(self.starts[group])


def _part_entries(parquet: pq.ParquetFile) -> tuple[list[str], list[bool]]:
    """Keys and deleted flags of a part, from the footer when every row group holds one row
    with statistics (parts written by :data:`PART_WRITE_OPTIONS`), else from the columns."""
    meta = parquet.metadata
    groups = [meta.row_group(i) for i in range(meta.num_row_groups)]
    names = [meta.schema.column(i).name for i in range(meta.num_columns)]
    if groups and all(g.num_rows == 1 for g in groups) and "key" in names and "deleted" in names:
        k, d = names.index("key"), names.index("deleted")
        stats = [(g.column(k).statistics, g.column(d).statistics) for g in groups]
        if all(ks is not None and ks.has_min_max and ds is not None and ds.has_min_max for ks, ds in stats):
            return [ks.min for ks, _ in stats], [bool(ds.min) for _, ds in stats]
    table = parquet.read(columns=["key", "deleted"])
    return table.column("key").to_pylist(), table.column("deleted").to_pylist()


class PartIndex(NamedTuple):
    """What a reader needs of one part, taken from its footer alone.

    ``spans[row]`` is ``(byte offset, byte length)`` of the row's ``payload`` column chunk when
    the part is laid out for raw reads (one row per row group, payload uncompressed, PLAIN, no
    dictionary: parts written by :data:`PART_WRITE_OPTIONS`), else ``spans`` is None and rows
    are read through pyarrow.
    """

    keys: list[str]
    deleted: list[bool]
    spans: list[tuple[int, int]] | None
    frontend_hash: str | None


_RAW_ENCODINGS = {"PLAIN", "RLE", "BIT_PACKED"}


def index_part(path: str | os.PathLike) -> PartIndex:
    """:class:`PartIndex` of a part, from its footer (its data pages are read only when the row
    groups lack key statistics, e.g. parts of upstream's writers)."""
    parquet = pq.ParquetFile(_source(path), pre_buffer=False)
    keys, deleted = _part_entries(parquet)
    meta = parquet.metadata
    names = [meta.schema.column(i).name for i in range(meta.num_columns)]
    spans = None
    if "payload" in names and meta.num_row_groups == len(keys):
        p = names.index("payload")
        chunks = [meta.row_group(g).column(p) for g in range(meta.num_row_groups)]
        if all(c.compression == "UNCOMPRESSED" and not c.has_dictionary_page and set(c.encodings) <= _RAW_ENCODINGS
               for c in chunks):
            spans = [(c.data_page_offset, c.total_compressed_size) for c in chunks]
    return PartIndex(keys, deleted, spans, _frontend_hash_of(parquet.schema_arrow))


def _raw_payload(chunk: bytearray) -> memoryview | None:
    """The SFCF32L1 or ``.npy`` value at the end of a one-row ``payload`` column chunk, or None.

    A PLAIN BYTE_ARRAY page ends with ``u32 LE length`` + the value; the value is accepted only
    where that length and the magic agree with the chunk's end and the value's own header does
    too (``16 + rows*cols*4`` for SFCF32L1; for ``.npy`` the header, parsed by numpy, plus
    ``prod(shape) * itemsize``), so a page header that differs from what pyarrow writes
    (statistics, CRC, v2 pages) is never misread: it just falls back to pyarrow.
    """
    size = len(chunk)
    for magic in (MAGIC, NPY_MAGIC):
        at = chunk.find(magic, 4, 1024)
        while at != -1:
            length = size - at
            if int.from_bytes(chunk[at - 4:at], "little") == length:
                if magic == MAGIC:
                    if length >= _HEADER.size:
                        _, rows, cols = _HEADER.unpack_from(chunk, at)
                        if _HEADER.size + rows * cols * 4 == length:
                            return memoryview(chunk)[at:]
                elif _npy_layout(memoryview(chunk)[at:]) is not None:
                    return memoryview(chunk)[at:]
            at = chunk.find(magic, at + 1, 1024)
    return None


#: The persisted index of a shard (beside its parts; readers list ``part_*.parquet`` only, so
#: upstream never sees it). One row per part row: part name, mtime_ns and size (an entry is
#: used only while all three match the part on disk), key, deleted, raw payload span (-1: read
#: through pyarrow) and the writer's frontend hash. Rewritten atomically by writers and
#: compaction; a missing, stale or unreadable index only means footers are read instead.
SHARD_INDEX_NAME = ".asr_assets_index.parquet"
_INDEX_SCHEMA = pa.schema([("part", pa.string()), ("mtime_ns", pa.int64()), ("size", pa.int64()),
                           ("frontend_hash", pa.string()), ("key", pa.string()), ("deleted", pa.bool_()),
                           ("offset", pa.int64()), ("length", pa.int64())])
_Signature = tuple[str, int, int]


def _signature(path: Path) -> _Signature:
    st = path.stat()
    return path.name, st.st_mtime_ns, st.st_size


def read_shard_index(directory: Path) -> dict[_Signature, PartIndex]:
    """The persisted :data:`SHARD_INDEX_NAME` of a shard as ``{(part, mtime_ns, size): PartIndex}``
    ({} when missing or unreadable)."""
    try:
        if storage.is_url(directory):
            table = storage.read_table(storage.join(str(directory), SHARD_INDEX_NAME))
        else:  # ParquetFile, not pq.read_table: no dataset layer (~1 ms a call, per shard per run)
            path = directory / SHARD_INDEX_NAME
            if not path.exists():
                return {}
            with pq.ParquetFile(path) as parquet:
                table = parquet.read()
        if not table.schema.equals(_INDEX_SCHEMA):
            return {}
    except (OSError, pa.ArrowException):
        return {}
    out: dict[_Signature, PartIndex] = {}
    cols = [table.column(n).to_pylist() for n in _INDEX_SCHEMA.names]
    for part, mtime, size, fh, key, dead, offset, length in zip(*cols):
        entry = out.get((part, mtime, size))
        if entry is None:
            entry = out[(part, mtime, size)] = PartIndex([], [], [] if offset >= 0 else None, fh)
        entry.keys.append(key)
        entry.deleted.append(dead)
        if entry.spans is not None:
            entry.spans.append((offset, length))
    return out


def update_shard_index(split_root: str | os.PathLike, shard: int) -> Path | None:
    """Rewrite a shard's persisted index (:data:`SHARD_INDEX_NAME`) to cover its current parts.

    Entries of unchanged parts are reused and only new parts' footers are read; the file is
    replaced atomically. Called after extraction, tombstoning and compaction of the shard.
    Best effort: returns None (and logs) when the shard cannot be written.
    """
    directory = shard_dir(split_root, shard)
    remote = storage.is_url(directory)
    try:
        # object store: no lock, one PUT, last writer wins (readers check each entry against the listing)
        with storage.nothing() if remote else file_lock(directory / ".lock-index"):
            known = read_shard_index(directory)
            rows: dict[str, list] = {n: [] for n in _INDEX_SCHEMA.names}
            for part in list_parts(directory):
                sig = _signature(part)
                entry = known.get(sig) or index_part(part)
                n = len(entry.keys)
                for name, values in zip(("part", "mtime_ns", "size", "frontend_hash"), (*sig, entry.frontend_hash)):
                    rows[name].extend([values] * n)
                rows["key"].extend(entry.keys)
                rows["deleted"].extend(entry.deleted)
                spans = entry.spans or [(-1, -1)] * n
                rows["offset"].extend(o for o, _ in spans)
                rows["length"].extend(s for _, s in spans)
            # unsynced: a summary of the parts; one a power loss left short reads as absent ({})
            target = storage.join(directory, SHARD_INDEX_NAME) if remote else directory / SHARD_INDEX_NAME
            storage.write_atomic(target, storage.parquet_bytes(pa.table(rows, schema=_INDEX_SCHEMA), compression="zstd"),
                                 durable=False)
            return target
    except (OSError, pa.ArrowException) as exc:  # a part vanished mid-way, read-only storage ...
        logger.debug("shard index of %s not updated: %s", directory, exc)
        return None


class ShardedParquetFeatureCache:
    """Reader of one split's feature cache, with upstream read semantics (spec §3.5).

    The newest part (by ``(mtime_ns, name)``) that holds a key decides; within a part the last
    row of the key wins; a tombstone (``deleted`` or null payload) means "absent".

    Built for training-time random access:

    * a shard's index (key -> part, row, payload byte range) is built once and re-validated (one
      listing and stat of the shard) at most every ``refresh_interval_s`` seconds or on
      :meth:`refresh`. It comes from the shard's persisted index (:data:`SHARD_INDEX_NAME`,
      kept by the writers) for the parts it covers, and from the footers of the others; an
      appended part costs one footer, not a rebuild;
    * a load of a part written here (:data:`PART_WRITE_OPTIONS`) is one ``pread`` of its
      payload's column chunk into the returned array's buffer (:class:`PartIndex`); other
      parts (upstream's writers, legacy payloads) are read through pyarrow, up to
      ``max_open_parts`` of them kept open;
    * a part that compaction removed meanwhile makes the shard re-list and the load retry, so a
      reader stays safe while parts appear or are compacted away.

    Not thread-safe: use one per thread or DataLoader worker (it opens files lazily and pickles
    without open handles or indexes).

    Args:
        split_root: ``<output>/feature-cache/<split>``.
        num_shards: 64 unless the cache was written with another count.
        refresh_interval_s: how stale a shard's index may get before it is re-validated; 0
            re-validates on every load (the pre-0.2 behaviour). (Default: 5.0)
        max_open_parts: open ``ParquetFile`` handles kept for parts read through pyarrow
            (LRU; ~0.7 MB each for a 256-row part). (Default: 128)

    Example::

        cache = ShardedParquetFeatureCache("artifacts/feature-cache/train")
        feats = cache.load("utt-1", frontend="squeezeformer")   # float32 [frames, 80] or None
    """

    def __init__(self, split_root: str | os.PathLike, num_shards: int = DEFAULT_NUM_SHARDS, *,
                 refresh_interval_s: float = 5.0, max_open_parts: int = 128):
        self.split_root = str(split_root).rstrip("/") if storage.is_url(split_root) else Path(split_root)
        self.num_shards = num_shards
        self.refresh_interval_s = refresh_interval_s
        self.max_open_parts = max_open_parts
        self._index: dict[int, tuple] = {}
        self._checked: dict[int, float] = {}
        self._parts: OrderedDict[Path, _Part] = OrderedDict()
        self._part_indexes: dict[int, dict[_Signature, PartIndex]] = {}
        self._hashes: dict[str, str] = {}
        self._frontends: dict[str, "Frontend"] = {}
        self._key_hashes: dict[tuple[str, str | None], tuple[str, str]] = {}

    def __getstate__(self) -> dict:  # no open files across processes (DataLoader workers)
        state = self.__dict__.copy()
        state.update(_index={}, _checked={}, _parts=OrderedDict(), _part_indexes={})
        return state

    def _frontend_hash(self, frontend) -> str:
        if not isinstance(frontend, str):
            return frontend.frontend_hash()
        cached = self._hashes.get(frontend)
        if cached is None:
            if len(frontend) == 12 and all(c in "0123456789abcdef" for c in frontend):
                cached = frontend
            else:
                from .frontends import get_frontend

                cached = get_frontend(frontend).frontend_hash()
            self._hashes[frontend] = cached
        return cached

    def _frontend_object(self, frontend) -> "Frontend | None":
        """The Frontend of a name or object (None for a hash12: its outputs are unknown)."""
        if not isinstance(frontend, str):
            return frontend
        if len(frontend) == 12 and all(c in "0123456789abcdef" for c in frontend):
            return None
        built = self._frontends.get(frontend)
        if built is None:
            from .frontends import get_frontend

            built = self._frontends[frontend] = get_frontend(frontend)
        return built

    def _output_key_hash(self, frontend, output: str | None) -> tuple[str, str]:
        """``(frontend hash12, hash12 of the key)`` of one output (see :meth:`key`); cached for
        names and hash12s (rendering a config costs about a third of a load)."""
        named = isinstance(frontend, str)
        if named and (frontend, output) in self._key_hashes:
            return self._key_hashes[(frontend, output)]
        fe = self._frontend_object(frontend)
        if fe is None:
            if output is not None:
                raise FeatureConfigError(
                    f"output={output!r} needs the frontend's name or Frontend object, not the hash12 {frontend!r}: "
                    "a named output's key derives from the frontend's config dict")
            found = (frontend, frontend)
        else:
            fhash = fe.frontend_hash()
            found = (fhash, fhash if fe.check_output(output) is None else fe.output_hash(output))
        if named:
            self._key_hashes[(frontend, output)] = found
        return found

    def key(self, utterance_id: str, frontend="squeezeformer", output: str | None = None) -> str:
        """Cache key of an utterance for a frontend (name, Frontend object or hash12) and, for a
        frontend with named outputs, one of its outputs (see the module docstring)."""
        return cache_key(utterance_id, self._output_key_hash(frontend, output)[1])

    def refresh(self, shard: int | None = None) -> None:
        """Re-validate the index of one shard (or all) on the next load: new parts become visible."""
        if shard is None:
            self._checked.clear()
        else:
            self._checked.pop(shard, None)

    def prefetch(self, shards: Iterable[int], threads: int | None = None, listing: dict[int, list] | None = None) -> None:
        """Build (or re-validate, if older than ``refresh_interval_s``) the indexes of
        ``shards`` now, up to ``threads`` shards at once (default: :data:`PREFETCH_THREADS` on an
        object store, 1 on a local file system, where threads measured no faster). A shard
        costs a listing, and for new parts its persisted index or footers: on an object store
        two or more round trips each, so the 64 shards of a split one after another wait ~130
        round trips. There the shards' listings come from one recursive listing of the split
        (:func:`list_shard_files`; ``listing``: its result, when the caller already listed the
        split) and their indexes are read ``threads`` at once. The planning of a feature run,
        its extraction, its check and the split summary call this before visiting every shard.

        The one use of a reader from several threads: each thread builds other shards, and a
        shard's build touches only that shard's entries of the reader's dictionaries.

        Raises:
            the first error of a shard's build (e.g. :class:`OSError`, ``CacheCorruptError``),
            as visiting the shard would.
        """
        remote = storage.is_url(self.split_root)
        threads = (PREFETCH_THREADS if remote else 1) if threads is None else threads
        now = time.monotonic()
        todo = [shard for shard in dict.fromkeys(shards)
                if shard not in self._index or now - self._checked.get(shard, -math.inf) >= self.refresh_interval_s]
        if remote and (listing is not None or len(todo) > 1):  # each shard's parts, from one listing
            listing = listing if listing is not None else list_shard_files(self.split_root)
            parts = {shard: _ordered_parts(listing.get(shard, ())) for shard in todo}
        else:
            parts = None
        map_shards(lambda shard: self._shard(shard, None if parts is None else parts[shard]), todo, threads)

    def shard_index_of(self, key: str) -> dict[str, tuple[Path, int] | None]:
        """``{key: (part, row) | None}`` of the shard holding ``key`` (None = tombstone)."""
        return self.shard_entries(shard_index(key, self.num_shards))

    def shard_entries(self, shard: int) -> dict[str, tuple[Path, int] | None]:
        """Live view of one shard: ``{key: (part path, row) or None for a tombstone}``."""
        return self._shard(shard)[1]

    def _shard(self, shard: int, listed: list | None = None) -> tuple[tuple, dict[str, tuple[Path, int] | None],
                                                                dict[Path, str | None], dict[str, tuple[int, int]]]:
        cached = self._index.get(shard)
        now = time.monotonic()
        if cached is not None and now - self._checked.get(shard, -math.inf) < self.refresh_interval_s:
            return cached
        for attempt in range(3):  # a part may vanish under us (compaction): list again
            try:
                built = self._build_shard(shard, listed if attempt == 0 else None)
                self._checked[shard] = now
                return built
            except FileNotFoundError:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _build_shard(self, shard: int, listed: list | None = None):
        """The shard's index from its parts (``listed``: as :func:`list_parts` gives them, from
        a listing already made; None: list them now)."""
        directory = shard_dir(self.split_root, shard)
        parts = list_parts(directory) if listed is None else listed
        signature = tuple(_signature(p) for p in parts)
        cached = self._index.get(shard)
        if cached is not None and cached[0] == signature:
            return cached
        # part indexes of the previous build, then the persisted index, then the footers
        known = self._part_indexes.get(shard, {})
        if any(sig not in known for sig in signature):
            known = {**read_shard_index(directory), **known}
        entries: dict[str, tuple[Path, int] | None] = {}
        spans: dict[str, tuple[int, int]] = {}
        owners: dict[Path, str | None] = {}
        used: dict[_Signature, PartIndex] = {}
        for part, sig in zip(parts, signature):  # oldest first: later rows override earlier ones
            entry = known.get(sig) or index_part(part)
            used[sig] = entry
            owners[part] = entry.frontend_hash
            for row, (key, dead) in enumerate(zip(entry.keys, entry.deleted)):
                entries[key] = None if dead else (part, row)
                if entry.spans is not None:
                    spans[key] = entry.spans[row]
                else:
                    spans.pop(key, None)
        self._part_indexes[shard] = used
        self._index[shard] = (signature, entries, owners, spans)
        return self._index[shard]

    def keys(self, shard: int, frontend_hash: str | None = None) -> set[str]:
        """Keys with live (non-tombstoned) features in a shard; with ``frontend_hash``, only
        those written by asr_assets for that frontend (parts carry it in their metadata)."""
        _, entries, owners, _ = self._shard(shard)
        return {k for k, v in entries.items() if v is not None and (frontend_hash is None or owners.get(v[0]) == frontend_hash)}

    def _open(self, part: Path) -> _Part:
        opened = self._parts.get(part)
        if opened is None:
            opened = _Part(part)
            self._parts[part] = opened
            while len(self._parts) > self.max_open_parts:
                self._parts.popitem(last=False)
        else:
            self._parts.move_to_end(part)
        return opened

    @staticmethod
    def _raw_payloads(part: Path, spans: Sequence[tuple[int, int]]) -> list[memoryview | None]:
        """SFCF32L1 payloads at ``spans`` of one part: one ``pread`` each into a fresh writable
        buffer; None where the chunk is not laid out as :func:`_raw_payload` expects."""
        fd = os.open(part, os.O_RDONLY)
        try:
            out = []
            for offset, length in spans:
                chunk = bytearray(length)
                out.append(_raw_payload(chunk) if os.preadv(fd, [chunk], offset) == length else None)
            return out
        finally:
            os.close(fd)

    def _payloads(self, part: Path, rows: Sequence[int]) -> list[bytes | None]:
        """Payloads of ``rows`` of one part, reading each needed row group once."""
        opened = self._open(part)
        if isinstance(part, Path) and not part.exists():  # an open handle outlives a compacted part: treat as gone
            self._parts.pop(part, None)
            raise FileNotFoundError(part)
        located = [opened.locate(row) for row in rows]
        columns: dict[int, pa.Array] = {}
        for group, _ in located:
            if group not in columns:
                table = opened.file.read_row_group(group, columns=["payload"], use_threads=False)
                columns[group] = table.column(0).combine_chunks()
        return [_binary_value(columns[group], offset) for group, offset in located]

    def load_key(self, key: str) -> np.ndarray | None:
        """Features stored under a cache key, or None if absent or tombstoned."""
        return self.load_keys([key])[0]

    def load_keys(self, keys: Sequence[str], shards: Sequence[int] | None = None) -> list[np.ndarray | None]:
        """:meth:`load_key` for several keys, grouped by part (each row group read once).

        A payload laid out for raw reads (:class:`PartIndex`) is one ``pread`` of its column
        chunk into a writable buffer (the returned array is a view of it: no further copy);
        other parts are read through pyarrow.

        Args:
            keys: cache keys.
            shards: the shard of each key; default ``shard_index(key)``. A named output's key
                lives in its frontend key's shard (module docstring), so it must be given.

        Returns:
            Per key the stored array (float32 ``[frames, dims]`` for SFCF32L1, the stored dtype
            and shape for ``.npy``), or None if absent or tombstoned.
        """
        where_of = list(shards) if shards is not None else [shard_index(k, self.num_shards) for k in keys]
        if len(where_of) != len(keys):
            raise ValueError(f"{len(keys)} keys but {len(where_of)} shards")
        results: list[np.ndarray | None] = [None] * len(keys)
        pending = list(range(len(keys)))
        for attempt in range(3):
            # (key index, row) per part, from one index lookup per key: a second lookup could
            # meet a rebuilt index and take a row of another part
            by_part: dict[Path, list[tuple[int, int]]] = {}
            raw: dict[Path, list[tuple[int, int, tuple[int, int]]]] = {}
            for i in pending:
                _, entries, _, spans = self._shard(where_of[i])
                where = entries.get(keys[i])
                if where is not None:
                    span = spans.get(keys[i])
                    if span is not None:
                        raw.setdefault(where[0], []).append((i, where[1], span))
                    else:
                        by_part.setdefault(where[0], []).append((i, where[1]))
            retry = []
            remote = [(part, located) for part, located in raw.items() if not isinstance(part, Path)]
            if remote:  # object store: one ranged GET per payload, all at once
                retry.extend(self._load_remote(remote, where_of, results, by_part))
            for part, located in raw.items():
                if not isinstance(part, Path):
                    continue
                try:
                    payloads = self._raw_payloads(part, [span for _, _, span in located])
                except FileNotFoundError:
                    retry.extend(self._forget(where_of, [i for i, _, _ in located]))
                    continue
                for (i, row, _), payload in zip(located, payloads):
                    if payload is not None:
                        results[i] = _decode_view(payload)
                    else:  # not the layout we expected after all (a legacy payload ...): pyarrow reads it
                        by_part.setdefault(part, []).append((i, row))
            for part, located in by_part.items():
                idxs = [i for i, _ in located]
                try:
                    payloads = self._payloads(part, [row for _, row in located])
                except FileNotFoundError:  # compacted away since the index was built
                    retry.extend(self._forget(where_of, idxs))
                    continue
                for i, payload in zip(idxs, payloads):
                    if payload is not None:
                        results[i] = decode_features(payload)
            if not retry:
                return results
            if attempt == 2:
                raise FileNotFoundError(f"parts of {self.split_root} kept vanishing while reading")
            pending = retry
        return results

    def _load_remote(self, remote, where_of, results, by_part) -> list[int]:
        """Raw payload reads of object-store parts: ``[offset, offset + length)`` of each, as
        concurrent ranged GETs; returns the key indexes to retry (a part vanished)."""
        flat = [(part, i, row, span) for part, located in remote for i, row, span in located]
        try:
            chunks = storage.read_ranges([str(p) for p, _, _, _ in flat], [o for _, _, _, (o, _) in flat],
                                         [o + n for _, _, _, (o, n) in flat])
        except FileNotFoundError:
            return self._forget(where_of, [i for _, i, _, _ in flat])
        for (part, i, row, (_, length)), chunk in zip(flat, chunks):
            payload = _raw_payload(bytearray(chunk)) if len(chunk) == length else None
            if payload is not None:
                results[i] = _decode_view(payload)
            else:  # not the layout we expected after all: pyarrow reads it
                by_part.setdefault(part, []).append((i, row))
        return []

    def _forget(self, shards: Sequence[int], idxs: list[int]) -> list[int]:
        """Drop the indexes of ``shards[idxs]`` (a part vanished); returns ``idxs``."""
        for i in idxs:
            shard = shards[i]
            self._index.pop(shard, None)
            self._checked.pop(shard, None)
        return idxs

    def load(self, utterance_id: str, frontend="squeezeformer", output: str | None = None) -> np.ndarray | None:
        """Features of an utterance for a frontend, or None if not cached.

        Args:
            utterance_id: the record's ``utterance_id``.
            frontend: registry name (``"squeezeformer"``), a Frontend object, or its hash12
                (a hash12 only for single-output frontends).
            output: for a frontend with named outputs, which one (looked up in the shard of the
                utterance's frontend key, see the module docstring); None otherwise.

        Returns:
            float32 ``[frames, dims]`` (SFCF32L1), or a named output with its stored dtype and
            shape (``.npy``), e.g. int32 ``(frames,)`` tokens.

        Raises:
            FeatureConfigError: ``output=None`` for a frontend with named outputs (the message
                lists them), an unknown output name, or ``output`` with a hash12.
            CacheCorruptError: the stored payload is neither valid SFCF32L1, nor a valid
                ``.npy`` value, nor (with torch installed) a plain tensor saved by upstream's
                Python writer.
        """
        return self.load_many([utterance_id], frontend, output)[0]

    #: SpeechBrain's reader name for :meth:`load`
    read = load

    def load_many(self, utterance_ids: Sequence[str], frontend="squeezeformer",
                  output: str | None = None) -> list[np.ndarray | None]:
        """:meth:`load` for several utterances, reads grouped by part (one frontend, one output)."""
        fhash, khash = self._output_key_hash(frontend, output)
        keys = [cache_key(u, khash) for u in utterance_ids]
        if khash == fhash:
            return self.load_keys(keys)
        return self.load_keys(keys, [shard_index(cache_key(u, fhash), self.num_shards) for u in utterance_ids])

    def load_outputs(self, utterance_id: str, frontend) -> dict[str, np.ndarray] | None:
        """Every named output of an utterance, ``{name: array}`` in declared order, or None
        unless all of them are cached (they are written together).

        Raises:
            FeatureConfigError: ``frontend`` has no named outputs or is a hash12.
        """
        fe = self._frontend_object(frontend)
        if fe is None or fe.outputs is None:
            raise FeatureConfigError(f"load_outputs needs a frontend with named outputs (a name or Frontend), "
                                     f"got {frontend!r}")
        fhash = self._frontend_hash(fe)
        shard = shard_index(cache_key(utterance_id, fhash), self.num_shards)
        keys = output_keys(utterance_id, fe)
        arrays = self.load_keys(list(keys.values()), [shard] * len(keys))
        if any(a is None for a in arrays):
            return None
        return dict(zip(keys, arrays))

    def close(self) -> None:
        """Close open parts and drop indexes."""
        self._parts.clear()
        self._index.clear()
        self._checked.clear()


@dataclass
class StoredOutputsCheck:
    """What :func:`check_stored_outputs` found for one record.

    Attributes:
        utterance_id: the record.
        shard: the shard its outputs live in (the frontend key's).
        missing: nothing is stored (no output present; a failure report should account for it).
        problems: why the stored features are invalid, one line each (empty when valid or missing).
        invalid_keys: keys to tombstone so the next run computes the record again (every
            present key of an invalid record).
        frames: rows of the first output (0 unless valid).
    """

    utterance_id: str
    shard: int
    missing: bool = False
    problems: list[str] = field(default_factory=list)
    invalid_keys: list[str] = field(default_factory=list)
    frames: int = 0

    @property
    def ok(self) -> bool:
        """Every output present and valid."""
        return not self.missing and not self.problems


def _array_problem(array: np.ndarray, dtype: str, width: int | None) -> str | None:
    """Why a stored array is not a valid output of ``dtype`` (and ``width`` columns), or None."""
    if array.dtype != np.dtype(dtype):
        return f"dtype {array.dtype}, declared {dtype}"
    if array.ndim not in (1, 2) or array.shape[0] == 0 or array.size == 0:
        return f"shape {array.shape}, expected (frames>0,) or (frames>0, dims>0)"
    if width is not None and (array.ndim != 2 or array.shape[1] != width):
        return f"shape {array.shape}, expected (frames>0, {width})"
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        return f"shape {array.shape}, {int((~np.isfinite(array)).sum())} non-finite values"
    return None


def check_stored_outputs(cache: ShardedParquetFeatureCache, frontend: "Frontend",
                         utterance_id: str) -> StoredOutputsCheck:
    """Validate one record's stored features of a frontend (what the feature asset check does).

    A single-output frontend's payload must decode to float32 ``[frames > 0, feature_dim]``,
    finite. A frontend with named outputs must have every output present (they are written
    together), each decodable, of its declared dtype, 1-D or 2-D with frames > 0 and, for
    floats, finite. Nothing is written; tombstone ``invalid_keys`` in ``shard`` with
    :func:`tombstone_keys` to have them computed again.

    Args:
        cache: a reader of the split.
        frontend: the Frontend object (its outputs and width are checked).
        utterance_id: the record's ``utterance_id``.

    Returns:
        :class:`StoredOutputsCheck`.
    """
    fhash = frontend.frontend_hash()
    shard = shard_index(cache_key(utterance_id, fhash), cache.num_shards)
    verdict = StoredOutputsCheck(utterance_id, shard)
    keys = output_keys(utterance_id, frontend)
    declared = frontend.outputs or {None: "float32"}
    width = frontend.feature_dim if frontend.outputs is None else None
    absent: list[str] = []
    first_frames = 0
    for index, (name, key) in enumerate(keys.items()):
        label = f"output {name!r}: " if name is not None else ""
        try:
            array = cache.load_keys([key], [shard])[0]
        except CacheCorruptError as exc:
            verdict.problems.append(f"{label}{exc}")
            verdict.invalid_keys.append(key)
            continue
        if array is None:
            absent.append(str(name))
            continue
        verdict.invalid_keys.append(key)  # kept only if something is wrong
        problem = _array_problem(array, declared[name], width)
        if problem is not None:
            verdict.problems.append(f"{label}{problem}")
        elif index == 0:
            first_frames = int(array.shape[0])
    if len(absent) == len(keys):
        verdict.missing = True
        verdict.invalid_keys.clear()
    elif absent:
        verdict.problems.append(f"outputs {absent} missing while others are stored")
    if not verdict.problems:
        verdict.invalid_keys.clear()
        verdict.frames = first_frames
    return verdict


def tombstone_keys(split_root: str | os.PathLike, shard: int, frontend_hash: str, keys: Sequence[str],
                   metadata: dict | None = None) -> Path | None:
    """Write tombstones for ``keys`` of one shard (one new part), under the shard's writer lock.

    Used for payloads that cannot be decoded or hold invalid features: the next feature run
    sees the keys as missing and computes them again. Returns the part written, or None.
    Named outputs' keys are tombstoned in their frontend key's shard
    (:attr:`StoredOutputsCheck.shard`).
    """
    if not keys:
        return None
    with shard_lock(split_root, shard, frontend_hash):
        writer = ShardWriter(split_root, shard, rows_per_part=max(len(keys), 1),
                             metadata={"frontend_hash": frontend_hash, **(metadata or {})})
        for key in keys:
            writer.delete(key)
        writer.close()
    return writer.parts_written[0] if writer.parts_written else None


def _frontend_hash_of(schema: pa.Schema) -> str | None:
    """The ``frontend_hash`` a part's writer recorded in its metadata (None: not asr_assets)."""
    return (schema.metadata or {}).get(b"frontend_hash", b"").decode() or None


def _part_frontend_hash(part: Path) -> str | None:
    return _frontend_hash_of(pq.read_schema(part))


#: Rows per part written by compaction: a part's footer holds one row group per row (~200 bytes
#: each), so one part for a shard of 80k rows would have a ~16 MB footer to parse on a cold read.
COMPACT_ROWS_PER_PART = 4096


def compact_shard(split_root: str | os.PathLike, shard: int, frontend_hash: str, *,
                  rows_per_part: int = COMPACT_ROWS_PER_PART) -> dict:
    """Merge the parts one frontend wrote in a shard into parts of at most ``rows_per_part``
    rows: newest row per key, tombstones dropped.

    Safe against concurrent readers: the merged part is renamed into place (with the newest
    input's mtime, so parts written later still win) before the inputs are removed, and readers
    re-list a shard whose part vanished. Writers of the same frontend and shard are excluded by
    :func:`shard_lock`. Parts of other frontends or without asr_assets metadata are not touched.

    Returns:
        ``{"parts_before", "parts_after", "rows_before", "rows_after", "tombstones_dropped"}``.
    """
    if storage.is_url(split_root):
        raise ValueError(f"compaction of an object-store feature cache ({split_root}) is not supported: parts there "
                         "cannot keep the newest input's modification time; compact a local copy")
    directory = shard_dir(split_root, shard)
    with shard_lock(split_root, shard, frontend_hash):
        parts = [p for p in list_parts(directory) if _part_frontend_hash(p) == frontend_hash]
        live: dict[str, bytes] = {}
        rows_before, tombstones, metadata = 0, 0, None
        for part in parts:
            table = pq.read_table(part)
            metadata = table.schema.metadata
            rows_before += table.num_rows
            for key, payload, dead in zip(table.column("key").to_pylist(), table.column("payload").to_pylist(),
                                          table.column("deleted").to_pylist()):
                if dead or payload is None:
                    tombstones += live.pop(key, None) is not None or dead
                else:
                    live[key] = payload
        result = {"parts_before": len(parts), "parts_after": len(parts), "rows_before": rows_before,
                  "rows_after": rows_before, "tombstones_dropped": 0}
        needed = math.ceil(len(live) / rows_per_part)
        if len(parts) <= needed and rows_before == len(live):
            return result  # already compact
        newest = max(p.stat().st_mtime_ns for p in parts)
        keys = list(live)
        for start in range(0, len(keys), rows_per_part):  # disjoint keys: their order does not matter
            chunk = keys[start:start + rows_per_part]
            table = pa.table({"key": chunk, "payload": [live[k] for k in chunk], "deleted": [False] * len(chunk)}, schema=SCHEMA)
            _write_part(directory, table.replace_schema_metadata(metadata), mtime_ns=newest, prefix="part_compact_")
        for part in parts:
            part.unlink()
        update_shard_index(split_root, shard)
        return {"parts_before": len(parts), "parts_after": needed, "rows_before": rows_before,
                "rows_after": len(live), "tombstones_dropped": int(tombstones)}


def compact_split(split_root: str | os.PathLike, frontend_hashes: set[str] | None = None) -> dict[str, dict]:
    """:func:`compact_shard` for every shard of a split and every frontend found in its parts
    (or only ``frontend_hashes``); returns totals per frontend hash."""
    if storage.is_url(split_root):
        raise ValueError(f"compaction of an object-store feature cache ({split_root}) is not supported; compact a local copy")
    totals: dict[str, dict] = {}
    root = Path(split_root) / "feature_shards"
    for directory in sorted(root.glob("features_*")) if root.is_dir() else []:
        shard = int(directory.name.split("_")[1])
        found = {h for h in (_part_frontend_hash(p) for p in list_parts(directory)) if h}
        for frontend_hash in sorted(found if frontend_hashes is None else found & frontend_hashes):
            result = compact_shard(split_root, shard, frontend_hash)
            total = totals.setdefault(frontend_hash, dict.fromkeys(result, 0))
            for key, value in result.items():
                total[key] += value
    return totals
