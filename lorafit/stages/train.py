"""Train stage: transformers' Trainer, configured from the recipe's training section.

Why Trainer rather than a hand loop on accelerate: it already does gradient accumulation, schedulers,
mixed precision, resumable checkpoints (optimizer, scheduler, RNG) and torchrun/accelerate
distribution, and peft models plug into it. We add only what it lacks: a progress bar with tokens/s,
a loss history, and NaN losses that are reported rather than filtered.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

from lorafit import log
from lorafit.core import distributed, libs, policies
from lorafit.core.files import replace_dir
from lorafit.errors import RunFailed, TrainingInterrupted
from lorafit.recipe import EvaluationSpec, TrainingSpec
from lorafit.stages.resume import check_checkpoint, find_checkpoint  # noqa: F401  (their former home; see the end)
from lorafit.stages.resume import drop_checkpoints_after, latest_checkpoint

_NEVER = 10**9  # "only at the end": Trainer saves/evaluates at the last step for step strategies


def training_arguments(spec: TrainingSpec, evaluation: EvaluationSpec, *, output_dir: Path, precision: str,
                       gradient_checkpointing: bool, has_eval: bool, run_name: str, packed: bool = False,
                       liger: bool = False):
    """*liger*: policies.liger's decision (it needs the model type and the machine, not only the spec)."""
    from transformers import TrainingArguments

    keep_best = bool(spec.keep_best and has_eval and spec.eval_steps)

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
        use_cpu=policies.this_device() == "cpu",
        logging_steps=spec.logging_steps,
        logging_first_step=True,
        logging_nan_inf_filter=False,  # a NaN loss must show, not be averaged away
        eval_strategy="steps" if (has_eval and spec.eval_steps) else "no",
        eval_steps=spec.eval_steps,
        save_strategy="steps",
        # training.keep_best: a checkpoint at every evaluation, the best one's adapter loaded at the end (and
        # never evicted by the rotation, timed checkpoints included: AtomicCheckpointTrainer keeps its path)
        save_steps=spec.eval_steps if keep_best else spec.save_steps or _NEVER,
        save_total_limit=spec.save_total_limit,
        **({"load_best_model_at_end": True, "metric_for_best_model": "eval_loss", "greater_is_better": False}
           if keep_best else {}),
        seed=spec.seed,
        data_seed=spec.seed,
        report_to=[] if spec.report_to == "none" else [spec.report_to],
        disable_tqdm=True,  # our own bar shows loss and tokens/s
        remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding",
        ddp_find_unused_parameters=False,
        dataloader_num_workers=0,
        # Similar lengths in a batch: dynamic padding then pads little. Packed blocks are near-equal already.
        train_sampling_strategy="group_by_length" if spec.group_by_length and not packed else "random",
        torch_compile=spec.compile,  # inductor; compiled when the Trainer prepares the model
        use_liger_kernel=liger,
        **distributed.trainer_kwargs(spec.distributed),
    )


# What a refusal of transformers / accelerate names → the recipe field to change, and how.
_REFUSALS = (
    (("bf16", "fp16", "mixed precision", "mixed_precision"), "training.precision",
     "set training.precision: auto (bf16 where the GPU computes in it, else fp32)"),
    (("deepspeed",), "training.distributed", "install deepspeed, or set training.distributed.strategy: ddp"),
    (("fsdp", "auto_wrap_policy"), "training.distributed.config",
     "fix that file (transformers' fsdp_config keys), or set config: null for lorafit's defaults"),
    (("optim",), "training.optim", "choose another training.optim"),
    (("eval",), "training.eval_steps", "change training.eval_steps"),
    (("save",), "training.save_steps", "change training.save_steps"),
)


def run_arguments(recipe, *, run_dir: Path, precision: str, has_eval: bool, model_type: str | None):
    """The run's real TrainingArguments, built before any weight loads and before anything is written (`validate`
    builds them too): what transformers or accelerate refuse there (their precision and device checks, a
    distributed config they cannot read, accelerate's ACCELERATE_* environment) is the user's mistake, exit 2,
    naming what to change, never a failure after gigabytes of weights have loaded."""
    import os
    import re

    from lorafit.core import rundir
    from lorafit.errors import RecipeError

    try:
        return training_arguments(
            recipe.training, recipe.evaluation, output_dir=Path(run_dir) / rundir.CHECKPOINTS, precision=precision,
            gradient_checkpointing=policies.gradient_checkpointing(recipe), has_eval=has_eval,
            run_name=recipe.output.run_name or Path(run_dir).name, packed=recipe.data.packing,
            liger=policies.liger(recipe.training, recipe.model.task, model_type))
    except (ValueError, ImportError, RuntimeError, OSError) as e:  # PackageNotFoundError is an ImportError
        first = (str(e).strip().splitlines() or [type(e).__name__])[0].strip().rstrip(".")
        said = first.lower()
        where, fix = next(((w, f) for words, w, f in _REFUSALS if any(k in said for k in words)),
                          ("training", "change the setting transformers names"))
        # accelerate reads its own configuration from the environment: one that asks for what the recipe does not.
        env = sorted(k for k in os.environ if k.startswith("ACCELERATE_"))
        words = set(re.findall(r"[a-z0-9]+", said)) - {"accelerate", "use"}
        asked = [k for k in env if words & set(k.lower().split("_"))]
        if asked:
            where = f"environment {', '.join(asked)}"
            fix = f"unset {' and '.join(asked)} (accelerate's; lorafit takes the strategy and precision from the recipe)"
        elif env:
            fix += f"; accelerate also reads {', '.join(env)} from the environment"
        raise RecipeError(f"transformers refuses the training arguments: {first}", where=where, fix=fix) from None


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
        """On a terminal, one bar on stderr: step/total, loss, learning rate, grad norm, tokens/s, ETA; and
        one for evaluation batches. Elsewhere (CI logs, files), one plain line per logging step and a few
        per evaluation, instead of a bar redrawn thousands of times on one line.

        The loss shown is the one just logged (on_log runs after on_step_end: reading the log history in
        on_step_end would show a loss two steps old), and the last step is always logged."""

        def __init__(self):
            self.bar = None
            self.eval_bar = None
            self.eval_done = 0
            self.main = False
            self.start = None
            self.start_step = 0
            self.start_tokens = 0
            self.last = "loss=-"
            self.training = False

        def on_train_begin(self, args, state, control, **kw):
            self.main = distributed.is_main_process()
            self.training = True
            self.start, self.start_step = time.perf_counter(), state.global_step
            self.start_tokens = state.num_input_tokens_seen
            if self.main and sys.stderr.isatty():
                self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="train", unit="step",
                                dynamic_ncols=True, leave=True)

        def _rate(self, state) -> tuple[float, float]:
            elapsed = max(time.perf_counter() - (self.start or time.perf_counter()), 1e-9)
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
                self.bar.set_postfix_str(f"{self.last} tok/s={tps:,.0f}", refresh=False)

        def on_log(self, args, state, control, logs=None, **kw):
            if not (self.main and logs and "loss" in logs):
                return
            parts = [f"loss {logs['loss']:.4f}"]
            if "learning_rate" in logs:
                parts.append(f"lr {logs['learning_rate']:.3g}")
            if logs.get("grad_norm") is not None:
                parts.append(f"grad_norm {logs['grad_norm']:.3g}")
            self.last = "  ".join(parts)
            tps, eta = self._rate(state)
            if self.bar is not None:
                self.bar.set_postfix_str(f"{self.last}  tok/s {tps:,.0f}", refresh=True)
                return
            eta_text = time.strftime("%H:%M:%S", time.gmtime(eta)) if math.isfinite(eta) else "-"
            log.info(f"step {state.global_step}/{state.max_steps}  {self.last}  tok/s {tps:,.0f}  eta {eta_text}")

        def on_prediction_step(self, args, state, control, eval_dataloader=None, **kw):
            if not distributed.is_main_process() or eval_dataloader is None:
                return
            try:
                total = len(eval_dataloader)
            except TypeError:
                return
            self.eval_done += 1
            if sys.stderr.isatty():
                if self.eval_bar is None:
                    self.eval_bar = tqdm(total=total, desc="eval", unit="batch", dynamic_ncols=True, leave=False)
                self.eval_bar.update(1)
            elif total >= 8 and self.eval_done % max(1, total // 4) == 0 and self.eval_done < total:
                log.info(f"eval: {self.eval_done}/{total} batches")

        def on_evaluate(self, args, state, control, metrics=None, **kw):
            if self.eval_bar is not None:
                self.eval_bar.close()
                self.eval_bar = None
            self.eval_done = 0
            # Training's periodic evaluations, once each; the evaluate stage's passes after training are its
            # own to report (the closing summary), not a second "eval loss" at the last step.
            key = next((k for k in (metrics or {}) if k.endswith("_loss")), None)
            if distributed.is_main_process() and key is not None and self.training:
                line = f"step {state.global_step}: eval loss {metrics[key]:.4f}"
                self.bar.write(line) if self.bar is not None else log.info(line)

        def on_predict(self, args, state, control, metrics=None, **kw):
            # Trainer.predict (the evaluate stage's classification metrics): the batch count starts again.
            if self.eval_bar is not None:
                self.eval_bar.close()
                self.eval_bar = None
            self.eval_done = 0

        def on_train_end(self, args, state, control, **kw):
            self.training = False
            if self.bar is not None:
                self.bar.close()
                self.bar = None

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


# Watchdog thresholds (docs/data.md, "While training").
FROZEN_CHECK_STEP = 2      # optimizer steps after which a zero-initialised lora_B must have moved
DIVERGENCE_FACTOR = 3.0    # a logged loss above 3× the first logged loss ...
DIVERGENCE_MARGIN = 1.0    # ... and at least 1 nat above it (tiny first losses are noisy) ...
DIVERGENCE_MIN_STEP = 3    # ... from optimizer step 3 on (step 1 is the reference)


def _lora_b_all_zero(model) -> bool:
    """True when the model has LoRA B matrices and every one is exactly zero (peft's initial value)."""
    found = False
    for name, p in model.named_parameters():
        if ".lora_B." in name and p.numel():
            found = True
            if p.detach().count_nonzero():
                return False
    return found


def _frozen_guard():
    from transformers import TrainerCallback

    class FrozenGuard(TrainerCallback):
        """lora_B starts at exactly zero and moves with the first nonzero gradient (warmup's first step may
        have learning rate 0, hence two steps). Still all zero after that: no gradient reaches LoRA (a
        frozen graph, gradient checkpointing without input grads) and the run would save a no-op adapter.
        Stop then, without a checkpoint; train_model raises."""

        def __init__(self):
            self.start = None
            self.frozen_at = None

        def on_train_begin(self, args, state, control, **kw):
            self.start = state.global_step

        def on_step_end(self, args, state, control, model=None, **kw):
            if self.start is None or model is None or state.global_step < self.start + FROZEN_CHECK_STEP:
                return
            self.start = None  # checked once per train() call
            if _lora_b_all_zero(model):
                self.frozen_at = state.global_step
                control.should_training_stop = True
                control.should_save = False

    return FrozenGuard()


def _divergence_watch():
    from transformers import TrainerCallback

    class DivergenceWatch(TrainerCallback):
        """Warn (once) when the loss climbs far above where it started: the learning rate is too high."""

        def __init__(self):
            self.first = None
            self.diverged_at = None

        def on_log(self, args, state, control, logs=None, **kw):
            loss = (logs or {}).get("loss")
            if loss is None or not math.isfinite(loss):
                return
            if self.first is None:
                self.first = loss
                return
            if (self.diverged_at is None and state.global_step >= DIVERGENCE_MIN_STEP
                    and loss > DIVERGENCE_FACTOR * self.first and loss > self.first + DIVERGENCE_MARGIN):
                self.diverged_at = state.global_step
                log.warn(f"the loss is diverging: {loss:.4f} at step {state.global_step}, more than "
                         f"{DIVERGENCE_FACTOR:g}× the first logged loss ({self.first:.4f}); lower "
                         f"training.learning_rate (now {args.learning_rate:g}) or raise training.warmup_ratio")

    return DivergenceWatch()


def _frozen_failure(step: int, args) -> RunFailed:
    gc = bool(getattr(args, "activation_checkpointing", getattr(args, "gradient_checkpointing", False)))
    cause = ("gradient checkpointing is on and the checkpointed layers' inputs do not require grad"
             if gc else "the LoRA parameters are cut off from the loss (requires_grad=False or a detached graph)")
    fix = ("keep non-reentrant checkpointing (use_reentrant=False) or call model.enable_input_require_grads(); "
           "set training.gradient_checkpointing: false to confirm" if gc
           else "make sure nothing sets requires_grad=False on the lora_ parameters or detaches their output")
    return RunFailed(f"the LoRA weights did not move: every lora_B is still exactly zero after {step} optimizer "
                     f"steps, so no gradient reaches them (likely: {cause}); no adapter was saved",
                     where="training.gradient_checkpointing" if gc else "lora", fix=fix)


def _trainer_class():
    from transformers import Trainer
    from transformers.trainer_utils import rotate_checkpoints

    class AtomicCheckpointTrainer(Trainer):
        """Trainer (transformers 5.x writes checkpoint-N in place) whose checkpoints appear whole or not
        at all: written into checkpoints/.partial-checkpoint-N, then renamed into place. A crash or a second
        Ctrl-C mid-save leaves the last good checkpoint as it was; `--resume` never picks up a partial one."""

        _staging: str | None = None
        _saving: str | None = None  # checkpoint-N while it is being written, until it is renamed into place

        def _get_train_sampler(self, train_dataset=None):
            # training.group_by_length: the whole epoch sorted by length (stages/sampler.py), not transformers'
            # megabatches of 50 batches, which leave several times the padding.
            dataset = train_dataset if train_dataset is not None else self.train_dataset
            if self.args.train_sampling_strategy != "group_by_length" or \
                    "input_ids" not in (getattr(dataset, "column_names", None) or ()):
                return super()._get_train_sampler(train_dataset)
            from lorafit.stages.sampler import length_bucketed_sampler, row_lengths

            config = getattr(self.accelerator.unwrap_model(self.model), "config", None)
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            self._bucketed = length_bucketed_sampler(
                row_lengths(dataset, bool(getattr(config, "is_encoder_decoder", False))), self._train_batch_size, seed)
            return self._bucketed

        def _run_epoch(self, model, epoch, *args, **kwargs):
            # Resumed at the last step (a run whose final save was cut short): transformers would still train
            # one step of the epoch before its stop check (step 9/8). Nothing is left to train.
            if self.state.global_step >= self.state.max_steps:
                self.control.should_training_stop = True
                return None
            # The epoch reaches the sampler here: under several processes (or a resume, whose skipping wrapper
            # hides it) accelerate's set_epoch does not find it, and a resumed epoch must replay its own order.
            if getattr(self, "_bucketed", None) is not None:
                self._bucketed.set_epoch(epoch)
            return super()._run_epoch(model, epoch, *args, **kwargs)

        _trained_tokens = 0  # tokens with a loss so far, all ranks (restored from a checkpoint on resume)

        def _track_num_input_tokens(self, inputs):
            self._count_trained_tokens(inputs)
            # A packed batch has no attention_mask: count its real tokens from the position ids, so that
            # train_tokens_per_second stays non-pad tokens per second.
            if "attention_mask" in inputs or "position_ids" not in inputs or \
                    self.args.include_num_input_tokens_seen != "non_padding":
                return super()._track_num_input_tokens(inputs)
            import torch

            from lorafit.stages.packing import real_tokens

            count = torch.as_tensor(real_tokens(inputs["position_ids"]), device=self.args.device, dtype=torch.int64)
            self.state.num_input_tokens_seen += self.accelerator.gather(count).sum().item()

        def _count_trained_tokens(self, inputs) -> None:
            """The batch's trained tokens (those with a loss): its labels other than -100; for a class per row
            (seq_cls), the row's tokens, which together make its one prediction (as the data stage counts)."""
            import torch

            labels = inputs.get("labels")
            if labels is None:
                return
            if labels.dim() == 1:
                mask = inputs.get("attention_mask")
                count = mask.sum() if mask is not None else torch.tensor(inputs["input_ids"].numel())
            else:
                count = (labels != -100).sum()
            count = count.to(device=self.args.device, dtype=torch.int64).reshape(1)
            self._trained_tokens += int(self.accelerator.gather(count).sum().item())

        def _get_output_dir(self, trial):
            return self._staging or super()._get_output_dir(trial)

        def _save_checkpoint(self, model, trial):
            run_dir = Path(super()._get_output_dir(trial))
            name = f"checkpoint-{self.state.global_step}"
            staging = run_dir / f".partial-{name}"
            self._saving = name
            if self.args.should_save:
                shutil.rmtree(staging, ignore_errors=True)
            self.accelerator.wait_for_everyone()
            self._staging = str(staging)
            try:
                with libs.no_vocabulary_lookup():  # peft would ask the hub at each checkpoint (core.libs)
                    super()._save_checkpoint(model, trial)  # every rank writes its RNG state there too
                if self.args.should_save:  # the trained-token count, which the Trainer's own state has no place for
                    (staging / name / TRAINED_TOKENS_FILE).write_text(
                        json.dumps({"trained_tokens": self._trained_tokens}) + "\n", encoding="utf-8")
            finally:
                self._staging = None
            self.accelerator.wait_for_everyone()
            if self.args.should_save:
                replace_dir(staging / name, run_dir / name)
                self._saving = None
                shutil.rmtree(staging, ignore_errors=True)
                self._point_at_best(run_dir, run_dir / name)
                rotate_checkpoints(str(run_dir), save_total_limit=self.args.save_total_limit,
                                   best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
            self.accelerator.wait_for_everyone()
            self._saving = None

        def _point_at_best(self, run_dir: Path, written: Path) -> None:
            # transformers names the best checkpoint inside the staging directory the save wrote to: after the
            # rename, the best is checkpoint-<best step> here (the rotation keeps it; load_best_model_at_end
            # loads it), and the state saved in the new checkpoint must say so too.
            if not self.state.best_global_step:
                return
            import json

            best = run_dir / f"checkpoint-{self.state.best_global_step}"
            self.state.best_model_checkpoint = str(best) if best.is_dir() else None
            state_file = written / "trainer_state.json"
            if state_file.is_file():
                state = json.loads(state_file.read_text(encoding="utf-8"))
                state["best_model_checkpoint"] = self.state.best_model_checkpoint
                state_file.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    return AtomicCheckpointTrainer


def build_trainer(model, args, collator, *, train_dataset=None, eval_dataset=None):
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer = _trainer_class()(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                               data_collator=collator)
    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)  # they print raw dicts to stdout, which --json keeps clean
    return trainer


class StopRequest:
    """Ctrl-C / SIGTERM while the Trainer runs: the first signal only sets a flag (the current step
    finishes, a checkpoint is written, train_model raises TrainingInterrupted); a second one stops at once
    (KeyboardInterrupt; the checkpoints already renamed into place stay whole)."""

    def __init__(self):
        self.signum: int | None = None
        self.announced = False

    def _handler(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum  # no printing here: a signal handler may interrupt a write to stderr

    @contextlib.contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.signal(s, self._handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def _stop_and_clock(stop: StopRequest, save_minutes: float | None):
    from transformers import TrainerCallback

    class StopAndClock(TrainerCallback):
        """After each optimizer step: a checkpoint when save_minutes have passed since the last one, or
        checkpoint and stop when a signal came. Every checkpoint's step is logged too, so that the loss log a
        checkpoint carries covers every step before it (a resumed run's train_loss covers the whole run).
        Under torchrun the ranks agree first (one all-reduce per step), or they would deadlock in the save."""

        def __init__(self):
            self.last_save = time.monotonic()
            self.start_step = self.start_tokens = 0

        def on_train_begin(self, args, state, control, **kw):
            self.last_save = time.monotonic()
            self.start_step, self.start_tokens = state.global_step, state.num_input_tokens_seen

        def on_step_end(self, args, state, control, **kw):
            due = save_minutes is not None and time.monotonic() - self.last_save >= save_minutes * 60
            stop_now, due = distributed.agree(args, stop.signum is not None, due)
            if stop_now and state.global_step < state.max_steps:
                if not stop.announced and distributed.is_main_process():
                    log.warn(f"{signal.Signals(stop.signum or signal.SIGINT).name}: finishing step "
                             f"{state.global_step}, writing a checkpoint (again to stop at once)")
                stop.announced = True
                control.should_training_stop = True
                due = True
            if due:
                control.should_save = True
            if control.should_save:
                control.should_log = True

        def on_save(self, args, state, control, **kw):
            self.last_save = time.monotonic()

    return StopAndClock()


def _resume_notice(checkpoint: str | None):
    from transformers import TrainerCallback

    class ResumeNotice(TrainerCallback):
        """Where a resumed run starts ("resuming from checkpoint-18, step 18/30"), and what a changed run length
        does to the learning rate: the Trainer builds the schedule afresh for the new length and continues it at
        the checkpoint's step, so a decayed rate rises again: said, never done silently."""

        def on_train_begin(self, args, state, control, lr_scheduler=None, **kw):
            if checkpoint is None or not distributed.is_main_process():
                return
            log.info(f"resuming from {Path(checkpoint).name}, step {state.global_step}/{state.max_steps}")
            planned = _planned_steps(checkpoint)
            if planned and planned != state.max_steps and lr_scheduler is not None:
                change = schedule_change(lr_scheduler, getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type),
                                         state.global_step, planned, state.max_steps)
                if change:
                    log.warn(change)

    return ResumeNotice()


def _planned_steps(checkpoint: str) -> int | None:
    """The run length the checkpoint's run was scheduled for (its trainer_state.json's max_steps)."""
    import json

    try:
        return int(json.loads((Path(checkpoint) / "trainer_state.json").read_text(encoding="utf-8"))["max_steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def schedule_change(lr_scheduler, kind: str, step: int, planned: int, now: int) -> str | None:
    """The learning rate where the checkpoint's schedule (for *planned* steps) stood at *step*, and where the one
    recomputed for *now* steps puts it; None when they agree (a constant schedule)."""
    try:
        base = lr_scheduler.base_lrs[0]
        rate = lr_scheduler.lr_lambdas[0]
        old, new, end = lr_scheduler.get_last_lr()[0], base * rate(step), base * rate(now)
    except (AttributeError, IndexError, TypeError):
        return None
    if math.isclose(old, new, rel_tol=1e-6, abs_tol=1e-12):
        return None
    way = "rises" if new > old else "falls"
    return (f"training.max_steps {planned} → {now}: the {kind} learning-rate schedule is recomputed for {now} steps, "
            f"not continued: at step {step} the {planned}-step schedule stood at {old:.3g}, the {now}-step one "
            f"puts it at {new:.3g} (the rate {way} at once), reaching {end:.3g} at step {now}; to train as one "
            f"{now}-step run would, start again with --overwrite")


TRAINED_TOKENS_FILE = "lorafit-tokens.json"  # in each checkpoint: the run's trained tokens up to it


def saved_trained_tokens(checkpoint: str | None) -> int | None:
    """The trained tokens a checkpoint records (0 for a fresh run; None when it records none)."""
    if not checkpoint:
        return 0
    try:
        return int(json.loads((Path(checkpoint) / TRAINED_TOKENS_FILE).read_text(encoding="utf-8"))["trained_tokens"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def whole_run_loss(log_history: list[dict], last_step: int) -> float | None:
    """Mean training loss over every step of the run, from the loss log (each entry is the mean since the
    previous one; a resumed run's log comes from its checkpoint). None when the log has a gap."""
    total, prev = 0.0, 0
    for entry in sorted((e for e in log_history if "loss" in e), key=lambda e: e["step"]):
        total += entry["loss"] * (entry["step"] - prev)
        prev = entry["step"]
    return total / prev if prev and prev == last_step else None


def train_model(model, bundle, args, *, resume_from: str | None = None, save_minutes: float | None = None):
    """Run the Trainer. Returns (trainer, summary dict). Raises TrainingInterrupted on Ctrl-C / SIGTERM."""
    trainer = build_trainer(model, args, bundle.collator, train_dataset=bundle.train, eval_dataset=bundle.eval)
    trainer.add_callback(_progress_callback())
    trainer.add_callback(_resume_notice(resume_from))
    stop = StopRequest()
    clock = _stop_and_clock(stop, save_minutes)
    trainer.add_callback(clock)  # before the guards: their should_save = False must win
    trainer.add_callback(_nan_guard())
    frozen, divergence = _frozen_guard(), _divergence_watch()
    trainer.add_callback(frozen)
    trainer.add_callback(divergence)
    counted_before = saved_trained_tokens(resume_from)  # None: a checkpoint from before lorafit counted them
    trainer._trained_tokens = counted_before or 0
    start = time.perf_counter()
    try:
        with stop.installed():
            output = trainer.train(resume_from_checkpoint=resume_from)
    except KeyboardInterrupt:  # the second signal (or Ctrl-C outside our handler): stop now
        state = trainer.state
        raise TrainingInterrupted(stop.signum or signal.SIGINT, step=state.global_step, max_steps=state.max_steps,
                                  checkpoint=latest_checkpoint(Path(args.output_dir)), immediate=True,
                                  saving=trainer._saving) from None
    seconds = time.perf_counter() - start
    history = [
        {k: entry[k] for k in ("step", "loss", "learning_rate", "grad_norm") if k in entry}
        for entry in trainer.state.log_history if "loss" in entry
    ]
    losses = [h["loss"] for h in history]
    if any(not math.isfinite(x) for x in losses) or not math.isfinite(output.training_loss):
        step = next((h["step"] for h in history if not math.isfinite(h["loss"])), trainer.state.global_step)
        last_good = max((h["step"] for h in history if math.isfinite(h["loss"]) and h["step"] < step), default=0)
        drop_checkpoints_after(Path(args.output_dir), last_good)
        raise RunFailed(f"the training loss became NaN/inf at step {step}; no adapter was saved",
                        where="training.learning_rate",
                        fix="lower the learning rate, use precision fp32/bf16 instead of fp16, or check the data")
    if frozen.frozen_at is not None:
        raise _frozen_failure(frozen.frozen_at, args)
    state = trainer.state
    if stop.announced and state.global_step < state.max_steps:
        raise TrainingInterrupted(stop.signum, step=state.global_step, max_steps=state.max_steps,
                                  checkpoint=latest_checkpoint(Path(args.output_dir)))
    tokens = int(state.num_input_tokens_seen)
    # A resumed run: Trainer's training_loss and our clock cover only this session's steps.
    session_tokens = tokens - int(clock.start_tokens)
    whole = whole_run_loss(state.log_history, state.global_step) if clock.start_step else None
    train_loss = output.training_loss if whole is None else whole
    summary = {
        "steps": state.global_step,
        "epochs": round(state.epoch or 0.0, 4),
        "train_loss": train_loss,
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "loss_history": history,
        "diverged_at_step": divergence.diverged_at,
        # Two counts, two names: tokens processed (every non-padding token the model read, all epochs) and trained
        # tokens (those with a loss: the responses; data.train_on_inputs adds the prompts). tokens_seen: the old name
        # of tokens_processed, kept for readers of earlier metrics.json.
        "tokens_processed": tokens,
        "trained_tokens": trainer._trained_tokens,
        "tokens_seen": tokens,
        "train_seconds": round(seconds, 3),
        "train_tokens_per_second": round(session_tokens / seconds, 2) if seconds > 0 else None,
    }
    if args.load_best_model_at_end and state.best_global_step:  # training.keep_best
        summary["best"] = {"step": state.best_global_step, "eval_loss": state.best_metric,
                           "kept": state.best_model_checkpoint is not None,
                           "checkpoint": Path(state.best_model_checkpoint).name if state.best_model_checkpoint else None}
    if clock.start_step:
        summary["resumed_at_step"] = clock.start_step
        summary["session_tokens"] = session_tokens
        loss_scope = ("train_loss (step-weighted mean of the whole loss log), " if whole is not None else "")
        summary["note"] = (f"resumed at step {clock.start_step}: train_seconds, session_tokens and "
                           f"train_tokens_per_second cover steps {clock.start_step + 1}-{state.global_step} (this "
                           f"session); tokens_processed, {'trained_tokens, ' if counted_before is not None else ''}"
                           f"{loss_scope}loss_history, first_loss and final_loss cover the whole run"
                           + ("" if whole is not None else
                              "; the loss log has a gap, so train_loss covers this session only")
                           + ("" if counted_before is not None else
                              "; the checkpoint held no trained-token count, so trained_tokens covers this session"))
    return trainer, summary


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


# The resume rules live in stages.resume; their former names here stay for existing callers (tests).
_latest_checkpoint, _drop_checkpoints_after = latest_checkpoint, drop_checkpoints_after
