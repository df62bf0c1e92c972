"""Exception hierarchy of asr_assets: one base class, one subclass per pipeline stage.

Every error names the offending source (file, utterance id, frontend) and the reason, so a
report line is enough to find and fix the input.
"""

from __future__ import annotations


class AsrAssetsError(Exception):
    """Base class of every error raised by asr_assets."""


class ConfigError(AsrAssetsError, ValueError):
    """A setting is invalid (bad path, unknown option, out-of-range value)."""


class ManifestError(AsrAssetsError):
    """A manifest file cannot be found, read or understood."""


class ManifestColumnsError(ManifestError):
    """A manifest file lacks the columns a record needs (a transcript and an audio column), so
    none of its rows can be used.

    Attributes:
        path: the manifest file.
        found: its column names, in file order.
        missing: what it lacks, e.g. ``("transcript", "audio")``.
    """

    def __init__(self, message: str, path: str = "", found: tuple[str, ...] = (), missing: tuple[str, ...] = ()):
        self.path = path
        self.found = tuple(found)
        self.missing = tuple(missing)
        super().__init__(message)

    def __reduce__(self):  # picklable with its attributes
        return type(self), (str(self), self.path, self.found, self.missing)


class AudioDecodeError(AsrAssetsError):
    """Audio could not be decoded or resampled.

    Attributes:
        source: path or ``"<bytes>"`` description of the audio that failed.
        reason: human-readable reason (every backend's failure when all failed).
    """

    def __init__(self, source: str, reason: str):
        self.source = source
        self.reason = reason
        super().__init__(f"cannot decode audio {source!r}: {reason}")


class FeatureConfigError(AsrAssetsError, ValueError):
    """A frontend configuration or input is invalid (e.g. too few samples to make a frame)."""


class UnknownFrontendError(FeatureConfigError, KeyError):
    """A frontend name is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class CacheCorruptError(AsrAssetsError):
    """A cache file (record-cache sidecar, feature payload) is inconsistent or truncated."""
