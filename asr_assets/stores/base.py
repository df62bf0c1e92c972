"""What every feature store backend shares: the reader and writer interfaces, the metadata file,
the errors.

Entry points:
    - :class:`FeatureStore` — reader interface (``load``/``read``, ``in``, ``len``, ``keys``,
      ``close``, context manager, pickles without open handles).
    - :class:`FeatureStoreWriter` — writer interface (``write``, ``close`` = commit, ``abort``,
      context manager).
    - :data:`METADATA_NAME`, :func:`read_metadata`, :func:`write_metadata` — ``asr_assets_store.json``.
    - :class:`StoreError` and its subclasses.

The metadata file is written last, atomically: a store without it is incomplete, never read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, ClassVar, Iterable, Iterator, Sequence

import numpy as np

from .._fs import atomic_write_bytes
from ..errors import AsrAssetsError, CacheCorruptError

#: The file beside the data that says how it was stored (lhotse's ``storage_type``).
METADATA_NAME = "asr_assets_store.json"
#: Fields every ``asr_assets_store.json`` carries (backends add their own).
METADATA_FIELDS = ("storage_type", "format_version", "frontend", "frontend_hash", "feature_dim", "dtype",
                   "num_utterances")


class StoreError(AsrAssetsError):
    """A feature store cannot be opened, read or written (the message names the path and the fix)."""


class UnknownStoreError(StoreError, ValueError):
    """A storage type name is not registered (the message lists the registered ones)."""


class StoreNotFoundError(StoreError, FileNotFoundError):
    """There is no feature store at the path (nothing there, or an incomplete store without its
    metadata file)."""

    def __str__(self) -> str:  # OSError would render (errno, strerror)
        return str(self.args[0]) if self.args else ""


class StoreCorruptError(StoreError, CacheCorruptError):
    """The metadata file or a data file of a store is damaged or inconsistent."""


def metadata_path(path: str | os.PathLike) -> Path:
    """``<path>/asr_assets_store.json``."""
    return Path(path) / METADATA_NAME


def read_metadata(path: str | os.PathLike) -> dict | None:
    """The parsed ``asr_assets_store.json`` of the store at ``path``, or None if there is none.

    Raises:
        StoreCorruptError: the file is not a JSON object with a string ``storage_type``.
    """
    file = metadata_path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise StoreCorruptError(f"cannot read {str(file)!r}: {exc}") from exc
    try:
        metadata = json.loads(text)
    except json.JSONDecodeError as exc:
        raise StoreCorruptError(f"{str(file)!r} is not valid JSON ({exc}); the store is damaged: export it again") from exc
    if not isinstance(metadata, dict) or not isinstance(metadata.get("storage_type"), str):
        raise StoreCorruptError(f"{str(file)!r} names no storage_type (a JSON object with a string "
                                f"'storage_type' is expected); the store is damaged: export it again")
    return metadata


def write_metadata(path: str | os.PathLike, metadata: dict) -> Path:
    """Write ``asr_assets_store.json`` atomically (synced temporary file + ``os.replace``)."""
    file = metadata_path(path)
    atomic_write_bytes(file, (json.dumps(metadata, indent=2, sort_keys=False) + "\n").encode("utf-8"))
    return file


def fsync_dir(path: str | os.PathLike) -> None:
    """Make the entries of a folder (renames into it) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_features(utterance_id: str, features: np.ndarray, feature_dim: int | None) -> np.ndarray:
    """``features`` as C-contiguous little-endian float32 ``(num_frames, feature_dim)``.

    Raises:
        TypeError: ``utterance_id`` is not a str, or ``features`` is not a real-valued array.
        ValueError: not 2-D, or its width differs from ``feature_dim``.
    """
    if not isinstance(utterance_id, str) or not utterance_id:
        raise TypeError(f"utterance_id must be a non-empty str, got {utterance_id!r}")
    array = np.asarray(features)
    if array.dtype.kind not in "fiu":
        raise TypeError(f"features of {utterance_id!r} must be a real array, got dtype {array.dtype}")
    if array.ndim != 2:
        raise ValueError(f"features of {utterance_id!r} must be 2-D (num_frames, feature_dim), got shape {array.shape}")
    if feature_dim is not None and array.shape[1] != feature_dim:
        raise ValueError(f"features of {utterance_id!r} have {array.shape[1]} columns, the store holds {feature_dim}")
    return np.ascontiguousarray(array, dtype="<f4")


class FeatureStore:
    """Reader of one feature store: features of one frontend, by utterance id.

    Subclasses set :attr:`storage_type` and implement :meth:`load` and :meth:`utterance_ids`
    (and usually ``__contains__``/``__len__`` faster than the defaults). Readers open files on
    first use and drop open handles when pickled (``__getstate__`` keeps only what
    :attr:`_HANDLES` does not name), so a reader can be handed to DataLoader workers, each of
    which then opens its own files. Not thread-safe: use one reader per thread.

    Args:
        path: the store's folder.
        metadata: its parsed ``asr_assets_store.json``.
    """

    storage_type: ClassVar[str] = ""
    #: instance attributes holding open files or file-derived caches, reset on pickling
    _HANDLES: ClassVar[tuple[str, ...]] = ()

    def __init__(self, path: str | os.PathLike, metadata: dict):
        self.path = Path(path)
        self.metadata = dict(metadata)
        self._reset_handles()

    def _reset_handles(self) -> None:
        for name in self._HANDLES:
            setattr(self, name, None)

    # -- the interface ---------------------------------------------------------------------
    def load(self, utterance_id: str) -> np.ndarray | None:
        """float32 ``(num_frames, feature_dim)`` of an utterance, or None if the store lacks it."""
        raise NotImplementedError

    def read(self, utterance_id: str) -> np.ndarray | None:
        """SpeechBrain's name for :meth:`load` (same result)."""
        return self.load(utterance_id)

    def load_many(self, utterance_ids: Sequence[str]) -> list[np.ndarray | None]:
        """:meth:`load` of each id, in order."""
        return [self.load(u) for u in utterance_ids]

    def utterance_ids(self) -> list[str]:
        """Ids of the stored utterances, in the order they were written."""
        raise NotImplementedError

    def keys(self) -> list[str]:
        """Same as :meth:`utterance_ids`."""
        return self.utterance_ids()

    def __iter__(self) -> Iterator[str]:
        return iter(self.utterance_ids())

    def __contains__(self, utterance_id: object) -> bool:
        return isinstance(utterance_id, str) and utterance_id in set(self.utterance_ids())

    def __len__(self) -> int:
        return len(self.utterance_ids())

    @property
    def frontend_hash(self) -> str | None:
        return self.metadata.get("frontend_hash")

    @property
    def feature_dim(self) -> int | None:
        return self.metadata.get("feature_dim")

    def close(self) -> None:
        """Release open files (reopened on the next load). Arrays already returned stay valid."""
        self._reset_handles()

    def __enter__(self) -> "FeatureStore":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.update(dict.fromkeys(self._HANDLES))
        return state

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, frontend={self.metadata.get('frontend')!r})"


class FeatureStoreWriter:
    """Writer of one feature store into a folder that is new or empty.

    Subclasses set :attr:`storage_type` and :attr:`format_version` and implement
    :meth:`_write`, :meth:`_finish` (returns backend metadata; every data file must be synced and
    renamed into place by then) and :meth:`_abort`. :meth:`close` commits: it writes
    ``asr_assets_store.json`` last, atomically, so a store whose writer died is never opened.
    Used as a context manager, an exception aborts instead of committing.

    Args:
        path: the store's folder (created if missing; must be empty).
        frontend: the frontend's registry name (recorded only).
        frontend_hash: its hash12 (recorded; readers check it).
        feature_dim: the width of every array; None takes the first array's.
        extra_metadata: more JSON fields to record (e.g. the source cache).

    Raises:
        StoreError: ``path`` is a file or a folder that is not empty.
    """

    storage_type: ClassVar[str] = ""
    format_version: ClassVar[Any] = 1

    def __init__(self, path: str | os.PathLike, *, frontend: str | None, frontend_hash: str | None,
                 feature_dim: int | None = None, extra_metadata: dict | None = None):
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise StoreError(f"cannot write a feature store at {str(self.path)!r}: it is a file")
        self.path.mkdir(parents=True, exist_ok=True)
        if any(self.path.iterdir()):
            raise StoreError(f"cannot write a feature store into {str(self.path)!r}: the folder is not empty")
        self.frontend = frontend
        self.frontend_hash = frontend_hash
        self.feature_dim = feature_dim
        self.extra_metadata = dict(extra_metadata or {})
        self.num_utterances = 0
        self.nbytes = 0
        self.closed = False
        self._ids: set[str] = set()

    def write(self, utterance_id: str, features: np.ndarray) -> None:
        """Add one utterance's features (any real dtype, stored as float32 LE).

        Raises:
            ValueError: a repeated id, a closed writer, or features that are not
                ``(num_frames, feature_dim)``.
        """
        if self.closed:
            raise ValueError(f"the writer of {str(self.path)!r} is closed")
        array = check_features(utterance_id, features, self.feature_dim)
        if utterance_id in self._ids:
            raise ValueError(f"utterance {utterance_id!r} is already in the store")
        if self.feature_dim is None:
            self.feature_dim = int(array.shape[1])
        self._write(utterance_id, array)
        self._ids.add(utterance_id)
        self.num_utterances += 1
        self.nbytes += array.nbytes

    def write_many(self, items: Iterable[tuple[str, np.ndarray]]) -> None:
        for utterance_id, features in items:
            self.write(utterance_id, features)

    def close(self) -> Path:
        """Finish the data files, then commit by writing ``asr_assets_store.json``; returns the folder."""
        if self.closed:
            return self.path
        backend = self._finish()
        metadata = {"storage_type": self.storage_type, "format_version": self.format_version,
                    "frontend": self.frontend, "frontend_hash": self.frontend_hash, "feature_dim": self.feature_dim,
                    "dtype": "float32", "byte_order": "little", "num_utterances": self.num_utterances,
                    "nbytes": self.nbytes, **backend, **self.extra_metadata}
        write_metadata(self.path, metadata)
        fsync_dir(self.path)
        self.closed = True
        return self.path

    def abort(self) -> None:
        """Stop without committing (no metadata file is written; data files may remain)."""
        if not self.closed:
            self.closed = True
            self._abort()

    def __enter__(self) -> "FeatureStoreWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    # -- for subclasses --------------------------------------------------------------------
    def _write(self, utterance_id: str, array: np.ndarray) -> None:
        raise NotImplementedError

    def _finish(self) -> dict:
        raise NotImplementedError

    def _abort(self) -> None:
        pass
