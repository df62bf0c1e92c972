"""Hostile manifests, second round: no manifest file can stop a run, and each bad row or file is
reported with its reason while every good row beside it is cached.

Covers, each next to a good manifest of real clips (the bundled sample): duplicate column names
(TSV and Parquet: one file-level report); ``audio.bytes`` typed string (per row: usable through a
readable ``audio.path``, otherwise reported); Parquet cells of the wrong type (string and garbage
durations, integer transcripts, UTF-8 binary); a Parquet file that is not Parquet; an unbalanced
``"`` in a TSV sentence (rows are physical lines, the next rows keep their exact transcripts; a
fully quoted cell still unquotes as upstream reads it); one invalid UTF-8 byte (only that line is
reported, with its line number); one utterance id in two manifests and two splits, and in train and
external validation sources (the first in discovery order wins, the report names both rows); a
Parquet file left unread by the TSV-wins rule (named, with the TSV that won, in every split's
report); embedded audio over ``max_blob_mb`` (refused from its length: a 48 MiB blob never becomes
a Python object, traced with tracemalloc) and a local audio file over it; folders that cannot be
listed and symlink loops below a root (reported, the rest read); ``manifest_sensor`` on a
symlink-loop root, a vanished root, a root that cannot be listed, and a loop and a
permission-denied folder inside a root (no crash; skip message, warnings, metadata); concurrent
initialization of one fresh ``DAGSTER_HOME`` by three processes (all succeed); and the whole thing
through ``asr-assets materialize`` (exit 0, nothing on stderr).
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from asr_assets.cli import main as cli_main
from asr_assets.definitions import build_graph
from asr_assets.defs.sensors import manifest_sensor
from asr_assets.manifests import iter_manifest_rows, split_tsv_line
from asr_assets.pipeline import build_record_cache
from asr_assets.record_cache import RecordStore
from asr_assets.records import split_score
from asr_assets.settings import SPLITS, Settings, bundled_sample_manifests

CV = Path(bundled_sample_manifests()[1])
CLIPS = CV / "clips"
HEADER = "id\tpath\tsentence\tduration\tclient_id\n"
#: (id, clip, transcript as cached, duration, speaker) of the good manifest.
GOOD = [
    ("arctic_a0007", "arctic_a0007.flac", "And you always want to see it in the superlative degree.", "4.0", "arctic_slt"),
    ("arctic_a0009", "arctic_a0009.flac", "He turned sharply, and faced Gregson across the table.", "3.095", "arctic_rms"),
    ("ps_librivox_0880", "ps_librivox_0880.flac", "he was not an ill disposed young man", "2.99", "librivox_ss"),
]


def _good_manifest(folder: Path, name: str = "good.tsv") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(HEADER + "".join(f"{u}\t{CLIPS / c}\t{t}\t{d}\t{s}\n" for u, c, t, d, s in GOOD), encoding="utf-8")
    return path


def _build(tmp_path: Path, *manifests: Path, **settings) -> Settings:
    s = Settings(manifests=tuple(str(m) for m in manifests), output=str(tmp_path / "out"), **settings)
    for split in SPLITS:
        build_record_cache(s, split)
    return s


def _cached(settings: Settings) -> dict[str, dict]:
    return {r["utterance_id"]: r for split in SPLITS for r in RecordStore(settings.record_cache_path(split))}


def _reports(settings: Settings) -> dict[str, list[dict]]:
    return {split: [json.loads(line) for line in settings.records_report_path(split).read_text(encoding="utf-8").splitlines()]
            for split in SPLITS}


def _assert_good_rows_cached(settings: Settings, extra: dict[str, str] | None = None) -> None:
    cached = _cached(settings)
    expected = {u: t for u, _, t, _, _ in GOOD} | (extra or {})
    assert {u: r["transcript"] for u, r in cached.items()} == expected


def _file_level(settings: Settings, manifest: Path) -> list[dict]:
    """The file-level entries (no utterance id) of ``manifest``, checked to be in every split's report."""
    per_split = {split: [{k: v for k, v in e.items() if k != "split"} for e in entries
                         if e["manifest"] == str(manifest) and e["utterance_id"] is None]
                 for split, entries in _reports(settings).items()}
    assert all(entries == per_split["train"] for entries in per_split.values()), per_split
    return per_split["train"]


# ----------------------------------------------------------------------------- columns and types


def test_duplicate_column_names_are_one_file_level_report(tmp_path):
    good = _good_manifest(tmp_path / "good")
    tsv = tmp_path / "dup_tsv" / "m.tsv"
    tsv.parent.mkdir()
    tsv.write_text("id\tpath\tsentence\tsentence\tduration\n"
                   f"x1\t{CLIPS / 'jfk.flac'}\tone\ttwo\t11.0\n", encoding="utf-8")
    parquet = tmp_path / "dup.parquet"
    pq.write_table(pa.Table.from_arrays(
        [pa.array(["x2"]), pa.array([str(CLIPS / "jfk.flac")]), pa.array(["a"]), pa.array(["b"]), pa.array([11.0])],
        names=["id", "path", "text", "text", "duration"]), parquet)
    settings = _build(tmp_path, good, tsv.parent, parquet)
    _assert_good_rows_cached(settings)
    for manifest, column in ((tsv, "sentence"), (parquet, "text")):
        (entry,) = _file_level(settings, manifest)
        assert entry["stage"] == "manifest" and entry["line"] is None
        assert f"duplicate column names ['{column}']" in entry["error"] and "2 times" in entry["error"]
        assert "unreadable after" not in entry["error"]  # a columns problem, not a read error


def test_unread_duplicate_columns_do_not_matter(tmp_path):
    parquet = tmp_path / "m.parquet"
    pq.write_table(pa.Table.from_arrays(
        [pa.array([GOOD[0][0]]), pa.array([str(CLIPS / GOOD[0][1])]), pa.array([GOOD[0][2]]), pa.array([4.0]),
         pa.array([1]), pa.array([2])], names=["id", "path", "text", "duration", "extra", "extra"]), parquet)
    (row,) = iter_manifest_rows([parquet])
    assert (row.utterance_id, row.transcript, row.duration_s) == (GOOD[0][0], GOOD[0][2], 4.0)


def test_audio_bytes_typed_string_is_reported_per_row(tmp_path):
    good = _good_manifest(tmp_path / "good")
    src = tmp_path / "hf"
    src.mkdir()
    (src / "here.flac").write_bytes((CLIPS / "jfk.flac").read_bytes())
    pq.write_table(pa.table({
        "id": ["str_bytes_local", "str_bytes_only", "str_bytes_null"],
        "audio": pa.array([{"bytes": "RIFF....", "path": "here.flac"}, {"bytes": "fLaC\x00garbage", "path": "gone.flac"},
                           {"bytes": None, "path": "here.flac"}],
                          pa.struct([("bytes", pa.string()), ("path", pa.string())])),
        "text": ["local file wins", "nothing usable", "no bytes at all"],
        "duration": [11.0, 11.0, 11.0], "speaker_id": ["spk0", "spk0", "spk0"],
    }), src / "m.parquet")
    settings = _build(tmp_path, good, src)
    # a readable local file at audio.path is used, as it would be instead of binary bytes (spec §1.5)
    _assert_good_rows_cached(settings, {"str_bytes_local": "local file wins", "str_bytes_null": "no bytes at all"})
    assert _cached(settings)["str_bytes_local"]["audio_blob_path"] is None
    (entry,) = [e for entries in _reports(settings).values() for e in entries]
    assert (entry["utterance_id"], entry["stage"], entry["manifest"], entry["row"], entry["line"]) == \
        ("str_bytes_only", "manifest", str(src / "m.parquet"), 2, 2)
    assert entry["error"].startswith("audio.bytes is typed string, not binary") and entry["audio_source"] == str(src / "gone.flac")



def test_a_plain_string_audio_column_is_reported_with_the_path_column_fix(tmp_path):
    # Upstream reads an ``audio`` column as a {bytes, path} struct or binary; a column of file
    # paths typed string is refused per row, and the reason names both fixes.
    good = _good_manifest(tmp_path / "good")
    src = tmp_path / "hf"
    src.mkdir()
    (src / "here.flac").write_bytes((CLIPS / "jfk.flac").read_bytes())
    pq.write_table(pa.table({"id": ["str_audio"], "audio": ["here.flac"], "text": ["a path typed string"],
                             "duration": [11.0], "speaker_id": ["spk0"]}), src / "m.parquet")
    settings = _build(tmp_path, good, src)
    (entry,) = [e for entries in _reports(settings).values() for e in entries]
    assert (entry["utterance_id"], entry["stage"], entry["line"]) == ("str_audio", "manifest", 1)
    assert entry["error"] == ("column 'audio' is typed string, not a {bytes: binary, path: string} struct or binary: "
                              "its value cannot be used as audio bytes (if it holds file paths, name the column "
                              "'path'; if audio bytes, re-export it as binary)")

def test_parquet_cells_of_the_wrong_type(tmp_path):
    good = _good_manifest(tmp_path / "good")
    pq.write_table(pa.table({
        "id": ["text_number", "text_garbage"], "path": [str(CLIPS / "arctic_a0007.flac")] * 2,
        "text": ["numeric string", "garbage string"], "duration": ["4.0", "four seconds"], "speaker_id": ["spk0"] * 2,
    }), tmp_path / "d.parquet")
    pq.write_table(pa.table({
        "id": ["int_text", "int_text_2"], "path": [str(CLIPS / "arctic_a0007.flac")] * 2,
        "text": [5, 6], "duration": [4.0, 4.0]}), tmp_path / "e.parquet")
    pq.write_table(pa.table({
        "id": ["utf8_binary"], "path": pa.array([str(CLIPS / "arctic_a0007.flac").encode()]),
        "text": pa.array(["bytes that are text".encode()]), "duration": pa.array([b"4.0"])}), tmp_path / "f.parquet")
    settings = _build(tmp_path, good, tmp_path / "d.parquet", tmp_path / "e.parquet", tmp_path / "f.parquet")
    _assert_good_rows_cached(settings, {"text_number": "numeric string", "utf8_binary": "bytes that are text"})
    errors = {e["utterance_id"]: e["error"] for entries in _reports(settings).values() for e in entries}
    assert errors == {"text_garbage": "unparseable duration 'four seconds'",
                      "int_text": "transcript cell is int 5, not text", "int_text_2": "transcript cell is int 6, not text"}


def test_a_file_that_is_not_parquet_is_reported_and_the_next_is_read(tmp_path):
    good = _good_manifest(tmp_path / "good")
    broken = tmp_path / "broken" / "a.parquet"
    broken.parent.mkdir()
    broken.write_bytes(b"PAR1 this is not a parquet file at all")
    settings = _build(tmp_path, broken.parent, good)
    _assert_good_rows_cached(settings)
    (entry,) = _file_level(settings, broken)
    assert entry["error"].startswith("manifest file unreadable after 0 rows: cannot read manifest")


# ----------------------------------------------------------------------------- TSV lines


def test_unbalanced_quote_keeps_the_next_rows_separate(tmp_path):
    folder = tmp_path / "quotes"
    folder.mkdir()
    clip = CLIPS / "jfk.flac"
    rows = [
        ("q_open", 'He said "stop and went on'),               # unbalanced inside the cell
        ("q_next", "the next row is its own row"),
        ("q_start", '"Quoted start, never closed'),            # unbalanced at the start of the cell
        ("q_after", 'then "a quote" in the middle'),
        ("q_full", '"Fully quoted , as a CSV writer does"'),   # well formed: unquoted, as upstream reads it
        ("q_doubled", '"He said ""hi"""'),
        ("q_last", "last row"),
    ]
    (folder / "m.tsv").write_text(HEADER + "".join(f"{u}\t{clip}\t{t}\t11.0\tspk0\n" for u, t in rows), encoding="utf-8")
    settings = _build(tmp_path, _good_manifest(tmp_path / "good"), folder)
    _assert_good_rows_cached(settings, {
        "q_open": 'He said "stop and went on', "q_next": "the next row is its own row",
        "q_start": '"Quoted start, never closed', "q_after": 'then "a quote" in the middle',
        "q_full": "Fully quoted, as a CSV writer does", "q_doubled": 'He said "hi"', "q_last": "last row"})
    assert all(entries == [] for entries in _reports(settings).values())


@pytest.mark.parametrize("line, cells", [
    ("a\tb\tc", ["a", "b", "c"]),
    ('"a\tb"\tc', ["a\tb", "c"]),          # a quoted tab stays in its cell
    ('"a\tb', ['"a', "b"]),                # unbalanced: plain characters
    ('x"y\t"z"', ['x"y', "z"]),
    ('"a"b\tc', ['"a"b', "c"]),            # text after the closing quote: literal
    ('""\t"', ["", '"']),
    ('"a"\t', ["a", ""]),
])
def test_split_tsv_line(line, cells):
    assert split_tsv_line(line) == cells


def test_one_invalid_utf8_byte_costs_only_its_line(tmp_path):
    folder = tmp_path / "latin1"
    folder.mkdir()
    clip = str(CLIPS / "jfk.flac").encode()
    (folder / "m.tsv").write_bytes(
        HEADER.encode() + b"u_before\t" + clip + b"\tbefore\t11.0\tspk0\n"
        + b"u_bad\t" + clip + b"\tcaf\xe9 au lait\t11.0\tspk0\n"      # Latin-1, not UTF-8
        + b"u_after\t" + clip + b"\tna\xc3\xafve after\t11.0\tspk0\r\n")
    settings = _build(tmp_path, _good_manifest(tmp_path / "good"), folder)
    _assert_good_rows_cached(settings, {"u_before": "before", "u_after": "naïve after"})
    (entry,) = _file_level(settings, folder / "m.tsv")
    assert entry["line"] == 3 and entry["stage"] == "manifest"
    assert entry["error"].startswith("line 3 skipped: not valid UTF-8 (byte 0xe9 at offset")
    assert "caf\\xe9 au lait" in entry["error"]


# ----------------------------------------------------------------------------- one id, one record


def test_duplicate_ids_across_manifests_and_splits_first_wins(tmp_path):
    # spk0 hashes into train, spk7 into validation (spec §1.8): without the global check, both rows
    # would be cached, in two splits, with two transcripts.
    assert split_score("spk0") < 0.8 <= split_score("spk7") < 0.9
    folder = tmp_path / "corpus"
    folder.mkdir()
    clip = CLIPS / "jfk.flac"
    (folder / "a.tsv").write_text(HEADER + f"dup\t{clip}\tthe first transcript\t11.0\tspk0\n", encoding="utf-8")
    (folder / "b.tsv").write_text(HEADER + f"other\t{clip}\tunrelated\t11.0\tspk0\n"
                                           f"dup\t{clip}\tthe second transcript\t11.0\tspk7\n", encoding="utf-8")
    settings = _build(tmp_path, _good_manifest(tmp_path / "good"), folder)
    _assert_good_rows_cached(settings, {"dup": "the first transcript", "other": "unrelated"})
    assert [r["utterance_id"] for r in RecordStore(settings.record_cache_path("validation"))] == []
    reports = _reports(settings)
    (entry,) = reports["validation"]  # the loser is reported by its own split, once
    assert not reports["train"] and not reports["test"]
    assert (entry["utterance_id"], entry["manifest"], entry["line"], entry["stage"]) == ("dup", str(folder / "b.tsv"), 3, "manifest")
    assert entry["error"] == "duplicate utterance_id 'dup'"
    assert entry["duplicate_of"] == {"manifest": str(folder / "a.tsv"), "row": 1, "line": 2, "split": "train"}


def test_external_validation_rows_cannot_reuse_a_train_id(tmp_path):
    train = _good_manifest(tmp_path / "train")
    val = tmp_path / "val" / "val.tsv"
    val.parent.mkdir()
    val.write_text(HEADER + f"{GOOD[1][0]}\t{CLIPS / 'jfk.flac'}\ta different transcript\t11.0\tspk3\n"
                            f"val_only\t{CLIPS / 'jfk.flac'}\tvalidation row\t11.0\tspk3\n", encoding="utf-8")
    settings = _build(tmp_path, train, validation_manifests=(str(val.parent),))
    assert [r["utterance_id"] for r in RecordStore(settings.record_cache_path("train"))] == [u for u, *_ in GOOD]
    assert [r["utterance_id"] for r in RecordStore(settings.record_cache_path("validation"))] == ["val_only"]
    (entry,) = _reports(settings)["validation"]
    assert entry["utterance_id"] == GOOD[1][0] and entry["manifest"] == str(val)
    assert entry["duplicate_of"] == {"manifest": str(train), "row": 2, "line": 3, "split": "train"}


def test_parquet_left_unread_by_tsv_wins_is_named(tmp_path):
    folder = tmp_path / "mixed"
    good = _good_manifest(folder / "cv", "validated.tsv")
    (folder / "hf").mkdir()
    pq.write_table(pa.table({"id": ["never"], "path": [str(CLIPS / "jfk.flac")], "text": ["never read"], "duration": [11.0]}),
                   folder / "hf" / "train.parquet")
    settings = _build(tmp_path, folder)
    _assert_good_rows_cached(settings)
    (entry,) = _file_level(settings, folder / "hf" / "train.parquet")
    assert entry["stage"] == "skipped_manifest" and entry["utterance_id"] is None
    assert str(good) in entry["error"] and "TSV wins" in entry["error"]


# ----------------------------------------------------------------------------- size limits


def test_oversized_blob_is_refused_before_it_is_read(tmp_path):
    small = (CLIPS / "arctic_a0009.flac").read_bytes()          # 61 KB
    big = (CLIPS / "jfk.flac").read_bytes()                      # 196 KB
    bomb_size = 48 * 2**20
    src = tmp_path / "hf"
    src.mkdir()
    pq.write_table(pa.table({
        "id": ["blob_small", "blob_big", "blob_bomb"],
        "audio": [{"bytes": small, "path": "a.flac"}, {"bytes": big, "path": "b.flac"},
                  {"bytes": b"\0" * bomb_size, "path": "c.flac"}],
        "text": ["small enough", "too big", "a bomb"], "duration": [3.1, 11.0, 11.0], "speaker_id": ["spk0"] * 3,
    }), src / "m.parquet", row_group_size=3)
    # a local file over the limit is refused too (one os.stat)
    local = tmp_path / "local"
    local.mkdir()
    (local / "m.tsv").write_text(HEADER + f"file_big\t{CLIPS / 'jfk.flac'}\tbig file\t11.0\tspk0\n", encoding="utf-8")
    limit_mb = 0.1  # 104,857 bytes: the good clips (50-72 KB) pass
    tracemalloc.start()
    settings = _build(tmp_path, _good_manifest(tmp_path / "good"), src, local, max_blob_mb=limit_mb)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 16 * 2**20  # the 48 MiB blob never became a Python bytes object
    _assert_good_rows_cached(settings, {"blob_small": "small enough"})
    assert Path(_cached(settings)["blob_small"]["audio_blob_path"]).name.endswith(".bin")
    entries = {e["utterance_id"]: e for entries in _reports(settings).values() for e in entries}
    assert set(entries) == {"blob_big", "blob_bomb", "file_big"}
    assert entries["blob_bomb"]["error"].startswith("embedded audio (audio.bytes) is 48.00 MiB (50,331,648 bytes), over the 0.1 MiB limit (max_blob_mb)")
    assert "over the 0.1 MiB limit (max_blob_mb)" in entries["blob_big"]["error"] and entries["blob_big"]["line"] == 2
    assert entries["file_big"]["error"] == "audio file is 0.19 MiB (196,348 bytes), over the 0.1 MiB limit (max_blob_mb)"
    assert not any(p.stat().st_size > 2**20 for p in (tmp_path / "out").rglob("*.bin"))


def test_max_blob_mb_setting():
    assert Settings().max_blob_bytes == 100 * 2**20
    assert Settings.from_env({"ASR_ASSETS_MAX_BLOB_MB": "0.5"}).max_blob_bytes == 2**19
    assert Settings.from_env({"ASR_ASSETS_MAX_BLOB_MB": "inf"}).max_blob_bytes is None
    assert Settings(max_blob_mb=None).max_blob_bytes is None
    with pytest.raises(ValueError, match="max_blob_mb must be > 0"):
        Settings(max_blob_mb=0)
    with pytest.raises(ValueError, match="ASR_ASSETS_MAX_BLOB_MB must be a number"):
        Settings.from_env({"ASR_ASSETS_MAX_BLOB_MB": "lots"})


# ----------------------------------------------------------------------------- folders, sensor, instance


def test_unlistable_folders_and_symlink_loops_below_a_root_are_reported(tmp_path, monkeypatch):
    root = tmp_path / "root"
    good = _good_manifest(root / "ok")
    (root / "loop.tsv").symlink_to(root / "loop.tsv")                 # a manifest that is a symlink loop
    (root / "locked").mkdir()
    (root / "locked" / "hidden.tsv").write_text(HEADER, encoding="utf-8")
    real_scandir = os.scandir

    def scandir(path="."):  # chmod 000 does not stop root: refuse the listing instead
        if os.fspath(path) == str(root / "locked"):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    settings = _build(tmp_path, root)
    _assert_good_rows_cached(settings)
    loop = _file_level(settings, root / "loop.tsv")
    locked = _file_level(settings, root / "locked")
    assert len(loop) == 1 and "Too many levels of symbolic links" in loop[0]["error"]
    assert len(locked) == 1 and "cannot list folder: Permission denied" in locked[0]["error"]
    assert str(good) not in json.dumps(_reports(settings))


def test_manifest_sensor_survives_loops_vanished_and_denied_roots(tmp_path, monkeypatch):
    root = tmp_path / "root"
    _good_manifest(root / "ok")
    (root / "loop.tsv").symlink_to(root / "loop.tsv")
    (root / "locked").mkdir()
    loop_root = tmp_path / "loop_root"
    loop_root.symlink_to(loop_root)
    vanished = tmp_path / "vanished"
    vanished.mkdir()
    denied = tmp_path / "denied"
    denied.mkdir()
    instance = dg.DagsterInstance.ephemeral()
    real_scandir = os.scandir

    def scandir(path="."):  # chmod 000 does not stop root: refuse the listings instead
        if os.fspath(path) in (str(root / "locked"), str(denied)):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)

    def tick(*roots, cursor=None):
        graph = build_graph(Settings(manifests=tuple(str(r) for r in roots), output=str(tmp_path / "out")))
        return manifest_sensor(dg.build_sensor_context(instance=instance, cursor=cursor, resources=graph.resources))

    vanished.rmdir()
    result = tick(root, loop_root, vanished, denied)  # no exception
    assert not result.run_requests
    message = result.skip_reason.skip_message
    assert "manifest roots that cannot be read" in message
    assert f"{loop_root}: cannot be opened: Too many levels of symbolic links" in message
    assert f"{vanished}: does not exist" in message
    assert f"{denied}: cannot list folder: Permission denied" in message
    # the partly readable root alone is watched, its unreadable entries named
    first = tick(root)
    assert len(first.run_requests) == 3
    problems = first.asset_events[0].metadata["roots"].value[str(root)]["problems"]
    assert any("loop.tsv: cannot open manifest: Too many levels of symbolic links" in p for p in problems)
    assert any("locked: cannot list folder: Permission denied" in p for p in problems)
    noop = tick(root, cursor=first.cursor)
    assert not noop.run_requests
    assert noop.skip_reason.skip_message.startswith("no new, changed or removed manifests in 1 roots; 2 entries unreadable")


_INIT = """
import sys, time
start = float(sys.argv[1])
while time.time() < start:
    time.sleep(0.001)
from asr_assets import cli
instance = cli._dagster_instance()
instance.get_runs(limit=1)
print("ok")
"""


def test_concurrent_instance_initialization_on_a_fresh_home(tmp_path):
    for attempt in range(2):
        home = tmp_path / f"home{attempt}" / "nested"  # parents are created too
        env = {**os.environ, "DAGSTER_HOME": str(home)}
        start = time.time() + 3  # after the imports of all three
        procs = [subprocess.Popen([sys.executable, "-c", _INIT, str(start)], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(3)]
        results = [p.communicate(timeout=180) for p in procs]
        assert [p.returncode for p in procs] == [0, 0, 0], [err[-2000:] for _, err in results]
        assert [out.strip() for out, _ in results] == ["ok"] * 3
        assert (home / "dagster.yaml").read_text() == "telemetry:\n  enabled: false\n"
        assert not [p for p in home.iterdir() if ".tmp." in p.name]


def test_existing_dagster_yaml_is_kept(tmp_path, monkeypatch):
    from asr_assets import cli

    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: true\n", encoding="utf-8")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    assert cli._dagster_home() == str(home)
    assert (home / "dagster.yaml").read_text() == "telemetry:\n  enabled: true\n"


# ----------------------------------------------------------------------------- through the CLI


def test_materialize_with_every_hostile_manifest_exits_0(tmp_path, capsys, monkeypatch):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "dup_columns.tsv").write_text("id\tpath\tsentence\tsentence\tduration\nz\tz.wav\ta\tb\t1.0\n", encoding="utf-8")
    (bad / "quotes_and_bytes.tsv").write_bytes(
        HEADER.encode() + f'q_open\t{CLIPS / "arctic_a0009.flac"}\tHe said "stop\t3.095\tspk0\n'.encode()
        + f"u_bad\t{CLIPS / 'arctic_a0009.flac'}\t".encode() + b"caf\xe9\t3.095\tspk0\n"
        + f"q_next\t{CLIPS / 'ps_librivox_0880.flac'}\tthe next row\t2.99\tspk0\n".encode())
    hf = tmp_path / "hf"
    hf.mkdir()
    pq.write_table(pa.table({"id": ["blob_big"], "audio": [{"bytes": b"\0" * 300_000, "path": "gone.flac"}],
                             "text": ["too big"], "duration": [1.0]}), hf / "a.parquet")
    pq.write_table(pa.table({
        "id": ["str_bytes"], "audio": pa.array([{"bytes": "abc", "path": "gone.flac"}],
                                               pa.struct([("bytes", pa.string()), ("path", pa.string())])),
        "text": ["string bytes"], "duration": [1.0]}), hf / "b.parquet")
    good = _good_manifest(tmp_path / "good")
    monkeypatch.setenv("ASR_ASSETS_MAX_BLOB_MB", "0.25")
    out = tmp_path / "out"
    assert cli_main(["materialize", "--manifests", str(good), "--manifests", str(bad), "--manifests", str(hf),
                     "--output", str(out), "--workers", "1"]) == 0
    captured = capsys.readouterr()
    assert [line for line in captured.err.splitlines() if line.strip()] == []
    cached = {r["utterance_id"]: r["transcript"] for s in SPLITS for r in RecordStore(out / "record_cache" / f"{s}.jsonl")}
    assert cached == {u: t for u, _, t, _, _ in GOOD} | {"q_open": 'He said "stop', "q_next": "the next row"}
    entries = [json.loads(line) for s in SPLITS for line in (out / "reports" / f"records-{s}.jsonl").read_text().splitlines()]
    errors = {(e["utterance_id"], Path(e["manifest"]).name): e["error"] for e in entries}
    assert "duplicate column names ['sentence']" in errors[(None, "dup_columns.tsv")]
    assert errors[(None, "quotes_and_bytes.tsv")].startswith("line 3 skipped: not valid UTF-8")
    assert "over the 0.25 MiB limit (max_blob_mb)" in errors[("blob_big", "a.parquet")]  # through the Dagster resource
    assert errors[("str_bytes", "b.parquet")].startswith("audio.bytes is typed string, not binary")
    problems = [line for line in captured.out.splitlines() if "manifest problem:" in line]
    assert any(f"manifest problem: {bad / 'quotes_and_bytes.tsv'}: line 3 skipped: not valid UTF-8" in line
               for line in problems), problems  # which file, which line, why
    assert f"manifest problems: {sum(1 for e in entries if e['utterance_id'] is None) // len(SPLITS)} " in captured.out


def test_live_playlist_silent_server_and_fifo_cost_one_report_each(tmp_path):
    """A run over good clips plus a live HLS playlist named .wav, a URL to a server that accepts
    and never answers, and a FIFO: each hostile row is one report, every good clip is featurized,
    exit 0, well within the time limits (nothing waits for the server or the FIFO)."""
    import socket
    import threading
    import time

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    accepted = []
    threading.Thread(target=lambda: [accepted.append(server.accept()) for _ in range(4)], daemon=True).start()
    port = server.getsockname()[1]
    root = _good_manifest(tmp_path / "corpus").parent
    (root / "live.wav").write_text("#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXT-X-MEDIA-SEQUENCE:0\n"
                                   "#EXTINF:2.0,\nseg0.ts\n", encoding="utf-8")  # no ENDLIST: live
    os.mkfifo(root / "fifo.wav")
    with open(root / "hostile.tsv", "w", encoding="utf-8") as fh:
        fh.write(HEADER)
        fh.write(f"live\t{root / 'live.wav'}\ta live playlist\t2.0\tspk9\n")
        fh.write(f"silent\thttp://127.0.0.1:{port}/x.wav\ta silent server\t2.0\tspk9\n")
        fh.write(f"fifo\t{root / 'fifo.wav'}\ta fifo\t2.0\tspk9\n")
    out = tmp_path / "out"
    start = time.monotonic()
    assert cli_main(["materialize", "--manifests", str(root), "--output", str(out), "--workers", "2"]) == 0
    assert time.monotonic() - start < 120
    server.close()
    reports = [json.loads(line) for p in out.joinpath("reports").rglob("*.jsonl")
               for line in p.read_text(encoding="utf-8").splitlines()]
    by_id = {r["utterance_id"]: r for r in reports if r["utterance_id"]}
    assert set(by_id) == {"live", "silent", "fifo"}
    assert "playlist" in by_id["live"]["error"].lower()
    featurized = {r["utterance_id"] for s in SPLITS for r in RecordStore(out / "record_cache" / f"{s}.jsonl")}
    assert {u for u, *_ in GOOD} <= featurized
    from asr_assets import ShardedParquetFeatureCache

    for split in SPLITS:
        cache = ShardedParquetFeatureCache(out / "feature-cache" / split)
        for record in RecordStore(out / "record_cache" / f"{split}.jsonl"):
            if record["utterance_id"] in {u for u, *_ in GOOD}:
                assert cache.load(record["utterance_id"]) is not None
