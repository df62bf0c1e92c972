"""The run settings as a Dagster resource (launchpad-editable), converted to library Settings."""

from typing import List, Optional

import dagster as dg

from asr_assets.settings import Settings


class AsrAssetsConfig(dg.ConfigurableResource):
    """Where the manifests are, where the caches go, and how hard to work.

    Defaults come from :meth:`asr_assets.settings.Settings.from_env` when the definitions are
    loaded (``ASR_ASSETS_MANIFESTS``, ``ASR_ASSETS_OUTPUT``, ``ASR_ASSETS_WORKERS``); any field
    can be overridden per run from the launchpad under ``resources.asr_config.config``.
    """

    manifests: List[str]
    output: str = "artifacts"
    source_base: Optional[str] = None
    validation_manifests: List[str] = []
    workers: int = 0
    ffmpeg_fallback: bool = True
    max_decode_s: float = 60.0
    fail_fast: bool = False
    require_readable_audio: bool = True
    rows_per_part: int = 256
    confine_audio_paths: bool = False
    allowed_audio_roots: List[str] = []

    @classmethod
    def from_settings(cls, settings: Settings) -> "AsrAssetsConfig":
        return cls(
            manifests=list(settings.manifests), output=settings.output, source_base=settings.source_base,
            validation_manifests=list(settings.validation_manifests), workers=settings.workers, ffmpeg_fallback=settings.ffmpeg_fallback, max_decode_s=settings.max_decode_s,
            fail_fast=settings.fail_fast, require_readable_audio=settings.require_readable_audio,
            rows_per_part=settings.rows_per_part, confine_audio_paths=settings.confine_audio_paths,
            allowed_audio_roots=list(settings.allowed_audio_roots),
        )

    def settings(self, frontends: tuple[str, ...] = ("squeezeformer",)) -> Settings:
        return Settings(
            manifests=tuple(self.manifests), output=self.output, frontends=frontends, source_base=self.source_base,
            validation_manifests=tuple(self.validation_manifests), workers=self.workers, ffmpeg_fallback=self.ffmpeg_fallback, max_decode_s=self.max_decode_s,
            fail_fast=self.fail_fast, require_readable_audio=self.require_readable_audio,
            rows_per_part=self.rows_per_part, confine_audio_paths=self.confine_audio_paths,
            allowed_audio_roots=tuple(self.allowed_audio_roots),
        )
