"""A crash-safe, content-addressed cache of successful LLM calls.

Every call is keyed by the sha256 of a canonical JSON of (system text, prompt text, model, backend,
generation parameters, rubric version), see :func:`cache_key`. Each result is written the moment it
arrives as one small JSON file, ``<dir>/<key[:2]>/<key>.json``, written aside and renamed into place:
a ``kill -9`` loses no completed call, a reader never sees half a file, and a rerun makes only the
calls not yet made. Only replies that parsed and validated are stored; failures are retried next run.

The cache lives wherever the lake does: ``root`` may be a folder or, for an S3 lake, the ``UPath`` that
``lake.base / "llm_cache"`` gives; there each entry is one ``PUT`` (an object appears whole or not at
all), so the same guarantees hold without temp files.

The entry holds the raw reply text (re-validated on every read, so a schema change cannot smuggle an
old reply through) plus the usage and cost of the call that produced it. No secret is ever part of a
key or an entry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from upath import UPath

from dagster_project.lib.lake import LakePath, lake_path, write_bytes

log = logging.getLogger(__name__)

CACHE_FORMAT = 1


def cache_key(
    *,
    system: str,
    prompt: str,
    model: str,
    backend: str,
    params: dict[str, Any],
    rubric_version: str | None,
) -> str:
    """sha256 hex of the canonical JSON of everything that determines a reply."""
    payload = {
        "format": CACHE_FORMAT,
        "system": system,
        "prompt": prompt,
        "model": model,
        "backend": backend,
        "params": params,
        "rubric_version": rubric_version,
    }
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    writes: int = 0
    invalid: int = 0


class LLMCache:
    """One JSON file per key under ``root``; safe for concurrent readers and writers in one process.

    ``get`` returns the stored entry dict or ``None``; ``put`` stores one. Counters in :attr:`stats`.
    """

    def __init__(self, root: str | os.PathLike[str] | UPath, *, fsync: bool = True) -> None:
        self.root: LakePath = root if isinstance(root, UPath) else lake_path(root)
        self.remote = not isinstance(self.root, Path)
        if not self.remote:
            self.root.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync
        self.stats = CacheStats()
        self._lock = threading.Lock()
        self.remove_stale_temp_files()

    def path_for(self, key: str) -> LakePath:
        if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
            raise ValueError(f"cache key must be 64 lower-case hex characters, got {key!r}")
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        path = self.path_for(key)
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            with self._lock:
                self.stats.misses += 1
            return None
        except (OSError, json.JSONDecodeError) as e:
            log.warning("llm cache: unreadable entry %s (%s); treating as a miss", path, e)
            with self._lock:
                self.stats.misses += 1
                self.stats.invalid += 1
            return None
        if not isinstance(entry, dict) or entry.get("key") != key:
            log.warning("llm cache: entry %s does not match its key; treating as a miss", path)
            with self._lock:
                self.stats.misses += 1
                self.stats.invalid += 1
            return None
        with self._lock:
            self.stats.hits += 1
        return entry

    def put(self, key: str, entry: dict[str, Any]) -> LakePath:
        """Write ``entry`` (plus its key) aside and rename it into place (one PUT in an S3 lake)."""
        path = self.path_for(key)
        data = json.dumps({**entry, "key": key}, ensure_ascii=False, sort_keys=True, indent=1)
        if not isinstance(path, Path):
            write_bytes(path, data.encode("utf-8"))
            with self._lock:
                self.stats.writes += 1
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".tmp-{key[:8]}-", suffix=".json", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(data)
                f.flush()
                if self.fsync:
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        with self._lock:
            self.stats.writes += 1
        return path

    def __contains__(self, key: object) -> bool:
        """Whether an entry exists (does not touch the hit/miss counters)."""
        return isinstance(key, str) and self.path_for(key).is_file()

    def invalidate(self, key: str) -> None:
        """Remove an entry whose stored reply no longer validates."""
        self.path_for(key).unlink(missing_ok=True)
        with self._lock:
            self.stats.invalid += 1

    def __len__(self) -> int:
        return sum(1 for p in self.root.glob("??/*.json") if not p.name.startswith("."))

    def remove_stale_temp_files(self, older_than_s: float = 3600.0) -> int:
        """Delete temp files left by a killed writer (only old ones: another process may be mid-write).
        An S3 cache has none: its entries are single PUTs."""
        if self.remote:
            return 0
        now = time.time()
        removed = 0
        for p in self.root.glob("??/.tmp-*"):
            try:
                if now - p.stat().st_mtime > older_than_s:
                    p.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        return removed
