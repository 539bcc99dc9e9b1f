"""A user's checkpoint file is read without running its code and recognised from its keys;
what is not an SD 1.x or SDXL base model is refused with a message that says what it is."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from diffusion import layout
from diffusion.checkpoints import UnsupportedCheckpoint, read_state_dict, recognise
from diffusion.components import load_components
from diffusion.tokenizers import TokenizerUnavailable
from shared.errors import Invalid, Unavailable

CPU = torch.device("cpu")


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
    with pytest.raises(UnsupportedCheckpoint, match=message) as caught:
        load_components(path, device=CPU, dtype=torch.float32)
    # the user's mistake, told apart from a library's ValueError
    assert isinstance(caught.value, Invalid) and not isinstance(caught.value, ValueError)
    assert message in caught.value.message


def test_a_file_that_is_no_checkpoint_at_all_is_an_invalid_one(tmp_path):
    path = tmp_path / "notes.safetensors"
    path.write_bytes(b"these are not tensors")
    with pytest.raises(UnsupportedCheckpoint, match="could not be read as a safetensors file"):
        read_state_dict(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):  # the caller's problem, not the user's
        read_state_dict(tmp_path / "nowhere.ckpt")


def test_a_full_size_sdxl_checkpoint_is_recognised_from_its_keys(tmp_path):
    def shaped(*shape):
        return torch.zeros(1).expand(*shape)  # the shape without the memory

    state = {
        layout.SDXL_TEXT_ENCODER_PREFIX + "text_model.embeddings.token_embedding.weight": shaped(49408, 768),
        layout.SDXL_TEXT_ENCODER_2_PREFIX + "token_embedding.weight": shaped(49408, 1280),
        layout.UNET_PREFIX + "input_blocks.0.0.weight": shaped(320, 4, 3, 3),
        layout.UNET_PREFIX + "label_emb.0.0.weight": shaped(1280, 2816),
    }
    architecture = recognise(tmp_path / "sdxl.ckpt", state)
    assert architecture.name == "sdxl" and architecture.is_sdxl
    assert architecture.configs["unet"]["addition_embed_type"] == "text_time"
    assert architecture.configs["text_encoder_2"]["architectures"] == ["CLIPTextModelWithProjection"]
    refiner = {**state, layout.UNET_PREFIX + "label_emb.0.0.weight": shaped(1536, 2560)}
    with pytest.raises(UnsupportedCheckpoint, match="refiner"):
        recognise(tmp_path / "refiner.ckpt", refiner)


def test_the_sd15_tokenizer_is_clips_without_the_hub(no_network):
    from diffusion.tokenizers import sd15_tokenizer

    tokenizer = sd15_tokenizer()
    assert len(tokenizer) == 49408
    assert tokenizer.model_max_length == 77
    # ids from OpenAI's CLIP tokenizer
    assert tokenizer("A person riding a motorcycle").input_ids == [49406, 320, 2533, 6765, 320, 10297, 49407]


def test_a_missing_clip_merges_file_is_a_deployment_problem(monkeypatch):
    from diffusion import tokenizers

    monkeypatch.setattr(tokenizers.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(TokenizerUnavailable, match="openai-clip") as caught:
        tokenizers.clip_merges_file()
    assert isinstance(caught.value, Unavailable) and not isinstance(caught.value, Invalid)
