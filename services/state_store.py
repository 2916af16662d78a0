"""Small JSON state stores for the window scheduler and run registry: memory, file or Redis.

    store = open_store("redis://127.0.0.1:6379/0", namespace="run-abc")
    store.put("scheduler", {"iteration": 12}); store.get("scheduler")   # → {"iteration": 12}

Values are JSON objects, so nothing is pickled and any language can read them.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Protocol
from urllib.parse import urlparse


class StateStore(Protocol):
    url: str

    def get(self, key: str) -> dict | None: ...

    def put(self, key: str, value: dict) -> None: ...


class MemoryStore:
    """Process-local; state is lost with the process (the default for laptop runs)."""

    def __init__(self) -> None:
        self.url = "memory"
        self._data: dict[str, str] = {}

    def get(self, key: str) -> dict | None:
        raw = self._data.get(key)
        return None if raw is None else json.loads(raw)

    def put(self, key: str, value: dict) -> None:
        self._data[key] = json.dumps(value)


class FileStore:
    """One JSON file per key in a folder; writes are atomic (temp file + rename)."""

    def __init__(self, root: str | Path, namespace: str) -> None:
        self.root = Path(root) / namespace
        self.root.mkdir(parents=True, exist_ok=True)
        self.url = f"file://{self.root}"

    def get(self, key: str) -> dict | None:
        path = self.root / f"{key}.json"
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"state file {path} is corrupted: {e}") from e

    def put(self, key: str, value: dict) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.root, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(value, f)
        os.replace(tmp, self.root / f"{key}.json")


class RedisStore:
    """Keys `mixgrpo:<namespace>:<key>` in Redis; survives actor, driver and node restarts."""

    def __init__(self, url: str, namespace: str) -> None:
        import redis

        self.url = url
        self._prefix = f"mixgrpo:{namespace}:"
        self._client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        try:
            self._client.ping()
        except redis.RedisError as e:
            raise ConnectionError(f"cannot reach the Redis state store at {redacted(url)}: {e}") from e

    def get(self, key: str) -> dict | None:
        raw = self._client.get(self._prefix + key)
        return None if raw is None else json.loads(raw)

    def put(self, key: str, value: dict) -> None:
        self._client.set(self._prefix + key, json.dumps(value))


def redacted(url: str) -> str:
    """`url` with the password of its user-info part hidden, for messages and logs (redis://:***@host:6379/0)."""
    parsed = urlparse(url)
    if parsed.password is None:
        return url
    user = f"{parsed.username}:" if parsed.username else ":"
    return parsed._replace(netloc=f"{user}***@{parsed.hostname}" + (f":{parsed.port}" if parsed.port else "")).geturl()


def open_store(url: str, namespace: str = "default") -> StateStore:
    """`memory`, `file:///abs/dir` or `redis://host:port/db`."""
    if url == "memory":
        return MemoryStore()
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return FileStore(parsed.path, namespace)
    if parsed.scheme == "redis":
        return RedisStore(url, namespace)
    raise ValueError(f"unknown state store {redacted(url)!r}: expected memory, file:///dir or redis://host:port/db")
