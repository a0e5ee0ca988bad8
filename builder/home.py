"""Where everything lives under imc's home: the one module that spells a path.

Every location is derived here from the home's root, so the layout can be read in
one place and changed in one place::

    <home>/
      store/                          an OCI image layout that every pull and cache shares
        oci-layout
        index.json                    the images ``imc pull`` named
        blobs/<alg>/<hex>             verified blobs, read-only; appear only by rename
      ingest/<alg>-<hex>.partial      downloads in progress, resumed after a crash
      locks/                          flock files
        gc.lock                       shared by every fetch, exclusive for gc
        index.lock                    writers of store/index.json
        blob-<alg>-<hex>.lock         one download per digest across processes
        cache-<id>.lock               a cache's build lease
      quarantine/<alg>-<hex>          blobs that failed verification, kept for inspection
      meta/
        unpacked/<alg>-<hex>          a layer's uncompressed size, counted once
        pulled/<alg>-<hex>            a blob pull-through fetched on its own; mtime: last served
        transfers.json                the recent pulls' bytes and seconds: the measured transfer rate
      volumes/<id>-<generation>.imcv  a cache's volume; ``.partial`` beside it while written
      secrets/<namespace>/<name>.json pull secrets, mode 0600 (registry.auth.SecretStore)
      caches.db                       the image cache records (SQLite)
      settings.json                   quotas and limits (``imc config``)
      logs/build-<cache>.log          the output of builds run in the background

Files are created under the home by imc alone, but anyone with write access to it
could plant a symbolic link where imc is about to write; ``open_unlinked`` is the one
way to open such a path for writing.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path

from builder.digest import Digest
from builder.errors import BadReferenceError

VOLUME_SUFFIX = ".imcv"
PARTIAL_SUFFIX = ".partial"


def default_home() -> Path:
    """``$IMC_HOME``, else ``$XDG_DATA_HOME/imc``, else ``~/.local/share/imc``."""
    if os.environ.get("IMC_HOME"):
        return Path(os.environ["IMC_HOME"])
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(Path.home(), ".local", "share")
    return Path(base) / "imc"


def _named(digest: Digest) -> str:
    return f"{digest.algorithm}-{digest.hex}"


@dataclass(frozen=True)
class Home:
    """Every location under one imc home. Naming a path creates nothing.

    A ``Home`` is path-like (its root), so ``Home(home)`` takes a path or a ``Home``.
    """

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    def __fspath__(self) -> str:
        return str(self.root)

    def __str__(self) -> str:
        return str(self.root)

    # -- the store -----------------------------------------------------------------

    @property
    def store(self) -> Path:
        return self.root / "store"

    @property
    def oci_layout(self) -> Path:
        return self.store / "oci-layout"

    @property
    def image_index(self) -> Path:
        return self.store / "index.json"

    @property
    def blobs(self) -> Path:
        return self.store / "blobs"

    def blob_dir(self, algorithm: str) -> Path:
        return self.blobs / algorithm

    def blob(self, digest: Digest) -> Path:
        return self.blob_dir(digest.algorithm) / digest.hex

    @property
    def ingest(self) -> Path:
        return self.root / "ingest"

    def ingest_partial(self, digest: Digest) -> Path:
        return self.ingest / f"{_named(digest)}{PARTIAL_SUFFIX}"

    def ingest_partials(self) -> list[Path]:
        return list(self.ingest.glob(f"*{PARTIAL_SUFFIX}"))

    @property
    def quarantine(self) -> Path:
        return self.root / "quarantine"

    def quarantined(self, digest: Digest) -> Path:
        return self.quarantine / _named(digest)

    @property
    def meta(self) -> Path:
        return self.root / "meta"

    @property
    def unpacked(self) -> Path:
        return self.meta / "unpacked"

    def unpacked_record(self, digest: Digest) -> Path:
        """Where a layer's counted uncompressed size is kept (named ``<alg>-<hex>``)."""
        return self.unpacked / _named(digest)

    @property
    def transfers(self) -> Path:
        """The recent pulls' transfer measurements (``builder.throughput``)."""
        return self.meta / "transfers.json"

    @property
    def pulled(self) -> Path:
        return self.meta / "pulled"

    def pulled_record(self, digest: Digest) -> Path:
        """The record of a blob pull-through fetched on its own (empty; its mtime is its last use)."""
        return self.pulled / _named(digest)

    def pulled_records(self) -> dict[Path, Digest | None]:
        """Every such record, with its blob's digest (None for a name that is not one)."""
        try:
            paths = list(self.pulled.iterdir())
        except FileNotFoundError:
            return {}
        out: dict[Path, Digest | None] = {}
        for path in paths:
            algorithm, _, hex_ = path.name.partition("-")
            try:
                out[path] = Digest.parse(f"{algorithm}:{hex_}")
            except BadReferenceError:
                out[path] = None
        return out

    # -- locks -----------------------------------------------------------------------

    @property
    def locks(self) -> Path:
        return self.root / "locks"

    @property
    def gc_lock(self) -> Path:
        return self.locks / "gc.lock"

    @property
    def index_lock(self) -> Path:
        return self.locks / "index.lock"

    def blob_lock(self, digest: Digest) -> Path:
        return self.locks / f"blob-{_named(digest)}.lock"

    def blob_locks(self) -> list[Path]:
        return list(self.locks.glob("blob-*.lock"))

    def cache_lock(self, cache_id: str) -> Path:
        return self.locks / f"cache-{cache_id}.lock"

    def cache_locks(self) -> dict[str, Path]:
        """Every cache lease file, by cache id."""
        return {p.name[len("cache-"):-len(".lock")]: p for p in self.locks.glob("cache-*.lock")}

    # -- volumes -----------------------------------------------------------------------

    @property
    def volumes(self) -> Path:
        return self.root / "volumes"

    def volume(self, cache_id: str, generation: int) -> Path:
        return self.volumes / f"{cache_id}-{generation}{VOLUME_SUFFIX}"

    def volumes_of(self, cache_id: str) -> list[Path]:
        """Every volume file of one cache, whatever its generation."""
        return list(self.volumes.glob(f"{cache_id}-*{VOLUME_SUFFIX}"))

    def volume_files(self) -> dict[Path, str]:
        """Every volume file, finished or partial, with the id of the cache it belongs to."""
        paths = [*self.volumes.glob(f"*{VOLUME_SUFFIX}"), *self.volumes.glob(f"*{VOLUME_SUFFIX}{PARTIAL_SUFFIX}")]
        return {p: p.name.rsplit("-", 1)[0] for p in paths}

    # -- records, settings, secrets, logs -------------------------------------------------

    @property
    def records(self) -> Path:
        return self.root / "caches.db"

    @property
    def settings(self) -> Path:
        return self.root / "settings.json"

    @property
    def secrets(self) -> Path:
        return self.root / "secrets"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def build_log(self, cache_name: str) -> Path:
        return self.logs / f"build-{cache_name}.log"


def partial_of(path: Path) -> Path:
    """Where a file is written before it is renamed to ``path`` (so it appears whole)."""
    return path.with_name(path.name + PARTIAL_SUFFIX)


def open_unlinked(path: Path, flags: int, mode: int = 0o644) -> int:
    """``os.open`` with ``O_CREAT``, never through a symbolic link: a link found at
    ``path`` (planted there, say) is removed and a fresh file created in its place."""
    flags |= os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(path, flags, mode)
    except OSError as e:
        if e.errno != errno.ELOOP:
            raise
        os.unlink(path)
        return os.open(path, flags | os.O_EXCL, mode)
