"""Prompts as AUTOMATIC1111 reads them: attention weights, BREAK, and no 75-token limit.

`(word)` multiplies the attention to `word` by 1.1, `[word]` divides it by 1.1,
`(word:1.3)` sets the factor; brackets nest and multiply; `\\(` `\\)` `\\[` `\\]` are
literal. `BREAK` ends the current chunk. The text is tokenized piece by piece and cut into
chunks of 75 tokens (a cut near a comma moves the words after the comma to the next chunk,
as A1111's "word wrap" does), each padded to CLIP's 77 with its start and end tokens and
encoded on its own; the chunks' hidden states are concatenated along the sequence. Each
token's hidden state is multiplied by its weight and the chunk rescaled so that its mean is
the unweighted mean (A1111's default "Original" emphasis). The negative prompt gets the same
treatment, and the shorter of the two is padded with encodings of the empty prompt so that
both have as many chunks (A1111's "pad prompt/negative prompt" option; diffusers needs one
shape for both).

SD 1.x: one CLIP encoder, with clip skip (hidden state of the n-th layer from the end, then
the final layer norm). SDXL: both encoders' penultimate hidden states, concatenated per chunk,
and the pooled embedding of the second encoder taken from the first chunk, unweighted; A1111
ignores clip skip for SDXL, and so does this.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import CLIPTokenizer

from services.inference.worker.engine.request import InvalidPayload

CHUNK_TOKENS = 75  # words per chunk; CLIP's 77 positions less the start and end tokens
ROUND_BRACKET = 1.1
SQUARE_BRACKET = 1 / 1.1
WORD_WRAP = 20  # A1111's default "prompt word wrap length limit", in tokens
BREAK = ("BREAK", -1.0)  # how the parse marks a BREAK, as A1111's does

_ATTENTION = re.compile(
    r"""
    \\\(|\\\)|\\\[|\\]|\\\\|\\|   # escapes, then a lone backslash
    \(|\[|
    :\s*([+-]?[.\d]+)\s*\)|      # the end of (text:weight)
    \)|]|
    [^\\()\[\]:]+|
    :
    """,
    re.X,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """The prompt as (text, weight) pieces, neighbours of equal weight merged; a BREAK is
    `("BREAK", -1.0)`. Unclosed brackets apply to the end of the text, unmatched closing ones
    are literal text, as in A1111. Unlike A1111, a BREAK inside brackets still breaks (A1111
    multiplies its marker by the brackets' weight and then reads it as the word "BREAK")."""
    pieces: list[list] = []  # [text, weight, is_break]
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            if not piece[2]:
                piece[1] *= factor

    for match in _ATTENTION.finditer(text):
        token, weight = match[0], match[1]
        if token.startswith("\\"):
            pieces.append([token[1:], 1.0, False])
        elif token == "(":
            round_open.append(len(pieces))
        elif token == "[":
            square_open.append(len(pieces))
        elif weight is not None and round_open:
            multiply(round_open.pop(), _weight(weight, token))
        elif token == ")" and round_open:
            multiply(round_open.pop(), ROUND_BRACKET)
        elif token == "]" and square_open:
            multiply(square_open.pop(), SQUARE_BRACKET)
        else:
            for index, part in enumerate(_BREAK.split(token)):
                if index:
                    pieces.append([*BREAK, True])
                pieces.append([part, 1.0, False])
    for start in round_open:
        multiply(start, ROUND_BRACKET)
    for start in square_open:
        multiply(start, SQUARE_BRACKET)
    if not pieces:
        pieces = [["", 1.0, False]]
    merged: list[list] = [pieces[0]]
    for piece in pieces[1:]:
        last = merged[-1]
        if not piece[2] and not last[2] and piece[1] == last[1]:
            last[0] += piece[0]
        else:
            merged.append(piece)
    return [(text_, weight_) for text_, weight_, _ in merged]


def _weight(number: str, token: str) -> float:
    try:
        return float(number)
    except ValueError:
        raise InvalidPayload(f"prompt: the weight in {token.strip()!r} is not a number") from None


@dataclass
class PromptChunk:
    """77 token ids (start, 75 words or padding, end) and a weight per token."""

    tokens: list[int]
    weights: list[float]


def prompt_chunks(
    text: str,
    tokenizer: CLIPTokenizer,
    *,
    convert: Callable[[str], str] | None = None,
    embeddings: dict[int, int] | None = None,
    word_wrap: int = WORD_WRAP,
) -> tuple[list[PromptChunk], int]:
    """The chunks of `text` and its length in tokens. `convert` rewrites each piece before
    tokenizing (diffusers expands a multi-vector embedding's name into its tokens there);
    `embeddings` maps the first token id of such an embedding to its number of vectors, which
    are never split across two chunks."""
    parsed = parse_prompt_attention(text)
    pieces = [piece if convert is None or (piece, weight) == BREAK else convert(piece) for piece, weight in parsed]
    ids = tokenizer(pieces, truncation=False, add_special_tokens=False, verbose=False)["input_ids"]
    start, end = tokenizer.bos_token_id, tokenizer.eos_token_id
    comma = tokenizer.get_vocab().get(",</w>")
    embeddings = embeddings or {}
    chunks: list[PromptChunk] = []
    tokens: list[int] = []
    weights: list[float] = []
    last_comma = -1
    count = 0

    def next_chunk(is_last: bool = False) -> None:
        nonlocal tokens, weights, last_comma, count
        count += len(tokens) if is_last else CHUNK_TOKENS
        padding = CHUNK_TOKENS - len(tokens)
        chunks.append(
            PromptChunk(
                tokens=[start, *tokens, *[end] * padding, end],
                weights=[1.0, *weights, *[1.0] * padding, 1.0],
            )
        )
        tokens, weights, last_comma = [], [], -1

    for piece_ids, (piece, weight) in zip(ids, parsed, strict=True):
        if (piece, weight) == BREAK:
            next_chunk()
            continue
        position = 0
        while position < len(piece_ids):
            token = piece_ids[position]
            if token == comma:
                last_comma = len(tokens)
            elif (
                word_wrap and len(tokens) == CHUNK_TOKENS and last_comma != -1 and len(tokens) - last_comma <= word_wrap
            ):
                # the words after the last comma move to the next chunk together
                cut = last_comma + 1
                moved_tokens, moved_weights = tokens[cut:], weights[cut:]
                tokens, weights = tokens[:cut], weights[:cut]
                next_chunk()
                tokens, weights = moved_tokens, moved_weights
            if len(tokens) == CHUNK_TOKENS:
                next_chunk()
            vectors = embeddings.get(token, 1)
            if vectors > 1:
                if len(tokens) + vectors > CHUNK_TOKENS:
                    next_chunk()
                tokens += piece_ids[position : position + vectors]
                weights += [weight] * len(piece_ids[position : position + vectors])
                position += vectors
                continue
            tokens.append(token)
            weights.append(weight)
            position += 1
    if tokens or not chunks:
        next_chunk(is_last=True)
    return chunks, count


@dataclass
class PromptEmbeddings:
    """What the diffusers pipelines take instead of the prompt texts."""

    prompt_embeds: torch.Tensor  # (1, 77 * chunks, width)
    negative_prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor | None = None  # SDXL
    negative_pooled_prompt_embeds: torch.Tensor | None = None
    padded: bool = False  # one of the two was padded to the other's number of chunks

    def arguments(self) -> dict[str, torch.Tensor]:
        arguments = {"prompt_embeds": self.prompt_embeds, "negative_prompt_embeds": self.negative_prompt_embeds}
        if self.pooled_prompt_embeds is not None:
            arguments.update(
                pooled_prompt_embeds=self.pooled_prompt_embeds,
                negative_pooled_prompt_embeds=self.negative_pooled_prompt_embeds,
            )
        return arguments


def encode_prompts(
    pipe,
    prompt: str,
    negative_prompt: str,
    *,
    clip_skip: int = 1,
    embeddings: dict[str, int] | None = None,
) -> PromptEmbeddings:
    """Both prompts of a job, encoded by `pipe`'s text encoder(s) as A1111 encodes them.
    `embeddings` are the job's textual-inversion words and their vector counts."""
    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    encoders = [(pipe.tokenizer, pipe.text_encoder)]
    if sdxl:
        encoders.append((pipe.tokenizer_2, pipe.text_encoder_2))
    convert = (lambda text: pipe.maybe_convert_prompt(text, pipe.tokenizer)) if embeddings else None
    first_ids = {
        pipe.tokenizer.convert_tokens_to_ids(name): vectors
        for name, vectors in (embeddings or {}).items()
        if vectors > 1
    }

    hidden: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # per encoder: prompt, negative, empty
    pooled: torch.Tensor | None = None
    negative_pooled: torch.Tensor | None = None
    counts: tuple[int, int] = (0, 0)
    for index, (tokenizer, encoder) in enumerate(encoders):
        # the first tokenizer knows the embeddings' tokens; the second encoder has none
        word_convert = convert if index == 0 else None
        ids_of_embeddings = first_ids if index == 0 else None
        positive, _ = prompt_chunks(prompt, tokenizer, convert=word_convert, embeddings=ids_of_embeddings)
        negative, _ = prompt_chunks(negative_prompt, tokenizer, convert=word_convert, embeddings=ids_of_embeddings)
        empty, _ = prompt_chunks("", tokenizer)
        counts = (len(positive), len(negative))
        layer = -2 if sdxl else -clip_skip
        states, pools = _encode(
            encoder, tokenizer, [*positive, *negative, *empty], layer=layer, final_norm=not sdxl and clip_skip > 1
        )
        hidden.append((states[: len(positive)], states[len(positive) : -1], states[-1:]))
        if index == 1:
            pooled = pools[:1]
            negative_pooled = pools[len(positive) : len(positive) + 1]

    def joined(part: int) -> torch.Tensor:
        # SDXL: the two encoders' states side by side, per token
        return torch.cat([states[part] for states in hidden], dim=-1)

    positive_states, negative_states, empty_state = joined(0), joined(1), joined(2)
    padded = counts[0] != counts[1]
    if counts[0] < counts[1]:
        positive_states = torch.cat([positive_states, empty_state.expand(counts[1] - counts[0], -1, -1)])
    elif counts[1] < counts[0]:
        negative_states = torch.cat([negative_states, empty_state.expand(counts[0] - counts[1], -1, -1)])
    return PromptEmbeddings(
        prompt_embeds=positive_states.reshape(1, -1, positive_states.shape[-1]),
        negative_prompt_embeds=negative_states.reshape(1, -1, negative_states.shape[-1]),
        pooled_prompt_embeds=pooled,
        negative_pooled_prompt_embeds=negative_pooled,
        padded=padded,
    )


def _encode(
    encoder, tokenizer: CLIPTokenizer, chunks: list[PromptChunk], *, layer: int, final_norm: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Every chunk through `encoder` in one batch: the hidden states of `layer` (-1: the last,
    after the final layer norm) with A1111's emphasis applied per chunk, and the projected
    pooled embeddings where the encoder has a projection."""
    ids = torch.tensor([chunk.tokens for chunk in chunks], dtype=torch.long)
    if tokenizer.pad_token_id != tokenizer.eos_token_id:
        # SDXL's second encoder pads with its own token after the first end token
        for row, chunk in enumerate(chunks):
            first_end = chunk.tokens.index(tokenizer.eos_token_id)
            ids[row, first_end + 1 :] = tokenizer.pad_token_id
    ids = ids.to(encoder.device)
    with torch.inference_mode():
        output = encoder(ids, output_hidden_states=layer != -1)
        if layer == -1:
            states = output.last_hidden_state
        else:
            states = output.hidden_states[layer]
            if final_norm:
                states = getattr(encoder, "text_model", encoder).final_layer_norm(states)
        weights = torch.tensor([chunk.weights for chunk in chunks], dtype=torch.float32, device=states.device)
        states = _emphasis(states, weights)
    pooled = getattr(output, "text_embeds", None)
    return states, pooled


def _emphasis(states: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Each token's state times its weight, each chunk then scaled back to its own mean."""
    original = states.float()
    weighted = original * weights[..., None]
    original_mean = original.mean(dim=(1, 2), keepdim=True)
    weighted_mean = weighted.mean(dim=(1, 2), keepdim=True)
    ratio = original_mean / weighted_mean
    # a weighted mean of 0 (every weight 0) leaves nothing to rescale: A1111 would divide by it
    ratio = torch.where(torch.isfinite(ratio), ratio, torch.ones_like(ratio))
    return (weighted * ratio).to(states.dtype)
