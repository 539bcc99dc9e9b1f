"""Single-file Stable Diffusion checkpoints: reading a user's file safely and recognising what
it holds.

A file is read once into a state dict (a pickled `.ckpt` with `weights_only`, so no code in a
user's file is ever run); its architecture is recognised from its keys (or, for the tiny test
models, from its metadata) and comes with the diffusers configs and the tokenizers it needs,
all shipped with the project, so that nothing is asked of the Hugging Face hub.
"""

from __future__ import annotations

import json
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from transformers import CLIPTokenizer

from diffusion import layout, tokenizers
from diffusion.configs import SD15_CONFIGS, SDXL_CONFIGS, read_config
from shared.errors import Invalid
from shared.untrusted import load_json

# an architecture's config nests a few levels; a user's file may claim anything
METADATA_MAX_DEPTH = 32

# Where `diffusion.testing.make_tiny_checkpoint` stores the tiny architecture (safetensors header).
TINY_METADATA_KEY = "esd.tiny_sd"
# `make_tiny_sdxl_checkpoint` stores its architecture under this key instead.
TINY_SDXL_METADATA_KEY = "esd.tiny_sdxl"
_CLIP_TOKENS = layout.TEXT_ENCODER_PREFIX + "text_model.embeddings.token_embedding.weight"


class UnsupportedCheckpoint(Invalid):
    """The user's file is not a checkpoint of an architecture the workers run, or cannot be
    read as one; the message says what it is."""


@dataclass(frozen=True)
class Architecture:
    """What a checkpoint needs besides its weights: diffusers configs and a tokenizer."""

    name: str  # "sd15", "tiny-sd15", "sdxl" or "tiny-sdxl"
    configs: Mapping[str, dict]  # unet, vae, text_encoder, scheduler (+ text_encoder_2 for SDXL)
    tokenizer_json: str | None = None  # the tiny models' own vocabulary

    @property
    def is_sdxl(self) -> bool:
        return self.name.endswith("sdxl")

    def tokenizer(self) -> CLIPTokenizer:
        if self.tokenizer_json is not None:
            return tokenizers.tokenizer_from_json(self.tokenizer_json)
        return tokenizers.sd15_tokenizer()

    def tokenizer_2(self) -> CLIPTokenizer:
        """SDXL's second tokenizer: the same CLIP BPE, padding with "!" (OpenCLIP's pad id 0)."""
        if self.tokenizer_json is not None:
            return tokenizers.tokenizer_from_json(self.tokenizer_json, pad_token="!")
        return tokenizers.sdxl_tokenizer_2()

    @contextmanager
    def config_folder(self) -> Iterator[str]:
        """A folder in diffusers' layout (`unet/config.json`, ...) for `from_single_file`."""
        if self.name == "sd15":
            yield str(SD15_CONFIGS)
            return
        if self.name == "sdxl":
            yield str(SDXL_CONFIGS)
            return
        with tempfile.TemporaryDirectory(prefix="esd-configs-") as folder:
            for component in ("unet", "vae"):
                (Path(folder) / component).mkdir()
                (Path(folder) / component / "config.json").write_text(json.dumps(self.configs[component]))
            yield folder


def sd15_architecture() -> Architecture:
    return Architecture(
        name="sd15",
        configs={
            "unet": read_config(SD15_CONFIGS / "unet" / "config.json"),
            "vae": read_config(SD15_CONFIGS / "vae" / "config.json"),
            "text_encoder": read_config(SD15_CONFIGS / "text_encoder" / "config.json"),
            "scheduler": read_config(SD15_CONFIGS / "scheduler" / "scheduler_config.json"),
        },
    )


def sdxl_architecture() -> Architecture:
    return Architecture(
        name="sdxl",
        configs={
            "unet": read_config(SDXL_CONFIGS / "unet" / "config.json"),
            "vae": read_config(SDXL_CONFIGS / "vae" / "config.json"),
            "text_encoder": read_config(SDXL_CONFIGS / "text_encoder" / "config.json"),
            "text_encoder_2": read_config(SDXL_CONFIGS / "text_encoder_2" / "config.json"),
            "scheduler": read_config(SDXL_CONFIGS / "scheduler" / "scheduler_config.json"),
        },
    )


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a `.safetensors` file, or of a pickled checkpoint read with
    `weights_only` (no code in a user's file is ever run). A file that is not there is the
    caller's problem (FileNotFoundError), a file that cannot be read an UnsupportedCheckpoint."""
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} does not exist")
    if path.suffix.lower() == ".safetensors":
        try:
            return load_file(str(path))
        except SafetensorError as error:
            raise UnsupportedCheckpoint(f"{path.name} could not be read as a safetensors file: {error}") from error
    try:
        # mmap spares a copy but needs the zip format of torch >= 1.6; older files are read whole
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as error:  # a corrupt file or a pickle with objects beyond tensors
        raise UnsupportedCheckpoint(f"{path.name} could not be read as a checkpoint: {error}") from error
    while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UnsupportedCheckpoint(f"{path.name} holds no state dict")
    return state


def recognise(path: Path, state: Mapping[str, torch.Tensor]) -> Architecture:
    """The architecture of the checkpoint at `path` whose tensors are `state`: SD 1.x or SDXL
    base (a tiny one when its metadata says so); anything else is an `UnsupportedCheckpoint`
    whose message says what the file is."""
    metadata = tiny_metadata(path)
    if metadata is not None:
        sdxl = "text_encoder_2" in metadata
        components = ("unet", "vae", "text_encoder", "scheduler") + (("text_encoder_2",) if sdxl else ())
        return Architecture(
            name="tiny-sdxl" if sdxl else "tiny-sd15",
            configs={key: metadata[key] for key in components},
            tokenizer_json=json.dumps(metadata["tokenizer"]),
        )
    if any(key.startswith("conditioner.embedders.") for key in state):
        return _recognise_sdxl(path, state)
    if any(key.startswith("cond_stage_model.model.") for key in state):
        raise UnsupportedCheckpoint(f"{path.name} is a Stable Diffusion 2.x checkpoint; only 1.x is supported so far")
    tokens = state.get(_CLIP_TOKENS)
    unet_in = state.get(layout.UNET_PREFIX + "input_blocks.0.0.weight")
    if tokens is None or unet_in is None:
        raise UnsupportedCheckpoint(f"{path.name} is not a Stable Diffusion checkpoint (no UNet or CLIP weights)")
    if tuple(tokens.shape) != (49408, 768):
        raise UnsupportedCheckpoint(f"{path.name} has a text encoder of shape {tuple(tokens.shape)}, not SD 1.x's")
    if unet_in.shape[1] != 4:
        raise UnsupportedCheckpoint(
            f"{path.name} is an inpainting or other {unet_in.shape[1]}-channel model; not supported"
        )
    return sd15_architecture()


def _recognise_sdxl(path: Path, state: Mapping[str, torch.Tensor]) -> Architecture:
    tokens = state.get(layout.SDXL_TEXT_ENCODER_PREFIX + "text_model.embeddings.token_embedding.weight")
    tokens_2 = state.get(layout.SDXL_TEXT_ENCODER_2_PREFIX + "token_embedding.weight")
    unet_in = state.get(layout.UNET_PREFIX + "input_blocks.0.0.weight")
    label_emb = state.get(layout.UNET_PREFIX + "label_emb.0.0.weight")
    if tokens is None or tokens_2 is None or unet_in is None or label_emb is None:
        raise UnsupportedCheckpoint(
            f"{path.name} looks like an SDXL checkpoint but lacks its UNet or one of its two text "
            "encoders (an SDXL refiner or a partial file?); only the SDXL base model is supported"
        )
    if tuple(tokens.shape) != (49408, 768) or tuple(tokens_2.shape) != (49408, 1280):
        raise UnsupportedCheckpoint(
            f"{path.name} has text encoders of shapes {tuple(tokens.shape)} and {tuple(tokens_2.shape)}, not SDXL's"
        )
    if unet_in.shape[1] != 4:
        raise UnsupportedCheckpoint(
            f"{path.name} is an inpainting or other {unet_in.shape[1]}-channel model; not supported"
        )
    if label_emb.shape[1] != 2816:
        raise UnsupportedCheckpoint(f"{path.name} is not an SDXL base model (an SDXL refiner?)")
    return sdxl_architecture()


def tiny_metadata(checkpoint: str | Path) -> dict | None:
    """The tiny architecture stored in a checkpoint by `make_tiny_checkpoint` (or
    `make_tiny_sdxl_checkpoint`: its metadata has a `text_encoder_2`), or None."""
    if Path(checkpoint).suffix.lower() != ".safetensors":
        return None
    return metadata_json(Path(checkpoint), TINY_METADATA_KEY, TINY_SDXL_METADATA_KEY)


def metadata_json(path: Path, *keys: str) -> dict | None:
    """The JSON a safetensors file's metadata holds under the first of `keys` it has, or None.
    The file is a user's: a document nested thousands deep is refused, not a RecursionError."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    text = next((metadata[key] for key in keys if metadata.get(key)), None)
    if not text:
        return None
    return load_json(text, what=f"{path.name}'s metadata {keys[0]}", max_depth=METADATA_MAX_DEPTH)
