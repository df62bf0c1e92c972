"""The run settings as a Dagster resource (launchpad-editable), converted to library Settings."""

from typing import List, Optional

import dagster as dg

from asr_assets.settings import Settings

#: Settings fields a run may change (frontends are not: they decide which assets exist).
RESOURCE_FIELDS = (
    "manifests", "output", "source_base", "validation_manifests", "workers", "ffmpeg_fallback", "max_decode_s",
    "duration_tolerance", "fail_fast", "require_readable_audio", "rows_per_part", "confine_audio_paths",
    "allowed_audio_roots", "max_blob_mb", "utterance_timeout_s", "timeout_per_audio_s",
)


class AsrAssetsConfig(dg.ConfigurableResource):
    """Where the manifests are, where the caches go, and how hard to work.

    Defaults come from :meth:`asr_assets.settings.Settings.from_env` when the definitions are
    loaded (``ASR_ASSETS_MANIFESTS``, ``ASR_ASSETS_OUTPUT``, ``ASR_ASSETS_WORKERS``); any field
    can be overridden per run from the launchpad under ``resources.asr_config.config``. The
    fields mean what the same-named :class:`~asr_assets.settings.Settings` attributes mean.
    """

    manifests: List[str]
    output: str = "artifacts"
    source_base: Optional[str] = None
    validation_manifests: List[str] = []
    workers: int = 0
    ffmpeg_fallback: bool = True
    max_decode_s: float = 60.0
    duration_tolerance: Optional[float] = 0.1
    fail_fast: bool = False
    require_readable_audio: bool = True
    rows_per_part: int = 256
    confine_audio_paths: bool = False
    allowed_audio_roots: List[str] = []
    max_blob_mb: Optional[float] = 100.0
    utterance_timeout_s: Optional[float] = 60.0
    timeout_per_audio_s: float = 10.0

    @classmethod
    def from_settings(cls, settings: Settings) -> "AsrAssetsConfig":
        values = {name: getattr(settings, name) for name in RESOURCE_FIELDS}
        return cls(**{k: list(v) if isinstance(v, tuple) else v for k, v in values.items()})

    def settings(self, frontends: tuple[str, ...] = ("squeezeformer",)) -> Settings:
        values = {name: getattr(self, name) for name in RESOURCE_FIELDS}
        return Settings(frontends=frontends, **{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
