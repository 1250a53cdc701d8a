"""`lorafit merge`: fold a LoRA adapter into its base model and prove the result.

The merge itself (16/32-bit base, normal or --low-memory, the files written) is core/merging.py; this command
checks first (the output directory, the base's shapes against the adapter), writes to a temporary directory
beside the target that is renamed into place (a failed merge leaves nothing half-written), and with
``--verify`` loads base + adapter and the merged model (one at a time) and compares their logits and
perplexity on a few prompts; for a QLoRA-trained adapter it also measures the gap between the merge and the
quantized model the adapter was trained on.
"""

from __future__ import annotations

import json
from pathlib import Path

from lorafit import log
from lorafit.commands.verify import verify_merged
from lorafit.core import merging
from lorafit.core.adapters import find_adapter
from lorafit.core.files import atomic_dir, check_output
from lorafit.errors import ModelError

DTYPES = merging.DTYPES
REPORT_FILE = "merge_report.json"


# ----------------------------------------------------------------------------------------------
# The command


def merge(adapter_dir: str | Path, output: str | Path, *, base: str | None = None, dtype: str = "bfloat16",
          verify: bool = False, low_memory: bool = False, max_shard_size: str | int = "2GB",
          overwrite: bool = False, force: bool = False) -> dict:
    """Merge an adapter into its base and write a plain model to *output* (*overwrite*: replacing a non-empty
    one; *force* is its old name). Returns the report dict."""
    if dtype not in DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}", where="--dtype", fix="use one of: " + ", ".join(DTYPES))
    source = find_adapter(adapter_dir, base)
    output = Path(output)
    check_output(output, [source.adapter_dir, source.run_dir, Path(source.base)], overwrite=overwrite or force)
    shard_bytes = _parse_size(max_shard_size)
    merging.quiet_transformers()
    base_dir = merging.base_files(source)  # local files (the run's local copy of a GGUF base): shapes, streaming, config
    merging.check_shapes(source, base_dir)

    with atomic_dir(output, "merging") as tmp:  # a failed merge leaves nothing half-written
        log.info(f"merging {source.adapter_dir} into {source.base} ({dtype}{', low memory' if low_memory else ''})")
        merging.write_merged(source, base_dir, tmp, dtype=dtype, low_memory=low_memory, max_shard_size=shard_bytes)
        files = sorted(p.name for p in tmp.iterdir())
        report = {"adapter": str(source.adapter_dir), "base": source.base, "output": str(output), "dtype": dtype,
                  "mode": "low_memory" if low_memory else "normal", "files": files,
                  "bytes": sum(p.stat().st_size for p in tmp.iterdir() if p.is_file()),
                  "lora_modules": len(merging.adapted_modules(source))}
        if verify:
            report["verify"] = verify_merged(tmp, source, dtype=dtype)
            (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
            report["files"] = sorted(p.name for p in tmp.iterdir())
    return report


# ----------------------------------------------------------------------------------------------
# Checks before any work


def _parse_size(size: str | int) -> int:
    """--max-shard-size as save_pretrained reads it (transformers' own parser: 500MB, 2GB, 5GiB)."""
    from transformers.utils.hub import convert_file_size_to_int

    try:
        return max(1, int(convert_file_size_to_int(size)))
    except ValueError:
        raise ModelError(f"cannot read size {size!r}", where="--max-shard-size", fix="use e.g. 500MB, 2GB or 5GiB") from None
