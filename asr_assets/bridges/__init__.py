"""Bridges to training toolkits: read the feature cache from lhotse and SpeechBrain.

Each bridge is one small module that imports its toolkit, so importing this package imports
neither, and nothing else in asr_assets imports a bridge: lhotse and SpeechBrain are never
hard dependencies (``pip install "asr_assets[lhotse]"`` / ``"asr_assets[speechbrain]"``).

    - :mod:`asr_assets.bridges.lhotse` — a registered lhotse ``FeaturesReader``, so
      ``cut.load_features()`` reads our cache (importing the module registers it), and
      :func:`~asr_assets.bridges.lhotse.export_cuts`, the library side of
      ``asr-assets export --backend lhotse``: a ``CutSet`` manifest (``.jsonl.gz``) whose
      ``Features`` point at the cache.
    - :mod:`asr_assets.bridges.speechbrain` — :class:`~asr_assets.bridges.speechbrain.FeaturePipeline`,
      a dynamic item ``id -> torch.float32 [frames, dims]`` for ``DynamicItemDataset``, and
      :func:`~asr_assets.bridges.speechbrain.speechbrain_data`, a record cache as the data dict
      such a dataset is built from.

Both read through the public readers only (:class:`asr_assets.feature_cache.ShardedParquetFeatureCache`
and :func:`asr_assets.stores.open_feature_store`), opened lazily once per process and thread,
so what they hand to DataLoader workers pickles without open files.
"""
