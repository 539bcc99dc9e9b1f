"""The parts of a Stable Diffusion model, loaded from a single-file checkpoint without building a
pipeline: the inference engine assembles its diffusers pipelines from them, the trainer trains
on them directly.

The UNet and the VAE go through diffusers' single-file conversion with the configs of the
recognised architecture; the CLIP text encoders are loaded strictly from the same state dict
(the file is read once); the tokenizers are rebuilt locally.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from diffusion import layout
from diffusion.checkpoints import Architecture, UnsupportedCheckpoint, read_state_dict, recognise


@dataclass
class Components:
    """A checkpoint's models on one device, in evaluation mode, with their tokenizers and the
    noise schedule the model was trained with. SDXL has a second text encoder and tokenizer."""

    architecture: Architecture
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler_config: Mapping[str, Any]  # a diffusers scheduler config: betas, timesteps, prediction type
    text_encoder_2: CLIPTextModelWithProjection | None = None
    tokenizer_2: CLIPTokenizer | None = None

    @property
    def is_sdxl(self) -> bool:
        return self.architecture.is_sdxl


def load_components(path: Path, *, device: torch.device, dtype: torch.dtype) -> Components:
    """Read a single-file SD 1.x or SDXL checkpoint (one read of the file) into its components,
    in `dtype`, on `device`."""
    path = Path(path)
    device = torch.device(device)
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
            state, architecture.configs["text_encoder"], dtype, prefix=layout.SDXL_TEXT_ENCODER_PREFIX
        )
        text_encoder_2 = load_text_encoder_2(state, architecture.configs["text_encoder_2"], dtype)
        tokenizer_2 = architecture.tokenizer_2()
    else:
        text_encoder = load_text_encoder(state, architecture.configs["text_encoder"], dtype)
        text_encoder_2, tokenizer_2 = None, None
    del state
    components = Components(
        architecture=architecture,
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=architecture.tokenizer(),
        scheduler_config=dict(architecture.configs["scheduler"]),
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
    )
    if device.type != "cpu":
        for model in (components.unet, components.vae, components.text_encoder, components.text_encoder_2):
            if model is not None:
                model.to(device)
    return components


def load_vae(path: Path, *, architecture: Architecture, device: torch.device, dtype: torch.dtype) -> AutoencoderKL:
    """A standalone VAE file (`encoder.*`/`decoder.*`, or inside a whole checkpoint) for a model
    of `architecture`."""
    path = Path(path)
    device = torch.device(device)
    state = read_state_dict(path)
    if not any(key.startswith(("encoder.", "decoder.", layout.VAE_PREFIX)) for key in state):
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


def load_text_encoder(
    state: Mapping[str, torch.Tensor],
    config: dict,
    dtype: torch.dtype,
    prefix: str = layout.TEXT_ENCODER_PREFIX,
) -> CLIPTextModel:
    """The CLIP text encoder under `cond_stage_model.transformer.` (SDXL:
    `conditioner.embedders.0.transformer.`), loaded strictly."""
    model = CLIPTextModel(CLIPTextConfig(**config))
    named = {key[len(prefix) :]: tensor for key, tensor in state.items() if key.startswith(prefix)}
    return _load_text_model(model, named, "text encoder", dtype)


def load_text_encoder_2(
    state: Mapping[str, torch.Tensor], config: dict, dtype: torch.dtype
) -> CLIPTextModelWithProjection:
    """SDXL's OpenCLIP bigG text tower under `conditioner.embedders.1.model.`, converted by
    diffusers' OpenCLIP mapping and loaded strictly."""
    model = CLIPTextModelWithProjection(CLIPTextConfig(**config))
    converted = convert_open_clip_checkpoint(model, state, prefix=layout.SDXL_TEXT_ENCODER_2_PREFIX)
    return _load_text_model(model, converted, "second text encoder", dtype)


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
