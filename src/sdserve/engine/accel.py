"""Speed-ups of a loaded pipeline (`--optimize`), and the one rule for which batches may use them.

`auto`, the default, takes per device the fastest path that passes the quality gate (tests/test_accel.py), as
`make bench BENCH_ARGS=accel` measured it (bench/accel.py; the figures are in the README):
- CPU: `openvino`: the UNet and the VAE's decoder and encoder run as OpenVINO graphs in fp32;
- CUDA: `channels_last`; the loader already gives fp16 weights and PyTorch's SDPA attention there. `compile` and
  `cuda_graphs` stay opt-in until a GPU run of bench/fullsize.py measures them;
- anything else (MPS): plain torch.
`none` is plain diffusers in eager torch.

OpenVINO: each part is traced once from its torch module and saved as OpenVINO IR in the compile cache
(`--compile-cache`, default `<data dir>/compiled`), keyed by the model's sha256, the part and the OpenVINO version, so
a restart reads it back instead of tracing again. The IR is compiled for each exact input shape it meets (static
shapes run 1.3-3x faster than one dynamic graph here): the native size at warm-up, others at their first batch, with
OpenVINO's blob cache in the same folder so a restart compiles again in a fraction of the time.

What a compiled graph cannot do runs on the torch module it came from, never a wrong picture:
- a batch with LoRAs (peft changes the UNet's weights; the graph holds the base weights) or ControlNet (residual
  inputs the graph does not take) runs its UNet in torch, and its images say so (`ImageRef.fallback`, counted in
  `sdserve_engine_fallbacks_total{reason}`);
- a VAE from models/VAE runs in torch (only the model's own VAE is compiled);
- any call with inputs the graph was not traced with (an unusual pipeline) runs the torch module.
The text encoder stays in torch: clip skip, embeddings and LoRAs all change it, and it is about 1% of an image's time.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import logging
import os
import sys
import time
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

OPTIMIZATIONS = {
    "auto": "the fastest path for the device that passes the quality gate (the default)",
    "none": "plain diffusers in eager torch",
    "openvino": "CPU: the UNet and VAE as OpenVINO graphs in fp32, one per input shape, cached on disk",
    "channels_last": "UNet and VAE in channels-last memory format",
    "compile": "torch.compile the UNet (inductor)",
    "freezing": "with compile: inductor's freezing (weights folded in as constants; inference only)",
    "cuda_graphs": "torch.compile the UNet with CUDA graphs (mode reduce-overhead); one graph per batch shape",
}
# Compiled shapes kept per part, the least recently used dropped past this: each holds its own copy of the part's
# weights in the CPU plugin's layout, so a large model keeps fewer (SD 1.5's 3.4 GB fp32 UNet: 2).
MAX_SHAPES = 16
SHAPES_BUDGET_BYTES = 8 << 30
TORCH = "torch"


def import_openvino() -> Any:
    """The openvino module, without its usage reporting: its converter sends events to Google Analytics unless the
    user opted out, and a server sends nothing anywhere it was not told to (offline, each try also waits on the
    network). With `openvino_telemetry` unimportable, openvino takes its own no-op stub."""
    if "openvino" not in sys.modules:
        sys.modules.setdefault("openvino_telemetry", None)  # type: ignore[arg-type]
    import openvino

    return openvino


def auto_options(device: str) -> list[str]:
    """What `auto` means on `device` (the bench decides this rule; the README states it with its figures)."""
    if device == "cpu":
        return ["openvino"] if _has_openvino() else []
    if device == "cuda":
        return ["channels_last"]
    return []


def _has_openvino() -> bool:
    return importlib.util.find_spec("openvino") is not None


def resolve(options: list[str] | None, device: str) -> list[str]:
    """The speed-ups `options` mean on `device`: `auto` (also when none are given) expanded, `none` as [].
    ValueError, saying what fits, for a name that is not one or a combination that cannot run here."""
    names = list(dict.fromkeys(options or ["auto"]))
    unknown = sorted(set(names) - set(OPTIMIZATIONS))
    if unknown:
        raise ValueError(f"unknown optimization(s) {', '.join(unknown)}; valid: {', '.join(OPTIMIZATIONS)}")
    if "none" in names:
        if len(names) > 1:
            raise ValueError("--optimize none is plain torch: it cannot be combined with other optimizations")
        return []
    chosen = [name for name in names if name != "auto"]
    if "auto" in names:
        chosen = list(dict.fromkeys([*auto_options(device), *chosen]))
    if "openvino" in chosen:
        if device != "cpu":
            raise ValueError(f"--optimize openvino runs on the CPU, and the device is {device}")
        if not _has_openvino():
            raise ValueError("--optimize openvino needs the openvino package: pip install openvino")
        if {"compile", "cuda_graphs"} & set(chosen):
            raise ValueError("--optimize openvino and compile are two compilers of the same UNet: choose one")
    if "freezing" in chosen and "compile" not in chosen:
        raise ValueError("--optimize freezing is an option of compile: give both (compile,freezing)")
    if "cuda_graphs" in chosen and device != "cuda":
        raise ValueError(f"--optimize cuda_graphs needs a CUDA device, and the device is {device}")
    return chosen


def unet_fallback(loras: tuple, controlnet: tuple, tiling: bool = False) -> str | None:
    """Why a batch's UNet cannot run on a compiled graph, or None: the one rule (Engine.run asks it). A tiled batch
    runs its VAE on torch too: the graphs hold zero padding, and tiling pads circularly."""
    if loras:
        return "lora"
    if controlnet:
        return "controlnet"
    if tiling:
        return "tiling"
    return None


@dataclass
class Route:
    """How one batch was drawn: `engine` is the UNet's path; `fallback` why it is torch although compiled."""

    engine: str
    fallback: str | None = None


@dataclass
class Accelerated:
    """What `apply` did to one loaded pipeline."""

    engine: str = TORCH  # the UNet's path when a batch may use it: "openvino", "torch.compile", "torch"
    graphs: list[Any] = field(default_factory=list)  # every _Graph: compiled per shape, so a warm-up pays off
    unet_enabled: bool = True  # the patched UNet forward asks it (batch() sets it per batch)
    vae_enabled: bool = True  # and the patched VAE forwards this

    @contextlib.contextmanager
    def batch(self, loras: tuple, controlnet: tuple, tiling: bool = False) -> Iterator[Route]:
        """Within: the UNet runs compiled, unless `unet_fallback` says this batch cannot; the VAE too, unless tiled."""
        reason = unet_fallback(loras, controlnet, tiling) if self.engine != TORCH else None
        self.unet_enabled, self.vae_enabled = reason is None, not tiling
        try:
            yield Route(TORCH if reason else self.engine, reason)
        finally:
            self.unet_enabled = self.vae_enabled = True


def apply(pipe: Any, options: list[str], cache: Path | None, model_hash: str | None) -> Accelerated:
    """Apply `options` (resolved) to a freshly loaded pipeline, before its img2img and inpaint pipelines are derived
    from it (they share its modules)."""
    import torch

    state = Accelerated()
    if "channels_last" in options:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if "compile" in options or "cuda_graphs" in options:
        if "freezing" in options:
            import torch._inductor.config as inductor

            inductor.freezing = True
        mode = "reduce-overhead" if "cuda_graphs" in options else "max-autotune-no-cudagraphs"
        pipe.unet.compile(mode=mode)  # in place: the module (its config, its LoRA methods) stays the pipeline's
        state.engine = "torch.compile"
    if "openvino" in options:
        _openvino(pipe, state, cache, model_hash)
    return state


# ----- OpenVINO --------------------------------------------------------------------------------------------------
class _Graph:
    """One torch module as an OpenVINO model: traced once (or read from the cache), compiled per input shape."""

    def __init__(self, core: Any, model: Any, config: dict[str, Any], name: str, weight_bytes: int) -> None:
        self.core, self.model, self.config, self.name = core, model, config, name
        self.max_shapes = max(2, min(MAX_SHAPES, SHAPES_BUDGET_BYTES // max(1, weight_bytes)))
        self._compiled: OrderedDict[tuple, Any] = OrderedDict()

    def __call__(self, inputs: list[Any]) -> Any | None:
        """The graph's output for `inputs`, or None where it cannot be compiled for their shapes (run torch)."""
        shapes = tuple(tuple(a.shape) for a in inputs)
        if shapes in self._compiled:
            self._compiled.move_to_end(shapes)
            compiled = self._compiled[shapes]
        else:
            compiled = self._compiled[shapes] = self._compile(shapes)
            while len(self._compiled) > self.max_shapes:
                self._compiled.popitem(last=False)
        return None if compiled is None else compiled(inputs)[0]

    def _compile(self, shapes: tuple) -> Any:
        ov = import_openvino()

        started = time.perf_counter()
        model = self.model.clone()
        try:
            model.reshape({port: ov.PartialShape(list(shape)) for port, shape in zip(model.inputs, shapes)})
            compiled = self.core.compile_model(model, "CPU", self.config)
        except RuntimeError as exc:  # a shape the traced graph cannot take: those calls run the torch module
            log.warning("openvino: %s cannot be compiled for %s, it runs on torch there: %s", self.name, shapes,
                        " ".join(str(exc).split())[:300])
            return None
        log.info("openvino: %s compiled for %s in %.2f s", self.name, shapes, time.perf_counter() - started)
        return compiled


def _openvino(pipe: Any, state: Accelerated, cache: Path | None, model_hash: str | None) -> None:
    import torch

    ov = import_openvino()
    folder = cache / f"{model_hash[:16]}-ov{ov.get_version().split('-')[0]}" if cache and model_hash else None
    core = ov.Core()
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        core.set_property({"CACHE_DIR": str(folder / "blobs")})
    # fp32 everywhere (a CPU with bf16 would otherwise get it by default: not gated); this process's share of the
    # cores (an engine process of several gets fewer); no pinning, so engine processes never share a core's pin.
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32",
              "INFERENCE_NUM_THREADS": torch.get_num_threads(), "ENABLE_CPU_PINNING": False}
    unet, vae = pipe.unet, pipe.vae
    sdxl = getattr(unet.config, "addition_embed_type", None) == "text_time"
    size = unet.config.sample_size if isinstance(unet.config.sample_size, int) else unet.config.sample_size[0]
    latent = torch.randn(2, unet.config.in_channels, size, size)
    example: list[Any] = [latent, torch.tensor(500.0), torch.randn(2, 77, unet.config.cross_attention_dim)]
    if sdxl:
        time_dim = unet.config.addition_time_embed_dim
        example += [torch.randn(2, unet.config.projection_class_embeddings_input_dim - 6 * time_dim), torch.zeros(2, 6)]
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    parts = (
        ("unet", _unet_call(unet, sdxl), example),
        ("vae-decoder", vae.decoder, [torch.randn(1, vae.config.latent_channels, size, size)]),
        ("vae-encoder", vae.encoder, [torch.randn(1, vae.config.in_channels, size * scale, size * scale)]),
    )
    graphs = {}
    for name, module, inputs in parts:
        try:
            model = _read_or_convert(core, module, inputs, folder / name if folder else None)
        except Exception as exc:  # noqa: BLE001 - a module OpenVINO cannot trace stays torch; slower, never wrong
            log.warning("openvino: %s cannot be converted, it stays on torch: %s", name, " ".join(str(exc).split())[:300])
            continue
        size_of = sum(p.numel() * p.element_size() for p in module.parameters())
        graphs[name] = _Graph(core, model, config, name, size_of)
    if "unet" in graphs:
        state.engine = "openvino"
        _patch(unet, _unet_forward(unet.forward, graphs["unet"], state, sdxl, 2 ** unet.num_upsamplers))
    if "vae-decoder" in graphs:
        _patch(vae.decoder, _module_forward(vae.decoder.forward, graphs["vae-decoder"], "latent_embeds", state))
    if "vae-encoder" in graphs:
        _patch(vae.encoder, _module_forward(vae.encoder.forward, graphs["vae-encoder"], None, state))
    state.graphs = list(graphs.values())


def _unet_call(unet: Any, sdxl: bool) -> Any:
    """The UNet's call as the pipelines make it, with positional tensors only: what is traced."""
    import torch

    class UNetCall(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.unet = unet

        def forward(self, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None):
            added = {"text_embeds": text_embeds, "time_ids": time_ids} if sdxl else None
            return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                             added_cond_kwargs=added, return_dict=False)[0]

    return UNetCall()


def _read_or_convert(core: Any, module: Any, inputs: list[Any], folder: Path | None) -> Any:
    """The part's OpenVINO model: read from `folder` when cached there, else traced and saved. One process traces
    while any other waits on the folder's lock, then reads what it saved."""
    import torch

    ov = import_openvino()
    def convert() -> Any:
        started = time.perf_counter()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's notes on Python conditions: the shapes they test are fixed
            model = ov.convert_model(module, example_input=tuple(inputs))
        log.info("openvino: traced %s in %.1f s", folder.name if folder else type(module).__name__,
                 time.perf_counter() - started)
        return model

    if folder is None:
        return convert()
    folder.mkdir(parents=True, exist_ok=True)
    xml = folder / "model.xml"
    with (folder / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if xml.is_file():
            return core.read_model(xml)
        model = convert()
        tmp = folder / f"model.{os.getpid()}.xml"
        ov.save_model(model, tmp, compress_to_fp16=False)
        os.replace(tmp.with_suffix(".bin"), folder / "model.bin")
        os.replace(tmp, xml)  # last: the xml's presence says the pair is whole
        return model


def _patch(module: Any, forward: Any) -> None:
    """Route the module's calls through `forward`, as accelerate's hooks do: the module stays itself (its class, its
    config, its LoRA methods), its forward hooks still run, and the torch forward stays there for the fallback."""
    module.forward = forward


_UNET_NONE = ("class_labels", "timestep_cond", "attention_mask", "cross_attention_kwargs",
              "down_block_additional_residuals", "mid_block_additional_residual",
              "down_intrablock_additional_residuals", "encoder_attention_mask")


def _unet_forward(original: Any, graph: _Graph, state: Accelerated, sdxl: bool, factor: int) -> Any:
    import torch
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

    def forward(sample, timestep, encoder_hidden_states, *args, **kwargs):
        inputs = _unet_inputs(sample, timestep, encoder_hidden_states, args, kwargs) if state.unet_enabled else None
        out = None if inputs is None else graph(inputs)
        if out is None:
            return original(sample, timestep, encoder_hidden_states, *args, **kwargs)
        out = torch.from_numpy(out)
        return UNet2DConditionOutput(sample=out) if kwargs.get("return_dict", True) else (out,)

    def _unet_inputs(sample, timestep, encoder_hidden_states, args, kwargs) -> list[Any] | None:
        if args or any(kwargs.get(name) not in (None, {}) for name in _UNET_NONE):
            return None
        if not _plain(sample) or not _plain(encoder_hidden_states):
            return None
        if sample.shape[-1] % factor or sample.shape[-2] % factor:
            return None  # the UNet's odd-size upsampling was not traced (the example's size divides evenly)
        t = timestep if torch.is_tensor(timestep) else torch.tensor(timestep)
        if t.dim() > 0:
            if t.numel() == 0 or not bool((t == t.flatten()[0]).all()):
                return None  # a timestep per row: not what was traced
            t = t.flatten()[0]
        inputs = [_array(sample), t.to(torch.float32).numpy(), _array(encoder_hidden_states)]
        added = kwargs.get("added_cond_kwargs") or {}
        if sdxl:
            if set(added) != {"text_embeds", "time_ids"}:
                return None
            inputs += [_array(added["text_embeds"]), _array(added["time_ids"])]
        elif added:
            return None
        return inputs

    return forward


def _module_forward(original: Any, graph: _Graph, optional: str | None, state: Accelerated) -> Any:
    """A VAE encoder's or decoder's forward: one tensor in, one out (the decoder's `latent_embeds` unset)."""
    import torch

    def forward(x, *args, **kwargs):
        plain = state.vae_enabled and not args and not (optional and kwargs.get(optional) is not None) and not (
            set(kwargs) - {optional})
        out = graph([_array(x)]) if plain and _plain(x) else None
        return original(x, *args, **kwargs) if out is None else torch.from_numpy(out)

    return forward


def _plain(tensor: Any) -> bool:
    import torch

    return torch.is_tensor(tensor) and tensor.device.type == "cpu" and tensor.dtype == torch.float32


def _array(tensor: Any) -> Any:
    import numpy as np

    return np.ascontiguousarray(tensor.detach().numpy())
