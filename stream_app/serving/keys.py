"""API keys of the lookup API: a JSON file of named, scoped keys, kept as SHA-256 hashes only.

`streamrec keys add NAME --scope events:write` makes a random key, prints it once and stores its
hash. The API hashes the presented bearer token and compares it with every stored hash in constant
time (`hmac.compare_digest`). A plain hash is enough here: the keys are 256-bit random tokens, not
passwords, so there is nothing to brute-force and no salt or slow hash is needed.

The file (`STREAMREC_API_KEYS_FILE`, default `<state_dir>/api-keys.json`, mode 0600):

    {"keys": [{"name": "ingest", "scopes": ["events:write"], "sha256": "<hex>", "created": 1764680000.0}]}

The API re-reads it when its modification time changes, so added or removed keys take effect
without a restart.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import orjson

from stream_app.core.errors import ConfigError
from stream_app.core.settings import Settings

SCOPES = ("events:write", "read")
NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
KEY_PREFIX = "sr_"


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A stored key: its name (the namespace of the event ids it writes), scopes and hash."""

    name: str
    scopes: frozenset[str]
    sha256: str


def keys_file(settings: Settings) -> Path:
    """Where the keys are kept: `api_keys_file`, or `api-keys.json` in the state dir."""
    return Path(settings.api_keys_file) if settings.api_keys_file else Path(settings.state_dir) / "api-keys.json"


def digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


class KeyStore:
    """The keys of one file; `find(token)` is what the API asks on every authenticated request."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self._keys: tuple[ApiKey, ...] = ()
        self._stamp: tuple[int, int] | None = None
        self._checked = float("-inf")
        self._lock = threading.Lock()

    def keys(self) -> tuple[ApiKey, ...]:
        """The stored keys, re-read when the file changed (checked at most once a second)."""
        now = time.monotonic()
        if now - self._checked >= 1.0:
            with self._lock:
                self._checked = now
                try:
                    st = self.path.stat()
                    stamp: tuple[int, int] | None = (st.st_mtime_ns, st.st_size)
                except FileNotFoundError:
                    stamp = None
                if stamp != self._stamp:
                    self._keys = self._read() if stamp is not None else ()
                    self._stamp = stamp
        return self._keys

    def _read(self) -> tuple[ApiKey, ...]:
        try:
            data = orjson.loads(self.path.read_bytes())
            return tuple(ApiKey(k["name"], frozenset(k["scopes"]), k["sha256"]) for k in data["keys"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"the API keys file {self.path} is unreadable ({exc!r}); fix or remove it, "
                              "then create keys with `streamrec keys add NAME --scope events:write`") from None

    def find(self, token: str) -> ApiKey | None:
        """The key whose hash matches `token`, compared in constant time against every stored hash."""
        presented = digest(token)
        found = None
        for key in self.keys():
            if hmac.compare_digest(presented, key.sha256):
                found = key
        return found

    def add(self, name: str, scopes: list[str]) -> str:
        """Create a key named `name` with `scopes`; returns the key (only its hash is stored)."""
        if not NAME.fullmatch(name):
            raise ConfigError(f"key name {name!r} must be 1-64 letters, digits, '_', '.' or '-'")
        unknown = sorted(set(scopes) - set(SCOPES))
        if not scopes or unknown:
            raise ConfigError(f"scopes must be some of {', '.join(SCOPES)} (got {', '.join(scopes) or 'none'})")
        records = self._records()
        if any(r["name"] == name for r in records):
            raise ConfigError(f"a key named {name!r} exists; remove it first with `streamrec keys remove {name}`")
        token = KEY_PREFIX + secrets.token_urlsafe(32)
        records.append({"name": name, "scopes": sorted(set(scopes)), "sha256": digest(token), "created": time.time()})
        self._write(records)
        return token

    def remove(self, name: str) -> bool:
        """Delete the key named `name`; False when there is none."""
        records = self._records()
        kept = [r for r in records if r["name"] != name]
        if len(kept) == len(records):
            return False
        self._write(kept)
        return True

    def _records(self) -> list[dict]:
        if not self.path.exists():
            return []
        self._read()  # a broken file is reported, never overwritten
        return list(orjson.loads(self.path.read_bytes())["keys"])

    def _write(self, records: list[dict]) -> None:
        """Replace the file atomically, readable by its owner only."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(orjson.dumps({"keys": records}, option=orjson.OPT_INDENT_2))
        os.replace(tmp, self.path)
        self._checked = float("-inf")
