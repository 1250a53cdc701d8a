"""Several processes: every decision lorafit makes about them, in one place. Which process this is (the
main one speaks and writes), the main process first where work must happen once, the ranks agreeing on
the data and on stop/save flags, whether the weights are sharded, `lorafit train --nproc N` relaunching
itself under torchrun, the recipe's training.distributed strategy turned into TrainingArguments (accelerate
does the rest), and the adapter gathered whole from sharded training before it is saved.

Imports nothing heavy at module level: log.py asks it who speaks.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import sys

from lorafit.errors import LorafitError

# Set in the workers `--nproc` starts (beside torchrun's own LOCAL_RANK/WORLD_SIZE): a worker never relaunches.
LAUNCHED_ENV = "LORAFIT_LAUNCHED"

# cpu_ram_efficient_loading: local rank 0 reads the base on the CPU, the others build it on the meta device, and FSDP
# broadcasts rank 0's weights as it shards them (accelerate then syncs module states): never a whole copy per GPU.
FSDP_DEFAULTS = {"version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "state_dict_type": "FULL_STATE_DICT",
                 "cpu_ram_efficient_loading": True}


def deepspeed_defaults(zero_stage: int) -> dict:
    """A ZeRO config whose batch, precision and clipping values transformers fills in from TrainingArguments."""
    return {"zero_optimization": {"stage": zero_stage, "overlap_comm": True, "contiguous_gradients": True,
                                  "stage3_gather_16bit_weights_on_model_save": True},
            "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"}, "gradient_clipping": "auto",
            "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
            "gradient_accumulation_steps": "auto"}


# ----------------------------------------------------------------------------------------------
# This process among the others


def is_main_process() -> bool:
    """The process that speaks and writes: alone, or rank 0 under torchrun / accelerate launch (every
    process runs the CLI; the others meet the same warnings and mistakes silently)."""
    return os.environ.get("RANK", "0") == "0"


def local_rank() -> int:
    """This process's GPU under torchrun / accelerate launch (0 when alone)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank_label() -> str:
    """"" for the main process (or alone); "(rank N) " for another, to start a line it says."""
    return "" if is_main_process() else f"(rank {os.environ.get('RANK')}) "


REPORT_WAIT = 3.0  # seconds another rank gives the main process to say a mistake they all meet


def first_to_report(lines: list[str]) -> bool:
    """Whether this process prints a user's mistake (*lines*). Alone: yes. Under torchrun each process that meets
    one asks, and the first on its node to claim the message prints it (a file created exclusively in a folder the
    node's processes of this launch share): a mistake every rank meets is said once, one that a single rank meets
    (its own device, its own shard) is never swallowed. The main process claims at once; another waits up to
    REPORT_WAIT seconds for it to, so that a mistake they all meet is said as the main process says it."""
    if world_size() == 1:
        return True
    import hashlib
    import tempfile
    from pathlib import Path

    # The workers of one launch on one node share their parent (torchrun's agent) and the run id.
    launch = f"{os.getppid()}:{os.environ.get('TORCHELASTIC_RUN_ID', '')}:{os.environ.get('MASTER_PORT', '')}"
    folder = Path(tempfile.gettempdir()) / f"lorafit-errors-{hashlib.sha256(launch.encode()).hexdigest()[:16]}"
    claim = folder / hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]
    try:
        folder.mkdir(exist_ok=True)
        if not is_main_process():
            import time

            deadline = time.monotonic() + REPORT_WAIT
            while not claim.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        os.close(os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except FileExistsError:
        return False  # another rank said it
    except OSError:
        return is_main_process()
    return True


@contextlib.contextmanager
def main_process_first():
    """Alone: nothing. Under torchrun: each node's first process runs the block first (GGUF conversion,
    tokenization and datasets' caches, which live on the node's disk, happen once per node), then that node's
    others (accelerate's PartialState). The GGUF cache also takes a file lock, for runs that are not one launch."""
    if world_size() == 1:
        yield
        return
    from accelerate import PartialState

    with PartialState().local_main_process_first():
        yield


def check_ranks_agree(stats: dict) -> None:
    """Every rank must train on the same rows: compare the data fingerprints across processes."""
    if world_size() == 1:
        return
    import torch.distributed as dist

    seen = [None] * dist.get_world_size()
    dist.all_gather_object(seen, (stats["fingerprint"], stats["train_rows"]))
    if len(set(seen)) > 1:
        raise RuntimeError(f"the processes built different training data: {seen}")


def agree(args, *flags: bool) -> tuple[bool, ...]:
    """Alone: the flags. Under torchrun: each flag true on any rank → true on all (one all-reduce on the device
    of *args*, the TrainingArguments; read only then)."""
    if world_size() == 1:
        return flags
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        return flags
    t = torch.tensor([float(f) for f in flags], device=args.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return tuple(bool(x) for x in t.tolist())


def sharded_weights(spec) -> str | None:
    """Why every forward pass needs every rank, or None: training.distributed (*spec*) shards the weights over
    the processes (FSDP, DeepSpeed ZeRO-3), so a forward on rank 0 alone would wait forever for the others.
    Under plain DDP each rank holds the whole model; ZeRO-2 shards optimizer state and gradients only."""
    world = world_size()
    if world <= 1 or spec.strategy == "ddp":
        return None
    if spec.strategy == "deepspeed" and spec.config is None and spec.zero_stage != 3:
        return None
    return f"training.distributed.strategy {spec.strategy} shards the weights over {world} processes"


# ----------------------------------------------------------------------------------------------
# Launching, strategies, gathering


def under_launcher() -> bool:
    """True inside a process started by torchrun / accelerate launch (ours or the user's)."""
    return "LOCAL_RANK" in os.environ or os.environ.get(LAUNCHED_ENV) == "1"


def check(spec) -> None:
    """training.distributed, before anything loads: what this machine can run (validate and train)."""
    import importlib.util

    import torch

    where = "training.distributed.strategy"
    if spec.config is not None and spec.strategy == "ddp":
        raise LorafitError("a config file is read only by fsdp and deepspeed", where="training.distributed.config",
                           fix="set training.distributed.strategy: fsdp or deepspeed, or config: null")
    if spec.config is not None and not os.path.isfile(spec.config):
        raise LorafitError(f"config file not found: {spec.config}", where="training.distributed.config",
                           fix="give the path of a JSON file, or null for lorafit's defaults")
    if spec.strategy == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        raise LorafitError("deepspeed is not installed", where=where,
                           fix=f"install it ({sys.executable} -m pip install deepspeed) or use strategy ddp / fsdp")
    if spec.strategy != "ddp" and not torch.cuda.is_available():
        raise LorafitError(f"{spec.strategy} shards the model over CUDA GPUs and there is none here (accelerate runs "
                           "FSDP and DeepSpeed on accelerators only; on CPU it would silently fall back to plain "
                           "data parallel)", where=where,
                           fix="use strategy ddp on CPU (`lorafit train RECIPE --nproc N` still runs N processes)")


def sharding(spec) -> str | None:
    """How training.distributed (*spec*) shards the base's weights, which decides how it is loaded: "fsdp", "zero3"
    (DeepSpeed ZeRO stage 3, from its config file when one is given), or None (every process holds it whole)."""
    if spec.strategy == "fsdp":
        return "fsdp"
    if spec.strategy != "deepspeed":
        return None
    stage = spec.zero_stage
    if spec.config is not None:
        import json

        try:
            with open(spec.config, encoding="utf-8") as f:
                stage = int((json.load(f).get("zero_optimization") or {}).get("stage", 0))
        except (OSError, ValueError, TypeError, AttributeError):
            stage = 0  # unreadable: transformers says why when it reads the same file
    return "zero3" if stage == 3 else None


def loading_kwargs(sharded: str | None, *, device: str, rank: int | None = None) -> dict:
    """from_pretrained's placement of the base, as accelerate intends for the strategy. Unsharded on a GPU: the whole
    base on this process's own GPU (device_map on the local rank, not cuda:0). FSDP: no device_map; accelerate's
    cpu_ram_efficient_loading (what `accelerate launch` would set in the environment, read by transformers): local
    rank 0 reads the weights on the CPU, the others build the model on the meta device, FSDP shards and broadcasts.
    ZeRO-3: no device_map; the run's TrainingArguments (built first, and kept alive) make transformers partition the
    weights with deepspeed.zero.Init as they load."""
    if sharded == "fsdp":
        os.environ["ACCELERATE_USE_FSDP"] = "true"
        os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "true"
        return {}
    if sharded == "zero3" or device != "cuda":
        return {}
    return {"device_map": {"": local_rank() if rank is None else rank}}


def trainer_kwargs(spec) -> dict:
    """TrainingArguments keywords for the strategy (ddp: none; torchrun and accelerate do the rest)."""
    if spec.strategy == "fsdp":
        return {"fsdp": True, "fsdp_config": spec.config or dict(FSDP_DEFAULTS)}
    if spec.strategy == "deepspeed":
        return {"deepspeed": spec.config or deepspeed_defaults(spec.zero_stage)}
    return {}


def gather_adapter_state(trainer) -> dict | None:
    """Sharded training (FSDP, ZeRO-3): every rank must call this; the main process gets the full state dict
    (accelerate gathers the shards), the others None. Unsharded: None everywhere (the live weights are whole)."""
    accelerator = trainer.accelerator
    ds = getattr(accelerator.state, "deepspeed_plugin", None)
    sharded = trainer.is_fsdp_enabled or (trainer.is_deepspeed_enabled and ds is not None and ds.zero_stage == 3)
    if not sharded:
        return None
    # The wrapped model: under DeepSpeed the engine (accelerate's ZeRO-3 gather is a method of it; trainer.model
    # is the bare PeftModel), under FSDP the FSDP module (the same object as trainer.model).
    wrapped = trainer.model_wrapped
    gather = getattr(wrapped, "_zero3_consolidated_16bit_state_dict", None) if trainer.is_deepspeed_enabled else None
    if gather is not None and "exclude_frozen_parameters" in inspect.signature(gather).parameters:
        # Only the trainable (adapter, head) parameters: the frozen base is never gathered onto rank 0.
        state = gather(exclude_frozen_parameters=True)
    else:
        state = accelerator.get_state_dict(wrapped)
    return state if is_main_process() else None


def launch_args(train_argv: list[str], *, nproc: int, nnodes: int = 1, node_rank: int = 0,
                master_addr: str | None = None, master_port: int | None = None) -> list[str]:
    """torchrun's command line for `lorafit train ...` on this node (the same as a user would write)."""
    args = ["--nproc_per_node", str(nproc), "--nnodes", str(nnodes), "--node_rank", str(node_rank)]
    if master_addr is not None:
        args += ["--master_addr", master_addr]
    if master_port is not None:
        args += ["--master_port", str(master_port)]
    return args + ["-m", "lorafit", "train", *train_argv]


def launch(train_argv: list[str], **how) -> int:
    """Run `lorafit train` under torchrun (torch.distributed.run, in this process: it starts the workers and
    watches them) and return the exit code to leave with: a worker's own code (2 for a user's mistake, 130/143
    after Ctrl-C / SIGTERM, which torchrun forwards to the workers), never torchrun's blanket 1."""
    import logging
    import signal

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    if under_launcher():
        raise LorafitError(f"already running under a launcher (WORLD_SIZE={world_size()})", where="--nproc",
                           fix="drop --nproc (and --nnodes ...) when starting lorafit with torchrun yourself")
    # The workers say what went wrong; torchrun's own failure reports would repeat it as a traceback.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    os.environ[LAUNCHED_ENV] = "1"
    try:
        run(parse_args(launch_args(train_argv, **how)))
    except ChildFailedError as e:
        failures = sorted(e.failures.items())
        code = next((f.exitcode for _, f in failures if f.exitcode and f.exitcode > 0), None)
        if code is not None:
            return code
        signum = -failures[0][1].exitcode if failures else signal.SIGTERM  # a worker killed by a signal
        return 128 + signum
    except SignalException as e:
        return 128 + int(e.sigval)
    finally:
        os.environ.pop(LAUNCHED_ENV, None)
    return 0
