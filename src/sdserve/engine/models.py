"""Model registry: finds models, reports name/kind/size/hash, loads pipelines with an LRU bound.

Sources, in the order a name is resolved:
- `demo`: the embedded model, shipped in the package (`sdserve/models/demo`, made by `sdserve.demo.train`);
- a diffusers folder (has `model_index.json`), in `--models-dir` or given as a path;
- a single-file `.safetensors` checkpoint (SD 1.x, 2.x, SDXL), in `--models-dir` or given as a path;
- a Hugging Face repo id (`owner/name`), downloaded when online.

Pickle checkpoints (`.ckpt`, `.bin`, `.pt`) can run code when loaded, so they are refused unless
the operator passes `--allow-pickle`.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import struct
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from sdserve import addons
from sdserve.catalog import Arch, Kind, ModelError, ModelFailedError, ModelInfo, UnknownModelError, find
from sdserve.engine import accel, demo, quiet_libraries, samplers
from sdserve.engine.adapters import AdapterState
from sdserve.upscalers import UpscalerCatalog

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")
# A hub model that failed (offline) is tried again after this long.
HUB_RETRY_S = 60.0
WEIGHT_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)


@dataclass
class LoadedModel:
    info: ModelInfo
    short_hash: str | None
    pipelines: dict[str, Any]  # "txt2img" | "img2img" | "inpaint" -> pipeline, sharing one set of weights
    default_width: int
    default_height: int
    scheduler_config: dict[str, Any] = field(default_factory=dict)
    zero_snr: bool = False  # trained to zero terminal SNR (samplers.zero_terminal_snr): "Automatic" differs
    device: str = "cpu"
    adapters: AdapterState = field(default_factory=AdapterState)  # its LoRAs, loaded and active
    speedups: accel.Accelerated = field(default_factory=accel.Accelerated)  # what --optimize did to it


def resolve_device(device: str) -> str:
    import torch

    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _safetensors_header(path: Path) -> dict[str, Any]:
    """Tensor names and shapes from the file header, without reading the weights. ModelError names the file and
    what is wrong with it."""
    try:
        with path.open("rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            if length > 100_000_000:
                raise ModelError(f"{path}: not a safetensors file (header of {length} bytes)")
            header = json.loads(fh.read(length))
    except struct.error:
        raise ModelError(f"{path}: not a safetensors file (shorter than its 8-byte header length)") from None
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise ModelError(f"{path}: not a safetensors file (its header is not JSON: {exc})") from None
    except OSError as exc:
        raise ModelError(f"{path}: cannot be read: {exc.strerror or exc}") from None
    if not isinstance(header, dict):
        raise ModelError(f"{path}: not a safetensors file (its header is not a JSON object)")
    return header


def _signature(path: Path) -> tuple[int, int] | None:
    """What changes when a model's file is replaced: (size, mtime) of the file, or of a folder's index."""
    target = path / "model_index.json" if path.is_dir() else path
    try:
        stat = target.stat()
    except OSError:
        return None
    return stat.st_size, stat.st_mtime_ns


def detect_arch(header: dict[str, Any]) -> tuple[Arch | None, bool]:
    """(architecture, is 9-channel inpainting) from checkpoint key names, as A1111 and diffusers do."""
    keys = header.keys()
    if any(k.startswith("conditioner.embedders.1.") for k in keys):
        arch: Arch | None = "sdxl"
    elif any(k.startswith("cond_stage_model.model.") for k in keys):
        arch = "sd2"
    elif any(k.startswith("cond_stage_model.transformer.") for k in keys):
        arch = "sd1"
    else:
        arch = None
    conv_in = header.get("model.diffusion_model.input_blocks.0.0.weight", {})
    return arch, len(conv_in.get("shape", [])) > 1 and conv_in["shape"][1] == 9


class ModelRegistry:
    def __init__(
        self,
        models_dir: Path,
        data_dir: Path,
        extra: list[str] | None = None,
        device: str = "auto",
        allow_pickle: bool = False,
        max_loaded: int = 1,
        optimize: list[str] | None = None,
        compile_cache: Path | None = None,
    ) -> None:
        self.models_dir = Path(models_dir)
        self.loras = addons.loras(self.models_dir)
        self.vaes = addons.vaes(self.models_dir)
        self.embeddings = addons.embeddings(self.models_dir)
        self.controlnets = addons.controlnets(self.models_dir)
        self.data_dir = Path(data_dir)
        self.extra = list(extra or ["demo"])
        self.device = resolve_device(device)
        self.allow_pickle = allow_pickle
        self.upscalers = UpscalerCatalog(self.models_dir, allow_pickle)  # models/ESRGAN (engine/upscale.py runs them)
        self.max_loaded = max(1, max_loaded)
        try:
            self.optimize = accel.resolve(optimize, self.device)  # None or [] = auto
        except ValueError as exc:
            raise ModelError(str(exc)) from None
        self.compile_cache = Path(compile_cache) if compile_cache else self.data_dir / "compiled"
        self._loaded: OrderedDict[str, LoadedModel] = OrderedDict()
        self._hash_cache: dict[str, Any] | None = None  # _read_hash_cache
        self._lock = threading.RLock()
        self._hash_cache_path = self.data_dir / "hashes.json"
        self._models: dict[str, ModelInfo] | None = None
        self._aliases: dict[str, str] = {}
        # Models that failed: name -> (their file's signature then, or for the hub when; the reason). A changed
        # file is tried again.
        self._failures: dict[str, tuple[tuple[float, int] | None, str]] = {}
        self._specs: dict[str, str] = {}  # name -> what described it (a path, a hub id), to describe it again

    # ----- discovery -------------------------------------------------------------------------
    def refresh(self) -> list[ModelInfo]:
        with self._lock:
            found: dict[str, ModelInfo] = {}
            aliases: dict[str, str] = {}
            for spec in self.extra:
                info = self._described(spec)
                found.setdefault(info.name, info)
                aliases[spec] = info.name  # the operator's own words for it: a path, a hub id
            if self.models_dir.is_dir():
                for entry in sorted(self.models_dir.iterdir()):
                    if entry.name.startswith(".") or entry.name == "configs":
                        continue
                    if (entry / "model_index.json").is_file() or entry.suffix.lower() in WEIGHT_SUFFIXES:
                        info = self._described(str(entry))
                        found.setdefault(info.name, info)
            self._models, self._aliases = found, aliases
            return self.list()

    def list(self) -> list[ModelInfo]:
        """Every model, a failed one with its `error` (one whose file changed since is offered again)."""
        with self._lock:
            if self._models is None:
                return self.refresh()
            return [self._with_failure(info) for info in self._models.values()]

    def _with_failure(self, info: ModelInfo) -> ModelInfo:
        """The model as it stands: a failure is kept while its file is unchanged (a hub model's, for
        HUB_RETRY_S); a changed file is described again and offered again."""
        if info.name not in self._failures:
            return info
        signature, reason = self._failures[info.name]
        if info.kind == "hub":
            stale = signature is not None and time.monotonic() - signature[0] > HUB_RETRY_S
        else:
            stale = signature != _signature(info.path)
        if not stale:
            return replace(info, error=reason)
        del self._failures[info.name]  # replaced (or, on the hub, time to try again)
        if info.error is not None:  # it could not even be described: describe it again
            info = self._described(self._specs.get(info.name, info.source))
            assert self._models is not None
            self._models[info.name] = info
        return info

    def _described(self, spec: str) -> ModelInfo:
        """`_describe`, or for a model that cannot even be described (a corrupt file, a folder without its
        index, a path that is gone), a failed entry that says so: one bad file never hides the others."""
        try:
            info = self._describe(spec)
        except (ModelError, OSError, ValueError, TypeError, AttributeError, KeyError) as exc:
            path = Path(spec).expanduser()
            kind: Kind = "single-file" if path.suffix.lower() == ".safetensors" else "diffusers"
            name = path.stem if path.suffix.lower() in WEIGHT_SUFFIXES else path.name or spec
            reason = str(exc) if isinstance(exc, ModelError) else f"{path}: cannot be read as a model ({exc})"
            log.error("model %s: %s", name, reason)
            info = ModelInfo(name, kind, str(path.resolve()) if path.exists() else spec, error=reason)
            self._failures[name] = (_signature(path), reason)
        self._specs[info.name] = spec
        return info

    def info(self, name: str | None) -> ModelInfo:
        """Find one of the models the operator configured or the models folder holds, by name, filename,
        A1111 title (`name [hash]`), hash, or the path or hub id the operator gave. Nothing else: a client
        never makes the server open a path of its choosing or download from the hub."""
        if not name:
            name = self.default()
            if not name:
                raise UnknownModelError("no model given and no default model configured")
        with self._lock:
            return find(self.list(), name, self._aliases, self.sha256)

    def _describe(self, spec: str) -> ModelInfo:
        # `demo` is the package's folder, described like any other diffusers folder (its marker makes it "demo").
        path = demo.DEMO_PATH if spec == demo.DEMO_NAME else Path(spec).expanduser()
        if not path.exists():
            # A bare name refers to the models folder: `tiny` -> models/tiny or models/tiny.safetensors.
            for candidate in (self.models_dir / spec, self.models_dir / f"{spec}.safetensors"):
                if candidate.exists():
                    path = candidate
                    break
        if path.is_dir():
            if not (path / "model_index.json").is_file():
                raise ModelError(f"{path} is a folder without model_index.json: not a diffusers model")
            kind: Kind = "demo" if demo.is_demo(path) else "diffusers"
            index = json.loads((path / "model_index.json").read_text())
            arch: Arch = "sdxl" if "XL" in index.get("_class_name", "") else "sd1"
            return ModelInfo(path.name, kind, str(path.resolve()), arch, _dir_size(path))
        if path.is_file():
            suffix = path.suffix.lower()
            if suffix in PICKLE_SUFFIXES:
                return ModelInfo(path.stem, "pickle", str(path.resolve()), None, path.stat().st_size)
            if suffix != ".safetensors":
                raise ModelError(f"{path.name}: not a model file (expected .safetensors or a diffusers folder)")
            arch_found, inpainting = detect_arch(_safetensors_header(path))
            return ModelInfo(path.stem, "single-file", str(path.resolve()), arch_found, path.stat().st_size, inpainting)
        if spec.count("/") == 1 and not spec.startswith((".", "/")):
            return ModelInfo(spec, "hub", spec)
        raise UnknownModelError(f"model {spec!r} not found: not 'demo', a folder, a .safetensors file or a hub id")

    def default(self) -> str | None:
        """The operator's default: the first --model."""
        return self.extra[0]

    # ----- hashes (A1111 "Model hash" = first 10 hex digits of the file's sha256) -------------
    def sha256(self, info: ModelInfo) -> str | None:
        if info.kind == "hub" or not info.path.exists():
            return None
        files = [info.path] if info.path.is_file() else sorted(p for p in info.path.rglob("*") if p.is_file())
        stat_key = [(str(p.relative_to(info.path.parent)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
        cache_key = str(info.path)
        with self._lock:
            cache = self._read_hash_cache()
            entry = cache.get(cache_key)
            if entry and entry.get("stat") == json.loads(json.dumps(stat_key)):
                return entry["sha256"]
            digest = hashlib.sha256()
            for p in files:
                if info.path.is_dir():
                    # A folder has no one file: hash every file with its relative path, in order.
                    digest.update(str(p.relative_to(info.path)).encode() + b"\0")
                with p.open("rb") as fh:
                    for chunk in iter(lambda: fh.read(1 << 20), b""):
                        digest.update(chunk)
            cache[cache_key] = {"stat": stat_key, "sha256": digest.hexdigest()}
            self._write_hash_cache(cache)
            return digest.hexdigest()

    def short_hash(self, info: ModelInfo) -> str | None:
        full = self.sha256(info)
        return full[:10] if full else None

    def _read_hash_cache(self) -> dict[str, Any]:
        """The hashes file, read once per process (a worker asks for every model's hash on each heartbeat)."""
        if self._hash_cache is None:
            try:
                self._hash_cache = json.loads(self._hash_cache_path.read_text())
            except (OSError, ValueError):
                self._hash_cache = {}
        return self._hash_cache

    def _write_hash_cache(self, cache: dict[str, Any]) -> None:
        self._hash_cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._hash_cache_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(cache, indent=1))
        os.replace(tmp, self._hash_cache_path)

    # ----- loading ---------------------------------------------------------------------------
    def loaded(self) -> list[str]:
        with self._lock:
            return list(self._loaded)

    def load(self, name: str | None = None) -> LoadedModel:
        """The loaded model, loading it (and evicting the least recently used) when needed. A model that failed
        raises ModelFailedError at once, until its file changes."""
        info = self.info(name)
        if info.error is not None:
            raise ModelFailedError(info)
        with self._lock:
            if info.name in self._loaded:
                self._loaded.move_to_end(info.name)
                return self._loaded[info.name]
            while len(self._loaded) >= self.max_loaded:
                evicted_name, evicted = self._loaded.popitem(last=False)
                log.info("evicting model %s", evicted_name)
                del evicted
                self._free_memory()
            try:
                model = self._load(info)
            except ModelError as exc:
                log.error("model %s failed to load: %s", info.name, exc)
                self._failures[info.name] = (
                    (time.monotonic(), 0) if info.kind == "hub" else _signature(info.path), str(exc))
                raise ModelFailedError(replace(info, error=str(exc))) from exc
            self._loaded[info.name] = model
            return model

    def _free_memory(self) -> None:
        gc.collect()
        if self.device == "cuda":
            import torch

            torch.cuda.empty_cache()

    def _load(self, info: ModelInfo) -> LoadedModel:
        import torch

        dtype = torch.float16 if self.device == "cuda" else torch.float32
        if info.kind == "pickle" and not self.allow_pickle:
            raise ModelError(
                f"{info.filename} is a pickle checkpoint, which can run arbitrary code when loaded; "
                "convert it to .safetensors, or start the server with --allow-pickle if you trust it"
            )
        log.info("loading model %s (%s) on %s", info.name, info.kind, self.device)
        quiet_libraries()
        if info.kind in ("demo", "diffusers", "hub"):
            txt2img = self._from_pretrained(info, dtype)
        else:
            txt2img = self._from_single_file(info, dtype)
        txt2img.to(self.device)
        txt2img.set_progress_bar_config(disable=True)
        # Before deriving: every mode shares the optimized modules. The cache is keyed by the weights' hash.
        speedups = accel.apply(txt2img, self.optimize, self.compile_cache, self.sha256(info))
        pipelines = _derive_pipelines(txt2img)
        vae_scale = getattr(txt2img, "vae_scale_factor", 8)
        sample_size = txt2img.unet.config.sample_size
        size = sample_size if isinstance(sample_size, int) else sample_size[0]
        return LoadedModel(
            info=info,
            short_hash=self.short_hash(info),
            pipelines=pipelines,
            default_width=size * vae_scale,
            default_height=size * vae_scale,
            scheduler_config=dict(txt2img.scheduler.config),
            zero_snr=samplers.zero_terminal_snr(txt2img.scheduler.config),
            device=self.device,
            speedups=speedups,
        )

    def _from_pretrained(self, info: ModelInfo, dtype: Any) -> Any:
        from diffusers import AutoPipelineForText2Image

        kwargs: dict[str, Any] = {"dtype": dtype}
        if info.arch != "sdxl":  # SD 1.x/2.x ship a safety checker; A1111 does not run one, nor do we
            kwargs.update(safety_checker=None, requires_safety_checker=False)
        if not self.allow_pickle:
            kwargs["use_safetensors"] = True
        try:
            return AutoPipelineForText2Image.from_pretrained(info.source, **kwargs)
        except Exception as exc:  # diffusers raises OSError/ValueError/EnvironmentError subclasses
            raise ModelError(self._explain_load_error(info, exc)) from exc

    def _from_single_file(self, info: ModelInfo, dtype: Any) -> Any:
        from diffusers import (
            StableDiffusionInpaintPipeline,
            StableDiffusionPipeline,
            StableDiffusionXLInpaintPipeline,
            StableDiffusionXLPipeline,
        )

        if info.arch == "sdxl":
            cls = StableDiffusionXLInpaintPipeline if info.inpainting else StableDiffusionXLPipeline
        else:
            cls = StableDiffusionInpaintPipeline if info.inpainting else StableDiffusionPipeline
        kwargs: dict[str, Any] = {"dtype": dtype}
        if info.arch != "sdxl":
            kwargs.update(safety_checker=None, requires_safety_checker=False)
        # A single file holds weights but no configs or tokenizer. Offline, diffusers needs a local
        # diffusers folder of the same architecture for those: `<models-dir>/configs/<arch>/`.
        config_dir = self.models_dir / "configs" / (info.arch or "sd1")
        if config_dir.is_dir():
            kwargs.update(config=str(config_dir), local_files_only=True)
        try:
            pipe = cls.from_single_file(info.source, **kwargs)
        except Exception as exc:
            raise ModelError(self._explain_load_error(info, exc, config_dir)) from exc
        if info.inpainting:
            # Serve txt2img from the same weights; the inpainting UNet handles all three modes.
            from diffusers import AutoPipelineForText2Image

            pipe = AutoPipelineForText2Image.from_pipe(pipe)
        return pipe

    @staticmethod
    def _explain_load_error(info: ModelInfo, exc: Exception, config_dir: Path | None = None) -> str:
        text = " ".join(str(exc).split())
        offline = os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True") or any(
            word in text.lower() for word in ("connect", "offline", "resolve", "network", "cannot find the requested files")
        )
        if info.kind == "hub" and offline:
            return (
                f"cannot download {info.source!r} from the Hugging Face hub: offline or unreachable. "
                "Download it once with network access, or pass a local diffusers folder or .safetensors file"
            )
        if info.kind == "single-file" and offline and config_dir is not None:
            return (
                f"{info.filename}: a single-file checkpoint needs its {info.arch or 'sd1'} configs and tokenizer, "
                f"which are fetched from the Hugging Face hub, and it is unreachable; put a diffusers folder "
                f"of the same architecture at {config_dir}"
            )
        return f"cannot load model {info.name!r} ({info.kind}): {text[:500]}"


def _derive_pipelines(txt2img: Any) -> dict[str, Any]:
    """img2img and inpaint pipelines over the same modules (from_pipe shares weights, no copies)."""
    from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting

    pipelines = {"txt2img": txt2img}
    for mode, auto in (("img2img", AutoPipelineForImage2Image), ("inpaint", AutoPipelineForInpainting)):
        pipe = auto.from_pipe(txt2img)
        pipe.set_progress_bar_config(disable=True)
        pipelines[mode] = pipe
    return pipelines
