"""ControlNet files are read offline, in the original and diffusers' layouts, and only for the
family they were made for."""

from __future__ import annotations

import pytest
import torch
from diffusers import ControlNetModel, UNet2DConditionModel

from diffusion import layout, testing
from diffusion.checkpoints import UnsupportedCheckpoint, read_state_dict, recognise, sd15_architecture
from diffusion.configs import SD15_CONFIGS, SDXL_CONFIGS, read_config
from diffusion.controlnets import (
    IncompatibleControlNet,
    controlnet_config_for,
    load_controlnet,
    shipped_controlnet_config,
)

CPU = torch.device("cpu")


@pytest.mark.parametrize(("sdxl", "folder"), [(False, SD15_CONFIGS), (True, SDXL_CONFIGS)])
def test_shipped_configs_are_the_controlnets_of_the_shipped_unets(sdxl, folder):
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(read_config(folder / "unet" / "config.json"))
    derived = controlnet_config_for(unet.config)
    shipped = shipped_controlnet_config(sdxl)
    assert {key: shipped[key] for key in derived} == {
        key: list(value) if isinstance(value, tuple) else value for key, value in derived.items()
    }


def test_the_original_layout_has_the_extensions_names():
    config = shipped_controlnet_config(sdxl=False)
    with torch.device("meta"):
        model = ControlNetModel.from_config(config)
    names = set(layout.controlnet_to_ldm(model.state_dict(), config))
    assert len(names) == len(model.state_dict()) == 340
    # names as in control_v11p_sd15_canny.pth
    for name in (
        "input_hint_block.0.weight",
        "input_hint_block.14.bias",
        "zero_convs.0.0.weight",
        "zero_convs.11.0.bias",
        "middle_block_out.0.weight",
        "time_embed.0.weight",
        "input_blocks.0.0.weight",
        "input_blocks.1.1.proj_in.weight",
        "input_blocks.3.0.op.weight",
        "middle_block.1.transformer_blocks.0.attn2.to_k.weight",
        "middle_block.2.out_layers.3.weight",
    ):
        assert name in names


def _architecture(path):
    return recognise(path, read_state_dict(path))


def test_both_layouts_load_to_the_same_model(checkpoint, controlnet, model_dir):
    diffusers_file = testing.make_tiny_controlnet(
        checkpoint, model_dir / "cn-diffusers.safetensors", seed=5, diffusers_layout=True
    )
    architecture = _architecture(checkpoint)
    original = load_controlnet(controlnet, architecture=architecture, device=CPU, dtype=torch.float32)
    converted = load_controlnet(diffusers_file, architecture=architecture, device=CPU, dtype=torch.float32)
    for (name, tensor), (_, other) in zip(original.state_dict().items(), converted.state_dict().items(), strict=True):
        assert torch.equal(tensor, other), name
    assert original.controlnet_down_blocks[0].weight.abs().sum() > 0  # not zero convolutions
    assert load_controlnet(controlnet, architecture=architecture, device=CPU, dtype=torch.float16).dtype == (
        torch.float16
    )


def test_the_control_model_prefix_of_controlnet_1_0_files_is_read(checkpoint, controlnet, model_dir):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(controlnet), framework="pt") as handle:
        metadata = handle.metadata()
    prefixed = model_dir / "control_sd15_prefixed.safetensors"
    save_file(
        {f"control_model.{key}": value for key, value in read_state_dict(controlnet).items()}, str(prefixed), metadata
    )
    assert load_controlnet(prefixed, architecture=_architecture(checkpoint), device=CPU, dtype=torch.float32)


def test_a_controlnet_of_another_family_or_no_controlnet_is_refused(
    checkpoint, sdxl_checkpoint, controlnet, sdxl_controlnet, model_dir
):
    with pytest.raises(IncompatibleControlNet, match="SDXL ControlNet and cannot steer this SD 1.x checkpoint"):
        load_controlnet(sdxl_controlnet, architecture=_architecture(checkpoint), device=CPU, dtype=torch.float32)
    with pytest.raises(IncompatibleControlNet, match="SD 1.x ControlNet and cannot steer this SDXL checkpoint"):
        load_controlnet(controlnet, architecture=_architecture(sdxl_checkpoint), device=CPU, dtype=torch.float32)
    # the tiny ControlNet against the full-size SD 1.5 architecture: text of another width
    with pytest.raises(IncompatibleControlNet, match="attends to text of width 32; this checkpoint's UNet uses 768"):
        load_controlnet(controlnet, architecture=sd15_architecture(), device=CPU, dtype=torch.float32)
    with pytest.raises(UnsupportedCheckpoint, match="is not a ControlNet this platform reads"):
        load_controlnet(checkpoint, architecture=_architecture(checkpoint), device=CPU, dtype=torch.float32)
