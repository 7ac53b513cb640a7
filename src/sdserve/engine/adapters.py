"""Add-ons on a loaded model, chosen per batch (both are in the batch key):

- LoRAs: loaded once with diffusers' `load_lora_weights` (peft), kept across jobs, and switched per batch
  with `set_adapters`;
- the VAE: the model's own, or one from models/VAE (A1111's `sd_vae`), loaded once and swapped in.

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
    timings: dict[str, float] = field(default_factory=dict)  # last load / switch, seconds (for /metrics, bench)
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
    started = time.perf_counter()
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
        load_started = time.perf_counter()
        try:
            with warnings.catch_warnings():  # peft warns that a model holds several adapters: that is the point
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                pipe.load_lora_weights(str(file.path.parent), weight_name=file.path.name, adapter_name=adapter)
        except (ValueError, KeyError, RuntimeError, OSError) as exc:
            _forget_partial(pipe, adapter)
            raise AddonError(f"LoRA {name!r} cannot be applied to this model: {' '.join(str(exc).split())[:300]}") from None
        state.loaded[name] = Loaded(adapter, mtime)
        state.timings["load_s"] = time.perf_counter() - load_started
        log.info("loaded LoRA %s in %.3f s", name, state.timings["load_s"])
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
    state.timings["switch_s"] = time.perf_counter() - started


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
    try:
        file = catalog.get(name)
    except KeyError as exc:
        raise AddonError(exc.args[0]) from None
    mtime = file.path.stat().st_mtime
    cached = state.vaes.get(file.name)
    if cached is None or cached[1] != mtime:
        started = time.perf_counter()
        state.vaes[file.name] = (load_vae(file.path, state.default_vae), mtime)
        log.info("loaded VAE %s in %.3f s", file.name, time.perf_counter() - started)
        while len(state.vaes) > MAX_VAES:
            state.vaes.popitem(last=False)
    state.vaes.move_to_end(file.name)
    pipe.vae = state.vaes[file.name][0]


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
