"""The generation engine: runs one AUTOMATIC1111-style request on a cached diffusers pipeline.

The worker shell (queue, downloads, reporting) hands it a validated request and the local files
of the job's models. Loaded checkpoints stay in an LRU cache, so a model already loaded is
never read again and switching between cached models costs no disk read; standalone VAEs and
ControlNets are cached likewise. A job's LoRAs and embeddings are applied to the cached modules
for that job only and removed afterwards.

A job's prompts are encoded here, as A1111 encodes them (`prompts.py`: weights, BREAK, long
prompts), and handed to diffusers as embeddings. A txt2img job with the hires fix runs a second,
img2img pass at the larger size (`hires.py`); ControlNet units steer either pass
(`controlnet.py`).
"""

from __future__ import annotations

import gc
import io
import random
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePath
from typing import Any

import diffusers
import torch
import transformers
from diffusers import AutoencoderKL, ControlNetModel, StableDiffusionPipeline
from PIL import Image

from diffusion.checkpoints import read_state_dict
from diffusion.components import load_vae
from diffusion.controlnets import load_controlnet
from services.inference.worker.engine import controlnet as control
from services.inference.worker.engine.hires import HiresPlan, plan_hires, upscale_image, upscale_latents
from services.inference.worker.engine.infotext import VERSION, infotext, png_with_parameters
from services.inference.worker.engine.pipelines import LoadedCheckpoint, load_checkpoint, pipeline_for_job
from services.inference.worker.engine.prompts import PromptEmbeddings, encode_prompts
from services.inference.worker.engine.request import MAX_SEED, GenerationRequest, InvalidPayload, strip_hash
from services.inference.worker.engine.samplers import SamplerChoice, resolve_sampler
from services.inference.worker.engine.upscalers import Upscalers
from shared.errors import Invalid
from shared.metrics import MODEL_CACHE_REQUESTS, MODEL_LOAD_SECONDS

Progress = Callable[[int, int], None]
Cancelled = Callable[[], bool]


@dataclass(frozen=True)
class Preview:
    """A small approximate image of the latents every `every` steps, for a client to show while
    the job runs; `show(step, png)` takes it."""

    every: int
    show: Callable[[int, bytes], None]


@dataclass(frozen=True)
class ModelFiles:
    """Local files of a job's models, as the worker downloaded them."""

    checkpoint: Path  # the job's first Stable-diffusion file: used unless the settings name another
    vae: Path | None = None
    loras: dict[str, Path] = field(default_factory=dict)  # name in `<lora:name:w>` -> file
    embeddings: dict[str, Path] = field(default_factory=dict)  # word in the prompt -> file
    # every Stable-diffusion file of the job by file name, for `override_settings.sd_model_checkpoint`
    checkpoints: dict[str, Path] = field(default_factory=dict)
    controlnets: dict[str, Path] = field(default_factory=dict)  # file name and stem -> file
    upscalers: dict[str, Path] = field(default_factory=dict)  # the hires fix's model upscalers, by file name


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


@dataclass
class _Control:
    """A job's ControlNet units: the models, and the control images of each pass."""

    units: list[control.ControlNetUnit]
    models: list[ControlNetModel]
    labels: list[str]  # model names as the infotext shows them
    images: list[Image.Image]  # at the first pass's size
    hires_images: list[Image.Image] = field(default_factory=list)  # at the hires size

    def steering(self, *, hires: bool) -> control.ControlUnits:
        return control.ControlUnits(self.models, [unit.control_mode for unit in self.units], hires=hires)

    def arguments(self, *, img2img: bool, hires: bool) -> dict[str, Any]:
        images = self.hires_images if hires else self.images
        return {
            ("control_image" if img2img else "image"): images,
            "controlnet_conditioning_scale": [unit.weight for unit in self.units],
            "control_guidance_start": [unit.guidance_start for unit in self.units],
            "control_guidance_end": [unit.guidance_end for unit in self.units],
        }


@dataclass
class _Pass:
    """One sampling pass of every iteration: its pipeline and what it is called with."""

    pipe: Any
    sampler: SamplerChoice
    embeddings: PromptEmbeddings
    lora_weights: list[float]  # per loaded adapter
    planned_steps: int  # until the pipeline says how many it runs


class Engine:
    """Runs generation requests; one at a time (calls are serialised)."""

    def __init__(
        self,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        max_pipelines: int = 2,
        upscalers: Upscalers | None = None,
    ):
        self.device = torch.device(device)
        # image upscalers of the hires fix: the built-in ones and a job's upscaler checkpoints
        self.upscalers = upscalers or Upscalers(device=self.device)
        self.dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        self.max_pipelines = max(1, max_pipelines)
        self.max_controlnets = 2 * self.max_pipelines
        self.loads = 0  # checkpoints read from disk
        self.vae_loads = 0  # standalone VAEs read from disk
        self.controlnet_loads = 0  # ControlNets read from disk
        self._checkpoints: OrderedDict[_FileKey, LoadedCheckpoint] = OrderedDict()
        self._vaes: OrderedDict[tuple[_FileKey, str], AutoencoderKL] = OrderedDict()
        self._controlnets: OrderedDict[tuple[_FileKey, str], ControlNetModel] = OrderedDict()
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
        preview: Preview | None = None,
    ) -> GenerationResult:
        with self._lock:
            try:
                return self._generate(request, models, progress, cancelled, preview)
            except Exception:
                # Whatever failed (CUDA out of memory included) leaves the engine usable.
                self._release_memory()
                raise

    def clear(self) -> None:
        """Drop every cached model."""
        with self._lock:
            self._checkpoints.clear()
            self._vaes.clear()
            self._controlnets.clear()
            self._release_memory()

    # The job.

    def _generate(
        self,
        request: GenerationRequest,
        models: ModelFiles,
        progress: Progress | None,
        cancelled: Cancelled | None,
        preview: Preview | None = None,
    ) -> GenerationResult:
        started = time.perf_counter()
        hires = plan_hires(request)
        if hires is not None and not hires.latent_mode:  # an unknown upscaler fails before any work
            hires = replace(hires, upscale=self.upscalers.find(hires.upscaler, models.upscalers))
        prompt, lora_weights = request.lora_tags()
        hires_prompt, hires_lora_weights = request.lora_tags(hires.prompt) if hires else (prompt, lora_weights)
        loras = _lora_files({**lora_weights, **hires_lora_weights}, models.loras)
        texts = "\n".join([prompt, request.negative_prompt, hires_prompt, hires.negative_prompt if hires else ""])
        embeddings = _embeddings_in_use(texts, models.embeddings)
        checkpoint_file = _checkpoint_file(request, models)
        vae_file = _vae_file(request, models)
        units = request.controlnet_units()
        seed = request.seed if request.seed != -1 else random.randrange(MAX_SEED)
        seeds = [seed + index for index in range(request.images_count)]
        init_image = (
            _resized(request.init_image(), request.width, request.height) if request.task == "img2img" else None
        )

        loaded = self._checkpoint(checkpoint_file)
        base = loaded.pipeline
        vae = self._vae(vae_file, loaded) if vae_file else base.vae
        steering = self._control(units, models, loaded, init_image, request, hires) if units else None
        pipe = pipeline_for_job(
            loaded,
            task=request.task,
            vae=vae,
            scheduler=request.sampler.make_scheduler(base.scheduler.config),
            controlnet=steering.steering(hires=False) if steering else None,
        )
        hires_sampler = resolve_sampler(
            request.hr_sampler_name or request.sampler_name, request.hr_scheduler or request.scheduler
        )
        hires_pipe = (
            pipeline_for_job(
                loaded,
                task="img2img",
                vae=vae,
                scheduler=hires_sampler.make_scheduler(base.scheduler.config),
                controlnet=steering.steering(hires=True) if steering else None,
            )
            if hires
            else None
        )

        # Filled as they are applied, so that a failure half-way still removes what was added.
        adapters: list[str] = []
        tokens: list[str] = []
        try:
            self._apply_loras(pipe, loras, adapters)
            vectors = self._apply_embeddings(pipe, embeddings, tokens)
            passes = [
                self._pass(
                    pipe,
                    request.sampler,
                    prompt,
                    request.negative_prompt,
                    [lora_weights.get(name, 0.0) for name in loras],
                    vectors,
                    request,
                    planned_steps=request.steps
                    if init_image is None
                    else int(request.steps * request.denoising_strength),
                )
            ]
            if hires and hires_pipe is not None:
                passes.append(
                    self._pass(
                        hires_pipe,
                        hires_sampler,
                        hires_prompt,
                        hires.negative_prompt,
                        [hires_lora_weights.get(name, 0.0) for name in loras],
                        vectors,
                        request,
                        planned_steps=int(hires.steps * request.denoising_strength),
                    )
                )
            images = self._run(request, passes, seeds, init_image, hires, steering, progress, cancelled, preview)
        finally:
            if adapters:
                pipe.unload_lora_weights()
            if tokens:
                pipe.unload_textual_inversion()

        model_name = Path(checkpoint_file).stem
        vae_name = Path(vae_file).name if vae_file else None
        extra = _extra_parameters(request, hires, steering, padded=any(p.embeddings.padded for p in passes))
        texts_out = [
            infotext(
                request.prompt,
                request.negative_prompt,
                _image_parameters(request, image_seed, model_name, vae_name, lora_weights, extra),
            )
            for image_seed in seeds
        ]
        pngs = [png_with_parameters(image, text) for image, text in zip(images, texts_out, strict=True)]
        del images
        info = _a1111_info(request, seeds, texts_out, model_name, vae_name, extra)
        info.update(
            lora_weights=lora_weights,
            embeddings=sorted(embeddings),
            elapsed_seconds=round(time.perf_counter() - started, 3),
        )
        parameters = request.model_dump(mode="json", exclude={"task", "init_images", "alwayson_scripts"})
        parameters["alwayson_scripts"] = control.sanitized(request.alwayson_scripts)
        return GenerationResult(images=pngs, parameters=parameters, info=info)

    def _pass(
        self,
        pipe,
        sampler: SamplerChoice,
        prompt: str,
        negative_prompt: str,
        lora_weights: list[float],
        vectors: dict[str, int],
        request: GenerationRequest,
        *,
        planned_steps: int,
    ) -> _Pass:
        # the text encoder's LoRA weights shape the embeddings: set them before encoding
        if lora_weights:
            pipe.set_adapters([f"job_lora_{index}" for index in range(len(lora_weights))], lora_weights)
        embeddings = encode_prompts(pipe, prompt, negative_prompt, clip_skip=request.clip_skip, embeddings=vectors)
        return _Pass(
            pipe=pipe,
            sampler=sampler,
            embeddings=embeddings,
            lora_weights=lora_weights,
            planned_steps=max(1, planned_steps),
        )

    def _run(
        self,
        request: GenerationRequest,
        passes: list[_Pass],
        seeds: list[int],
        init_image: Image.Image | None,
        hires: HiresPlan | None,
        steering: _Control | None,
        progress: Progress | None,
        cancelled: Cancelled | None,
        preview: Preview | None = None,
    ) -> list[Image.Image]:
        generator_device = self.device if self.device.type == "cuda" else torch.device("cpu")

        def generators(offset: int = 0) -> list[torch.Generator]:
            # one generator per image: image i of the job depends on seed + i alone
            return [torch.Generator(device=generator_device).manual_seed(seed + offset) for seed in batch]

        steps = _StepCounter(request.n_iter, [one.planned_steps for one in passes], progress, cancelled, preview)
        ensd = request.eta_noise_seed_delta
        images: list[Image.Image] = []
        for iteration in range(request.n_iter):
            if cancelled is not None and cancelled():
                raise GenerationCancelled("the job was cancelled")
            batch = seeds[iteration * request.batch_size : (iteration + 1) * request.batch_size]
            first = passes[0]
            arguments = self._common_arguments(request, first, generators(), steps.callback(iteration, 0))
            if init_image is not None:
                arguments.update(image=init_image, strength=request.denoising_strength)
            else:
                arguments.update(width=request.width, height=request.height)
            arguments["num_inference_steps"] = request.steps
            arguments["num_images_per_prompt"] = request.batch_size
            if hires is not None:
                arguments["output_type"] = "latent" if hires.latent_mode else "pil"
            if steering is not None:
                arguments.update(steering.arguments(img2img=init_image is not None, hires=False))
            output = self._call(first, arguments, ensd, generators(ensd), request)
            if hires is None:
                images.extend(output.images)
                continue

            second = passes[1]
            if hires.latent_mode:
                upscaled: Any = upscale_latents(output.images, hires)
            else:
                upscaled = [upscale_image(image, hires) for image in output.images]
            arguments = self._common_arguments(request, second, generators(), steps.callback(iteration, 1))
            arguments.update(
                image=upscaled,
                strength=request.denoising_strength,
                num_inference_steps=hires.steps,
                num_images_per_prompt=len(batch),
            )
            if steering is not None:
                arguments.update(steering.arguments(img2img=True, hires=True))
            images.extend(self._call(second, arguments, ensd, generators(ensd), request).images)
        return images

    def _common_arguments(
        self, request: GenerationRequest, one: _Pass, generators: list[torch.Generator], callback
    ) -> dict[str, Any]:
        arguments: dict[str, Any] = {
            **one.embeddings.arguments(),
            "guidance_scale": request.cfg_scale,
            "generator": generators,
            "output_type": "pil",
        }
        if callback is not None:
            arguments["callback_on_step_end"] = callback
        return arguments

    def _call(self, one: _Pass, arguments: dict[str, Any], ensd: int, noise: list[torch.Generator], request):
        pipe = one.pipe
        if one.lora_weights:
            pipe.set_adapters([f"job_lora_{index}" for index in range(len(one.lora_weights))], one.lora_weights)
        if ensd and one.sampler.stochastic:
            _sample_noise_from(pipe, noise)
        controlnet = getattr(pipe, "controlnet", None)
        if isinstance(controlnet, control.ControlUnits):
            controlnet.guided = request.cfg_scale > 1.0  # diffusers' test for classifier-free guidance
        with torch.inference_mode():
            output = pipe(**arguments)
        if pipe.interrupt:
            raise GenerationCancelled("the job was cancelled")
        return output

    # ControlNet.

    def _control(
        self,
        units: list[control.ControlNetUnit],
        models: ModelFiles,
        loaded: LoadedCheckpoint,
        init_image: Image.Image | None,
        request: GenerationRequest,
        hires: HiresPlan | None,
    ) -> _Control:
        steering = _Control(units=units, models=[], labels=[], images=[])
        for index, unit in enumerate(units):
            path = _controlnet_file(unit.model_name, models.controlnets, index)
            steering.models.append(self._controlnet(path, loaded, index))
            steering.labels.append(Path(path).stem)
            detected = control.detect(unit, control.unit_image(unit, init_image, index), request.width, request.height)
            steering.images.append(control.fit(detected, unit.resize_mode, request.width, request.height))
            if hires is not None:
                steering.hires_images.append(control.fit(detected, unit.resize_mode, hires.width, hires.height))
        return steering

    def _controlnet(self, path: Path, loaded: LoadedCheckpoint, index: int) -> ControlNetModel:
        cache_key = (_FileKey.of(path), loaded.architecture.name)
        if cache_key in self._controlnets:
            _cache_hit()
            self._controlnets.move_to_end(cache_key)
            return self._controlnets[cache_key]
        while len(self._controlnets) >= self.max_controlnets:
            self._controlnets.popitem(last=False)
            self._release_memory()
        began = time.perf_counter()
        try:
            model = load_controlnet(
                cache_key[0].path, architecture=loaded.architecture, device=self.device, dtype=self.dtype
            )
        except Invalid as error:
            raise IncompatibleModel(f"alwayson_scripts.controlnet.args[{index}].model: {error.message}") from error
        _loaded("controlnet", began)
        self.controlnet_loads += 1
        self._controlnets[cache_key] = model
        return model

    # Models.

    def _checkpoint(self, path: Path) -> LoadedCheckpoint:
        key = _FileKey.of(path)
        if key in self._checkpoints:
            _cache_hit()
            self._checkpoints.move_to_end(key)
            return self._checkpoints[key]
        while len(self._checkpoints) >= self.max_pipelines:
            evicted, _ = self._checkpoints.popitem(last=False)
            for vae_key in [vae_key for vae_key in self._vaes if vae_key[0] == evicted]:
                del self._vaes[vae_key]
            self._release_memory()
        began = time.perf_counter()
        loaded = load_checkpoint(key.path, device=self.device, dtype=self.dtype)
        _loaded("checkpoint", began)
        self.loads += 1
        self._checkpoints[key] = loaded
        return loaded

    def _vae(self, path: Path, loaded: LoadedCheckpoint) -> AutoencoderKL:
        cache_key = (_FileKey.of(path), loaded.architecture.name)
        if cache_key in self._vaes:
            _cache_hit()
            self._vaes.move_to_end(cache_key)
            return self._vaes[cache_key]
        while len(self._vaes) >= self.max_pipelines:
            self._vaes.popitem(last=False)
            self._release_memory()
        began = time.perf_counter()
        vae = load_vae(cache_key[0].path, architecture=loaded.architecture, device=self.device, dtype=self.dtype)
        _loaded("vae", began)
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

    def _apply_embeddings(
        self, pipe: StableDiffusionPipeline, embeddings: dict[str, Path], tokens: list[str]
    ) -> dict[str, int]:
        """Load the job's embeddings; their vector counts by name."""
        width = pipe.text_encoder.get_input_embeddings().weight.shape[-1]
        counts: dict[str, int] = {}
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
            counts[name] = vectors.shape[0]
        return counts

    def _release_memory(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _cache_hit() -> None:
    MODEL_CACHE_REQUESTS.labels(cache="memory", result="hit").inc()


def _loaded(kind: str, began: float) -> None:
    """A model of `kind` was not in memory and took since `began` to load."""
    MODEL_CACHE_REQUESTS.labels(cache="memory", result="miss").inc()
    MODEL_LOAD_SECONDS.labels(kind=kind).observe(time.perf_counter() - began)


class _StepCounter:
    """Progress over every pass of every iteration. A pass's step count is known once its
    pipeline has set its timesteps (Heun's or DPM2's are not the steps asked for); until then
    the planned count stands in."""

    def __init__(
        self,
        iterations: int,
        planned: list[int],
        progress: Progress | None,
        cancelled: Cancelled | None,
        preview: Preview | None = None,
    ):
        self.iterations = iterations
        self.planned = list(planned)
        self.progress = progress
        self.cancelled = cancelled
        self.preview = preview

    def callback(self, iteration: int, pass_index: int):
        if self.progress is None and self.cancelled is None and self.preview is None:
            return None

        def on_step_end(pipe, step: int, timestep, tensors: dict) -> dict:
            self.planned[pass_index] = pipe.num_timesteps
            per_iteration = sum(self.planned)
            done = iteration * per_iteration + sum(self.planned[:pass_index]) + step + 1
            if self.preview is not None and done % self.preview.every == 0 and "latents" in tensors:
                self.preview.show(done, preview_png(tensors["latents"], sdxl=hasattr(pipe, "text_encoder_2")))
            if self.progress is not None:
                self.progress(done, self.iterations * per_iteration)
            if self.cancelled is not None and self.cancelled():
                pipe._interrupt = True  # diffusers skips the remaining steps
            return tensors

        return on_step_end


# The usual linear approximation of Stable Diffusion's VAE decoder (latent channels -> RGB),
# good enough for a thumbnail while a job runs.
_LATENT_RGB = {
    False: ((0.298, 0.207, 0.208), (0.187, 0.286, 0.173), (-0.158, 0.189, 0.264), (-0.184, -0.271, -0.473)),
    True: (
        (0.3920, 0.4054, 0.4549),
        (-0.2634, -0.0196, 0.0653),
        (0.0568, 0.1687, -0.0755),
        (-0.3112, -0.2359, -0.2076),
    ),
}
PREVIEW_SIDE = 128


def preview_png(latents: torch.Tensor, *, sdxl: bool) -> bytes:
    """The first image of a batch of latents as a small PNG, through the linear approximation."""
    factors = torch.tensor(_LATENT_RGB[sdxl], dtype=torch.float32)
    rgb = torch.einsum("chw,cr->hwr", latents[0].float().cpu(), factors)
    pixels = ((rgb + 1) / 2).clamp(0, 1).mul(255).to(torch.uint8).numpy()
    image = Image.fromarray(pixels)
    image.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _sample_noise_from(pipe, generators: list[torch.Generator]) -> None:
    """Make the sampler draw its noise from `generators` while the starting noise still comes
    from the pipeline's own (A1111's ENSD). diffusers hands the scheduler's step the generators
    it is given through this method, once per call."""
    own = type(pipe).prepare_extra_step_kwargs
    pipe.prepare_extra_step_kwargs = lambda generator, eta: own(pipe, generators, eta)


def _extra_parameters(
    request: GenerationRequest, hires: HiresPlan | None, steering: _Control | None, *, padded: bool
) -> dict[str, Any]:
    """A1111's `extra_generation_params`: what extensions and options add to the infotext."""
    extra: dict[str, Any] = {}
    if request.sampler.schedule != "Uniform":
        extra["Schedule type"] = request.sampler.schedule
    if hires is not None:
        extra.update(hires.infotext)
    if steering is not None:
        for index, (unit, label) in enumerate(zip(steering.units, steering.labels, strict=True)):
            extra[f"ControlNet {index}"] = unit.infotext(label)
    if padded:
        extra["Pad conds"] = True
    return extra


def _image_parameters(
    request: GenerationRequest,
    seed: int,
    model_name: str,
    vae_name: str | None,
    lora_weights: dict[str, float],
    extra: dict[str, Any],
) -> dict[str, Any]:
    """One image's infotext fields, in A1111's order; None leaves a field out."""
    sampler = request.sampler
    ensd = request.eta_noise_seed_delta
    denoised = request.task == "img2img" or request.enable_hr
    return {
        "Steps": request.steps,
        "Sampler": sampler.sampler,
        "Schedule type": sampler.schedule if sampler.schedule != "Uniform" else None,
        "CFG scale": request.cfg_scale,
        "Seed": seed,
        "Size": f"{request.width}x{request.height}",
        "Model": model_name,
        "VAE": vae_name,
        "Denoising strength": request.denoising_strength if denoised else None,
        "Clip skip": request.clip_skip if request.clip_skip > 1 else None,
        "ENSD": ensd if ensd and sampler.stochastic else None,
        **{key: value for key, value in extra.items() if key != "Schedule type"},
        "Lora weights": ", ".join(f"{name}: {weight:g}" for name, weight in lora_weights.items()) or None,
        "Version": VERSION,
    }


def _a1111_info(
    request: GenerationRequest,
    seeds: list[int],
    texts: list[str],
    model_name: str,
    vae_name: str | None,
    extra: dict[str, Any],
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
        "extra_generation_params": extra,
        "index_of_first_image": 0,
        "infotexts": texts,
        "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
        "clip_skip": request.clip_skip,
        "is_using_inpainting_conditioning": False,
        "version": VERSION,
    }


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


def _names_match(wanted: str, name: str) -> bool:
    """An A1111 model title (maybe in a folder, maybe without the extension) names this file."""
    wanted = PurePath(wanted.replace("\\", "/")).name
    return wanted in (name, PurePath(name).stem)


def _checkpoint_file(request: GenerationRequest, models: ModelFiles) -> Path:
    """The job's checkpoint, or the one `override_settings.sd_model_checkpoint` names among
    its Stable-diffusion files."""
    wanted = request.checkpoint_setting
    if wanted is None:
        return Path(models.checkpoint)
    available = models.checkpoints or {Path(models.checkpoint).name: Path(models.checkpoint)}
    for name, path in available.items():
        if _names_match(wanted, name):
            return Path(path)
    raise InvalidPayload(
        f"override_settings.sd_model_checkpoint: {wanted!r} is not among the job's Stable-diffusion "
        f"checkpoints ({', '.join(sorted(available))})"
    )


def _controlnet_file(wanted: str, available: dict[str, Path], index: int) -> Path:
    for name, path in available.items():
        if _names_match(wanted, name):
            return Path(path)
    lowered = wanted.lower()
    for name, path in available.items():
        if lowered in (name.lower(), PurePath(name).stem.lower()):
            return Path(path)
    known = ", ".join(sorted({PurePath(name).stem for name in available})) or "none"
    raise InvalidPayload(
        f"alwayson_scripts.controlnet.args[{index}].model: ControlNet {wanted!r} is not among the job's "
        f"ControlNet models ({known})"
    )


def _vae_file(request: GenerationRequest, models: ModelFiles) -> Path | None:
    if models.vae is not None:
        if request.override_settings.get("sd_vae") == "None":
            return None  # the request explicitly asks for the checkpoint's own VAE
        setting = request.vae_setting
        if setting is not None and not _names_match(strip_hash(setting), Path(models.vae).name):
            raise InvalidPayload(
                f"override_settings.sd_vae: VAE {setting!r} is not the job's VAE ({Path(models.vae).name})"
            )
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
