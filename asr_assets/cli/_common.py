"""What the commands share: the one-line-error parser, flag types, the frontend override flags,
output-folder checks and the Dagster instance.

Nothing heavy is imported here (``asr-assets --help`` must not load numpy, pyarrow or dagster).
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path
from typing import Iterable

from ..errors import ConfigError

DEBUG_HELP = "on an error, print the traceback too (default: one line on stderr)"
VERBOSE_HELP = "more log lines: -v debug, -vv trace (default: info, or $ASR_ASSETS_LOG)"


def one_line(text: object) -> str:
    """``text`` with every line break (and the blanks around it) folded into one space."""
    return re.sub(r"\s*[\r\n]+\s*", " ", str(text).strip())


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line on stderr (exit status 2), not usage + error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see '{self.prog} --help')\n")


def add_global_flags(parser: argparse.ArgumentParser, *, sub: bool) -> None:
    """``--debug`` and ``-v``/``--verbose``, accepted before and after the command name (after it,
    the values given there win)."""
    if sub:
        parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
        parser.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS, help=VERBOSE_HELP)
    else:
        parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
        parser.add_argument("-v", "--verbose", action="count", default=0, help=VERBOSE_HELP)


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value


def bool_value(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


bool_value.__name__ = "bool"  # argparse names the type in "invalid bool value: ..."


def workers(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of processes, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(
            f"must be at least 1, got {value} (leave --workers out to use every core)")
    return value


def count(minimum: int):
    """An argparse type: a whole number >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    parse.__name__ = "int"
    return parse


#: Defaults quoted in the override help, as ``(squeezeformer, zipformer)``; test_cli checks them
#: against the frontends' configs (kept here so ``--help`` needs no frontend import).
HELP_DEFAULTS = {
    "sample_rate": (16000, 16000), "n_fft": (400, 400), "win_length": (400, 400), "hop_length": (160, 160),
    "n_mels": (80, 80), "preemphasis": (0.97, 0.0), "normalize_signal": (True, False),
    "normalize_feature": (True, False), "normalize_per_frame": (False, False),
}
#: w2v-bert defaults of the flags it accepts (``--n-mels`` sets its ``feature_size``).
W2V_BERT_HELP_DEFAULTS = {"sample_rate": 16000, "n_mels": 80}
#: w2v-bert config defaults quoted by ``warm``'s ``--w2v-*`` help (test_upstream_cli checks them).
W2V_FLAG_DEFAULTS = {"model_source": "facebook/w2v-bert-2.0", "feature_size": 80, "stride": 2, "padding_value": 1.0}


def _default(key: str) -> str:
    squeeze, zip_ = HELP_DEFAULTS[key]
    text = lambda v: str(v).lower() if isinstance(v, bool) else str(v)  # noqa: E731
    return f"default: {text(squeeze)}" if squeeze == zip_ else f"default: squeezeformer {text(squeeze)}, zipformer {text(zip_)}"


#: flag -> (type, metavar, help); every flag sets the config field of the same name.
OVERRIDES = {
    "--sample-rate": (int, "HZ", "working sample rate in Hz; input at other rates is resampled "
                                 f"({_default('sample_rate')} Hz; every frontend)"),
    "--n-fft": (int, "N", "FFT size and frame length in samples, also sets --win-length unless given "
                          f"({_default('n_fft')} samples = 25 ms at 16 kHz)"),
    "--win-length": (int, "N", "Hann window length in samples, at most --n-fft, centred in the frame "
                               "(default: --n-fft)"),
    "--hop-length": (int, "N", f"frame shift in samples ({_default('hop_length')} samples = 10 ms at 16 kHz)"),
    "--n-mels": (int, "N", f"mel bands = feature columns ({_default('n_mels')}; w2v-bert: Kaldi bands, "
                           f"default: {W2V_BERT_HELP_DEFAULTS['n_mels']}, output twice as wide)"),
    "--preemphasis": (float, "C", "pre-emphasis coefficient c of y[n] = x[n] - c*x[n-1], in [0, 1], 0 turns it off "
                                  f"(unitless; {_default('preemphasis')})"),
    "--normalize-signal": (bool_value, "BOOL", "remove the waveform's mean and scale its peak to 1, true or false "
                                               f"({_default('normalize_signal')})"),
    "--normalize-feature": (bool_value, "BOOL", "standardize each mel column over time (zero mean, unit std), true "
                                                f"or false ({_default('normalize_feature')})"),
    "--normalize-per-frame": (bool_value, "BOOL", "with --normalize-feature, standardize each frame over its mel "
                                                  f"bands instead, true or false ({_default('normalize_per_frame')})"),
}


def add_override_flags(group) -> None:
    for flag, (kind, metavar, text) in OVERRIDES.items():
        group.add_argument(flag, type=kind, metavar=metavar, help=text)


def overrides_from_args(args: argparse.Namespace) -> dict:
    """``{config field: value}`` of the override flags given."""
    values = {flag[2:].replace("-", "_"): getattr(args, flag[2:].replace("-", "_")) for flag in OVERRIDES}
    return {k: v for k, v in values.items() if v is not None}


def check_output(path: Path, what: str = "--output") -> None:
    """Create the output folder ``path`` if needed and make sure files can be written in it.

    Raises:
        ConfigError: ``path`` is a file, cannot be created or is not writable (``what`` names
            where the path came from).
    """
    import tempfile

    if path.exists() and not path.is_dir():
        raise ConfigError(f"{what} {str(path)!r} is a file, not a folder; give a folder (it is created if missing)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{what} {str(path)!r} cannot be created: {exc.strerror or exc}") from exc
    try:
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise ConfigError(f"{what} {str(path)!r} is not writable: {exc.strerror or exc}") from exc


_INSTANCE_CONFIG = "telemetry:\n  enabled: false\n"
_INIT_LOCK = ".asr_assets_init.lock"


def dagster_home() -> str:
    """``DAGSTER_HOME`` (default ``./dagster_home``), created with a telemetry-off ``dagster.yaml``
    when new, and exported; checked before dagster is imported.

    Safe when several processes start on one fresh folder at once: ``mkdir`` tolerates the
    folder appearing, and ``dagster.yaml`` appears whole or not at all (written to a temporary
    file and hard-linked into place, which fails if another process got there first; an
    existing file is never overwritten).

    Raises:
        ConfigError: the folder or its config cannot be created.
    """
    from .._fs import remove_stale_tmp, tmp_path_for

    home = str(Path(os.environ.get("DAGSTER_HOME") or "dagster_home").resolve())
    config = Path(home) / "dagster.yaml"
    try:
        if Path(home).exists() and not Path(home).is_dir():
            raise NotADirectoryError(20, "is a file, not a folder")
        Path(home).mkdir(parents=True, exist_ok=True)
        if not config.exists():  # a fresh instance: local SQLite storage, no telemetry
            remove_stale_tmp(Path(home), prefix=config.name)  # of a process killed right here
            tmp = tmp_path_for(config)
            tmp.write_text(_INSTANCE_CONFIG, encoding="utf-8")
            try:
                os.link(tmp, config)
            except FileExistsError:
                pass  # another process wrote it first: same content, or the user's own
            except OSError:  # no hard links on this file system: an atomic replace, same content
                if not config.exists():
                    os.replace(tmp, config)
            finally:
                tmp.unlink(missing_ok=True)
    except OSError as exc:
        raise ConfigError(f"DAGSTER_HOME {home!r} cannot be used: {exc.strerror or exc}") from exc
    os.environ["DAGSTER_HOME"] = home
    return home


def dagster_instance():
    """The instance in ``DAGSTER_HOME`` (see :func:`dagster_home`).

    Dagster creates its SQLite tables when the instance is first opened and fails ("table runs
    already exists") when two processes do that at once on a fresh folder, so opening is
    serialized across processes by an ``flock`` on ``DAGSTER_HOME/.asr_assets_init.lock``
    (released when the storage exists; runs themselves are not serialized).
    """
    import dagster as dg

    from .._fs import file_lock

    home = dagster_home()
    with file_lock(Path(home) / _INIT_LOCK):
        return _instance_with_batched_events(home) or dg.DagsterInstance.get()


_STORAGE_KEYS = ("storage", "run_storage", "event_log_storage", "schedule_storage")


def _instance_with_batched_events(home: str):
    """The instance of ``home`` with :class:`asr_assets.defs.event_storage.BatchedSqliteEventLogStorage`
    as its event log, when its ``dagster.yaml`` leaves storage at the local SQLite default
    (else None: a configured storage, PostgreSQL say, is used as configured). Same files and
    tables as the default, so ``dagster dev`` reads them. Also sets ``DAGSTER_EVENT_BATCH_SIZE``
    when unset, which makes Dagster hand range-run events over in batches (to any storage)."""
    import dagster as dg
    import yaml
    from dagster._core.instance.config import dagster_instance_config
    from dagster._core.instance.ref import InstanceRef

    from ..defs import event_storage

    os.environ.setdefault("DAGSTER_EVENT_BATCH_SIZE", str(event_storage.DEFAULT_EVENT_BATCH_SIZE))
    config, custom_class = dagster_instance_config(home)
    if custom_class is not None or any(config.get(key) for key in _STORAGE_KEYS):
        return None
    default = InstanceRef.config_defaults(home)["event_log_storage"]
    ref = InstanceRef.from_dir(home, overrides={"event_log_storage": {
        "module": event_storage.MODULE, "class": event_storage.CLASS,
        "config": yaml.safe_load(default.config_yaml)}})
    return dg.DagsterInstance.from_ref(ref)


def configured_dagster_instance():
    """The Dagster instance when one is configured — ``DAGSTER_HOME`` set and an existing
    folder — else None (then nothing is imported: a script needs no ``DAGSTER_HOME``).

    Unlike :func:`dagster_instance` this never creates the folder.

    Raises:
        ConfigError: ``DAGSTER_HOME`` is set, exists and cannot be opened as an instance.
    """
    home = os.environ.get("DAGSTER_HOME")
    if not home or not Path(home).is_dir():
        return None
    import warnings

    from .._fs import file_lock

    try:
        import dagster as dg

        warnings.filterwarnings("ignore", category=dg.BetaWarning)
        warnings.filterwarnings("ignore", category=dg.PreviewWarning)
        with file_lock(Path(home) / _INIT_LOCK):
            return dg.DagsterInstance.get()
    except OSError as exc:
        raise ConfigError(f"DAGSTER_HOME {home!r} cannot be used: {exc.strerror or exc}") from exc
    except Exception as exc:  # noqa: BLE001 - a broken dagster.yaml: say so in one line, before any work
        raise ConfigError(f"DAGSTER_HOME {home!r} cannot be opened as a Dagster instance: "
                          f"{type(exc).__name__}: {exc}") from exc


def record_materializations(instance, events: Iterable[tuple[str, str | None, dict, dict | None]], command: str) -> int:
    """Record ``(asset name, partition key or None, metadata, tags)`` as runless materializations
    (``instance.report_runless_asset_event``), with ``asr/cli`` in the metadata; returns how many.

    Tags may hold ``dagster/data_version`` and, for a multi-partition key, its
    ``dagster/partition/<dimension>`` values.
    """
    import dagster as dg

    n = 0
    for asset, partition, metadata, tags in events:
        instance.report_runless_asset_event(dg.AssetMaterialization(
            asset_key=asset, partition=partition, metadata={**metadata, "asr/cli": command}, tags=tags or None))
        n += 1
    return n
