"""Add-on files kept next to the models, as A1111 keeps them: `models/Lora`, `models/VAE`,
`models/embeddings`, `models/ControlNet`. One catalog rule for all three: `name.safetensors` anywhere below the folder, or a
diffusers folder `name/<its weights file>`; found by name (or a LoRA's alias); scanned on first use, on
refresh, when the folder changes, and when a name is not known yet (so a file copied in is found without a
restart).

No torch here: the API role lists these without loading anything; the engine loads them.
"""

from __future__ import annotations

import json
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class AddonFile:
    name: str
    path: Path
    metadata: dict[str, Any] = field(default_factory=dict)
    shapes: dict[str, list[int]] = field(default_factory=dict)  # tensor name -> shape, from the header

    @property
    def alias(self) -> str:
        """kohya's `ss_output_name`, which A1111 also accepts in `<lora:…>`; else the name."""
        return str(self.metadata.get("ss_output_name") or self.name)


def read_header(path: Path) -> tuple[dict[str, Any], dict[str, list[int]]]:
    """A safetensors file's `__metadata__` (e.g. kohya's training notes) and its tensors' shapes, read from
    its header alone. Metadata values that are JSON objects or lists (tag frequencies, dataset dirs) are
    decoded, as A1111 shows them."""
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if length > 100_000_000:
            raise ValueError(f"{path.name}: not a safetensors file")
        header = json.loads(f.read(length))
    if not isinstance(header, dict):
        raise ValueError(f"{path.name}: not a safetensors file")
    out: dict[str, Any] = {}
    for key, value in (header.get("__metadata__") or {}).items():
        if isinstance(value, str) and value[:1] in "{[":
            try:
                value = json.loads(value)
            except ValueError:
                pass
        out[key] = value
    shapes = {k: list(v.get("shape", [])) for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)}
    return out, shapes


class AddonCatalog:
    """The add-on files of one kind under `folder`. `folder_file`: the weights file of a diffusers-format
    folder of this kind (the folder's name is then the add-on's name)."""

    def __init__(self, folder: Path, kind: str, folder_file: str) -> None:
        self.folder = Path(folder)
        self.kind = kind
        self.folder_file = folder_file
        self._lock = threading.Lock()
        self._files: dict[str, AddonFile] | None = None
        self._scanned_mtime: float | None = None

    def _mtime(self) -> float | None:
        try:
            return self.folder.stat().st_mtime
        except OSError:
            return None

    def refresh(self) -> list[AddonFile]:
        found: dict[str, AddonFile] = {}
        mtime = self._mtime()
        if self.folder.is_dir():
            for path in sorted(self.folder.rglob("*.safetensors")):
                if path.name == self.folder_file:
                    if path.parent == self.folder:
                        continue
                    name = path.parent.name
                else:
                    name = path.stem
                try:
                    metadata, shapes = read_header(path)
                except (OSError, ValueError, struct.error, UnicodeDecodeError):
                    continue  # unreadable: not listed, so a job naming it fails as unknown
                found.setdefault(name, AddonFile(name, path, metadata, shapes))
        with self._lock:
            self._files, self._scanned_mtime = found, mtime
        return list(found.values())

    def list(self) -> list[AddonFile]:
        """The files as last scanned; rescanned first when the folder itself changed (a file added or
        removed at its top level)."""
        with self._lock:
            files, scanned = self._files, self._scanned_mtime
        if files is None or scanned != self._mtime():
            return self.refresh()
        return list(files.values())

    def get(self, name: str) -> AddonFile:
        """The file named `name` (or aliased so); rescans once when it is not known yet. KeyError says which
        names there are."""
        for attempt in range(2):
            files = {f.name: f for f in self.list()}
            if name in files:
                return files[name]
            stem = name.removesuffix(".safetensors")  # A1111 names VAEs by their file name
            if stem in files:
                return files[stem]
            by_alias = [f for f in files.values() if f.alias == name]
            if by_alias:
                return by_alias[0]
            if attempt == 0:
                self.refresh()
        known = ", ".join(sorted(f.name for f in self.list())) or "none"
        raise KeyError(f"unknown {self.kind} {name!r}: put {name}.safetensors in {self.folder} (known: {known})")


def loras(models_dir: Path) -> AddonCatalog:
    return AddonCatalog(Path(models_dir) / "Lora", "LoRA", "pytorch_lora_weights.safetensors")


def vaes(models_dir: Path) -> AddonCatalog:
    return AddonCatalog(Path(models_dir) / "VAE", "VAE", "diffusion_pytorch_model.safetensors")


def embeddings(models_dir: Path) -> AddonCatalog:
    return AddonCatalog(Path(models_dir) / "embeddings", "embedding", "learned_embeds.safetensors")


def controlnets(models_dir: Path) -> AddonCatalog:
    return AddonCatalog(Path(models_dir) / "ControlNet", "ControlNet", "diffusion_pytorch_model.safetensors")
