"""The original LDM key layout of single-file checkpoints (and SDXL's SGM layout): the prefixes
the loader reads, and diffusers weights written back under them.

Users upload checkpoints in the layout of the original Stable Diffusion code (the one
AUTOMATIC1111 reads): `model.diffusion_model.*`, `first_stage_model.*`,
`cond_stage_model.transformer.*`. The random-weight models made for tests and benchmarks are
saved the same way so that they are read by the very code that reads a user's file.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_ENCODER_PREFIX = "cond_stage_model.transformer."
# SDXL (the SGM layout): CLIP ViT-L under `transformer.`, OpenCLIP ViT-bigG under `model.`
SDXL_TEXT_ENCODER_PREFIX = "conditioner.embedders.0.transformer."
SDXL_TEXT_ENCODER_2_PREFIX = "conditioner.embedders.1.model."

_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    # SDXL's size and pooled-text conditioning
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}
_VAE_ATTENTION = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}


def _resnet_part(rest: str) -> str:
    layer, _, tail = rest.partition(".")
    return f"{_UNET_RESNET[layer]}.{tail}"


def unet_to_ldm(state_dict: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """UNet2DConditionModel weights -> `openaimodel.UNetModel` keys (without the prefix).

    Each resolution level holds `layers_per_block` (resnet, attention) pairs and, but for the
    last level, a downsampler; they are numbered consecutively as `input_blocks.N`. On the way up
    each level has one more pair and its upsampler shares the last pair's block.
    """
    per_level = config["layers_per_block"] + 1
    levels_with_attention = {index for index, kind in enumerate(config["up_block_types"]) if "CrossAttn" in kind}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        out[_unet_key(key, per_level, levels_with_attention)] = tensor
    return out


def _unet_key(key: str, per_level: int, up_levels_with_attention: set[int]) -> str:
    for diffusers_name, ldm_name in _UNET_TOP.items():
        if key.startswith(diffusers_name + "."):
            return ldm_name + key[len(diffusers_name) :]
    if match := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        level, kind, layer, rest = int(match[1]), match[2], int(match[3]), match[4]
        block = 1 + level * per_level + layer
        return f"input_blocks.{block}.0.{_resnet_part(rest)}" if kind == "resnets" else f"input_blocks.{block}.1.{rest}"
    if match := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        block = 1 + int(match[1]) * per_level + per_level - 1
        return f"input_blocks.{block}.0.op.{match[2]}"
    if match := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"middle_block.{2 * int(match[1])}.{_resnet_part(match[2])}"
    if match := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{match[1]}"
    if match := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        level, kind, layer, rest = int(match[1]), match[2], int(match[3]), match[4]
        block = level * per_level + layer
        return (
            f"output_blocks.{block}.0.{_resnet_part(rest)}" if kind == "resnets" else f"output_blocks.{block}.1.{rest}"
        )
    if match := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        level = int(match[1])
        block = level * per_level + per_level - 1
        slot = 2 if level in up_levels_with_attention else 1
        return f"output_blocks.{block}.{slot}.conv.{match[2]}"
    raise KeyError(f"no LDM name for UNet weight {key!r}")


def vae_to_ldm(state_dict: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """AutoencoderKL weights -> the LDM autoencoder's keys (without the prefix). The decoder's
    levels are numbered from the lowest resolution in diffusers and from the highest in LDM; the
    mid-block attention is made of 1x1 convolutions there."""
    levels = len(config["up_block_types"])
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        new_key = _vae_key(key, levels)
        if ".mid.attn_1." in new_key and new_key.endswith(".weight") and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]
        out[new_key] = tensor
    return out


def _vae_key(key: str, levels: int) -> str:
    if match := re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(.+)", key):
        return f"{match[1]}.norm_out.{match[2]}"
    if match := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"encoder.down.{match[1]}.block.{match[2]}.{_vae_resnet_part(match[3])}"
    if match := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"encoder.down.{match[1]}.downsample.conv.{match[2]}"
    if match := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"decoder.up.{levels - 1 - int(match[1])}.block.{match[2]}.{_vae_resnet_part(match[3])}"
    if match := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        return f"decoder.up.{levels - 1 - int(match[1])}.upsample.conv.{match[2]}"
    if match := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"{match[1]}.mid.block_{int(match[2]) + 1}.{_vae_resnet_part(match[3])}"
    if match := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key):
        return f"{match[1]}.mid.attn_1.{_VAE_ATTENTION[match[2]]}.{match[3]}"
    if re.fullmatch(r"(encoder|decoder)\.(conv_in|conv_out)\..+|(post_)?quant_conv\..+", key):
        return key
    raise KeyError(f"no LDM name for VAE weight {key!r}")


def _vae_resnet_part(rest: str) -> str:
    return rest.replace("conv_shortcut", "nin_shortcut")


def text_encoder_to_ldm(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIPTextModel weights -> the keys under `cond_stage_model.transformer.` (without it).
    Recent transformers flatten CLIPTextModel (no `text_model.` level); checkpoints have it."""
    out = {}
    for key, tensor in state_dict.items():
        out[key if key.startswith("text_model.") else f"text_model.{key}"] = tensor
    return out


def sd_checkpoint(
    *,
    unet: Mapping[str, torch.Tensor],
    unet_config: Mapping,
    vae: Mapping[str, torch.Tensor],
    vae_config: Mapping,
    text_encoder: Mapping[str, torch.Tensor],
    context_length: int,
    text_encoder_prefix: str = TEXT_ENCODER_PREFIX,
) -> dict[str, torch.Tensor]:
    """The three models as one Stable Diffusion 1.x single-file state dict (SDXL puts the same
    first text encoder under another prefix)."""
    checkpoint: dict[str, torch.Tensor] = {}
    for key, tensor in unet_to_ldm(unet, unet_config).items():
        checkpoint[UNET_PREFIX + key] = tensor
    for key, tensor in vae_to_ldm(vae, vae_config).items():
        checkpoint[VAE_PREFIX + key] = tensor
    for key, tensor in text_encoder_to_ldm(text_encoder).items():
        checkpoint[text_encoder_prefix + key] = tensor
    # Real checkpoints carry this buffer (older transformers saved it); keep the files alike.
    checkpoint[text_encoder_prefix + "text_model.embeddings.position_ids"] = torch.arange(
        context_length, dtype=torch.int64
    )[None]
    return {key: tensor.contiguous() for key, tensor in checkpoint.items()}


def open_clip_to_ldm(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIPTextModelWithProjection weights -> OpenCLIP's text tower keys (SDXL's second encoder,
    under `conditioner.embedders.1.model.`): fused q/k/v `in_proj`, `resblocks`, `ln_final` and
    a transposed `text_projection` matrix."""
    flat = {key.removeprefix("text_model."): tensor for key, tensor in state_dict.items()}
    out: dict[str, torch.Tensor] = {
        "token_embedding.weight": flat["embeddings.token_embedding.weight"],
        "positional_embedding": flat["embeddings.position_embedding.weight"],
        "ln_final.weight": flat["final_layer_norm.weight"],
        "ln_final.bias": flat["final_layer_norm.bias"],
        "text_projection": flat["text_projection.weight"].T.contiguous(),
    }
    layers = sorted({int(m[1]) for key in flat if (m := re.match(r"encoder\.layers\.(\d+)\.", key))})
    for layer in layers:
        src, dst = f"encoder.layers.{layer}.", f"transformer.resblocks.{layer}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(
                [flat[f"{src}self_attn.{name}_proj.{kind}"] for name in ("q", "k", "v")]
            )
            out[f"{dst}attn.out_proj.{kind}"] = flat[f"{src}self_attn.out_proj.{kind}"]
            out[f"{dst}ln_1.{kind}"] = flat[f"{src}layer_norm1.{kind}"]
            out[f"{dst}ln_2.{kind}"] = flat[f"{src}layer_norm2.{kind}"]
            out[f"{dst}mlp.c_fc.{kind}"] = flat[f"{src}mlp.fc1.{kind}"]
            out[f"{dst}mlp.c_proj.{kind}"] = flat[f"{src}mlp.fc2.{kind}"]
    return out


def sdxl_checkpoint(
    *,
    unet: Mapping[str, torch.Tensor],
    unet_config: Mapping,
    vae: Mapping[str, torch.Tensor],
    vae_config: Mapping,
    text_encoder: Mapping[str, torch.Tensor],
    text_encoder_2: Mapping[str, torch.Tensor],
    context_length: int,
) -> dict[str, torch.Tensor]:
    """The four models as one SDXL single-file state dict (the SGM layout)."""
    checkpoint = sd_checkpoint(
        unet=unet,
        unet_config=unet_config,
        vae=vae,
        vae_config=vae_config,
        text_encoder=text_encoder,
        context_length=context_length,
        text_encoder_prefix=SDXL_TEXT_ENCODER_PREFIX,
    )
    for key, tensor in open_clip_to_ldm(text_encoder_2).items():
        checkpoint[SDXL_TEXT_ENCODER_2_PREFIX + key] = tensor.contiguous()
    return checkpoint


# ControlNet's own parts in the original (lllyasviel / AUTOMATIC1111 extension) layout: the hint
# encoder is one Sequential whose convolutions sit at the even indices, each zero convolution is
# a one-layer Sequential.
_CONTROLNET_TOP = {
    "controlnet_cond_embedding.conv_in": "input_hint_block.0",
    "controlnet_mid_block": "middle_block_out.0",
}
CONTROLNET_PREFIX = "control_model."  # ControlNet 1.0 files keep everything under it


def controlnet_to_ldm(state_dict: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """ControlNetModel weights -> the original ControlNet keys (without `control_model.`): the
    UNet encoder half under the UNet's names (`input_blocks.N`, `middle_block`, `time_embed`),
    the hint encoder as `input_hint_block.{0,2,..}` and the zero convolutions as
    `zero_convs.N.0` and `middle_block_out.0`."""
    hint_blocks = 2 * (len(config["conditioning_embedding_out_channels"]) - 1)
    return {controlnet_key(key, config, hint_blocks): tensor for key, tensor in state_dict.items()}


def controlnet_key(key: str, config: Mapping, hint_blocks: int | None = None) -> str:
    """The original name of one ControlNetModel weight."""
    if hint_blocks is None:
        hint_blocks = 2 * (len(config["conditioning_embedding_out_channels"]) - 1)
    for diffusers_name, ldm_name in _CONTROLNET_TOP.items():
        if key.startswith(diffusers_name + "."):
            return ldm_name + key[len(diffusers_name) :]
    if key.startswith("controlnet_cond_embedding.conv_out."):
        return f"input_hint_block.{2 * (hint_blocks + 1)}" + key[len("controlnet_cond_embedding.conv_out") :]
    if match := re.fullmatch(r"controlnet_cond_embedding\.blocks\.(\d+)\.(.+)", key):
        return f"input_hint_block.{2 * (int(match[1]) + 1)}.{match[2]}"
    if match := re.fullmatch(r"controlnet_down_blocks\.(\d+)\.(.+)", key):
        return f"zero_convs.{match[1]}.0.{match[2]}"
    return _unet_key(key, config["layers_per_block"] + 1, set())
