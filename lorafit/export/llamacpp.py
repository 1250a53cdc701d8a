"""llama.cpp as lorafit runs it: its own converters and quantizer, and its runtime, never re-implemented.

Converters: ``convert_hf_to_gguf.py`` and ``convert_lora_to_gguf.py`` (with their ``conversion/`` package and
their own ``gguf-py``) ship in the source of the pinned llama-cpp-python, not in its wheel. lorafit finds them:
  1. ``$LORAFIT_LLAMA_CPP``: a llama.cpp source tree of your own;
  2. inside the installed llama_cpp package, should a wheel ever carry them;
  3. lorafit's copy, ``${XDG_CACHE_HOME:-~/.cache}/lorafit/llama.cpp-VERSION/`` (VERSION: the installed
     llama-cpp-python's, so converters and runtime always match), fetched once with pip (``make install``
     does it; else the first export does, and says so): the sdist is downloaded, only the converters are
     kept (~2 MB), and the converters' own requirements that lorafit does not have (sentencepiece, from
     llama.cpp's requirements-convert_hf_to_gguf.txt) are installed beside them, not into lorafit's env.
They run in a subprocess with their own gguf-py (and that folder) first on PYTHONPATH, so their ``gguf``
never meets the ``gguf`` package lorafit imports.

Runtime: llama-cpp-python (the ``export`` extra). Everything that runs a GGUF (quantizing, answering) runs in
a child process (``python -m lorafit.export.llamacpp``), so that a crash inside llama.cpp is a failed check,
not a dead lorafit; quantized files are evaluated one token at a time (n_batch 1): llama.cpp's batched
prompt evaluation crashes on some quantized types on AVX512 CPUs.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from lorafit import log
from lorafit.errors import LorafitError, ModelError

PACKAGE = "llama-cpp-python"
INSTALL_FIX = "install the export extra: pip install 'lorafit[export]' (make install does; it builds llama.cpp, ~4 min)"
CONVERT_MODEL = "convert_hf_to_gguf.py"
CONVERT_LORA = "convert_lora_to_gguf.py"
# What the converters import that lorafit's environment lacks (llama.cpp's requirements-convert_hf_to_gguf.txt
# asks for sentencepiece>=0.1.98,<0.3.0): installed beside them.
CONVERTER_REQUIREMENTS = ("sentencepiece==0.2.2",)
_MARKER = "lorafit-llama.cpp.json"
_KEEP = re.compile(r"vendor/llama\.cpp/(convert_hf_to_gguf\.py|convert_lora_to_gguf\.py|LICENSE|conversion/.*|"
                   r"gguf-py/gguf/.*|requirements/requirements-convert.*)$")


def runtime_version() -> str:
    """The installed llama-cpp-python's version; LorafitError with the install command when it is missing."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(PACKAGE)
    except PackageNotFoundError:
        raise LorafitError("exporting to llama.cpp / Ollama needs llama-cpp-python, which is not installed",
                           where="--to", fix=INSTALL_FIX) from None


def cache_dir(version: str) -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lorafit" / f"llama.cpp-{version}"


def converters_dir(*, fetch: bool = True) -> Path:
    """The folder that holds llama.cpp's converters (see the module's docstring for where it is looked for);
    fetched once into lorafit's cache when *fetch* and nowhere else has them."""
    own = os.environ.get("LORAFIT_LLAMA_CPP")
    if own:
        if not (Path(own) / CONVERT_MODEL).is_file():
            raise LorafitError(f"{own} holds no {CONVERT_MODEL}", where="LORAFIT_LLAMA_CPP",
                               fix="point it at a llama.cpp source tree, or unset it to use lorafit's copy")
        return Path(own)
    version = runtime_version()
    import importlib.util

    spec = importlib.util.find_spec("llama_cpp")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        for candidate in (Path(folder), Path(folder) / "vendor" / "llama.cpp"):
            if (candidate / CONVERT_MODEL).is_file() and (candidate / "gguf-py").is_dir():
                return candidate
    target = cache_dir(version)
    if (target / _MARKER).is_file():
        return target
    if not fetch:
        raise LorafitError(f"llama.cpp's converters are not in {target}", where="--to",
                           fix=f"run `{sys.executable} -m lorafit.export.llamacpp fetch` (make install does)")
    return fetch_converters(version, target)


def fetch_converters(version: str, target: Path) -> Path:
    """Download the llama-cpp-python *version* sdist with pip, keep its converters in *target*, install their
    missing requirements beside them. Said on stderr; LorafitError when pip cannot."""
    from lorafit.core.files import atomic_dir

    log.info(f"export: llama.cpp's converters are not in the llama-cpp-python wheel; fetching them once from its "
             f"source ({PACKAGE}=={version} sdist, ~77 MB download, ~2 MB kept) with pip into {target}")
    with tempfile.TemporaryDirectory(prefix="lorafit-llama.cpp-") as scratch:
        _pip(["download", f"{PACKAGE}=={version}", "--no-deps", "--no-binary", ":all:", "--dest", scratch],
             what=f"download the {PACKAGE}=={version} source")
        archive = next(Path(scratch).glob("*.tar.gz"), None)
        if archive is None:
            raise LorafitError(f"pip gave no source archive of {PACKAGE}=={version}", where="--to",
                               fix="set LORAFIT_LLAMA_CPP to a llama.cpp source tree")
        with atomic_dir(target) as tmp:
            extract_converters(archive, tmp)
            if not (tmp / CONVERT_MODEL).is_file():
                raise LorafitError(f"the {PACKAGE}=={version} source holds no {CONVERT_MODEL}", where="--to",
                                   fix="set LORAFIT_LLAMA_CPP to a llama.cpp source tree")
            _pip(["install", "--quiet", "--no-deps", "--only-binary", ":all:", "--target", str(tmp / "site"),
                  *CONVERTER_REQUIREMENTS], what="install the converters' requirements")
            (tmp / _MARKER).write_text(json.dumps({"llama_cpp_python": version,
                                                   "requirements": list(CONVERTER_REQUIREMENTS)}, indent=2) + "\n")
    log.info(f"export: llama.cpp's converters are in {target}")
    return target


def extract_converters(archive: Path, dest: Path) -> None:
    """The converters' files of the sdist *archive* into *dest* (vendor/llama.cpp/ dropped from their names),
    through tarfile's "data" filter: a member that would land outside *dest* ('..', an absolute path, a link)
    is refused."""
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            match = _KEEP.search(member.name)
            if match and member.isfile():
                kept = member.replace(name=match.group(0).removeprefix("vendor/llama.cpp/"), deep=False)
                try:
                    tar.extract(kept, dest, filter="data")
                except tarfile.FilterError as e:
                    raise LorafitError(f"the {PACKAGE} source archive holds an unsafe path ({e})", where="--to",
                                       fix="set LORAFIT_LLAMA_CPP to a llama.cpp source tree you trust") from None


def _pip(args: list[str], *, what: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        tail = " ".join((proc.stderr or proc.stdout).strip().splitlines()[-2:])[:300]
        raise LorafitError(f"pip could not {what}: {tail}", where="--to",
                           fix="check access to the package index (or set LORAFIT_LLAMA_CPP to a llama.cpp source tree)")


def converter_env(folder: Path) -> dict:
    """The environment a converter runs in: its own gguf-py (and its requirements) before anything else."""
    env = dict(os.environ)
    own = [str(folder / "gguf-py")] + ([str(folder / "site")] if (folder / "site").is_dir() else [])
    env["PYTHONPATH"] = os.pathsep.join(own + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.pop("NO_LOCAL_GGUF", None)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


# Runs llama.cpp's converters one after another in one process (torch and transformers imported once), each as
# `python SCRIPT ARGS` would run it (runpy, __main__), and gguf-py's own metadata copier (gguf_new_metadata).
_DRIVER = r"""
import json, os, runpy, sys, traceback
folder, jobs_file, results_file = sys.argv[1:4]
sys.path.insert(0, folder)
results = []
for job in json.load(open(jobs_file, encoding="utf-8")):
    code = 0
    try:
        if "script" in job:
            sys.argv = [job["script"], *job["argv"]]
            runpy.run_path(job["script"], run_name="__main__")
        else:
            import gguf
            from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata
            reader = gguf.GGUFReader(job["input"], "r")
            arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
            writer = gguf.GGUFWriter(job["output"], arch=arch, endianess=reader.endianess)
            alignment = reader.get_field(gguf.Keys.General.ALIGNMENT)
            if alignment is not None:
                writer.data_alignment = alignment.contents()
            new = {k: MetadataDetails(getattr(gguf.GGUFValueType, kind), value) for k, (kind, value) in job["set"].items()}
            copy_with_new_metadata(reader, writer, new, [])
            del reader
            os.replace(job["output"], job["input"])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = 1
    results.append(code)
    json.dump(results, open(results_file, "w"))
    if code:
        break
"""


def convert(jobs: list[dict], *, what: str) -> str:
    """Run llama.cpp's converters: each job is {"script": CONVERT_MODEL or CONVERT_LORA, "argv": [...]} (as on
    the command line) or {"input": GGUF, "output": TMP, "set": {key: (GGUFValueType name, value)}} (the file
    rewritten with those metadata keys by gguf-py's gguf_new_metadata). Returns the log. A failure the user can
    act on (an architecture or tokenizer the converter does not know, a module missing) is a ModelError naming
    *what*; any other is ours (RuntimeError)."""
    folder = converters_dir()
    for job in jobs:
        if "script" in job:
            job["script"] = str(folder / job["script"])
    with tempfile.TemporaryDirectory(prefix="lorafit-convert-") as scratch:
        jobs_file, results_file = Path(scratch) / "jobs.json", Path(scratch) / "results.json"
        jobs_file.write_text(json.dumps(jobs), encoding="utf-8")
        proc = subprocess.run([sys.executable, "-c", _DRIVER, str(folder), str(jobs_file), str(results_file)],
                              capture_output=True, text=True, env=converter_env(folder))
        results = json.loads(results_file.read_text()) if results_file.is_file() else []
    log_text = (proc.stderr or "") + (proc.stdout or "")
    if proc.returncode == 0 and len(results) == len(jobs) and not any(results):
        return log_text
    raise converter_error(log_text, what=what)


def converter_error(log_text: str, *, what: str) -> Exception:
    unknown = re.search(r"Model (\S+) is not supported", log_text)
    if unknown:
        return ModelError(f"llama.cpp's converter does not know the architecture {unknown.group(1)}", where=what,
                          fix="export to vLLM (`--to vllm`), or use a base model whose architecture llama.cpp supports")
    if "BPE pre-tokenizer was not recognized" in log_text:
        digest = re.search(r"chkhsh:\s+([0-9a-f]{64})", log_text)
        return ModelError("llama.cpp's converter does not recognise this tokenizer (its pre-tokenizer"
                          + (f", hash {digest.group(1)[:16]}…," if digest else "") + " is not in its table)",
                          where=what, fix="use a base model whose tokenizer llama.cpp knows, or a newer llama-cpp-python; "
                                          "lorafit never edits the converter's table")
    missing = re.search(r"ModuleNotFoundError: No module named '([\w.]+)'", log_text)
    if missing:
        return ModelError(f"llama.cpp's converter needs the Python module '{missing.group(1)}'", where=what,
                          fix=f"pip install {missing.group(1).split('.')[0]}")
    lines = [line for line in log_text.strip().splitlines() if line.strip()]
    return RuntimeError(f"llama.cpp's converter failed on {what}: {' | '.join(lines[-3:])[:500]}")


# ----------------------------------------------------------------------------------------------
# The runtime, in a child process


def run_child(jobs: list[dict], *, timeout: float | None = None) -> tuple[list[dict], str | None]:
    """Run *jobs* ({"op": "quantize"|"answer", ...}) in `python -m lorafit.export.llamacpp child`: (their
    results, None), or (the results of the jobs done before, what stopped it) when llama.cpp crashed (a signal)
    or failed: never an exception, never a dead lorafit."""
    runtime_version()
    with tempfile.TemporaryDirectory(prefix="lorafit-llama-") as scratch:
        req, out = Path(scratch) / "request.json", Path(scratch) / "result.json"
        req.write_text(json.dumps(jobs), encoding="utf-8")
        try:
            proc = subprocess.run([sys.executable, "-m", "lorafit.export.llamacpp", "child", str(req), str(out)],
                                  capture_output=True, text=True, timeout=timeout)
            crashed = None
            if proc.returncode != 0:
                how = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
                tail = " | ".join(line for line in (proc.stderr or "").strip().splitlines()[-3:])[:400]
                crashed = f"llama.cpp stopped ({how}){': ' + tail if tail else ''}"
        except subprocess.TimeoutExpired:
            crashed = f"llama.cpp did not finish within {timeout:.0f} s"
        results = json.loads(out.read_text(encoding="utf-8")) if out.is_file() else []
    return results, crashed


def _child(jobs: list[dict], out: Path) -> None:
    results = []
    for job in jobs:
        results.append(_quantize(job) if job["op"] == "quantize" else _answer(job))
        out.write_text(json.dumps(results), encoding="utf-8")  # what is done survives a crash in the next job


# llama.cpp's file types (llama.h, enum llama_ftype) for what lorafit writes through its quantizer.
FTYPES = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "f16": "LLAMA_FTYPE_MOSTLY_F16"}


def _quantize(request: dict) -> dict:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, FTYPES[request["type"]])
    params.nthread = os.cpu_count() or 1
    code = llama_cpp.llama_model_quantize(request["input"].encode(), request["output"].encode(), params)
    return {"code": int(code)}


def _answer(request: dict) -> dict:
    """Greedy answers of a GGUF (plus a GGUF LoRA) to prompt texts, tokenized by the file's own tokenizer, and
    the metadata that decides how it is asked: chat template, EOS / end-of-turn ids, system prompt."""
    import llama_cpp

    batch = 1 if request.get("one_token_at_a_time") else 512
    llm = llama_cpp.Llama(model_path=request["model"], lora_path=request.get("lora"), n_ctx=request["n_ctx"],
                          n_batch=batch, n_ubatch=batch, n_threads=os.cpu_count() or 1, seed=0, verbose=False)
    meta = dict(llm.metadata)
    stop = {llm.token_eos()}
    for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        if key in meta:
            stop.add(int(meta[key]))
    answers = []
    for text in request["prompts"]:
        ids = llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)
        out: list[int] = []
        for token in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
            if token in stop or len(out) >= request["max_new_tokens"]:
                break
            out.append(int(token))
        answers.append({"prompt_ids": [int(i) for i in ids], "ids": out,
                        "stopped": "end" if len(out) < request["max_new_tokens"] else "max_new_tokens"})
    keys = ("tokenizer.chat_template", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
            "tokenizer.ggml.bos_token_id", "tokenizer.ggml.add_bos_token", "lorafit.system_prompt",
            "tokenizer.ggml.pre", "general.file_type")
    return {"answers": answers, "stop_ids": sorted(stop), "metadata": {k: meta.get(k) for k in keys}}


def main(argv: list[str] | None = None) -> None:
    """`python -m lorafit.export.llamacpp fetch` (make install) | `child REQUEST.json RESULT.json`."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["fetch"]:
        try:
            print(converters_dir())
        except LorafitError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
    elif argv[:1] == ["child"] and len(argv) == 3:
        _child(json.loads(Path(argv[1]).read_text(encoding="utf-8")), Path(argv[2]))
    else:
        print(main.__doc__, file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
