"""Upstream's command lines as drop-ins: ``asr-assets warm`` and ``asr-assets record-cache``.

Covers: each input mode of ``warm`` on real speech (the bundled sample and ``data/en_hf``) —
``--input`` (ids from the ``id`` column, else the *unresolved* audio path, else the row number
counted across inputs; relative paths against the file's folder; bytes preferred over the path),
``--input-folder`` (repeatable, Parquet only, relative paths against the folder given, not the
file's own folder) and ``--input-record-cache`` (the JSONL's ``utterance_id``, else the line
number; blobs resolved against the JSONL's folder) — with every key found both by an
independent spec-§3 reader (``independent_features`` of test_graph) and by
``ShardedParquetFeatureCache``, and the features equal to ``compute_features`` of the decoded
audio; a re-run computes nothing; ``--limit``, ``--fail-fast`` (exit 1) and the ``--w2v-*`` keys.
``record-cache`` with upstream's flags writes, for the same sources, a record cache
byte-identical (JSONL, sidecars, blobs) to the graph's ``record_cache`` asset, passes upstream's
own record-cache vector (spec §1.8), and honours seed, fractions, caps and lowercasing. Both
commands run without ``DAGSTER_HOME`` (no Dagster imported, no folder created) and, with an
existing one, record their materializations there. Flag values the library cannot honour (or
that upstream silently drops) and upstream's validation rules are exit-2 one-line errors naming
the flag, before anything is written. ``ASR_ASSETS_LOG=debug`` and ``-v`` show debug lines (worker decodes, batches,
shard flushes); ``trace`` / ``-vv`` one line per utterance; the default shows neither.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from asr_assets.audio import load_audio
from asr_assets.cli import main as cli_main
from asr_assets.feature_cache import ShardedParquetFeatureCache
from asr_assets.frontends import compute_features, get_frontend
from asr_assets.record_cache import SIDECARS, RecordStore, sidecar_path
from asr_assets.records import RecordConfig, assign_split
from asr_assets.settings import bundled_sample_manifests
from asr_assets_tests.test_graph import SQUEEZEFORMER_HASH, independent_features

SAMPLE_HF, SAMPLE_CV = (Path(p) for p in bundled_sample_manifests())
SAMPLE_PARQUET = SAMPLE_HF / "data" / "train-00000-of-00001.parquet"


@pytest.fixture(autouse=True)
def _restore_logging():
    """cli_main configures the ``asr_assets`` logger; leave it as it was for the next test."""
    root = logging.getLogger("asr_assets")
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("asr_assets."):
            logging.getLogger(name).setLevel(logging.NOTSET)


def _error_line(capsys) -> str:
    """The only non-empty stderr line (asserts there is exactly one)."""
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def _key(utterance_id: str, frontend_hash: str = SQUEEZEFORMER_HASH) -> str:
    return hashlib.sha256(f"{utterance_id}:{frontend_hash}".encode()).hexdigest()


def _cached_keys(split_root: Path) -> set[str]:
    """Live keys of every part, read with pyarrow only (spec §3.1 layout, §3.3 schema)."""
    keys = set()
    for part in sorted((split_root / "feature_shards").glob("features_*/part_*.parquet")):
        for row in pq.read_table(part, columns=["key", "deleted"]).to_pylist():
            (keys.discard if row["deleted"] else keys.add)(row["key"])
    return keys


def _check_cache(split_root: Path, expected: dict[str, object], frontend="squeezeformer") -> None:
    """Every utterance id of ``expected`` (id -> audio source) is cached under upstream's key, found
    by the independent reader and by ShardedParquetFeatureCache, with the features of its audio;
    nothing else is cached."""
    fe = get_frontend(frontend) if isinstance(frontend, str) else frontend
    fhash = fe.frontend_hash()
    assert _cached_keys(split_root) == {_key(u, fhash) for u in expected}
    cache = ShardedParquetFeatureCache(split_root)
    for utterance_id, source in expected.items():
        mine = independent_features(split_root, utterance_id, fhash)
        theirs = cache.load(utterance_id, fe)
        assert mine is not None and theirs is not None, utterance_id
        np.testing.assert_array_equal(mine, theirs)
        np.testing.assert_allclose(mine, compute_features(load_audio(source), 16000, fe), atol=1e-5)


def _sample_rows() -> list[dict]:
    return pq.read_table(SAMPLE_PARQUET).to_pylist()


def _warm(*args: str) -> list[str]:
    return ["warm", "--threads", "2", *args]


# ----------------------------------------------------------------------------- warm: --input


def test_warm_input_keys_by_id_and_rerun_computes_nothing(tmp_path, capsys):
    root = tmp_path / "fc" / "train"
    assert cli_main(_warm("--input", str(SAMPLE_PARQUET), "--cache-dir", str(root))) == 0
    rows = _sample_rows()
    _check_cache(root, {r["id"]: r["audio"]["bytes"] for r in rows})
    parts = {p: p.read_bytes() for p in root.rglob("part_*.parquet")}
    assert cli_main(_warm("--input", str(SAMPLE_PARQUET), "--cache-dir", str(root))) == 0
    assert {p: p.read_bytes() for p in root.rglob("part_*.parquet")} == parts  # nothing recomputed or appended
    err = capsys.readouterr().err
    assert "written=0" in err and f"already cached {len(rows)}" in err


def _idless_manifest(tmp_path: Path) -> tuple[Path, dict[str, object]]:
    """A Parquet manifest without an id column, next to ``clips/``: relative ``path`` rows, an
    absolute one, ``audio`` bytes with and without a path, no audio at all, a URL. Returns the
    manifest and ``{expected utterance id: audio}`` of the rows that have features."""
    rows = _sample_rows()
    clips = tmp_path / "corpus" / "clips"
    clips.mkdir(parents=True)
    for r in rows[:4]:
        (clips / r["audio"]["path"]).write_bytes(r["audio"]["bytes"])
    table = pa.table({
        "path": [f"clips/{rows[0]['audio']['path']}", f"./clips/{rows[1]['audio']['path']}",
                 str(clips / rows[2]['audio']['path']), None, None, None, "https://example.invalid/a.flac"],
        "audio": [None, None, None, {"bytes": rows[4]["audio"]["bytes"], "path": "nested/x.flac"},
                  {"bytes": rows[5]["audio"]["bytes"], "path": None}, None, None],
        "text": ["t"] * 7,
    })
    manifest = tmp_path / "corpus" / "m.parquet"
    pq.write_table(table, manifest)
    expected = {f"clips/{rows[0]['audio']['path']}": clips / rows[0]["audio"]["path"],
                f"./clips/{rows[1]['audio']['path']}": clips / rows[1]["audio"]["path"],  # unresolved, as written
                str(clips / rows[2]["audio"]["path"]): clips / rows[2]["audio"]["path"],
                "nested/x.flac": rows[4]["audio"]["bytes"],  # audio.path is the id; the bytes are decoded
                "5": rows[5]["audio"]["bytes"]}  # neither id nor path: the row number
    return manifest, expected


def test_warm_input_without_ids_uses_the_unresolved_path_then_the_row_number(tmp_path, capsys):
    manifest, expected = _idless_manifest(tmp_path)
    root = tmp_path / "fc" / "train"
    assert cli_main(_warm("--input", str(manifest), "--cache-dir", str(root))) == 0
    _check_cache(root, expected)
    err = capsys.readouterr().err
    assert "skipping row 7" in err and "remote audio URLs are not supported" in err  # row 6: no audio, silently
    assert "scanned=7 written=5 skipped=2" in err


def test_warm_prefers_embedded_bytes_over_the_path(tmp_path):
    rows = _sample_rows()
    (tmp_path / "wrong.flac").write_bytes(rows[1]["audio"]["bytes"])
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({"id": ["u"], "path": ["wrong.flac"],
                             "audio": [{"bytes": rows[0]["audio"]["bytes"], "path": "ignored.flac"}]}), manifest)
    root = tmp_path / "fc"
    assert cli_main(_warm("--input", str(manifest), "--cache-dir", str(root))) == 0
    _check_cache(root, {"u": rows[0]["audio"]["bytes"]})


def test_warm_source_base_and_limit(tmp_path, capsys):
    manifest, expected = _idless_manifest(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(tmp_path / "corpus" / "clips", elsewhere / "clips")
    shutil.rmtree(tmp_path / "corpus" / "clips")  # only --source-base can find the relative ones now
    root = tmp_path / "fc"
    assert cli_main(_warm("--input", str(manifest), "--cache-dir", str(root), "--source-base", str(elsewhere),
                          "--limit", "2")) == 0
    _check_cache(root, {k: elsewhere / "clips" / Path(str(v)).name for k, v in list(expected.items())[:2]})
    assert "scanned=2 written=2" in capsys.readouterr().err


# ----------------------------------------------------------------------------- warm: --input-folder


def test_warm_input_folders_resolve_against_the_folder_and_count_rows_across_files(tmp_path, test_data):
    rows = _sample_rows()
    folder = tmp_path / "d"
    (folder / "clips").mkdir(parents=True)
    (folder / "nested" / "deeper").mkdir(parents=True)
    (folder / "clips" / "a.flac").write_bytes(rows[0]["audio"]["bytes"])
    # Relative to the folder given (d/), not to the file's own folder (d/nested/deeper/).
    pq.write_table(pa.table({"path": ["clips/a.flac"]}), folder / "nested" / "deeper" / "b.parquet")
    pq.write_table(pa.table({"audio": [rows[1]["audio"]["bytes"], rows[2]["audio"]["bytes"]]}),  # plain binary
                   folder / "nested" / "A.PARQUET")  # any case of the extension; read first (sorted)
    (folder / "notes.tsv").write_text("id\tpath\nx\tclips/a.flac\n")  # --input-folder reads Parquet only
    root = tmp_path / "fc" / "validation"
    assert cli_main(_warm("--input-folder", str(folder), "--input-folder", str(test_data / "en_hf"),
                          "--cache-dir", str(root), "--batch-size", "2", "--rows-per-part", "3")) == 0
    en_hf = pq.read_table(test_data / "en_hf" / "data" / "train-00000-of-00001.parquet").to_pylist()
    expected = {r["id"]: r["audio"]["bytes"] for r in en_hf}
    # sorted by path across folders: asr_assets_tests/... before /tmp/...; rows counted across files
    first = Path(test_data / "en_hf").parts < folder.parts
    offset = len(en_hf) if first else 0
    expected.update({str(offset + 1): rows[1]["audio"]["bytes"], str(offset + 2): rows[2]["audio"]["bytes"],
                     "clips/a.flac": folder / "clips" / "a.flac"})
    _check_cache(root, expected)
    assert max(pq.ParquetFile(p).metadata.num_rows for p in root.rglob("part_*.parquet")) <= 3


# ----------------------------------------------------------------------------- warm: --input-record-cache


def test_warm_input_record_cache_uses_the_loaders_keys(tmp_path, capsys):
    rc = tmp_path / "rc"
    assert cli_main(["record-cache", "--dataset-source", str(SAMPLE_HF), "--dataset-source", str(SAMPLE_CV),
                     "--record-cache-dir", str(rc)]) == 0
    root = tmp_path / "fc" / "train"
    assert cli_main(_warm("--input-record-cache", str(rc / "train.jsonl"), "--cache-dir", str(root))) == 0
    store = RecordStore(rc / "train.jsonl")
    assert any(r["audio_blob_path"] for r in store) and any(r["audio_blob_path"] is None for r in store)
    _check_cache(root, {r["utterance_id"]: r["audio_blob_abspath"] or r["audio_path"] for r in store})
    capsys.readouterr()

    # A hand-written JSONL: no utterance_id -> the line number; a relative blob; a bad line; no audio.
    blob = rc / "train_audio_blobs"
    name = next(p.name for p in blob.iterdir())
    clip = SAMPLE_CV / "clips" / "jfk.flac"
    lines = [json.dumps({"audio_path": str(clip)}), "not json",
             json.dumps({"utterance_id": "b", "audio_blob_path": f"train_audio_blobs/{name}", "audio_path": "x.flac"}),
             json.dumps({"utterance_id": "none"}), json.dumps({"utterance_id": "", "audio_path": str(clip)})]
    (rc / "own.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    own = tmp_path / "fc2"
    assert cli_main(_warm("--input-record-cache", str(rc / "own.jsonl"), "--cache-dir", str(own))) == 0
    _check_cache(own, {"1": clip, "b": blob / name, "5": clip})
    err = capsys.readouterr().err
    assert "skipping row 2" in err and "failed to parse record-cache JSON row 2" in err


def test_warm_fail_fast_exits_1_after_writing_what_was_computed(tmp_path, capsys):
    clip = SAMPLE_CV / "clips" / "jfk.flac"
    lines = [json.dumps({"utterance_id": "good", "audio_path": str(clip)}),
             json.dumps({"utterance_id": "missing", "audio_path": str(tmp_path / "nope.flac")})]
    (tmp_path / "t.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    root = tmp_path / "fc"
    assert cli_main(_warm("--input-record-cache", str(tmp_path / "t.jsonl"), "--cache-dir", str(root),
                          "--fail-fast")) == 1
    err = capsys.readouterr().err.strip().splitlines()  # log lines, then the error
    assert err[-1].startswith("asr-assets: error: --fail-fast: row 2 (utterance_id=missing"), err
    _check_cache(root, {"good": clip})


def test_warm_w2v_flags_change_the_key(tmp_path):
    root = tmp_path / "fc"
    assert cli_main(_warm("--input", str(SAMPLE_PARQUET), "--cache-dir", str(root), "--frontend", "w2v-bert",
                          "--w2v-model-source", "/models/w2v", "--n-mels", "80", "--limit", "2")) == 0
    fe = get_frontend("w2v-bert", model_source="/models/w2v")
    assert fe.frontend_hash() != get_frontend("w2v-bert").frontend_hash()
    _check_cache(root, {r["id"]: r["audio"]["bytes"] for r in _sample_rows()[:2]}, fe)


# ----------------------------------------------------------------------------- record-cache


def _tree_bytes(folder: Path, names) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in names}


def test_record_cache_is_byte_identical_to_the_graphs(tmp_path):
    import dagster as dg

    from asr_assets.definitions import build_graph
    from asr_assets.settings import Settings

    sources = (str(SAMPLE_HF), str(SAMPLE_CV))
    settings = Settings(manifests=sources, output=str(tmp_path / "graph"))
    graph = build_graph(settings)
    instance = dg.DagsterInstance.ephemeral()
    for split in ("train", "validation"):
        assert dg.materialize([graph.manifests, graph.record_cache, *graph.checks[:1]], selection=[graph.record_cache],
                              instance=instance, resources=graph.resources, partition_key=split).success
    rc = tmp_path / "upstream"
    assert cli_main(["record-cache", "--dataset-source", sources[0], "--dataset-source", sources[1],
                     "--record-cache-dir", str(rc), "--seed", "13", "--val-fraction", "0.1", "--test-fraction", "0.1",
                     "--min-transcript-chars", "1", "--max-transcript-chars", "400", "--max-symbol-ratio", "0.5",
                     "--min-audio-duration-sec", "0.01", "--max-audio-duration-sec", "30",
                     "--tokenizer", "sentencepiece", "--require-readable-audio", "--progress-interval", "1000",
                     "--threads", "4"]) == 0
    graph_dir = tmp_path / "graph" / "record_cache"
    for split in ("train", "validation"):
        names = [f"{split}.jsonl", *(f"{split}.jsonl{suffix}" for suffix in SIDECARS)]
        assert _tree_bytes(rc, names) == _tree_bytes(graph_dir, names), split
        assert len(RecordStore(rc / f"{split}.jsonl")) > 0
    blobs = sorted(p.relative_to(rc) for p in rc.glob("*_audio_blobs/*"))
    assert blobs and blobs == sorted(p.relative_to(graph_dir) for p in graph_dir.glob("*_audio_blobs/*"))
    assert all((rc / b).read_bytes() == (graph_dir / b).read_bytes() for b in blobs)
    assert not (rc / "test.jsonl").exists()  # upstream writes no test split


def _wav(path: Path, seconds: float = 1.0, rate: int = 16000) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * rate)) / rate
    sf.write(path, (0.1 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), rate)


def test_record_cache_passes_upstreams_own_vector(tmp_path):
    """tests/test_rust_feature_extension.py::test_rust_record_cache_subcommand_matches_python_store (spec §1.8),
    through the same command line."""
    train, val = tmp_path / "train", tmp_path / "val"
    for d in (train, val):
        _wav(d / "audio" / "a.wav")
        _wav(d / "audio" / "b.wav")
    (train / "train.tsv").write_text("id\tpath\tsentence\tduration\tclient_id\n"
                                     "utt1\taudio/a.wav\tПривіт , світе!\t1.0\tspk1\n"
                                     "utt2\taudio/b.wav\tДругий запис\t1.5\tspk2\n", encoding="utf-8")
    (val / "val.tsv").write_text("id\tpath\tsentence\tduration\tclient_id\nval1\taudio/a.wav\tПеревірка\t2.0\tspk3\n",
                                 encoding="utf-8")
    rc = tmp_path / "rc"
    assert cli_main(["build-record-cache", "--dataset-source", str(train / "train.tsv"),
                     "--validation-dataset-source", str(val), "--record-cache-dir", str(rc),
                     "--require-readable-audio"]) == 0
    records = list(RecordStore(rc / "train.jsonl"))
    assert len(records) == 2 and len(RecordStore(rc / "validation.jsonl")) == 1
    assert records[0]["transcript"] == "Привіт, світе!" and records[0]["utterance_id"] == "utt1"
    assert records[0]["estimated_frames"] == 101 and records[0]["num_samples"] == 16000
    for split, n in (("train", 2), ("validation", 1)):
        for suffix, dtype in SIDECARS.items():
            assert sidecar_path(rc / f"{split}.jsonl", suffix).stat().st_size == n * np.dtype(dtype).itemsize


def test_record_cache_honours_seed_fractions_caps_and_lowercasing(tmp_path):
    rc = tmp_path / "rc"
    assert cli_main(["record-cache", "--dataset-source", str(SAMPLE_HF), "--dataset-source", str(SAMPLE_CV),
                     "--record-cache-dir", str(rc), "--seed", "9", "--val-fraction", "0.4", "--test-fraction", "0",
                     "--tokenizer", "character", "--max-val-samples", "3"]) == 0
    config = RecordConfig(seed=9, val_fraction=0.4, test_fraction=0.0)  # 16 train, 6 validation rows
    train, validation = list(RecordStore(rc / "train.jsonl")), list(RecordStore(rc / "validation.jsonl"))
    assert len(validation) == 3 and len(train) > 3
    for split, records in (("train", train), ("validation", validation)):
        for r in records:
            assert assign_split(r["speaker_id"] or r["utterance_id"], config) == split
            assert r["transcript"] == r["transcript"].lower()
    assert any(c.isupper() for c in pq.read_table(SAMPLE_PARQUET)["text"].to_pylist()[0])
    # alignment bounds: nobody speaks 1000 words per second
    rc2 = tmp_path / "rc2"
    assert cli_main(["record-cache", "--dataset-source", str(SAMPLE_HF), "--record-cache-dir", str(rc2),
                     "--val-fraction", "0", "--test-fraction", "0", "--max-duration-per-word", "0.001"]) == 2
    assert len(RecordStore(rc2 / "train.jsonl")) == 0
    report = [json.loads(line) for line in (rc2 / "reports" / "records-train.jsonl").read_text().splitlines()]
    assert report and all("s per word outside" in r["error"] for r in report)


# ----------------------------------------------------------------------------- Dagster or not


def test_without_dagster_home_nothing_of_dagster_is_touched(tmp_path):
    warm = ["warm", "--threads", "1", "--input", str(SAMPLE_PARQUET), "--limit", "2", "--cache-dir", str(tmp_path / "fc")]
    record_cache = ["record-cache", "--dataset-source", str(SAMPLE_CV), "--dataset-source", str(SAMPLE_HF),
                    "--record-cache-dir", str(tmp_path / "rc")]
    code = ("import sys\nfrom asr_assets.cli import main\n"
            f"status = main({warm!r}) + main({record_cache!r})\n"
            "print(status, 'dagster' in sys.modules)\n")
    env = {k: v for k, v in os.environ.items() if k != "DAGSTER_HOME"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["0", "False"]
    assert not (tmp_path / "dagster_home").exists()


def test_with_dagster_home_materializations_are_recorded(tmp_path, monkeypatch):
    import dagster as dg

    home = tmp_path / "dagster_home"  # the conftest's DAGSTER_HOME, which does not exist yet
    assert os.environ["DAGSTER_HOME"] == str(home)
    rc, root = tmp_path / "rc", tmp_path / "fc" / "train"
    assert cli_main(["record-cache", "--dataset-source", str(SAMPLE_HF), "--dataset-source", str(SAMPLE_CV),
                     "--record-cache-dir", str(rc)]) == 0
    assert not home.exists()  # no instance configured: none created
    home.mkdir()
    assert cli_main(["record-cache", "--dataset-source", str(SAMPLE_HF), "--dataset-source", str(SAMPLE_CV),
                     "--record-cache-dir", str(rc)]) == 0
    assert cli_main(_warm("--input-record-cache", str(rc / "train.jsonl"), "--cache-dir", str(root))) == 0
    instance = dg.DagsterInstance.get()
    records = instance.fetch_materializations(dg.AssetKey("record_cache"), limit=10).records
    by_split = {r.asset_materialization.partition: r.asset_materialization for r in records}
    assert set(by_split) == {"train", "validation"}
    train_sha = hashlib.sha256((rc / "train.jsonl").read_bytes()).hexdigest()
    assert by_split["train"].tags["dagster/data_version"] == train_sha[:16]
    assert by_split["train"].metadata["dagster/row_count"].value == len(RecordStore(rc / "train.jsonl"))
    features = instance.fetch_materializations(dg.AssetKey("squeezeformer_features"), limit=100).records
    store = RecordStore(rc / "train.jsonl")
    shards = {int(_key(r["utterance_id"])[:8], 16) % 64 for r in store}
    assert {r.asset_materialization.partition for r in features} == {f"{s:02d}|train" for s in shards}
    assert sum(r.asset_materialization.metadata["computed"].value for r in features) == len(store)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("argv, named", [
    (["warm", "--frontend", "w2v-bert", "--n-fft", "512"], "--n-fft"),
    (["warm", "--frontend", "w2v-bert", "--n-mels", "64", "--w2v-feature-size", "64"], "--w2v-feature-size"),
    (["warm", "--w2v-stride", "3"], "--w2v-stride"),
    (["warm", "--frontend", "squeezformer"], "did you mean 'squeezeformer'"),
    (["warm", "--n-fft", "100", "--win-length", "400"], "win_length"),
    (["warm", "--input-folder", "{tmp}", "--input", "{parquet}"], "exactly one of --input, --input-folder"),
    (["warm", "--input-record-cache", "{tmp}/x.jsonl"], "--input-record-cache must point to a JSONL file"),
    (["warm", "--input-folder", "{tmp}"], "--input-folder contains no parquet files"),
    (["warm", "--source-base", "{tmp}/nope"], "--source-base"),
    (["record-cache", "--val-fraction", "0.6", "--test-fraction", "0.5"], "--val-fraction + --test-fraction"),
    (["record-cache", "--min-duration-per-word", "0.2", "--max-duration-per-word", "0.1"], "--max-duration-per-word"),
    (["record-cache", "--min-audio-duration-sec", "0"], "--min-audio-duration-sec"),
    (["record-cache", "--min-transcript-chars", "0"], "--min-transcript-chars"),
    (["record-cache", "--dataset-source", "{tmp}/nope"], "does not exist"),
])
def test_values_the_library_cannot_honour_are_one_line_exit_2(tmp_path, capsys, argv, named):
    fill = lambda a: a.format(tmp=tmp_path, parquet=SAMPLE_PARQUET)  # noqa: E731
    argv = [fill(a) for a in argv]
    out = tmp_path / "out"
    if argv[0] == "warm":
        if not any(a.startswith("--input") for a in argv):
            argv += ["--input", str(SAMPLE_PARQUET)]
        argv += ["--cache-dir", str(out)]
    else:
        if "--dataset-source" not in argv:
            argv += ["--dataset-source", str(SAMPLE_CV)]
        argv += ["--record-cache-dir", str(out)]
    assert cli_main(argv) == 2
    line = _error_line(capsys)
    assert line.startswith("asr-assets: error: ") and named in line, line
    assert not out.exists() or not any(out.rglob("*.parquet")) and not any(out.rglob("*.jsonl"))


def test_bad_log_spec_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ASR_ASSETS_LOG", "loud")
    assert cli_main(["frontends"]) == 2
    assert "ASR_ASSETS_LOG" in _error_line(capsys)


def test_upstream_help_imports_nothing_heavy_and_w2v_defaults_are_the_configs():
    from asr_assets.cli._common import W2V_FLAG_DEFAULTS
    from asr_assets.frontends.w2v_bert import W2VBertConfig

    assert W2V_FLAG_DEFAULTS == {k: getattr(W2VBertConfig(), k) for k in W2V_FLAG_DEFAULTS}
    code = ("import sys, json\nfrom asr_assets.cli import main\nout = []\n"
            "for argv in (['warm', '--help'], ['record-cache', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit as exc:\n        out.append(exc.code)\n"
            "print(json.dumps([out, [m for m in ('numpy', 'pyarrow', 'dagster', 'scipy') if m in sys.modules]]))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    codes, loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert codes == [0, 0] and loaded == [], result.stderr
    assert "(default: 1024)" in result.stdout and "(default: facebook/w2v-bert-2.0)" in result.stdout
    assert "--max-duration-per-word" in result.stdout and "(default: 13)" in result.stdout


# ----------------------------------------------------------------------------- logging


def _cli(tmp_path: Path, *argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("DAGSTER_HOME", "ASR_ASSETS_LOG")}
    result = subprocess.run([sys.executable, "-m", "asr_assets.cli", *argv], capture_output=True, text=True,
                            timeout=300, env={**environ, **(env or {})}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    return result


_DEBUG_LINES = ("DEBUG asr_assets.extraction] decoded utterance_id=", "DEBUG asr_assets.feature_cache] flushed cache shard=",
                "DEBUG asr_assets.warm] processing batch input=")


@pytest.mark.parametrize("how", ["default", "env-debug", "-v", "env-trace", "-vv"])
def test_log_levels(tmp_path, how):
    flags = {"-v": ["-v"], "-vv": ["-vv"]}.get(how, [])
    env = {"env-debug": {"ASR_ASSETS_LOG": "debug"}, "env-trace": {"ASR_ASSETS_LOG": "trace"}}.get(how)
    result = _cli(tmp_path, *flags, "warm", "--threads", "2", "--input", str(SAMPLE_PARQUET), "--limit", "3",
                  "--cache-dir", str(tmp_path / "fc"), env=env)
    err = result.stderr
    assert result.stdout == ""
    assert "INFO  asr_assets.cli] complete scanned=3 written=3 skipped=0" in err
    debug = how != "default"
    trace = how in ("env-trace", "-vv")
    for line in _DEBUG_LINES:
        assert (line in err) == debug, (line, err)
    assert (err.count("DEBUG asr_assets.extraction] decoded utterance_id=") == 3) == debug
    rows = [line for line in err.splitlines() if "TRACE asr_assets.warm] row " in line]
    assert len(rows) == (3 if trace else 0), err
    if trace:
        ids = [r["id"] for r in _sample_rows()[:3]]
        assert [line.split("utterance_id=")[1].split()[0] for line in rows] == ids


def test_record_cache_trace_has_a_line_per_row_and_progress_is_info(tmp_path):
    result = _cli(tmp_path, "record-cache", "--dataset-source", str(SAMPLE_CV), "--dataset-source", str(SAMPLE_HF),
                  "--record-cache-dir", str(tmp_path / "rc"), "--progress-interval", "10",
                  env={"ASR_ASSETS_LOG": "info,asr_assets.pipeline=trace"})
    err = result.stderr
    assert "INFO  asr_assets.pipeline] record cache progress split=train scanned=10" in err
    per_row = [line for line in err.splitlines() if "TRACE asr_assets.pipeline] record cache train: utterance_id=" in line]
    assert len(per_row) == len(RecordStore(tmp_path / "rc" / "train.jsonl"))
    assert " DEBUG " not in err.replace("TRACE", "")  # only asr_assets.pipeline was raised, to trace
