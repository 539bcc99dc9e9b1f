"""Trained LoRA weights written as kohya's sd-scripts write them, the layout AUTOMATIC1111,
ComfyUI, diffusers and this platform's inference engine all read:

    lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight
    lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight
    lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha
    lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight

with kohya's `ss_*` training metadata (and the `modelspec.*` keys) in the safetensors header.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import torch
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file

from services.training.worker.trainer.dataset import TrainingImage
from shared.contracts.kohya import TrainingConfig

ADAPTER = "default"
UNET_PREFIX = "lora_unet"
TEXT_ENCODER_PREFIX = "lora_te"
# SDXL: kohya numbers its two text encoders
SDXL_TEXT_ENCODER_PREFIXES = ("lora_te1", "lora_te2")
SAVE_DTYPES = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def lora_tensors(
    unet: torch.nn.Module,
    text_encoder: torch.nn.Module | None,
    *,
    alpha: float,
    dtype: torch.dtype,
    text_encoder_2: torch.nn.Module | None = None,
) -> dict[str, torch.Tensor]:
    """The LoRA layers peft added to the UNet (and the text encoders), under kohya's names:
    `lora_te_` for SD 1.x's text encoder, `lora_te1_`/`lora_te2_` for SDXL's two."""
    tensors: dict[str, torch.Tensor] = {}
    if text_encoder_2 is not None:
        models = (
            (UNET_PREFIX, unet),
            (SDXL_TEXT_ENCODER_PREFIXES[0], text_encoder),
            (SDXL_TEXT_ENCODER_PREFIXES[1], text_encoder_2),
        )
    else:
        models = ((UNET_PREFIX, unet), (TEXT_ENCODER_PREFIX, text_encoder))
    for prefix, model in models:
        if model is None:
            continue
        for module_name, module in model.named_modules():
            if not isinstance(module, LoraLayer) or ADAPTER not in module.lora_A:
                continue
            if prefix != UNET_PREFIX and not module_name.startswith("text_model."):
                # kohya names text encoder modules from CLIPTextModel's `text_model` level,
                # which recent transformers versions fold away
                module_name = f"text_model.{module_name}"
            name = f"{prefix}_{module_name.replace('.', '_')}"
            tensors[f"{name}.lora_down.weight"] = _saved(module.lora_A[ADAPTER].weight, dtype)
            tensors[f"{name}.lora_up.weight"] = _saved(module.lora_B[ADAPTER].weight, dtype)
            tensors[f"{name}.alpha"] = torch.tensor(alpha, dtype=dtype)
    return tensors


def _saved(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return weight.detach().to(device="cpu", dtype=dtype).contiguous()


def training_metadata(
    config: TrainingConfig,
    *,
    seed: int,
    images: list[TrainingImage],
    batches_per_epoch: int,
    epochs: int,
    steps: int,
    base_model: Path,
    optimizer: str,
    started_at: float,
    session_id: int,
) -> dict[str, str]:
    """The metadata every file of one training run shares (`ss_epoch`/`ss_steps` come per file)."""
    dataset_dirs: dict[str, dict[str, int]] = {}
    tag_frequency: dict[str, Counter] = {}
    for image in images:
        folder = image.folder or "."
        entry = dataset_dirs.setdefault(folder, {"n_repeats": image.repeats, "img_count": 0})
        entry["img_count"] += 1
        tags = tag_frequency.setdefault(folder, Counter())
        tags.update(tag.strip() for tag in image.caption.split(",") if tag.strip())
    width, height = config.resolution
    sdxl = config.fm_type == "sd_xl"
    return {
        "ss_session_id": str(session_id),
        "ss_training_started_at": str(started_at),
        "ss_output_name": config.output_name,
        "ss_sd_model_name": base_model.name,
        "ss_base_model_version": "sdxl_base_v1-0" if sdxl else "sd_v1",
        "ss_v2": "False",
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(config.network_dim),
        "ss_network_alpha": _number(config.alpha),
        "ss_network_train_unet_only": str(not config.train_text_encoder),
        "ss_learning_rate": str(config.learning_rate),
        "ss_unet_lr": str(config.unet_learning_rate),
        "ss_text_encoder_lr": str(config.text_encoder_learning_rate if config.train_text_encoder else None),
        "ss_lr_scheduler": config.lr_scheduler,
        "ss_lr_warmup_steps": str(config.lr_warmup_steps),
        "ss_optimizer": optimizer,
        "ss_max_grad_norm": str(config.max_grad_norm),
        "ss_num_train_images": str(sum(image.repeats for image in images)),
        "ss_num_reg_images": "0",
        "ss_num_batches_per_epoch": str(batches_per_epoch),
        "ss_num_epochs": str(epochs),
        "ss_max_train_steps": str(steps),
        "ss_batch_size_per_device": str(config.train_batch_size),
        "ss_total_batch_size": str(config.train_batch_size * config.gradient_accumulation_steps),
        "ss_gradient_accumulation_steps": str(config.gradient_accumulation_steps),
        "ss_gradient_checkpointing": str(config.gradient_checkpointing),
        "ss_mixed_precision": config.mixed_precision,
        "ss_full_fp16": "False",
        "ss_resolution": f"({width}, {height})",
        "ss_clip_skip": str(config.clip_skip),
        "ss_noise_offset": str(config.noise_offset) if config.noise_offset else "None",
        "ss_cache_latents": "True",
        "ss_caption_extension": config.caption_extension,
        "ss_seed": str(seed),
        "ss_dataset_dirs": json.dumps(dataset_dirs),
        "ss_tag_frequency": json.dumps({folder: dict(tags) for folder, tags in tag_frequency.items()}),
        "ss_training_comment": "trained by esd-platform",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-xl-v1-base/lora" if sdxl else "stable-diffusion-v1/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": config.output_name,
        "modelspec.resolution": f"{width}x{height}",
        "modelspec.date": datetime.fromtimestamp(started_at, UTC).strftime("%Y-%m-%dT%H:%M:%S"),
    }


def save_lora(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str], *, epoch: int, steps: int
) -> Path:
    header = {**metadata, "ss_epoch": str(epoch), "ss_steps": str(steps), "ss_training_finished_at": str(time.time())}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.part")
    save_file(tensors, str(partial), metadata=header)
    partial.replace(path)  # a reader never sees half a file
    return path


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)
