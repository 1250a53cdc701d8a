"""data.packing: no attention crosses rows. The summed token loss of a packed batch, built by the real data
stage and collator, equals the rows' losses computed one by one (fp32, 1e-5), on every model type and
attention implementation lorafit lets pack; the refusals where that cannot be guaranteed."""

from __future__ import annotations

import random

import pytest

from lorafit.errors import LorafitError, RecipeError
from lorafit.recipe import DataSpec, load_recipe
from lorafit.stages import packing
from lorafit.stages.data import build_datasets
from lorafit.tools.tiny import build_tokenizer, tiny_config
from tests.conftest import REPO, write_jsonl, write_recipe

IGNORE = -100
WORDS = "the quick brown fox jumps over the lazy dog what is two plus four paris blue red green".split()


def _rows(n: int, seed: int = 0) -> list[dict]:
    rnd = random.Random(seed)
    return [{"prompt": " ".join(rnd.choices(WORDS, k=rnd.randint(1, 8))) + " ?",
             "completion": " " + " ".join(rnd.choices(WORDS, k=rnd.randint(1, 20)))} for _ in range(n)]


def _bundle(tmp_path, max_length=96, packing_on=True, n=24):
    path = write_jsonl(tmp_path / "train.jsonl", _rows(n))
    spec = DataSpec(train=str(path), format="completion", eval_fraction=0, max_length=max_length, packing=packing_on)
    return build_datasets(spec, build_tokenizer("llama"))


def _token_loss_sum(logits, labels):
    """Summed next-token cross-entropy, as transformers' causal LM loss shifts it."""
    import torch.nn.functional as F

    shift_logits, shift_labels = logits[..., :-1, :], labels[..., 1:]
    return F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]).float(), shift_labels.reshape(-1),
                           ignore_index=IGNORE, reduction="sum")


def _model(family: str, impl: str):
    import torch
    import transformers as tf

    torch.manual_seed(0)
    if family in ("llama", "qwen2", "mistral", "gemma", "phi3", "falcon", "gpt2", "gpt_neox"):
        cfg = tiny_config(family, 384)
    else:
        cfg = tf.AutoConfig.for_model(family, vocab_size=384, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=512, head_dim=16, bos_token_id=1, eos_token_id=2,
                                      pad_token_id=2)
    return tf.AutoModelForCausalLM.from_config(cfg, attn_implementation=impl, dtype=torch.float32)


def test_pack_rows_keeps_every_row_whole_within_max_length(tmp_path):
    plain = _bundle(tmp_path, packing_on=False)
    packed = _bundle(tmp_path)
    assert packed.stats["packed_blocks"] == len(packed.train) < len(plain.train)
    assert all(len(ids) <= 96 for ids in packed.train["input_ids"])
    # Each block is its rows back to back: cut at the position-id restarts, the rows come back, once each.
    rows = sorted(tuple(r) for r in plain.train["input_ids"])
    found = []
    for ids, pos in zip(packed.train["input_ids"], packed.train["position_ids"]):
        starts = [i for i, p in enumerate(pos) if p == 0] + [len(ids)]
        found += [tuple(ids[a:b]) for a, b in zip(starts, starts[1:])]
        assert pos == [p for a, b in zip(starts, starts[1:]) for p in range(b - a)]
    assert sorted(found) == rows
    assert packed.stats["train_rows"] == plain.stats["train_rows"]  # stats stay per row


def test_first_token_of_each_row_predicts_nothing_across_the_boundary(tmp_path):
    packed = _bundle(tmp_path)
    batch = packed.collator([packed.train[i] for i in range(min(4, len(packed.train)))])
    assert "attention_mask" not in batch  # transformers detects the rows from position_ids only without one
    labels, pos = batch["labels"], batch["position_ids"]
    starts = pos == 0
    assert (labels[starts] == IGNORE).all()  # so the previous row's last token has no target in the next row
    assert (labels[:, 1:][starts[:, 1:]] == IGNORE).all()


@pytest.mark.parametrize("impl", sorted(packing.PACKABLE_ATTENTION))
def test_packed_loss_equals_rows_one_by_one_with_lora(tmp_path, impl):
    """Through the real path: data stage → packed blocks → PackedCollator → peft model prepared for packing."""
    import torch
    from peft import LoraConfig, get_peft_model

    plain, packed = _bundle(tmp_path, packing_on=False), _bundle(tmp_path)
    model = get_peft_model(_model("llama", impl), LoraConfig(r=8, target_modules="all-linear", lora_dropout=0.0,
                                                             init_lora_weights=False))
    packing.prepare_model(model)
    model.train()
    torch.manual_seed(1)
    with torch.no_grad():
        batch = packed.collator([packed.train[i] for i in range(len(packed.train))])
        packed_sum = _token_loss_sum(model(**batch).logits, batch["labels"])
        rows_sum = sum(_token_loss_sum(model(input_ids=torch.tensor([r["input_ids"]])).logits,
                                       torch.tensor([r["labels"]])) for r in plain.train)
        # transformers' own loss on the packed batch is the same mean
        n = int((batch["labels"][:, 1:] != IGNORE).sum())
        hf_loss = model(**batch).loss * n
    assert abs(packed_sum.item() - rows_sum.item()) <= 1e-5 * max(1.0, abs(rows_sum.item())), (packed_sum, rows_sum)
    assert abs(hf_loss.item() - rows_sum.item()) <= 1e-5 * max(1.0, abs(rows_sum.item()))


def test_without_prepare_model_attention_would_cross_rows(tmp_path):
    """The KV cache a forward builds by default turns packed-sequence detection off: prepare_model must run."""
    import torch

    plain, packed = _bundle(tmp_path, packing_on=False), _bundle(tmp_path)
    model = _model("llama", "sdpa").eval()
    with torch.no_grad():
        batch = packed.collator([packed.train[0]])
        rows = [r for r in plain.train if tuple(r["input_ids"]) in
                {tuple(batch["input_ids"][0][a:b].tolist()) for a in range(batch["input_ids"].shape[1])
                 for b in range(a + 1, batch["input_ids"].shape[1] + 1)}]
        rows_sum = sum(_token_loss_sum(model(input_ids=torch.tensor([r["input_ids"]])).logits,
                                       torch.tensor([r["labels"]])) for r in rows)
        assert len(rows) >= 2
        crossing = _token_loss_sum(model(**batch).logits, batch["labels"])
        packing.prepare_model(model)
        kept = _token_loss_sum(model(**batch).logits, batch["labels"])
    assert abs(crossing.item() - rows_sum.item()) > 1e-3
    assert abs(kept.item() - rows_sum.item()) <= 1e-5 * max(1.0, abs(rows_sum.item()))


@pytest.mark.parametrize("impl", sorted(packing.PACKABLE_ATTENTION))
@pytest.mark.parametrize("model_type", sorted(packing.PACKABLE_MODEL_TYPES))
def test_every_packable_model_type_keeps_rows_apart(model_type, impl):
    import torch

    if model_type == "gemma2" and impl == "sdpa":
        pytest.skip("gemma2 has no sdpa attention: transformers loads it with eager")
    model = _model(model_type, impl)
    packing.prepare_model(model)
    model.eval()  # no dropout (gpt2's configs have some): the same weights on both sides
    gen = torch.Generator().manual_seed(0)
    rows = [torch.randint(5, 300, (n,), generator=gen) for n in (9, 17, 4, 30)]
    with torch.no_grad():
        one_by_one = torch.cat([model(input_ids=r[None]).logits[0] for r in rows])
        ids = torch.cat(rows)[None]
        pos = torch.cat([torch.arange(len(r)) for r in rows])[None]
        packed = model(input_ids=ids, position_ids=pos).logits[0]
    assert (packed - one_by_one).abs().max().item() < 1e-4  # logits: the per-row losses then agree to ~1e-6


def test_real_tokens_ignores_block_padding(tmp_path):
    packed = _bundle(tmp_path)
    features = [packed.train[i] for i in range(len(packed.train))]
    batch = packed.collator(features)
    assert batch["input_ids"].numel() > sum(len(f["input_ids"]) for f in features)  # some padding
    assert packing.real_tokens(batch["position_ids"]) == sum(len(f["input_ids"]) for f in features)


def test_refusals_name_the_recipe_path():
    with pytest.raises(LorafitError, match="data.packing: packing is not verified for model type 'bert'"):
        packing.check_model_type("bert")
    model = _model("llama", "sdpa")
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(LorafitError, match="data.packing: .*attn_implementation 'flex_attention'"):
        packing.prepare_model(model)


def test_packing_refused_for_tasks_that_are_not_causal_lm(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", {"model": {"name": "x", "task": "seq_cls"},
                                                "data": {"train": "t.jsonl", "format": "classification",
                                                         "packing": True}})
    with pytest.raises(RecipeError, match="data.packing: packing is for causal_lm only"):
        load_recipe(recipe)


def test_training_arguments_group_by_length_by_default(tmp_path):
    from lorafit.recipe import EvaluationSpec, TrainingSpec
    from lorafit.stages.train import training_arguments

    def strategy(packed=False, **spec):
        return training_arguments(TrainingSpec(**spec), EvaluationSpec(), output_dir=tmp_path, precision="fp32",
                                  gradient_checkpointing=False, has_eval=False, run_name="t",
                                  packed=packed).train_sampling_strategy

    assert strategy() == "group_by_length"
    assert strategy(group_by_length=False) == "random"
    assert strategy(packed=True) == "random"


def test_shipped_smoke_recipe_model_type_is_packable():
    import json

    assert json.loads((REPO / "examples" / "tiny-llama" / "config.json").read_text())["model_type"] in \
        packing.PACKABLE_MODEL_TYPES
