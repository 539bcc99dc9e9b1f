"""The generation engine: runs one AUTOMATIC1111-style request on a cached diffusers pipeline.

The worker shell (queue, downloads, reporting) hands it a validated request and the local files
of the job's models. Loaded checkpoints stay in an LRU cache, so a model already loaded is
never read again and switching between cached models costs no disk read. A job's LoRAs and
embeddings are applied to the cached modules for that job only and removed afterwards.
"""

from __future__ import annotations

import gc
import random
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import diffusers
import torch
import transformers
from diffusers import AutoencoderKL, StableDiffusionPipeline
from PIL import Image

from diffusion.checkpoints import read_state_dict
from diffusion.components import load_vae
from services.inference.worker.engine.infotext import VERSION, infotext, png_with_parameters
from services.inference.worker.engine.pipelines import (
    LoadedCheckpoint,
    clip_skip_compatible,
    load_checkpoint,
    pipeline_for_job,
)
from services.inference.worker.engine.request import MAX_SEED, GenerationRequest, InvalidPayload
from shared.errors import Invalid

Progress = Callable[[int, int], None]
Cancelled = Callable[[], bool]


@dataclass(frozen=True)
class ModelFiles:
    """Local files of a job's models, as the worker downloaded them."""

    checkpoint: Path
    vae: Path | None = None
    loras: dict[str, Path] = field(default_factory=dict)  # name in `<lora:name:w>` -> file
    embeddings: dict[str, Path] = field(default_factory=dict)  # word in the prompt -> file


@dataclass
class GenerationResult:
    images: list[bytes]  # PNGs, each with an A1111 `parameters` text chunk
    parameters: dict[str, Any]  # the request as understood (A1111's response `parameters`)
    info: dict[str, Any]  # A1111's response `info`: seeds, infotexts, sizes, sampler...


class GenerationCancelled(Exception):
    """`cancelled()` answered True; the job's images were dropped."""


class IncompatibleModel(Invalid):
    """A LoRA or embedding of the job does not fit its checkpoint, or is not what its type
    says; the message names it."""


@dataclass(frozen=True)
class _FileKey:
    """A cached file: its path and what says the content did not change under that path."""

    path: Path
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: Path) -> _FileKey:
        resolved = Path(path).resolve()
        try:
            stat = resolved.stat()
        except FileNotFoundError:
            # the worker downloaded the files: one missing is its fault, not the user's
            raise FileNotFoundError(f"model file {path} does not exist") from None
        return cls(resolved, stat.st_size, stat.st_mtime_ns)


class Engine:
    """Runs generation requests; one at a time (calls are serialised)."""

    def __init__(self, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, max_pipelines: int = 2):
        self.device = torch.device(device)
        self.dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        self.max_pipelines = max(1, max_pipelines)
        self.loads = 0  # checkpoints read from disk
        self.vae_loads = 0  # standalone VAEs read from disk
        self._checkpoints: OrderedDict[_FileKey, LoadedCheckpoint] = OrderedDict()
        self._vaes: OrderedDict[tuple[_FileKey, str], AutoencoderKL] = OrderedDict()
        self._lock = threading.Lock()
        # Progress is reported through `progress`; the libraries' own bars only fill the logs.
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()

    @property
    def cached_checkpoints(self) -> list[Path]:
        """Loaded checkpoints, least recently used first."""
        return [key.path for key in self._checkpoints]

    def generate(
        self,
        request: GenerationRequest,
        models: ModelFiles,
        *,
        progress: Progress | None = None,
        cancelled: Cancelled | None = None,
    ) -> GenerationResult:
        with self._lock:
            try:
                return self._generate(request, models, progress, cancelled)
            except Exception:
                # Whatever failed (CUDA out of memory included) leaves the engine usable.
                self._release_memory()
                raise

    def clear(self) -> None:
        """Drop every cached model."""
        with self._lock:
            self._checkpoints.clear()
            self._vaes.clear()
            self._release_memory()

    # The job.

    def _generate(
        self,
        request: GenerationRequest,
        models: ModelFiles,
        progress: Progress | None,
        cancelled: Cancelled | None,
    ) -> GenerationResult:
        started = time.perf_counter()
        prompt, lora_weights = request.lora_tags()
        loras = _lora_files(lora_weights, models.loras)
        embeddings = _embeddings_in_use(f"{prompt}\n{request.negative_prompt}", models.embeddings)
        vae_file = _vae_file(request, models)
        sampler = request.sampler
        seed = request.seed if request.seed != -1 else random.randrange(MAX_SEED)
        seeds = [seed + index for index in range(request.images_count)]
        init_image = (
            _resized(request.init_image(), request.width, request.height) if request.task == "img2img" else None
        )

        loaded = self._checkpoint(models.checkpoint)
        base = loaded.pipeline
        vae = self._vae(vae_file, loaded) if vae_file else base.vae
        pipe = pipeline_for_job(
            loaded, task=request.task, vae=vae, scheduler=sampler.make_scheduler(base.scheduler.config)
        )

        # Filled as they are applied, so that a failure half-way still removes what was added.
        adapters: list[str] = []
        tokens: list[str] = []
        try:
            self._apply_loras(pipe, loras, adapters)
            self._apply_embeddings(pipe, embeddings, tokens)
            images = self._run(pipe, request, prompt, seeds, init_image, progress, cancelled)
        finally:
            if adapters:
                pipe.unload_lora_weights()
            if tokens:
                pipe.unload_textual_inversion()

        model_name = Path(models.checkpoint).stem
        vae_name = Path(vae_file).name if vae_file else None
        texts = [
            infotext(
                request.prompt,
                request.negative_prompt,
                _image_parameters(request, image_seed, model_name, vae_name, lora_weights),
            )
            for image_seed in seeds
        ]
        pngs = [png_with_parameters(image, text) for image, text in zip(images, texts, strict=True)]
        del images
        info = _a1111_info(request, seeds, texts, model_name, vae_name)
        info.update(
            lora_weights=lora_weights,
            embeddings=sorted(embeddings),
            elapsed_seconds=round(time.perf_counter() - started, 3),
        )
        parameters = request.model_dump(mode="json", exclude={"task", "init_images"})
        return GenerationResult(images=pngs, parameters=parameters, info=info)

    def _run(
        self,
        pipe: StableDiffusionPipeline,
        request: GenerationRequest,
        prompt: str,
        seeds: list[int],
        init_image: Image.Image | None,
        progress: Progress | None,
        cancelled: Cancelled | None,
    ) -> list[Image.Image]:
        generator_device = self.device if self.device.type == "cuda" else torch.device("cpu")
        images: list[Image.Image] = []
        for iteration in range(request.n_iter):
            if cancelled is not None and cancelled():
                raise GenerationCancelled("the job was cancelled")
            batch = seeds[iteration * request.batch_size : (iteration + 1) * request.batch_size]
            arguments: dict[str, Any] = {
                "prompt": prompt,
                "negative_prompt": request.negative_prompt,
                "num_inference_steps": request.steps,
                "guidance_scale": request.cfg_scale,
                "num_images_per_prompt": request.batch_size,
                # One generator per image: image i of the job depends on seed + i alone.
                "generator": [torch.Generator(device=generator_device).manual_seed(seed) for seed in batch],
                "clip_skip": request.clip_skip - 1 or None,
                "output_type": "pil",
            }
            if init_image is not None:
                arguments.update(image=init_image, strength=request.denoising_strength)
            else:
                arguments.update(width=request.width, height=request.height)
            if progress is not None or cancelled is not None:
                arguments["callback_on_step_end"] = _step_callback(iteration, request.n_iter, progress, cancelled)
            with torch.inference_mode(), clip_skip_compatible(pipe.text_encoder):
                output = pipe(**arguments)
            if pipe.interrupt:
                raise GenerationCancelled("the job was cancelled")
            images.extend(output.images)
        return images

    # Models.

    def _checkpoint(self, path: Path) -> LoadedCheckpoint:
        key = _FileKey.of(path)
        if key in self._checkpoints:
            self._checkpoints.move_to_end(key)
            return self._checkpoints[key]
        while len(self._checkpoints) >= self.max_pipelines:
            evicted, _ = self._checkpoints.popitem(last=False)
            for vae_key in [vae_key for vae_key in self._vaes if vae_key[0] == evicted]:
                del self._vaes[vae_key]
            self._release_memory()
        loaded = load_checkpoint(key.path, device=self.device, dtype=self.dtype)
        self.loads += 1
        self._checkpoints[key] = loaded
        return loaded

    def _vae(self, path: Path, loaded: LoadedCheckpoint) -> AutoencoderKL:
        cache_key = (_FileKey.of(path), loaded.architecture.name)
        if cache_key in self._vaes:
            self._vaes.move_to_end(cache_key)
            return self._vaes[cache_key]
        while len(self._vaes) >= self.max_pipelines:
            self._vaes.popitem(last=False)
            self._release_memory()
        vae = load_vae(cache_key[0].path, architecture=loaded.architecture, device=self.device, dtype=self.dtype)
        self.vae_loads += 1
        self._vaes[cache_key] = vae
        return vae

    def _apply_loras(
        self, pipe: StableDiffusionPipeline, loras: dict[str, tuple[Path, float]], adapters: list[str]
    ) -> None:
        weights: list[float] = []
        for index, (name, (path, weight)) in enumerate(loras.items()):
            adapter = f"job_lora_{index}"
            adapters.append(adapter)  # before loading: a half-loaded adapter is unloaded too
            try:
                pipe.load_lora_weights(read_state_dict(path), adapter_name=adapter)
            except (Invalid, ValueError, KeyError) as error:
                # an unreadable file is an Invalid; diffusers says that a LoRA does not fit this
                # model with a ValueError or a KeyError
                raise IncompatibleModel(f"LoRA {name!r} could not be applied to this model: {error}") from error
            weights.append(weight)
        if adapters:
            pipe.set_adapters(adapters, adapter_weights=weights)

    def _apply_embeddings(self, pipe: StableDiffusionPipeline, embeddings: dict[str, Path], tokens: list[str]) -> None:
        width = pipe.text_encoder.get_input_embeddings().weight.shape[-1]
        for name, path in embeddings.items():
            vectors = _embedding_vectors(read_state_dict(path), name)
            if vectors.shape[-1] != width:
                raise IncompatibleModel(
                    f"embedding {name!r} has vectors of width {vectors.shape[-1]}, this model needs {width}"
                )
            if name in pipe.tokenizer.get_vocab():
                raise IncompatibleModel(f"embedding {name!r} has the name of a word the tokenizer already knows")
            tokens.append(name)
            pipe.load_textual_inversion({name: vectors}, token=name)

    def _release_memory(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _image_parameters(
    request: GenerationRequest,
    seed: int,
    model_name: str,
    vae_name: str | None,
    lora_weights: dict[str, float],
) -> dict[str, Any]:
    """One image's infotext fields, in A1111's order; None leaves a field out."""
    sampler = request.sampler
    return {
        "Steps": request.steps,
        "Sampler": sampler.sampler,
        "Schedule type": sampler.schedule if sampler.schedule != "Uniform" else None,
        "CFG scale": request.cfg_scale,
        "Seed": seed,
        "Size": f"{request.width}x{request.height}",
        "Model": model_name,
        "VAE": vae_name,
        "Denoising strength": request.denoising_strength if request.task == "img2img" else None,
        "Clip skip": request.clip_skip if request.clip_skip > 1 else None,
        "Lora weights": ", ".join(f"{name}: {weight:g}" for name, weight in lora_weights.items()) or None,
        "Version": VERSION,
    }


def _a1111_info(
    request: GenerationRequest, seeds: list[int], texts: list[str], model_name: str, vae_name: str | None
) -> dict[str, Any]:
    """The `info` object of A1111's txt2img/img2img response."""
    count = len(seeds)
    sampler = request.sampler
    return {
        "prompt": request.prompt,
        "all_prompts": [request.prompt] * count,
        "negative_prompt": request.negative_prompt,
        "all_negative_prompts": [request.negative_prompt] * count,
        "seed": seeds[0],
        "all_seeds": seeds,
        "subseed": request.subseed,
        "all_subseeds": [request.subseed] * count,
        "subseed_strength": 0,
        "width": request.width,
        "height": request.height,
        "sampler_name": sampler.sampler,
        "scheduler": sampler.schedule,
        "cfg_scale": request.cfg_scale,
        "steps": request.steps,
        "batch_size": request.batch_size,
        "n_iter": request.n_iter,
        "restore_faces": False,
        "face_restoration_model": None,
        "sd_model_name": model_name,
        "sd_model_hash": None,
        "sd_vae_name": vae_name,
        "sd_vae_hash": None,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": request.denoising_strength,
        "extra_generation_params": {"Schedule type": sampler.schedule} if sampler.schedule != "Uniform" else {},
        "index_of_first_image": 0,
        "infotexts": texts,
        "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
        "clip_skip": request.clip_skip,
        "is_using_inpainting_conditioning": False,
        "version": VERSION,
    }


def _step_callback(iteration: int, iterations: int, progress: Progress | None, cancelled: Cancelled | None):
    def on_step_end(pipe, step: int, timestep, tensors: dict) -> dict:
        if progress is not None:
            per_iteration = pipe.num_timesteps
            progress(iteration * per_iteration + step + 1, iterations * per_iteration)
        if cancelled is not None and cancelled():
            pipe._interrupt = True  # diffusers skips the remaining steps
        return tensors

    return on_step_end


def _lora_files(weights: dict[str, float], available: dict[str, Path]) -> dict[str, tuple[Path, float]]:
    chosen = {}
    for name, weight in weights.items():
        path = available.get(name)
        if path is None:
            known = ", ".join(sorted(available)) or "none"
            raise InvalidPayload(f"prompt: LoRA {name!r} is not among the job's LoRA models ({known})")
        chosen[name] = (Path(path), weight)
    return chosen


def _embeddings_in_use(text: str, available: dict[str, Path]) -> dict[str, Path]:
    """Embeddings whose name stands as a word in the prompt or negative prompt, as in A1111."""
    return {
        name: Path(path)
        for name, path in available.items()
        if re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text)
    }


def _embedding_vectors(state: dict, name: str) -> torch.Tensor:
    """The vectors of an A1111 embedding (`string_to_param`, `emb_params`) or a diffusers one."""
    if isinstance(state.get("string_to_param"), dict):
        tensors = list(state["string_to_param"].values())
    elif "emb_params" in state:
        tensors = [state["emb_params"]]
    else:
        tensors = [value for value in state.values() if isinstance(value, torch.Tensor)]
    if len(tensors) != 1:
        raise IncompatibleModel(f"embedding {name!r}: not a textual-inversion embedding for Stable Diffusion 1.x")
    vectors = tensors[0].float()
    return vectors[None] if vectors.ndim == 1 else vectors


def _vae_file(request: GenerationRequest, models: ModelFiles) -> Path | None:
    if models.vae is not None:
        if request.override_settings.get("sd_vae") == "None":
            return None  # the request explicitly asks for the checkpoint's own VAE
        return Path(models.vae)
    if request.vae_setting is not None:
        raise InvalidPayload(
            f"override_settings.sd_vae: VAE {request.vae_setting!r} was asked for but the job has no VAE model"
        )
    return None


def _resized(image: Image.Image, width: int, height: int) -> Image.Image:
    # A1111's resize mode 0, "Just resize"
    if image.size == (width, height):
        return image
    return image.resize((width, height), Image.Resampling.LANCZOS)
