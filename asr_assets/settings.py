"""Project settings: embedded defaults, environment variables, output layout.

Entry points:
    - :class:`Settings` — every setting of a run, with defaults.
    - :meth:`Settings.from_env` — defaults overridden by ``ASR_ASSETS_*`` variables.
    - :func:`bundled_sample_manifests` — the sample corpus shipped in the package.

Environment variables (read when called, never at import time):

=========================  ==================================================  ===========================
variable                   meaning                                             default
=========================  ==================================================  ===========================
``ASR_ASSETS_MANIFESTS``   manifest files/folders/URLs joined by ``os.pathsep`` the bundled sample
``ASR_ASSETS_OUTPUT``      output root (a folder, or a URL: ``s3://b/prefix``)  ``artifacts/``
``ASR_ASSETS_FRONTENDS``   comma list of frontends                             ``squeezeformer``
``ASR_ASSETS_WORKERS``     feature-extraction processes                        every core
``ASR_ASSETS_CONFINE_AUDIO`` ``1``: audio paths must stay inside the roots       off
``ASR_ASSETS_PLUGINS``     comma list of modules that register frontends       none
``ASR_ASSETS_FRONTEND_OVERRIDES`` JSON ``{"squeezeformer": {"n_fft": 512}}``    none
``ASR_ASSETS_MAX_BLOB_MB`` largest embedded audio blob / local audio file, MiB    ``100``
=========================  ==================================================  ===========================

Output layout under ``output``::

    record_cache/<split>.jsonl (+ sidecars, <split>_audio_blobs/)
    feature-cache/<split>/feature_shards/features_NN/part_*.parquet
    reports/records-<split>.jsonl, reports/<frontend>/<split>/shard_NN.jsonl
"""

from __future__ import annotations

import importlib
import json
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from .errors import ConfigError

SPLITS = ("train", "validation", "test")
DEFAULT_FRONTENDS = ("squeezeformer",)


def bundled_sample_manifests() -> list[str]:
    """The sample corpus shipped inside the package: a Parquet folder and a TSV folder."""
    root = Path(__file__).resolve().parent / "sample_data"
    return [str(root / "hf"), str(root / "cv")]


def _split_sources(value: str) -> list[str]:
    """``os.pathsep``-joined sources; a ``:`` that starts ``://`` (``s3://b/m:/data/cv``) is part
    of a URL, not a separator."""
    if os.pathsep != ":":
        return value.split(os.pathsep)
    return re.split(r":(?!//)", value)


@dataclass(frozen=True)
class Settings:
    """Settings of one materialization.

    Attributes:
        manifests: manifest files or folders (several roots at once).
        output: output root folder.
        frontends: enabled frontend names (registry names of :mod:`asr_assets.frontends`).
        frontend_overrides: ``{frontend: {setting: value}}`` config overrides, as the upstream
            CLI's ``--n-fft`` etc.; they change the frontend's config repr and so its cache key.
        plugins: modules imported before frontends are looked up, so that frontends they
            register with :func:`asr_assets.frontends.register_frontend` can be enabled.
        source_base: base folder of relative audio paths instead of each manifest root.
        validation_manifests: external validation sources (upstream ``--validation-dataset-source``):
            when given, every usable row of ``manifests`` goes to train, every usable row of these
            to validation, and test is empty.
        workers: feature-extraction processes (0 = every core).
        num_shards: feature shards per split.
        rows_per_part: rows per Parquet part.
        ffmpeg_fallback: decode with PyAV (FFmpeg libraries) what libsndfile cannot.
        max_decode_s: audio longer than this (seconds) is refused before it is held in memory.
        duration_tolerance: relative mismatch allowed between decoded audio and the record's
            duration (plus 0.5 s); a truncated file is then reported instead of being cached
            with a transcript it does not contain. None: no check.
        fail_fast: stop at the first failing utterance instead of reporting it.
        require_readable_audio: drop rows whose audio file does not exist (reported).
        confine_audio_paths: accept only audio paths inside ``allowed_audio_roots`` (default: the
            manifest roots; a manifest file's root is its folder); the rest is reported.
        allowed_audio_roots: folders audio may come from when ``confine_audio_paths`` is set.
        max_blob_mb: largest audio a record may have, in MiB (2**20 bytes): an embedded blob
            (Parquet ``audio.bytes``) over it is refused from its length, before it is read into
            memory, and a local audio file over it is refused from its size; both are reported
            per row. None or ``inf``: no limit.
        utterance_timeout_s: wall-clock floor of each utterance's decode + features, seconds;
            a worker that overruns its limit is killed and replaced and the utterance is reported
            with stage ``timeout``. None: no limit.
        timeout_per_audio_s: seconds allowed per second of audio above the floor (the limit is
            ``max(utterance_timeout_s, timeout_per_audio_s * min(duration, max_decode_s))``).
        record_cache_dir: folder of the record cache instead of ``<output>/record_cache``
            (upstream ``record-cache --record-cache-dir``). None: ``<output>/record_cache``.
        record_options: :class:`~asr_assets.records.RecordConfig` fields to change (upstream
            ``record-cache`` flags: ``seed``, ``val_fraction``, filter bounds, ``lowercase`` ...),
            plus ``max_records``, ``{split: cap}`` (upstream ``--max-train-samples`` /
            ``--max-val-samples``: manifests are read in order until a split has that many).
    """

    manifests: tuple[str, ...] = field(default_factory=lambda: tuple(bundled_sample_manifests()))
    output: str = "artifacts"
    frontends: tuple[str, ...] = DEFAULT_FRONTENDS
    frontend_overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    plugins: tuple[str, ...] = ()
    source_base: str | None = None
    validation_manifests: tuple[str, ...] = ()
    workers: int = 0
    num_shards: int = 64
    rows_per_part: int = 256
    ffmpeg_fallback: bool = True
    max_decode_s: float = 60.0
    duration_tolerance: float | None = 0.1
    fail_fast: bool = False
    require_readable_audio: bool = True
    confine_audio_paths: bool = False
    allowed_audio_roots: tuple[str, ...] = ()
    max_blob_mb: float | None = 100.0
    utterance_timeout_s: float | None = 60.0
    timeout_per_audio_s: float = 10.0
    record_cache_dir: str | None = None
    record_options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.manifests:
            raise ConfigError("no manifest source given")
        if not self.frontends:
            raise ConfigError("no frontend enabled")
        if not 1 <= self.num_shards <= 100:
            raise ConfigError(f"num_shards must be in [1, 100], got {self.num_shards!r}")
        if self.workers < 0 or self.rows_per_part < 1:
            raise ConfigError("workers must be >= 0 and rows_per_part >= 1")
        if self.utterance_timeout_s == float("inf"):  # inf (env or flag) means no limit
            object.__setattr__(self, "utterance_timeout_s", None)
        if self.max_blob_mb is not None and not self.max_blob_mb > 0:
            raise ConfigError(f"max_blob_mb must be > 0 MiB (or None / inf for no limit), got {self.max_blob_mb!r}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides) -> "Settings":
        """Defaults, then ``ASR_ASSETS_*`` variables, then keyword overrides (None ignored)."""
        env = os.environ if environ is None else environ
        values: dict = {}
        if env.get("ASR_ASSETS_MANIFESTS"):
            values["manifests"] = tuple(p for p in _split_sources(env["ASR_ASSETS_MANIFESTS"]) if p)
        if env.get("ASR_ASSETS_OUTPUT"):
            values["output"] = env["ASR_ASSETS_OUTPUT"]
        if env.get("ASR_ASSETS_FRONTENDS"):
            values["frontends"] = tuple(f.strip() for f in env["ASR_ASSETS_FRONTENDS"].split(",") if f.strip())
        if env.get("ASR_ASSETS_PLUGINS"):
            values["plugins"] = tuple(m.strip() for m in env["ASR_ASSETS_PLUGINS"].split(",") if m.strip())
        if env.get("ASR_ASSETS_FRONTEND_OVERRIDES"):
            try:
                values["frontend_overrides"] = json.loads(env["ASR_ASSETS_FRONTEND_OVERRIDES"])
            except json.JSONDecodeError as exc:
                raise ConfigError(f"ASR_ASSETS_FRONTEND_OVERRIDES is not JSON: {exc}") from exc
        if env.get("ASR_ASSETS_CONFINE_AUDIO"):
            values["confine_audio_paths"] = env["ASR_ASSETS_CONFINE_AUDIO"].lower() in ("1", "true", "yes")
        if env.get("ASR_ASSETS_WORKERS"):
            try:
                values["workers"] = int(env["ASR_ASSETS_WORKERS"])
            except ValueError as exc:
                raise ConfigError(f"ASR_ASSETS_WORKERS must be an integer, got {env['ASR_ASSETS_WORKERS']!r}") from exc
        if env.get("ASR_ASSETS_MAX_BLOB_MB"):
            try:
                values["max_blob_mb"] = float(env["ASR_ASSETS_MAX_BLOB_MB"])
            except ValueError as exc:
                raise ConfigError(f"ASR_ASSETS_MAX_BLOB_MB must be a number of MiB, got {env['ASR_ASSETS_MAX_BLOB_MB']!r}") from exc
        for var, name in (("ASR_ASSETS_UTTERANCE_TIMEOUT_S", "utterance_timeout_s"),
                          ("ASR_ASSETS_TIMEOUT_PER_AUDIO_S", "timeout_per_audio_s")):
            if env.get(var):
                try:
                    values[name] = float(env[var])
                except ValueError as exc:
                    raise ConfigError(f"{var} must be a number of seconds, got {env[var]!r}") from exc
        values.update({k: (tuple(v) if isinstance(v, list) else v) for k, v in overrides.items() if v is not None})
        return cls(**values)

    def with_(self, **changes) -> "Settings":
        return replace(self, **changes)

    def load_plugins(self) -> None:
        """Import :attr:`plugins` (each registers its frontends on import).

        Raises:
            ConfigError: a plugin module cannot be imported.
        """
        for module in self.plugins:
            try:
                importlib.import_module(module)
            except ImportError as exc:
                raise ConfigError(f"cannot import frontend plugin {module!r}: {exc}") from exc

    def frontend(self, name: str):
        """The enabled frontend ``name`` with its overrides (plugins loaded first).

        Raises:
            UnknownFrontendError, FeatureConfigError: unknown name or override.
        """
        from .frontends import get_frontend

        self.load_plugins()
        return get_frontend(name, **dict(self.frontend_overrides.get(name, {})))

    # --- layout -------------------------------------------------------------------------
    @property
    def output_path(self) -> Path:
        """The output root: a resolved local :class:`~pathlib.Path`, or for a URL output
        (``s3://bucket/prefix``, ``gs://...``) a :class:`upath.UPath` of it (same path API;
        the writers detect it and use the object-store commit protocols)."""
        from .storage import is_url, upath

        return upath(self.output.rstrip("/")) if is_url(self.output) else Path(self.output).resolve()

    @property
    def output_is_remote(self) -> bool:
        """Whether the output root (or the record cache folder) is on an object store."""
        from .storage import is_url

        return is_url(self.output) or is_url(self.record_cache_dir)

    def record_cache_path(self, split: str) -> Path:
        if self.record_cache_dir is not None:
            from .storage import is_url, upath

            if is_url(self.record_cache_dir):
                return upath(self.record_cache_dir.rstrip("/")) / f"{split}.jsonl"
            return Path(self.record_cache_dir).resolve() / f"{split}.jsonl"
        return self.output_path / "record_cache" / f"{split}.jsonl"

    def feature_split_root(self, split: str) -> Path:
        return self.output_path / "feature-cache" / split

    def records_report_path(self, split: str) -> Path:
        return self.output_path / "reports" / f"records-{split}.jsonl"

    def features_report_path(self, frontend: str, split: str, shard: int) -> Path:
        return self.output_path / "reports" / frontend / split / f"shard_{shard:02d}.jsonl"

    def audio_roots(self) -> tuple[str, ...] | None:
        """Folders audio paths must stay in, or None when paths are not confined."""
        if not self.confine_audio_paths:
            return None
        if self.allowed_audio_roots:
            return self.allowed_audio_roots
        roots = (*self.manifests, *self.validation_manifests)
        return tuple(str(Path(r).resolve() if Path(r).is_dir() else Path(r).resolve().parent) for r in roots)

    @property
    def max_blob_bytes(self) -> int | None:
        """:attr:`max_blob_mb` in bytes, or None for no limit."""
        if self.max_blob_mb is None or self.max_blob_mb == float("inf"):
            return None
        return int(self.max_blob_mb * 2**20)

    @property
    def effective_workers(self) -> int:
        """``workers``, or the CPUs this process may run on (cpuset/affinity aware; a container's
        CPU *quota* is not visible here, so set ``ASR_ASSETS_WORKERS`` in run pods)."""
        return self.workers or len(os.sched_getaffinity(0)) or 1
