"""``numpy_memmap`` store: flat float32 files read through memory maps (Ludwig's ``lazy_cached``).

Entry points: :class:`NumpyMemmapWriter`, :class:`NumpyMemmapStore` (registered as
``numpy_memmap``; open with :func:`asr_assets.stores.open_feature_store`).

Layout of a store folder::

    asr_assets_store.json          storage_type "numpy_memmap", frontend, hash, dims, and "shards":
                                   [{"data", "index", "num_utterances", "nbytes"}, ...]  (written last)
    shard_0000.f32                 the features of its utterances, back to back: float32
                                   little-endian, row-major (num_frames, feature_dim) each
    shard_0000.index.parquet       utterance_id: string, offset: int64 (bytes into the .f32),
                                   num_frames: int64, feature_dim: int64 — one row per utterance,
                                   in write order
    shard_0001.f32 ...             a new shard starts when one reaches ``max_shard_bytes``

Each file is written under a ``.tmp.<host>-<pid>`` name, synced and renamed into place; the
metadata file is renamed last and is the commit. A reader checks, per shard on first use, that
the data file has the size the metadata says and that the index fits inside it.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .._fs import fsync_file, tmp_path_for
from . import register_store
from .base import FeatureStore, FeatureStoreWriter, StoreCorruptError

_INDEX_SCHEMA = pa.schema([("utterance_id", pa.string()), ("offset", pa.int64()), ("num_frames", pa.int64()),
                           ("feature_dim", pa.int64())])
#: default size at which a new shard starts (2 GiB)
MAX_SHARD_BYTES = 2 << 30


def _shard_names(index: int) -> tuple[str, str]:
    return f"shard_{index:04d}.f32", f"shard_{index:04d}.index.parquet"


@register_store("numpy_memmap")
class NumpyMemmapWriter(FeatureStoreWriter):
    """Writes a ``numpy_memmap`` store (see the module docstring for the layout).

    Args:
        path, frontend, frontend_hash, feature_dim, extra_metadata: see :class:`FeatureStoreWriter`.
        max_shard_bytes: a shard is closed once its data file reaches this size; one utterance
            is never split. (Default: 2 GiB)
    """

    storage_type = "numpy_memmap"
    format_version = 1

    def __init__(self, path, *, max_shard_bytes: int = MAX_SHARD_BYTES, **kwargs):
        super().__init__(path, **kwargs)
        if max_shard_bytes < 1:
            raise ValueError(f"max_shard_bytes must be >= 1, got {max_shard_bytes!r}")
        self.max_shard_bytes = max_shard_bytes
        self._shards: list[dict] = []
        self._file: BinaryIO | None = None
        self._tmp: Path | None = None
        self._rows: dict[str, list] = {}
        self._size = 0

    def _open_shard(self) -> None:
        data, _ = _shard_names(len(self._shards))
        self._tmp = tmp_path_for(self.path / data)
        self._file = open(self._tmp, "wb")
        self._rows = {name: [] for name in _INDEX_SCHEMA.names}
        self._size = 0

    def _write(self, utterance_id: str, array: np.ndarray) -> None:
        if self._file is None:
            self._open_shard()
        if array.nbytes:
            self._file.write(array)  # C-contiguous '<f4' (check_features): its raw bytes
        for name, value in zip(_INDEX_SCHEMA.names, (utterance_id, self._size, array.shape[0], array.shape[1])):
            self._rows[name].append(value)
        self._size += array.nbytes
        if self._size >= self.max_shard_bytes:
            self._close_shard()

    def _close_shard(self) -> None:
        data, index = _shard_names(len(self._shards))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        table = pa.table(self._rows, schema=_INDEX_SCHEMA)
        index_tmp = tmp_path_for(self.path / index)
        pq.write_table(table, index_tmp, compression="zstd")
        fsync_file(index_tmp)
        os.replace(self._tmp, self.path / data)
        os.replace(index_tmp, self.path / index)
        self._shards.append({"data": data, "index": index, "num_utterances": table.num_rows, "nbytes": self._size})

    def _finish(self) -> dict:
        if self._file is not None:
            self._close_shard()
        return {"shards": self._shards}

    def _abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            self._tmp.unlink(missing_ok=True)


@register_store("numpy_memmap")
class NumpyMemmapStore(FeatureStore):
    """Reader of a ``numpy_memmap`` store.

    :meth:`load` returns, by default, a **read-only view** into the memory-mapped file: no copy,
    the fastest way to read (the pages are read from the OS page cache on first touch). The
    array is an ordinary ``numpy.ndarray`` with ``flags.writeable == False`` whose buffer keeps
    the mapping alive (valid after :meth:`close` too; the writer never rewrites a committed
    file, so the mapping cannot change under it). Pass ``copy=True`` for a fresh writable array
    per load (e.g. for ``torch.from_numpy`` without its read-only warning), at the cost of one
    copy. The index of all shards is loaded on first use (about 100 bytes per utterance).

    Args:
        path: the store's folder.
        metadata: its parsed ``asr_assets_store.json``.
        copy: return writable copies instead of read-only views. (Default: False)

    Raises:
        StoreCorruptError: (on first use of a shard) a data file has another size than the
            metadata says, or an index entry lies outside its data file.
    """

    storage_type = "numpy_memmap"
    _HANDLES = ("_positions", "_columns", "_starts", "_maps")

    def __init__(self, path, metadata: dict, *, copy: bool = False):
        self.copy = copy
        if metadata.get("format_version") != NumpyMemmapWriter.format_version:
            raise StoreCorruptError(f"numpy_memmap store {str(path)!r} has format_version "
                                    f"{metadata.get('format_version')!r}; this reader reads {NumpyMemmapWriter.format_version}")
        shards = metadata.get("shards")
        if not isinstance(shards, list) or not all(isinstance(s, dict) and {"data", "index", "nbytes"} <= set(s) for s in shards):
            raise StoreCorruptError(f"{str(Path(path) / 'asr_assets_store.json')!r} lacks a valid 'shards' list")
        super().__init__(path, metadata)

    def _index(self) -> dict[str, int]:
        if self._positions is None:
            ids: list[str] = []
            columns = {name: [] for name in _INDEX_SCHEMA.names[1:]}
            shard_of = []
            for number, shard in enumerate(self.metadata["shards"]):
                try:
                    table = pq.read_table(self.path / shard["index"])
                except (OSError, pa.ArrowException) as exc:
                    raise StoreCorruptError(f"index {str(self.path / shard['index'])!r} cannot be read: {exc}") from exc
                ids.extend(table.column("utterance_id").to_pylist())
                for name, values in columns.items():
                    values.append(table.column(name).to_numpy())
                shard_of.append(np.full(table.num_rows, number, dtype=np.int32))
            cat = lambda parts: np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)  # noqa: E731
            self._columns = (cat(shard_of), cat(columns["offset"]), cat(columns["num_frames"]), cat(columns["feature_dim"]))
            positions = dict(zip(ids, range(len(ids))))
            if len(positions) != len(ids):
                raise StoreCorruptError(f"the index of {str(self.path)!r} names an utterance twice")
            self._starts = np.cumsum([0] + [len(part) for part in shard_of]).tolist()
            self._maps = [None] * len(self.metadata["shards"])
            self._positions = positions
        return self._positions

    def _map(self, number: int) -> mmap.mmap | None:
        opened = self._maps[number]
        if opened is None:
            shard = self.metadata["shards"][number]
            path = self.path / shard["data"]
            try:
                handle = open(path, "rb")
            except FileNotFoundError as exc:
                raise StoreCorruptError(f"{str(path)!r} is missing: the store is damaged, export it again") from exc
            with handle:
                size = os.fstat(handle.fileno()).st_size
                if size != shard["nbytes"]:
                    raise StoreCorruptError(f"{str(path)!r} has {size} bytes, the store's metadata says "
                                            f"{shard['nbytes']} (truncated or replaced): export the store again")
                rows = slice(self._starts[number], self._starts[number + 1])  # rows are in shard order
                ends = self._columns[1][rows] + self._columns[2][rows] * self._columns[3][rows] * 4
                if len(ends) and (ends.max() > size or self._columns[1][rows].min() < 0):
                    raise StoreCorruptError(f"index of {str(path)!r} points past its {size} bytes")
                opened = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
            self._maps[number] = opened
        return opened

    def load(self, utterance_id: str) -> np.ndarray | None:
        """float32 ``(num_frames, feature_dim)`` (a read-only view unless ``copy=True``), or None."""
        position = (self._positions if self._positions is not None else self._index()).get(utterance_id)
        if position is None:
            return None
        shards, offsets, frames, dims = self._columns
        number, n, d = int(shards[position]), int(frames[position]), int(dims[position])
        buffer = self._maps[number]
        if buffer is None:
            buffer = self._map(number)
        if n * d == 0:
            array = np.zeros((n, d), dtype=np.float32)
            array.flags.writeable = self.copy
            return array
        array = np.frombuffer(buffer, dtype="<f4", count=n * d, offset=int(offsets[position])).reshape(n, d)
        return array.copy() if self.copy else array

    def utterance_ids(self) -> list[str]:
        return list(self._index())

    def __contains__(self, utterance_id: object) -> bool:
        return utterance_id in self._index()

    def __len__(self) -> int:
        return int(self.metadata.get("num_utterances", len(self._index())))

    def close(self) -> None:
        """Drop the maps and the index; arrays already returned keep their mapping alive."""
        for opened in self._maps or ():
            if isinstance(opened, mmap.mmap):
                try:
                    opened.close()
                except BufferError:  # views into it are still alive: it unmaps when they go
                    pass
        super().close()
