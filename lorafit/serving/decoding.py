"""One request's decoding: how its next token is chosen and how its tokens become the text a client sees.

Each request carries its own sampler (greedy, or temperature / top-p drawn from its own seeded generator,
so a seeded answer does not depend on what else is being decoded) and its own text stream (stop strings,
pieces that never split a character nor show the start of a stop string).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable

# Temperatures below this decode greedily: logits divided by 1e-40 overflow to inf, softmax gives NaN and the draw
# fails. At 1e-5 a draw is the argmax already unless two logits lie within about 1e-4 of each other.
GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """What a request asked for: *temperature* 0 (or below GREEDY_BELOW) is greedy; *seed* makes a sampled
    answer repeatable."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass
class Finished:
    text: str
    finish_reason: str          # "stop" (end-of-turn token or stop string) | "length" (max_tokens)
    prompt_tokens: int
    completion_tokens: int      # the end token included, as `lorafit generate` counts new_tokens
    batch: int = 1              # the most rows it was decoded with in one forward


@dataclass
class Generation:
    """One request to decode. *sink* receives ("text", piece) ... then ("done", Finished) or ("error", APIError),
    on the engine's thread; setting *cancelled* (the client left) ends it at the next step."""

    served: object              # registry.Served
    prompt: list[int]
    stop_ids: list[int]
    params: SamplingParams
    sink: Callable[[tuple], None] | None = None
    strip: bool = False
    cancelled: bool = False
    arrived: float = field(default_factory=time.monotonic)


class Sampler:
    """The next token of one row from its last logits."""

    def __init__(self, params: SamplingParams, device="cpu"):
        import torch

        self.temperature, self.top_p = params.temperature, params.top_p
        self.generator = None
        if self.temperature >= GREEDY_BELOW:
            seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
            self.generator = torch.Generator(device=device).manual_seed(seed)

    def choose(self, logits) -> int:
        """*logits*: this row's scores over the vocabulary (1-D)."""
        import torch

        if self.generator is None:
            return int(logits.argmax())
        probs = torch.softmax(logits.float() / self.temperature, dim=-1)
        if self.top_p < 1.0:  # the smallest set of tokens whose mass reaches top_p (the first always kept)
            sorted_probs, order = probs.sort(descending=True)
            keep = sorted_probs.cumsum(-1) - sorted_probs < self.top_p
            sorted_probs = sorted_probs * keep
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        return int(torch.multinomial(probs, 1, generator=self.generator))


@dataclass
class TextStream:
    """Tokens in, visible text out. push() returns the text that became final (never the beginning of a stop
    string, never half a character); finish() the rest. With *strip*, leading and trailing whitespace is
    dropped, as `lorafit generate` strips its answer, and the streamed pieces add up to the same text."""

    tokenizer: object
    stop: tuple[str, ...] = ()
    strip: bool = False
    tokens: list[int] = field(default_factory=list)
    emitted: int = 0            # characters of the text already handed out
    stopped_by_string: bool = False
    text: str = ""              # the text so far (cut at a stop string once one appeared)

    def push(self, token: int) -> str:
        self.tokens.append(token)
        full = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if self.strip:
            full = full.lstrip()
        cut = min((i for i in (full.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.stopped_by_string = full[:cut], True
            return ""  # finish() hands out the rest
        self.text = full
        end = len(full)
        while end > self.emitted and full[end - 1] == "\ufffd":  # a character still missing bytes
            end -= 1
        # Hold back a tail that may still grow into a stop string.
        end -= max((k for s in self.stop for k in range(min(len(s) - 1, end - self.emitted), 0, -1)
                    if full[end - k:end] == s[:k]), default=0)
        if self.strip:
            end = len(full[:end].rstrip())
        piece = full[self.emitted:end] if end > self.emitted else ""
        self.emitted += len(piece)
        return piece

    def finish(self) -> str:
        """The final text's part not yet handed out."""
        if self.strip:
            self.text = self.text.strip()
        piece = self.text[self.emitted:]
        self.emitted = len(self.text)
        return piece
