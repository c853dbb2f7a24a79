"""Where a run's files live: a local directory, or a Cloud Storage bucket (gs://BUCKET/PATH).

`path(location)` is a pathlib.Path for a local location and an etils.epath.Path for gs://, so
callers use one API on both (`/`, read_text, write_bytes, exists, iterdir). Remote locations go
through libraries that already speak them: etils.epath over gcsfs for small files (the `gcs`
extra), Orbax and tensorstore for checkpoints, tensorboardX over google-cloud-storage for events.
Nothing remote is imported for a local path.

Atomic writes: a local file is written beside its target and renamed over it; an object is
replaced whole by one upload (a store never shows half an object). Objects cannot be appended
to, so `Lines` keeps an object's text in memory and rewrites the object when synced.
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import tempfile
import time

from lm.errors import LMError

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://([^/]*)")
ACCESS_HINT = ("on a TPU or Compute Engine VM grant its service account roles/storage.objectAdmin on the "
               "bucket; elsewhere run gcloud auth application-default login or set "
               "GOOGLE_APPLICATION_CREDENTIALS to a service-account key file")


def is_remote(location) -> bool:
    """Whether `location` (a string or a path from `path`) names an object store (scheme://...)."""
    return _URL.match(str(location)) is not None


def check(location: str, what: str = "path") -> None:
    """Refuses an empty location, a scheme lm cannot store to, and a URL without a bucket (no I/O)."""
    if not str(location).strip():
        raise LMError(f"{what} is empty; set it to a directory (runs/NAME) or a bucket path (gs://BUCKET/NAME).")
    url = _URL.match(str(location))
    if url and url.group(1) != "gs":
        raise LMError(f"{what} '{location}' is on {url.group(1)}://, which lm does not store to; "
                      "use a local path or gs://BUCKET/PATH.")
    if url and not url.group(2):
        raise LMError(f"{what} '{location}' names no bucket; use gs://BUCKET/PATH.")


def path(location, what: str = "path"):
    """`location` as a path object: pathlib.Path when local; etils.epath.Path for gs:// once its
    bucket is known to be reachable (each bucket checked once per process, before anything is written)."""
    if isinstance(location, pathlib.PurePath):
        return location
    check(location, what)
    url = _URL.match(str(location))
    if url is None:
        return pathlib.Path(location)
    _connect(url.group(2), what, str(location))
    from etils import epath

    return epath.Path(location)


def absolute(p):
    """A local path made absolute (Orbax wants one); a remote one as it is."""
    return p if is_remote(p) else p.absolute()


_REACHED: set[str] = set()  # buckets listed by this process


def _connect(bucket: str, what: str, location: str) -> None:
    """Imports gcsfs and lists the bucket's top level: a missing package, missing credentials, a denied
    or missing bucket each end here as one LMError."""
    if bucket in _REACHED:
        return
    # gcsfs's zonal-bucket lookup needs the Storage Control API; without its permission every call
    # logs a warning. lm needs no zonal buckets; GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=true turns it back on.
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    try:
        import gcsfs
    except ImportError:
        raise LMError(f"{what} '{location}' is on Cloud Storage, which needs the 'gcsfs' package; install "
                      "the gcs extra with pip install -e '.[gcs]'.") from None
    import logging

    gcsfs_log = logging.getLogger("gcsfs")  # it logs each failed request's traceback; the error below says it
    level = gcsfs_log.level
    gcsfs_log.setLevel(logging.CRITICAL)
    try:
        gcsfs.GCSFileSystem().ls(bucket)
    except FileNotFoundError:
        raise LMError(f"{what} '{location}': the bucket gs://{bucket} does not exist; create it with gcloud "
                      f"storage buckets create gs://{bucket} --location=REGION, or fix the name.") from None
    except Exception as e:  # gcsfs, aiohttp and google-auth raise many types; all mean "cannot use it"
        code, reason = getattr(e, "code", None), " ".join(str(e).split())[:160] or type(e).__name__
        if code == 401:
            raise LMError(f"{what} '{location}': no Google Cloud credentials were found (HTTP 401); "
                          f"{ACCESS_HINT}.") from None
        if code == 403 or reason.startswith("Forbidden"):  # gcsfs raises OSError("Forbidden: ...") for a 403
            raise LMError(f"{what} '{location}': these credentials may not list gs://{bucket} ({reason}); "
                          f"{ACCESS_HINT}.") from None
        raise LMError(f"{what} '{location}': cannot reach gs://{bucket} ({reason}); check the network and "
                      "the credentials.") from None
    finally:
        gcsfs_log.setLevel(level)
    _REACHED.add(bucket)


def new_file_mode() -> int:
    """The mode open() gives a new file here: 0o666 less the process's umask (read from /proc on Linux,
    where changing the umask to read it would race with other threads)."""
    try:
        with open("/proc/self/status") as f:
            mask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
    return 0o666 & ~mask


def write_atomic(p, text: str) -> None:
    """Replaces the file (or object) at `p` with `text` (UTF-8): a reader sees the old one or the new one."""
    if is_remote(p):
        p.write_text(text, encoding="utf-8")  # one upload; the object appears when it completes
        return
    p = pathlib.Path(p)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fchmod(f.fileno(), new_file_mode())  # not mkstemp's 0600
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def make_dir(p, what: str = "directory") -> None:
    """Creates a local directory (and its parents) and checks it is writable; an object store needs
    no directories (its bucket's access was checked by `path`)."""
    if is_remote(p):
        return
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LMError(f"cannot create {what} '{p}' ({e.strerror}); choose a writable {what}.") from None
    if not os.access(p, os.W_OK):
        raise LMError(f"{what} '{p}' is not writable; choose a writable {what}.")


class Lines:
    """A text file that grows by lines (metrics.jsonl). A local file is appended to at each write;
    an object, which a store cannot append to, is rewritten whole by `sync` and by a write at least
    `every_s` seconds after the last upload, so a killed process loses only what it wrote since."""

    def __init__(self, p, every_s: float = 30.0):
        self.path, self.every_s = p, every_s
        self.remote = is_remote(p)
        self.text = p.read_text(encoding="utf-8") if self.remote and p.exists() else ""
        self.synced, self.dirty = time.monotonic(), False

    def write(self, text: str) -> None:
        if not self.remote:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(text)
            return
        self.text, self.dirty = self.text + text, True
        if time.monotonic() - self.synced >= self.every_s:
            self.sync()

    def sync(self) -> None:
        if self.dirty:
            self.path.write_text(self.text, encoding="utf-8")
            self.synced, self.dirty = time.monotonic(), False


def scratch_dir(directory) -> pathlib.Path:
    """Where a library that writes only local files (jax.profiler) should write files meant for
    `directory`: the directory itself when local, a new temporary one when remote (see `upload_dir`)."""
    return pathlib.Path(tempfile.mkdtemp(prefix="lm-")) if is_remote(directory) else directory


def upload_dir(scratch, directory) -> None:
    """Copies the files under a remote directory's `scratch_dir` into it, then removes the scratch."""
    if not is_remote(directory):
        return
    for file in sorted(pathlib.Path(scratch).rglob("*")):
        if file.is_file():
            target = directory / file.relative_to(scratch).as_posix()
            target.write_bytes(file.read_bytes())
    shutil.rmtree(scratch, ignore_errors=True)
