"""`lorafit export RUN_DIR|ADAPTER_DIR --to vllm|gguf|ollama --output DIR`: the adapter made ready for another
server (lorafit/export/ holds one module per target). Everything the target would refuse is refused first,
before anything is written (not even --output's parent directories) and before any weight loads; the export is
written to a temporary directory beside --output and renamed into place, so a failed export leaves nothing
half-written."""

from __future__ import annotations

import re
from pathlib import Path

from lorafit.core.adapters import AdapterSource, find_adapter
from lorafit.core.files import atomic_dir, check_output
from lorafit.errors import LorafitError

TARGETS = ("vllm", "gguf", "ollama")


def export(path: str | Path, to: str, output: str | Path, *, name: str | None = None, quant: str | None = None,
           verify: bool = False, overwrite: bool = False, verify_rows: int | None = None) -> dict:
    """Export the adapter (or run) at *path* for *to* into *output*. Returns the report (render.export_lines).
    *verify_rows*: --verify on the first N held-out rows only (benchmarks)."""
    if to not in TARGETS:
        raise LorafitError(f"unknown target '{to}'", where="--to", fix=f"use one of: {', '.join(TARGETS)}")
    if to == "vllm" and quant is not None:
        raise LorafitError("vLLM serves the adapter on the base's own weights: there is nothing to quantize",
                           where="--quant", fix="drop --quant (it is for --to gguf and --to ollama)")
    if to == "vllm" and verify:
        raise LorafitError("checking answers in vLLM needs vLLM on a GPU; the export's checks run anyway",
                           where="--verify", fix="drop --verify, then serve the printed command and compare with "
                                                 "`lorafit generate`")
    from lorafit.export import gguf, vllm

    if quant is not None:
        gguf.check_quant(quant)
    source = find_adapter(path)
    output = Path(output)
    check_output(output, [source.adapter_dir, source.run_dir, Path(source.base)], overwrite=overwrite)
    name = adapter_name(source, name)
    # Every refusal of the target before anything is written.
    checked = vllm.check(source) if to == "vllm" else gguf.check(source, verify=verify)

    final = output.resolve()
    with atomic_dir(output) as work:  # renamed to *output* once complete
        if to == "vllm":
            return vllm.export(source, work, final, checked, name=name)
        return gguf.export(source, work, final, checked, name=name, quant=quant or "f16", verify=verify,
                           ollama=to == "ollama", verify_rows=verify_rows)


def adapter_name(source: AdapterSource, name: str | None) -> str:
    """--name, else the run directory's name (or the adapter directory's when it is no run's adapter/)."""
    if name is None:
        name = (source.run_dir or source.adapter_dir).name if source.adapter_dir.name == "adapter" \
            else source.adapter_dir.name
        name = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "adapter"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._:-]*", name):
        raise LorafitError(f"'{name}' cannot name a served model", where="--name",
                           fix="use letters, digits and . _ - : (it becomes the request's `model`)")
    return name
