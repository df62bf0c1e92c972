"""Bounded time and process hygiene of feature extraction: an utterance whose decoder or frontend
hangs (a FIFO that never delivers data, a frontend stuck in C code holding the GIL) costs one
"timeout" report while every other utterance of its shard gets the features of a run without it,
with 1 or 2 workers; a worker killed from outside once, or the fork server killed, costs no
utterance; one worker runs in a worker process (bounded) unless the limit is off; when
the main process is killed with SIGKILL its fork server and workers are gone within seconds, even
while the workers are stuck holding the GIL; the exit of the thread that started the fork server
does not take the fork server down."""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from asr_assets.audio import load_audio
from asr_assets.errors import ConfigError
from asr_assets.extraction import ExtractionConfig, extract_shards
from asr_assets.frontends.logmel import SQUEEZEFORMER_CONFIG, LogMelFrontend
from asr_assets.pipeline import build_record_cache
from asr_assets.record_cache import RecordStore
from asr_assets.settings import Settings, bundled_sample_manifests
from asr_assets_tests.conftest import REPO, require_test_data

CLIPS = Path(bundled_sample_manifests()[1]) / "clips"  # real speech: JFK 11 s, three LibriVox lines
GOOD = [("jfk.flac", 11.0), ("ps_librivox_0870.flac", 7.1), ("ps_librivox_0880.flac", 2.99),
        ("ps_librivox_0890.flac", 5.3)]
BAD_CLIP = require_test_data() / "broken" / "audio" / "arctic_a0007.wav"  # real speech, 4.0 s, not among GOOD


class HangOnClip(LogMelFrontend):
    """squeezeformer that hangs forever on clips of ``hang_samples`` samples (0: on every clip),
    inside a C call that holds the GIL (``pause()`` through ``ctypes.pythonapi``), as a decoder
    stuck in a C loop would; it first touches ``<mark_dir>/<pid>`` when ``mark_dir`` is set."""

    def __init__(self, hang_samples: int, mark_dir: str | None = None):
        super().__init__("squeezeformer", SQUEEZEFORMER_CONFIG)
        self.hang_samples = hang_samples
        self.mark_dir = mark_dir

    def __call__(self, samples, sample_rate):
        if self.hang_samples in (0, len(samples)):
            if self.mark_dir:
                Path(self.mark_dir, str(os.getpid())).touch()
            while True:
                ctypes.pythonapi.pause()  # PyDLL: the GIL stays held, so no Python thread of this process runs
        return super().__call__(samples, sample_rate)


class DieOnceOnClip(LogMelFrontend):
    """squeezeformer whose worker is SIGKILLed (as by the OOM killer) the first time it meets a
    clip of ``die_samples`` samples; ``marker`` remembers it across workers."""

    def __init__(self, die_samples: int, marker: str):
        super().__init__("squeezeformer", SQUEEZEFORMER_CONFIG)
        self.die_samples = die_samples
        self.marker = marker

    def __call__(self, samples, sample_rate):
        if len(samples) == self.die_samples and not os.path.exists(self.marker):
            Path(self.marker).touch()
            os.kill(os.getpid(), signal.SIGKILL)
        return super().__call__(samples, sample_rate)


def _corpus(root: Path, bad: str | None, copies: int = 3) -> Path:
    """A TSV corpus: the row ``bad`` (CMU ARCTIC a0007, 4 s) first, then ``copies`` rows of each
    good clip; one speaker, so every row is in train."""
    root.mkdir(parents=True)
    rows = []
    if bad:
        shutil.copy(BAD_CLIP, root / f"{bad}.wav")
        rows.append((bad, f"{bad}.wav", 4.0))
    for name, seconds in GOOD:
        shutil.copy(CLIPS / name, root / name)
        rows += [(f"{Path(name).stem}_{i}", name, seconds) for i in range(copies)]
    lines = ["id\tpath\tsentence\tduration\tclient_id"]
    lines += [f"{uid}\t{path}\tsome words here\t{seconds}\tspk0" for uid, path, seconds in rows]
    (root / "m.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def _store(tmp_path: Path, name: str, bad: str | None, copies: int = 3) -> tuple[RecordStore, Path]:
    settings = Settings(manifests=(str(_corpus(tmp_path / f"{name}_corpus", bad, copies)),),
                        output=str(tmp_path / name), workers=1)
    build_record_cache(settings, "train")
    return RecordStore(settings.record_cache_path("train")), settings.feature_split_root("train")


def _child_env() -> dict[str, str]:
    """This process's environment with the repository first on ``PYTHONPATH``, for a child Python."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def _run_script(script: str, *args) -> list[str]:
    """``python -c script args...`` from the repository; its stdout split in words (it must succeed)."""
    done = subprocess.run([sys.executable, "-c", script, *map(str, args)], env=_child_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def _payloads(split_root: Path) -> dict[str, bytes]:
    out = {}
    for part in split_root.rglob("part_*.parquet"):
        table = pq.read_table(part)
        out.update(zip(table.column("key").to_pylist(), table.column("payload").to_pylist()))
    return out


def _config(workers: int, **kwargs) -> ExtractionConfig:
    # One shard: every clip queues behind the bad one, the first in record order.
    return ExtractionConfig(workers=workers, num_shards=1, **kwargs)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, bytes]:
    """Payloads of the good clips, from a run without the bad row."""
    tmp = tmp_path_factory.mktemp("reference")
    store, root = _store(tmp, "ref", None)
    stats = extract_shards(store, root, LogMelFrontend("squeezeformer", SQUEEZEFORMER_CONFIG), [0], _config(1))
    assert stats[0].computed == 12 and not stats[0].failures
    return _payloads(root)


@pytest.mark.parametrize("hang, workers", [("fifo", 1), ("fifo", 2), ("gil", 2)])
def test_a_hanging_utterance_costs_one_timeout_and_the_rest_of_its_shard_is_computed(tmp_path, reference, hang, workers):
    store, root = _store(tmp_path, "out", "hang")
    hang_path = Path(store[0]["audio_path"])
    assert store[0]["utterance_id"] == "hang" and len(store) == 13
    if hang == "fifo":
        # A FIFO without a writer: opening it for reading blocks forever. (The record cache refuses
        # a FIFO, it is not a regular file; the file is swapped after, as a hostile mount could.)
        frontend = LogMelFrontend("squeezeformer", SQUEEZEFORMER_CONFIG)
        hang_path.unlink()
        os.mkfifo(hang_path)
    else:
        frontend = HangOnClip(len(load_audio(hang_path)))  # the only clip of its length
    config = _config(workers, utterance_timeout_s=3.0, timeout_per_audio_s=0.1)
    start = time.monotonic()
    stats = extract_shards(store, root, frontend, [0], config)[0]
    elapsed = time.monotonic() - start

    assert elapsed < 60  # no hang: the limit is 3 s
    assert [(f.utterance_id, f.stage, f.limit_s) for f in stats.failures] == [("hang", "timeout", 3.0)]
    assert stats.failures[0].audio_source == str(hang_path)
    assert stats.failures[0].error.startswith("no result within 3 s (limit max(3 s, 0.1 s per audio second x 4.00 s))")
    assert (stats.computed, stats.failed) == (12, 1)
    assert _payloads(root) == reference  # byte-identical, whatever the number of workers
    assert not multiprocessing.active_children()  # the killed worker and its replacement are gone


def test_a_worker_killed_from_outside_once_still_gets_its_utterance_computed(tmp_path, reference):
    store, root = _store(tmp_path, "out", None)
    frontend = DieOnceOnClip(len(load_audio(CLIPS / "ps_librivox_0880.flac")), str(tmp_path / "died"))
    stats = extract_shards(store, root, frontend, [0], _config(2))[0]
    assert (tmp_path / "died").exists()  # a worker did die under it
    assert (stats.computed, stats.failures) == (12, [])
    assert _payloads(root) == reference


class PidFrontend(LogMelFrontend):
    """squeezeformer that touches ``<mark_dir>/<pid>`` of the process that runs it."""

    def __init__(self, mark_dir: str):
        super().__init__("squeezeformer", SQUEEZEFORMER_CONFIG)
        self.mark_dir = mark_dir

    def __call__(self, samples, sample_rate):
        Path(self.mark_dir, str(os.getpid())).touch()
        return super().__call__(samples, sample_rate)


@pytest.mark.parametrize("timeout, in_process", [(60.0, False), (None, True)])
def test_one_worker_runs_in_a_worker_process_unless_there_is_no_time_limit(tmp_path, reference, timeout, in_process):
    store, root = _store(tmp_path, "out", None)
    marks = tmp_path / "marks"
    marks.mkdir()
    stats = extract_shards(store, root, PidFrontend(str(marks)), [0], _config(1, utterance_timeout_s=timeout))[0]
    pids = [int(p.name) for p in marks.iterdir()]
    assert len(pids) == 1 and (pids[0] == os.getpid()) == in_process
    assert (stats.computed, stats.failures) == (12, [])
    assert _payloads(root) == reference


def test_time_limits_follow_the_duration_with_a_floor_and_a_cap():
    config = ExtractionConfig()
    assert (config.utterance_timeout_s, config.timeout_per_audio_s) == (60.0, 10.0)
    assert config.time_limit_s(0) == 60.0  # duration unknown: the floor
    assert config.time_limit_s(3 * 16000) == 60.0
    assert config.time_limit_s(25 * 16000) == 250.0
    assert config.time_limit_s(3600 * 16000) == 600.0  # a claimed hour: decoding stops at max_decode_s (60 s)
    assert ExtractionConfig(utterance_timeout_s=None).time_limit_s(16000) is None
    for bad in ({"utterance_timeout_s": 0}, {"utterance_timeout_s": float("nan")}, {"timeout_per_audio_s": -1}):
        with pytest.raises(ConfigError):
            ExtractionConfig(**bad)


def _proc_stat(pid: int) -> tuple[int, str] | None:
    """(ppid, state) of ``pid``, or None if it does not exist."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text.rsplit(")", 1)[1].split()
    return int(fields[1]), fields[0]


def _descendants(root: int) -> set[int]:
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _proc_stat(int(entry.name))) is not None:
            parents[int(entry.name)] = stat[0]
    found, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier} - found
        found |= frontier
    return found


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return b""


def _alive(pid: int) -> bool:
    stat = _proc_stat(pid)
    return stat is not None and stat[1] not in ("Z", "X")  # a zombie holds no memory


_KILLED_MAIN = """
import sys
from asr_assets.extraction import ExtractionConfig, extract_shards
from asr_assets.record_cache import RecordStore
from asr_assets_tests.test_bounded_time import HangOnClip
store_path, root, marks = sys.argv[1:]
extract_shards(RecordStore(store_path), root, HangOnClip(0, marks), [0], ExtractionConfig(workers=2, num_shards=1))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigkill_of_the_main_process_leaves_no_fork_server_or_worker(tmp_path):
    store, root = _store(tmp_path, "out", None, copies=1)
    marks = tmp_path / "marks"
    marks.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_MAIN, str(store.path), str(root), str(marks)],
                            env=_child_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    family: set[int] = set()
    try:
        deadline = time.monotonic() + 60
        while len(list(marks.iterdir())) < 2:  # both workers stuck in C, holding the GIL
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the workers never started their utterances"
            time.sleep(0.1)
        family = _descendants(proc.pid)
        workers = {int(p.name) for p in marks.iterdir()}
        fork_servers = {pid for pid in family if b"multiprocessing.forkserver" in _cmdline(pid)
                        and _proc_stat(pid)[0] == proc.pid}  # its workers have its command line too
        assert workers <= family and len(fork_servers) == 1  # (and multiprocessing's resource tracker)
        assert all(_alive(pid) for pid in workers | fork_servers)
    finally:
        proc.kill()
        proc.wait(30)
        proc.stderr.close()
    deadline = time.monotonic() + 10
    while (left := {pid for pid in family if _alive(pid)}) and time.monotonic() < deadline:
        time.sleep(0.1)
    leftovers = {pid: _cmdline(pid)[:120] for pid in left}
    for pid in left:  # do not leak them into the rest of the session, but fail
        os.kill(pid, signal.SIGKILL)
    assert not leftovers


_THREAD_STARTS_FORK_SERVER = """
import sys, threading
from multiprocessing import forkserver
from asr_assets.extraction import ExtractionConfig, extract_shards
from asr_assets.frontends.logmel import SQUEEZEFORMER_CONFIG, LogMelFrontend
from asr_assets.record_cache import RecordStore
store_path, root_a, root_b = sys.argv[1:]
frontend, config = LogMelFrontend("squeezeformer", SQUEEZEFORMER_CONFIG), ExtractionConfig(workers=2, num_shards=1)
out = {}
thread = threading.Thread(target=lambda: out.update(a=extract_shards(RecordStore(store_path), root_a, frontend, [0], config)))
thread.start()
thread.join()
first = forkserver._forkserver._forkserver_pid
b = extract_shards(RecordStore(store_path), root_b, frontend, [0], config)
print(first == forkserver._forkserver._forkserver_pid, out["a"][0].computed, b[0].computed, len(b[0].failures))
"""


def test_the_fork_server_outlives_the_thread_that_started_it(tmp_path):
    """Its parent-death signal fires when that *thread* exits; it must exit only with the process."""
    store, _ = _store(tmp_path, "out", None, copies=1)
    words = _run_script(_THREAD_STARTS_FORK_SERVER, store.path, tmp_path / "a", tmp_path / "b")
    assert words == ["True", "4", "4", "0"]  # same fork server; no worker was lost


_STARTED_EARLY = """
import sys
from multiprocessing import forkserver
from asr_assets.extraction import ExtractionConfig, extract_shards, start_fork_server
from asr_assets.frontends.logmel import SQUEEZEFORMER_CONFIG, LogMelFrontend
from asr_assets.record_cache import RecordStore
store_path, root = sys.argv[1:]
start_fork_server()
first = forkserver._forkserver._forkserver_pid
start_fork_server()
again = forkserver._forkserver._forkserver_pid
stats = extract_shards(RecordStore(store_path), root, LogMelFrontend("squeezeformer", SQUEEZEFORMER_CONFIG), [0],
                       ExtractionConfig(workers=2, num_shards=1))
print(first is not None, first == again == forkserver._forkserver._forkserver_pid, stats[0].computed,
      len(stats[0].failures))
"""


def test_a_fork_server_started_early_is_the_one_the_workers_come_from(tmp_path, reference):
    """``start_fork_server`` (what ``materialize`` calls before importing Dagster) starts one fork
    server, once; the pool then forks its workers from it and computes the same payloads."""
    store, _ = _store(tmp_path, "out", None)
    assert _run_script(_STARTED_EARLY, store.path, tmp_path / "early") == ["True", "True", "12", "0"]
    assert _payloads(tmp_path / "early") == reference


class KillForkServerOnClip(LogMelFrontend):
    """squeezeformer whose worker SIGKILLs its parent, the fork server, the first time it meets a
    clip of ``kill_samples`` samples (``marker`` remembers it); every worker then dies with it."""

    def __init__(self, kill_samples: int, marker: str):
        super().__init__("squeezeformer", SQUEEZEFORMER_CONFIG)
        self.kill_samples = kill_samples
        self.marker = marker

    def __call__(self, samples, sample_rate):
        if len(samples) == self.kill_samples and not os.path.exists(self.marker):
            Path(self.marker).write_text(str(os.getppid()))
            os.kill(os.getppid(), signal.SIGKILL)
            time.sleep(60)  # PR_SET_PDEATHSIG(SIGKILL) ends this worker first
        return super().__call__(samples, sample_rate)


def test_a_killed_fork_server_costs_no_utterance(tmp_path, reference):
    store, root = _store(tmp_path, "out", None)
    marker = tmp_path / "killed"
    frontend = KillForkServerOnClip(len(load_audio(CLIPS / "ps_librivox_0870.flac")), str(marker))
    start = time.monotonic()
    stats = extract_shards(store, root, frontend, [0], _config(2))[0]
    assert time.monotonic() - start < 60  # the worker that killed it did not wait out its sleep
    assert not _alive(int(marker.read_text()))
    assert (stats.computed, stats.failures) == (12, [])  # the utterances in flight were run again
    assert _payloads(root) == reference


def test_time_limit_settings_reach_the_extractor(tmp_path, monkeypatch):
    """--utterance-timeout / ASR_ASSETS_TIMEOUT_PER_AUDIO_S end in the ExtractionConfig of a run,
    and a FIFO in a manifest never reaches a decoder (it is not a regular file: row reported)."""
    import json

    from asr_assets import pipeline
    from asr_assets.cli import main as cli_main

    root = _corpus(tmp_path / "corpus", "hang", copies=1)
    (root / "hang.wav").unlink()
    os.mkfifo(root / "hang.wav")
    seen = []
    real = pipeline.extract_shards
    monkeypatch.setattr(pipeline, "extract_shards", lambda *a, **k: seen.append(a[4]) or real(*a, **k))
    monkeypatch.setenv("ASR_ASSETS_TIMEOUT_PER_AUDIO_S", "7.5")
    out = tmp_path / "out"
    assert cli_main(["materialize", "--manifests", str(root), "--output", str(out), "--workers", "1",
                     "--utterance-timeout", "2.5"]) == 0
    assert seen and all(c.utterance_timeout_s == 2.5 and c.timeout_per_audio_s == 7.5 for c in seen)
    rows = [json.loads(line) for line in (out / "reports" / "records-train.jsonl").read_text().splitlines()]
    assert [r["utterance_id"] for r in rows] == ["hang"]
    assert len(RecordStore(out / "record_cache" / "train.jsonl")) == len(GOOD)


def _worker_environment(names: tuple[str, ...]) -> dict[str, str | None]:
    """The values of ``names`` that a freshly spawned feature worker sees."""
    from asr_assets import extraction
    from asr_assets.audio import DecodeConfig

    state = (LogMelFrontend("squeezeformer", SQUEEZEFORMER_CONFIG), DecodeConfig(), None, None)
    with extraction._WorkerPool(state) as pool:
        worker = pool.spawn()
        assert pool.receive(worker)[0] == "ready"
        worker.send(0, _read_environment, (names,))
        message = pool.receive(worker)
    assert message[0] == "ok", message
    return message[2]


def _read_environment(names):
    return {name: os.environ.get(name) for name in names}


def test_workers_take_the_callers_environment_not_the_fork_servers(monkeypatch):
    # The fork server is started once per process and keeps the environment of that moment; an
    # object-store endpoint, credentials or timeouts set later (a long-lived process, the next
    # test) must still reach the workers, and variables unset since must be gone.
    monkeypatch.setenv("ASR_ASSETS_IO_READ_TIMEOUT_S", "1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    names = ("ASR_ASSETS_IO_READ_TIMEOUT_S", "AWS_ENDPOINT_URL")
    assert _worker_environment(names) == {"ASR_ASSETS_IO_READ_TIMEOUT_S": "1", "AWS_ENDPOINT_URL": "http://127.0.0.1:1"}
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:2")
    monkeypatch.delenv("ASR_ASSETS_IO_READ_TIMEOUT_S")
    assert _worker_environment(names) == {"ASR_ASSETS_IO_READ_TIMEOUT_S": None, "AWS_ENDPOINT_URL": "http://127.0.0.1:2"}
