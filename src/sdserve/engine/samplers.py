"""A1111 sampler and schedule-type names mapped onto diffusers schedulers.

The table is static, so the API role validates names without diffusers (tests/test_samplers.py checks each
sampler's schedule list against the diffusers scheduler's config keys). A1111 (v1.9+) separates the sampler ("DPM++ 2M") from the schedule type ("Karras"); older
clients send the two combined ("DPM++ 2M Karras"). "Automatic" resolves to the schedule
A1111 itself uses for that sampler, so the same settings mean the same thing here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cache
from typing import Any


class UnknownSamplerError(ValueError):
    """A sampler or schedule name that is not known, or a combination that does not exist."""


# The schedule types a scheduler can take: all of them, or only those that change timestep spacing (its config
# has no `use_karras_sigmas`), or only Karras (it has no `timestep_spacing`).
ALL = ("automatic", "uniform", "karras", "exponential", "sgm_uniform")
SPACING = ("automatic", "uniform", "sgm_uniform")


@dataclass(frozen=True)
class Sampler:
    name: str
    scheduler_class: str
    aliases: tuple[str, ...]
    # The schedule A1111 picks when the client asks for "Automatic".
    default_schedule: str = "automatic"
    options: dict[str, Any] = field(default_factory=dict)
    schedules: tuple[str, ...] = ALL
    second_order: bool = False  # A1111's "second_order": two model calls a step, each counted as a step


@dataclass(frozen=True)
class Schedule:
    name: str
    label: str
    aliases: tuple[str, ...]
    # Scheduler config overrides, and the config keys a scheduler must have to support them.
    overrides: dict[str, Any]


SAMPLERS: tuple[Sampler, ...] = (
    Sampler("DPM++ 2M", "DPMSolverMultistepScheduler", ("k_dpmpp_2m",), "karras",
            {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    Sampler("DPM++ SDE", "DPMSolverSinglestepScheduler", ("k_dpmpp_sde",), "karras",
            schedules=("automatic", "karras"), second_order=True),
    Sampler("DPM++ 2M SDE", "DPMSolverMultistepScheduler", ("k_dpmpp_2m_sde",), "exponential",
            {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    Sampler("Euler a", "EulerAncestralDiscreteScheduler", ("k_euler_a", "k_euler_ancestral"), schedules=SPACING),
    Sampler("Euler", "EulerDiscreteScheduler", ("k_euler",)),
    Sampler("LMS", "LMSDiscreteScheduler", ("k_lms",)),
    Sampler("Heun", "HeunDiscreteScheduler", ("k_heun",), second_order=True),
    Sampler("DPM2", "KDPM2DiscreteScheduler", ("k_dpm_2",), "karras", second_order=True),
    Sampler("DPM2 a", "KDPM2AncestralDiscreteScheduler", ("k_dpm_2_a",), "karras", second_order=True),
    Sampler("DDIM", "DDIMScheduler", ("ddim",), schedules=SPACING),
    Sampler("PLMS", "PNDMScheduler", ("plms",), options={"skip_prk_steps": True}, schedules=SPACING),
    Sampler("UniPC", "UniPCMultistepScheduler", ("unipc",)),
    Sampler("LCM", "LCMScheduler", ("lcm",), schedules=SPACING),
)

SCHEDULES: tuple[Schedule, ...] = (
    Schedule("automatic", "Automatic", (), {}),
    Schedule("uniform", "Uniform", (), {"timestep_spacing": "linspace"}),
    Schedule("karras", "Karras", (), {"use_karras_sigmas": True}),
    Schedule("exponential", "Exponential", (), {"use_exponential_sigmas": True, "timestep_spacing": "linspace"}),
    Schedule("sgm_uniform", "SGM Uniform", ("sgmuniform",), {"timestep_spacing": "trailing"}),
)


def _key(name: str) -> str:
    return " ".join(name.strip().lower().replace("_", " ").split())


_SAMPLER_BY_KEY = {_key(alias): s for s in SAMPLERS for alias in (s.name, *s.aliases)}
_SCHEDULE_BY_KEY = {_key(alias): s for s in SCHEDULES for alias in (s.name, s.label, *s.aliases)}


def sampler_names() -> list[str]:
    return [s.name for s in SAMPLERS]


def find_schedule(name: str | None) -> Schedule:
    if name is None or not name.strip():
        return SCHEDULES[0]
    found = _SCHEDULE_BY_KEY.get(_key(name))
    if found is None:
        valid = ", ".join(f"{s.name} ({s.label})" for s in SCHEDULES)
        raise UnknownSamplerError(f"unknown schedule type {name!r}; valid: {valid}")
    return found


def find_sampler(name: str) -> tuple[Sampler, Schedule | None]:
    """The sampler, plus the schedule when the name is a legacy combined one ("DPM++ 2M Karras")."""
    key = _key(name)
    if key in _SAMPLER_BY_KEY:
        return _SAMPLER_BY_KEY[key], None
    for schedule in SCHEDULES[1:]:
        for suffix in {_key(schedule.label), _key(schedule.name)}:
            if key.endswith(" " + suffix) and key[: -len(suffix) - 1] in _SAMPLER_BY_KEY:
                return _SAMPLER_BY_KEY[key[: -len(suffix) - 1]], schedule
    raise UnknownSamplerError(f"unknown sampler {name!r}; valid: {', '.join(sampler_names())}")


@dataclass(frozen=True)
class ResolvedSampler:
    sampler: Sampler
    schedule: Schedule  # never "automatic" unless the sampler has no special default
    automatic: bool = False  # the client left the schedule to the sampler (and the model)


def zero_terminal_snr(scheduler_config: dict[str, Any]) -> bool:
    """Whether the model was trained on a noise schedule whose last step is pure noise (zero terminal SNR, as
    SD 2.x-style "ztsnr" models): diffusers' flag, or `trained_betas` whose cumulative alpha ends near zero."""
    if scheduler_config.get("rescale_betas_zero_snr"):
        return True
    betas = scheduler_config.get("trained_betas")
    return bool(betas) and math.prod(1.0 - beta for beta in betas) < 1e-4


def resolve(sampler: str, schedule: str | None = None, zero_snr: bool = False) -> ResolvedSampler:
    """Validate a sampler/schedule pair and resolve "Automatic" to A1111's default for the sampler, except on a
    zero-terminal-SNR model (`zero_snr`): there Karras and exponential spacing start from the model's last
    sigma, which is huge (4096 with diffusers' rescaling), and spend most of the steps on pure noise, so "Automatic"
    takes SGM Uniform (even steps from the last, pure-noise timestep) where the sampler has it. A schedule
    the client names is always the one used."""
    found, legacy_schedule = find_sampler(sampler)
    chosen = find_schedule(schedule)
    if chosen.name == "automatic" and legacy_schedule is not None:
        chosen = legacy_schedule
    automatic = chosen.name == "automatic"
    if automatic:
        default = found.default_schedule
        if zero_snr and default in ("karras", "exponential") and "sgm_uniform" in found.schedules:
            default = "sgm_uniform"
        chosen = find_schedule(default)
    if chosen.name not in found.schedules:
        raise UnknownSamplerError(
            f"schedule type {chosen.name!r} is not available for sampler {found.name!r}; "
            f"valid: {', '.join(found.schedules)}"
        )
    return ResolvedSampler(found, chosen, automatic)


@cache
def config_keys(class_name: str) -> frozenset[str]:
    """The config keys of a diffusers scheduler class (the engine's side: imports diffusers)."""
    import diffusers

    return frozenset(getattr(diffusers, class_name)().config.keys())


def supported_schedules(sampler: str) -> list[str]:
    found, _ = find_sampler(sampler)
    return list(found.schedules)


def make_scheduler(resolved: ResolvedSampler, base_config: dict[str, Any]):
    """A fresh scheduler (they carry per-run state) built on the model's own noise schedule."""
    import diffusers

    cls = getattr(diffusers, resolved.sampler.scheduler_class)
    keys = config_keys(resolved.sampler.scheduler_class)
    # Keep the model's training noise schedule (betas, prediction type); drop knobs of other samplers.
    base = {k: v for k, v in base_config.items() if not k.startswith("_") and k in keys}
    for knob in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"):
        base.pop(knob, None)
    return cls.from_config({**base, **resolved.sampler.options, **resolved.schedule.overrides})
