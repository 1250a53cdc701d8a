"""Running out of memory in evaluation: halve the batch and go on, down to one row, before giving up.

Evaluation (the held-out loss, the classifiers' in-order pass, greedy generation) sends its batches through
here: an allocation that fails (CUDA's OutOfMemoryError, the CPU allocator's) costs a retry at half the batch,
not the run's figures.
"""

from __future__ import annotations


def is_out_of_memory(error: BaseException) -> bool:
    """An allocation that failed: CUDA's OutOfMemoryError, MemoryError, or the CPU allocator's RuntimeError
    ("DefaultCPUAllocator: can't allocate memory")."""
    if isinstance(error, MemoryError):
        return True
    import torch

    if isinstance(error, torch.OutOfMemoryError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("out of memory" in text.lower() or "can't allocate memory" in text)


def _smaller(size: int, what: str) -> int:
    """The batch size after an out-of-memory at *size* (the failed batch's tensors are released first)."""
    import gc

    import torch

    from lorafit import log
    from lorafit.errors import OutOfMemory

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if size <= 1:
        raise OutOfMemory(f"out of memory in {what} even at batch size 1", where="evaluation.batch_size",
                          fix="free memory (or use a machine with more), or measure less: lower evaluation.max_samples, "
                              "evaluation.generate_samples or evaluation.max_new_tokens")
    log.warn(f"out of memory in {what} at batch size {size}: trying again at {size // 2}")
    return size // 2


def halving(run, batch_size: int, *, what: str):
    """run(batch_size); on an out-of-memory, run(batch_size // 2), and so on down to 1 (then OutOfMemory). For
    a pass that cannot go on mid-way (the Trainer's evaluation loop)."""
    size = batch_size
    while True:
        try:
            return run(size)
        except Exception as e:  # the traceback holds the failed batch's tensors: released once out of here
            if not is_out_of_memory(e):
                raise
        size = _smaller(size, what)


def in_batches(items: list, batch_size: int, run_batch, *, what: str, progress=None) -> list:
    """run_batch(chunk) → one result per item, over *items* in chunks of *batch_size*: a chunk that runs out of
    memory is halved and run again, and the rest go on at that size (at 1: OutOfMemory). *progress*
    (log.Progress) advances by items."""
    out: list = []
    i, size = 0, max(1, batch_size)
    while i < len(items):
        chunk = items[i:i + size]
        try:
            found = run_batch(chunk)
        except Exception as e:
            if not is_out_of_memory(e):
                raise
            found = None
        if found is None:
            size = _smaller(size, what)
            continue
        out += found
        i += len(chunk)
        if progress is not None:
            progress.update(len(chunk))
    return out
