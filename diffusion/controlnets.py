"""ControlNet checkpoints: recognising a single file's family and loading it offline.

ControlNets reach the workers as single files: AUTOMATIC1111's extension reads the original
layout (`input_hint_block.*`, `zero_convs.*`, `input_blocks.*`, sometimes under
`control_model.`; `.pth` or `.safetensors`), and SDXL ControlNets are mostly published in
diffusers' layout (`controlnet_cond_embedding.*`, `controlnet_down_blocks.*`). Both are read
with the configs shipped under `diffusion/configs/<family>/controlnet`; the tiny test ControlNet
carries its own config in its metadata, like the tiny checkpoints. A ControlNet must be of the
base model's family: an SDXL ControlNet cannot steer an SD 1.x UNet.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import ControlNetModel

from diffusion import layout
from diffusion.checkpoints import Architecture, UnsupportedCheckpoint, metadata_json, read_state_dict
from diffusion.configs import SD15_CONFIGS, SDXL_CONFIGS, read_config

# Where `diffusion.testing.make_tiny_controlnet` stores its config (safetensors header).
TINY_CONTROLNET_METADATA_KEY = "esd.tiny_controlnet"

# The UNet settings a ControlNet copies from the UNet it was made from (diffusers' `from_unet`).
_FROM_UNET = (
    "in_channels",
    "flip_sin_to_cos",
    "freq_shift",
    "down_block_types",
    "only_cross_attention",
    "block_out_channels",
    "layers_per_block",
    "downsample_padding",
    "mid_block_scale_factor",
    "act_fn",
    "norm_num_groups",
    "norm_eps",
    "cross_attention_dim",
    "transformer_layers_per_block",
    "encoder_hid_dim",
    "encoder_hid_dim_type",
    "attention_head_dim",
    "num_attention_heads",
    "use_linear_projection",
    "class_embed_type",
    "addition_embed_type",
    "addition_time_embed_dim",
    "num_class_embeds",
    "upcast_attention",
    "resnet_time_scale_shift",
    "projection_class_embeddings_input_dim",
    "mid_block_type",
)


class IncompatibleControlNet(UnsupportedCheckpoint):
    """The ControlNet is of another family than the checkpoint it should steer."""


@dataclass(frozen=True)
class ControlNetFamily:
    """What a ControlNet file is made for, read from its weights."""

    sdxl: bool
    cross_attention_dim: int | None  # None when no attention weight says it

    @property
    def name(self) -> str:
        return "SDXL" if self.sdxl else "SD 1.x"


def controlnet_config_for(unet_config: Mapping) -> dict:
    """The config of a ControlNet made for a UNet of `unet_config` (the one diffusers'
    `ControlNetModel.from_unet` builds), with the standard hint encoder."""
    config = {key: unet_config[key] for key in _FROM_UNET if key in unet_config}
    config.update(
        _class_name="ControlNetModel",
        conditioning_channels=3,
        conditioning_embedding_out_channels=[16, 32, 96, 256],
        controlnet_conditioning_channel_order="rgb",
        global_pool_conditions=False,
    )
    return config


def shipped_controlnet_config(sdxl: bool) -> dict:
    return read_config((SDXL_CONFIGS if sdxl else SD15_CONFIGS) / "controlnet" / "config.json")


def family_of(state: Mapping[str, torch.Tensor]) -> ControlNetFamily:
    """SD 1.x or SDXL, from the weights of a ControlNet in either layout (`state` without the
    `control_model.` prefix)."""
    sdxl = "label_emb.0.0.weight" in state or "add_embedding.linear_1.weight" in state
    width = next((tensor.shape[1] for key, tensor in state.items() if key.endswith("attn2.to_k.weight")), None)
    return ControlNetFamily(sdxl=sdxl, cross_attention_dim=width)


def load_controlnet(
    path: Path, *, architecture: Architecture, device: torch.device, dtype: torch.dtype
) -> ControlNetModel:
    """Read a single-file ControlNet for a checkpoint of `architecture`, strictly: a file that
    is no ControlNet, or one made for another family, is an UnsupportedCheckpoint whose message
    says so."""
    path = Path(path)
    state = read_state_dict(path)
    state = {key.removeprefix(layout.CONTROLNET_PREFIX): tensor for key, tensor in state.items()}
    original = "input_hint_block.0.weight" in state
    if not original and "controlnet_cond_embedding.conv_in.weight" not in state:
        raise UnsupportedCheckpoint(
            f"{path.name} is not a ControlNet this platform reads (no hint encoder: a T2I-Adapter, "
            "a control-LoRA or ControlLLLite file?)"
        )
    family = family_of(state)
    if family.sdxl != architecture.is_sdxl:
        base = "SDXL" if architecture.is_sdxl else "SD 1.x"
        raise IncompatibleControlNet(
            f"ControlNet {path.stem} is an {family.name} ControlNet and cannot steer this {base} checkpoint"
        )
    config = _tiny_config(path) or shipped_controlnet_config(family.sdxl)
    expected_width = architecture.configs["unet"].get("cross_attention_dim")
    if family.cross_attention_dim is not None and family.cross_attention_dim != expected_width:
        raise IncompatibleControlNet(
            f"ControlNet {path.stem} attends to text of width {family.cross_attention_dim}; "
            f"this checkpoint's UNet uses {expected_width}"
        )
    model = ControlNetModel.from_config(config)
    wanted = model.state_dict()
    if original:
        names = {layout.controlnet_key(key, config): key for key in wanted}
        weights = {names[key]: tensor for key, tensor in state.items() if key in names}
    else:
        weights = {key: tensor for key, tensor in state.items() if key in wanted}
    missing = sorted(set(wanted) - weights.keys())
    if missing:
        raise UnsupportedCheckpoint(
            f"{path.name} does not fit the {family.name} ControlNet architecture: "
            f"{len(missing)} weights missing, e.g. {missing[:3]}"
        )
    wrong = [key for key, tensor in weights.items() if tuple(tensor.shape) != tuple(wanted[key].shape)]
    if wrong:
        raise UnsupportedCheckpoint(
            f"{path.name} does not fit the {family.name} ControlNet architecture: "
            f"{len(wrong)} weights of another shape, e.g. {wrong[:3]}"
        )
    model.load_state_dict(weights, strict=True)
    # torch's own `to`: diffusers' would warn about casting a model it did not load itself
    return torch.nn.Module.to(model, device=torch.device(device), dtype=dtype).eval()


def _tiny_config(path: Path) -> dict | None:
    if path.suffix.lower() != ".safetensors":
        return None
    return metadata_json(path, TINY_CONTROLNET_METADATA_KEY)
