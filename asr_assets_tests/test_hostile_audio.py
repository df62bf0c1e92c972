"""Hostile audio inputs for ``asr_assets.audio``: files that name other files, remote sources, and
headers that lie about the length.

Each way out is built under ``tmp_path`` from the real clips of the test data, in Python only
(playlists and ffconcat scripts are text; HLS segments are MPEG-TS/MP2 written in-process with
PyAV; chained Ogg is two real Ogg files back to back; lying FLAC headers are a real FLAC with
its STREAMINFO total patched). Where it matters, a test first shows that the input *is* an
attack, e.g. that plain ``av.open`` would decode the audio outside the root, or that libsndfile
alone decodes the wrong length, and then that :func:`decode_audio` refuses or decodes the true
length, with the reason named in the error.

Covered: an HLS playlist (``.m3u8``, the same text named ``.wav``, as bytes, and served over
HTTP with the HLS MIME type) pointing at audio outside the root; a live HLS playlist (no
``#EXT-X-ENDLIST``), which plain FFmpeg would poll forever, must fail fast; ffconcat with absolute,
``../`` and symlink-inside-root paths; FFmpeg protocol syntax (``concat:``, ``subfile,``) in a
path; a symlink out of the root at the record level; URLs with ``remote_audio=False`` (no
connection is made) and with ``remote_audio=True`` (a real file decodes, a server that never
answers fails within ``network_timeout_s``); FLAC whose STREAMINFO under-claims, over-claims or
gives 0 (unknown), on the libsndfile and the PyAV path; chained Ogg (Vorbis, Opus needing the
OpusTags repair, mixed rates, the duration cap); a 2 kHz WAV. Tests that could hang on a
regression run in a thread with a generous time limit, so they fail instead.

No test spawns a process (an autouse fixture makes ``subprocess`` spawning fail). Numbers were
measured with soundfile 0.14 / libsndfile 1.2.2 and PyAV 18.1 / FFmpeg 8.
"""

from __future__ import annotations

import http.server
import socket
import struct
import threading
import time
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
import soxr

from asr_assets import audio
from asr_assets.audio import MIN_SAMPLE_RATE, PYAV_FORMATS, DecodeConfig, decode_audio, probe_duration
from asr_assets.errors import AudioDecodeError
from asr_assets.manifests import ManifestRow
from asr_assets.records import Record, Rejection, build_records

from asr_assets_tests.conftest import require_test_data

DATA = require_test_data()
AUDIO = DATA / "formats" / "audio"
FLAC16 = AUDIO / "jfk__flac_16000_mono.flac"  # 176,000 samples at 16 kHz
NL_CLIPS = sorted((DATA / "nl_cv" / "clips").glob("*.ogg"))
HANG_LIMIT_S = 30.0  # a regression that hangs fails after this long


@pytest.fixture(autouse=True)
def _no_subprocess(no_subprocess):
    """Every test here: fail loudly if anything spawns a process (e.g. an ffmpeg executable)."""


@pytest.fixture(scope="module")
def true_jfk() -> np.ndarray:
    x, sr = sf.read(FLAC16, dtype="float32")
    assert sr == 16000 and x.shape == (176000,)
    return x


def _bounded(fn, limit_s: float = HANG_LIMIT_S):
    """Run ``fn()`` in a thread; -> (result, exception, seconds). Fails if it is still running."""
    box: dict = {}

    def run():
        try:
            box["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            box["error"] = exc

    start = time.monotonic()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(limit_s)
    elapsed = time.monotonic() - start
    assert not thread.is_alive(), f"still running after {limit_s} s: the decoder hangs"
    return box.get("result"), box.get("error"), elapsed


def _plain_av_samples(target) -> int:
    """Samples plain PyAV (no guards) decodes: what an unprotected decoder would featurize."""
    with av.open(target) as container:
        return sum(frame.samples for frame in container.decode(audio=0))


def _write_ts(path: Path, pcm: np.ndarray, rate: int) -> None:
    """An MPEG-TS segment with MP2 audio, written in-process (an HLS segment)."""
    with av.open(str(path), "w", format="mpegts") as out:
        stream = out.add_stream("mp2", rate=rate, layout="mono")
        for i in range(0, len(pcm), 1152):
            frame = av.AudioFrame.from_ndarray(pcm[i:i + 1152].reshape(1, -1), format="s16", layout="mono")
            frame.sample_rate, frame.pts = rate, i
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)


def _playlist(segments: list[str], *, live: bool = False) -> str:
    lines = ["#EXTM3U", "#EXT-X-VERSION:3", "#EXT-X-TARGETDURATION:11", "#EXT-X-MEDIA-SEQUENCE:0"]
    for segment in segments:
        lines += ["#EXTINF:11.0,", segment]
    if not live:
        lines.append("#EXT-X-ENDLIST")
    return "\n".join(lines) + "\n"


@pytest.fixture
def layout(tmp_path):
    """``root/`` (allowed) and ``outside/secret.wav`` + ``outside/secret.ts`` (the JFK clip)."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    pcm, rate = sf.read(FLAC16, dtype="int16")
    sf.write(outside / "secret.wav", pcm, rate, subtype="PCM_16")
    _write_ts(outside / "secret.ts", pcm, rate)
    return root, outside


def _refused(path, reason: str, **kwargs) -> AudioDecodeError:
    with pytest.raises(AudioDecodeError) as info:
        decode_audio(path, **kwargs)
    assert reason in info.value.reason, info.value.reason
    return info.value


# --------------------------------------------------------------------------- HLS playlists

@pytest.mark.parametrize("relative", [False, True])
def test_hls_playlist_pointing_outside_is_refused(layout, relative):
    root, outside = layout
    segment = "../outside/secret.ts" if relative else str(outside / "secret.ts")
    playlist = root / "list.m3u8"
    playlist.write_text(_playlist([segment]))
    # The attack: unguarded FFmpeg follows the playlist and decodes 11 s from outside the root.
    assert _plain_av_samples(str(playlist)) == 176256  # MP2 in TS: 153 frames of 1,152
    err = _refused(playlist, "an HLS/M3U playlist (#EXTM3U), not audio")
    assert "never followed" in err.reason and err.source == str(playlist)
    with pytest.raises(AudioDecodeError, match="HLS/M3U playlist"):
        probe_duration(playlist)
    # Second layer: the PyAV backend alone refuses the hls demuxer before it opens a segment.
    with pytest.raises(ValueError, match="allowlist"):
        audio._decode_pyav(str(playlist), DecodeConfig())


def test_hls_playlist_named_wav_and_as_bytes(layout):
    root, outside = layout
    text = _playlist([str(outside / "secret.ts")])
    disguised = root / "utt1.wav"
    disguised.write_text(text)
    _refused(disguised, "an HLS/M3U playlist (#EXTM3U), not audio")
    # Embedded bytes (a record-cache blob) named .m3u8 or .wav by the manifest.
    for hint in ("clip.m3u8", "clip.wav", None):
        _refused(text.encode(), "an HLS/M3U playlist", hint=hint)
    # With a UTF-8 BOM and leading blank lines too.
    _refused(b"\xef\xbb\xbf\n\n" + text.encode(), "an HLS/M3U playlist", hint="x.wav")
    assert {"hls", "concat", "dash", "image2", "lavfi", "sdp", "rtsp", "data"}.isdisjoint(PYAV_FORMATS)


def test_live_hls_playlist_fails_fast(layout):
    root, outside = layout
    live = root / "live.m3u8"  # no #EXT-X-ENDLIST: FFmpeg would reload it forever
    live.write_text(_playlist(["../outside/secret.ts"], live=True))
    _, error, elapsed = _bounded(lambda: decode_audio(live))
    assert isinstance(error, AudioDecodeError) and "HLS/M3U playlist" in error.reason
    assert elapsed < 2.0, elapsed
    _, error, elapsed = _bounded(lambda: audio._decode_pyav(str(live), DecodeConfig()))
    assert isinstance(error, ValueError) and "allowlist" in str(error) and elapsed < 2.0


# --------------------------------------------------------------------------- ffconcat

@pytest.mark.parametrize("kind", ["absolute", "dotdot", "symlink_in_root"])
def test_ffconcat_is_refused(layout, kind):
    root, outside = layout
    if kind == "absolute":
        target = str(outside / "secret.wav")
    elif kind == "dotdot":
        target = "../outside/secret.wav"
    else:  # a name inside the root that leads out
        (root / "inside.wav").symlink_to(outside / "secret.wav")
        target = "inside.wav"
    script = root / "utt.ffconcat"
    script.write_text(f"ffconcat version 1.0\nfile '{target}'\n")
    # The attack: FFmpeg's concat demuxer reads the file it names (its default "safe" mode
    # refuses absolute and ../ names, not a symlink inside the root; safe=0 reads all three).
    options = {} if kind == "symlink_in_root" else {"safe": "0"}
    with av.open(str(script), options=options) as container:
        assert sum(frame.samples for frame in container.decode(audio=0)) == 176000
    disguised = root / "utt.wav"
    disguised.write_bytes(script.read_bytes())
    for path in (script, disguised):
        _refused(path, "an ffconcat script, not audio")
    _refused(script.read_bytes(), "an ffconcat script", hint="utt.wav")
    with pytest.raises(ValueError, match="allowlist"):  # the PyAV layer alone refuses it too
        audio._decode_pyav(str(script), DecodeConfig())


def test_ffmpeg_protocol_syntax_in_a_path_is_a_file_name(layout):
    root, outside = layout
    secret = str(outside / "secret.wav")
    for path in (f"concat:{secret}", f"subfile,,start,0,end,0,,:{secret}"):
        assert _plain_av_samples(path) == 176000  # FFmpeg would read it as a protocol URL
        err = _refused(path, "No such file or directory")
        assert "pyav:" in err.reason  # every backend looked for a local file of that name


def test_symlink_out_of_the_root_is_rejected(layout):
    root, outside = layout
    (root / "link.wav").symlink_to(outside / "secret.wav")
    (root / "real.wav").write_bytes((outside / "secret.wav").read_bytes())
    rows = [ManifestRow(str(root), str(root / "m.tsv"), i, f"u{i}", str(root / name), None,
                        "ask not what your country can do for you", None, 11.0)
            for i, name in enumerate(["link.wav", "real.wav", "../outside/secret.wav"], start=1)]
    out = list(build_records(rows, fixed_split="train", splits=["train"], allowed_audio_roots=[str(root)]))
    assert [type(o) for o in out] == [Rejection, Record, Rejection]
    assert all("outside the allowed roots" in o.reason for o in out if isinstance(o, Rejection))


# --------------------------------------------------------------------------- URLs

class _Recorder:
    """A TCP server that accepts connections and never answers; counts them."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.accepted: list[socket.socket] = []
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(conn)

    def close(self):
        self.sock.close()
        for conn in self.accepted:
            conn.close()


@pytest.fixture
def silent_server():
    server = _Recorder()
    yield server
    server.close()


def test_url_refused_without_connecting_when_remote_is_off(silent_server):
    url = f"http://127.0.0.1:{silent_server.port}/x.wav"
    for fn in (lambda: decode_audio(url), lambda: probe_duration(url),
               lambda: decode_audio(url.replace("http", "HTTPS"))):
        _, error, elapsed = _bounded(fn, 10.0)
        assert isinstance(error, AudioDecodeError) and elapsed < 1.0
        assert "remote audio is disabled (DecodeConfig.remote_audio=False)" in error.reason
    time.sleep(0.2)
    assert silent_server.accepted == []
    socket.create_connection(("127.0.0.1", silent_server.port)).close()  # the counter works
    deadline = time.monotonic() + 5
    while not silent_server.accepted and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(silent_server.accepted) == 1


def test_other_url_schemes_are_refused_even_with_remote(layout):
    _, outside = layout
    config = DecodeConfig(remote_audio=True)
    for url in (f"file://{outside / 'secret.wav'}", "ftp://127.0.0.1/x.wav", "rtsp://127.0.0.1/x",
                "data://text/plain;base64,AAAA"):
        err = _refused(url, "is not supported", config=config)
        assert f"URL scheme {url.split(':')[0]!r}" in err.reason
    _refused("http://127.0.0.1:9/x.wav", "ffmpeg_fallback=False",
             config=DecodeConfig(remote_audio=True, ffmpeg_fallback=False))


def test_remote_server_that_never_answers_times_out(silent_server):
    url = f"http://127.0.0.1:{silent_server.port}/x.wav"
    config = DecodeConfig(remote_audio=True, network_timeout_s=1.0)
    for fn in (lambda: decode_audio(url, config=config), lambda: probe_duration(url, config=config)):
        _, error, elapsed = _bounded(fn, HANG_LIMIT_S)
        assert isinstance(error, AudioDecodeError), error
        assert "network timeout: no answer within network_timeout_s=1.0 s" in error.reason
        assert 0.9 < elapsed < 5.0, elapsed
    assert len(silent_server.accepted) == 2  # it did connect, once per call


class _Files(http.server.BaseHTTPRequestHandler):
    files: dict[str, tuple[bytes, str]] = {}
    redirects: dict[str, str] = {}
    requested: list[str] = []

    def do_GET(self):  # noqa: N802 - http.server's name
        self.requested.append(self.path)
        if self.path in self.redirects:
            self.send_response(302)
            self.send_header("Location", self.redirects[self.path])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.path not in self.files:
            self.send_error(404)
            return
        body, ctype = self.files[self.path]
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def http_files():
    handler = type("Handler", (_Files,), {"files": {}, "redirects": {}, "requested": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", handler
    server.shutdown()
    server.server_close()


def test_remote_audio_decodes_and_remote_playlists_are_refused(http_files, layout, true_jfk):
    base, handler = http_files
    _, outside = layout
    hls = "application/vnd.apple.mpegurl"
    handler.files.update({
        "/jfk.flac": (FLAC16.read_bytes(), "audio/flac"),
        "/under.flac": (_claim(FLAC16.read_bytes(), 100000), "audio/flac"),
        "/seg.ts": ((outside / "secret.ts").read_bytes(), "video/mp2t"),
        "/list.m3u8": (_playlist([f"{base}/seg.ts"]).encode(), hls),
        "/list.wav": (_playlist([f"{base}/seg.ts"]).encode(), hls),
    })
    config = DecodeConfig(remote_audio=True, network_timeout_s=5.0)
    for name in ("/jfk.flac", "/under.flac"):  # PyAV decodes to the end, whatever STREAMINFO says
        x, sr = decode_audio(base + name, config=config)
        assert sr == 16000 and np.array_equal(x, true_jfk)
    assert probe_duration(base + "/jfk.flac", config=config) == pytest.approx(11.0, abs=1e-6)
    handler.requested.clear()
    for name in ("/list.m3u8", "/list.wav"):  # the MIME type alone makes FFmpeg pick hls
        _, error, elapsed = _bounded(lambda: decode_audio(base + name, config=config))
        assert isinstance(error, AudioDecodeError) and "allowlist" in error.reason and elapsed < 5
    assert handler.requested == ["/list.m3u8", "/list.wav"]  # no segment was fetched
    _refused(base + "/missing.wav", "404", config=config)
    # A redirect may lead to another http(s) URL, never to a local file.
    handler.redirects.update({"/moved.flac": "/jfk.flac", "/local.wav": f"file://{outside / 'secret.wav'}"})
    x, _ = decode_audio(base + "/moved.flac", config=config)
    assert np.array_equal(x, true_jfk)
    _refused(base + "/local.wav", "Invalid argument", config=config)


# --------------------------------------------------------------------------- FLAC lengths

def _claim(data: bytes, total: int) -> bytes:
    """A copy of a FLAC with STREAMINFO's 36-bit total-samples field set to ``total``."""
    assert data[:4] == b"fLaC" and data[4] & 0x7F == 0  # STREAMINFO is the first block
    out = bytearray(data)
    packed = struct.unpack_from(">Q", out, 18)[0]
    struct.pack_into(">Q", out, 18, (packed & ~((1 << 36) - 1)) | total)
    return bytes(out)


def _libsndfile_alone(path) -> int | str:
    """What libsndfile by itself decodes: a sample count, or the error it raises."""
    total = 0
    with sf.SoundFile(path) as f:
        while True:
            try:
                n = len(f.read(1 << 16, dtype="float32"))
            except sf.LibsndfileError as exc:
                return f"error after {total} samples: {exc}"
            if n == 0:
                return total
            total += n


@pytest.mark.parametrize("claim", [100000, 175999, 0, 176001, 200000, 10**9])
def test_flac_streaminfo_lies_about_length(tmp_path, true_jfk, claim):
    path = tmp_path / f"claims_{claim}.flac"
    path.write_bytes(_claim(FLAC16.read_bytes(), claim))
    alone = _libsndfile_alone(path)
    if 0 < claim < 176000:
        assert alone == claim  # libsndfile stops where the header says
    else:
        assert isinstance(alone, str) and "error" in alone  # and raises at the real end
    for config in (DecodeConfig(), DecodeConfig(ffmpeg_fallback=False)):
        x, sr = decode_audio(path, config=config)
        assert sr == 16000 and np.array_equal(x, true_jfk)
        x, sr = decode_audio(path.read_bytes(), hint="u.flac", config=config)
        assert np.array_equal(x, true_jfk)
    pyav = audio._decode_pyav(str(path), DecodeConfig())  # the FFmpeg path decodes it whole too
    assert pyav.sample_rate == 16000 and np.array_equal(pyav.samples, true_jfk)
    assert probe_duration(path) == pytest.approx(11.0, abs=1e-9)
    with pytest.raises(AudioDecodeError, match="max_duration_s=10"):
        decode_audio(path, config=DecodeConfig(max_duration_s=10.0))


def test_flac_stereo_44k_with_id3v1_tag_under_claiming(tmp_path):
    src = AUDIO / "jfk__flac_44100_stereo.flac"
    truth, rate = sf.read(src, dtype="float32")
    truth = truth.mean(axis=1)
    assert rate == 44100 and len(truth) == 485100
    path = tmp_path / "tagged.flac"
    path.write_bytes(_claim(src.read_bytes(), 300000) + b"TAG" + bytes(125))
    assert _libsndfile_alone(path) == 300000
    x, sr = decode_audio(path, config=DecodeConfig(ffmpeg_fallback=False))
    assert sr == 44100 and len(x) == 485100 and np.max(np.abs(x - truth)) < 1e-6
    assert probe_duration(path) == pytest.approx(11.0, abs=1e-9)


def test_flac_damaged_end_with_unknown_length_keeps_what_decodes(tmp_path, true_jfk):
    path = tmp_path / "cut.flac"
    path.write_bytes(_claim(FLAC16.read_bytes(), 0)[:-100])  # last frame cut, length unknown
    x, sr = decode_audio(path)
    # Every complete frame (43 of 4,096 samples, 175,104) and nothing else; both decoders agree.
    assert sr == 16000 and len(x) == 175104 and np.array_equal(x, true_jfk[:175104])
    assert len(audio._decode_pyav(str(path), DecodeConfig()).samples) == 175104


@pytest.mark.parametrize("claim", [176000, 0])
def test_flac_damaged_in_the_middle_is_not_patched_over(tmp_path, true_jfk, claim):
    data = bytearray(_claim(FLAC16.read_bytes(), claim))
    middle = len(data) // 2
    data[middle:middle + 200] = bytes(200)
    path = tmp_path / "hole.flac"
    path.write_bytes(bytes(data))
    # FFmpeg skips the damaged frame without an error and goes on: a decode with a hole.
    assert len(audio._decode_pyav(str(path), DecodeConfig()).samples) == 174848
    x, sr = decode_audio(path)  # libsndfile's frames up to the damage are what is kept
    assert sr == 16000 and len(x) == 87552
    # libFLAC puts silence in place of the frame whose CRC fails (1,152 samples), then stops.
    assert np.array_equal(x[:85248], true_jfk[:85248]) and not x[85248:86400].any()
    assert np.array_equal(x[86400:], true_jfk[86400:87552])


# --------------------------------------------------------------------------- chained Ogg

def test_chained_vorbis_decodes_every_link(tmp_path):
    # two Dutch clips present in the in-repo subset and in the full shared set alike
    a, b = (DATA / "nl_cv" / "clips" / n for n in ("fillets_nl_airplane_let_m_oko.ogg", "fillets_nl_atlantis_sp_v_centrala.ogg"))
    chained = tmp_path / "chained.ogg"
    chained.write_bytes(a.read_bytes() + b.read_bytes())
    xa, ra = decode_audio(a)
    xb, rb = decode_audio(b)
    assert ra == rb == 22050 and (len(xa), len(xb)) == (106390, 74685)
    assert len(sf.read(chained)[0]) == len(xa)  # libsndfile alone: the first link only
    x, sr = decode_audio(chained)
    assert sr == 22050 and np.array_equal(x, np.concatenate([xa, xb]))
    x2, _ = decode_audio(chained.read_bytes(), hint="c.ogg")
    assert np.array_equal(x, x2)
    assert probe_duration(chained) == pytest.approx((106390 + 74685) / 22050, abs=1e-3)
    # The duration cap counts all links: each link is under 5 s, the whole is 8.2 s.
    with pytest.raises(AudioDecodeError, match=r"max_duration_s=6.0 s \(chained Ogg file, 2 links\)"):
        decode_audio(chained, config=DecodeConfig(max_duration_s=6.0))


def test_chained_opus_with_a_link_needing_opustags_repair(tmp_path):
    a = AUDIO / "jfk__opus_16000_mono.opus"
    b = AUDIO / "ps_librivox_0870__opus_16000_mono__opustags_remove.opus"
    chained = tmp_path / "chained.opus"
    chained.write_bytes(a.read_bytes() + b.read_bytes())
    xa, _ = decode_audio(a)
    xb, _ = decode_audio(b)
    assert (len(xa), len(xb)) == (176000, 113600)
    x, sr = decode_audio(chained, config=DecodeConfig(ffmpeg_fallback=False))
    assert sr == 16000 and np.array_equal(x, np.concatenate([xa, xb]))


def test_chained_ogg_with_different_rates_is_reported(tmp_path):
    chained = tmp_path / "mixed.ogg"
    chained.write_bytes((AUDIO / "jfk__vorbis_16000_mono.ogg").read_bytes() + NL_CLIPS[0].read_bytes())
    err = _refused(chained, "chained Ogg file whose 2 links have different sample rates (16000, 22050 Hz)")
    assert "not decoded" in err.reason
    # Without the link scan, FFmpeg stops at the second link: the PyAV layer reports it too.
    with pytest.raises(Exception, match="changes its codec parameters after 176000 samples"):
        audio._decode_pyav(str(chained), DecodeConfig())


# --------------------------------------------------------------------------- sample rate

def test_sample_rate_below_4khz_is_refused(tmp_path, true_jfk):
    low = soxr.resample(true_jfk, 16000, 2000)
    path = tmp_path / "2k.wav"
    sf.write(path, low, 2000, subtype="PCM_16")
    for config in (DecodeConfig(), DecodeConfig(ffmpeg_fallback=False)):
        err = _refused(path, "sample rate 2000 Hz is below the minimum of 4000 Hz", config=config)
        assert err.reason.startswith("soundfile:")  # a verdict: no other backend is tried
    with pytest.raises(AudioDecodeError, match="sample rate 2000 Hz is below"):
        probe_duration(path)
    with pytest.raises(Exception, match="sample rate 2000 Hz is below"):
        audio._decode_pyav(str(path), DecodeConfig())
    ok = tmp_path / "4k.wav"
    sf.write(ok, soxr.resample(true_jfk, 16000, MIN_SAMPLE_RATE), MIN_SAMPLE_RATE, subtype="PCM_16")
    x, sr = decode_audio(ok)
    assert sr == 4000 and len(x) == 44000


# --------------------------------------------------------------------------- MP3 lengths

MP3 = AUDIO / "jfk__mp3_16000_mono.mp3"  # MPEG-2 layer III, LAME Info header: 308 frames


def _xing_frames_at(data: bytes) -> int:
    at = data.index(b"Info") + 8
    assert struct.unpack_from(">I", data, at)[0] == 308
    return at


def test_mp3_whose_info_header_under_claims_frames(tmp_path):
    truth, _ = decode_audio(MP3)
    assert len(truth) == 176000
    data = bytearray(MP3.read_bytes())
    struct.pack_into(">I", data, _xing_frames_at(bytes(data)), 154)  # half the frames
    path = tmp_path / "under.mp3"
    path.write_bytes(bytes(data))
    assert _libsndfile_alone(path) == 87296  # mpg123 stops at the claimed frames
    for config in (DecodeConfig(), DecodeConfig(ffmpeg_fallback=False)):
        x, sr = decode_audio(path, config=config)
        assert sr == 16000 and np.array_equal(x, truth)


def test_concatenated_mp3_decodes_both_files(tmp_path):
    truth, _ = decode_audio(MP3)
    path = tmp_path / "cat.mp3"
    path.write_bytes(MP3.read_bytes() * 2)  # the first Info header claims only its own frames
    assert _libsndfile_alone(path) == 176000
    x, sr = decode_audio(path, config=DecodeConfig(ffmpeg_fallback=False))
    # Both files: 2 x 176,000 plus the second file's Info frame and encoder delay (1,984).
    assert sr == 16000 and len(x) == 353984
    assert np.array_equal(x[:176000], truth)
    assert np.max(np.abs(x[-170000:] - truth[-170000:])) < 1e-5
    with pytest.raises(AudioDecodeError, match="max_duration_s=15"):
        decode_audio(path, config=DecodeConfig(max_duration_s=15.0))
