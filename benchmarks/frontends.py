"""Single-thread speed of the asr_assets frontends against reference implementations.

Usage (anchors are measured only if installed: torch/torchaudio, librosa, transformers,
kaldi-native-fbank)::

    PYTHONPATH=. python benchmarks/frontends.py [--data asr_assets_tests/data] [--minutes 3]
        [--rounds 5] [--write-readme]

Input: real speech (the JFK clip, the ``en_hf`` parquet utterances and ``nl_cv`` Ogg clips,
decoded with soundfile, resampled to 16 kHz with soxr, concatenated) cut into 10 s
utterances. Every implementation is run over the same utterances in interleaved rounds; the
table gives the median speed in x real time (seconds of audio per second of this process's
CPU time, which on one thread equals wall time on an idle machine and is less disturbed by other
load on a shared 2-core machine; the median wall-clock figure is shown too) and the ratio of
each asr_assets frontend to each anchor computing the same features.

Anchors:
    * ``torchaudio MelSpectrogram``: upstream ``AudioFeaturizer`` (normalization, pre-emphasis,
      MelSpectrogram, log, per-column standardization), per utterance.
    * ``librosa``: ``melspectrogram(htk=True, norm=None, center=True, pad_mode="reflect",
      power=2)`` + log (+ the same normalization for squeezeformer), per utterance.
    * ``HF SeamlessM4T``: ``SeamlessM4TFeatureExtractor(padding_value=1.0)``, per utterance.
    * ``kaldi-native-fbank``: ``OnlineFbank`` with HF-equivalent options + normalization and
      stacking, per utterance.
    * ``torchaudio kaldi.fbank``: ``torchaudio.compliance.kaldi.fbank`` with HF-equivalent
      options + normalization and stacking, per utterance.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import io  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from asr_assets.frontends import get_frontend  # noqa: E402

SR = 16000
UTT_SECONDS = 10


def load_speech(data_dir: Path, minutes: float) -> list[np.ndarray]:
    """Real speech as float32 (160000,) 10 s utterances at 16 kHz, tiled to ``minutes``."""
    import soundfile as sf
    import soxr

    pieces: list[np.ndarray] = []

    def add(data: np.ndarray, sr: int) -> None:
        data = np.asarray(data, dtype=np.float32)
        if data.ndim == 2:
            data = data.mean(axis=1)
        if sr != SR:
            data = soxr.resample(data, sr, SR)
        pieces.append(data.astype(np.float32))

    add(*sf.read(data_dir / "formats" / "audio" / "jfk__flac_16000_mono.flac", dtype="float32"))
    parquet = data_dir / "en_hf" / "data" / "train-00000-of-00001.parquet"
    try:
        import pyarrow.parquet as pq

        for row in pq.read_table(parquet, columns=["audio"]).column("audio").to_pylist():
            add(*sf.read(io.BytesIO(row["bytes"]), dtype="float32"))
    except Exception as exc:  # pragma: no cover - benchmark input is best effort
        print(f"(skipping en_hf parquet: {exc})")
    for path in sorted((data_dir / "nl_cv" / "clips").glob("*.ogg"))[:40]:
        add(*sf.read(path, dtype="float32"))
    speech = np.concatenate(pieces)
    need = int(minutes * 60 * SR)
    reps = -(-need // speech.shape[0])
    speech = np.tile(speech, reps)[:need]
    n = UTT_SECONDS * SR
    return [np.ascontiguousarray(speech[i : i + n]) for i in range(0, need - n + 1, n)]


# --------------------------------------------------------------------------------------------
# Anchors
# --------------------------------------------------------------------------------------------


def _torch_anchors() -> dict[str, dict[str, Callable]]:
    import torch
    import torchaudio

    torch.set_num_threads(1)
    mel = torchaudio.transforms.MelSpectrogram(
        sample_rate=SR, n_fft=400, win_length=400, hop_length=160, n_mels=80
    )

    def upstream(x: np.ndarray, pre: float, norm: bool) -> np.ndarray:
        with torch.inference_mode():
            w = torch.from_numpy(x)
            if norm:
                w = w - w.mean()
                w = w / w.abs().amax().clamp_min(1e-6)
            if pre > 0:
                w = torch.cat([w[:1], w[1:] - pre * w[:-1]])
            f = torch.log(mel(w).clamp_min(1e-5)).transpose(0, 1)
            if norm:
                f = (f - f.mean(0, keepdim=True)) / f.std(0, keepdim=True, unbiased=False).clamp_min(1e-5)
            return f.numpy()

    def kaldi(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            f = torchaudio.compliance.kaldi.fbank(
                torch.from_numpy(x * 32768.0).unsqueeze(0), num_mel_bins=80, sample_frequency=SR,
                dither=0.0, window_type="povey", preemphasis_coefficient=0.97,
                remove_dc_offset=True, snip_edges=True, low_freq=20.0, high_freq=0.0,
                use_energy=False, energy_floor=0.0, round_to_power_of_two=True,
            ).numpy()
        return _normalize_stack(f)

    return {
        "squeezeformer": {"torchaudio MelSpectrogram": lambda x: upstream(x, 0.97, True)},
        "zipformer": {"torchaudio MelSpectrogram": lambda x: upstream(x, 0.0, False)},
        "w2v-bert": {"torchaudio kaldi.fbank": kaldi},
    }


def _normalize_stack(f: np.ndarray) -> np.ndarray:
    f = (f - f.mean(0)) / np.sqrt(f.var(0, ddof=1) + 1e-7)
    if f.shape[0] % 2:
        f = np.concatenate([f, np.ones((1, f.shape[1]), f.dtype)])
    return f.reshape(-1, 160)


def _librosa_anchors() -> dict[str, dict[str, Callable]]:
    import librosa

    def run(x: np.ndarray, pre: float, norm: bool) -> np.ndarray:
        if norm:
            x = x - x.mean()
            x = x / max(float(np.abs(x).max()), 1e-6)
        if pre > 0:
            x = np.concatenate([x[:1], x[1:] - pre * x[:-1]])
        m = librosa.feature.melspectrogram(
            y=x, sr=SR, n_fft=400, hop_length=160, win_length=400, n_mels=80, htk=True,
            norm=None, center=True, pad_mode="reflect", power=2.0,
        )
        f = np.log(np.maximum(m, 1e-5)).T
        if norm:
            f = (f - f.mean(0)) / np.maximum(f.std(0), 1e-5)
        return f

    return {
        "squeezeformer": {"librosa": lambda x: run(x, 0.97, True)},
        "zipformer": {"librosa": lambda x: run(x, 0.0, False)},
    }


def _hf_anchors() -> dict[str, dict[str, Callable]]:
    import transformers

    fe = transformers.SeamlessM4TFeatureExtractor(padding_value=1.0)
    return {"w2v-bert": {"HF SeamlessM4T": lambda x: fe(x, sampling_rate=SR, return_tensors="np")["input_features"][0]}}


def _knf_anchors() -> dict[str, dict[str, Callable]]:
    import kaldi_native_fbank as knf

    def run(x: np.ndarray) -> np.ndarray:
        opts = knf.FbankOptions()
        opts.frame_opts.dither = 0.0
        opts.frame_opts.snip_edges = True
        opts.frame_opts.samp_freq = SR
        opts.frame_opts.window_type = "povey"
        opts.mel_opts.num_bins = 80
        opts.mel_opts.low_freq = 20.0
        opts.mel_opts.high_freq = 0.0
        fb = knf.OnlineFbank(opts)
        fb.accept_waveform(SR, (x * 32768.0).tolist())
        fb.input_finished()
        f = np.array([fb.get_frame(i) for i in range(fb.num_frames_ready)], dtype=np.float32)
        return _normalize_stack(f)

    return {"w2v-bert": {"kaldi-native-fbank": run}}


def collect_anchors() -> tuple[dict[str, dict[str, Callable]], list[str]]:
    anchors: dict[str, dict[str, Callable]] = {}
    missing = []
    for label, builder in (
        ("torch/torchaudio", _torch_anchors),
        ("librosa", _librosa_anchors),
        ("transformers", _hf_anchors),
        ("kaldi-native-fbank", _knf_anchors),
    ):
        try:
            part = builder()
        except ImportError:
            missing.append(label)
            continue
        for fe, impls in part.items():
            anchors.setdefault(fe, {}).update(impls)
    return anchors, missing


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


def blas_info() -> str:
    try:
        cfg = np.show_config(mode="dicts")
        blas = cfg["Build Dependencies"]["blas"]
        return f"{blas.get('name')} {blas.get('version', '')}".strip()
    except Exception:  # pragma: no cover
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "asr_assets_tests" / "data",
                        help="folder of speech clips (default: the in-repo test data; ../shared/data has more)")
    parser.add_argument("--minutes", type=float, default=3.0, help="audio per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--write-readme", action="store_true", help="write the table into benchmarks/README.md")
    args = parser.parse_args()

    load_at_start = os.getloadavg()[0]
    utts = load_speech(args.data, args.minutes)
    seconds = len(utts) * UTT_SECONDS
    anchors, missing = collect_anchors()
    ours = {name: get_frontend(name) for name in ("squeezeformer", "zipformer", "w2v-bert")}

    jobs: list[tuple[str, str, Callable[[], object]]] = []
    for name, fe in ours.items():
        jobs.append((name, "asr_assets batch", lambda fe=fe: fe.batch(utts)))
        jobs.append((name, "asr_assets per utterance", lambda fe=fe: [fe(x, SR) for x in utts]))
        for label, fn in anchors.get(name, {}).items():
            jobs.append((name, label, lambda fn=fn: [fn(x) for x in utts]))
    for _, _, job in jobs:  # warm-up (tables, imports, allocator)
        job()
    times: dict[tuple[str, str], list[float]] = {(name, label): [] for name, label, _ in jobs}
    walls: dict[tuple[str, str], list[float]] = {(name, label): [] for name, label, _ in jobs}
    for _ in range(args.rounds):
        for name, label, job in jobs:
            w0, t0 = time.perf_counter(), time.process_time()
            job()
            times[(name, label)].append(time.process_time() - t0)
            walls[(name, label)].append(time.perf_counter() - w0)
    xrt = {key: seconds / statistics.median(v) for key, v in times.items()}
    xrt_wall = {key: seconds / statistics.median(v) for key, v in walls.items()}

    lines = [
        f"{seconds / 60:.1f} min of real speech in {len(utts)} x {UTT_SECONDS} s utterances, "
        f"1 thread, median of {args.rounds} interleaved rounds, "
        f"load average at start {load_at_start:.2f}",
        f"python {platform.python_version()}, numpy {np.__version__} ({blas_info()}), "
        f"scipy {__import__('scipy').__version__}, {platform.machine()} {platform.processor() or ''}".rstrip(),
        "",
        "| frontend | implementation | x real time (CPU) | x real time (wall) | asr_assets batch / this (CPU) |",
        "|---|---|---:|---:|---:|",
    ]
    for name in ours:
        base = xrt[(name, "asr_assets batch")]
        for (n, label), value in xrt.items():
            if n == name:
                lines.append(
                    f"| {name} | {label} | {value:,.0f} | {xrt_wall[(n, label)]:,.0f} | {base / value:.2f}x |"
                )
    if missing:
        lines += ["", f"not installed (anchors skipped): {', '.join(missing)}"]
    table = "\n".join(lines)
    print(table)
    if args.write_readme:
        readme = ROOT / "benchmarks" / "README.md"
        text = readme.read_text() if readme.exists() else ""
        begin, end = "<!-- table:begin -->", "<!-- table:end -->"
        block = f"{begin}\n{table}\n{end}"
        if begin in text and end in text:
            text = text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
        else:
            text = text.rstrip() + "\n\n" + block + "\n"
        readme.write_text(text)
        print(f"wrote {readme}")


if __name__ == "__main__":
    main()
