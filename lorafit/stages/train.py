"""Train stage: transformers' Trainer, configured from the recipe's training section.

Why Trainer rather than a hand loop on accelerate: it already does gradient accumulation, schedulers,
mixed precision, resumable checkpoints (optimizer, scheduler, RNG) and torchrun/accelerate
distribution, and peft models plug into it. We add only what it lacks: a progress bar with tokens/s,
a loss history, and NaN losses that are reported rather than filtered.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

from lorafit import log
from lorafit.core import policies
from lorafit.errors import LorafitError, RunFailed
from lorafit.recipe import EvaluationSpec, TrainingSpec

_NEVER = 10**9  # "only at the end": Trainer saves/evaluates at the last step for step strategies


def training_arguments(spec: TrainingSpec, evaluation: EvaluationSpec, *, output_dir: Path, precision: str,
                       gradient_checkpointing: bool, has_eval: bool, run_name: str):
    import torch
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(output_dir),
        run_name=run_name,
        num_train_epochs=spec.epochs,
        max_steps=spec.max_steps or -1,
        per_device_train_batch_size=spec.batch_size,
        per_device_eval_batch_size=evaluation.batch_size or spec.batch_size,
        gradient_accumulation_steps=spec.grad_accum,
        learning_rate=spec.learning_rate,
        lr_scheduler_type=spec.lr_scheduler,
        warmup_steps=spec.warmup_ratio,  # transformers 5: a float < 1 is a ratio of the total steps
        weight_decay=spec.weight_decay,
        max_grad_norm=spec.max_grad_norm,
        optim=policies.optimizer(spec.optim),
        **_checkpointing_args(TrainingArguments, gradient_checkpointing),
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not torch.cuda.is_available(),
        logging_steps=spec.logging_steps,
        logging_first_step=True,
        logging_nan_inf_filter=False,  # a NaN loss must show, not be averaged away
        eval_strategy="steps" if (has_eval and spec.eval_steps) else "no",
        eval_steps=spec.eval_steps,
        save_strategy="steps",
        save_steps=spec.save_steps or _NEVER,
        save_total_limit=spec.save_total_limit,
        seed=spec.seed,
        data_seed=spec.seed,
        report_to=[] if spec.report_to == "none" else [spec.report_to],
        disable_tqdm=True,  # our own bar shows loss and tokens/s
        remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding",
        ddp_find_unused_parameters=False,
        dataloader_num_workers=0,
    )


def _checkpointing_args(args_class, enabled: bool) -> dict:
    # transformers renamed gradient_checkpointing → activation_checkpointing (the old name warns).
    import dataclasses

    names = {f.name for f in dataclasses.fields(args_class)}
    prefix = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return {prefix: enabled, f"{prefix}_kwargs": policies.GRADIENT_CHECKPOINTING_KWARGS if enabled else None}


def _progress_callback():
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        """On a terminal, one bar on stderr: step/total, loss, tokens/s, ETA. Elsewhere (CI logs, files),
        one plain line per logging step instead of a bar redrawn thousands of times on one line."""

        def __init__(self):
            self.bar = None
            self.main = False
            self.start = None
            self.start_step = 0
            self.start_tokens = 0

        def on_train_begin(self, args, state, control, **kw):
            self.main = state.is_world_process_zero
            self.start, self.start_step = time.perf_counter(), state.global_step
            self.start_tokens = state.num_input_tokens_seen
            if self.main and sys.stderr.isatty():
                self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="train", unit="step",
                                dynamic_ncols=True, leave=True)

        def _rate(self, state) -> tuple[float, float]:
            elapsed = max(time.perf_counter() - self.start, 1e-9)
            tps = (state.num_input_tokens_seen - self.start_tokens) / elapsed
            done = state.global_step - self.start_step
            eta = elapsed / done * (state.max_steps - state.global_step) if done else float("nan")
            return tps, eta

        def on_step_end(self, args, state, control, **kw):
            # Log the last step too, between logging_steps: final_loss must be the final step's loss.
            if state.global_step >= state.max_steps:
                control.should_log = True
            if self.bar is not None:
                self.bar.update(state.global_step - self.bar.n)
                tps, _ = self._rate(state)
                self.bar.set_postfix_str(f"loss={self._last_loss(state)} tok/s={tps:,.0f}", refresh=False)

        def on_log(self, args, state, control, logs=None, **kw):
            if self.main and self.bar is None and logs and "loss" in logs:
                tps, eta = self._rate(state)
                eta_text = time.strftime("%H:%M:%S", time.gmtime(eta)) if math.isfinite(eta) else "-"
                log.info(f"step {state.global_step}/{state.max_steps}  loss {logs['loss']:.4f}  "
                         f"tok/s {tps:,.0f}  eta {eta_text}")

        def on_evaluate(self, args, state, control, metrics=None, **kw):
            if self.main and metrics and "eval_loss" in metrics:
                line = f"step {state.global_step}: eval_loss={metrics['eval_loss']:.4f}"
                self.bar.write(line) if self.bar is not None else log.info(line)

        def on_train_end(self, args, state, control, **kw):
            if self.bar is not None:
                self.bar.close()

        @staticmethod
        def _last_loss(state):
            for entry in reversed(state.log_history):
                if "loss" in entry:
                    return f"{entry['loss']:.4f}"
            return "-"

    return Progress()


def _nan_guard():
    from transformers import TrainerCallback

    class NanGuard(TrainerCallback):
        """Stop at the first NaN/inf loss, before a checkpoint of poisoned weights is written."""

        def on_log(self, args, state, control, logs=None, **kw):
            loss = (logs or {}).get("loss")
            if loss is not None and not math.isfinite(loss):
                control.should_training_stop = True
                control.should_save = False

    return NanGuard()


def _drop_checkpoints_after(checkpoints: Path, step: int) -> None:
    """Checkpoints past the last finite loss may hold NaN weights: --resume must not pick them up."""
    import shutil

    for ckpt in checkpoints.glob("checkpoint-*"):
        suffix = ckpt.name.rsplit("-", 1)[-1]
        if suffix.isdigit() and int(suffix) > step:
            shutil.rmtree(ckpt, ignore_errors=True)


def build_trainer(model, args, collator, *, train_dataset=None, eval_dataset=None):
    from transformers import Trainer
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer = Trainer(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                      data_collator=collator)
    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)  # they print raw dicts to stdout, which --json keeps clean
    return trainer


def train_model(model, bundle, args, *, resume_from: str | None = None):
    """Run the Trainer. Returns (trainer, summary dict)."""
    trainer = build_trainer(model, args, bundle.collator, train_dataset=bundle.train, eval_dataset=bundle.eval)
    trainer.add_callback(_progress_callback())
    trainer.add_callback(_nan_guard())
    start = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=resume_from)
    seconds = time.perf_counter() - start
    history = [
        {k: entry[k] for k in ("step", "loss", "learning_rate", "grad_norm") if k in entry}
        for entry in trainer.state.log_history if "loss" in entry
    ]
    losses = [h["loss"] for h in history]
    if any(not math.isfinite(x) for x in losses) or not math.isfinite(output.training_loss):
        step = next((h["step"] for h in history if not math.isfinite(h["loss"])), trainer.state.global_step)
        last_good = max((h["step"] for h in history if math.isfinite(h["loss"]) and h["step"] < step), default=0)
        _drop_checkpoints_after(Path(args.output_dir), last_good)
        raise RunFailed(f"the training loss became NaN/inf at step {step}; no adapter was saved",
                        where="training.learning_rate",
                        fix="lower the learning rate, use precision fp32/bf16 instead of fp16, or check the data")
    tokens = int(trainer.state.num_input_tokens_seen)
    summary = {
        "steps": trainer.state.global_step,
        "epochs": round(trainer.state.epoch or 0.0, 4),
        "train_loss": output.training_loss,
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "loss_history": history,
        "tokens_seen": tokens,
        "train_seconds": round(seconds, 3),
        "train_tokens_per_second": round(tokens / seconds, 2) if seconds > 0 else None,
    }
    return trainer, summary


def find_checkpoint(checkpoints_dir: Path, resume: str | None) -> str | None:
    """--resume → the latest checkpoint in the run; --resume PATH → that checkpoint."""
    if resume is None:
        return None
    from transformers.trainer_utils import get_last_checkpoint

    if resume == "latest":
        last = get_last_checkpoint(str(checkpoints_dir)) if checkpoints_dir.is_dir() else None
        if last is None:
            raise LorafitError(f"no checkpoint to resume from in {checkpoints_dir}", where="--resume",
                               fix="train without --resume, or pass a checkpoint directory")
        return last
    path = Path(resume)
    if not path.exists():
        raise LorafitError(f"checkpoint not found: {path}", where="--resume",
                           fix=f"pass one of {checkpoints_dir}/checkpoint-*, or --resume alone for the latest")
    if not (path / "trainer_state.json").is_file():
        raise LorafitError(f"{path} is not a checkpoint (no trainer_state.json)", where="--resume",
                           fix=f"pass one of {checkpoints_dir}/checkpoint-*")
    return str(path)


_RESUME_KEYS = ("r", "lora_alpha", "target_modules", "use_dora", "use_rslora", "modules_to_save", "layers_to_transform")


def check_checkpoint(checkpoint: str, peft_model) -> None:
    """The checkpoint's adapter must have the shape the recipe now asks for, or loading it fails deep."""
    import json

    saved_file = Path(checkpoint) / "adapter_config.json"
    if not saved_file.is_file():
        return
    saved = json.loads(saved_file.read_text(encoding="utf-8"))
    current = peft_model.peft_config["default"].to_dict()

    def norm(value):
        return sorted(value) if isinstance(value, (list, set, tuple)) else value

    for key in _RESUME_KEYS:
        if key in saved and norm(saved[key]) != norm(current.get(key)):
            raise LorafitError(f"{Path(checkpoint).name} was trained with {key}={norm(saved[key])}, the recipe now "
                               f"gives {norm(current.get(key))}", where="--resume",
                               fix="resume with the recipe that made the checkpoint, or train afresh without --resume")


def peak_memory() -> dict:
    import resource

    import torch

    peak = {"cpu_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if torch.cuda.is_available():
        peak["gpu_peak_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return peak


def warn_if_untrained(summary: dict) -> None:
    """A run that 'succeeded' without learning: say so instead of saving a silent no-op adapter."""
    frozen = [h["step"] for h in summary.get("loss_history", []) if h.get("grad_norm") == 0.0]
    if frozen:
        log.warn(f"gradient norm was 0 at step {frozen[0]}: the LoRA weights stopped moving "
                 "(learning rate far too high or too low, or every label masked)")
    first, final = summary.get("first_loss"), summary.get("final_loss")
    # Fewer steps than this are mostly warmup: no verdict.
    if first is not None and final is not None and summary["steps"] >= 10 and final >= first:
        log.warn(f"loss did not fall ({first:.4f} → {final:.4f}); check the learning rate and the data")
