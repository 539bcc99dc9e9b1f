"""The tiny models are small real files in the original single-file layouts, the same for the
same seed, and can be written from the command line."""

from __future__ import annotations

import hashlib
from pathlib import Path

from safetensors import safe_open

from diffusion import testing


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_tiny_checkpoint_is_a_small_single_file_in_the_original_layout(checkpoint):
    assert checkpoint.stat().st_size < 8 * 2**20
    with safe_open(str(checkpoint), framework="pt") as handle:
        keys = list(handle.keys())
        assert testing.TINY_METADATA_KEY in handle.metadata()
    prefixes = {key.split(".")[0] for key in keys}
    assert prefixes == {"model", "first_stage_model", "cond_stage_model"}
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys
    assert "first_stage_model.decoder.up.0.block.0.conv1.weight" in keys
    assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in keys


def test_the_same_seed_writes_the_same_file(tmp_path, checkpoint):
    again = testing.make_tiny_checkpoint(tmp_path / "again.safetensors", seed=0)
    other = testing.make_tiny_checkpoint(tmp_path / "other.safetensors", seed=5)
    assert _digest(again) == _digest(checkpoint)
    assert _digest(other) != _digest(checkpoint)


def test_the_tiny_sdxl_file_is_in_the_sgm_layout(sdxl_checkpoint):
    with safe_open(str(sdxl_checkpoint), framework="pt") as handle:
        keys = set(handle.keys())
        assert testing.TINY_SDXL_METADATA_KEY in handle.metadata()
    assert "model.diffusion_model.label_emb.0.0.weight" in keys
    assert "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight" in keys
    assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in keys
    assert "conditioner.embedders.1.model.text_projection" in keys


def test_the_command_line_writes_the_tiny_model(tmp_path, checkpoint, capsys):
    testing.main(["--out", str(tmp_path / "cli.safetensors")])
    assert _digest(tmp_path / "cli.safetensors") == _digest(checkpoint)
    assert "cli.safetensors" in capsys.readouterr().out
