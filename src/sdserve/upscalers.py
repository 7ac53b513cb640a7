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
from pathlib import Path

from sdserve.addons import AddonCatalog, AddonFile
from sdserve.schema import LATENT_UPSCALERS, PIXEL_UPSCALERS

FOLDERS = ("ESRGAN", "RealESRGAN")
SUFFIXES = (".safetensors", ".pth", ".pt")  # in order of preference
# `4x-UltraSharp`, `ESRGAN_4x`, `RealESRGAN_x2plus`: a digit and an x, standing apart from other letters and digits
_SCALE = re.compile(r"(?:^|[^a-z\d])(\d)x(?![a-z\d])|(?:^|[^a-z\d])x(\d)(?!\d)", re.IGNORECASE)


class UnknownUpscalerError(KeyError):
    """No upscaler of that name; the message lists the ones there are."""


class PickleRefusedError(ValueError):
    """The upscaler is a pickle and the server does not load pickles."""


class UpscalerFile(AddonFile):
    @property
    def pickle(self) -> bool:
        return self.path.suffix != ".safetensors"

    @property
    def scale(self) -> int:
        """What its name says (`4x-UltraSharp`, `RealESRGAN_x2plus`), else 4, as A1111 lists it; the model's own
        scale is what upscaling uses."""
        match = _SCALE.search(self.name)
        return int(next(g for g in match.groups() if g)) if match else 4


class UpscalerCatalog(AddonCatalog):
    """The upscaler model files under `models_dir`'s ESRGAN folders: the add-on catalog's rules (rescanned when a
    folder changes or a name is not known yet), over two folders and pickles too, without reading headers."""

    def __init__(self, models_dir: Path, allow_pickle: bool = False) -> None:
        super().__init__(Path(models_dir) / FOLDERS[0], "upscaler", folder_file="")
        self.folders = [Path(models_dir) / f for f in FOLDERS]
        self.allow_pickle = allow_pickle

    def _mtime(self) -> tuple:  # type: ignore[override]
        return tuple(f.stat().st_mtime if f.is_dir() else None for f in self.folders)

    def refresh(self) -> list[AddonFile]:
        stamp = self._mtime()
        found: dict[str, AddonFile] = {}
        for folder in self.folders:
            if not folder.is_dir():
                continue
            paths = [p for p in folder.rglob("*") if p.suffix in SUFFIXES and p.is_file()]
            for path in sorted(paths, key=lambda p: (SUFFIXES.index(p.suffix), str(p))):
                found.setdefault(path.stem, UpscalerFile(path.stem, path))
        found = dict(sorted(found.items()))
        with self._lock:
            self._files, self._scanned_mtime = found, stamp
        return list(found.values())

    def get(self, name: str) -> UpscalerFile:
        """The model named `name`: UnknownUpscalerError if there is none, PickleRefusedError for a pickle without
        --allow-pickle."""
        try:
            found = super().get(name)
        except KeyError as exc:
            raise UnknownUpscalerError(exc.args[0]) from None
        assert isinstance(found, UpscalerFile)
        if found.pickle and not self.allow_pickle:
            raise PickleRefusedError(
                f"upscaler {name!r} is a pickle ({found.path.name}), which can run code when loaded: convert "
                f"it to .safetensors, or start the server with --allow-pickle")
        return found

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
