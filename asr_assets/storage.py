"""Object storage and remote files through fsspec: URL detection, bounded reads, conditional
writes, listing, a local content cache and a lease lock.

Entry points:
    - :func:`is_url`, :func:`local_path`, :func:`join` — what is remote, and URL arithmetic.
    - :func:`filesystem` — ``url -> (fsspec file system, path)`` with timeouts applied.
    - :func:`upath` — a :class:`upath.UPath` (pathlib API over fsspec) for a URL.
    - :func:`open_input`, :func:`read_bytes`, :func:`read_ranges` — whole, ranged and batched
      ranged reads (every network read has a timeout).
    - :func:`put`, :func:`put_new` — one PUT; ``put_new`` fails if the object exists
      (``If-None-Match: *`` where the store has conditional writes).
    - :func:`list_files` — one listing, with size, modification time and ETag per object.
    - :func:`fetch` / :func:`local_source` — a remote file as a local file in a content cache,
      downloaded once.
    - :func:`download_tree` — copy a remote folder to a local one, modification times kept.
    - :class:`ObjectLock` — a lease lock held in one object (conditional create, ``If-Match``
      renewal and takeover), the object-store counterpart of ``flock``.

Which strings are URLs: anything of the form ``<scheme>://...`` except ``file://`` — ``s3://``,
``gs://``, ``az://``/``abfs://``, ``http(s)://``, ``hf://`` ... (the scheme must be one fsspec
knows, with its package installed: ``s3fs`` for s3, ``gcsfs``, ``adlfs``, ``huggingface_hub``).
Local paths and ``file://`` URLs are *not* handled here: callers keep their local code paths
(``os.replace``, ``flock``, ``pread``) and formats exactly.

Credentials and endpoints come only from the libraries' standard mechanisms — for S3 botocore's
``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``,
``AWS_PROFILE`` ...; for any protocol fsspec's configuration (``~/.config/fsspec/*.json``,
``FSSPEC_<PROTOCOL>_<KEY>`` variables), which overrides the defaults below. Nothing here knows a
provider.

Timeouts (defaults, seconds; ``ASR_ASSETS_IO_CONNECT_TIMEOUT_S`` / ``ASR_ASSETS_IO_READ_TIMEOUT_S``
change them, fsspec configuration overrides them per protocol):

==========  =================================================================  ==========
protocol    how                                                                 default
==========  =================================================================  ==========
s3          s3fs ``config_kwargs={"connect_timeout", "read_timeout"}``          10 / 60
            (botocore ``Config``; retries: botocore's standard mode, 3 attempts,
            s3fs's own retry loop set to 1 try, so a stalled request fails after
            at most 3 x (connect + read timeout))
http(s)     aiohttp ``ClientTimeout(connect=, sock_read=)`` via ``client_kwargs``  10 / 60
others      the library's own defaults (set them through fsspec configuration)
==========  =================================================================  ==========

A read timeout bounds the wait for each chunk of a response, not a whole transfer, so a slow
but live download goes on; a stalled one fails after ``read_timeout``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

logger = logging.getLogger(__name__)

_URL_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
DEFAULT_CONNECT_TIMEOUT_S = 10.0
DEFAULT_READ_TIMEOUT_S = 60.0
#: botocore attempts per S3 request (standard retry mode: throttling, 5xx, timeouts, with backoff)
S3_ATTEMPTS = 3
_HOST = (socket.gethostname() or "localhost").replace(".", "_").replace("-", "_")


def writer_id() -> str:
    """``<host>_<pid>``: written into names of objects that must never collide across machines
    and processes."""
    return f"{_HOST}_{os.getpid()}"


def scheme(value: str | os.PathLike) -> str | None:
    """The URL scheme of ``value`` (lower case), or None for a plain path."""
    match = _URL_RE.match(str(value)) if isinstance(value, (str, os.PathLike)) else None
    return match.group(1).lower() if match else None


def is_url(value) -> bool:
    """True for a remote location (``s3://``, ``gs://``, ``https://``, ``hf://`` ... and a
    :class:`upath.UPath` of one); False for local paths and ``file://`` URLs."""
    if value is None:
        return False
    protocol = getattr(value, "protocol", None)  # a UPath
    if protocol is not None and not isinstance(value, Path):
        return protocol not in ("", "file", "local")
    if not isinstance(value, (str, os.PathLike)):
        return False
    return scheme(os.fspath(value) if not isinstance(value, str) else value) not in (None, "file", "local")


def local_path(value: str | os.PathLike) -> str:
    """A local path string: ``file://`` stripped, anything else as it is."""
    text = os.fspath(value)
    return text[len("file://"):] if text.lower().startswith("file://") else text


def join(base: str, *parts: str) -> str:
    """``base`` + ``/part``... for URLs (no normalization beyond single slashes between parts)."""
    out = str(base).rstrip("/")
    for part in parts:
        out += "/" + str(part).strip("/")
    return out


def parent(url: str) -> str:
    """The URL of the folder holding ``url``."""
    head, _, _ = str(url).rstrip("/").rpartition("/")
    return head


def basename(url: str) -> str:
    return str(url).rstrip("/").rpartition("/")[2]


def resolve(relative: str, base_url: str) -> str:
    """``relative`` (a manifest cell such as ``clips/a.ogg`` or ``../audio/b.wav``) against a
    folder URL: same scheme and bucket, ``.``/``..`` collapsed; absolute URLs pass through."""
    if is_url(relative):
        return relative
    match = _URL_RE.match(base_url)
    prefix = match.group(0) if match else ""
    rest = base_url[len(prefix):]
    host, _, path = rest.partition("/")
    segments = [s for s in path.split("/") if s]
    if relative.startswith("/"):
        segments = []
    for segment in relative.split("/"):
        if segment in ("", "."):
            continue
        if segment == "..":
            if segments:
                segments.pop()
        else:
            segments.append(segment)
    return prefix + host + ("/" + "/".join(segments) if segments else "")


def _timeouts() -> tuple[float, float]:
    def number(var: str, default: float) -> float:
        try:
            return float(os.environ.get(var) or default)
        except ValueError:
            return default

    return (number("ASR_ASSETS_IO_CONNECT_TIMEOUT_S", DEFAULT_CONNECT_TIMEOUT_S),
            number("ASR_ASSETS_IO_READ_TIMEOUT_S", DEFAULT_READ_TIMEOUT_S))


def storage_options(protocol: str) -> dict:
    """Options :func:`filesystem` passes for ``protocol``: the timeout defaults, overridden by
    fsspec's configuration for that protocol (``fsspec.config.conf``)."""
    import fsspec.config

    connect, read = _timeouts()
    options: dict = {}
    if protocol in ("s3", "s3a"):
        options = {"config_kwargs": {"connect_timeout": connect, "read_timeout": read,
                                     "retries": {"max_attempts": S3_ATTEMPTS, "mode": "standard"}}}
    elif protocol in ("http", "https"):
        import aiohttp

        options = {"client_kwargs": {"timeout": aiohttp.ClientTimeout(total=None, connect=connect, sock_read=read)}}
    user = fsspec.config.conf.get(protocol, {})
    for key, value in user.items():  # the user's configuration wins, nested dicts merged
        if isinstance(value, dict) and isinstance(options.get(key), dict):
            options[key] = {**options[key], **value}
        else:
            options[key] = value
    return options


def filesystem(url: str):
    """``(fsspec file system, path inside it)`` of a URL, with :func:`storage_options` applied.

    Raises:
        ValueError / ImportError: the scheme is unknown to fsspec or its package is missing
            (e.g. ``pip install 'asr_assets[s3]'`` for ``s3://``).
    """
    import fsspec

    protocol = scheme(url) or "file"
    fs_class = fsspec.get_filesystem_class(protocol)
    options = storage_options(protocol)
    fs = fs_class(**options) if options else fs_class()
    if protocol in ("s3", "s3a") and getattr(fs, "retries", 1) != 1:
        # s3fs retries on its own too (class attribute, 5), nested for reads: 5 x 5 x botocore's
        # attempts. One loop is enough: botocore's (standard mode, 3 attempts) does the retrying.
        fs.retries = 1
    return fs, fs._strip_protocol(url) if protocol not in ("http", "https") else url


def upath(url: str):
    """A :class:`upath.UPath` for ``url`` with the same options as :func:`filesystem`."""
    from upath import UPath

    return UPath(url, **storage_options(scheme(url) or "file"))


def open_input(location: str | os.PathLike, size: int | None = None):
    """A binary file object for reading ``location`` (a local path, ``file://`` or a URL).

    Remote files are read in blocks with the timeouts above (``size``, when known from a
    listing, saves the request that would look it up).
    """
    if not is_url(location):
        return open(local_path(location), "rb")
    fs, path = filesystem(str(location))
    kwargs = {"size": size} if size is not None else {}
    try:
        return fs.open(path, "rb", **kwargs)
    except TypeError:  # a file system whose open takes no size
        return fs.open(path, "rb")


def read_bytes(url: str, start: int | None = None, end: int | None = None) -> bytes:
    """The bytes of an object, or of ``[start, end)`` of it (one ranged GET)."""
    fs, path = filesystem(url)
    if start is None and end is None:
        try:
            return fs.cat_file(path, start=0)  # "bytes=0-": one GET, no HEAD for the size first
        except FileNotFoundError:
            raise
        except OSError:  # a store that refuses a range on an empty object (416)
            return fs.cat_file(path)
    return fs.cat_file(path, start=start, end=end)


def read_ranges(urls: Sequence[str], starts: Sequence[int], ends: Sequence[int]) -> list[bytes]:
    """``[start, end)`` of each URL, fetched concurrently where the file system is async (s3fs:
    one ranged GET each, in parallel); the URLs must share one file system."""
    if not urls:
        return []
    fs, _ = filesystem(urls[0])
    paths = [filesystem(u)[1] for u in urls] if len({scheme(u) for u in urls}) > 1 else \
        [fs._strip_protocol(u) if scheme(u) not in ("http", "https") else u for u in urls]
    out = fs.cat_ranges(paths, list(starts), list(ends), on_error="return")
    for value in out:
        if isinstance(value, BaseException):
            raise value
    return out


def parquet_bytes(table, **options) -> bytes:
    """``table`` (a ``pyarrow.Table``) as the bytes of a Parquet file, written with ``options``
    of ``pyarrow.parquet.write_table``: what one PUT uploads."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, **options)
    return sink.getvalue().to_pybytes()


def read_table(url: str):
    """The Parquet object at ``url`` as a ``pyarrow.Table`` (one GET).

    Raises:
        FileNotFoundError: no such object; ``pyarrow.ArrowException``: not Parquet.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pq.read_table(pa.BufferReader(read_bytes(url)))


def put(url: str, data: bytes) -> None:
    """Write ``data`` to ``url`` in one PUT, replacing what is there (last writer wins; readers
    see the old or the new object, never a mix)."""
    fs, path = filesystem(url)
    fs.pipe_file(path, data)


def write_atomic(path: str | os.PathLike, data: bytes, *, durable: bool = True) -> None:
    """Write ``data`` at a local path or a URL so that readers see the old content or the new,
    never a mix: on an object store one PUT (:func:`put`; last writer wins), locally a temporary
    file renamed into place, synced first unless ``durable=False``
    (:func:`asr_assets._fs.atomic_write_bytes`)."""
    if is_url(path):
        put(str(path), data)
        return
    from ._fs import atomic_write_bytes

    atomic_write_bytes(Path(path), data, durable=durable)


_no_conditional_writes: set[str] = set()


def put_new(url: str, data: bytes) -> str | None:
    """Write ``data`` to ``url`` in one PUT that fails if the object exists; returns its ETag
    (None where the store reports none).

    Uses fsspec's ``pipe_file(mode="create")`` (S3: ``If-None-Match: *``; honoured by AWS S3 and
    by moto's server). Where the file system has no such mode, the fallback is a check before
    the PUT, which is *not* atomic (a warning is logged once per protocol): callers must not rely
    on it for exclusion, only on unique names.

    Raises:
        FileExistsError: the object exists.
    """
    fs, path = filesystem(url)
    protocol = scheme(url) or "file"
    if protocol not in _no_conditional_writes:
        try:
            out = fs.pipe_file(path, data, mode="create")
            return _etag_of(out)
        except TypeError:
            _no_conditional_writes.add(protocol)
            logger.warning("%s:// has no conditional writes in this fsspec backend: put_new checks, then writes "
                           "(not atomic; use Dagster concurrency limits to keep writers of a partition apart)", protocol)
    if fs.exists(path):
        raise FileExistsError(url)
    fs.pipe_file(path, data)
    return None


def _etag_of(response) -> str | None:
    if isinstance(response, dict):
        return response.get("ETag") or response.get("etag")
    return None


def put_if_match(url: str, data: bytes, etag: str) -> str | None:
    """Replace ``url`` only if its ETag is still ``etag`` (S3 ``If-Match``); returns the new ETag.

    Raises:
        PermissionError: the object changed (someone else wrote it) or is gone.
    """
    fs, path = filesystem(url)
    try:
        return _etag_of(fs.pipe_file(path, data, IfMatch=etag))
    except (FileNotFoundError, OSError) as exc:  # s3fs maps 412 to EINVAL, a missing key to ENOENT
        raise PermissionError(f"{url}: changed since ETag {etag} ({exc})") from exc


def remove(url: str) -> None:
    """Delete one object (missing is fine)."""
    fs, path = filesystem(url)
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        pass


class ObjectInfo(str):
    """A listed object: the string is its URL; ``name``, ``size`` (bytes), ``mtime_ns`` (the
    store's modification time; S3 ``LastModified``, whole seconds) and ``etag`` come from the
    listing, so no further request is needed. ``stat()`` gives ``st_size``/``st_mtime_ns``, so
    code written for ``os.DirEntry``/``Path`` can sort and sign it unchanged."""

    name: str
    size: int
    mtime_ns: int
    etag: str | None

    def __new__(cls, url: str, size: int, mtime_ns: int, etag: str | None = None):
        self = super().__new__(cls, url)
        self.name, self.size, self.mtime_ns, self.etag = basename(url), int(size), int(mtime_ns), etag
        return self

    @property
    def suffix(self) -> str:
        return os.path.splitext(self.name)[1]

    def stat(self):
        return _Stat(self.size, self.mtime_ns)

    def __reduce__(self):
        return ObjectInfo, (str(self), self.size, self.mtime_ns, self.etag)


@dataclass(frozen=True)
class _Stat:
    st_size: int
    st_mtime_ns: int


def _mtime_ns(info: dict) -> int:
    value = info.get("LastModified") or info.get("mtime") or info.get("last_modified") or info.get("updated")
    if value is None:
        return 0
    if hasattr(value, "timestamp"):
        return int(round(value.timestamp() * 1e9))
    if isinstance(value, (int, float)):
        return int(value * 1e9)
    try:
        from datetime import datetime

        return int(datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp() * 1e9)
    except ValueError:
        return 0


def _protocol_prefix(url: str) -> str:
    match = _URL_RE.match(url)
    return match.group(0) if match else ""


def _content_tag(entry: dict) -> str | None:
    """The store's content hash of a listed object: S3/Azure ``ETag``, GCS ``md5Hash``, the Hub's
    git ``blob_id`` or LFS ``sha256``; None when the backend reports none."""
    lfs = entry.get("lfs") if isinstance(entry.get("lfs"), dict) else {}
    for value in (entry.get("ETag"), entry.get("etag"), entry.get("md5Hash"), lfs.get("sha256"), entry.get("blob_id")):
        if value:
            return str(value)
    return None


def _to_info(prefix: str, entry: dict) -> ObjectInfo:
    name = entry["name"]
    url = name if _URL_RE.match(name) else prefix + name
    return ObjectInfo(url, entry.get("size") or 0, _mtime_ns(entry), _content_tag(entry))


def list_files(url: str, *, recursive: bool = False) -> list[ObjectInfo]:
    """The files directly in (or, ``recursive``, anywhere below) a folder URL, sorted by URL;
    [] when there is none. One listing request per 1,000 objects (S3 ListObjectsV2)."""
    fs, path = filesystem(url)
    prefix = _protocol_prefix(url)
    fs.invalidate_cache(path)  # fsspec caches listings; a reader must see parts written since
    try:
        if recursive:
            entries = fs.find(path, detail=True).values()
        else:
            entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return []
    return sorted((_to_info(prefix, e) for e in entries if e.get("type", "file") == "file"), key=str)


def list_dirs(url: str) -> set[str]:
    """Names of the folders directly in a folder URL (prefixes on an object store), from one
    listing; empty when there is none."""
    fs, path = filesystem(url)
    fs.invalidate_cache(path)
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return set()
    return {basename(e["name"]) for e in entries if e.get("type") == "directory"}


def info(url: str) -> ObjectInfo:
    """One object's :class:`ObjectInfo` (one HEAD).

    Raises:
        FileNotFoundError: no such object.
    """
    fs, path = filesystem(url)
    fs.invalidate_cache(path)
    entry = fs.info(path)
    if entry.get("type") == "directory":
        raise IsADirectoryError(url)
    return _to_info(_protocol_prefix(url), entry)


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    fs.invalidate_cache(path)
    return fs.exists(path)


def is_dir(url: str) -> bool:
    fs, path = filesystem(url)
    fs.invalidate_cache(path)
    try:
        return fs.isdir(path)
    except FileNotFoundError:
        return False


# ----------------------------------------------------------------------------- local content cache


def cache_dir() -> Path:
    """``$ASR_ASSETS_CACHE_DIR``, else ``$XDG_CACHE_HOME/asr_assets``, else ``~/.cache/asr_assets``."""
    explicit = os.environ.get("ASR_ASSETS_CACHE_DIR")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "asr_assets"


def _suffix(url: str) -> str:
    name = basename(url)
    suffix = os.path.splitext(name)[1]
    return suffix if re.fullmatch(r"\.[A-Za-z0-9]{1,8}", suffix or "") else ""


def fetch(url: str, *, directory: str | os.PathLike | None = None, known: ObjectInfo | None = None) -> Path:
    """A local copy of the remote file ``url``, downloaded once.

    The copy lives in ``<cache_dir>/objects/<k[:2]>/<k><suffix>`` with ``k = sha256(url, ETag,
    size)``: the store's content hash (S3's ETag is the MD5 of a single-PUT object) names the
    content, so a changed object is fetched again and an unchanged one never is, by any process
    on this machine (a lock file per entry makes a second process wait for the first download
    instead of repeating it). Written atomically (temp file + ``os.replace``). Costs one HEAD
    when cached (none when ``known`` comes from a listing), HEAD + GET otherwise.

    Raises:
        FileNotFoundError: no such object. OSError / TimeoutError: the store failed or stalled.
    """
    from ._fs import file_lock, tmp_path_for

    meta = known if known is not None else info(url)
    # no ETag and no modification time (a plain web server): nothing says the content is the same
    tag = meta.etag or (f"mtime={meta.mtime_ns}" if meta.mtime_ns else f"unversioned={uuid.uuid4().hex}")
    key = hashlib.sha256(f"{url}\n{tag}\n{meta.size}".encode("utf-8")).hexdigest()
    root = Path(directory) if directory is not None else cache_dir()
    target = root / "objects" / key[:2] / f"{key}{_suffix(url)}"
    if target.is_file() and target.stat().st_size == meta.size:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(target.with_name(target.name + ".lock")):
        if target.is_file() and target.stat().st_size == meta.size:
            return target
        fs, path = filesystem(url)
        tmp = tmp_path_for(target)
        try:
            fs.get_file(path, str(tmp))  # streamed: no range requests needed (plain web servers)
            if tmp.stat().st_size != meta.size:
                raise OSError(f"{url}: got {tmp.stat().st_size} bytes, the store said {meta.size}")
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    return target


def local_source(source):
    """``source`` for a decoder: a remote URL (any scheme but ``http(s)``, which the decoder may
    stream itself when allowed) is :func:`fetch`-ed and its local copy returned; anything else
    (local paths, bytes, ``http(s)`` URLs) is returned as it is."""
    if isinstance(source, str) and is_url(source) and scheme(source) not in ("http", "https"):
        return str(fetch(source))
    return source


def download_tree(url: str, dest: str | os.PathLike) -> list[Path]:
    """Copy every file below the folder ``url`` to ``dest`` (same relative layout), each local
    file's modification time set to the object's, so readers that order files by modification
    time (the feature cache's "newest part wins") order the copy as they order the store."""
    dest = Path(dest)
    base = str(url).rstrip("/") + "/"
    out = []
    fs, _ = filesystem(url)
    for item in list_files(url, recursive=True):
        relative = str(item)[len(base):] if str(item).startswith(base) else item.name
        target = dest / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(read_bytes(str(item)))
        os.utime(target, ns=(item.mtime_ns, item.mtime_ns))
        out.append(target)
    return out


# ----------------------------------------------------------------------------- lease lock


class LockLost(RuntimeError):
    """A lease lock was taken over (its lease ran out) while its holder still worked."""


class LockTimeout(TimeoutError):
    """A lease lock stayed held by another owner for longer than the caller would wait."""


DEFAULT_LOCK_LEASE_S = 300.0


def _env_seconds(var: str, default: float) -> float:
    """``$var`` as a positive number of seconds, else ``default`` (ValueError names the variable)."""
    raw = os.environ.get(var)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{var} must be a number of seconds, got {raw!r}") from None
    if not value > 0:
        raise ValueError(f"{var} must be > 0 seconds, got {raw!r}")
    return value


class ObjectLock:
    """A lease lock in one object (``<url>``), for writers on machines that share only the store.

    Protocol (every step one conditional request, so two writers cannot both hold it):

    * **acquire**: create the object with ``If-None-Match: *`` holding ``{"owner", "expires"}``.
      If it exists, read it: a lock released by its owner, or whose lease ran out, is taken over
      with ``If-Match: <its ETag>`` (only one of several contenders can replace that exact
      version); a live lease is waited for, polling every ``poll_s``, at most ``wait_s``.
    * **renew**: a background thread replaces the object every ``lease_s / 3`` with
      ``If-Match: <our ETag>``; a failed renewal means the lease was taken over, and
      :meth:`check` (called before each write) raises :class:`LockLost`.
    * **release**: replace it with ``{"released": true}`` under ``If-Match`` (never a blind
      delete, which could remove a successor's lock).

    ``lease_s`` defaults to ``$ASR_ASSETS_LOCK_LEASE_S`` or 300 s. A holder that dies (a
    SIGKILLed Celery worker, a lost node) leaves a lease that runs out after ``lease_s``, so a
    task redelivered to another worker waits at most that long; clocks of the machines are
    compared with the ``expires`` time, so they must agree to well within ``lease_s``. Where the
    store has no conditional writes this is not exclusive: use Dagster's concurrency limits.

    Raises (``__enter__``):
        LockTimeout: still held by a live owner after ``wait_s``.
    """

    def __init__(self, url: str, *, lease_s: float | None = None, wait_s: float = 3600.0, poll_s: float = 1.0):
        if lease_s is None:
            lease_s = _env_seconds("ASR_ASSETS_LOCK_LEASE_S", DEFAULT_LOCK_LEASE_S)
        self.url, self.lease_s, self.wait_s, self.poll_s = url, lease_s, wait_s, poll_s
        self.owner = f"{writer_id()}_{uuid.uuid4().hex[:12]}"
        self.etag: str | None = None
        self._lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self, released: bool = False) -> bytes:
        return json.dumps({"owner": self.owner, "expires": time.time() + self.lease_s, "released": released,
                           "lease_s": self.lease_s}).encode("utf-8")

    def acquire(self) -> None:
        deadline = time.monotonic() + self.wait_s
        while True:
            try:
                self.etag = put_new(self.url, self._body())
                break
            except FileExistsError:
                pass
            try:
                current = info(self.url)
                state = json.loads(read_bytes(self.url))
            except (FileNotFoundError, ValueError):
                continue  # released and removed, or half-visible: try again at once
            if state.get("released") or float(state.get("expires", 0)) < time.time():
                try:
                    self.etag = put_if_match(self.url, self._body(), current.etag or "")
                    break
                except PermissionError:
                    continue  # someone else took it over first
            if time.monotonic() > deadline:
                raise LockTimeout(f"lock {self.url} held by {state.get('owner')!r} for longer than {self.wait_s:g} s")
            time.sleep(self.poll_s)
        if self.etag is None:  # a store without ETags in PUT responses
            self.etag = info(self.url).etag
        self._thread = threading.Thread(target=self._renew, name=f"lease {self.url}", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            try:
                self.etag = put_if_match(self.url, self._body(), self.etag or "")
            except PermissionError:
                self._lost.set()
                return
            except Exception as exc:  # noqa: BLE001 - a failed renewal is retried; the lease lasts lease_s
                logger.warning("renewing lock %s failed: %s", self.url, exc)

    def check(self) -> None:
        """Raise :class:`LockLost` if the lease was taken over."""
        if self._lost.is_set():
            raise LockLost(f"lock {self.url} was taken over (lease of {self.lease_s:g} s ran out)")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if not self._lost.is_set() and self.etag is not None:
            try:
                put_if_match(self.url, self._body(released=True), self.etag)
            except PermissionError:
                pass  # taken over meanwhile: nothing of ours to release

    def __enter__(self) -> "ObjectLock":
        self.acquire()
        _held_locks[parent(self.url)] = self
        return self

    def __exit__(self, *exc) -> None:
        _held_locks.pop(parent(self.url), None)
        self.release()


#: folder URL -> the lock this process holds there (writers check it before each PUT)
_held_locks: dict[str, ObjectLock] = {}


def check_lock(folder_url: str) -> None:
    """Raise :class:`LockLost` when this process holds a lock in ``folder_url`` that was taken over."""
    lock = _held_locks.get(str(folder_url).rstrip("/"))
    if lock is not None:
        lock.check()


@contextlib.contextmanager
def nothing() -> Iterator[None]:
    yield
