"""SDXL single-file checkpoints: recognised from their SGM keys, loaded without the hub, and
generated from by the engine (txt2img, img2img, LoRA tags) on a tiny SDXL-shaped model."""

from __future__ import annotations

import base64
import io

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image, ImageChops

from services.inference.worker.engine import Engine, GenerationRequest, ModelFiles, tiny
from services.inference.worker.engine.loading import load_checkpoint

pytestmark = [
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:__array_wrap__ must accept:DeprecationWarning"),
]

CPU = torch.device("cpu")
SMALL = {"prompt": "a photo of a cat", "negative_prompt": "blurry", "steps": 3, "width": 64, "height": 64}


@pytest.fixture(scope="module")
def sdxl_checkpoint(model_dir):
    return tiny.make_tiny_sdxl_checkpoint(model_dir / "tiny-sdxl.safetensors", seed=0)


@pytest.fixture(scope="module")
def sdxl_lora(model_dir, sdxl_checkpoint):
    return tiny.make_tiny_lora(sdxl_checkpoint, model_dir / "sdxl-style.safetensors", seed=2)


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(device="cpu")


def _png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image.convert("RGB")


def _difference(first: bytes, second: bytes) -> int:
    return max(high for _, high in ImageChops.difference(_png(first), _png(second)).getextrema())


def test_the_tiny_sdxl_file_loads_exactly_in_the_sgm_layout(no_network, sdxl_checkpoint):
    from safetensors import safe_open

    with safe_open(str(sdxl_checkpoint), framework="pt") as handle:
        keys = set(handle.keys())
    assert "model.diffusion_model.label_emb.0.0.weight" in keys
    assert "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight" in keys
    assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in keys
    assert "conditioner.embedders.1.model.text_projection" in keys
    loaded = load_checkpoint(sdxl_checkpoint, device=CPU, dtype=torch.float32)
    assert loaded.architecture.name == "tiny-sdxl"
    pipe = loaded.pipeline
    assert isinstance(pipe, StableDiffusionXLPipeline)
    unet, vae, text_encoder, text_encoder_2 = tiny.tiny_sdxl_models(0)
    pairs = [(unet, pipe.unet), (vae, pipe.vae), (text_encoder, pipe.text_encoder)]
    for made, read in [*pairs, (text_encoder_2, pipe.text_encoder_2)]:
        expected, actual = made.state_dict(), read.state_dict()
        assert expected.keys() == actual.keys()
        for key, tensor in expected.items():
            assert torch.equal(tensor, actual[key].reshape(tensor.shape)), key
    assert pipe.tokenizer_2.pad_token == "!" and pipe.tokenizer_2.pad_token_id == 0


def test_sdxl_txt2img_img2img_and_lora(no_network, engine, sdxl_checkpoint, sdxl_lora):
    models = ModelFiles(checkpoint=sdxl_checkpoint, loras={"style": sdxl_lora})
    plain = engine.generate(GenerationRequest.from_payload("txt2img", {**SMALL, "seed": 3}), models)
    again = engine.generate(GenerationRequest.from_payload("txt2img", {**SMALL, "seed": 3}), models)
    assert _png(plain.images[0]).size == (64, 64)
    assert _difference(plain.images[0], again.images[0]) == 0
    styled = engine.generate(
        GenerationRequest.from_payload(
            "txt2img", {**SMALL, "seed": 3, "prompt": "a photo of a cat <lora:style:1>"}
        ),
        models,
    )
    assert _difference(plain.images[0], styled.images[0]) > 0
    after = engine.generate(GenerationRequest.from_payload("txt2img", {**SMALL, "seed": 3}), models)
    assert _difference(plain.images[0], after.images[0]) == 0  # the LoRA was for that job only
    init = base64.b64encode(plain.images[0]).decode()
    changed = engine.generate(
        GenerationRequest.from_payload(
            "img2img", {**SMALL, "seed": 4, "init_images": [init], "denoising_strength": 0.5}
        ),
        models,
    )
    assert _png(changed.images[0]).size == (64, 64)
    assert engine.loads == 1


def test_sdxl_samplers_run(engine, sdxl_checkpoint):
    models = ModelFiles(checkpoint=sdxl_checkpoint)
    for sampler in ("DPM++ 2M", "DDIM"):
        result = engine.generate(
            GenerationRequest.from_payload("txt2img", {**SMALL, "seed": 1, "sampler_name": sampler}), models
        )
        assert _png(result.images[0]).size == (64, 64)


def test_a_full_size_sdxl_checkpoint_is_recognised_from_its_keys(tmp_path):
    from services.inference.worker.engine import ldm_layout
    from services.inference.worker.engine.loading import UnsupportedCheckpoint, recognise

    def shaped(*shape):
        return torch.zeros(1).expand(*shape)  # the shape without the memory

    state = {
        ldm_layout.SDXL_TEXT_ENCODER_PREFIX + "text_model.embeddings.token_embedding.weight": shaped(49408, 768),
        ldm_layout.SDXL_TEXT_ENCODER_2_PREFIX + "token_embedding.weight": shaped(49408, 1280),
        ldm_layout.UNET_PREFIX + "input_blocks.0.0.weight": shaped(320, 4, 3, 3),
        ldm_layout.UNET_PREFIX + "label_emb.0.0.weight": shaped(1280, 2816),
    }
    architecture = recognise(tmp_path / "sdxl.ckpt", state)
    assert architecture.name == "sdxl" and architecture.is_sdxl
    assert architecture.configs["unet"]["addition_embed_type"] == "text_time"
    assert architecture.configs["text_encoder_2"]["architectures"] == ["CLIPTextModelWithProjection"]
    refiner = {**state, ldm_layout.UNET_PREFIX + "label_emb.0.0.weight": shaped(1536, 2560)}
    with pytest.raises(UnsupportedCheckpoint, match="refiner"):
        recognise(tmp_path / "refiner.ckpt", refiner)
