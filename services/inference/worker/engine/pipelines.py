"""The diffusers pipelines the engine generates with, assembled from a checkpoint's components.

A checkpoint is loaded once into a text-to-image pipeline that the engine caches; each job gets
a pipeline of its own task (txt2img or img2img) over the same modules, with the job's sampler,
VAE and ControlNets (diffusers' ControlNet pipelines, built from the loaded modules without
reading the checkpoint again), so that nothing a job sets stays behind for the next one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    StableDiffusionControlNetImg2ImgPipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLControlNetImg2ImgPipeline,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.models import MultiControlNetModel
from diffusers.schedulers import EulerDiscreteScheduler, PNDMScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from diffusion.checkpoints import Architecture
from diffusion.components import Components, load_components

Pipeline = StableDiffusionPipeline | StableDiffusionXLPipeline


@dataclass
class LoadedCheckpoint:
    """A checkpoint in the engine's cache: its text-to-image pipeline and what it is."""

    pipeline: Pipeline
    architecture: Architecture


def load_checkpoint(path: Path, *, device: torch.device, dtype: torch.dtype) -> LoadedCheckpoint:
    """Read a single-file SD 1.x or SDXL checkpoint into a text-to-image pipeline on `device`."""
    components = load_components(path, device=device, dtype=dtype)
    return LoadedCheckpoint(pipeline=text_to_image(components), architecture=components.architecture)


def text_to_image(components: Components) -> Pipeline:
    """The checkpoint's own pipeline, with the sampler its single-file release uses by default
    (PNDM for SD 1.x, Euler for SDXL); no safety checker, no watermark."""
    if components.is_sdxl:
        pipeline = StableDiffusionXLPipeline(
            vae=components.vae,
            text_encoder=components.text_encoder,
            text_encoder_2=components.text_encoder_2,
            tokenizer=components.tokenizer,
            tokenizer_2=components.tokenizer_2,
            unet=components.unet,
            scheduler=EulerDiscreteScheduler.from_config(components.scheduler_config),
            image_encoder=None,
            feature_extractor=None,
            add_watermarker=False,
        )
    else:
        pipeline = StableDiffusionPipeline(
            vae=components.vae,
            text_encoder=components.text_encoder,
            tokenizer=components.tokenizer,
            unet=components.unet,
            scheduler=PNDMScheduler.from_config(components.scheduler_config),
            safety_checker=None,
            feature_extractor=None,
            image_encoder=None,
            requires_safety_checker=False,
        )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def pipeline_for_job(
    loaded: LoadedCheckpoint,
    *,
    task: str,
    vae: AutoencoderKL,
    scheduler: SchedulerMixin,
    controlnet: MultiControlNetModel | None = None,
) -> Pipeline:
    """A pipeline of `task` (txt2img or img2img) over the cached checkpoint's modules, with the
    job's VAE, sampler and, when given, ControlNets."""
    components = {**loaded.pipeline.components, "vae": vae, "scheduler": scheduler}
    img2img = task == "img2img"
    if controlnet is not None:
        components["controlnet"] = controlnet
    if loaded.architecture.is_sdxl:
        # original_size / target_size / crops are left to diffusers' defaults (the image size)
        if controlnet is not None:
            classes = (StableDiffusionXLControlNetPipeline, StableDiffusionXLControlNetImg2ImgPipeline)
        else:
            classes = (StableDiffusionXLPipeline, StableDiffusionXLImg2ImgPipeline)
        pipeline = classes[img2img](**components, add_watermarker=False)
    else:
        if controlnet is not None:
            classes = (StableDiffusionControlNetPipeline, StableDiffusionControlNetImg2ImgPipeline)
        else:
            classes = (StableDiffusionPipeline, StableDiffusionImg2ImgPipeline)
        pipeline = classes[img2img](**components, requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline
