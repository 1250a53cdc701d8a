"""The task table: everything lorafit does differently per ``model.task``, in one place.

Adding a task means adding one row here. Nothing else in lorafit names a transformers Auto class or a
peft task type per task: they read this table.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Task:
    name: str                # the recipe's model.task
    peft_task_type: str      # peft.TaskType value, recorded in adapter_config.json as task_type
    auto_model: str          # transformers Auto class that loads the base
    auto_peft: str           # peft AutoPeftModel class that loads base + adapter in one call
    pipeline_tag: str        # the hub's pipeline tag, for the model card
    heads: tuple[str, ...]   # output heads peft trains in full (adds to modules_to_save)
    labelled: bool           # a classification head: num_labels, id2label, label2id
    metrics: tuple[str, ...] = ()  # metrics.json eval.metrics names (higher is better), the headline first


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("causal_lm", "CAUSAL_LM", "AutoModelForCausalLM", "AutoPeftModelForCausalLM", "text-generation", (), False,
         ("exact_match", "contains")),
    Task("seq_cls", "SEQ_CLS", "AutoModelForSequenceClassification", "AutoPeftModelForSequenceClassification",
         "text-classification", ("classifier", "score"), True, ("accuracy", "macro_f1")),
    Task("token_cls", "TOKEN_CLS", "AutoModelForTokenClassification", "AutoPeftModelForTokenClassification",
         "token-classification", ("classifier", "score"), True,
         ("token_accuracy", "entity_f1", "entity_precision", "entity_recall")),
    Task("seq2seq_lm", "SEQ_2_SEQ_LM", "AutoModelForSeq2SeqLM", "AutoPeftModelForSeq2SeqLM",
         "text2text-generation", (), False,
         ("exact_match", "contains")),
)}
DEFAULT = "causal_lm"


def task(name: str | None) -> Task:
    """The row for a recipe's model.task (causal_lm when unset)."""
    return TASKS[name or DEFAULT]


def from_peft_type(task_type: str | None) -> Task:
    """The row for an adapter_config.json's task_type (a plain peft adapter may have none: causal LM)."""
    for t in TASKS.values():
        if t.peft_task_type == (task_type or "CAUSAL_LM"):
            return t
    return TASKS[DEFAULT]


def auto_model_class(name: str | None):
    """The transformers Auto class for a task (imports transformers)."""
    import transformers

    return getattr(transformers, task(name).auto_model)
