"""The ``asr-assets`` command line on a fresh machine: errors a user can act on, and a fast start.

Covers: every configuration error (an ``--output`` that is a file, cannot be created or is not
writable; ``--workers 0`` or negative; an unknown frontend, with a "did you mean" suggestion and
the available list; a missing manifest; an unusable ``DAGSTER_HOME``; ``compact`` without an
output folder) exits 2 with exactly one non-empty line on stderr naming the key facts, before
Dagster starts; ``--debug`` adds the traceback. A manifest without usable columns is a
file-level problem naming the file, the columns found and the accepted aliases: next to a good
manifest the run still caches the good one and reports the bad file; alone it gives "no records"
(exit 2, one line naming the manifests read and the reports). The help of every frontend
override flag states its unit and default (checked against the frontends' configs). Importing
the CLI and answering ``--help`` / ``frontends`` loads neither scipy.signal, dagster, polars nor
torch (checked in a fresh interpreter through ``sys.modules``; no wall-clock assertions). The
feature progress bar (tqdm, rate and ETA) goes to stderr only on a terminal or with
``--progress``, replaces the periodic log line, and a second materialize says "up to date".
The console entry (``console_main``, which skips the interpreter's teardown) keeps main's exit
status, all buffered output and the atexit handlers, and waits for a live non-daemon thread.
Ctrl-C exits 130 with one line, also when it lands inside a features run (which Dagster marks
failed; no run starts after it, and the same command again completes the cache).
"""

from __future__ import annotations

import io
import json
import pickle
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from asr_assets import cli
from asr_assets.cli import main as cli_main
from asr_assets.errors import ManifestColumnsError, ManifestError
from asr_assets.manifests import iter_manifest_rows
from asr_assets.record_cache import RecordStore
from asr_assets.settings import SPLITS

SAMPLE_CV = Path(cli.__file__).resolve().parent.parent / "sample_data" / "cv"
HEAVY = ("scipy.signal", "dagster", "polars", "torch")


def _error_line(capsys) -> str:
    """The only non-empty stderr line (asserts there is exactly one)."""
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture
def no_dagster(monkeypatch):
    """Fail the test if the CLI gets as far as running the graph."""

    def refuse(settings):
        raise AssertionError("materialize() was called: the error was not caught before Dagster")

    monkeypatch.setattr(cli, "materialize", refuse)


def _good_manifest(path: Path) -> Path:
    """One bundled clip (absolute path), Common Voice columns."""
    clip = SAMPLE_CV / "clips" / "arctic_a0007.flac"
    path.write_text("id\tpath\tsentence\tduration\tclient_id\n"
                    f"a0007\t{clip}\tAuthor of the danger trail, Philip Steels, etc.\t3.2\tarctic\n", encoding="utf-8")
    return path


def _bad_manifest(path: Path) -> Path:
    path.write_text("foo\tbar\n1\t2\n3\t4\n", encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- configuration errors


def test_output_that_is_a_file(tmp_path, capsys, no_dagster):
    target = tmp_path / "results.txt"
    target.write_text("not a folder")
    assert cli_main(["materialize", "--output", str(target)]) == 2
    line = _error_line(capsys)
    assert "results.txt" in line and "is a file, not a folder" in line and "Traceback" not in line


def test_output_that_cannot_be_created(tmp_path, capsys, no_dagster):
    (tmp_path / "plain").write_text("x")
    assert cli_main(["materialize", "--output", str(tmp_path / "plain" / "out")]) == 2
    line = _error_line(capsys)
    assert str(tmp_path / "plain" / "out") in line and "cannot be created" in line


def test_output_that_is_not_writable(tmp_path, capsys, no_dagster, monkeypatch):
    import tempfile

    def refuse(*args, **kwargs):  # chmod does not stop root, so refuse the probe file instead
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    assert cli_main(["materialize", "--output", str(tmp_path / "ro")]) == 2
    line = _error_line(capsys)
    assert str(tmp_path / "ro") in line and "not writable" in line and "Permission denied" in line


@pytest.mark.parametrize("value, expected", [("0", "at least 1, got 0"), ("-4", "at least 1, got -4"),
                                             ("many", "expected a whole number")])
def test_workers_must_be_positive(tmp_path, capsys, no_dagster, value, expected):
    with pytest.raises(SystemExit) as exited:
        cli_main(["materialize", "--output", str(tmp_path), "--workers", value])
    assert exited.value.code == 2
    line = _error_line(capsys)
    assert "--workers" in line and expected in line and "usage:" not in line


def test_argparse_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as exited:
        cli_main([])
    assert exited.value.code == 2
    assert "required" in _error_line(capsys)
    with pytest.raises(SystemExit):
        cli_main(["materialize", "--n-fft", "banana"])
    assert "--n-fft" in _error_line(capsys)


def test_unknown_frontend_suggests_and_lists(tmp_path, capsys, no_dagster):
    assert cli_main(["materialize", "--frontend", "squeezformer", "--output", str(tmp_path)]) == 2
    line = _error_line(capsys)
    assert "'squeezformer'" in line and "did you mean 'squeezeformer'?" in line
    assert "available frontends:" in line and "zipformer" in line and "ludwig-fbank" in line
    assert cli_main(["materialize", "--frontend", "no-such-frontend", "--output", str(tmp_path)]) == 2
    line = _error_line(capsys)
    assert "did you mean" not in line and "squeezeformer" in line


def test_missing_manifest_is_one_line(tmp_path, capsys, no_dagster):
    assert cli_main(["materialize", "--manifests", str(tmp_path / "nope"), "--output", str(tmp_path / "o")]) == 2
    line = _error_line(capsys)
    assert "does not exist" in line and "nope" in line


def test_unusable_dagster_home_is_one_line(tmp_path, capsys, monkeypatch):
    (tmp_path / "home").write_text("x")
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    assert cli_main(["materialize", "--manifests", str(_good_manifest(tmp_path / "m.tsv")),
                     "--output", str(tmp_path / "o")]) == 2
    line = capsys.readouterr().err.strip()
    assert "\n" not in line and "DAGSTER_HOME" in line and str(tmp_path / "home") in line


def test_compact_without_output_folder(tmp_path, capsys):
    assert cli_main(["compact", "--output", str(tmp_path / "none")]) == 2
    line = _error_line(capsys)
    assert "does not exist" in line and "none" in line
    assert cli_main(["compact", "--output", str(tmp_path), "--frontend", "zipformr"]) == 2
    assert "did you mean 'zipformer'?" in _error_line(capsys)


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback(tmp_path, capsys, no_dagster, where):
    target = tmp_path / "file"
    target.write_text("")
    args = ["materialize", "--output", str(target)]
    assert cli_main(["--debug", *args] if where == "before" else [*args, "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "ConfigError" in err
    assert err.strip().splitlines()[-1].startswith("asr-assets: error: ") and "is a file" in err


# ----------------------------------------------------------------------------- manifests without usable columns


def test_manifest_reader_reports_unusable_columns_per_file(tmp_path):
    bad = tmp_path / "m.parquet"
    pq.write_table(pa.table({"file": ["a.wav"], "Sentence": ["hi"]}), bad)
    with pytest.raises(ManifestColumnsError) as err:
        list(iter_manifest_rows([bad]))
    message = str(err.value)
    assert "m.parquet" in message and "found ['file', 'Sentence']" in message and "case-sensitive" in message
    for alias in ("sentence|transcript|transcription|text|normalized_text", "path|audio", "id|utterance_id"):
        assert alias in message
    assert err.value.missing == ("transcript", "audio") and err.value.found == ("file", "Sentence")
    assert isinstance(err.value, ManifestError)
    assert str(pickle.loads(pickle.dumps(err.value))) == message
    errors = []
    good = _good_manifest(tmp_path / "good.tsv")
    rows = list(iter_manifest_rows([bad, good], on_error=lambda m, n, e: errors.append((m, n, e))))
    assert [r.utterance_id for r in rows] == ["a0007"]
    assert [(m, n, type(e)) for m, n, e in errors] == [(str(bad), 0, ManifestColumnsError)]
    assert str(errors[0][2]) == message  # no "unreadable after 0 rows" prefix: it is not a read error


def test_comma_separated_tsv_gets_a_hint(tmp_path):
    path = tmp_path / "m.tsv"
    path.write_text("id,path,sentence\nu,a.wav,hi\n", encoding="utf-8")
    with pytest.raises(ManifestColumnsError, match="comma- or semicolon-separated"):
        list(iter_manifest_rows([path]))


def test_unusable_manifest_next_to_a_good_one_is_reported_and_the_run_goes_on(tmp_path, capsys):
    out = tmp_path / "out"
    (tmp_path / "bad").mkdir()
    bad = _bad_manifest(tmp_path / "bad" / "manifest.tsv")
    good = _good_manifest(tmp_path / "good.tsv")
    assert cli_main(["materialize", "--manifests", str(bad), "--manifests", str(good), "--output", str(out),
                     "--workers", "1"]) == 0
    captured = capsys.readouterr()
    assert "no usable columns" in captured.out  # summary names the problem
    assert [line for line in captured.err.splitlines() if line.strip()] == []  # not an error: exit 0
    records = [r["utterance_id"] for s in SPLITS for r in RecordStore(out / "record_cache" / f"{s}.jsonl")]
    assert records == ["a0007"]
    for split in SPLITS:
        entries = [json.loads(line) for line in (out / "reports" / f"records-{split}.jsonl").read_text().splitlines()]
        assert len(entries) == 1, entries
        (entry,) = entries
        assert entry["manifest"] == str(bad) and entry["utterance_id"] is None and entry["stage"] == "manifest"
        assert "no usable columns" in entry["error"] and "found ['foo', 'bar']" in entry["error"]
        assert "path|audio" in entry["error"]


def test_manifests_that_give_no_record_exit_2_with_one_line(tmp_path, capsys):
    out = tmp_path / "out"
    bad = _bad_manifest(tmp_path / "bad.tsv")
    assert cli_main(["materialize", "--manifests", str(bad), "--output", str(out), "--workers", "1"]) == 2
    line = _error_line(capsys)
    assert line.startswith("asr-assets: error: no records to cache")
    assert str(bad) in line and "1 with a file-level problem" in line
    assert f"first {bad}: " in line and "found ['foo', 'bar']" in line and "path|audio" in line  # the columns
    assert str(out / "reports" / "records-{train,validation,test}.jsonl") in line
    assert not (out / "feature-cache").exists()  # nothing to featurize: the feature runs are skipped
    report = (out / "reports" / "records-train.jsonl").read_text()
    assert "no usable columns" in report


# ----------------------------------------------------------------------------- help and fast start


def test_every_override_flag_has_help_with_unit_and_default():
    parser = cli._parser()
    materialize = next(a for a in parser._subparsers._group_actions[0].choices.values() if a.prog.endswith("materialize"))
    helps = {a.option_strings[0]: a.help or "" for a in materialize._actions if a.option_strings}
    for flag in cli._OVERRIDES:
        text = helps[flag]
        assert "default" in text, flag
        assert any(unit in text for unit in ("samples", "Hz", "unitless", "true or false", "bands")), flag
    assert not [f for f in helps if f.startswith("--w2v-") and "default" not in helps[f]]


def test_help_defaults_match_the_frontend_configs():
    from asr_assets.frontends.logmel import SQUEEZEFORMER_CONFIG, ZIPFORMER_CONFIG
    from asr_assets.frontends.w2v_bert import W2VBertConfig

    for key, (squeeze, zip_) in cli.HELP_DEFAULTS.items():
        assert getattr(SQUEEZEFORMER_CONFIG, key) == squeeze and getattr(ZIPFORMER_CONFIG, key) == zip_, key
    w2v = W2VBertConfig()
    assert cli.W2V_BERT_HELP_DEFAULTS == {"sample_rate": w2v.sample_rate, "n_mels": w2v.feature_size}


def test_lazy_registry_matches_the_frontend_modules():
    from asr_assets.frontends import LUDWIG_FEATURE_TYPES, LudwigFrontend, get_frontend, ludwig

    assert LUDWIG_FEATURE_TYPES == ludwig.FEATURE_TYPES
    for name, factory in ludwig.FACTORIES.items():
        fe = get_frontend(name)
        assert isinstance(fe, LudwigFrontend) and fe.frontend_hash() == factory().frontend_hash()


def test_frontends_lists_names_dims_and_hashes(capsys):
    assert cli_main(["frontends"]) == 0
    out = capsys.readouterr().out
    assert "squeezeformer    dim 80    hash 0a48384efcf3" in out and "w2v-bert         dim 160   hash c62e513533e1" in out
    assert "ludwig-fbank" in out


@pytest.mark.parametrize("argv, also_absent", [
    (["--help"], ("numpy", "scipy", "pyarrow")),  # --help needs nothing but argparse
    (["frontends"], ()),
])
def test_start_up_imports_nothing_heavy(argv, also_absent):
    code = (
        "import sys, json, asr_assets.cli\n"
        "try:\n"
        f"    status = asr_assets.cli.main({argv!r})\n"
        "except SystemExit as exc:\n"
        "    status = exc.code\n"
        f"print(json.dumps([status, sorted(m for m in {[*HEAVY, *also_absent]!r} if m in sys.modules)]))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    status, loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert status in (0, None) and loaded == []



def _console(argv: list[str], *, prologue: str = "") -> subprocess.CompletedProcess:
    """``console_main()`` (the ``asr-assets`` script, ``python -m asr_assets.cli``) in a fresh
    interpreter with stdout and stderr on pipes (block-buffered: nothing flushed by a newline)."""
    code = f"{prologue}import sys\nsys.argv = ['asr-assets', *{argv!r}]\nfrom asr_assets.cli import console_main\nconsole_main()\n"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_console_exit_keeps_the_status_the_output_and_the_exit_handlers(tmp_path, capsys):
    """The console entry ends with os._exit after main(): the status is main's, buffered output
    is all there, and atexit handlers (logging shutdown, multiprocessing clean-up, the user's)
    still run, after the command's output."""
    assert cli_main(["frontends"]) == 0
    listing = capsys.readouterr().out
    result = _console(["frontends"], prologue="import atexit\natexit.register(print, 'exit handler ran')\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == listing + "exit handler ran\n"
    missing = tmp_path / "nope"
    result = _console(["materialize", "--manifests", str(missing), "--output", str(tmp_path / "out")])
    assert result.returncode == 2 and result.stdout == ""
    assert [line for line in result.stderr.splitlines() if line.strip()] == [
        f"asr-assets: error: manifest source '{missing}' does not exist"]
    result = _console(["materialize", "--workers", "0"])  # argparse's own exit (SystemExit) is kept
    assert result.returncode == 2 and "--workers" in result.stderr


def test_console_exit_waits_for_a_live_thread():
    """A non-daemon thread still running when main() returns is waited for, as a normal exit
    does: its output is not cut off."""
    prologue = ("import threading, time\n"
                "threading.Thread(target=lambda: (time.sleep(0.5), print('thread done', flush=True))).start()\n")
    result = _console(["frontends"], prologue=prologue)
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith("thread done\n")


# ----------------------------------------------------------------------------- progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_on_a_terminal_replaces_the_periodic_log_line(tmp_path):
    from asr_assets.pipeline import build_feature_shards, build_record_cache, progress_bars
    from asr_assets.settings import Settings, bundled_sample_manifests

    settings = Settings(manifests=tuple(bundled_sample_manifests()), output=str(tmp_path / "out"), workers=1)
    build_record_cache(settings, "train")
    plain, lines = io.StringIO(), []
    with progress_bars(file=plain):  # not a terminal: no bar, a log line per interval (0 s: every utterance)
        stats = build_feature_shards(settings, "squeezeformer", "train", range(32), log=lines.append, log_every_s=0)
    computed = sum(s.computed for s in stats.values())
    assert plain.getvalue() == "" and computed > 1
    assert lines == [f"squeezeformer[train]: {i}/{computed} utterances featurized" for i in range(1, computed + 1)]
    terminal, lines = _Terminal(), []
    with progress_bars(file=terminal):
        stats = build_feature_shards(settings, "squeezeformer", "train", range(32, 64), log=lines.append, log_every_s=0)
    computed = sum(s.computed for s in stats.values())
    assert lines == [f"squeezeformer[train]: {computed}/{computed} utterances featurized"]  # the final line only
    bar = terminal.getvalue().split("\r")[-1]
    assert bar.startswith("squeezeformer[train]: 100%") and f"{computed}/{computed}" in bar and "utt/s" in bar
    quiet = _Terminal()
    with progress_bars(enabled=False, file=quiet):  # --no-progress; and nothing left to do
        build_feature_shards(settings, "squeezeformer", "train", range(64))
    assert quiet.getvalue() == ""


def test_materialize_progress_goes_to_stderr_and_a_no_op_says_up_to_date(tmp_path, capsys):
    args = ["materialize", "--manifests", str(_good_manifest(tmp_path / "m.tsv")), "--output", str(tmp_path / "out"),
            "--workers", "1"]
    assert cli_main([*args, "--progress"]) == 0  # forced: stderr is not a terminal here
    captured = capsys.readouterr()
    bar = captured.err.split("\r")[-1].strip()
    assert bar.startswith("squeezeformer[") and "100%" in bar and "1/1" in bar and "utt/s" in bar
    assert "utt/s" not in captured.out and "1/1 utterances featurized" in captured.out
    assert cli_main(args) == 0
    captured = capsys.readouterr()
    assert "asr-assets: up to date (" in captured.out and "no run started" in captured.out
    assert captured.err == ""


def test_ctrl_c_exits_130_with_one_line_and_no_traceback(tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "materialize", interrupted)
    assert cli_main(["materialize", "--output", str(tmp_path / "out"), "--workers", "1"]) == 130
    line = _error_line(capsys)
    assert line.startswith("asr-assets: interrupted;") and "run the same command again" in line


def test_ctrl_c_during_a_features_run_stops_the_command_with_130(tmp_path):
    """SIGINT (``kill -INT <pid>``; Ctrl-C in a terminal sends the same to the whole process
    group) while a features run computes: Dagster turns it into a failed run and returns; the
    command stops there (no summary run), says "interrupted" in one stderr line, exits 130, and
    the same command run again completes what is left. The signal goes to the main process only:
    sent to the group, it also reaches the compute-log watcher processes Dagster starts beside a
    run, which print KeyboardInterrupt tracebacks of their own, interleaved (see the README)."""
    import os
    import signal
    import time

    import dagster as dg
    import numpy as np

    import asr_assets_tests.plugin_slow  # noqa: F401 - registers slow-energy here too
    from asr_assets.audio import load_audio
    from asr_assets.feature_cache import ShardedParquetFeatureCache
    from asr_assets.settings import bundled_sample_manifests
    from asr_assets_tests.plugin_example import frame_energy

    started = tmp_path / "started"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("ASR_ASSETS_")},  # DAGSTER_HOME: the test's own
           "ASR_ASSETS_TEST_STARTED": str(started),  # the plugin's module is found from the repo root:
           "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")]))}
    argv = [sys.executable, "-m", "asr_assets.cli", "materialize", "--manifests", bundled_sample_manifests()[1],
            "--output", str(tmp_path / "out"), "--plugin", "asr_assets_tests.plugin_slow", "--frontend", "slow-energy",
            "--workers", "1"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=tmp_path, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not started.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert started.exists(), proc.communicate(timeout=60)
        os.kill(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err
    assert [line for line in err.splitlines() if line.strip()] == [
        "asr-assets: interrupted; what was written is complete (every file appears atomically): run the same "
        "command again to go on"]
    assert "RUN_FAILURE" in out  # Dagster's log of the interrupted run, on stdout
    jobs = sorted(r.job_name for r in dg.DagsterInstance.get().get_runs())
    assert jobs == ["features_job", "record_cache_job"]  # no summary run after the interrupted one
    again = subprocess.run(argv, capture_output=True, text=True, env={**env, "ASR_ASSETS_TEST_PAUSE_S": "0"},
                           cwd=tmp_path, timeout=300)
    assert again.returncode == 0, again.stderr
    n = 0
    for split in SPLITS:
        cache = ShardedParquetFeatureCache(tmp_path / "out" / "feature-cache" / split)
        for record in RecordStore(tmp_path / "out" / "record_cache" / f"{split}.jsonl"):
            feats = cache.load(record["utterance_id"], frontend="slow-energy")
            np.testing.assert_allclose(feats, frame_energy(load_audio(record["audio_path"])), atol=1e-6)
            n += 1
    assert n == 8
