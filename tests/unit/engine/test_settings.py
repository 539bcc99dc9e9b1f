"""`override_settings` that A1111 API users send: the checkpoint, the VAE, clip skip and ENSD."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from services.inference.worker.engine import Engine, GenerationRequest, InvalidPayload, ModelFiles

SMALL = {"prompt": "a photo of a cat", "steps": 3, "width": 64, "height": 64, "seed": 12}


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine()


def _generate(engine, models, **payload):
    return engine.generate(GenerationRequest.from_payload("txt2img", {**SMALL, **payload}), models)


def _text(result) -> str:
    return Image.open(io.BytesIO(result.images[0])).text["parameters"]


def test_sd_model_checkpoint_picks_one_of_the_jobs_checkpoints(engine, checkpoint, other_checkpoint):
    models = ModelFiles(
        checkpoint=checkpoint,
        checkpoints={checkpoint.name: checkpoint, other_checkpoint.name: other_checkpoint},
    )
    first = _generate(engine, models)
    chosen = _generate(engine, models, override_settings={"sd_model_checkpoint": "tiny-b.safetensors [0a1b2c3d4e]"})
    by_stem = _generate(engine, models, override_settings={"sd_model_checkpoint": "tiny-b"})
    direct = _generate(engine, ModelFiles(checkpoint=other_checkpoint))
    assert chosen.images == by_stem.images == direct.images != first.images
    assert "Model: tiny-b" in _text(chosen) and chosen.info["sd_model_name"] == "tiny-b"
    with pytest.raises(InvalidPayload, match=r"sd_model_checkpoint: 'v1-5' is not among .*tiny-a.safetensors"):
        _generate(engine, models, override_settings={"sd_model_checkpoint": "v1-5 [6ce0161689]"})


def test_sd_vae_must_name_the_jobs_vae(engine, checkpoint, vae):
    models = ModelFiles(checkpoint=checkpoint, vae=vae)
    named = _generate(engine, models, override_settings={"sd_vae": f"{vae.stem} [abc123]"})
    assert f"VAE: {vae.name}" in _text(named)
    with pytest.raises(InvalidPayload, match=r"sd_vae: VAE 'pastel.safetensors' is not the job's VAE"):
        _generate(engine, models, override_settings={"sd_vae": "pastel.safetensors"})


def test_ensd_changes_the_noise_of_ancestral_samplers_only(engine, checkpoint):
    models = ModelFiles(checkpoint=checkpoint)
    ensd = {"eta_noise_seed_delta": 31337}
    ancestral = _generate(engine, models, sampler_name="Euler a")
    shifted = _generate(engine, models, sampler_name="Euler a", override_settings=ensd)
    again = _generate(engine, models, sampler_name="Euler a", override_settings=ensd)
    assert shifted.images != ancestral.images and shifted.images == again.images
    assert "ENSD: 31337" in _text(shifted)
    sde = _generate(engine, models, sampler_name="DPM++ 2M SDE")
    assert _generate(engine, models, sampler_name="DPM++ 2M SDE", override_settings=ensd).images != sde.images
    plain = _generate(engine, models, sampler_name="Euler")
    unaffected = _generate(engine, models, sampler_name="Euler", override_settings=ensd)
    # the same pixels (the PNGs differ by their text only)
    pixels = [Image.open(io.BytesIO(result.images[0])).tobytes() for result in (plain, unaffected)]
    assert pixels[0] == pixels[1] and "ENSD" not in _text(unaffected)


def test_a_bad_ensd_is_refused():
    with pytest.raises(InvalidPayload, match="eta_noise_seed_delta: not a number"):
        GenerationRequest.from_payload("txt2img", {"override_settings": {"eta_noise_seed_delta": "lots"}})
