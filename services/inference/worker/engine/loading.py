"""Loads a user's single-file checkpoint (or VAE) into a diffusers pipeline, without the hub.

The file is read once; its architecture is recognised from its keys (or, for the tiny test
models, from its metadata); the UNet and VAE go through diffusers' single-file conversion with
configs that ship with the project, the CLIP text encoder is loaded strictly from the same
state dict and the tokenizer is rebuilt locally.
"""

from __future__ import annotations

import json
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
from diffusers.schedulers import EulerDiscreteScheduler, PNDMScheduler
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from services.inference.worker.engine import ldm_layout, tokenizer
from services.inference.worker.engine.configs import SD15_CONFIGS, SDXL_CONFIGS, read_config

# Where `tiny.make_tiny_checkpoint` stores the tiny architecture in the safetensors header.
TINY_METADATA_KEY = "esd.tiny_sd"
# `tiny.make_tiny_sdxl_checkpoint` stores its architecture under this key instead.
TINY_SDXL_METADATA_KEY = "esd.tiny_sdxl"
_CLIP_TOKENS = ldm_layout.TEXT_ENCODER_PREFIX + "text_model.embeddings.token_embedding.weight"


class UnsupportedCheckpoint(ValueError):
    """The file is not a checkpoint of an architecture this engine runs."""


@dataclass(frozen=True)
class Architecture:
    """What a checkpoint needs besides its weights: diffusers configs and a tokenizer."""

    name: str  # "sd15", "tiny-sd15", "sdxl" or "tiny-sdxl"
    configs: Mapping[str, dict]  # unet, vae, text_encoder, scheduler (+ text_encoder_2 for SDXL)
    tokenizer_json: str | None = None  # the tiny models' own vocabulary

    @property
    def is_sdxl(self) -> bool:
        return self.name.endswith("sdxl")

    def tokenizer(self) -> CLIPTokenizer:
        if self.tokenizer_json is not None:
            return tokenizer.tokenizer_from_json(self.tokenizer_json)
        return tokenizer.sd15_tokenizer()

    def tokenizer_2(self) -> CLIPTokenizer:
        """SDXL's second tokenizer: the same CLIP BPE, padding with "!" (OpenCLIP's pad id 0)."""
        if self.tokenizer_json is not None:
            return tokenizer.tokenizer_from_json(self.tokenizer_json, pad_token="!")
        return tokenizer.sdxl_tokenizer_2()

    @contextmanager
    def config_folder(self) -> Iterator[str]:
        """A folder in diffusers' layout (`unet/config.json`, ...) for `from_single_file`."""
        if self.name == "sd15":
            yield str(SD15_CONFIGS)
            return
        if self.name == "sdxl":
            yield str(SDXL_CONFIGS)
            return
        with tempfile.TemporaryDirectory(prefix="esd-configs-") as folder:
            for component in ("unet", "vae"):
                (Path(folder) / component).mkdir()
                (Path(folder) / component / "config.json").write_text(json.dumps(self.configs[component]))
            yield folder


def sd15_architecture() -> Architecture:
    return Architecture(
        name="sd15",
        configs={
            "unet": read_config(SD15_CONFIGS / "unet" / "config.json"),
            "vae": read_config(SD15_CONFIGS / "vae" / "config.json"),
            "text_encoder": read_config(SD15_CONFIGS / "text_encoder" / "config.json"),
            "scheduler": read_config(SD15_CONFIGS / "scheduler" / "scheduler_config.json"),
        },
    )


def sdxl_architecture() -> Architecture:
    return Architecture(
        name="sdxl",
        configs={
            "unet": read_config(SDXL_CONFIGS / "unet" / "config.json"),
            "vae": read_config(SDXL_CONFIGS / "vae" / "config.json"),
            "text_encoder": read_config(SDXL_CONFIGS / "text_encoder" / "config.json"),
            "text_encoder_2": read_config(SDXL_CONFIGS / "text_encoder_2" / "config.json"),
            "scheduler": read_config(SDXL_CONFIGS / "scheduler" / "scheduler_config.json"),
        },
    )


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a `.safetensors` file, or of a pickled checkpoint read with
    `weights_only` (no code in a user's file is ever run)."""
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} does not exist")
    if path.suffix.lower() == ".safetensors":
        try:
            return load_file(str(path))
        except SafetensorError as error:
            raise UnsupportedCheckpoint(
                f"{path.name} could not be read as a safetensors file: {error}"
            ) from error
    try:
        # mmap spares a copy but needs the zip format of torch >= 1.6; older files are read whole
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as error:  # a corrupt file or a pickle with objects beyond tensors
        raise UnsupportedCheckpoint(f"{path.name} could not be read as a checkpoint: {error}") from error
    while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UnsupportedCheckpoint(f"{path.name} holds no state dict")
    return state


def recognise(path: Path, state: Mapping[str, torch.Tensor]) -> Architecture:
    metadata = tiny_metadata(path)
    if metadata is not None:
        sdxl = "text_encoder_2" in metadata
        components = ("unet", "vae", "text_encoder", "scheduler") + (("text_encoder_2",) if sdxl else ())
        return Architecture(
            name="tiny-sdxl" if sdxl else "tiny-sd15",
            configs={key: metadata[key] for key in components},
            tokenizer_json=json.dumps(metadata["tokenizer"]),
        )
    if any(key.startswith("conditioner.embedders.") for key in state):
        return _recognise_sdxl(path, state)
    if any(key.startswith("cond_stage_model.model.") for key in state):
        raise UnsupportedCheckpoint(
            f"{path.name} is a Stable Diffusion 2.x checkpoint; only 1.x is supported so far"
        )
    tokens = state.get(_CLIP_TOKENS)
    unet_in = state.get(ldm_layout.UNET_PREFIX + "input_blocks.0.0.weight")
    if tokens is None or unet_in is None:
        raise UnsupportedCheckpoint(
            f"{path.name} is not a Stable Diffusion checkpoint (no UNet or CLIP weights)"
        )
    if tuple(tokens.shape) != (49408, 768):
        raise UnsupportedCheckpoint(
            f"{path.name} has a text encoder of shape {tuple(tokens.shape)}, not SD 1.x's"
        )
    if unet_in.shape[1] != 4:
        raise UnsupportedCheckpoint(
            f"{path.name} is an inpainting or other {unet_in.shape[1]}-channel model; not supported"
        )
    return sd15_architecture()


def _recognise_sdxl(path: Path, state: Mapping[str, torch.Tensor]) -> Architecture:
    tokens = state.get(ldm_layout.SDXL_TEXT_ENCODER_PREFIX + "text_model.embeddings.token_embedding.weight")
    tokens_2 = state.get(ldm_layout.SDXL_TEXT_ENCODER_2_PREFIX + "token_embedding.weight")
    unet_in = state.get(ldm_layout.UNET_PREFIX + "input_blocks.0.0.weight")
    label_emb = state.get(ldm_layout.UNET_PREFIX + "label_emb.0.0.weight")
    if tokens is None or tokens_2 is None or unet_in is None or label_emb is None:
        raise UnsupportedCheckpoint(
            f"{path.name} looks like an SDXL checkpoint but lacks its UNet or one of its two text "
            "encoders (an SDXL refiner or a partial file?); only the SDXL base model is supported"
        )
    if tuple(tokens.shape) != (49408, 768) or tuple(tokens_2.shape) != (49408, 1280):
        raise UnsupportedCheckpoint(
            f"{path.name} has text encoders of shapes {tuple(tokens.shape)} and {tuple(tokens_2.shape)}, "
            "not SDXL's"
        )
    if unet_in.shape[1] != 4:
        raise UnsupportedCheckpoint(
            f"{path.name} is an inpainting or other {unet_in.shape[1]}-channel model; not supported"
        )
    if label_emb.shape[1] != 2816:
        raise UnsupportedCheckpoint(f"{path.name} is not an SDXL base model (an SDXL refiner?)")
    return sdxl_architecture()


def tiny_metadata(checkpoint: str | Path) -> dict | None:
    """The tiny architecture stored in a checkpoint by `make_tiny_checkpoint` (or
    `make_tiny_sdxl_checkpoint`: its metadata has a `text_encoder_2`), or None."""
    if Path(checkpoint).suffix.lower() != ".safetensors":
        return None
    with safe_open(str(checkpoint), framework="pt") as handle:
        metadata = handle.metadata() or {}
    text = metadata.get(TINY_METADATA_KEY) or metadata.get(TINY_SDXL_METADATA_KEY)
    return json.loads(text) if text else None


@contextmanager
def clip_skip_compatible(text_encoder: torch.nn.Module) -> Iterator[None]:
    """transformers 5 flattened CLIPTextModel, but diffusers' clip skip still reaches for
    `text_encoder.text_model.final_layer_norm`: alias the model as its own `text_model` for the
    call. Only for the call: while the alias exists, diffusers would also name LoRA targets the
    old way and match none. Kept outside the module registry, so no cycle appears."""
    if hasattr(text_encoder, "text_model"):
        yield
        return
    object.__setattr__(text_encoder, "text_model", text_encoder)
    try:
        yield
    finally:
        del text_encoder.__dict__["text_model"]


@dataclass
class LoadedCheckpoint:
    pipeline: StableDiffusionPipeline | StableDiffusionXLPipeline
    architecture: Architecture


def load_checkpoint(path: Path, *, device: torch.device, dtype: torch.dtype) -> LoadedCheckpoint:
    """Read a single-file SD 1.x checkpoint into a pipeline on `device` (one read of the file)."""
    state = read_state_dict(path)
    architecture = recognise(path, state)
    # float32 is diffusers' default; naming it makes it warn about casting
    load_dtype = None if dtype == torch.float32 else dtype
    with architecture.config_folder() as folder:
        unet = UNet2DConditionModel.from_single_file(
            state, config=folder, subfolder="unet", torch_dtype=load_dtype, local_files_only=True
        )
        vae = AutoencoderKL.from_single_file(
            state, config=folder, subfolder="vae", torch_dtype=load_dtype, local_files_only=True
        )
    if architecture.is_sdxl:
        text_encoder = load_text_encoder(
            state, architecture.configs["text_encoder"], dtype, prefix=ldm_layout.SDXL_TEXT_ENCODER_PREFIX
        )
        text_encoder_2 = load_text_encoder_2(state, architecture.configs["text_encoder_2"], dtype)
        del state
        pipeline = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=architecture.tokenizer(),
            tokenizer_2=architecture.tokenizer_2(),
            unet=unet,
            scheduler=EulerDiscreteScheduler.from_config(architecture.configs["scheduler"]),
            image_encoder=None,
            feature_extractor=None,
            add_watermarker=False,
        )
        if device.type != "cpu":
            pipeline.to(device)
        pipeline.set_progress_bar_config(disable=True)
        return LoadedCheckpoint(pipeline=pipeline, architecture=architecture)
    text_encoder = load_text_encoder(state, architecture.configs["text_encoder"], dtype)
    del state
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=architecture.tokenizer(),
        unet=unet,
        scheduler=PNDMScheduler.from_config(architecture.configs["scheduler"]),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    if device.type != "cpu":
        pipeline.to(device)
    pipeline.set_progress_bar_config(disable=True)
    return LoadedCheckpoint(pipeline=pipeline, architecture=architecture)


def load_text_encoder(
    state: Mapping[str, torch.Tensor],
    config: dict,
    dtype: torch.dtype,
    prefix: str = ldm_layout.TEXT_ENCODER_PREFIX,
) -> CLIPTextModel:
    """The CLIP text encoder under `cond_stage_model.transformer.` (SDXL:
    `conditioner.embedders.0.transformer.`), loaded strictly."""
    model = CLIPTextModel(CLIPTextConfig(**config))
    named = {key[len(prefix) :]: tensor for key, tensor in state.items() if key.startswith(prefix)}
    return _load_text_model(model, named, "text encoder", dtype)


def _load_text_model(model, named: Mapping[str, torch.Tensor], what: str, dtype: torch.dtype):
    """Load a CLIP text model strictly from weights named with or without the `text_model.`
    level (recent transformers flatten CLIPTextModel; checkpoints have it)."""
    wanted = model.state_dict().keys()
    weights = {}
    for name, tensor in named.items():
        if name not in wanted:
            name = name.removeprefix("text_model.")
        if name in wanted:
            weights[name] = tensor
    missing = sorted(set(wanted) - weights.keys())
    if missing:
        raise UnsupportedCheckpoint(f"the checkpoint's {what} lacks {len(missing)} weights, e.g. {missing[:3]}")
    model.load_state_dict(weights, strict=True)
    return model.to(dtype).eval()


def load_text_encoder_2(
    state: Mapping[str, torch.Tensor], config: dict, dtype: torch.dtype
) -> CLIPTextModelWithProjection:
    """SDXL's OpenCLIP bigG text tower under `conditioner.embedders.1.model.`, converted by
    diffusers' OpenCLIP mapping and loaded strictly."""
    model = CLIPTextModelWithProjection(CLIPTextConfig(**config))
    converted = convert_open_clip_checkpoint(model, state, prefix=ldm_layout.SDXL_TEXT_ENCODER_2_PREFIX)
    return _load_text_model(model, converted, "second text encoder", dtype)


def load_vae(
    path: Path, *, architecture: Architecture, device: torch.device, dtype: torch.dtype
) -> AutoencoderKL:
    """A standalone VAE file (`encoder.*`/`decoder.*`, or inside a whole checkpoint) for a model
    of `architecture`."""
    state = read_state_dict(path)
    if not any(key.startswith(("encoder.", "decoder.", ldm_layout.VAE_PREFIX)) for key in state):
        raise UnsupportedCheckpoint(f"{path.name} is not a VAE (no encoder or decoder weights)")
    with architecture.config_folder() as folder:
        vae = AutoencoderKL.from_single_file(
            state,
            config=folder,
            subfolder="vae",
            torch_dtype=None if dtype == torch.float32 else dtype,
            local_files_only=True,
        )
    return (vae.to(device) if device.type != "cpu" else vae).eval()
