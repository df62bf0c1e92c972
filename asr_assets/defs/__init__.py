"""The Dagster layer: partitions, resources, assets, checks and sensors over :mod:`asr_assets`.

Thin by design: every asset reads its partition and settings, calls one function of
:mod:`asr_assets.pipeline`, and reports metadata. No DSP or file-format code lives here.
"""
