"""Object-store request counts of ``asr-assets materialize`` from ``s3://`` manifests to an
``s3://`` output, against moto's S3 server started here on 127.0.0.1 (no network), then of the
no-op re-run.

Usage::

    PYTHONPATH=. python benchmarks/object_store_requests.py

Uploads ``asr_assets_tests/data/{formats,en_hf}``, runs the graph with ``--workers 2`` and prints
the requests by method and kind of object (from the server's access log), the wall time and the
record count. Needs the ``test`` extra (``moto[server]``, ``s3fs``).
"""
import collections, logging, os, re, shutil, socket, sys, tempfile, time
from moto.server import ThreadedMotoServer

def run():
    from pathlib import Path

    s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
    srv = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False); srv.start()
    reqs = []
    class H(logging.Handler):
        def emit(self, r):
            try:
                m, t = re.sub(r"\x1b\[[0-9;]*m", "", str(r.args[0])).split(" ")[:2]; reqs.append((m, t))
            except Exception: pass
    w = logging.getLogger("werkzeug"); w.addHandler(H()); w.setLevel(logging.INFO); w.propagate = False
    tmp = Path(tempfile.mkdtemp())
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="k", AWS_SECRET_ACCESS_KEY="s",
                      AWS_DEFAULT_REGION="us-east-1", DAGSTER_HOME=str(tmp / "dh"), ASR_ASSETS_CACHE_DIR=str(tmp / "cc"))
    from asr_assets import storage
    from asr_assets.cli import main
    data = Path("asr_assets_tests/data")
    fs, _ = storage.filesystem("s3://bench"); fs.mkdir("bench")
    for name in ("formats", "en_hf"):
        for p in sorted((data / name).rglob("*")):
            if p.is_file():
                storage.put(f"s3://bench/manifests/{name}/{p.relative_to(data / name).as_posix()}", p.read_bytes())
    time.sleep(0.2); reqs.clear()
    t0 = time.time()
    assert main(["materialize", "--manifests", "s3://bench/manifests/formats", "--manifests", "s3://bench/manifests/en_hf",
                 "--output", "s3://bench/out", "--workers", "2"]) == 0
    wall = time.time() - t0
    time.sleep(0.3)
    def kind(m, t):
        path = t.split("?")[0]
        if "list-type=2" in t: return f"LIST {'manifests' if '/manifests' in t or 'prefix=manifests' in t else 'out'}"
        for k in ("/part_", ".lock-", ".asr_assets_index", "_audio_blobs/", ".commit.json", ".versions/", "/reports/",
                  "inputs.json", "probed_durations", "/manifests/"):
            if k in path: return f"{m} {k}"
        return f"{m} other {path[:60]}"
    c = collections.Counter(kind(m, t) for m, t in reqs)
    for k, v in sorted(c.items()): print(f"{v:6d}  {k}")
    print("total", len(reqs), "wall_s", round(wall, 1))
    from asr_assets.record_cache import RecordStore
    n = sum(len(RecordStore(f"s3://bench/out/record_cache/{s}.jsonl")) for s in ("train", "validation", "test"))
    print("records", n)
    reqs.clear()
    assert main(["materialize", "--manifests", "s3://bench/manifests/formats", "--manifests", "s3://bench/manifests/en_hf",
                 "--output", "s3://bench/out", "--workers", "2"]) == 0
    time.sleep(0.3)
    c = collections.Counter(kind(m, t) for m, t in reqs)
    print("--- no-op re-run"); [print(f"{v:6d}  {k}") for k, v in sorted(c.items())]; print("total", len(reqs))
    srv.stop()

if __name__ == '__main__':
    run()
