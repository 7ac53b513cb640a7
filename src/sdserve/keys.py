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
    admin = true                   # sees and manages every key's jobs (default: only its own)
    webhook_secret = "whsec_..."   # signs its jobs' webhooks (default: --webhook-secret)

A caller is the key auth accepted, a Basic user, or (auth off) the client's address. Its `id` names its rate
limit buckets and its fair-share turn; its `label` is what it shows. The file is read again when it changes.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from sdserve import webhooks
from sdserve.ratelimit import Rate

log = logging.getLogger(__name__)

ANONYMOUS = "anonymous"  # the label of callers without a key (their addresses stay out of metrics)


@dataclass(frozen=True)
class Caller:
    id: str  # "key:<sha256 prefix>", "user:<name>" or "addr:<ip>": buckets and fair-share turns
    label: str  # what its jobs and metrics show
    weight: float = 1.0
    priority: int | None = None  # the highest priority its jobs may have (and the one they get by default)
    requests: Rate | None = None  # its own limits; None: the server's
    images: Rate | None = None
    # Sees and manages every caller's jobs: an `admin` key, and (auth off) everyone, who are then one caller.
    sees_all: bool = False
    webhook_secret: str | None = field(default=None, repr=False)  # signs its jobs' webhooks (keys file)

    @property
    def account(self) -> str:
        """What scopes its idempotency keys: its id, or with auth off (an address) the one shared account."""
        return "" if self.id.startswith("addr:") else self.id

    def owns(self, owner: str) -> bool:
        """Whether this caller may see and touch a job (or its images) submitted by `owner`."""
        return self.sees_all or owner == self.id

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
    """Auth off: the address names the caller's rate limits and fair-share turn, but it is no identity (a proxy,
    a NAT), so every such caller sees every job: everyone on the network is one caller."""
    return Caller(id="addr:" + address, label=ANONYMOUS, sees_all=True)


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
    admin: bool = False  # sees and manages every caller's jobs and images
    webhook_secret: str | None = Field(None, repr=False)

    @model_validator(mode="after")
    def _one_key(self) -> KeyEntry:
        if self.webhook_secret is not None:
            webhooks.check_secret(self.webhook_secret)
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
            sees_all=self.admin, webhook_secret=self.webhook_secret,
        )


class KeysFileError(ValueError):
    pass


def read_keys_file(path: Path, content: bytes | None = None) -> list[KeyEntry]:
    try:
        text = (path.read_bytes() if content is None else content).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise KeysFileError(f"keys file {path}: not UTF-8 text ({exc.reason})") from None
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
    """The keys auth accepts: `--api-key` ones (labelled by a prefix of their hash) and the keys file's.

    Fails closed: a keys file that is deleted or cannot be read stops every key it gave (until it is back); one
    that fails to parse after an edit keeps the last good keys, loudly (the log, /readyz and a metric say so), so
    a typo never locks everyone out. Keys are compared as UTF-8 bytes, in constant time."""

    plain: list[str] = field(default_factory=list)
    path: Path | None = None
    _problem: str | None = None  # what is wrong with the keys file now (see check)
    _entries: list[tuple[str, Caller]] = field(default_factory=list)  # (key digest, its caller), made once
    _content: bytes | None = None  # the keys file as last read
    _checked: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        if any(not k for k in self.plain):
            raise KeysFileError("--api-key: an empty key (an unset variable?); refusing to start without it")
        if self.path is not None:
            try:
                self._load()  # a broken file stops the server at start, with the reason
            except OSError as exc:
                raise KeysFileError(f"keys file {self.path}: {exc.strerror or exc}") from None

    def _load(self) -> None:
        assert self.path is not None
        content = self.path.read_bytes()
        self._entries, self._content = [(e.digest, e.caller()) for e in read_keys_file(self.path, content)], content

    def _trouble(self, problem: str) -> None:
        if problem != self._problem:
            log.error("%s", problem)
        self._problem = problem

    def _fresh(self) -> list[tuple[str, Caller]]:
        """The keys file's entries, read again (at most once a second) when it changed."""
        if self.path is None:
            return self._entries
        now = time.monotonic()
        if now - self._checked >= 1.0:
            with self._lock:
                self._checked = now
                try:
                    # Read, not stat: a file made unreadable (chmod) keeps its mtime, and must stop its keys too.
                    if self.path.read_bytes() != self._content:
                        self._load()
                        if self._problem is not None:
                            log.info("keys file %s: read again, %d key(s)", self.path, len(self._entries))
                        self._problem = None
                except OSError as exc:  # deleted, unreadable: its keys no longer open anything
                    self._entries, self._content = [], None
                    self._trouble(f"keys file {self.path}: {exc.strerror or exc}: every key it listed is refused "
                                  "until it is back")
                except KeysFileError as exc:  # a bad edit: keep the last good keys
                    self._trouble(f"{exc}; keeping the last good keys ({len(self._entries)})")
        return self._entries

    def check(self) -> str | None:
        """What is wrong with the keys file now (read again if it changed), for readiness and the metric; None
        when nothing is."""
        self._fresh()
        return self._problem

    @property
    def active(self) -> bool:
        return bool(self.plain or self.path is not None)

    def describe(self, users: int = 0) -> str:
        """What the start-up banner says about auth (`users`: Basic users besides): the truth, including a keys
        file that admits nobody."""
        listed = len(self._fresh()) + len(self.plain)
        parts = [f"{listed} key{'s' if listed != 1 else ''}"] if self.active else []
        parts += [f"{users} Basic user{'s' if users != 1 else ''}"] if users else []
        if not parts:
            return "off (every client is one caller)"
        if listed == 0 and not users:
            return "on, but no keys are listed: every request is refused"
        return f"on ({', '.join(parts)})"

    def webhook_secret(self, caller_id: str) -> str | None:
        """The keys file's webhook secret of the key behind this caller id, if it has one."""
        return next((caller.webhook_secret for _, caller in self._fresh() if caller.id == caller_id), None)

    def lookup(self, candidate: bytes | str | None) -> Caller | None:
        """The caller this key (the header's bytes, read as UTF-8) belongs to, or None. Constant time in which key
        matched."""
        if not candidate:
            return None
        raw = candidate.encode() if isinstance(candidate, str) else candidate
        digest = hashlib.sha256(raw).hexdigest()
        found: Caller | None = None
        for entry_digest, caller in self._fresh():
            if hmac.compare_digest(digest, entry_digest):
                found = caller
        for key in self.plain:
            if hmac.compare_digest(raw, key.encode()) and found is None:
                found = Caller(id=key_caller_id(key), label="key-" + digest[:8])
        return found
