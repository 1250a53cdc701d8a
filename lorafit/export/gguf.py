"""`lorafit export --to gguf|ollama`: the adapter for llama.cpp (and Ollama), written by llama.cpp's own tools.

OUT/
  NAME-QUANT.gguf        base + adapter merged in float32 (lorafit merge), converted at QUANT: f16 and q8_0 by
                         convert_hf_to_gguf.py, q4_k_m by llama.cpp's quantizer from the f16 file
  NAME-lora-f16.gguf     the adapter alone (convert_lora_to_gguf.py), for `--lora` on the base file below
  base-QUANT.gguf        the base the LoRA file was verified against, with the adapter's tokenizer and template
  Modelfile              --to ollama: FROM, TEMPLATE, stop tokens, SYSTEM (export/ollama.py)
  lorafit-export.json    what was checked, written and measured (--verify), and the commands

The chat template and the end-of-turn tokens the adapter was trained with, and the system prompt its training
rows all had, are in each GGUF's metadata (tokenizer.chat_template, tokenizer.ggml.eos/eot_token_id,
lorafit.system_prompt). Before anything is written and before any weight is fetched or loaded (check), llama.cpp's
converter reads the base's config and the adapter's tokenizer (--vocab-only): an architecture or tokenizer it
does not know is refused there. A hub base's weights are downloaded only after that.
"""

from __future__ import annotations

import json
import os
import shlex
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lorafit import log
from lorafit.core import libs, models
from lorafit.core.adapters import AdapterSource
from lorafit.core.hub import local_path
from lorafit.errors import LorafitError, ModelError
from lorafit.export import llamacpp

QUANTS = ("f16", "q8_0", "q4_k_m")
_CONVERTER_TYPES = ("f16", "q8_0")  # written by the converter itself; the others by llama.cpp's quantizer
_CONFIG_FILES = ("config.json", "generation_config.json")
_CONFIG_PATTERNS = ["*.json", "*.model", "*.txt", "*.jinja"]  # a hub base's config and tokenizer: no weights


def check_quant(quant: str) -> None:
    if quant not in QUANTS:
        raise LorafitError(f"unknown type '{quant}'", where="--quant", fix=f"use one of: {', '.join(QUANTS)}")


@dataclass
class Checked:
    """What the checks found, for the export that follows them."""

    recipe: object | None        # the run's Recipe (packing off), or None outside a run
    tokenizer: object            # the tokenizer the adapter was trained with
    system: str | None           # the system prompt every training conversation opened with
    lora_skip: str | None        # why no GGUF LoRA file can be written, or None


def check(source: AdapterSource, *, verify: bool = False) -> Checked:
    """Every refusal, before anything is written and before any weight is fetched or loaded: the export extra,
    the task, --verify outside a run, and llama.cpp's converter on the base's config and the adapter's tokenizer
    (--vocab-only, in a temporary directory: an architecture or a tokenizer it does not know)."""
    llamacpp.runtime_version()  # the extra: exit 2 with the install command when it is missing
    if not source.task.causal:
        raise ModelError(f"a {source.task.name} adapter: llama.cpp and Ollama serve text generation (causal_lm) only",
                         where=str(source.adapter_dir / "adapter_config.json"),
                         fix="serve it with `lorafit serve` or `lorafit predict`")
    recipe = source.recipe_or_none(["data.packing=false"])
    if verify and recipe is None:
        raise LorafitError(f"{source.adapter_dir} is not inside a lorafit run: --verify answers the run's held-out "
                           "prompts", where="--verify", fix="pass the run directory, or drop --verify")
    libs.quiet_libraries()
    tokenizer = models.load_adapter_tokenizer(source)
    with tempfile.TemporaryDirectory(prefix="lorafit-export-check-") as scratch:
        staged = _stage(_base_model_dir(source, weights=False), source, Path(scratch) / "base", weights=False)
        llamacpp.convert([{"script": llamacpp.CONVERT_MODEL,
                           "argv": [str(staged), "--vocab-only", "--outfile", str(Path(scratch) / "vocab.gguf")]}],
                         what=f"base model {source.base}")
    return Checked(recipe, tokenizer, system_prompt(recipe), _lora_unsupported(source))


def export(source: AdapterSource, work: Path, final: Path, checked: Checked, *, name: str, quant: str = "f16",
           verify: bool = False, ollama: bool = False, verify_rows: int | None = None) -> dict:
    """Write the GGUF (and with *ollama* the Modelfile) export of *source*, *checked* first (check), into *work*
    (renamed to *final* by the caller). Returns the report."""
    from lorafit.core.merging import merge_adapter

    recipe, tokenizer, system, lora_skip = checked.recipe, checked.tokenizer, checked.system, checked.lora_skip
    base_dir = _base_model_dir(source, weights=True)
    with tempfile.TemporaryDirectory(prefix="lorafit-export-", dir=work.parent) as scratch:
        scratch = Path(scratch)
        staged_base = _stage(base_dir, source, scratch / "base", weights=True)
        merged_dir = scratch / "merged"
        log.info(f"export: merging {source.adapter_dir} into its base in float32")
        merge_adapter(source, merged_dir, dtype="float32")
        files = {"merged": work / f"{name}-{quant}.gguf", "base": work / f"base-{quant}.gguf"}
        if lora_skip is None:
            files["lora"] = work / f"{name}-lora-f16.gguf"
        _convert_all(files, merged_dir, staged_base, source, quant, scratch, _metadata(tokenizer, recipe, system))

        report = {"to": "ollama" if ollama else "gguf", "adapter": str(source.adapter_dir), "output": str(final),
                  "name": name, "base": source.base, "quant": quant, "system_prompt": system,
                  "files": {k: str(final / p.name) for k, p in files.items()},
                  "bytes": {k: p.stat().st_size for k, p in files.items()},
                  "notes": [lora_skip] if lora_skip else []}
        if ollama:
            from lorafit.export.ollama import write_modelfile

            report["modelfile"] = write_modelfile(work, files["merged"].name, tokenizer, recipe, system)
            report["files"]["modelfile"] = str(final / "Modelfile")
        if verify:
            from lorafit.export.gguf_verify import verify_export

            report["verify"] = verify_export(source, recipe, tokenizer, files, merged_dir, quant, limit=verify_rows)
    report["commands"] = _commands(report, final, system)
    (work / "lorafit-export.json").write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    return report


# ----------------------------------------------------------------------------------------------
# Inputs


def _base_model_dir(source: AdapterSource, *, weights: bool) -> Path:
    """The base model's files on disk (a local directory, lorafit's GGUF conversion, or the hub cache); from the
    hub, its config and tokenizer only unless *weights*."""
    spec = models.base_spec(source)[0]
    path = local_path(spec.name, where=f"base model {spec.name}")
    if path is not None:
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} has no config.json", where=f"base model {spec.name}",
                             fix="the adapter's base must be a Hugging Face model directory")
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(spec.name, revision=spec.revision,
                                      allow_patterns=_CONFIG_PATTERNS + (["*.safetensors"] if weights else [])))
    except Exception as e:  # offline without a cached copy, no such repo, gated, ...
        raise ModelError(f"base model not found ({type(e).__name__}: {str(e).splitlines()[0][:200]})",
                         where=f"base model {spec.name}",
                         fix="download it first (unset HF_HUB_OFFLINE), or use the run directory on this machine") from None


def _stage(base_dir: Path, source: AdapterSource, out: Path, *, weights: bool) -> Path:
    """The base's config (and with *weights* its weights and their index), linked, with the tokenizer the adapter
    was trained with: what the converter reads for the base file; without weights, for the refusals (--vocab-only
    reads no tensor, and finds none to index)."""
    out.mkdir(parents=True)
    tokenizer_dir = source.adapter_dir if models.has_tokenizer(source.adapter_dir) else base_dir
    for f in base_dir.iterdir():
        if f.name in _CONFIG_FILES or (weights and (f.suffix == ".safetensors" or f.name == "model.safetensors.index.json")):
            os.symlink(f.resolve(), out / f.name)
    for name in models.TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            os.symlink((tokenizer_dir / name).resolve(), out / name)
    return out


def system_prompt(recipe) -> str | None:
    """The system prompt the run trained with: the one every training conversation opens with (chat data); None
    when the rows have none, or several."""
    if recipe is None or recipe.data.format != "chat":
        return None
    from lorafit.stages.data import read_rows

    try:
        rows = read_rows(recipe.data.train)
    except LorafitError:
        return None
    key, found = recipe.data.columns.messages, set()
    for row in rows:
        messages = row.get(key) if isinstance(row, dict) else None
        first = messages[0] if isinstance(messages, list) and messages else None
        if not (isinstance(first, dict) and first.get("role") == "system"):
            return None
        found.add(first.get("content"))
        if len(found) > 1:
            return None
    return found.pop() if found and isinstance(next(iter(found)), str) else None


def _lora_unsupported(source: AdapterSource) -> str | None:
    """Why the adapter cannot also be written as a GGUF LoRA (the merged file is written anyway), or None."""
    cfg = source.config
    why = ("it trains whole modules (modules_to_save)" if cfg.get("modules_to_save") else
           "it is a DoRA adapter" if cfg.get("use_dora") else
           "it trains biases" if (cfg.get("bias") or "none") != "none" else None)
    return f"no GGUF LoRA file: {why}, which llama.cpp's LoRA format cannot carry; the merged file has it" if why else None


# ----------------------------------------------------------------------------------------------
# Writing


def _convert_all(files: dict, merged_dir: Path, staged_base: Path, source: AdapterSource, quant: str,
                 scratch: Path, metadata: dict) -> None:
    """The merged model and the base at *quant*, and the LoRA file, by llama.cpp's converters, then *metadata*
    into the merged and base files by gguf-py's own copier (all in one process); for k-quants, llama.cpp's
    quantizer from those f16 files (a child process)."""
    direct = quant in _CONVERTER_TYPES
    out_type = quant if direct else "f16"
    stage = {k: (files[k] if direct else scratch / f"{k}-f16.gguf") for k in ("merged", "base")}
    jobs = [{"script": llamacpp.CONVERT_MODEL, "argv": [str(merged_dir), "--outfile", str(stage["merged"]),
                                                        "--outtype", out_type]},
            {"script": llamacpp.CONVERT_MODEL, "argv": [str(staged_base), "--outfile", str(stage["base"]),
                                                        "--outtype", out_type]}]
    if "lora" in files:
        jobs.append({"script": llamacpp.CONVERT_LORA, "argv": [str(source.adapter_dir), "--base", str(staged_base),
                                                               "--outfile", str(files["lora"]), "--outtype", "f16"]})
    if metadata:
        jobs += [{"input": str(stage[k]), "output": str(stage[k]) + ".meta", "set": metadata} for k in ("merged", "base")]
    log.info(f"export: converting with llama.cpp's converters ({out_type}{', then ' + quant if not direct else ''})")
    llamacpp.convert(jobs, what=f"adapter {source.adapter_dir}")
    if not direct:
        quantize([(stage[k], files[k]) for k in ("merged", "base")], quant)


def quantize(pairs: list[tuple[Path, Path]], quant: str) -> None:
    """Each (f16 GGUF, output) pair through llama.cpp's own quantizer (llama_model_quantize), in a child process."""
    done, crashed = llamacpp.run_child([{"op": "quantize", "type": quant, "input": str(src), "output": str(out)}
                                        for src, out in pairs])
    if crashed or len(done) != len(pairs) or any(r["code"] for r in done):
        raise RuntimeError(f"llama.cpp's quantizer failed ({crashed or done})")


def _metadata(tokenizer, recipe, system: str | None) -> dict:
    """The keys the converter does not write from the tokenizer files: the end-of-turn token when it is not EOS,
    and the run's system prompt ({key: (GGUFValueType name, value)})."""
    from lorafit.core.generation import stop_ids

    stops = [i for i in stop_ids(tokenizer, recipe.data if recipe is not None else None)
             if i != tokenizer.eos_token_id]
    keys: dict = {}
    if stops:
        keys["tokenizer.ggml.eot_token_id"] = ("UINT32", int(stops[0]))
    if system:
        keys["lorafit.system_prompt"] = ("STRING", system)
    return keys


def _commands(report: dict, final: Path, system: str | None) -> dict:
    files = report["files"]
    merged = files["merged"]
    sys_args = ["-sys", system] if system else []
    out = {"llama-cli": shlex.join(["llama-cli", "-m", merged, "-cnv", *sys_args]),
           "llama-server": shlex.join(["llama-server", "-m", merged])}
    if "lora" in files:
        out["llama-server (base + LoRA)"] = shlex.join(["llama-server", "-m", files["base"], "--lora", files["lora"]])
    if "modelfile" in files:
        out["ollama"] = shlex.join(["ollama", "create", report["name"], "-f", files["modelfile"]])
        out["ollama run"] = shlex.join(["ollama", "run", report["name"]])
    return out
