"""A loaded classifier's answers, as `lorafit predict` writes them and `lorafit serve` answers POST /v1/classify:
one class and its probability per text (seq_cls), one tag per word (token_cls, each word read at its first
sub-token, as training labelled it; null past max_length)."""

from __future__ import annotations

import re

from lorafit import log
from lorafit.stages.data.tokens import encode_words

_DEFAULT_NAME = re.compile(r"LABEL_\d+")


def label(model, index: int):
    """A class as the user knows it: its name, or its integer id when the classes had no names."""
    name = (getattr(model.config, "id2label", None) or {}).get(index)
    if name is None or _DEFAULT_NAME.fullmatch(str(name)):
        return index
    return int(name) if str(name).isdigit() else name


def _batches(n: int, size: int):
    return [range(i, min(i + size, n)) for i in range(0, n, size)]


def classify_texts(model, tokenizer, texts: list[str], max_length: int, batch_size: int) -> list[dict]:
    """[{"label", "score"}] per text, in order."""
    import torch

    out = []
    batches = _batches(len(texts), batch_size)
    with log.Progress("predict", total=len(batches)) as progress, torch.no_grad():
        for batch in batches:
            enc = tokenizer([texts[i] for i in batch], truncation=True, max_length=max_length, padding=True,
                            return_tensors="pt").to(model.device)
            probs = model(**enc).logits.float().softmax(-1)
            score, index = probs.max(-1)
            out += [{"label": label(model, int(i)), "score": round(float(s), 6)} for i, s in zip(index, score)]
            progress.update()
    return out


def tag_words(model, tokenizer, words: list[list[str]], max_length: int, batch_size: int) -> list[dict]:
    """[{"tokens", "tags"}] per row of words: the class of each word's first sub-token; null past max_length."""
    import torch

    out = []
    batches = _batches(len(words), batch_size)
    with log.Progress("predict", total=len(batches)) as progress, torch.no_grad():
        for batch in batches:
            enc = encode_words(tokenizer, [words[i] for i in batch], max_length)
            padded = tokenizer.pad({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]},
                                   padding_side="right", return_tensors="pt").to(model.device)
            classes = model(**padded).logits.argmax(-1).tolist()
            for k, i in enumerate(batch):
                tags: list = [None] * len(words[i])
                seen = set()
                for position, w in enumerate(enc.word_ids(k)):
                    if w is not None and w not in seen:
                        seen.add(w)
                        tags[w] = label(model, classes[k][position])
                out.append({"tokens": words[i], "tags": tags})
            progress.update()
    return out
