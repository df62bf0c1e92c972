"""asr_assets: precomputed record and feature caches for ASR training, as a Dagster asset graph.

The library (this package minus ``asr_assets.defs`` and ``asr_assets.definitions``) works
without Dagster. Public entry points:

    - :func:`compute_features` — float32 ``[frames, dims]`` of one utterance for a frontend.
    - :class:`ShardedParquetFeatureCache` — read cached features by utterance id.
    - :class:`RecordStore` — read a record cache split (``len``, indexing).
    - :mod:`asr_assets.pipeline` — build the caches from Python.

The names above are loaded on first access, so ``import asr_assets.cli`` (and ``asr-assets
--help``) does not pay for numpy, pyarrow or scipy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._lazy import lazy_getattr

if TYPE_CHECKING:
    from .feature_cache import ShardedParquetFeatureCache
    from .frontends import available_frontends, compute_features, get_frontend
    from .record_cache import RecordStore

__all__ = ["compute_features", "ShardedParquetFeatureCache", "RecordStore", "get_frontend", "available_frontends"]
__version__ = "0.1.0"

#: public name -> submodule that defines it (imported on first access)
_LAZY = {
    "compute_features": "frontends",
    "get_frontend": "frontends",
    "available_frontends": "frontends",
    "ShardedParquetFeatureCache": "feature_cache",
    "RecordStore": "record_cache",
}


__getattr__ = lazy_getattr(__name__, _LAZY)


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
