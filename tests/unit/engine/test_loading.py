"""Single-file checkpoints load through the same path as a user's file, with no network."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from services.inference.worker.engine import UnsupportedCheckpoint, tiny
from services.inference.worker.engine.loading import load_checkpoint, read_state_dict

CPU = torch.device("cpu")


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_tiny_checkpoint_is_a_small_single_file_in_the_original_layout(checkpoint):
    assert checkpoint.stat().st_size < 8 * 2**20
    with safe_open(str(checkpoint), framework="pt") as handle:
        keys = list(handle.keys())
        assert tiny.TINY_METADATA_KEY in handle.metadata()
    prefixes = {key.split(".")[0] for key in keys}
    assert prefixes == {"model", "first_stage_model", "cond_stage_model"}
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys
    assert "first_stage_model.decoder.up.0.block.0.conv1.weight" in keys
    assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in keys


def test_the_same_seed_writes_the_same_file(tmp_path, checkpoint):
    again = tiny.make_tiny_checkpoint(tmp_path / "again.safetensors", seed=0)
    other = tiny.make_tiny_checkpoint(tmp_path / "other.safetensors", seed=5)
    assert _digest(again) == _digest(checkpoint)
    assert _digest(other) != _digest(checkpoint)


def test_tiny_checkpoint_round_trips_through_the_single_file_loader(checkpoint, no_network):
    loaded = load_checkpoint(checkpoint, device=CPU, dtype=torch.float32)
    unet, vae, text_encoder = tiny.tiny_models(seed=0)
    pipeline = loaded.pipeline
    for original, reloaded in (
        (unet, pipeline.unet),
        (vae, pipeline.vae),
        (text_encoder, pipeline.text_encoder),
    ):
        expected, actual = original.state_dict(), reloaded.state_dict()
        assert expected.keys() == actual.keys()
        assert all(torch.equal(expected[key], actual[key]) for key in expected)
    assert pipeline.tokenizer("a photo of a cat").input_ids[1:-1] == pipeline.tokenizer.convert_tokens_to_ids(
        ["a</w>", "photo</w>", "of</w>", "a</w>", "cat</w>"]
    )


def test_pickled_checkpoints_are_read_without_running_code(tmp_path):
    weights = {"model.diffusion_model.out.2.bias": torch.ones(4)}
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": weights, "global_step": 10}, path)
    assert read_state_dict(path).keys() == weights.keys()
    torch.save({"state_dict": weights}, path, _use_new_zipfile_serialization=False)  # before torch 1.6
    assert read_state_dict(path).keys() == weights.keys()

    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    torch.save({"state_dict": weights, "evil": Payload()}, path)
    with pytest.raises(UnsupportedCheckpoint, match="could not be read"):
        read_state_dict(path)


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("conditioner.embedders.1.model.ln_final.weight", "SDXL"),
        ("cond_stage_model.model.ln_final.weight", "2.x"),
        ("some.other.weight", "not a Stable Diffusion checkpoint"),
    ],
)
def test_checkpoints_of_other_architectures_are_refused(tmp_path, key, message):
    path = tmp_path / "model.safetensors"
    save_file({key: torch.zeros(2)}, str(path))
    with pytest.raises(UnsupportedCheckpoint, match=message):
        load_checkpoint(path, device=CPU, dtype=torch.float32)


def test_the_sd15_tokenizer_is_clips_without_the_hub(no_network):
    from services.inference.worker.engine.tokenizer import sd15_tokenizer

    tokenizer = sd15_tokenizer()
    assert len(tokenizer) == 49408
    assert tokenizer.model_max_length == 77
    # ids from OpenAI's CLIP tokenizer
    assert tokenizer("A person riding a motorcycle").input_ids == [49406, 320, 2533, 6765, 320, 10297, 49407]


@pytest.mark.skipif(
    os.environ.get("ESD_FULL_SIZE_TESTS") != "1",
    reason="writes a 2 GB checkpoint: set ESD_FULL_SIZE_TESTS=1",
)
def test_a_full_size_sd15_checkpoint_loads_and_runs_offline(tmp_path, no_network):
    from services.inference.worker.engine import Engine, GenerationRequest, ModelFiles

    path = tiny.make_sd15_checkpoint(tmp_path / "sd15.safetensors", seed=0)
    request = GenerationRequest.from_payload(
        "txt2img", {"prompt": "a cat", "steps": 1, "width": 64, "height": 64}
    )
    result = Engine().generate(request, ModelFiles(checkpoint=path))
    assert len(result.images) == 1
