"""token_cls rows → tokens: a list of words with one tag each; the labels sit on each word's first
sub-token (the others and the special tokens are IGNORE), so that a word counts once in loss and metrics."""

from __future__ import annotations

from typing import Any

from lorafit.core.prompts import IGNORE, column, kind
from lorafit.errors import DataError
from lorafit.recipe import DataSpec
from lorafit.stages.data.classify import class_map, given_map
from lorafit.stages.data.read import Source, Tokenized


def tokenize(sources: list[Source], spec: DataSpec, tokenizer, *, num_labels: int | None = None,
             label_names: list[str] | None = None) -> Tokenized:
    """Every source's rows as input_ids + one label per sub-token. *label_names*: the tags of a head already
    trained (rows are mapped onto those), else the map is built from the train rows."""
    tag_ids, names = (given_map(sources, label_names, lambda r, loc: word_tags(r, loc, spec)[1], "tag")
                      if label_names else _tag_map(sources, spec, num_labels))
    parts, truncated, lengths = [], 0, []
    for src in sources:
        ds, t, d = _tokens_dataset(src, spec, tokenizer, tag_ids)
        parts.append(ds)
        truncated += t
        lengths += d["lengths"]
    return Tokenized(parts, names, truncated, [], lengths, [])


def word_tags(row: dict, loc: str, spec: DataSpec) -> tuple[list[str], list[int | str]]:
    """A tokens-format row's (words, tags), checked: lists of the same length, words strings, tags names or ids."""
    words = _word_list(row, loc, spec)
    name = spec.columns.tags
    if name not in row:
        column(row, loc, spec, "tags", "list of tags, one per word")
    tags = row[name]
    if not isinstance(tags, list):
        raise DataError(f"column '{name}' must be a list of tags (one per word), got {kind(tags)}", where=loc,
                        fix=f"check data.columns.tags (now '{name}')")
    if len(tags) != len(words):
        raise DataError(f"{len(words)} tokens but {len(tags)} tags", where=loc,
                        fix=f"give exactly one tag per word in '{spec.columns.tokens}' and '{name}'")
    out: list[int | str] = []
    for tag in tags:
        if isinstance(tag, str) and tag.strip().isdigit():
            tag = int(tag)
        if isinstance(tag, bool) or not isinstance(tag, (int, str)) or tag == "":
            raise DataError(f"tag must be a tag name (B-PER, O, ...) or an integer id, got {kind(tag)}",
                            where=loc, fix=f"check the column '{name}'")
        out.append(tag)
    return words, out


def _word_list(row: dict, loc: str, spec: DataSpec) -> list[str]:
    name = spec.columns.tokens
    if name not in row:
        column(row, loc, spec, "tokens", "list of words")
    words = row[name]
    if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
        raise DataError(f"column '{name}' must be a list of words (strings), got "
                        f"{kind(words) if not isinstance(words, list) else 'a list holding non-strings'}",
                        where=loc, fix="split each row's text into words: [\"EU\", \"rejects\", \"German\", ...]")
    if not words:
        raise DataError(f"column '{name}' is an empty list: nothing to tag", where=loc, fix="drop the row")
    return words


def read_words(row: dict, loc: str, spec: DataSpec) -> list[str]:
    """The words of a row to tag (predict: tags may be absent)."""
    return _word_list(row, loc, spec)


def _tag_map(sources: list[Source], spec: DataSpec, num_labels: int | None) -> tuple[dict, list[str]]:
    """Tag → id from the train rows: names sorted with O first, or ids 0..max (model.num_labels wins)."""
    return class_map(sources, lambda r, loc: word_tags(r, loc, spec)[1], "tag", num_labels,
                      sort_key=lambda t: (t != "O", t))


def align_labels(word_ids: list[int | None], labels: list[int]) -> list[int]:
    """Word labels → sub-token labels: each word's first sub-token carries its label; its other sub-tokens
    and special tokens (word id None) are IGNORE, so that a word counts once in loss and metrics."""
    out, previous = [], None
    for w in word_ids:
        out.append(IGNORE if w is None or w == previous else labels[w])
        previous = w
    return out


def encode_words(tokenizer, words: list[list[str]], max_length: int):
    """Pre-split rows tokenized as words (is_split_into_words): a fast tokenizer's encoding, with word_ids."""
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(f"token_cls needs a fast tokenizer (word_ids), and {type(tokenizer).__name__} is not one",
                        where="model.name", fix="use a model that ships tokenizer.json")
    try:
        return tokenizer(words, is_split_into_words=True, truncation=True, max_length=max_length)
    except (ValueError, AssertionError) as e:  # RoBERTa/GPT-2 style BPE wants add_prefix_space for words
        raise DataError(f"the tokenizer refuses pre-split words: {str(e).splitlines()[0]}", where="model.name",
                        fix="save the tokenizer with add_prefix_space=True beside the model") from None


def _tokens_dataset(src: Source, spec: DataSpec, tokenizer, tag_ids: dict) -> tuple[Any, int, dict]:
    import datasets

    rows = [word_tags(r, loc, spec) for r, loc in zip(src.rows, src.locs)]
    enc = encode_words(tokenizer, [w for w, _ in rows], spec.max_length)
    full = encode_words(tokenizer, [w for w, _ in rows], 10**9)["input_ids"]
    labels = [align_labels(enc.word_ids(i), [tag_ids[t] for t in tags]) for i, (_, tags) in enumerate(rows)]
    ds = datasets.Dataset.from_dict({"input_ids": enc["input_ids"], "labels": labels, "row": list(range(len(rows)))})
    return ds, sum(len(f) > spec.max_length for f in full), {"lengths": [len(f) for f in full]}
