"""SpeechBrain bridge: cached features as a dynamic item of a ``DynamicItemDataset``.

Entry points:
    - :class:`FeaturePipeline` — a callable ``utterance_id -> torch.float32 [frames, dims]``
      over the feature cache or any feature store, for
      ``dataset.add_dynamic_item(pipeline, takes="id", provides="feats")``.
    - :func:`speechbrain_data` — a record cache as the ``{id: {...}}`` dict (or JSON file)
      ``DynamicItemDataset`` is built from, with the field names of SpeechBrain's recipes.

Example::

    from speechbrain.dataio.dataset import DynamicItemDataset
    from asr_assets.bridges.speechbrain import FeaturePipeline, speechbrain_data

    data = speechbrain_data("artifacts/record_cache/train.jsonl")  # {id: {wav, duration, wrd, spk_id}}
    dataset = DynamicItemDataset(data)
    dataset.add_dynamic_item(FeaturePipeline("artifacts/feature-cache/train", frontend="squeezeformer"),
                             takes="id", provides="feats")
    dataset.set_output_keys(["id", "feats", "wrd"])

The decorator form works too: ``speechbrain.utils.data_pipeline.takes("id")`` and
``provides("feats")`` applied to a :class:`FeaturePipeline` wrap it like a function. SpeechBrain
itself is not imported here: the pipeline needs only torch (``pip install "asr_assets[torch]"``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._fs import atomic_write_bytes
from ..data import FeaturesNotCachedError
from ..feature_cache import ShardedParquetFeatureCache
from ..record_cache import RecordStore
from ..stores import open_feature_store

__all__ = ["FeaturePipeline", "speechbrain_data"]


class FeaturePipeline:
    """SpeechBrain dynamic item: an utterance id -> its cached features.

    Args:
        source: where to read, one of
            - a path: a split root of the Parquet cache (``<output>/feature-cache/<split>``) or
              an exported store folder, opened with :func:`asr_assets.stores.open_feature_store`
              on the first call in each process;
            - a :class:`asr_assets.feature_cache.ShardedParquetFeatureCache` (read for ``frontend``);
            - any object with ``load(utterance_id) -> array | None`` (a store from
              ``open_feature_store``); it must pickle for DataLoader workers (ours do, without
              open files).
        frontend: name, Frontend object or hash12. For a path: needed when the Parquet cache holds
            several frontends, checked against an exported store's. For a
            ``ShardedParquetFeatureCache``: the features to read (default ``"squeezeformer"``).
        **options: passed to ``open_feature_store`` (e.g. ``record_cache=``).

    ``pipeline(utterance_id)`` returns ``torch.float32 [num_frames, feature_dim]`` owning writable
    memory, equal to what the source's ``load`` returns.

    Raises (from a call):
        FeaturesNotCachedError: the source holds no features for the utterance.
        StoreError: the path is no store, or holds another frontend.

    The pipeline opens nothing until its first call and pickles without what it opened, so
    each DataLoader worker opens its own files; a forked child reopens them too. Not
    thread-safe: use one pipeline per thread.
    """

    def __init__(self, source: str | os.PathLike | Any, *, frontend=None, **options):
        if isinstance(source, (str, os.PathLike)):
            self.path: Path | None = Path(source)
            self._given = None
        elif callable(getattr(source, "load", None)):
            self.path, self._given = None, source
        else:
            raise TypeError(f"source must be a path or have a load(utterance_id) method, got {type(source).__name__}")
        if isinstance(source, ShardedParquetFeatureCache) and frontend is None:
            frontend = "squeezeformer"  # the cache's own default
        self.frontend = frontend
        self.options = dict(options)
        self._store = None
        self._pid: int | None = None

    def _source(self):
        if self._given is not None:
            return self._given
        if self._store is None or self._pid != os.getpid():
            self._store = open_feature_store(self.path, frontend=self.frontend, **self.options)
            self._pid = os.getpid()
        return self._store

    def load(self, utterance_id: str) -> np.ndarray | None:
        """float32 ``[frames, dims]`` from the source, or None when it holds none."""
        source = self._source()
        if isinstance(source, ShardedParquetFeatureCache):
            return source.load(utterance_id, self.frontend)
        try:
            return source.load(utterance_id)
        except KeyError:
            return None

    #: SpeechBrain's reader name
    read = load

    def __call__(self, utterance_id: str) -> torch.Tensor:
        features = self.load(utterance_id)
        if features is None:
            where = str(self.path) if self.path is not None else repr(self._given)
            raise FeaturesNotCachedError(
                f"no features for utterance {utterance_id!r} in {where}"
                + (f" (frontend {self.frontend!r})" if self.frontend is not None else "")
                + ": run asr-assets materialize for it, or leave it out of the dataset",
                utterance_id=utterance_id, frontend=getattr(self.frontend, "name", self.frontend), location=where)
        array = np.asarray(features)
        if array.dtype != np.float32 or not array.flags.writeable or not array.flags.c_contiguous:
            array = np.array(array, dtype=np.float32, order="C")  # memory-mapped views are read-only
        return torch.from_numpy(array)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.update(_store=None, _pid=None)
        return state

    def __repr__(self) -> str:
        source = str(self.path) if self.path is not None else repr(self._given)
        return f"FeaturePipeline({source!r}, frontend={self.frontend!r})"


def speechbrain_data(record_cache: str | os.PathLike, to: str | os.PathLike | None = None) -> dict[str, dict]:
    """A split's records as SpeechBrain's dataset dict ``{utterance_id: {...}}``, in record order.

    Each entry has the field names of SpeechBrain's recipes: ``wav`` (the audio file, or the
    record's audio blob when there is one, as an absolute path; None if the record has neither),
    ``duration`` (seconds, the record's ``num_samples / 16000``), ``wrd`` (the transcript) and
    ``spk_id`` (None when the manifest had none). ``DynamicItemDataset(data)`` takes it as is;
    with ``to``, it is also written there as JSON (atomically) for ``DynamicItemDataset.from_json``.

    Args:
        record_cache: ``<output>/record_cache/<split>.jsonl``.
        to: optional JSON file to write.

    Raises:
        CacheCorruptError: the record cache is missing or damaged.
        ValueError: two records share an utterance id.
    """
    data: dict[str, dict] = {}
    for record in RecordStore(record_cache):
        uid = record["utterance_id"]
        if uid in data:
            raise ValueError(f"utterance id {uid!r} appears twice in {str(record_cache)!r}")
        audio = record.get("audio_blob_abspath") or record.get("audio_path")
        data[uid] = {"wav": os.path.abspath(audio) if audio else None,
                     "duration": int(record.get("num_samples") or 0) / 16000,
                     "wrd": record.get("transcript"), "spk_id": record.get("speaker_id")}
    if to is not None:
        atomic_write_bytes(Path(to), (json.dumps(data, ensure_ascii=False, indent=1) + "\n").encode("utf-8"))
    return data
