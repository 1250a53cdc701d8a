"""training.group_by_length: whole-epoch length buckets (stages/sampler.py) instead of transformers' megabatches."""

import math
import random

import pytest

from lorafit.stages.sampler import bucketed_order, padding_fraction


def _lognormal(n, seed=0):
    rnd = random.Random(seed)
    return [min(512, max(12, int(rnd.lognormvariate(math.log(60), 0.8)))) for _ in range(n)]


def _batches(order, size):
    return [order[i:i + size] for i in range(0, len(order), size)]


@pytest.mark.parametrize("n,size", [(360, 8), (101, 8), (5, 8), (64, 4), (1, 1)])
def test_every_row_once_full_batches_first_longest_batch_first(n, size):
    lengths = _lognormal(n)
    order = bucketed_order(lengths, size, seed=42, epoch=0)
    assert sorted(order) == list(range(n))
    batches = _batches(order, size)
    assert all(len(b) == size for b in batches[:-1])  # the DataLoader cuts the stream into these very batches
    assert max(lengths) in [lengths[i] for i in batches[0]]


def test_padding_far_below_transformers_megabatches():
    import torch
    from transformers.trainer_pt_utils import LengthGroupedSampler

    lengths = _lognormal(360)
    ours = padding_fraction(lengths, bucketed_order(lengths, 8, seed=42, epoch=0), 8)
    theirs = padding_fraction(lengths, list(LengthGroupedSampler(8, lengths=lengths,
                                                                 generator=torch.Generator().manual_seed(42))), 8)
    shuffled = list(range(360))
    random.Random(0).shuffle(shuffled)
    assert ours < 0.10 and ours < theirs / 2 < padding_fraction(lengths, shuffled, 8) / 2, (ours, theirs)


def test_order_is_fixed_by_seed_and_epoch_and_batches_change_between_epochs():
    lengths = _lognormal(360)
    first = bucketed_order(lengths, 8, seed=42, epoch=0)
    assert bucketed_order(lengths, 8, seed=42, epoch=0) == first  # resuming replays the epoch
    second = bucketed_order(lengths, 8, seed=42, epoch=1)
    other_seed = bucketed_order(lengths, 8, seed=7, epoch=0)
    as_sets = lambda order: {frozenset(b) for b in _batches(order, 8)}  # noqa: E731
    assert as_sets(second) != as_sets(first) and as_sets(other_seed) != as_sets(first)
    # batch order is shuffled, not long-to-short: the second half of the epoch is not all short rows
    mean = lambda b: sum(lengths[i] for i in b) / len(b)  # noqa: E731
    halves = _batches(first, 8)[1:-1]
    assert mean([i for b in halves[len(halves) // 2:] for i in b]) > 0.5 * mean([i for b in halves for i in b])


def test_lorafit_trainer_batches_come_from_length_buckets(tiny_llama, tmp_path):
    """The Trainer lorafit builds feeds these buckets to the model: each batch's width is its own longest row,
    and the padding over the epoch is the sampler's."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq

    from lorafit.recipe import EvaluationSpec, TrainingSpec
    from lorafit.stages.train import _trainer_class, training_arguments

    lengths = _lognormal(61, seed=3)
    rows = [[5 + (j % 50) for j in range(n)] for n in lengths]
    dataset = Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * n for n in lengths], "labels": rows})
    args = training_arguments(TrainingSpec(batch_size=4, seed=11), EvaluationSpec(), output_dir=tmp_path,
                              precision="fp32", gradient_checkpointing=False, has_eval=False, run_name="t")
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    trainer = _trainer_class()(model=AutoModelForCausalLM.from_pretrained(tiny_llama), args=args,
                               train_dataset=dataset, data_collator=DataCollatorForSeq2Seq(tok, label_pad_token_id=-100))
    widths = [batch["input_ids"].shape for batch in trainer.get_train_dataloader()]
    expected = _batches(bucketed_order(lengths, 4, seed=11, epoch=0), 4)
    assert widths == [(len(b), max(lengths[i] for i in b)) for b in expected]
    assert sum(rows * width for rows, width in widths) < 1.12 * sum(lengths)


def test_each_epoch_of_a_real_run_follows_its_own_bucketed_order(tiny_llama, tmp_path):
    """Two epochs through lorafit's Trainer: the rows reach the model in bucketed_order(epoch 0) then
    bucketed_order(epoch 1) — the epoch is handed to the sampler by the Trainer itself (_run_epoch), which
    a resume under several processes relies on."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq

    from lorafit.recipe import EvaluationSpec, TrainingSpec
    from lorafit.stages.train import _trainer_class, training_arguments

    lengths = [40 + i for i in range(16)]  # distinct, and within the ±5 % jitter of their neighbours
    rows = [[5 + (j % 50) for j in range(n)] for n in lengths]
    dataset = Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * n for n in lengths], "labels": rows})
    args = training_arguments(TrainingSpec(batch_size=4, seed=5, epochs=2, save_steps=None, save_minutes=None,
                                           logging_steps=100), EvaluationSpec(), output_dir=tmp_path,
                              precision="fp32", gradient_checkpointing=False, has_eval=False, run_name="t")
    seen = []
    collate = DataCollatorForSeq2Seq(AutoTokenizer.from_pretrained(tiny_llama), label_pad_token_id=-100)

    def record(features):
        seen.extend(len(f["input_ids"]) for f in features)
        return collate(features)

    from peft import LoraConfig, get_peft_model

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama), LoraConfig(r=2, target_modules=["q_proj"]))
    trainer = _trainer_class()(model=model, args=args, train_dataset=dataset, data_collator=record)
    trainer.train()
    expected = [lengths[i] for epoch in (0, 1) for i in bucketed_order(lengths, 4, seed=5, epoch=epoch)]
    assert seen == expected
    assert seen[:16] != seen[16:] and sorted(seen[:16]) == sorted(seen[16:]) == lengths
