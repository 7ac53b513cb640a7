"""Who is calling, and what the operator allows them: API keys from `--api-key` and a keys file.

The keys file (`--keys-file`, TOML or YAML) lists keys with a label and, optionally, their own limits,
priority and fair-share weight:

    [[keys]]
    key = "sk-team-a"              # or sha256 = "<hex of the key>", so the file need not hold the secret
    label = "team-a"               # what its jobs and metrics show; never the key itself
    rate_limit = "10/s"            # submissions (default: --rate-limit)
    rate_burst = 20
    images_per_minute = 120        # (default: --images-per-minute)
    priority = 10                  # its jobs' priority; a request may ask for lower, never higher
    weight = 2                     # its share of the workers when several keys have jobs queued

A caller is the key auth accepted, a Basic user, or (auth off) the client's address. Its `id` names its rate
limit buckets and its fair-share turn; its `label` is what it shows. The file is read again when it changes.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import tomllib
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from sdserve.ratelimit import Rate

ANONYMOUS = "anonymous"  # the label of callers without a key (their addresses stay out of metrics)


@dataclass(frozen=True)
class Caller:
    id: str  # "key:<sha256 prefix>", "user:<name>" or "addr:<ip>": buckets and fair-share turns
    label: str  # what its jobs and metrics show
    weight: float = 1.0
    priority: int | None = None  # the highest priority its jobs may have (and the one they get by default)
    requests: Rate | None = None  # its own limits; None: the server's
    images: Rate | None = None

    def priority_for(self, asked: int, explicit: bool) -> int:
        """A job's priority: what the request asked (if it asked), never above the key's."""
        if self.priority is None:
            return asked
        return min(asked, self.priority) if explicit else self.priority


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def key_caller_id(key: str) -> str:
    return "key:" + key_hash(key)[:16]


def address_caller(address: str) -> Caller:
    return Caller(id="addr:" + address, label=ANONYMOUS)


def user_caller(user: str) -> Caller:
    return Caller(id="user:" + user, label=user)


class KeyEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    key: str | None = Field(None, min_length=8)
    sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")
    label: str = Field(..., min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.@:-]+$")
    rate_limit: str | None = None
    rate_burst: float | None = Field(None, gt=0)
    images_per_minute: float | None = Field(None, gt=0)
    priority: int | None = Field(None, ge=-100, le=100)
    weight: float = Field(1.0, gt=0, le=1000)

    @model_validator(mode="after")
    def _one_key(self) -> KeyEntry:
        if (self.key is None) == (self.sha256 is None):
            raise ValueError("give each entry either `key` or `sha256`")
        if self.rate_limit is not None:
            Rate.parse(self.rate_limit)
        return self

    @property
    def digest(self) -> str:
        return (self.sha256 or key_hash(self.key or "")).lower()

    def caller(self) -> Caller:
        return Caller(
            id="key:" + self.digest[:16], label=self.label, weight=self.weight, priority=self.priority,
            requests=Rate.parse(self.rate_limit, self.rate_burst) if self.rate_limit else None,
            images=Rate(self.images_per_minute / 60, self.images_per_minute) if self.images_per_minute else None,
        )


class KeysFileError(ValueError):
    pass


def read_keys_file(path: Path) -> list[KeyEntry]:
    text = path.read_text()
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise KeysFileError(f"keys file {path}: cannot parse it: {exc}") from None
    entries = (data or {}).get("keys") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise KeysFileError(f"keys file {path}: expected a `keys` list ([[keys]] in TOML, keys: in YAML)")
    try:
        found = [KeyEntry.model_validate(e) for e in entries]
    except ValidationError as exc:
        raise KeysFileError(f"keys file {path}: {exc}") from None
    digests = [e.digest for e in found]
    if len(set(digests)) != len(digests):
        raise KeysFileError(f"keys file {path}: a key is listed twice")
    return found


@dataclass
class KeyBook:
    """The keys auth accepts: `--api-key` ones (labelled by a prefix of their hash) and the keys file's."""

    plain: list[str] = field(default_factory=list)
    path: Path | None = None
    _entries: list[tuple[str, Caller]] = field(default_factory=list)  # (key digest, its caller), made once
    _mtime: float = -1.0
    _checked: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.plain = [k for k in self.plain if k]
        if self.path is not None:
            try:
                self._load()  # a broken file stops the server at start, with the reason
            except OSError as exc:
                raise KeysFileError(f"keys file {self.path}: {exc.strerror or exc}") from None

    def _load(self) -> None:
        assert self.path is not None
        mtime = self.path.stat().st_mtime
        self._entries, self._mtime = [(e.digest, e.caller()) for e in read_keys_file(self.path)], mtime

    def _fresh(self) -> list[tuple[str, Caller]]:
        """The keys file's entries, read again (at most once a second) when it changed; a broken edit keeps the
        last good entries."""
        if self.path is None:
            return self._entries
        now = time.monotonic()
        if now - self._checked >= 1.0:
            with self._lock:
                self._checked = now
                try:
                    if self.path.stat().st_mtime != self._mtime:
                        self._load()
                except (OSError, KeysFileError):
                    pass
        return self._entries

    @property
    def active(self) -> bool:
        return bool(self.plain or self.path is not None)

    def lookup(self, candidate: str | None) -> Caller | None:
        """The caller this key belongs to, or None. Constant time in which key matched."""
        if not candidate:
            return None
        digest = key_hash(candidate)
        found: Caller | None = None
        for entry_digest, caller in self._fresh():
            if hmac.compare_digest(digest, entry_digest):
                found = caller
        for key in self.plain:
            if hmac.compare_digest(candidate.encode(), key.encode()) and found is None:
                found = Caller(id=key_caller_id(key), label="key-" + digest[:8])
        return found
