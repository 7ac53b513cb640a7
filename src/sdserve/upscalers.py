"""Upscalers, as A1111 names them: the built-in resamplers and the ESRGAN-family models a user puts in
`models/ESRGAN` or `models/RealESRGAN` (read by spandrel on the worker: engine/upscale.py).

One rule for a name, wherever it is used (`extras`' upscaler_1/upscaler_2, hires fix's `hr_upscaler`):
`None`, `Lanczos`, `Nearest`, the six latent modes (hires fix only), or a model file's name (its stem). A
`.safetensors` file is preferred over a pickle (`.pth`, `.pt`) of the same name; a pickle can run code when
loaded, so one is refused unless the server runs with `--allow-pickle`.

No torch here: the API role lists and checks names without loading anything.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from pathlib import Path

from sdserve.schema import LATENT_UPSCALERS, PIXEL_UPSCALERS

FOLDERS = ("ESRGAN", "RealESRGAN")
SUFFIXES = (".safetensors", ".pth", ".pt")  # in order of preference
# `4x-UltraSharp`, `ESRGAN_4x`, `RealESRGAN_x2plus`: a digit and an x, standing apart from other letters and digits
_SCALE = re.compile(r"(?:^|[^a-z\d])(\d)x(?![a-z\d])|(?:^|[^a-z\d])x(\d)(?!\d)", re.IGNORECASE)


class UnknownUpscalerError(KeyError):
    """No upscaler of that name; the message lists the ones there are."""


class PickleRefusedError(ValueError):
    """The upscaler is a pickle and the server does not load pickles."""


@dataclass(frozen=True)
class UpscalerFile:
    name: str
    path: Path

    @property
    def pickle(self) -> bool:
        return self.path.suffix != ".safetensors"

    @property
    def scale(self) -> int:
        """What its name says (`4x-UltraSharp`, `RealESRGAN_x2plus`), else 4, as A1111 lists it; the model's own
        scale is what upscaling uses."""
        match = _SCALE.search(self.name)
        return int(next(g for g in match.groups() if g)) if match else 4


class UpscalerCatalog:
    """The upscaler model files under `models_dir`'s ESRGAN folders, rescanned when a folder changes or a name
    is not known yet (a file copied in is found without a restart)."""

    def __init__(self, models_dir: Path, allow_pickle: bool = False) -> None:
        self.folders = [Path(models_dir) / f for f in FOLDERS]
        self.allow_pickle = allow_pickle
        self._lock = threading.Lock()
        self._files: dict[str, UpscalerFile] | None = None
        self._mtimes: tuple = ()

    def _stamp(self) -> tuple:
        return tuple(f.stat().st_mtime if f.is_dir() else None for f in self.folders)

    def refresh(self) -> list[UpscalerFile]:
        stamp = self._stamp()
        found: dict[str, UpscalerFile] = {}
        for folder in self.folders:
            if not folder.is_dir():
                continue
            paths = [p for p in folder.rglob("*") if p.suffix in SUFFIXES and p.is_file()]
            for path in sorted(paths, key=lambda p: (SUFFIXES.index(p.suffix), str(p))):
                found.setdefault(path.stem, UpscalerFile(path.stem, path))
        with self._lock:
            self._files, self._mtimes = dict(sorted(found.items())), stamp
        return list(found.values())

    def list(self) -> list[UpscalerFile]:
        with self._lock:
            files, stamp = self._files, self._mtimes
        if files is None or stamp != self._stamp():
            return self.refresh()
        return list(files.values())

    def get(self, name: str) -> UpscalerFile:
        """The model named `name`; PickleRefusedError for a pickle without --allow-pickle."""
        for attempt in range(2):
            files = {f.name: f for f in self.list()}
            if name in files:
                found = files[name]
                if found.pickle and not self.allow_pickle:
                    raise PickleRefusedError(
                        f"upscaler {name!r} is a pickle ({found.path.name}), which can run code when loaded: convert "
                        f"it to .safetensors, or start the server with --allow-pickle")
                return found
            if attempt == 0:
                self.refresh()
        known = ", ".join([*PIXEL_UPSCALERS, *files]) or "none"
        raise UnknownUpscalerError(f"unknown upscaler {name!r}: put {name}.safetensors in {self.folders[0]} "
                                   f"(known: {known})")

    def check(self, name: str, latent: bool = False) -> None:
        """That `name` can be used (`latent`: the hires fix's latent modes too): UnknownUpscalerError or
        PickleRefusedError if not."""
        if name in PIXEL_UPSCALERS or (latent and name in LATENT_UPSCALERS):
            return
        self.get(name)

    def a1111(self) -> list[dict]:
        """A1111's `/sdapi/v1/upscalers`: the built-in resamplers, then each model."""
        builtin = [{"name": n, "model_name": None, "model_path": None, "model_url": None, "scale": 4}
                   for n in PIXEL_UPSCALERS]
        return builtin + [{"name": f.name, "model_name": f.path.parent.name, "model_path": str(f.path),
                           "model_url": None, "scale": f.scale} for f in self.list()]
