"""asr_assets: precomputed record and feature caches for ASR training, as a Dagster asset graph.

The library (this package minus ``asr_assets.defs`` and ``asr_assets.definitions``) works
without Dagster. Public entry points:

    - :func:`compute_features` — float32 ``[frames, dims]`` of one utterance for a frontend.
    - :class:`ShardedParquetFeatureCache` — read cached features by utterance id.
    - :class:`RecordStore` — read a record cache split (``len``, indexing).
    - :mod:`asr_assets.pipeline` — build the caches from Python.
"""

from .feature_cache import ShardedParquetFeatureCache
from .frontends import available_frontends, compute_features, get_frontend
from .record_cache import RecordStore

__all__ = ["compute_features", "ShardedParquetFeatureCache", "RecordStore", "get_frontend", "available_frontends"]
__version__ = "0.1.0"
