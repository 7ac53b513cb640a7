"""AUTOMATIC1111 `/sdapi/v1`: translate to canonical requests, submit to the one queue, answer in A1111's shapes.

Unlike A1111, requests are queued fairly and batched with every other client's, and `/interrupt`,
`/skip` and `/progress` act on the caller's own call (same API key, Basic user, or with auth off,
client address), or on the one named by `id_task` (A1111's `force_task_id`), never on another
client's work.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import sys
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict

from sdserve import styles
from sdserve.api import errors
from sdserve.api.deps import CallerDep, ServiceDep, get_preferences
from sdserve.catalog import ModelInfo, UnknownModelError
from sdserve.core import RequestRejected, failure_status
from sdserve.engine import infotext as infotext_mod
from sdserve.engine import samplers
from sdserve.images import ImageDecodeError, decode_image, read_infotext
from sdserve.jobs.queue import JobFinished, JobNotFound, SharedState
from sdserve.keys import Caller
from sdserve.protocols import a1111 as proto
from sdserve.schema import LATENT_UPSCALERS, GenerationRequest, ImageRef, Job, JobStatus
from sdserve.service import Service

router = APIRouter(prefix="/sdapi/v1", tags=["a1111"])
SOURCE = "a1111"


# The shared tables (every replica answers the same): A1111's options, and its calls in flight.
OPTIONS = "a1111:options"
CALLS = "a1111:calls"
# Every option A1111 1.10 has, at its default; `return_grid` says what this server does (it returns no grid).
DEFAULT_OPTIONS: dict[str, Any] = {**proto.A1111_OPTIONS, "return_grid": False}


@dataclass
class Call:
    """One txt2img/img2img call in flight: its task id, who made it, and its jobs (one per n_iter)."""

    task_id: str
    caller: str
    job_ids: list[str]


class A1111State:
    """A1111's global options (its config.json) and the A1111 calls in flight, in the shared state, so
    `/options`, `/progress`, `/interrupt` and `/skip` answer the same through every replica. (The checkpoint
    option is the server's default model: Service.default_model.)"""

    def __init__(self, shared: SharedState) -> None:
        self.shared = shared

    def options(self) -> dict[str, Any]:
        saved = {k: json.loads(v) for k, v in self.shared.shared_get(OPTIONS).items()}
        return {**DEFAULT_OPTIONS, **saved}

    def set_options(self, values: dict[str, Any]) -> None:
        for key, value in values.items():
            self.shared.shared_put(OPTIONS, key, json.dumps(value))

    def add(self, call: Call) -> None:
        # Keyed by caller and task id: another caller's force_task_id never overwrites (or removes) this one.
        self.shared.shared_put(CALLS, f"{call.caller}\0{call.task_id}", json.dumps(asdict(call)))

    def remove(self, call: Call) -> None:
        self.shared.shared_put(CALLS, f"{call.caller}\0{call.task_id}", None)

    def calls(self) -> list[Call]:
        return [Call(**json.loads(v)) for v in self.shared.shared_get(CALLS).values()]


def _state(request: Request) -> A1111State:
    return request.app.state.a1111


def title(service: Service, info: ModelInfo) -> str:
    short = service.models.short_hash(info)
    return f"{info.filename} [{short}]" if short else info.filename


async def _run_call(canonical: list[GenerationRequest], request: Request, service: Service, caller: Caller, *,
                    task_id: str | None = None, ended: str = "failed") -> list[tuple[Job, list[bytes]]] | JSONResponse:
    """One A1111 call's jobs: submitted (with the request's Webhook-Url, Cancel-After and Prefer: wait headers),
    awaited together, each with its PNGs; or the first that did not succeed, in A1111's error shape. `task_id`:
    the call is registered under it meanwhile, so /progress, /interrupt and /skip find its jobs. `ended`: which
    jobs fail the call, "failed" ones (an interrupted job gives what it has, as in A1111) or "any" that did not
    succeed."""
    state = _state(request)
    prefs = get_preferences(request)
    jobs = await service.submit_all([prefs.apply(c) for c in canonical], caller, source=SOURCE)
    call = Call(task_id, caller.id, [j.id for j in jobs]) if task_id else None
    if call is not None:
        await asyncio.to_thread(state.add, call)
    try:
        outcomes = await service.results([j.id for j in jobs], request.is_disconnected, blocked="black",
                                         wait_s=prefs.wait_s)
    finally:
        if call is not None:
            await asyncio.to_thread(state.remove, call)
    failed = [j for j, _ in outcomes if j.status is JobStatus.failed
              or (ended == "any" and j.status is not JobStatus.succeeded)]
    if failed:
        return errors.render(request.url.path, failure_status(failed[0].error_kind),
                             failed[0].error or f"the job ended {failed[0].status.value}",
                             error_type="GenerationError")
    return outcomes


async def generate(body: proto.Txt2ImgRequest, request: Request, service: Service, caller: Caller,
                   extra: Callable[[list[ImageRef]], dict[str, Any]] | None = None) -> JSONResponse:
    """One A1111 call: its jobs, awaited together. `extra`: more response fields from the images' records."""
    state = _state(request)
    try:
        canonical = proto.to_requests(body, await asyncio.to_thread(state.options))
    except proto.TranslationError as exc:
        return errors.render(request.url.path, exc.status, str(exc))
    ignored = proto.ignored_fields(body)
    outcomes = await _run_call(canonical, request, service, caller,
                               task_id=body.force_task_id or f"task({uuid.uuid4().hex[:15]})")
    if isinstance(outcomes, JSONResponse):
        return outcomes
    done = [job for job, _ in outcomes]
    images, seeds, texts, refs, nsfw = [], [], [], [], []
    width = height = 0
    for job, pngs in outcomes:  # interrupted or skipped jobs contribute no images, as A1111 returns what it has
        for ref, png in zip(job.images, pngs):
            with Image.open(io.BytesIO(png)) as im:
                width, height = im.size
                texts.append(read_infotext(im) or "")
            images.append(base64.b64encode(png).decode())
            seeds.append(ref.seed)
            refs.append(ref)
            nsfw.append(ref.blocked)
    def describe_model() -> tuple[str, str | None]:
        model = service.models.info(done[0].request.model)
        return model.name, service.models.short_hash(model)

    model_name, model_hash = await asyncio.to_thread(describe_model)
    shown = await asyncio.to_thread(service.styled, canonical[0])  # the prompts as run: styles applied
    info = proto.info_json(
        body, seeds=seeds, infotexts=texts, width=width or (body.width or 0), height=height or (body.height or 0),
        model_name=model_name, model_hash=model_hash,
        sampler=samplers.resolve(canonical[0].sampler, canonical[0].scheduler).sampler.name, ignored=ignored,
        nsfw=nsfw, prompts=(shown.prompt, shown.negative_prompt),
    )
    headers = {"X-Ignored-Fields": ",".join(ignored)} if ignored else None
    payload = {"images": images if body.send_images else [], "parameters": proto.echo_parameters(body), "info": info}
    if extra is not None:
        payload.update(await asyncio.to_thread(extra, refs))
    return JSONResponse(payload, headers=headers)


@router.post("/txt2img", summary="A1111 txt2img: {images, parameters, info}")
async def txt2img(body: proto.Txt2ImgRequest, request: Request, service: ServiceDep, caller: CallerDep) -> Any:
    return await generate(body, request, service, caller)


@router.post("/img2img", summary="A1111 img2img and inpainting (mask: white = repaint)")
async def img2img(body: proto.Img2ImgRequest, request: Request, service: ServiceDep, caller: CallerDep) -> Any:
    return await generate(body, request, service, caller)


async def _own_call(request: Request, service: Service, caller: Caller,
                    id_task: str | None) -> tuple[Call | None, list[Job]]:
    """The caller's call this request is about, with its jobs: the one named by `id_task`, else the caller's
    call that is running now, else the caller's oldest. Never another caller's."""
    calls = await asyncio.to_thread(_state(request).calls)
    own = []
    for call in calls:
        if call.caller == caller.id and (id_task is None or call.task_id == id_task):
            try:
                jobs = await asyncio.to_thread(lambda ids: [service.own_job(i, caller) for i in ids], call.job_ids)
            except JobNotFound:
                continue
            if not all(j.status.terminal for j in jobs):  # a call its replica never cleared (it died) is over
                own.append((call, jobs))
    running = [(c, jobs) for c, jobs in own if any(j.status is JobStatus.running for j in jobs)]
    if running or own:
        return (running or own)[0]
    return None, []


@router.get("/progress", summary="A1111 progress of the caller's call (or the one named by id_task)")
async def progress(request: Request, service: ServiceDep, caller: CallerDep, skip_current_image: bool = False,
                   id_task: str | None = None) -> dict[str, Any]:
    call, jobs = await _own_call(request, service, caller, id_task)
    idle_state = {"skipped": False, "interrupted": False, "stopping_generation": False, "job": "", "job_count": 0,
                  "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0}
    if call is None:
        return {"progress": 0.0, "eta_relative": 0.0, "state": idle_state, "current_image": None, "textinfo": None}
    job_no = next((i for i, j in enumerate(jobs) if not j.status.terminal), len(jobs) - 1)
    active = jobs[job_no]
    value = proto.progress_value(job_no, len(jobs), active.step, active.steps)
    eta = sum((j.eta_s or 0) for j in jobs[job_no:] if not j.status.terminal)
    preview = None
    if not skip_current_image and active.status is JobStatus.running:
        # the job's own latest preview (its caller's: _own_call checked), as A1111's live preview
        preview = await asyncio.to_thread(service.queue.latest_preview, active.id)
    return {
        "progress": value,
        "eta_relative": eta,
        "state": {**idle_state, "job": call.task_id, "job_count": len(jobs), "job_no": job_no,
                  "job_timestamp": active.created_at.strftime("%Y%m%d%H%M%S"),
                  "sampling_step": active.step, "sampling_steps": active.steps},
        "current_image": preview["image"] if preview else None,
        "textinfo": f"Step {active.step}/{active.steps}",
    }


class TaskRequest(BaseModel):
    """Optional body of /interrupt and /skip (A1111 sends none): the task id a call was given by
    `force_task_id`, to stop exactly that call."""

    model_config = ConfigDict(extra="ignore")
    id_task: str | None = None


async def _stop_own(request: Request, service: Service, caller: Caller, body: TaskRequest | None,
                    id_task: str | None, whole_call: bool) -> None:
    call, jobs = await _own_call(request, service, caller, id_task or (body.id_task if body else None))
    if call is None:
        return
    running = [j for j in jobs if j.status is JobStatus.running]
    # interrupt: the whole call (its later iterations too); skip: the image batch running now, else the next.
    targets = [j for j in jobs if not j.status.terminal] if whole_call else (
        running or [j for j in jobs if not j.status.terminal][:1])
    for job in targets:
        try:
            await asyncio.to_thread(service.cancel_own, job.id, caller)
        except (JobFinished, JobNotFound):  # it ended meanwhile: nothing to stop
            pass


@router.post("/interrupt", summary="Stop the caller's call (all its iterations), or the one named by id_task")
async def interrupt(request: Request, service: ServiceDep, caller: CallerDep, body: TaskRequest | None = None,
                    id_task: str | None = None) -> dict:
    await _stop_own(request, service, caller, body, id_task, whole_call=True)
    return {}


@router.post("/skip", summary="Skip the caller's image batch running now; the call's next iteration goes on")
async def skip(request: Request, service: ServiceDep, caller: CallerDep, body: TaskRequest | None = None,
               id_task: str | None = None) -> dict:
    await _stop_own(request, service, caller, body, id_task, whole_call=False)
    return {}


@router.get("/options", summary="A1111 options")
async def get_options(request: Request, service: ServiceDep) -> dict[str, Any]:
    def read() -> dict[str, Any]:
        options = _state(request).options()
        try:
            info = service.models.info(service.default_model)
        except UnknownModelError:  # an API replica no worker has told of its models yet
            return {**options, "sd_model_checkpoint": None, "sd_checkpoint_hash": None}
        return {**options, "sd_model_checkpoint": title(service, info), "sd_checkpoint_hash": service.models.sha256(info)}

    return await asyncio.to_thread(read)


@router.post("/options", summary="Set A1111 options; sd_model_checkpoint switches the model for later jobs")
async def set_options(body: dict[str, Any], request: Request, service: ServiceDep) -> Any:
    values = dict(body)
    if values.get("sd_vae") not in (None, *proto.MODEL_OWN_VAE):  # every caller's jobs would use it: check it
        try:
            await asyncio.to_thread(service.vaes.get, str(values["sd_vae"]))
        except KeyError as exc:
            return errors.render(request.url.path, 422, str(exc.args[0]), error_type="RuntimeError")
    checkpoint = values.pop("sd_model_checkpoint", None)
    if checkpoint is not None:
        try:  # every replica's default from now on
            await asyncio.to_thread(service.choose_default_model, str(checkpoint))
        except UnknownModelError as exc:
            return errors.render(request.url.path, 422, str(exc), error_type="RuntimeError")
    await asyncio.to_thread(_state(request).set_options, values)
    return None


@router.get("/cmd-flags")
async def cmd_flags(service: ServiceDep) -> dict[str, Any]:
    """Every flag A1111 1.10 has, at its default, and the ones this server's own settings answer."""
    s = service.settings
    return {**proto.A1111_CMD_FLAGS, "api": True, "nowebui": False, "listen": s.host != "127.0.0.1", "port": s.port,
            "ckpt_dir": str(s.models_dir), "models_dir": str(s.models_dir), "data_dir": str(s.data_dir),
            "lora_dir": str(service.loras.folder), "vae_dir": str(service.vaes.folder),
            "embeddings_dir": str(service.embeddings.folder), "esrgan_models_path": str(service.upscalers.folders[0]),
            "realesrgan_models_path": str(service.upscalers.folders[1]),
            "styles_file": [str(f / styles.FILENAME) for f in service.styles.folders], "device": s.device}


@router.get("/sd-models", summary="Checkpoints: title `file [hash]`, model_name, hash, sha256, filename")
async def sd_models(service: ServiceDep) -> list[dict[str, Any]]:
    def describe() -> list[dict[str, Any]]:
        out = []
        for info in service.models.list():
            if info.kind == "pickle" and not service.models.allow_pickle:
                continue
            sha = service.models.sha256(info)
            out.append({"title": title(service, info), "model_name": info.name, "hash": sha[:10] if sha else None,
                        "sha256": sha, "filename": info.source, "config": None})
        return out

    return await asyncio.to_thread(describe)


@router.post("/refresh-checkpoints", summary="Rescan the models folder")
async def refresh_checkpoints(service: ServiceDep) -> None:
    await asyncio.to_thread(service.models.refresh)


@router.get("/samplers")
async def sampler_list() -> list[dict[str, Any]]:
    return [{"name": s.name, "aliases": list(s.aliases),
             "options": {"scheduler": s.default_schedule} if s.default_schedule != "automatic" else {}}
            for s in samplers.SAMPLERS]


@router.get("/schedulers")
async def scheduler_list() -> list[dict[str, Any]]:
    rho = {"karras": 7.0}
    return [{"name": s.name, "label": s.label, "aliases": list(s.aliases) or None,
             "default_rho": rho.get(s.name, -1), "need_inner_model": False} for s in samplers.SCHEDULES]


@router.get("/upscalers", summary="Upscalers for extras and hires fix: None, Lanczos, Nearest, then the models in "
            "models/ESRGAN and models/RealESRGAN")
async def upscalers(service: ServiceDep) -> list[dict[str, Any]]:
    return await asyncio.to_thread(service.upscalers.a1111)


async def _extras(body: proto.ExtrasRequest, images: list[str], request: Request, service: Service,
                  caller: Caller) -> tuple[list[str], str] | JSONResponse:
    """One extras call: a job per picture on the workers, awaited together; the PNGs (base64) and html_info."""
    try:
        canonical = proto.extras_requests(body, images)
    except proto.TranslationError as exc:
        return errors.render(request.url.path, exc.status, str(exc))
    outcomes = await _run_call(canonical, request, service, caller, ended="any")
    if isinstance(outcomes, JSONResponse):
        return outcomes
    pngs = [png for _, job_pngs in outcomes for png in job_pngs]
    with Image.open(io.BytesIO(pngs[0])) as first:
        text = str(first.info.get("postprocessing") or "")
    return [base64.b64encode(p).decode() for p in pngs], proto.html_info(text)


@router.post("/extra-single-image", summary="A1111 extras: upscale one picture (a job on the workers)")
async def extra_single_image(body: proto.ExtrasSingleImageRequest, request: Request, service: ServiceDep,
                             caller: CallerDep) -> Any:
    done = await _extras(body, [body.image], request, service, caller)
    if isinstance(done, JSONResponse):
        return done
    images, info = done
    return {"html_info": info, "image": images[0] if body.show_extras_results else ""}


@router.post("/extra-batch-images", summary="A1111 extras: upscale several pictures (a job each, on the workers)")
async def extra_batch_images(body: proto.ExtrasBatchImagesRequest, request: Request, service: ServiceDep,
                             caller: CallerDep) -> Any:
    done = await _extras(body, [i.data for i in body.imageList], request, service, caller)
    if isinstance(done, JSONResponse):
        return done
    images, info = done
    return {"html_info": info, "images": images if body.show_extras_results else []}


@router.get("/latent-upscale-modes", summary="Latent upscalers for hires fix")
async def latent_upscale_modes() -> list[dict[str, str]]:
    return [{"name": n} for n in LATENT_UPSCALERS]


class PngInfoRequest(BaseModel):
    image: str


@router.post("/png-info", summary="Read the infotext of an image: {info, items, parameters}")
async def png_info(body: PngInfoRequest) -> Any:
    try:
        image = decode_image(body.image)
    except ImageDecodeError as exc:
        raise RequestRejected(str(exc), "image") from None
    text = read_infotext(image) or ""
    items = {k: str(v) for k, v in image.info.items() if isinstance(v, (str, int, float)) and k != "parameters"}
    return {"info": text, "items": items, "parameters": infotext_mod.parse(text) if text else {}}


@router.get("/memory")
async def memory() -> dict[str, Any]:
    page = os.sysconf("SC_PAGE_SIZE")
    total, free = os.sysconf("SC_PHYS_PAGES") * page, os.sysconf("SC_AVPHYS_PAGES") * page
    result: dict[str, Any] = {"ram": {"free": free, "used": total - free, "total": total}}
    torch = sys.modules.get("torch")  # loaded only where this process runs the engine: never imported here
    if torch is None:
        result["cuda"] = {"error": "this process runs no engine (an API replica): the GPUs are the workers'"}
    elif torch.cuda.is_available():
        free_c, total_c = torch.cuda.mem_get_info()
        stats = torch.cuda.memory_stats()
        result["cuda"] = {
            "system": {"free": free_c, "used": total_c - free_c, "total": total_c},
            "active": {"current": stats.get("active_bytes.all.current", 0), "peak": stats.get("active_bytes.all.peak", 0)},
            "allocated": {"current": stats.get("allocated_bytes.all.current", 0),
                          "peak": stats.get("allocated_bytes.all.peak", 0)},
            "reserved": {"current": stats.get("reserved_bytes.all.current", 0),
                         "peak": stats.get("reserved_bytes.all.peak", 0)},
            "inactive": {"current": stats.get("inactive_split_bytes.all.current", 0),
                         "peak": stats.get("inactive_split_bytes.all.peak", 0)},
            "events": {"retries": stats.get("num_alloc_retries", 0), "oom": stats.get("num_ooms", 0)},
        }
    else:
        result["cuda"] = {"error": "CUDA is not available on this server"}
    return result


@router.get("/loras", summary="LoRAs in models/Lora: name, alias, path, metadata (use as <lora:name:weight>)")
async def loras(service: ServiceDep) -> list[dict[str, Any]]:
    return [{"name": f.name, "alias": f.alias, "path": str(f.path), "metadata": f.metadata}
            for f in await asyncio.to_thread(service.loras.list)]


@router.post("/refresh-loras", summary="Rescan models/Lora")
async def refresh_loras(service: ServiceDep) -> None:
    await asyncio.to_thread(service.loras.refresh)


@router.get("/sd-vae", summary="VAEs in models/VAE: model_name (use as sd_vae), filename")
async def sd_vae(service: ServiceDep) -> list[dict[str, Any]]:
    return [{"model_name": f.path.name if f.path.name != "diffusion_pytorch_model.safetensors" else f.name,
             "filename": str(f.path)} for f in await asyncio.to_thread(service.vaes.list)]


@router.post("/refresh-vae", summary="Rescan models/VAE")
async def refresh_vae(service: ServiceDep) -> None:
    await asyncio.to_thread(service.vaes.refresh)


@router.get("/scripts", summary="Scripts: the always-on ControlNet (sd-webui-controlnet's units are honoured)")
async def scripts() -> dict[str, list]:
    # Clients such as webuiapi look here to learn that ControlNet units are understood.
    return {"txt2img": ["controlnet"], "img2img": ["controlnet"]}


@router.get("/embeddings", summary="Textual-inversion embeddings in models/embeddings (use by name in a prompt)")
async def embeddings(service: ServiceDep) -> dict[str, dict]:
    def describe() -> dict[str, dict]:
        out: dict[str, dict] = {"loaded": {}, "skipped": {}}
        for f in service.embeddings.list():
            shapes = [f.shapes[k] for k in ("emb_params", "clip_l") if k in f.shapes] or list(f.shapes.values())
            shape = shapes[0] if len(shapes) == 1 or "clip_l" in f.shapes else []
            entry = {"step": f.metadata.get("step"), "sd_checkpoint": f.metadata.get("sd_checkpoint"),
                     "sd_checkpoint_name": f.metadata.get("sd_checkpoint_name"),
                     "shape": shape[-1] if shape else None, "vectors": shape[0] if len(shape) == 2 else 1}
            out["loaded" if shape else "skipped"][f.name] = entry
        return out

    return await asyncio.to_thread(describe)


@router.post("/refresh-embeddings", summary="Rescan models/embeddings")
async def refresh_embeddings(service: ServiceDep) -> None:
    await asyncio.to_thread(service.embeddings.refresh)


# Lists of features this server does not have: real, empty answers so clients that probe them work.
@router.get("/hypernetworks")
async def hypernetworks() -> list:
    return []


class InterrogateRequest(BaseModel):
    image: str = ""
    model: str = "clip"


@router.post("/interrogate", summary="CLIP/DeepDanbooru interrogation: not on this server (422 naming `model`)")
async def interrogate(body: InterrogateRequest, request: Request) -> Any:
    return errors.render(request.url.path, 422, f"model: interrogation ({body.model!r}) is not available on this "
                         f"server: it has no CLIP or DeepDanbooru interrogator")


@router.get("/face-restorers")
async def face_restorers() -> list:
    return []


@router.get("/realesrgan-models", summary="The upscaler models (models/ESRGAN, models/RealESRGAN): name, path, scale")
async def realesrgan_models(service: ServiceDep) -> list[dict[str, Any]]:
    files = await asyncio.to_thread(service.upscalers.list)
    return [{"name": f.name, "path": str(f.path), "scale": f.scale} for f in files]


@router.get("/prompt-styles", summary="The styles of styles.csv (models or data folder): name, prompt, negative")
async def prompt_styles(service: ServiceDep) -> list[dict[str, str]]:
    styles = await asyncio.to_thread(service.styles.all)
    return [{"name": s.name, "prompt": s.prompt, "negative_prompt": s.negative_prompt} for s in styles.values()]


@router.get("/extensions")
async def extensions() -> list:
    return []
