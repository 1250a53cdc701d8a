"""lorafit.serving.decoding: the text a client sees (streamed pieces = the whole answer, stop strings never
shown, not even their beginning) and per-request seeded sampling."""

from __future__ import annotations

import pytest

from tests.conftest import REPO


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(REPO / "examples" / "tiny-llama"))


def _stream(tokenizer, text: str, **kw):
    from lorafit.serving.decoding import TextStream

    stream = TextStream(tokenizer, **kw)
    pieces = []
    for token in tokenizer(text, add_special_tokens=False)["input_ids"]:
        pieces.append(stream.push(token))
        if stream.stopped_by_string:
            break
    pieces.append(stream.finish())
    return stream, pieces


def test_pieces_add_up_to_the_stripped_text(tokenizer):
    stream, pieces = _stream(tokenizer, "  The quick brown fox.  ", strip=True)
    assert "".join(pieces) == stream.text == "The quick brown fox."
    assert not pieces[0].startswith(" ")


def test_a_stop_string_ends_the_text_and_is_never_streamed(tokenizer):
    stream, pieces = _stream(tokenizer, "one two three four five", stop=("three f",))
    assert stream.stopped_by_string and stream.text == "one two "
    assert "".join(pieces) == "one two "
    assert not any("th" in p for p in pieces)  # the stop string's start was held back, then dropped


def test_a_tail_that_only_looks_like_a_stop_string_is_released(tokenizer):
    stream, pieces = _stream(tokenizer, "one two three", stop=("two x",))
    assert not stream.stopped_by_string and "".join(pieces) == stream.text == "one two three"


def test_a_seeded_sampler_repeats_and_greedy_takes_the_argmax():
    import torch

    from lorafit.serving.decoding import Sampler, SamplingParams

    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    a, b, c = (Sampler(SamplingParams(8, temperature=1.0, top_p=0.9, seed=s)) for s in (3, 3, 4))
    first = [a.choose(logits) for _ in range(20)]
    assert first == [b.choose(logits) for _ in range(20)] and first != [c.choose(logits) for _ in range(20)]
    assert Sampler(SamplingParams(8)).choose(logits) == int(logits.argmax())
    # top_p keeps only the head of the distribution: a peaked one always gives its top token
    peaked = torch.full((50,), -10.0)
    peaked[7] = 10.0
    assert {Sampler(SamplingParams(8, temperature=1.0, top_p=0.5, seed=s)).choose(peaked) for s in range(10)} == {7}


def test_a_temperature_too_small_to_divide_by_is_greedy():
    """logits / 1e-40 overflow to inf, softmax to NaN, and multinomial raises: below GREEDY_BELOW the argmax."""
    import torch

    from lorafit.serving.decoding import GREEDY_BELOW, Sampler, SamplingParams

    logits = torch.randn(50, generator=torch.Generator().manual_seed(1)) * 30
    for temperature in (1e-40, GREEDY_BELOW / 2):
        assert Sampler(SamplingParams(8, temperature=temperature, seed=5)).choose(logits) == int(logits.argmax())


def test_a_seed_past_64_bits_is_a_validation_error():
    from pydantic import ValidationError

    from lorafit.serving.protocol import ChatCompletionRequest

    ask = {"model": "a", "messages": [{"role": "user", "content": "x"}]}
    assert ChatCompletionRequest.model_validate({**ask, "seed": 2**63 - 1}).seed == 2**63 - 1
    for seed in (2**63, 2**70, -1):
        with pytest.raises(ValidationError):
            ChatCompletionRequest.model_validate({**ask, "seed": seed})
