"""Write reference feature vectors for the frontend agreement tests.

Run with a scratch venv that has torch, torchaudio, transformers, soundfile, soxr and pyarrow
(none of them is a project dependency)::

    /work/refvenv/bin/python scripts/make_reference_vectors.py [--data ../shared/data]

For each of six real speech clips (trimmed to <= 4.5 s, 16 kHz mono) it writes
``asr_assets_tests/data/ref_<clip>.npz`` holding:

* ``samples``: float32 (num_samples,) in [-1, 1] at 16 kHz, the exact test input;
* ``squeezeformer``: float32 (num_frames, 80), upstream ``AudioFeaturizer()`` restated in torch
  (signal normalization, pre-emphasis 0.97, torchaudio ``MelSpectrogram`` with its defaults -
  HTK mel, norm=None, centre, reflect, power 2 - then ``log(clamp_min(1e-5))`` and per-column
  standardization with the biased std clamped at 1e-5);
* ``zipformer``: float32 (num_frames, 80), the same without pre-emphasis or normalization;
* ``w2v_bert``: float32 (num_rows, 160), ``transformers`` ``SeamlessM4TFeatureExtractor
  (padding_value=1.0)`` ``input_features[0]``;
* ``versions``: library versions used.

Clips: the JFK inaugural line (16 kHz FLAC); CMU ARCTIC a0007, a LibriVox line (16 kHz) and a
48 kHz praatio utterance from the ``en_hf`` parquet (embedded bytes, decoded with soundfile,
resampled with soxr); one
Dutch Common Voice-layout Ogg/Vorbis clip (22.05 kHz stereo, averaged, resampled), and the JFK
clip at 8 kHz upsampled to 16 kHz (band-limited: mel bands above 4 kHz are constant).
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import soundfile as sf
import soxr
import torch
import torchaudio
import transformers

MAX_SECONDS = 4.5
SR = 16000


def _to_16k(data: np.ndarray, sr: int) -> np.ndarray:
    data = np.asarray(data, dtype=np.float32)
    if data.ndim == 2:
        data = data.mean(axis=1)
    if sr != SR:
        data = soxr.resample(data, sr, SR, quality="HQ")
    return np.ascontiguousarray(data[: int(MAX_SECONDS * SR)], dtype=np.float32)


def load_clips(data_dir: Path) -> dict[str, np.ndarray]:
    """Return {clip name: float32 (num_samples,) at 16 kHz}."""
    clips: dict[str, np.ndarray] = {}
    audio_dir = data_dir / "formats" / "audio"
    x, sr = sf.read(audio_dir / "jfk__flac_16000_mono.flac", dtype="float32")
    clips["jfk16k"] = _to_16k(x, sr)
    table = pq.read_table(data_dir / "en_hf" / "data" / "train-00000-of-00001.parquet")
    rows = table.column("audio").to_pylist()
    by_path = {row["path"]: row["bytes"] for row in rows}
    x, sr = sf.read(io.BytesIO(by_path["arctic_a0007.wav"]), dtype="float32")
    clips["arctic_a0007"] = _to_16k(x, sr)
    for name in ("ps_librivox_0890.wav", "praatio_mary.wav"):  # 16 kHz LibriVox; 48 kHz
        x, sr = sf.read(io.BytesIO(by_path[name]), dtype="float32")
        clips[f"en_hf_{Path(name).stem}"] = _to_16k(x, sr)
    ogg = sorted((data_dir / "nl_cv" / "clips").glob("*.ogg"))[0]
    x, sr = sf.read(ogg, dtype="float32")
    clips[f"nl_cv_{ogg.stem}"] = _to_16k(x, sr)
    x, sr = sf.read(audio_dir / "jfk__flac_8000_mono.flac", dtype="float32")
    clips["jfk8k_up16k"] = _to_16k(x, sr)
    return clips


def torch_logmel(x: np.ndarray, preemphasis: float, normalize: bool) -> np.ndarray:
    """Upstream ``AudioFeaturizer.forward`` (squeezeformer_pytorch ``frontend.py``) in torch."""
    mel = torchaudio.transforms.MelSpectrogram(
        sample_rate=SR, n_fft=400, win_length=400, hop_length=160, n_mels=80
    )
    w = torch.from_numpy(x.copy())
    if normalize:
        w = w - w.mean()
        w = w / w.abs().amax().clamp_min(1e-6)
    if preemphasis > 0:
        w = torch.cat([w[:1], w[1:] - preemphasis * w[:-1]], dim=0)
    if w.numel() < 400:
        w = torch.nn.functional.pad(w, (0, 400 - w.numel()))
    feats = torch.log(mel(w).clamp_min(1e-5)).transpose(0, 1)
    if normalize:
        mean = feats.mean(dim=0, keepdim=True)
        std = feats.std(dim=0, keepdim=True, unbiased=False).clamp_min(1e-5)
        feats = (feats - mean) / std
    return feats.numpy().astype(np.float32)


def hf_w2v_bert(x: np.ndarray) -> np.ndarray:
    """``SeamlessM4TFeatureExtractor(padding_value=1.0)`` features, float32 (rows, 160)."""
    fe = transformers.SeamlessM4TFeatureExtractor(padding_value=1.0)
    out = fe(x, sampling_rate=SR, return_tensors="np")
    return np.asarray(out["input_features"][0], dtype=np.float32)


def main() -> None:
    here = Path(__file__).resolve().parent.parent
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=here.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=here / "asr_assets_tests" / "data")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    versions = json.dumps(
        {
            "torch": torch.__version__,
            "torchaudio": torchaudio.__version__,
            "transformers": transformers.__version__,
            "soxr": soxr.__version__,
            "numpy": np.__version__,
        }
    )
    total = 0
    for name, x in load_clips(args.data).items():
        path = args.out / f"ref_{name}.npz"
        np.savez_compressed(
            path,
            samples=x,
            squeezeformer=torch_logmel(x, 0.97, True),
            zipformer=torch_logmel(x, 0.0, False),
            w2v_bert=hf_w2v_bert(x),
            versions=np.array(versions),
        )
        size = path.stat().st_size
        total += size
        print(f"{path.name}: {x.shape[0] / SR:.2f} s, {size / 1e3:.0f} kB")
    print(f"total {total / 1e6:.2f} MB; {versions}")


if __name__ == "__main__":
    main()
