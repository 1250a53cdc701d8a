"""Packing (data.packing): whole rows packed into blocks of up to data.max_length tokens, attention kept
inside each row.

How: each block is its rows flattened by transformers' DataCollatorWithFlattening (position ids restart
at 0 on every row, the first token of each row gets label -100, so the last token of a row never learns
to predict the next row). The batch carries ``position_ids`` and no ``attention_mask``: transformers 5's
masking utilities then find the row boundaries from the position ids (``find_packed_sequence_indices``)
and build a block-diagonal causal mask for sdpa/eager. FlashAttention (CUDA) takes its varlen path from
the same position ids, but only for a batch of one sequence: with flash_attention_2/3 the collator puts
every block of a batch back to back in one row, without padding (``prepare_model`` switches it).
That detection is skipped when a KV cache exists, hence ``use_cache = False`` in ``prepare_model``.

Blocks of a batch are right-padded to the longest with a pad id at position 0 each: every pad token is
a row of its own (it attends to itself only, and no real row can see it), and a real row always ends on
a position > 0 (a row of one token has nothing to train and is dropped by the data stage), so the real
tokens of a block are exactly those up to its last nonzero position (``real_tokens``).

Verified by tests/unit/test_packing.py on every model type in PACKABLE_MODEL_TYPES with sdpa and eager:
the summed token loss of a packed batch equals the rows' losses computed one by one; for FlashAttention, by
its gpu-marked test of the same (on the tiny Llama, bf16), which runs only where CUDA and the package are.
"""

from __future__ import annotations

import bisect
from typing import Any

from lorafit.core.prompts import IGNORE
from lorafit.errors import LorafitError

# Model types whose attention honours packed position ids (each one checked by tests/unit/test_packing.py).
PACKABLE_MODEL_TYPES = frozenset({
    "llama", "mistral", "ministral", "mixtral", "qwen2", "qwen3", "qwen3_moe", "gemma", "gemma2", "gemma3_text",
    "phi", "phi3", "falcon", "gpt2", "gpt_neox", "starcoder2", "olmo", "olmo2", "granite", "cohere", "stablelm",
})
# Attention implementations checked on CPU by the same tests.
PACKABLE_ATTENTION = frozenset({"sdpa", "eager"})
# FlashAttention's varlen path (rows cut at the position-id restarts of a one-row batch); checked on CUDA by
# the gpu-marked test in the same file.
PACKABLE_FLASH_ATTENTION = frozenset({"flash_attention_2", "flash_attention_3"})

_FIX = "set data.packing: false (batches are then length-grouped and dynamically padded, nearly as fast)"


def check_model_type(model_type: str) -> None:
    """Before any weights load (validate and train): the config's model_type must be one we verified."""
    if model_type not in PACKABLE_MODEL_TYPES:
        raise LorafitError(f"packing is not verified for model type '{model_type}' (its attention may cross rows); "
                           f"verified: {', '.join(sorted(PACKABLE_MODEL_TYPES))}", where="data.packing", fix=_FIX)


def prepare_model(model, collator=None) -> None:
    """The loaded model: its attention implementation must honour packed position ids, and no KV cache may
    be built in the forward (transformers skips packed-sequence detection when one exists). With
    FlashAttention, *collator* (a PackedCollator) then flattens each batch into one row."""
    config = model.config if not hasattr(model, "get_base_model") else model.get_base_model().config
    check_model_type(config.model_type)
    impl = getattr(config, "_attn_implementation", None) or "eager"
    if impl not in PACKABLE_ATTENTION | PACKABLE_FLASH_ATTENTION:
        raise LorafitError(f"packing is not verified with attn_implementation '{impl}'; verified: "
                           f"{', '.join(sorted(PACKABLE_ATTENTION | PACKABLE_FLASH_ATTENTION))}",
                           where="data.packing", fix=_FIX)
    config.use_cache = False
    if isinstance(collator, PackedCollator):
        collator.flatten = impl in PACKABLE_FLASH_ATTENTION


def pack_rows(dataset, max_length: int):
    """A datasets.Dataset of rows (input_ids, labels) → one of blocks (input_ids, labels, position_ids), each
    holding whole rows, at most max_length tokens. Best-fit decreasing (rows sorted longest first, each put
    into the fullest block it fits): blocks come out nearly full. The Trainer shuffles the blocks."""
    import datasets
    from transformers import DataCollatorWithFlattening

    columns = dataset.select_columns(["input_ids", "labels"]).to_dict()
    lengths = [len(x) for x in columns["input_ids"]]
    blocks: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, block), sorted: the best fit is the first with enough room
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        at = bisect.bisect_left(free, (lengths[i], -1))
        if at == len(free):
            blocks.append([i])
            room, b = max_length - lengths[i], len(blocks) - 1
        else:
            room, b = free.pop(at)
            blocks[b].append(i)
            room -= lengths[i]
        if room > 0:
            bisect.insort(free, (room, b))
    flatten = DataCollatorWithFlattening(return_tensors="np", separator_id=IGNORE)
    ids, labels, positions = [], [], []
    for block in blocks:
        flat = flatten([{"input_ids": columns["input_ids"][i], "labels": columns["labels"][i]} for i in sorted(block)])
        ids.append(flat["input_ids"][0].tolist())
        labels.append(flat["labels"][0].tolist())
        positions.append(flat["position_ids"][0].tolist())
    return datasets.Dataset.from_dict({"input_ids": ids, "labels": labels, "position_ids": positions})


class PackedCollator:
    """Blocks (they carry position_ids) → a [batch, longest block] batch with position_ids and no attention
    mask; pad tokens each at position 0 with label -100. Rows without position_ids (the eval split, which
    stays unpacked so that its loss is measured as without packing) go to the usual padding collator.

    *flatten* (FlashAttention, set by prepare_model): the blocks back to back in a [1, total] batch instead,
    no padding; transformers' flash path finds the rows from the position ids only in a batch of one. The
    first token of every row has label -100 already, so no row learns across the seam."""

    def __init__(self, pad_token_id: int, unpacked, flatten: bool = False):
        self.pad = pad_token_id
        self.unpacked = unpacked
        self.flatten = flatten

    def __call__(self, features: list[dict[str, Any]]) -> dict:
        import torch

        if "position_ids" not in features[0]:
            return self.unpacked(features)
        if self.flatten:
            return {key: torch.as_tensor([x for f in features for x in f[key]], dtype=torch.long)[None]
                    for key in ("input_ids", "labels", "position_ids")}
        longest = max(len(f["input_ids"]) for f in features)
        out = {"input_ids": torch.full((len(features), longest), self.pad, dtype=torch.long),
               "labels": torch.full((len(features), longest), IGNORE, dtype=torch.long),
               "position_ids": torch.zeros((len(features), longest), dtype=torch.long)}
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            for key in out:
                out[key][row, :n] = torch.as_tensor(f[key], dtype=torch.long)
        return out


def real_tokens(position_ids) -> int:
    """Tokens of a packed batch that are not padding: in each block, those up to its last nonzero position."""
    import torch

    nonzero = position_ids != 0
    width = position_ids.shape[-1]
    last = torch.where(nonzero.any(-1), width - 1 - nonzero.flip(-1).int().argmax(-1), torch.full_like(
        nonzero[..., 0], -1, dtype=torch.long))
    return int((last + 1).sum())


def pack_bundle(bundle, max_length: int, pad_token_id: int):
    """The data stage's bundle with its train split packed (its stats say into how many blocks)."""
    bundle.train = pack_rows(bundle.train, max_length)
    bundle.collator = PackedCollator(pad_token_id, bundle.collator)
    tokens = sum(len(x) for x in bundle.train["input_ids"])
    bundle.stats["packed_blocks"] = len(bundle.train)
    bundle.stats["packing_fill"] = round(tokens / (len(bundle.train) * max_length), 4) if len(bundle.train) else 0.0
    return bundle
