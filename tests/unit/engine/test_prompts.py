"""Prompts are read as AUTOMATIC1111 reads them: attention weights, BREAK, long prompts."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image, ImageChops

from services.inference.worker.engine import Engine, GenerationRequest, InvalidPayload, ModelFiles
from services.inference.worker.engine.prompts import (
    BREAK,
    CHUNK_TOKENS,
    _emphasis,
    encode_prompts,
    parse_prompt_attention,
    prompt_chunks,
)


def approx(pieces: list[tuple[str, float]]):
    return [(text, pytest.approx(weight)) for text, weight in pieces]


# The cheat sheet of A1111's wiki ("Features", attention/emphasis) and its parser's doctests.
@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("a (word)", [("a ", 1.0), ("word", 1.1)]),
        ("a ((word))", [("a ", 1.0), ("word", 1.21)]),
        ("a [word]", [("a ", 1.0), ("word", 1 / 1.1)]),
        ("a (word:1.5)", [("a ", 1.0), ("word", 1.5)]),
        ("a (word:0.25)", [("a ", 1.0), ("word", 0.25)]),
        ("a \\(word\\)", [("a (word)", 1.0)]),
        ("anime_\\(character\\)", [("anime_(character)", 1.0)]),
        ("normal text", [("normal text", 1.0)]),
        ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
        ("(unbalanced", [("unbalanced", 1.1)]),
        ("\\(literal\\]", [("(literal]", 1.0)]),
        ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
        (
            "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
            [
                ("a ", 1.0),
                ("house", 1.1 * 1.1 * 1.3),
                (" ", 1.1),
                ("on", 1.0),
                (" a ", 1.1),
                ("hill", 0.55),
                (", sun, ", 1.1),
                ("sky", 1.1**4),
                (".", 1.1),
            ],
        ),
        ("[[word]]", [("word", 1 / 1.21)]),
        ("((a) [b] (c:2))", [("a", 1.21), (" ", 1.1), ("b", 1.0), (" ", 1.1), ("c", 2.2)]),
        ("a (word: 1.5 ) b", [("a ", 1.0), ("word", 1.5), (" b", 1.0)]),
        ("closing) only]", [("closing) only]", 1.0)]),
        ("a: b", [("a: b", 1.0)]),
        ("", [("", 1.0)]),
    ],
)
def test_attention_is_parsed_as_a1111_documents_it(prompt, expected):
    assert parse_prompt_attention(prompt) == approx(expected)


def test_break_separates_pieces():
    assert parse_prompt_attention("a cat BREAK a dog") == [("a cat", 1.0), BREAK, ("a dog", 1.0)]
    # as in A1111, the empty text around a BREAK between brackets stays (it tokenizes to nothing)
    assert parse_prompt_attention("(red:1.2) BREAK [blue]") == approx(
        [("red", 1.2), ("", 1.0), BREAK, ("", 1.0), ("blue", 1 / 1.1)]
    )
    # only the word in capitals, on its own
    assert parse_prompt_attention("a break BREAKING b") == [("a break BREAKING b", 1.0)]


def test_a_weight_that_is_not_a_number_names_the_prompt():
    with pytest.raises(InvalidPayload, match=r"prompt: the weight in ':1\.2\.3\)' is not a number"):
        parse_prompt_attention("a (cat:1.2.3)")


@pytest.fixture(scope="module")
def engine():
    return Engine()


@pytest.fixture(scope="module")
def tokenizer(engine, checkpoint):
    return engine._checkpoint(checkpoint).pipeline.tokenizer


def _words(count: int) -> str:
    # each of these is one token in the tiny vocabulary
    return " ".join(["cat", "dog", "red", "sky"][index % 4] for index in range(count))


def test_a_short_prompt_is_one_chunk_of_77_with_its_weights(tokenizer):
    chunks, count = prompt_chunks("a (cat:1.5) in the sky", tokenizer)
    assert count == 5 and len(chunks) == 1
    chunk = chunks[0]
    assert len(chunk.tokens) == len(chunk.weights) == CHUNK_TOKENS + 2
    assert chunk.tokens[0] == tokenizer.bos_token_id
    assert chunk.tokens[6:] == [tokenizer.eos_token_id] * 71
    assert chunk.weights[:7] == pytest.approx([1.0, 1.0, 1.5, 1.0, 1.0, 1.0, 1.0])
    plain = tokenizer("a cat in the sky", padding="max_length", max_length=77)["input_ids"]
    assert chunk.tokens == plain  # the same ids diffusers would give


def test_a_prompt_beyond_75_tokens_takes_two_chunks(tokenizer):
    chunks, count = prompt_chunks(_words(80), tokenizer)
    assert count == 80 and len(chunks) == 2
    assert chunks[0].tokens[1:76] == tokenizer(_words(75), add_special_tokens=False)["input_ids"]
    assert chunks[1].tokens[1:6] == tokenizer(_words(80), add_special_tokens=False)["input_ids"][75:]
    assert chunks[1].tokens[6:] == [tokenizer.eos_token_id] * 71
    assert prompt_chunks(_words(75), tokenizer)[0].__len__() == 1
    assert len(prompt_chunks(_words(76), tokenizer)[0]) == 2


def test_break_starts_a_new_chunk(tokenizer):
    chunks, count = prompt_chunks("a cat BREAK a dog BREAK red", tokenizer)
    assert len(chunks) == 3
    assert count == CHUNK_TOKENS * 2 + 1
    dog = tokenizer("a dog", add_special_tokens=False)["input_ids"]
    assert chunks[1].tokens[:4] == [tokenizer.bos_token_id, *dog, tokenizer.eos_token_id]


def test_words_after_a_comma_near_the_cut_move_to_the_next_chunk(tokenizer):
    # 70 words, a comma, then 10 more: the cut at 75 falls 4 tokens after the comma
    text = _words(70) + ", " + _words(10)
    chunks, _ = prompt_chunks(text, tokenizer)
    comma = tokenizer.get_vocab()[",</w>"]
    assert chunks[0].tokens[71] == comma
    assert chunks[0].tokens[72:] == [tokenizer.eos_token_id] * 5  # the chunk ends at the comma
    assert chunks[1].tokens[1:11] == tokenizer(_words(10), add_special_tokens=False)["input_ids"]
    assert prompt_chunks(text, tokenizer, word_wrap=0)[0][0].tokens[72] != tokenizer.eos_token_id


def test_emphasis_keeps_the_unweighted_mean():
    states = torch.randn(2, 77, 8) + 0.3
    weights = torch.ones(2, 77)
    weights[0, 3] = 1.5
    weights[1, 5:9] = 0.5
    emphasised = _emphasis(states, weights)
    assert emphasised.mean(dim=(1, 2)) == pytest.approx(states.mean(dim=(1, 2)), rel=1e-5)
    ratio = emphasised[0, 3] / emphasised[0, 2]
    assert ratio == pytest.approx(1.5 * states[0, 3] / states[0, 2], rel=1e-4)
    assert torch.equal(_emphasis(states, torch.ones(2, 77)), states)
    assert torch.isfinite(_emphasis(states, torch.zeros(2, 77))).all()


def test_sd15_embeddings_are_concatenated_chunks_padded_to_the_same_count(engine, checkpoint):
    pipe = engine._checkpoint(checkpoint).pipeline
    long = encode_prompts(pipe, _words(100), "blurry")
    assert long.prompt_embeds.shape == (1, 154, 32)
    assert long.negative_prompt_embeds.shape == (1, 154, 32)
    assert long.padded and long.pooled_prompt_embeds is None
    # the negative's second chunk is the empty prompt's encoding
    empty = encode_prompts(pipe, "", "")
    assert torch.allclose(long.negative_prompt_embeds[:, 77:], empty.prompt_embeds, atol=1e-6)
    short = encode_prompts(pipe, "a cat", "blurry")
    assert short.prompt_embeds.shape == (1, 77, 32) and not short.padded
    # an unweighted short prompt is what diffusers itself encodes
    ids = pipe.tokenizer("a cat", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.inference_mode():
        expected = pipe.text_encoder(ids)[0]
    assert torch.allclose(short.prompt_embeds, expected, atol=1e-6)


def test_clip_skip_takes_an_earlier_layer(engine, checkpoint):
    pipe = engine._checkpoint(checkpoint).pipeline
    last = encode_prompts(pipe, "a cat", "", clip_skip=1).prompt_embeds
    skipped = encode_prompts(pipe, "a cat", "", clip_skip=2).prompt_embeds
    assert not torch.allclose(last, skipped)


def test_sdxl_uses_both_encoders_and_pools_the_first_chunk(engine, sdxl_checkpoint):
    pipe = engine._checkpoint(sdxl_checkpoint).pipeline
    long = encode_prompts(pipe, _words(30) + " BREAK " + _words(10), "blurry")
    width = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert long.prompt_embeds.shape == (1, 154, width)
    assert long.negative_prompt_embeds.shape == (1, 154, width)
    assert long.pooled_prompt_embeds.shape == (1, pipe.text_encoder_2.config.projection_dim)
    first_chunk_only = encode_prompts(pipe, _words(30), "blurry")
    assert torch.allclose(long.pooled_prompt_embeds, first_chunk_only.pooled_prompt_embeds, atol=1e-6)
    # the pooled embedding is not weighted
    weighted = encode_prompts(pipe, "(" + _words(30) + ":1.4)", "blurry")
    assert torch.allclose(weighted.pooled_prompt_embeds, first_chunk_only.pooled_prompt_embeds, atol=1e-6)
    assert not torch.allclose(weighted.prompt_embeds, first_chunk_only.prompt_embeds)


SMALL = {"negative_prompt": "blurry", "steps": 3, "width": 64, "height": 64, "seed": 9}


def _image(engine, checkpoint, prompt: str, **payload) -> Image.Image:
    request = GenerationRequest.from_payload("txt2img", {**SMALL, "prompt": prompt, **payload})
    result = engine.generate(request, ModelFiles(checkpoint=checkpoint))
    image = Image.open(io.BytesIO(result.images[0]))
    image.load()
    return image


def _differ(first: Image.Image, second: Image.Image) -> bool:
    return max(high for _, high in ImageChops.difference(first.convert("RGB"), second.convert("RGB")).getextrema()) > 0


def test_a_weighted_prompt_changes_the_image(engine, checkpoint):
    plain = _image(engine, checkpoint, "a photo of a red cat")
    weighted = _image(engine, checkpoint, "a photo of a (red:1.6) cat")
    lighter = _image(engine, checkpoint, "a photo of a [red] cat")
    same = _image(engine, checkpoint, "a photo of a (red:1) cat")
    assert _differ(plain, weighted) and _differ(plain, lighter) and _differ(weighted, lighter)
    assert not _differ(plain, same)
    assert weighted.text["parameters"].startswith("a photo of a (red:1.6) cat\n")


@pytest.mark.parametrize("model", ["checkpoint", "sdxl_checkpoint"])
def test_a_long_prompt_with_break_runs(engine, model, request):
    path = request.getfixturevalue(model)
    image = _image(engine, path, "(a photo:1.2) of a cat, " + _words(90) + " BREAK [in the sky]")
    assert image.size == (64, 64)
    assert any(low != high for low, high in image.getextrema())  # not a blank (NaN) image
    assert "Pad conds: True" in image.text["parameters"]
