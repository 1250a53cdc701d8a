"""The task table: everything lorafit does differently per ``model.task``, in one place.

Adding a task means adding one row here. Nothing else in lorafit names a task, a transformers Auto class or a
peft task type: the recipe's schema, the data stage, evaluation, the commands and the CLI ask this table
(``tests/unit/test_architecture.py`` keeps it so).
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
    formats: tuple[str, ...] = ()  # the data.format values its rows come in; the only one, or the first, is its own
    rows: str = ""           # what its rows hold, for messages
    generates: bool = False  # answers with text (generate, evaluation.prompts, greedy metrics, perplexity)
    encoder_decoder: bool = False  # a source for the encoder, a target the decoder writes
    per_word: bool = False   # one label per word (pre-split words, each tokenized alone)
    scorer: str = ""         # "module:function" of its evaluate-stage metrics (stages.evaluate.TaskMetrics)

    @property
    def causal(self) -> bool:
        """A decoder-only language model: prompt and answer share one context (packing, Liger's fused loss,
        evaluation.prompts' context check)."""
        return self.generates and not self.encoder_decoder

    @property
    def row_label(self) -> bool:
        """One class for the whole row (its labels are one integer, not a sequence)."""
        return self.labelled and not self.per_word

    @property
    def reference_in_labels(self) -> bool:
        """Its metrics' reference answer is the trained span after the prompt (stages.evaluate.split_row): rows
        trained whole (data.format text, data.train_on_inputs) have none to compare with."""
        return self.causal

    @property
    def servable(self) -> bool:
        """`lorafit serve` answers it: a decoder that generates (chat and text completions) or a labelled head
        (POST /v1/classify)."""
        return self.causal or self.labelled


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("causal_lm", "CAUSAL_LM", "AutoModelForCausalLM", "AutoPeftModelForCausalLM", "text-generation", (), False,
         ("exact_match", "contains"), formats=("text", "alpaca", "chat", "completion"),
         rows="a text, or a prompt and its response", generates=True,
         scorer="lorafit.stages.evaluate:causal_lm_metrics"),
    Task("seq_cls", "SEQ_CLS", "AutoModelForSequenceClassification", "AutoPeftModelForSequenceClassification",
         "text-classification", ("classifier", "score"), True, ("accuracy", "macro_f1"), formats=("classification",),
         rows="rows with text and label", scorer="lorafit.stages.evaluate:classification_metrics"),
    Task("token_cls", "TOKEN_CLS", "AutoModelForTokenClassification", "AutoPeftModelForTokenClassification",
         "token-classification", ("classifier", "score"), True,
         ("token_accuracy", "entity_f1", "entity_precision", "entity_recall"), formats=("tokens",),
         rows="rows with a list of words and one tag each", per_word=True,
         scorer="lorafit.stages.token_eval:token_metrics"),
    Task("seq2seq_lm", "SEQ_2_SEQ_LM", "AutoModelForSeq2SeqLM", "AutoPeftModelForSeq2SeqLM",
         "text2text-generation", (), False,
         ("exact_match", "contains"), formats=("seq2seq",), rows="rows with source and target", generates=True,
         encoder_decoder=True, scorer="lorafit.stages.seq2seq_eval:seq2seq_metrics"),
)}
DEFAULT = "causal_lm"


def task(name: str | None) -> Task:
    """The row for a recipe's model.task (causal_lm when unset)."""
    return TASKS[name or DEFAULT]


def known(name: str, *, where: str) -> Task:
    """The row for a task named on the command line (find-targets --task); an unknown name is the user's mistake,
    with the closest name and the list."""
    if name in TASKS:
        return TASKS[name]
    import difflib

    from lorafit.errors import LorafitError

    close = difflib.get_close_matches(name, list(TASKS), n=1, cutoff=0.5)
    hint = f"did you mean '{close[0]}'? The tasks: " if close else "use one of: "
    raise LorafitError(f"unknown task '{name}'", where=where, fix=hint + ", ".join(TASKS))


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


def format_problem(name: str, fmt: str) -> str | None:
    """Why rows of data.format *fmt* cannot train task *name* ("dotted.path: what; the fix"), or None."""
    for t in TASKS.values():
        if len(t.formats) != 1:  # a task with several formats takes every format no other task owns
            continue
        own = t.formats[0]
        if name == t.name and fmt != own:
            return f"data.format: {t.name} needs format '{own}' ({t.rows})"
        if fmt == own and name != t.name:
            return f"model.task: format '{own}' needs task '{t.name}'" + (" (an encoder-decoder model)"
                                                                          if t.encoder_decoder else "")
    return None


def language_model(config) -> Task:
    """The generative task a checkpoint's own weights serve (a GGUF file holds a language model and its output
    head): the encoder-decoder row for an encoder-decoder config, else the decoder-only one. Other tasks load
    that checkpoint and draw their head afresh."""
    wanted = bool(getattr(config, "is_encoder_decoder", False))
    return next(t for t in TASKS.values() if t.generates and t.encoder_decoder == wanted)
