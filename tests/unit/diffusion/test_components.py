"""A single-file checkpoint's parts load exactly as they were saved, with no network, and are
the very weights the inference engine generates with."""

from __future__ import annotations

import torch

from diffusion import testing
from diffusion.checkpoints import read_state_dict, recognise
from diffusion.components import load_components, load_vae
from services.inference.worker.engine.pipelines import load_checkpoint

CPU = torch.device("cpu")


def _same_weights(expected: torch.nn.Module, actual: torch.nn.Module) -> None:
    expected_state, actual_state = expected.state_dict(), actual.state_dict()
    assert expected_state.keys() == actual_state.keys()
    for key, tensor in expected_state.items():
        assert torch.equal(tensor, actual_state[key].reshape(tensor.shape)), key


def test_the_tiny_checkpoint_loads_exactly_as_it_was_made(checkpoint, no_network):
    components = load_components(checkpoint, device=CPU, dtype=torch.float32)
    unet, vae, text_encoder = testing.tiny_models(seed=0)
    assert components.architecture.name == "tiny-sd15" and not components.is_sdxl
    _same_weights(unet, components.unet)
    _same_weights(vae, components.vae)
    _same_weights(text_encoder, components.text_encoder)
    assert components.text_encoder_2 is None and components.tokenizer_2 is None
    assert components.scheduler_config["num_train_timesteps"] == 1000
    tokenizer = components.tokenizer
    assert tokenizer("a photo of a cat").input_ids[1:-1] == tokenizer.convert_tokens_to_ids(
        ["a</w>", "photo</w>", "of</w>", "a</w>", "cat</w>"]
    )


def test_the_tiny_sdxl_checkpoint_loads_exactly_as_it_was_made(sdxl_checkpoint, no_network):
    components = load_components(sdxl_checkpoint, device=CPU, dtype=torch.float32)
    unet, vae, text_encoder, text_encoder_2 = testing.tiny_sdxl_models(seed=0)
    assert components.architecture.name == "tiny-sdxl" and components.is_sdxl
    for made, read in (
        (unet, components.unet),
        (vae, components.vae),
        (text_encoder, components.text_encoder),
        (text_encoder_2, components.text_encoder_2),
    ):
        _same_weights(made, read)
    assert components.tokenizer_2.pad_token == "!" and components.tokenizer_2.pad_token_id == 0


def test_the_components_are_the_weights_of_the_engines_pipeline(checkpoint, sdxl_checkpoint):
    for path in (checkpoint, sdxl_checkpoint):
        components = load_components(path, device=CPU, dtype=torch.float32)
        pipeline = load_checkpoint(path, device=CPU, dtype=torch.float32).pipeline
        _same_weights(components.unet, pipeline.unet)
        _same_weights(components.vae, pipeline.vae)
        _same_weights(components.text_encoder, pipeline.text_encoder)
        if components.is_sdxl:
            _same_weights(components.text_encoder_2, pipeline.text_encoder_2)
        schedule = components.scheduler_config
        assert pipeline.scheduler.config["beta_schedule"] == schedule["beta_schedule"]


def test_a_standalone_vae_loads_for_the_checkpoints_architecture(checkpoint, vae):
    architecture = recognise(checkpoint, read_state_dict(checkpoint))
    loaded = load_vae(vae, architecture=architecture, device=CPU, dtype=torch.float32)
    other = load_components(checkpoint, device=CPU, dtype=torch.float32).vae
    mine, theirs = loaded.state_dict(), other.state_dict()
    assert mine.keys() == theirs.keys()
    assert any(not torch.equal(mine[key], theirs[key]) for key in mine)  # another VAE's weights
