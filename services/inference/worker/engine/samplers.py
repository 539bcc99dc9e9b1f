"""AUTOMATIC1111 sampler and schedule-type names, mapped to diffusers schedulers.

A1111 names a sampler ("DPM++ 2M") and, since 1.9, a separate schedule type ("Karras"); older
clients fold the schedule into the name ("DPM++ 2M Karras"). Both forms are accepted. The
scheduler is built from the loaded model's own scheduler config (betas, timestep spacing), as
A1111 does with the model's noise schedule.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from diffusers import (
    DDIMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LCMScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from shared.errors import Invalid


class UnknownSampler(Invalid):
    """A sampler or schedule type A1111 does not have, or this platform does not run; the
    message lists the known ones."""


@dataclass(frozen=True)
class _Sampler:
    scheduler: type[SchedulerMixin]
    options: Mapping[str, Any] = field(default_factory=dict)
    automatic_schedule: str = "Uniform"  # what A1111 1.9+ picks for schedule type "Automatic"
    stochastic: bool = False  # draws fresh noise while sampling (ancestral, SDE): ENSD applies


SAMPLERS: dict[str, _Sampler] = {
    "Euler": _Sampler(EulerDiscreteScheduler),
    "Euler a": _Sampler(EulerAncestralDiscreteScheduler, stochastic=True),
    "LMS": _Sampler(LMSDiscreteScheduler),
    "Heun": _Sampler(HeunDiscreteScheduler),
    "DPM2": _Sampler(KDPM2DiscreteScheduler, automatic_schedule="Karras"),
    "DPM2 a": _Sampler(KDPM2AncestralDiscreteScheduler, automatic_schedule="Karras", stochastic=True),
    "DPM++ 2M": _Sampler(
        DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver++", "solver_order": 2},
        automatic_schedule="Karras",
    ),
    "DPM++ 2M SDE": _Sampler(
        DPMSolverMultistepScheduler,
        {"algorithm_type": "sde-dpmsolver++", "solver_order": 2},
        automatic_schedule="Exponential",
        stochastic=True,
    ),
    "DPM++ 3M SDE": _Sampler(
        DPMSolverMultistepScheduler,
        {"algorithm_type": "sde-dpmsolver++", "solver_order": 3},
        automatic_schedule="Exponential",
        stochastic=True,
    ),
    "DDIM": _Sampler(DDIMScheduler),
    "PLMS": _Sampler(PNDMScheduler, {"skip_prk_steps": True}),
    "UniPC": _Sampler(UniPCMultistepScheduler),
    "DEIS": _Sampler(DEISMultistepScheduler),
    "LCM": _Sampler(LCMScheduler),
}

# Schedule type -> scheduler options; "Uniform" is the model's own timestep spacing.
SCHEDULE_TYPES: dict[str, Mapping[str, Any]] = {
    "Uniform": {},
    "Karras": {"use_karras_sigmas": True},
    "Exponential": {"use_exponential_sigmas": True},
    "Beta": {"use_beta_sigmas": True},
    "SGM Uniform": {"timestep_spacing": "trailing"},
}
_SCHEDULE_ALIASES = {"automatic": "Automatic", "normal": "Uniform", "simple": "SGM Uniform"}
_SAMPLER_ALIASES = {
    "k_euler": "Euler",
    "k_euler_a": "Euler a",
    "k_euler_ancestral": "Euler a",
    "k_lms": "LMS",
    "k_heun": "Heun",
    "k_dpm_2": "DPM2",
    "k_dpm_2_a": "DPM2 a",
    "k_dpmpp_2m": "DPM++ 2M",
    "k_dpmpp_2m_sde": "DPM++ 2M SDE",
    "k_dpmpp_3m_sde": "DPM++ 3M SDE",
    "unipc": "UniPC",
    "plms": "PLMS",
    "ddim": "DDIM",
}


@dataclass(frozen=True)
class SamplerChoice:
    """A resolved sampler: the A1111 name to report and the schedule actually applied."""

    sampler: str  # canonical A1111 name, e.g. "DPM++ 2M"
    schedule: str  # "Uniform", "Karras", ...

    @property
    def stochastic(self) -> bool:
        return SAMPLERS[self.sampler].stochastic

    def make_scheduler(self, model_config: Mapping[str, Any]) -> SchedulerMixin:
        entry = SAMPLERS[self.sampler]
        options = {**entry.options, **_applicable(entry.scheduler, SCHEDULE_TYPES[self.schedule])}
        return entry.scheduler.from_config(dict(model_config), **options)


def resolve_sampler(sampler_name: str, schedule: str | None = None) -> SamplerChoice:
    """The sampler for A1111's `sampler_name` and `scheduler` fields; UnknownSampler names the
    known ones. Without a schedule type the sampler's name alone decides (pre-1.9 clients);
    "Automatic" takes the sampler's A1111 default."""
    by_lower = {name.lower(): name for name in SAMPLERS}
    name = sampler_name.strip()
    suffix_schedule = None
    for schedule_name in ("Karras", "Exponential"):
        if name.lower().endswith(" " + schedule_name.lower()) and name.lower() not in by_lower:
            name, suffix_schedule = name[: -len(schedule_name) - 1].strip(), schedule_name
    canonical = by_lower.get(name.lower()) or _SAMPLER_ALIASES.get(name.lower())
    if canonical is None:
        karras = [f"{name} Karras" for name in ("DPM++ 2M", "DPM2", "DPM2 a", "Euler", "Heun", "LMS")]
        known = ", ".join(sorted([*SAMPLERS, *karras]))
        raise UnknownSampler(f"unknown sampler {sampler_name!r}; known samplers: {known}")

    chosen = _schedule_name(schedule) if schedule else None
    if chosen in (None, "Automatic"):
        chosen = suffix_schedule or (SAMPLERS[canonical].automatic_schedule if chosen == "Automatic" else "Uniform")
    if not _applicable(SAMPLERS[canonical].scheduler, SCHEDULE_TYPES[chosen]):
        chosen = "Uniform"  # as in A1111, samplers without sigmas (DDIM, Euler a...) ignore it
    return SamplerChoice(sampler=canonical, schedule=chosen)


def _schedule_name(schedule: str) -> str:
    by_lower = {name.lower(): name for name in SCHEDULE_TYPES}
    key = schedule.strip().lower()
    name = by_lower.get(key) or _SCHEDULE_ALIASES.get(key)
    if name is None:
        known = ", ".join(["Automatic", *SCHEDULE_TYPES])
        raise UnknownSampler(f"unknown schedule type {schedule!r}; known schedule types: {known}")
    return name


def _applicable(scheduler: type[SchedulerMixin], options: Mapping[str, Any]) -> dict[str, Any]:
    accepted = inspect.signature(scheduler.__init__).parameters
    return {key: value for key, value in options.items() if key in accepted}
