"""Add-ons on a loaded model, chosen per batch (both are in the batch key):

- LoRAs: loaded once with diffusers' `load_lora_weights` (peft), kept across jobs, and switched per batch
  with `set_adapters`;
- the VAE: the model's own, or one from models/VAE (A1111's `sd_vae`), loaded once and swapped in;
- textual-inversion embeddings: every file in models/embeddings that fits the model, added to its
  tokenizer and text encoder once (diffusers' `load_textual_inversion`); a prompt uses one by its name;
- ControlNets from models/ControlNet: loaded once, and a ControlNet pipeline per mode and set of them made
  with `from_pipe`, so it shares the model's UNet, VAE and text encoder (and their LoRAs).

Costs on the demo model (bench/loras.py): a first load is a file read and peft injection; a switch between
loaded sets is `set_adapters` alone; both stay off the hot path for a batch that keeps the last batch's set.
"""

from __future__ import annotations

import logging
import re
import time
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sdserve.addons import AddonCatalog
from sdserve.loras import LoraRef

log = logging.getLogger(__name__)

MAX_LOADED = 16  # adapters kept per model; the least recently used one is unloaded past this


MAX_VAES = 2  # extra VAEs kept loaded per model
MAX_CONTROLNETS = 4  # ControlNets kept loaded per model


class AddonError(ValueError):
    """A job names a LoRA or VAE that is not there or cannot be used with this model."""


@dataclass
class Loaded:
    adapter: str  # peft's name for it (no dots allowed there)
    mtime: float


@dataclass
class AdapterState:
    """What one loaded model's pipeline holds: adapters by LoRA name, and the set now active."""

    loaded: OrderedDict[str, Loaded] = field(default_factory=OrderedDict)
    active: tuple[tuple[str, float], ...] = ()
    embeddings: set[str] = field(default_factory=set)  # names loaded (a file changed later keeps its first load)
    skipped: dict[str, str] = field(default_factory=dict)  # name -> why it does not fit this model
    controlnets: OrderedDict[str, tuple[Any, float]] = field(default_factory=OrderedDict)  # name -> (model, mtime)
    control_pipes: dict[tuple, tuple[tuple, Any]] = field(default_factory=dict)  # (mode, names) -> (ids, pipe)
    default_vae: Any = None  # the model's own VAE
    vaes: OrderedDict[str, tuple[Any, float]] = field(default_factory=OrderedDict)  # name -> (VAE, file mtime)


def _adapter_name(name: str, taken: set[str]) -> str:
    base = "lora_" + re.sub(r"[^A-Za-z0-9_]", "_", name)
    candidate, i = base, 1
    while candidate in taken:
        i += 1
        candidate = f"{base}_{i}"
    return candidate


def apply(pipe: Any, state: AdapterState, refs: Sequence[LoraRef], catalog: AddonCatalog) -> None:
    """Make `refs` (canonical: one per name) the pipeline's active LoRAs, loading any not loaded yet. The
    img2img and inpaint pipelines share the UNet and text encoder, so they get the same set."""
    wanted = tuple((r.name, r.weight) for r in refs)
    if wanted == state.active:
        return
    for name, _ in wanted:
        try:
            file = catalog.get(name)
        except KeyError as exc:
            raise AddonError(exc.args[0]) from None
        mtime = file.path.stat().st_mtime
        have = state.loaded.get(name)
        if have is not None and have.mtime == mtime:
            state.loaded.move_to_end(name)
            continue
        if have is not None:  # the file changed since it was loaded
            pipe.delete_adapters(have.adapter)
            del state.loaded[name]
        adapter = _adapter_name(name, {a.adapter for a in state.loaded.values()})
        started = time.perf_counter()
        try:
            with warnings.catch_warnings():  # peft warns that a model holds several adapters: that is the point
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                pipe.load_lora_weights(str(file.path.parent), weight_name=file.path.name, adapter_name=adapter)
        except (ValueError, KeyError, RuntimeError, OSError) as exc:
            _forget_partial(pipe, adapter)
            raise AddonError(f"LoRA {name!r} cannot be applied to this model: {' '.join(str(exc).split())[:300]}") from None
        state.loaded[name] = Loaded(adapter, mtime)
        log.info("loaded LoRA %s in %.3f s", name, time.perf_counter() - started)
    in_use = {n for n, _ in wanted}
    while len(state.loaded) > MAX_LOADED:
        oldest = next(n for n in state.loaded if n not in in_use)
        pipe.delete_adapters(state.loaded.pop(oldest).adapter)
    if wanted:
        pipe.enable_lora()
        pipe.set_adapters([state.loaded[n].adapter for n, _ in wanted], adapter_weights=[w for _, w in wanted])
    elif state.loaded:
        pipe.disable_lora()
    state.active = wanted


def _forget_partial(pipe: Any, adapter: str) -> None:
    """A load that failed half-way may have injected the adapter into some modules: take it out again."""
    try:
        pipe.delete_adapters(adapter)
    except Exception:  # noqa: BLE001 - nothing was injected; there is nothing to undo
        pass


def choose_vae(pipe: Any, state: AdapterState, name: str | None, catalog: AddonCatalog) -> None:
    """Give `pipe` the VAE named `name` from models/VAE, or the model's own for None."""
    if state.default_vae is None:
        state.default_vae = pipe.vae
    if name is None:
        pipe.vae = state.default_vae
        return
    pipe.vae = _cached(state.vaes, MAX_VAES, catalog, name, lambda path: load_vae(path, state.default_vae))


def load_vae(path: Any, base: Any) -> Any:
    """A VAE file shaped like the model's own: a diffusers folder, or one `.safetensors` with diffusers keys
    or the original (LDM) keys A1111's VAE files have. It keeps the model's latent scaling factor."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    from safetensors.torch import load_file

    try:
        if path.name == "diffusion_pytorch_model.safetensors":
            vae = AutoencoderKL.from_pretrained(path.parent)
        else:
            state = load_file(str(path))
            if not any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in state):
                state = convert_ldm_vae_checkpoint(state, dict(base.config))
            vae = AutoencoderKL.from_config(base.config)
            vae.load_state_dict(state)
    except (ValueError, KeyError, RuntimeError, OSError) as exc:
        raise AddonError(f"VAE {path.name!r} does not fit this model: {' '.join(str(exc).split())[:300]}") from None
    vae.register_to_config(scaling_factor=base.config.scaling_factor)
    return vae.to(device=base.device, dtype=base.dtype).eval()


def load_embeddings(pipe: Any, state: AdapterState, catalog: AddonCatalog) -> None:
    """Add each embedding file not loaded yet to the tokenizer and text encoder(s). A1111's files (one tensor,
    `emb_params`, of n vectors), diffusers' (`{token: vectors}`) and SDXL's (`clip_l` and `clip_g`) are read;
    a file whose width does not match this model's encoder is skipped, as A1111 skips it."""
    from safetensors.torch import load_file

    for file in catalog.list():
        if file.name in state.embeddings or file.name in state.skipped:
            continue  # no per-file I/O on the hot path: each file is read once
        try:
            tensors = load_file(str(file.path))
        except (OSError, ValueError, RuntimeError) as exc:
            state.skipped[file.name] = f"unreadable: {exc}"
            continue
        pairs = _embedding_targets(pipe, tensors)
        if isinstance(pairs, str):
            state.skipped[file.name] = pairs
            log.warning("embedding %s skipped: %s", file.name, pairs)
            continue
        for vectors, tokenizer, encoder in pairs:
            pipe.load_textual_inversion(vectors, token=file.name, tokenizer=tokenizer, text_encoder=encoder)
        state.embeddings.add(file.name)
        log.info("loaded embedding %s", file.name)


def _embedding_targets(pipe: Any, tensors: dict[str, Any]) -> list[tuple[Any, Any, Any]] | str:
    """(vectors, tokenizer, text encoder) for each encoder the file has vectors for, or why it does not fit."""
    encoders = [(pipe.tokenizer, pipe.text_encoder)]
    if getattr(pipe, "text_encoder_2", None) is not None:
        encoders.append((pipe.tokenizer_2, pipe.text_encoder_2))
    if "clip_l" in tensors and "clip_g" in tensors:
        if len(encoders) < 2:
            return "an SDXL embedding (clip_l and clip_g) for a model with one text encoder"
        chosen = [tensors["clip_l"], tensors["clip_g"]]
    elif len(tensors) == 1 or "emb_params" in tensors:
        chosen = [tensors.get("emb_params", next(iter(tensors.values())))]
        if len(encoders) > 1:
            return "an SD 1.x/2.x embedding (one encoder's vectors) for an SDXL model"
    else:
        return f"not an embedding: tensors {', '.join(sorted(tensors))[:100]}"
    out = []
    for vectors, (tokenizer, encoder) in zip(chosen, encoders):
        vectors = vectors.reshape(-1, vectors.shape[-1])
        width = encoder.get_input_embeddings().weight.shape[1]
        if vectors.shape[1] != width:
            return f"{vectors.shape[1]}-wide vectors for a {width}-wide text encoder"
        out.append((vectors.to(encoder.dtype), tokenizer, encoder))
    return out


def control_pipe(pipelines: dict[str, Any], mode: str, names: Sequence[str], state: AdapterState,
                 catalog: AddonCatalog) -> Any:
    """The `mode` pipeline with these ControlNets (loaded if need be), derived from the model's own with
    `from_pipe`: no weights copied. One ControlNet is passed as itself, several as a MultiControlNetModel."""
    from diffusers import (
        AutoPipelineForImage2Image,
        AutoPipelineForInpainting,
        AutoPipelineForText2Image,
        MultiControlNetModel,
    )

    base = pipelines["txt2img"]
    nets = [_controlnet(name, state, catalog, base.unet) for name in names]
    key, ids = (mode, tuple(names)), tuple(id(n) for n in nets)
    cached = state.control_pipes.get(key)
    if cached is None or cached[0] != ids:  # new, or one of its ControlNets was reloaded
        auto = {"txt2img": AutoPipelineForText2Image, "img2img": AutoPipelineForImage2Image,
                "inpaint": AutoPipelineForInpainting}[mode]
        try:
            pipe = auto.from_pipe(base, controlnet=nets[0] if len(nets) == 1 else MultiControlNetModel(nets))
        except (ValueError, KeyError) as exc:
            raise AddonError(f"no ControlNet pipeline for this model in {mode}: {exc}") from None
        pipe.set_progress_bar_config(disable=True)
        state.control_pipes.pop(key, None)
        state.control_pipes[key] = (ids, pipe)
        while len(state.control_pipes) > 3 * MAX_CONTROLNETS:
            state.control_pipes.pop(next(iter(state.control_pipes)))
    return state.control_pipes[key][1]


def _controlnet(name: str, state: AdapterState, catalog: AddonCatalog, unet: Any) -> Any:
    from diffusers import ControlNetModel

    def load(path: Any) -> Any:
        try:
            if path.name == "diffusion_pytorch_model.safetensors":
                net = ControlNetModel.from_pretrained(path.parent, dtype=unet.dtype)
            else:
                net = ControlNetModel.from_single_file(str(path), dtype=unet.dtype)
        except (ValueError, KeyError, RuntimeError, OSError) as exc:
            raise AddonError(f"ControlNet {name!r} cannot be loaded: {' '.join(str(exc).split())[:300]}") from None
        if net.config.cross_attention_dim != unet.config.cross_attention_dim:
            raise AddonError(f"ControlNet {name!r} is for another model family (cross-attention width "
                             f"{net.config.cross_attention_dim}, this model's {unet.config.cross_attention_dim})")
        return net.to(unet.device).eval()

    return _cached(state.controlnets, MAX_CONTROLNETS, catalog, name, load)


def _cached(cache: OrderedDict[str, tuple[Any, float]], limit: int, catalog: AddonCatalog, name: str,
            load: Any) -> Any:
    """The add-on `name` from `cache`, loaded (`load(path)`) when new or changed on disk since; the least
    recently used ones past `limit` are dropped."""
    try:
        file = catalog.get(name)
    except KeyError as exc:
        raise AddonError(exc.args[0]) from None
    mtime = file.path.stat().st_mtime
    cached = cache.get(file.name)
    if cached is None or cached[1] != mtime:
        started = time.perf_counter()
        cache[file.name] = (load(file.path), mtime)
        log.info("loaded %s %s in %.3f s", catalog.kind, file.name, time.perf_counter() - started)
        while len(cache) > limit:
            cache.popitem(last=False)
    cache.move_to_end(file.name)
    return cache[file.name][0]
