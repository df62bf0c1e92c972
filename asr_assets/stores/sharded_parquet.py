"""``sharded_parquet`` store: the upstream-compatible Parquet feature cache (spec §3), for one frontend.

Entry point: :class:`ShardedParquetStore` (registered as ``sharded_parquet``), a thin reader
over :class:`asr_assets.feature_cache.ShardedParquetFeatureCache`. The store is a split root
``<output>/feature-cache/<split>`` (``feature_shards/features_NN/part_*.parquet``); it holds
every frontend's features under ``sha256(f"{utterance_id}:{hash12}")`` keys, so the store needs
one frontend hash: the ``frontend=`` argument (name, Frontend or hash12), else the metadata
file's ``frontend_hash``, else the one hash every part names in its Parquet metadata. Upstream
wrote no ``asr_assets_store.json``; a folder with ``feature_shards/`` opens as this backend.

The cache is written by the feature extraction (:class:`asr_assets.feature_cache.ShardWriter`),
not through :func:`asr_assets.stores.export_feature_store`, so this backend has no store writer.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from ..feature_cache import ShardedParquetFeatureCache, cache_key, list_parts
from ..record_cache import RecordStore
from . import register_store
from .base import FeatureStore, StoreError

FORMAT_VERSION = "SFCF32L1"


def is_sharded_parquet_cache(path: str | os.PathLike) -> bool:
    """Whether ``path`` is laid out like a split root of the sharded Parquet cache."""
    return (Path(path) / "feature_shards").is_dir()


def frontends_in_parts(split_root: str | os.PathLike) -> dict[str | None, dict]:
    """``{frontend_hash: {"frontend", "feature_dim"}}`` from the Parquet metadata of every part
    of every shard (one footer read per part); key None for parts without it (upstream's)."""
    found: dict[str | None, dict] = {}
    root = Path(split_root) / "feature_shards"
    for directory in sorted(root.glob("features_*")):
        for part in list_parts(directory):
            metadata = {k.decode(): v.decode() for k, v in (pq.read_schema(part).metadata or {}).items()}
            dim = metadata.get("feature_dim", "")
            found.setdefault(metadata.get("frontend_hash") or None,
                             {"frontend": metadata.get("frontend"), "feature_dim": int(dim) if dim.isdigit() else None})
    return found


def _resolve_frontend(frontend) -> tuple[str | None, str, int | None]:
    """``(name, hash12, feature_dim)`` of a frontend given as a name, a Frontend object or a
    hash12 (name and dim None for a hash12)."""
    if not isinstance(frontend, str):
        return getattr(frontend, "name", None), frontend.frontend_hash(), getattr(frontend, "feature_dim", None) or None
    if len(frontend) == 12 and all(c in "0123456789abcdef" for c in frontend):
        return None, frontend, None
    from ..frontends import get_frontend

    built = get_frontend(frontend)
    return frontend, built.frontend_hash(), built.feature_dim or None


def _refuse_named_outputs(frontend) -> None:
    """This store reads one float32 array per utterance: refuse a frontend with named outputs."""
    if isinstance(frontend, str) and not (len(frontend) == 12 and all(c in "0123456789abcdef" for c in frontend)):
        from ..frontends import get_frontend

        frontend = get_frontend(frontend)
    outputs = getattr(frontend, "outputs", None)
    if outputs is not None:
        raise StoreError(f"frontend {frontend.name!r} has named outputs {list(outputs)}; the sharded_parquet store "
                         "reads single-output frontends: use ShardedParquetFeatureCache(path).load(utterance_id, "
                         "frontend, output=...) or export one float output with export_feature_store(..., output=...)")


def _resolve_hash(frontend) -> tuple[str | None, str]:
    """``(name, hash12)`` of a frontend (see :func:`_resolve_frontend`)."""
    return _resolve_frontend(frontend)[:2]


def default_record_cache(split_root: str | os.PathLike) -> Path:
    """``<output>/record_cache/<split>.jsonl`` for ``<output>/feature-cache/<split>`` (the layout
    ``asr-assets materialize`` writes)."""
    split_root = Path(split_root)
    return split_root.parent.parent / "record_cache" / f"{split_root.name}.jsonl"


@register_store("sharded_parquet")
class ShardedParquetStore(FeatureStore):
    """Reader of one frontend's features in a sharded Parquet cache.

    :meth:`load`, :meth:`load_many` and ``in`` need only the cache. The cache stores hashed keys,
    so listing ids (:meth:`utterance_ids`, ``len``) takes them from a record cache: the
    ``record_cache`` argument, else ``<output>/record_cache/<split>.jsonl`` beside the
    feature cache; the ids are the records whose key is in the cache, in record order.
    :meth:`load` returns a new writable float32 array.

    Args:
        path: the split root, ``<output>/feature-cache/<split>``.
        metadata: its ``asr_assets_store.json`` if there is one, else ``{}``.
        frontend: name, Frontend object or hash12; overrides the metadata's hash.
        record_cache: the record-cache JSONL whose utterance ids this cache holds.
        **options: passed to :class:`ShardedParquetFeatureCache` (``num_shards``,
            ``refresh_interval_s``, ``max_open_parts``).

    Raises:
        StoreError: no frontend hash can be found (none given, none in the metadata, and the
            parts name several or none).
    """

    storage_type = "sharded_parquet"
    _HANDLES = ("_ids",)

    def __init__(self, path, metadata: dict | None = None, *, frontend=None, record_cache=None, **options):
        metadata = dict(metadata or {})
        name, dim = metadata.get("frontend"), metadata.get("feature_dim")
        if frontend is not None:
            _refuse_named_outputs(frontend)
            given, frontend_hash, given_dim = _resolve_frontend(frontend)
            if metadata.get("frontend_hash") != frontend_hash:
                name, dim = None, None
            name, dim = given or name, given_dim or dim
        elif metadata.get("frontend_hash"):
            frontend_hash = metadata["frontend_hash"]
        else:
            found = frontends_in_parts(path)
            named = sorted(h for h in found if h)
            if len(named) != 1 or None in found:
                what = ("it holds no parts" if not found
                        else f"its parts name {len(named)} frontend hashes ({', '.join(named)})" if len(named) > 1
                        else "parts without a frontend_hash in their metadata (upstream's) could be any frontend")
                raise StoreError(f"{str(path)!r} is a sharded Parquet cache, which can hold every frontend, and {what}: "
                                 "pass frontend= (a name such as 'squeezeformer', or a hash12)")
            frontend_hash = named[0]
            name, dim = found[frontend_hash]["frontend"], found[frontend_hash]["feature_dim"]
        metadata.update(storage_type="sharded_parquet", format_version=FORMAT_VERSION, frontend=name,
                        frontend_hash=frontend_hash, feature_dim=dim, dtype="float32")
        super().__init__(path, metadata)
        self.cache = ShardedParquetFeatureCache(path, **options)
        self.record_cache = Path(record_cache) if record_cache is not None else None

    def load(self, utterance_id: str) -> np.ndarray | None:
        """float32 ``(num_frames, feature_dim)``, or None if the cache lacks it for this frontend."""
        return self.cache.load_key(cache_key(utterance_id, self.metadata["frontend_hash"]))

    def load_many(self, utterance_ids) -> list[np.ndarray | None]:
        """:meth:`load` of each id, reading each needed row group once (grouped by part)."""
        return self.cache.load_many(utterance_ids, self.metadata["frontend_hash"])

    def __contains__(self, utterance_id: object) -> bool:
        if not isinstance(utterance_id, str):
            return False
        key = cache_key(utterance_id, self.metadata["frontend_hash"])
        return self.cache.shard_index_of(key).get(key) is not None

    def utterance_ids(self) -> list[str]:
        if self._ids is None:
            source = self.record_cache or default_record_cache(self.path)
            if not source.is_file():
                raise StoreError(f"{str(self.path)!r} stores hashed keys, so its utterance ids come from a record "
                                 f"cache, and {str(source)!r} does not exist: pass record_cache=<split>.jsonl")
            self._ids = [r["utterance_id"] for r in RecordStore(source) if r.get("utterance_id") in self]
        return list(self._ids)

    def close(self) -> None:
        self.cache.close()
        super().close()
