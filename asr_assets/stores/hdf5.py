"""``hdf5`` store: one HDF5 dataset per utterance (lhotse's ``NumpyHdf5Writer`` / SpeechBrain style).

Entry points: :class:`Hdf5Writer`, :class:`Hdf5Store` (registered as ``hdf5``; needs ``h5py``:
``pip install "asr_assets[hdf5]"``; open with :func:`asr_assets.stores.open_feature_store`).

Layout of a store folder::

    asr_assets_store.json     storage_type "hdf5", frontend, hash, dims, "file": "features.h5" (written last)
    features.h5               one contiguous, uncompressed float32 LE dataset (num_frames, feature_dim)
                              per utterance in the root group, named by :func:`dataset_name`;
                              links kept in write order (``track_order``)

``features.h5`` is written under a temporary name, synced and renamed into place before the
metadata file. Dataset names are utterance ids with ``%``, ``/`` and NUL percent-encoded
(``%25``, ``%2F``, ``%00``) and a leading ``.`` as ``%2E``, so any id is one name in the root
group and :func:`utterance_id_of` gives it back.
"""

from __future__ import annotations

import functools
import os
import re

import numpy as np

from .._fs import fsync_file, tmp_path_for
from . import register_store
from .base import FeatureStore, FeatureStoreWriter, StoreCorruptError, StoreError

DATA_FILE = "features.h5"
_ESCAPE = re.compile(r"[%/\x00]|^\.")
_UNESCAPE = re.compile(r"%(25|2F|00|2E)")


@functools.lru_cache(maxsize=1)
def _h5py():
    try:
        import h5py
    except ImportError as exc:
        raise StoreError('the hdf5 store needs h5py: pip install "asr_assets[hdf5]" (or pip install h5py)') from exc
    return h5py


def h5py_available() -> bool:
    try:
        _h5py()
    except StoreError:
        return False
    return True


def dataset_name(utterance_id: str) -> str:
    """The HDF5 dataset name of an utterance id (``a/b`` -> ``a%2Fb``)."""
    return _ESCAPE.sub(lambda m: f"%{ord(m.group()):02X}", utterance_id)


def utterance_id_of(name: str) -> str:
    """Inverse of :func:`dataset_name`."""
    return _UNESCAPE.sub(lambda m: chr(int(m.group(1), 16)), name)


@register_store("hdf5", requires="h5py", install_hint='pip install "asr_assets[hdf5]"')
class Hdf5Writer(FeatureStoreWriter):
    """Writes an ``hdf5`` store (see the module docstring for the layout).

    Args: see :class:`FeatureStoreWriter`.
    """

    storage_type = "hdf5"
    format_version = 1

    def __init__(self, path, **kwargs):
        h5py = _h5py()
        super().__init__(path, **kwargs)
        self._tmp = tmp_path_for(self.path / DATA_FILE)
        self._file = h5py.File(self._tmp, "w", track_order=True)

    def _write(self, utterance_id: str, array: np.ndarray) -> None:
        self._file.create_dataset(dataset_name(utterance_id), data=array)

    def _finish(self) -> dict:
        self._file.close()
        fsync_file(self._tmp)
        os.replace(self._tmp, self.path / DATA_FILE)
        return {"file": DATA_FILE, "dataset_names": "utterance id, % / NUL and a leading . percent-encoded"}

    def _abort(self) -> None:
        self._file.close()
        self._tmp.unlink(missing_ok=True)


@register_store("hdf5", requires="h5py", install_hint='pip install "asr_assets[hdf5]"')
class Hdf5Store(FeatureStore):
    """Reader of an ``hdf5`` store. :meth:`load` returns a new writable float32 array.

    The file is opened on first use, read-only, and reopened in a forked child (HDF5 handles
    must not cross ``fork``); pickling drops it.

    Args:
        path: the store's folder.
        metadata: its parsed ``asr_assets_store.json``.
    """

    storage_type = "hdf5"
    _HANDLES = ("_file", "_pid")

    def __init__(self, path, metadata: dict):
        if metadata.get("format_version") != Hdf5Writer.format_version:
            raise StoreCorruptError(f"hdf5 store {str(path)!r} has format_version {metadata.get('format_version')!r}; "
                                    f"this reader reads {Hdf5Writer.format_version}")
        super().__init__(path, metadata)

    def _open(self):
        if self._file is None or self._pid != os.getpid():
            h5py = _h5py()
            path = self.path / self.metadata.get("file", DATA_FILE)
            try:
                self._file = h5py.File(path, "r")
            except FileNotFoundError as exc:
                raise StoreCorruptError(f"{str(path)!r} is missing: the store is damaged, export it again") from exc
            except OSError as exc:
                raise StoreCorruptError(f"{str(path)!r} cannot be opened as HDF5: {exc}") from exc
            self._pid = os.getpid()
        return self._file

    def load(self, utterance_id: str) -> np.ndarray | None:
        """float32 ``(num_frames, feature_dim)`` (a new array), or None."""
        if not isinstance(utterance_id, str):
            return None
        dataset = self._open().get(dataset_name(utterance_id))
        if dataset is None:
            return None
        return dataset[()]

    def utterance_ids(self) -> list[str]:
        return [utterance_id_of(name) for name in self._open().keys()]

    def __contains__(self, utterance_id: object) -> bool:
        return isinstance(utterance_id, str) and dataset_name(utterance_id) in self._open()

    def __len__(self) -> int:
        return len(self._open())

    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        super().close()
