"""The image cache records: SQLite (``caches.db``) behind ``Caches``, nowhere else.

Each record is a JSON document keyed by name and id, never evicted. Every change is
a read-modify-write inside one transaction (``CacheDB.update``), so a builder process
and a user's command never lose each other's writes. Only ``builder.caches`` opens
this database (tests/unit/test_layering.py holds to that): every other module asks
``Caches``, which notices dead builders and expired caches on the way.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

from builder.errors import AlreadyExistsError, NotFoundLocalError, QuotaError, StoreError
from builder.imagecache import READY, ImageCache, match_keys, plain

# The matcher's ranking rules (builder.matcher) in SQL over the match index: each cache
# big enough is joined with the wanted (repository, version) pairs on repository;
# ``exact`` counts the pairs whose version it holds and ``held`` those whose repository
# it holds. Best degree, then the least size, then newest, then the name. (The unary
# plus keeps SQLite on the primary key, which holds every column read, rather than the
# ordering index below, which would cost a lookup per row.)
_RANK_SQL = """
WITH wanted(repository, version) AS (VALUES {pairs})
SELECT m.name, m.id, m.size_gib, m.created,
       SUM(instr(m.versions, ' ' || wanted.version || ' ') > 0) AS exact, COUNT(*) AS held
FROM match_index m JOIN wanted ON m.repository = wanted.repository
WHERE +m.size_gib >= ?
GROUP BY m.name
ORDER BY exact DESC, held - exact DESC, m.size_gib, m.created DESC, m.name
LIMIT ?
"""


# The same query over the caches holding at least one wanted pair's version: they rank
# above every other cache (best degree first), so when there are ``limit`` of them they
# are the answer, and the GROUP BY sorts only their rows, not every holder's.
_RANK_EXACT_SQL = """
WITH wanted(repository, version) AS (VALUES {pairs}),
exact_names AS (SELECT DISTINCT m.name FROM match_index m JOIN wanted ON m.repository = wanted.repository
                WHERE +m.size_gib >= ? AND instr(m.versions, ' ' || wanted.version || ' ') > 0)
SELECT m.name, m.id, m.size_gib, m.created,
       SUM(instr(m.versions, ' ' || wanted.version || ' ') > 0) AS exact, COUNT(*) AS held
FROM exact_names e JOIN match_index m ON m.name = e.name JOIN wanted ON m.repository = wanted.repository
GROUP BY m.name
ORDER BY exact DESC, held - exact DESC, m.size_gib, m.created DESC, m.name
LIMIT ?
"""

# The same rules for one wanted pair, where a cache has one row: those holding the version
# (exact 1, held 1), then the others (exact 0, held 1), each in the ranking's order. The
# index ``match_index_order`` walks a repository's holders in that order, so SQLite stops
# at the limit instead of grouping and sorting every holder of a popular repository.
_RANK_ONE_SQL = """
SELECT name, id, size_gib, created, {exact}, 1 FROM match_index
WHERE repository = ? AND size_gib >= ? AND (instr(versions, ?) > 0) = {exact}
ORDER BY size_gib, created DESC, name
LIMIT ?
"""
_ORDER_INDEX_SQL = "CREATE INDEX IF NOT EXISTS match_index_order ON match_index (repository, size_gib, created DESC, name)"


class Ranked(NamedTuple):
    """One ranked cache from the match index: enough to report it and take it."""

    name: str
    id: str
    size_gib: int
    created: str
    exact: int
    held: int


class TagResolution(NamedTuple):
    """What an upstream answered for a tag, when pull-through last asked: the digest of
    the manifest or index it named, that manifest's media type, and the time (RFC 3339)."""

    registry: str
    repository: str
    tag: str
    digest: str
    media_type: str
    resolved: str


class CacheDB:
    """Cache records in SQLite (``caches.db``): JSON documents keyed by name and id."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("CREATE TABLE IF NOT EXISTS caches (name TEXT PRIMARY KEY, id TEXT UNIQUE NOT NULL, "
                       "auto INTEGER NOT NULL, doc TEXT NOT NULL)")
            # One counter for every write (insert, update, delete): a record carries the
            # value of its last write as its resourceVersion, and a watcher polls it.
            db.execute("CREATE TABLE IF NOT EXISTS revision (id INTEGER PRIMARY KEY CHECK (id = 0), "
                       "n INTEGER NOT NULL)")
            db.execute("INSERT OR IGNORE INTO revision VALUES (0, 0)")
            # Tag resolutions pull-through got from its upstreams: what ``imc serve`` answers
            # for such a tag while the upstream cannot (serving stale), or offline.
            db.execute("CREATE TABLE IF NOT EXISTS upstream_tags (registry TEXT NOT NULL, repository TEXT NOT NULL, "
                       "tag TEXT NOT NULL, digest TEXT NOT NULL, media_type TEXT NOT NULL, resolved TEXT NOT NULL, "
                       "PRIMARY KEY (registry, repository, tag)) WITHOUT ROWID")
            exists = db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='match_index'").fetchone()
            if exists:
                db.execute(_ORDER_INDEX_SQL)  # a database from before the ordering index gets it
        if not exists:
            self._create_match_index()

    # The match index: for each Ready cache, one row per repository it holds, with the
    # versions (tags and digests) it holds of it as one ' v1 v2 ' string. Every write
    # below keeps it in step with the documents, so the matcher ranks thousands of
    # caches in one query over small rows, decoding no document but the winner's.

    def _create_match_index(self) -> None:
        with self._transaction() as db:
            if db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='match_index'").fetchone():
                return  # another process built it first
            db.execute("CREATE TABLE match_index (repository TEXT NOT NULL, name TEXT NOT NULL, id TEXT NOT NULL, "
                       "size_gib INTEGER NOT NULL, created TEXT NOT NULL, versions TEXT NOT NULL, "
                       "PRIMARY KEY (repository, name)) WITHOUT ROWID")
            db.execute("CREATE INDEX match_index_name ON match_index (name)")
            db.execute(_ORDER_INDEX_SQL)
            for (doc,) in db.execute("SELECT doc FROM caches").fetchall():
                self._index(db, ImageCache.from_doc(json.loads(doc)))

    @staticmethod
    def _match_rows(cache: ImageCache) -> list[tuple[str, str, str, int, str, str]]:
        if cache.phase != READY:
            return []
        versions: dict[str, list[str]] = {}
        for repository, version in sorted(match_keys(cache)):
            versions.setdefault(repository, []).append(version)
        return [(repository, cache.name, cache.id, cache.spec.size_gib, cache.created, f" {' '.join(v)} ")
                for repository, v in versions.items()]

    @staticmethod
    def _match_source(cache: ImageCache) -> tuple[object, ...]:
        """Everything ``_match_rows`` reads, as immutable values: when a write leaves it
        equal (progress, events, last use), the cache's index rows stay as they are."""
        return (cache.phase, cache.name, cache.id, cache.spec.size_gib, cache.created, tuple(cache.spec.images),
                tuple((i.name, i.digest, i.index) for i in cache.images))

    def _index(self, db: sqlite3.Connection, cache: ImageCache) -> None:
        rows = self._match_rows(cache)
        db.execute("DELETE FROM match_index WHERE name=?", (cache.name,))
        db.executemany("INSERT INTO match_index VALUES (?, ?, ?, ?, ?, ?)", rows)

    def rank(self, wanted: list[tuple[str, str]], min_size_gib: int, limit: int) -> list[Ranked]:
        """The best ``limit`` Ready caches of at least ``min_size_gib`` holding a wanted
        (repository, version) pair's repository, by the matcher's rules (``_RANK_SQL``),
        decoding no record."""
        if not wanted:
            return []
        with self._connect() as db:
            if len(wanted) == 1:
                (repository, version), = wanted
                rows = db.execute(_RANK_ONE_SQL.format(exact=1),
                                  (repository, min_size_gib, f" {version} ", limit)).fetchall()
                if len(rows) < limit:
                    rows += db.execute(_RANK_ONE_SQL.format(exact=0),
                                       (repository, min_size_gib, f" {version} ", limit - len(rows))).fetchall()
            else:
                pairs = ", ".join("(?, ?)" for _ in wanted)
                args = (*(x for pair in wanted for x in pair), min_size_gib, limit)
                rows = db.execute(_RANK_EXACT_SQL.format(pairs=pairs), args).fetchall()
                if len(rows) < limit:
                    rows = db.execute(_RANK_SQL.format(pairs=pairs), args).fetchall()
        return [Ranked(*row) for row in rows]

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        try:
            db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        except sqlite3.Error as e:
            raise self._error(e) from None
        try:
            db.execute("PRAGMA busy_timeout=60000")
            # WAL with synchronous=NORMAL: a commit survives any process crash; only a
            # power loss can drop the last commits (never corrupt the database).
            db.execute("PRAGMA synchronous=NORMAL")
            yield db
        except sqlite3.Error as e:
            raise self._error(e) from None
        finally:
            db.close()

    def _error(self, e: sqlite3.Error) -> StoreError:
        """SQLite's failure as ours. A full disk shows as SQLITE_FULL, or as
        SQLITE_IOERR_SHMSIZE when WAL's shared-memory file cannot grow."""
        full = getattr(e, "sqlite_errorname", "") in ("SQLITE_FULL", "SQLITE_IOERR_SHMSIZE")
        return StoreError(f"cannot read or write the image cache records in {self.path}: "
                          f"{'no space left on device' if full else e}")

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    @staticmethod
    def _bump(db: sqlite3.Connection) -> int:
        db.execute("UPDATE revision SET n = n + 1")
        return int(db.execute("SELECT n FROM revision").fetchone()[0])

    def revision(self) -> int:
        """The count of writes so far: it changes whenever any record does."""
        with self._connect() as db:
            return int(db.execute("SELECT n FROM revision").fetchone()[0])

    def insert(self, cache: ImageCache, quota: int) -> None:
        """Add a new record, unless the name is taken or the kind's quota is full."""
        with self._transaction() as db:
            if db.execute("SELECT 1 FROM caches WHERE name=?", (cache.name,)).fetchone():
                raise AlreadyExistsError(f"name {cache.name!r}: an image cache with this name already exists")
            count = db.execute("SELECT COUNT(*) FROM caches WHERE auto=?", (int(cache.auto),)).fetchone()[0]
            if count >= quota:
                kind = "automatic" if cache.auto else "manual"
                raise QuotaError(f"quota exceeded: {count} {kind} image caches exist, the maximum is {quota}")
            cache.resource_version = self._bump(db)
            db.execute("INSERT INTO caches (name, id, auto, doc) VALUES (?, ?, ?, ?)",
                       (cache.name, cache.id, int(cache.auto), json.dumps(cache.to_doc())))
            self._index(db, cache)

    def get(self, name: str) -> ImageCache:
        with self._connect() as db:
            row = db.execute("SELECT doc FROM caches WHERE name=?", (name,)).fetchone()
        if row is None:
            raise NotFoundLocalError(f"image cache {name!r} does not exist")
        return ImageCache.from_doc(json.loads(row[0]))

    def by_id(self, cache_id: str) -> ImageCache:
        with self._connect() as db:
            row = db.execute("SELECT doc FROM caches WHERE id=?", (cache_id,)).fetchone()
        if row is None:
            raise NotFoundLocalError(f"image cache id {cache_id!r} does not exist")
        return ImageCache.from_doc(json.loads(row[0]))

    def list(self) -> list[ImageCache]:
        with self._connect() as db:
            rows = db.execute("SELECT doc FROM caches ORDER BY name").fetchall()
        return [ImageCache.from_doc(json.loads(r[0])) for r in rows]

    def update(self, name: str, change: Callable[[ImageCache], None]) -> ImageCache:
        """Apply ``change`` to the current record inside one transaction; returns the result."""
        with self._transaction() as db:
            row = db.execute("SELECT doc FROM caches WHERE name=?", (name,)).fetchone()
            if row is None:
                raise NotFoundLocalError(f"image cache {name!r} does not exist")
            cache = ImageCache.from_doc(json.loads(row[0]))
            indexed = self._match_source(cache)
            spec = plain(cache.spec)  # a copy of its containers: ``change`` may mutate them
            change(cache)
            if plain(cache.spec) != spec:
                cache.spec_generation += 1
            cache.resource_version = self._bump(db)
            db.execute("UPDATE caches SET doc=? WHERE name=?", (json.dumps(cache.to_doc()), name))
            if self._match_source(cache) != indexed:
                self._index(db, cache)
            return cache

    def delete(self, name: str, cache_id: str | None = None) -> ImageCache:
        """Remove a record (with ``cache_id``, only if it still has that id); returns
        what it was."""
        with self._transaction() as db:
            if cache_id is None:
                row = db.execute("SELECT doc FROM caches WHERE name=?", (name,)).fetchone()
            else:
                row = db.execute("SELECT doc FROM caches WHERE name=? AND id=?", (name, cache_id)).fetchone()
            if row is None:
                raise NotFoundLocalError(f"image cache {name!r} does not exist")
            db.execute("DELETE FROM caches WHERE name=?", (name,))
            self._bump(db)
            db.execute("DELETE FROM match_index WHERE name=?", (name,))
            return ImageCache.from_doc(json.loads(row[0]))

    # -- tag resolutions from pull-through upstreams -------------------------------------

    def record_resolution(self, resolution: TagResolution) -> None:
        """Keep the latest resolution of one (registry, repository, tag)."""
        with self._connect() as db:
            db.execute("INSERT OR REPLACE INTO upstream_tags VALUES (?, ?, ?, ?, ?, ?)", resolution)

    def resolution(self, registry: str | None, repository: str, tag: str) -> TagResolution | None:
        """The latest resolution of a tag: at ``registry``, or (None) at any upstream."""
        with self._connect() as db:
            if registry is None:
                row = db.execute("SELECT * FROM upstream_tags WHERE repository=? AND tag=? ORDER BY resolved DESC "
                                 "LIMIT 1", (repository, tag)).fetchone()
            else:
                row = db.execute("SELECT * FROM upstream_tags WHERE registry=? AND repository=? AND tag=?",
                                 (registry, repository, tag)).fetchone()
        return TagResolution(*row) if row else None
