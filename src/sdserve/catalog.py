"""The models a client can ask for, and how a name finds one: the rule every dialect and every role uses.

Two catalogs implement it:
- `ModelRegistry` (engine/models.py): the models on this machine, for `serve` and `worker`, which load them;
- `SharedCatalog` (here): what the `api` role knows without model files or torch: the models the workers
  published to the queue's shared table, plus the names the API itself was started with (`--model`),
  so that it accepts jobs while no worker runs yet (an autoscaler starts one when the queue fills).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

if TYPE_CHECKING:
    from sdserve.jobs.queue import SharedState

log = logging.getLogger(__name__)

# "declared": a name the API was started with that no worker has described yet.
Kind = Literal["demo", "diffusers", "single-file", "hub", "pickle", "declared"]
Arch = Literal["sd1", "sd2", "sdxl"]

# The queue's shared table workers publish their models in: name -> ModelInfo as JSON (with its sha256).
MODELS = "models"


class ModelError(Exception):
    """A model cannot be found or loaded; the message says why in one line."""


class UnknownModelError(ModelError, LookupError):
    pass


class ModelFailedError(ModelError):
    """The model exists but cannot load (a broken file, a missing config): the message is `info.error`, the file
    and why."""

    def __init__(self, info: ModelInfo) -> None:
        super().__init__(info.error or f"model {info.name!r} cannot load")
        self.info = info


@dataclass
class ModelInfo:
    name: str
    kind: Kind
    source: str  # a path, or a hub repo id
    arch: Arch | None = None
    size_bytes: int | None = None
    inpainting: bool = False  # a 9-channel inpainting UNet
    # Why it cannot load (the file and the reason), once that is known: listed as failed, refuses jobs (503 as the
    # default, 404 when named), and is tried again only when its file changes.
    error: str | None = None

    @property
    def path(self) -> Path:
        return Path(self.source)

    @property
    def filename(self) -> str:
        return self.source if self.kind in ("hub", "declared") else self.path.name

    @property
    def is_demo(self) -> bool:
        return self.kind == "demo"


class ModelCatalog(Protocol):
    allow_pickle: bool

    def list(self) -> list[ModelInfo]: ...

    def info(self, name: str | None) -> ModelInfo:
        """The model a name means (see `find`); UnknownModelError says which names exist."""

    def sha256(self, info: ModelInfo) -> str | None: ...

    def short_hash(self, info: ModelInfo) -> str | None: ...

    def loaded(self) -> list[str]: ...

    def default(self) -> str | None:
        """The model a request without one gets, unless a client chose another (Service.default_model)."""

    def refresh(self) -> list[ModelInfo]: ...


def looks_like_hash(name: str) -> bool:
    return len(name) in (10, 64) and all(c in "0123456789abcdef" for c in name)


def find(models: Iterable[ModelInfo], name: str, aliases: dict[str, str],
         sha256: Callable[[ModelInfo], str | None]) -> ModelInfo:
    """A model by name, filename, A1111 title (`name [hash]`), hash, or the operator's own words for it (a path,
    a hub id: `aliases`). Nothing else: a client never makes the server open a path of its choosing."""
    by_name = {m.name: m for m in models}
    if name in by_name:
        return by_name[name]
    key = name.split(" [")[0].strip()
    for m in by_name.values():
        if key in (m.name, m.filename, m.source):
            return m
    if name in aliases and aliases[name] in by_name:
        return by_name[aliases[name]]
    if looks_like_hash(name):
        for m in by_name.values():
            digest = sha256(m) if m.kind not in ("hub", "declared") else None
            if digest and (digest[:10] == name or digest == name):
                return m
    raise UnknownModelError(f"unknown model {name[:200]!r}; choose one of: {', '.join(by_name) or 'none'}")


def publish(shared: SharedState, models: list[ModelInfo], sha256: Callable[[ModelInfo], str | None]) -> None:
    """A worker tells every API replica what it serves (they keep it after the worker stops). Called on every
    heartbeat: it writes only what the table lacks or holds otherwise, so a Redis that came back empty has the
    models again within a heartbeat."""
    published = shared.shared_get(MODELS)
    for info in models:
        entry = json.dumps({**asdict(info), "sha256": None if info.error else sha256(info)})
        if published.get(info.name) != entry:
            shared.shared_put(MODELS, info.name, entry)


class SharedCatalog:
    """The `api` role's catalog: published models, then the API's own `--model` names not yet described."""

    # Publications change when a worker starts; a submission reads them several times: read at most this often.
    TTL_S = 2.0

    def __init__(self, shared: SharedState, declared: list[str], allow_pickle: bool = False) -> None:
        self.shared = shared
        self.declared = list(declared)
        self.allow_pickle = allow_pickle
        self._names = {f.name for f in fields(ModelInfo)}
        self._read: tuple[float, dict[str, tuple[ModelInfo, str | None]]] = (-1e9, {})
        self._workers: tuple[float, list[dict]] = (-1e9, [])

    def _published(self) -> dict[str, tuple[ModelInfo, str | None]]:
        now = time.monotonic()
        if now - self._read[0] > self.TTL_S:
            self._read = (now, self._parse(self.shared.shared_get(MODELS)))
        return self._read[1]

    def _live(self) -> list[dict]:
        now = time.monotonic()
        if now - self._workers[0] > self.TTL_S:
            self._workers = (now, self.shared.workers())
        return self._workers[1]

    def _parse(self, table: dict[str, str]) -> dict[str, tuple[ModelInfo, str | None]]:
        out = {}
        for name, raw in sorted(table.items()):
            try:
                entry = json.loads(raw)
                out[name] = (ModelInfo(**{k: v for k, v in entry.items() if k in self._names}), entry.get("sha256"))
            except (ValueError, TypeError):
                log.warning("ignoring an unreadable published model %r", name)
        return out

    def list(self) -> list[ModelInfo]:
        published = self._published()
        infos = [info for info, _ in published.values()]
        known = {key for m in infos for key in (m.name, m.filename, m.source)}
        # A declared name a worker described under another name (a path, `demo`) is that model, not a second one.
        return [*(ModelInfo(n, "declared", n) for n in self.declared if n not in known), *infos]

    def info(self, name: str | None) -> ModelInfo:
        try:
            return self._find(name)
        except UnknownModelError:  # maybe published since the last read: read again before saying no
            self.refresh()
            return self._find(name)

    def _find(self, name: str | None) -> ModelInfo:
        name = name or self.default()
        if not name:
            raise UnknownModelError("no model given, and no worker has published one yet (start the API with --model)")
        published = self._published()
        return find(self.list(), name, {}, lambda m: published.get(m.name, (None, None))[1])

    def default(self) -> str | None:
        """The API's first --model, else the model the live workers run, else the first published."""
        if self.declared:
            return self.declared[0]
        running = [w["model"] for w in self._live() if w.get("model")]
        models = self.list()
        for name in running:
            for m in models:
                if name in (m.name, m.source):
                    return m.name
        return models[0].name if models else None

    def sha256(self, info: ModelInfo) -> str | None:
        return self._published().get(info.name, (None, None))[1]

    def short_hash(self, info: ModelInfo) -> str | None:
        full = self.sha256(info)
        return full[:10] if full else None

    def loaded(self) -> list[str]:
        """The models a live, ready worker has loaded (workers name them as they were started: name or path)."""
        running = {w["model"] for w in self._live() if w.get("ready") and w.get("model")}
        return [m.name for m in self.list() if running & {m.name, m.source}]

    def refresh(self) -> list[ModelInfo]:
        """A1111's refresh-checkpoints: read the publications now."""
        self._read, self._workers = (-1e9, {}), (-1e9, [])
        return self.list()
