"""CLIP tokenizers built on this machine, never fetched from the Hugging Face hub.

A Stable Diffusion 1.x checkpoint carries no tokenizer. The full-size one is rebuilt from CLIP's
byte-pair merges, which the `openai-clip` package ships as a data file; the tiny test models carry
their own small vocabulary in their safetensors metadata.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from functools import cache
from pathlib import Path

from transformers import CLIPTokenizer

from shared.errors import Unavailable

START = "<|startoftext|>"
END = "<|endoftext|>"
CLIP_CONTEXT_LENGTH = 77
# The first line of CLIP's merges file is a version header; the vocabulary has 49408 entries:
# 512 byte symbols, 48894 merges and the two special tokens.
CLIP_MERGES = 49408 - 512 - 2
_MERGES_PACKAGE = "clip"
_MERGES_FILE = "bpe_simple_vocab_16e6.txt.gz"


class TokenizerUnavailable(Unavailable):
    """The CLIP merges file is not installed, so full-size checkpoints cannot be tokenized: a
    problem of the worker's installation, not of the user's request."""


def byte_symbols() -> list[str]:
    """The 256 printable characters byte-level BPE uses for the bytes 0..255, in CLIP's order:
    printable Latin-1 bytes stand for themselves, the others are moved to code points from 256."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    symbols = {byte: chr(byte) for byte in printable}
    shifted = 0
    for byte in range(256):
        if byte not in symbols:
            symbols[byte] = chr(256 + shifted)
            shifted += 1
    return [symbols[byte] for byte in printable] + [symbols[byte] for byte in range(256) if byte not in printable]


def vocabulary_from_merges(merges: list[tuple[str, str]]) -> dict[str, int]:
    """CLIP's vocabulary is determined by its merges: bytes, bytes ending a word, one token per
    merge in rank order, then the two special tokens."""
    symbols = byte_symbols()
    tokens = symbols + [symbol + "</w>" for symbol in symbols]
    tokens += ["".join(pair) for pair in merges]
    tokens += [START, END]
    return {token: index for index, token in enumerate(tokens)}


def build_clip_tokenizer(
    merges: list[tuple[str, str]], model_max_length: int = CLIP_CONTEXT_LENGTH, pad_token: str = END
) -> CLIPTokenizer:
    # With transformers 5 the file-path form (`vocab_file=`) silently yields an empty tokenizer;
    # the in-memory form is the one that works.
    return CLIPTokenizer(
        vocab=vocabulary_from_merges(merges),
        merges=[tuple(pair) for pair in merges],
        model_max_length=model_max_length,
        pad_token=pad_token,
    )


def clip_merges_file() -> Path:
    # Located without importing the package: its __init__ imports torchvision, which we neither
    # need nor install.
    spec = importlib.util.find_spec(_MERGES_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / _MERGES_FILE
        if candidate.is_file():
            return candidate
    raise TokenizerUnavailable(
        "the CLIP tokenizer for full-size Stable Diffusion checkpoints needs the BPE merges file "
        f"{_MERGES_FILE!r} from the `openai-clip` package; install the worker's `gpu` extra"
    )


@cache
def sd15_tokenizer() -> CLIPTokenizer:
    """The tokenizer of Stable Diffusion 1.x (OpenAI CLIP ViT-L/14), 49408 tokens, 77 positions."""
    return _full_clip_tokenizer(END)


@cache
def sdxl_tokenizer_2() -> CLIPTokenizer:
    """SDXL's second tokenizer (OpenCLIP bigG): the same BPE, padded with "!" (id 0)."""
    return _full_clip_tokenizer("!")


def _full_clip_tokenizer(pad_token: str) -> CLIPTokenizer:
    lines = gzip.decompress(clip_merges_file().read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 1 + CLIP_MERGES]]
    tokenizer = build_clip_tokenizer(merges, pad_token=pad_token)  # type: ignore[arg-type]
    if len(tokenizer) != 49408:
        raise TokenizerUnavailable(f"the CLIP merges file gave {len(tokenizer)} tokens, not 49408")
    return tokenizer


def tokenizer_from_json(text: str, pad_token: str = END) -> CLIPTokenizer:
    """A tiny model's tokenizer, as `diffusion.testing` stores it in the file's metadata."""
    data = json.loads(text)
    return build_clip_tokenizer(
        [tuple(pair) for pair in data["merges"]],
        data.get("model_max_length", CLIP_CONTEXT_LENGTH),
        pad_token=pad_token,
    )
