"""The lhotse and SpeechBrain bridges (``asr_assets.bridges``) on a real cache of the bundled sample.

The cache and its exported stores are test_stores' module fixtures (``asr-assets materialize``
of 20 train utterances of real speech; numpy_memmap and hdf5 exports). The reference arrays are
``ShardedParquetFeatureCache.load``, and they are checked once against the frontend run on the
decoded audio, so "equal to the reference" means equal to both.

Covers: SpeechBrain's ``FeaturePipeline`` over every source (paths, a cache object, a store
object) returns float32 tensors bit-equal to the reference, opens nothing until used, pickles
without what it opened and works in DataLoader workers; misses name the utterance; the
``speechbrain_data`` dict; the same through SpeechBrain's own ``DynamicItemDataset`` (skipped
when SpeechBrain cannot be imported). lhotse: ``asr-assets export --backend lhotse`` writes a
CutSet that lhotse loads and validates with its own checks (reading features and audio);
``cut.load_features()`` is bit-equal to the reference for every cut, whole and truncated; frame
shift, frame count, feature count and duration agree; supervisions carry transcript and speaker,
recordings the audio (resampled, for a 44.1 kHz stereo file); cuts pointing at exported stores
read the same; lhotse's DynamicBucketingSampler and K2SpeechRecognitionDataset iterate it in
DataLoader workers; errors; importing asr_assets imports no bridge, importing the bridge
registers its readers.
"""

from __future__ import annotations

import importlib.util
import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from asr_assets.audio import DecodeConfig, load_audio
from asr_assets.bridges.lhotse import (
    PARQUET_STORAGE_TYPE,
    STORE_STORAGE_TYPE,
    FeatureStoreReader,
    ShardedParquetReader,
    _recording,
    close_cached_stores,
    export_cuts,
    frame_shift_s,
)
from asr_assets.bridges.speechbrain import FeaturePipeline, speechbrain_data
from asr_assets.cli import main as cli_main
from asr_assets.data import FeaturesNotCachedError
from asr_assets.errors import ConfigError, FeatureConfigError
from asr_assets.feature_cache import ShardedParquetFeatureCache
from asr_assets.frontends import get_frontend
from asr_assets.record_cache import RecordStore
from asr_assets.stores import StoreError, open_feature_store
from asr_assets_tests.test_stores import EXPORTED, SQUEEZEFORMER, built, reference, stores, train_ids  # noqa: F401
from lhotse import CutSet
from lhotse.dataset import DynamicBucketingSampler, K2SpeechRecognitionDataset
from lhotse.features.io import get_reader
from lhotse.qa import validate
from lhotse.utils import compute_num_frames

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def records(built) -> dict[str, dict]:
    return {r["utterance_id"]: r for r in RecordStore(built / "record_cache" / "train.jsonl")}


@pytest.fixture(scope="module")
def checked_reference(reference, records) -> dict[str, np.ndarray]:
    """The cache's arrays, asserted equal to the frontend on each record's decoded audio."""
    frontend = get_frontend("squeezeformer")
    config = DecodeConfig(ffmpeg_fallback=True, max_duration_s=60.0)
    for uid, record in records.items():
        samples = load_audio(record["audio_blob_abspath"] or record["audio_path"], hint=record["audio_path"],
                             config=config)
        computed = frontend(samples, 16000)
        assert computed.dtype == np.float32 and np.array_equal(computed, reference[uid]), uid
    return reference


@pytest.fixture(scope="module")
def cuts_path(built, tmp_path_factory) -> Path:
    """``asr-assets export --backend lhotse`` of the train split (checked by test_cli_export_lhotse)."""
    path = tmp_path_factory.mktemp("lhotse") / "cuts_train.jsonl.gz"
    assert cli_main(["export", "--output", str(built), "--split", "train", "--backend", "lhotse",
                     "--to", str(path)]) == 0
    return path


def _tensor_equal(tensor: torch.Tensor, array: np.ndarray) -> bool:
    return tensor.dtype == torch.float32 and torch.equal(tensor, torch.from_numpy(array))


# ----------------------------------------------------------------------------- SpeechBrain

def _sources(built, stores):
    root = built / "feature-cache" / "train"
    return {"split root": root, "cache object": ShardedParquetFeatureCache(root),
            "numpy_memmap path": stores["numpy_memmap"], "hdf5 path": stores["hdf5"],
            "numpy_memmap store": open_feature_store(stores["numpy_memmap"])}


def test_feature_pipeline_returns_the_cached_features_from_every_source(built, stores, train_ids, checked_reference):
    for name, source in _sources(built, stores).items():
        pipeline = FeaturePipeline(source)
        for uid in train_ids:
            feats = pipeline(uid)
            assert feats.shape == (checked_reference[uid].shape[0], 80), (name, uid)
            assert _tensor_equal(feats, checked_reference[uid]), (name, uid)
            feats[0, 0] = 1.0  # owns writable memory (a memmap view is copied)
        assert np.array_equal(pipeline.read(train_ids[0]), checked_reference[train_ids[0]])
    by_hash = FeaturePipeline(built / "feature-cache" / "train", frontend=SQUEEZEFORMER)
    assert _tensor_equal(by_hash(train_ids[1]), checked_reference[train_ids[1]])


def test_feature_pipeline_opens_lazily_pickles_and_runs_in_workers(built, train_ids, reference):
    pipeline = FeaturePipeline(built / "feature-cache" / "train", frontend="squeezeformer")
    assert pipeline._store is None
    loader = DataLoader(train_ids, batch_size=None, collate_fn=pipeline, num_workers=2)
    got = list(loader)
    assert pipeline._store is None  # only the workers opened the cache, each its own
    assert len(got) == 20 and all(_tensor_equal(t, reference[u]) for t, u in zip(got, train_ids))
    assert _tensor_equal(pipeline(train_ids[0]), reference[train_ids[0]])
    assert pipeline._store is not None
    clone = pickle.loads(pickle.dumps(pipeline))
    assert clone._store is None and clone.path == pipeline.path
    assert all(_tensor_equal(clone(u), reference[u]) for u in train_ids[::4])


def test_feature_pipeline_misses_and_bad_sources(built, stores, train_ids):
    for source in (built / "feature-cache" / "train", stores["hdf5"]):
        with pytest.raises(FeaturesNotCachedError) as info:
            FeaturePipeline(source)("no-such-utterance")
        assert "'no-such-utterance'" in str(info.value) and str(source) in str(info.value)
        assert info.value.utterance_id == "no-such-utterance"
    with pytest.raises(TypeError, match="load"):
        FeaturePipeline(42)
    with pytest.raises(StoreError, match="holds frontend 'squeezeformer'"):
        FeaturePipeline(stores["numpy_memmap"], frontend="zipformer")("x")
    assert FeaturePipeline(built / "feature-cache" / "train", frontend="zipformer").load(train_ids[0]) is None


def test_speechbrain_data_lists_the_records_in_order(built, records, tmp_path):
    data = speechbrain_data(built / "record_cache" / "train.jsonl", to=tmp_path / "train.json")
    assert list(data) == list(records)
    for uid, entry in data.items():
        record = records[uid]
        assert set(entry) == {"wav", "duration", "wrd", "spk_id"}
        assert entry["wrd"] == record["transcript"] and entry["spk_id"] == record["speaker_id"]
        assert entry["duration"] == record["num_samples"] / 16000 and entry["duration"] > 1.0
        assert Path(entry["wav"]).is_absolute() and Path(entry["wav"]).is_file()
    assert json.loads((tmp_path / "train.json").read_text(encoding="utf-8")) == data


def test_speechbrain_dynamic_item_dataset(built, records, reference):
    pytest.importorskip("speechbrain", reason="SpeechBrain is not importable (it needs a torchaudio that loads "
                                              "with this torch; PyPI's Linux torchaudio is a CUDA build)")
    from speechbrain.dataio.batch import PaddedBatch
    from speechbrain.dataio.dataset import DynamicItemDataset
    from speechbrain.utils.data_pipeline import provides, takes

    data = speechbrain_data(built / "record_cache" / "train.jsonl")
    dataset = DynamicItemDataset(data)
    dataset.add_dynamic_item(FeaturePipeline(built / "feature-cache" / "train"), takes="id", provides="feats")
    dataset.add_dynamic_item(takes("id")(provides("feats_again")(FeaturePipeline(built / "feature-cache" / "train"))))
    dataset.set_output_keys(["id", "feats", "feats_again", "wrd"])
    assert len(dataset) == len(records)
    for index, uid in enumerate(records):
        item = dataset[index]
        assert item["id"] == uid and item["wrd"] == records[uid]["transcript"]
        assert _tensor_equal(item["feats"], reference[uid]) and _tensor_equal(item["feats_again"], reference[uid])
    loader = DataLoader(dataset, batch_size=4, collate_fn=PaddedBatch, num_workers=2)
    seen = []
    for batch in loader:
        feats, lengths = batch.feats
        for row, uid in enumerate(batch.id):
            frames = reference[uid].shape[0]
            assert round(float(lengths[row]) * feats.shape[1]) == frames  # relative lengths
            assert _tensor_equal(feats[row, :frames], reference[uid])
        seen.extend(batch.id)
    assert seen == list(records)


# ----------------------------------------------------------------------------- lhotse

def test_cli_export_lhotse_writes_one_summary_line(built, tmp_path, capsys):
    assert cli_main(["export", "--output", str(built), "--split", "train", "--backend", "lhotse",
                     "--to", str(tmp_path / "cuts.jsonl.gz")]) == 0
    out = capsys.readouterr().out.strip()
    assert "\n" not in out and out.startswith("train [squeezeformer 0a48384efcf3] -> ")
    assert f"(lhotse CutSet, features {PARQUET_STORAGE_TYPE} at {(built / 'feature-cache' / 'train').resolve()})" in out
    assert "20 cuts written, 0 without features (skipped), 0 without a recording" in out and out.endswith(" s")
    assert (tmp_path / "cuts.jsonl.gz").read_bytes()[:2] == b"\x1f\x8b"  # gzip, as lhotse expects of .gz
    assert [p.name for p in tmp_path.iterdir()] == ["cuts.jsonl.gz"]  # no temporary file left


def test_cuts_load_exactly_the_cached_features(cuts_path, built, records, checked_reference):
    cuts = CutSet.from_file(cuts_path)
    assert [cut.id for cut in cuts] == list(records)  # one cut per utterance, record order
    split_root = str((built / "feature-cache" / "train").resolve())
    for cut in cuts:
        uid, expected = cut.id, checked_reference[cut.id]
        features = cut.load_features()
        assert features.dtype == np.float32 and np.array_equal(features, expected), uid
        feats = cut.features
        assert (feats.storage_type, feats.storage_path, feats.storage_key) == (
            PARQUET_STORAGE_TYPE, split_root, f"{uid}:{SQUEEZEFORMER}")
        assert (feats.type, feats.frame_shift, feats.sampling_rate, feats.num_features) == (
            "squeezeformer", 0.01, 16000, 80)
        assert cut.num_frames == feats.num_frames == expected.shape[0] and cut.num_features == 80
        assert cut.duration == feats.duration == pytest.approx(expected.shape[0] * 0.01, abs=1e-9)
        assert compute_num_frames(cut.duration, cut.frame_shift, cut.sampling_rate) == expected.shape[0]
        (supervision,) = cut.supervisions
        assert supervision.text == records[uid]["transcript"] and supervision.speaker == records[uid]["speaker_id"]
        assert supervision.start == 0 and supervision.duration == records[uid]["num_samples"] / 16000 <= cut.duration
        assert cut.duration - supervision.duration < 0.01 + 1e-9  # frames are centred: at most one more
        recording = cut.recording
        assert Path(recording.sources[0].source).is_file() and recording.sampling_rate == 16000
        assert recording.num_samples == records[uid]["num_samples"]
        # partial reads: lhotse asks the reader for rows [left, right)
        part = cut.truncate(offset=0.5, duration=1.0).load_features()
        assert np.array_equal(part, expected[50:150]), uid
    validate(cuts, read_data=True)  # lhotse's own consistency checks, reading every feature and audio


def test_cut_audio_is_what_the_features_were_computed_from(cuts_path, records):
    config = DecodeConfig(ffmpeg_fallback=False, max_duration_s=60.0)
    for cut in CutSet.from_file(cuts_path).subset(first=5):
        record = records[cut.id]
        source = record["audio_blob_abspath"] or record["audio_path"]
        ours = load_audio(source, hint=record["audio_path"], config=config)
        audio = cut.recording.load_audio()
        assert audio.shape == (1, len(ours)) and np.array_equal(audio[0], ours), cut.id


def test_recording_of_a_44k_stereo_file_is_resampled_to_the_features_rate(test_data):
    path = test_data / "formats" / "audio" / "jfk__flac_44100_stereo.flac"
    recording = _recording({"utterance_id": "jfk", "audio_path": str(path)}, 16000)
    assert (recording.sampling_rate, recording.channel_ids) == (16000, [0, 1])
    audio = recording.load_audio()
    ours = load_audio(str(path))  # channel mean, soxr: what the features were computed from
    assert audio.shape == (2, len(ours)) == (2, 176000) and recording.num_samples == len(ours)
    assert np.corrcoef(audio.mean(axis=0), ours)[0, 1] > 0.9999  # two resamplers, the same signal
    assert _recording({"utterance_id": "x", "audio_path": str(path) + ".gone"}, 16000) is None


@pytest.mark.parametrize("backend", EXPORTED)
def test_cuts_can_point_at_an_exported_store(stores, built, tmp_path, reference, backend):
    summary = export_cuts(built / "feature-cache" / "train", tmp_path / "cuts.jsonl", store=stores[backend])
    assert (summary.storage_type, summary.written, summary.missing) == (STORE_STORAGE_TYPE, 20, 0)
    cuts = CutSet.from_file(tmp_path / "cuts.jsonl")
    for cut in cuts:
        assert (cut.features.storage_path, cut.features.storage_key) == (str(stores[backend]), cut.id)
        features = cut.load_features()
        assert features.flags.writeable and np.array_equal(features, reference[cut.id]), cut.id
    close_cached_stores()
    assert np.array_equal(cuts[0].load_features(), reference[cuts[0].id])  # reopened


def test_dynamic_bucketing_sampler_and_k2_dataset_in_workers(cuts_path, records, reference):
    cuts = CutSet.from_file(cuts_path)
    sampler = DynamicBucketingSampler(cuts, max_duration=15.0, num_buckets=2, shuffle=True, seed=0)
    dataset = K2SpeechRecognitionDataset(return_cuts=True)
    seen = []
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        for batch in DataLoader(dataset, sampler=sampler, batch_size=None, num_workers=2):
            inputs, supervisions = batch["inputs"], batch["supervisions"]
            assert inputs.dtype == torch.float32 and inputs.shape[2] == 80
            assert sum(cut.duration for cut in supervisions["cut"]) <= 15.0
            for row, cut in enumerate(supervisions["cut"]):
                frames = reference[cut.id].shape[0]
                assert _tensor_equal(inputs[row, :frames].contiguous(), reference[cut.id]), cut.id
            texts = {c.id: t for c, t in zip(supervisions["cut"], supervisions["text"])}
            assert all(text == records[uid]["transcript"] for uid, text in texts.items())
            assert all(n <= inputs.shape[1] for n in supervisions["num_frames"].tolist())
            seen.extend(cut.id for cut in supervisions["cut"])
    assert sorted(seen) == sorted(list(records) * 2)  # every cut once per epoch


def test_readers_are_registered_and_errors_are_clear(built, stores, cuts_path, tmp_path, train_ids):
    assert get_reader(PARQUET_STORAGE_TYPE) is ShardedParquetReader
    assert get_reader(STORE_STORAGE_TYPE) is FeatureStoreReader
    root = str(built / "feature-cache" / "train")
    reader = ShardedParquetReader(root)
    with pytest.raises(FeaturesNotCachedError, match="no features of frontend hash 4d9c4bc8f09a"):
        reader.read(f"{train_ids[0]}:4d9c4bc8f09a")  # zipformer: not in this cache
    for key in (train_ids[0], f"{train_ids[0]}:ZZ", f":{SQUEEZEFORMER}"):
        with pytest.raises(ValueError, match="'<utterance_id>:<hash12>'"):
            reader.read(key)
    with pytest.raises(FileNotFoundError, match="no asr_assets feature cache"):
        ShardedParquetReader(str(tmp_path)).read(f"{train_ids[0]}:{SQUEEZEFORMER}")
    with pytest.raises(FeaturesNotCachedError, match="'nope'"):
        FeatureStoreReader(str(built / "feature-cache" / "train")).read("nope")
    with pytest.raises(ConfigError, match="exists"):
        export_cuts(root, cuts_path)
    with pytest.raises(ConfigError, match="jsonl.gz"):
        export_cuts(root, tmp_path / "cuts.json")
    with pytest.raises(ConfigError, match="by name"):
        export_cuts(root, tmp_path / "cuts.jsonl.gz", frontend=SQUEEZEFORMER)
    with pytest.raises(StoreError, match="holds frontend 'squeezeformer'"):
        export_cuts(root, tmp_path / "cuts.jsonl.gz", frontend="zipformer", store=stores["hdf5"])
    assert not list(tmp_path.iterdir())


def test_cli_export_lhotse_errors_are_one_line(built, stores, tmp_path, capsys):
    base = ["export", "--output", str(built), "--split", "train", "--backend", "lhotse"]
    (tmp_path / "old.jsonl.gz").write_bytes(b"")
    cases = [
        ([*base, "--to", str(tmp_path / "old.jsonl.gz")], "exists"),
        ([*base, "--to", str(tmp_path / "cuts.txt")], "*.jsonl.gz"),
        ([*base, "--frontend", SQUEEZEFORMER, "--to", str(tmp_path / "a.jsonl.gz")], "--frontend as a name"),
        ([*base, "--frontend", "zipformer", "--to", str(tmp_path / "a.jsonl.gz")], "holds no features of 'zipformer'"),
        ([*base, "--frontend", "zipformer", "--store", str(stores["hdf5"]), "--to", str(tmp_path / "a.jsonl.gz")],
         "holds frontend 'squeezeformer'"),
        ([*base[:-1], "hdf5", "--store", str(stores["hdf5"]), "--to", str(tmp_path / "a")],
         "--store is for --backend lhotse"),
    ]
    for argv, message in cases:
        assert cli_main(argv) == 2, argv
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("asr-assets: error: ") and message in lines[0], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.jsonl.gz"]


def test_frame_shift_of_each_frontend():
    assert frame_shift_s(get_frontend("squeezeformer")) == frame_shift_s(get_frontend("zipformer")) == 0.01
    assert frame_shift_s(get_frontend("w2v-bert")) == 0.02  # 10 ms fbank frames stacked in pairs
    assert frame_shift_s(get_frontend("ludwig-fbank")) == 0.02  # padded to a fixed length: from window_shift_in_s
    assert frame_shift_s(get_frontend("squeezeformer", hop_length=320)) == 0.02
    with pytest.raises(FeatureConfigError, match="ludwig-raw"):
        frame_shift_s(get_frontend("ludwig-raw"))


def test_bridges_are_never_imported_by_the_library_and_the_import_registers():
    code = ("import sys, asr_assets, asr_assets.cli, asr_assets.stores, asr_assets.data, asr_assets.bridges\n"
            "bad = [m for m in ('lhotse', 'speechbrain', 'asr_assets.bridges.lhotse', 'asr_assets.bridges.speechbrain')"
            " if m in sys.modules]\n"
            "assert not bad, bad\n"
            "from lhotse.features.io import get_reader\n"
            "assert get_reader('asr_assets_sharded_parquet') is None\n"
            "import asr_assets.bridges.lhotse\n"
            "assert get_reader('asr_assets_sharded_parquet').__module__ == 'asr_assets.bridges.lhotse'\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=300)
    missing = ("import sys\nsys.modules['lhotse'] = None\n"
               "try:\n    import asr_assets.bridges.lhotse\nexcept ImportError as exc:\n    print(exc)\n")
    result = subprocess.run([sys.executable, "-c", missing], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0 and 'pip install "asr_assets[lhotse]"' in result.stdout, result.stderr
    assert importlib.util.find_spec("asr_assets.bridges.speechbrain") is not None
