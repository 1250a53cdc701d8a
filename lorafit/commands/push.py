"""`lorafit push`: upload an adapter (or a merged model) with a model card, in one commit.

What is uploaded is decided here, listed by ``--dry-run`` without any network, and sent with a single
``HfApi.create_commit``. The token comes from huggingface_hub's usual places (HF_TOKEN, the login cache)
and is only ever handed to HfApi: never printed, never written.
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lorafit import log
from lorafit.commands import merge as merge_mod
from lorafit.commands.card import build_card
from lorafit.core import rundir
from lorafit.core.adapters import BLEND_FILE, find_adapter, holds_adapter
from lorafit.core.models import adapter_hub_base
from lorafit.core.secrets import redact
from lorafit.errors import ModelError, PushError


@dataclass
class Upload:
    """What goes to the hub: files (path in repo → local file) and the card."""

    kind: str  # 'adapter' | 'merged'
    files: dict[str, Path | bytes]  # bytes: generated here (merge_report.json without local paths)
    card: str
    note: str = ""


def push(path: str | Path, *, repo_id: str, private: bool = False, revision: str | None = None,
         merged: bool = False, dry_run: bool = False) -> dict:
    """Push *path* (adapter dir, run dir or merged model dir) to *repo_id*. Returns what was (or, with
    *dry_run*, would be) uploaded: render.push_lines turns it into lines."""
    check_repo_id(repo_id)
    path = Path(path)
    with tempfile.TemporaryDirectory(prefix="lorafit-push-") as tmp:
        upload = plan_upload(path, repo_id, merged=merged, tmp=Path(tmp))
        if dry_run:
            return _dry_run(upload, repo_id, private, revision)
        return _send(upload, repo_id, private, revision)


def check_repo_id(repo_id: str) -> None:
    """OWNER/NAME, valid by huggingface_hub's own rules."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
        valid = repo_id.count("/") == 1
    except HFValidationError:
        valid = False
    if not valid:
        raise PushError(f"{repo_id!r} is not a hub repo id", where="--repo-id", fix="use OWNER/NAME, e.g. alice/my-adapter")


def plan_upload(path: Path, repo_id: str, *, merged: bool, tmp: Path) -> Upload:
    kind = _kind(path)
    if kind == "merged":
        if merged:
            raise PushError("already a merged model", where=str(path), fix="drop --merged")
        report = _read_json(path / merge_mod.REPORT_FILE)
        recipe = metrics = None
        adapter = (report or {}).get("adapter")
        hub_base = None
        if adapter and Path(adapter).exists():  # the adapter's run is still here: describe its training
            try:
                src = find_adapter(adapter)
                recipe, metrics = src.recipe, _read_json(src.run_dir / rundir.METRICS) if src.run_dir else None
                hub_base = adapter_hub_base(src)
            except ModelError:
                pass
        base = hub_base or (report or {}).get("base") or _read_json(path / "config.json").get("_name_or_path")
        card = build_card(repo_id=repo_id, kind="merged", base=base, recipe=recipe, metrics=metrics, merge_report=report)
        return Upload("merged", _local_free(_files(path), [path]), card)

    source = find_adapter(path)
    recipe = source.recipe
    metrics = _read_json(source.run_dir / rundir.METRICS) if source.run_dir else None
    if not merged:
        base = adapter_hub_base(source)
        card = build_card(repo_id=repo_id, kind="adapter", base=base or _local_base_name(source), recipe=recipe,
                          metrics=metrics)
        files = _without_readme(rundir.pushed_files(source.adapter_dir, source.run_dir))
        if base != source.config.get("base_model_name_or_path"):
            files["adapter_config.json"] = _adapter_config(source, base)
        if isinstance(files.get(BLEND_FILE), Path):  # a blend: its record, without the first source's local recipe
            files[BLEND_FILE] = _blend_record(files[BLEND_FILE], base)
        return Upload("adapter", _local_free(files, [source.adapter_dir, source.run_dir]), card)

    # --merged: exactly `lorafit merge --verify` (bf16 base, never quantized) into a temporary dir.
    out = tmp / "merged"
    report = merge_mod.merge(path, out, dtype="bfloat16", verify=True)
    if not report["verify"]["passed"]:
        v = report["verify"]
        why = "; ".join(v.get("failures") or [f"max |logit diff| {v['max_abs_logit_diff']:.3g} > {v['tolerance']:.3g}"])
        raise ModelError(f"the merged model does not compute what base + adapter computes ({why}); nothing pushed",
                         where=str(path),
                         fix="run `lorafit merge --verify` to inspect merge_report.json")
    card = build_card(repo_id=repo_id, kind="merged", base=adapter_hub_base(source) or _local_base_name(source),
                      recipe=recipe, metrics=metrics, merge_report=report)
    return Upload("merged", _local_free(_files(out), [out]), card,
                  note="merged (bfloat16) into a temporary directory and verified")


def _kind(path: Path) -> str:
    if holds_adapter(path):
        return "adapter"
    if (path / "config.json").is_file() and (any(path.glob("*.safetensors")) or any(path.glob("*.bin"))):
        return "merged"
    raise PushError("neither an adapter, a run directory nor a model directory", where=str(path),
                    fix="pass a run directory, its adapter/ directory, or the output of `lorafit merge`")


def _without_readme(files: dict[str, Path]) -> dict[str, Path | bytes]:
    """README.md is replaced by the generated card."""
    return {rel: p for rel, p in files.items() if rel != "README.md"}


def _files(directory: Path) -> dict[str, Path | bytes]:
    """Every file of a model directory to upload, by path in the repo (hidden ones never)."""
    REPORT_FILE = merge_mod.REPORT_FILE
    files = _without_readme(rundir.visible_files(directory))
    if REPORT_FILE in files:  # local paths stay on this machine: keep their last component only
        report = _read_json(directory / REPORT_FILE)
        for key in ("adapter", "output", "base"):
            if report.get(key) and (key != "base" or Path(report[key]).exists() or report[key].startswith("/")):
                report[key] = Path(report[key]).name
        files[REPORT_FILE] = (json.dumps(report, indent=2) + "\n").encode("utf-8")
    return files


def _local_free(files: dict[str, Path | bytes], roots: list[Path | None]) -> dict[str, Path | bytes]:
    """What leaves this machine holds nothing of it: no file a symlink reaches outside the directories pushed
    (refused: PushError), and no absolute local path in a JSON file (each becomes its last component)."""
    inside = [Path(r).resolve() for r in roots if r is not None]
    out: dict[str, Path | bytes] = {}
    for rel, item in files.items():
        if isinstance(item, Path):
            real = item.resolve()
            if not any(real.is_relative_to(r) for r in inside):
                raise PushError(f"{rel} is a link to {real}, outside the directory pushed", where=str(item),
                                fix="lorafit uploads only files inside it: copy the file in, or remove the link")
            if rel.endswith(".json"):
                try:
                    doc = json.loads(item.read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    doc = None
                scrubbed = _without_local_paths(doc)
                if doc is not None and scrubbed != doc:
                    item = (json.dumps(scrubbed, indent=2) + "\n").encode("utf-8")
        out[rel] = item
    return out


def _without_local_paths(value):
    """*value* (parsed JSON) with every absolute path on this machine replaced by its last component."""
    if isinstance(value, dict):
        return {k: _without_local_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_local_paths(v) for v in value]
    if isinstance(value, str) and "\n" not in value and len(value) < 4096 and \
            (value.startswith(("/", "~/")) or re.match(r"[A-Za-z]:[\\/]", value)):
        return Path(value).name or value
    return value


def _blend_record(path: Path, base: str | None) -> bytes:
    """lorafit-blend.json as uploaded: its sources by name and directory name, its base the hub id (or none), and
    not the first source's recipe (local paths, data files: it stays on this machine)."""
    record = _read_json(path)
    record.pop("recipe", None)
    record["base"] = base
    for s in record.get("sources") or []:
        if isinstance(s, dict) and s.get("dir"):
            s["dir"] = Path(s["dir"]).name
    return (json.dumps(record, indent=2) + "\n").encode("utf-8")


def _adapter_config(source, base: str | None) -> bytes:
    """adapter_config.json as uploaded: its base the hub id (adapter_hub_base), never a path on this
    machine; with no hub id known the base is left out (null), and loading it needs the base named."""
    config = dict(source.config)
    config["base_model_name_or_path"] = base
    if base is None:
        config["revision"] = None
        log.warn(f"{source.adapter_dir}: the adapter's base {source.base} is local and no hub id is known "
                 "(set model.base_id in the recipe): uploaded without a base model")
    return (json.dumps(config, indent=2, sort_keys=True) + "\n").encode("utf-8")


def _local_base_name(source) -> str:
    """What the card calls a local base: the GGUF file or directory the run named, by its name only."""
    model = (source.recipe or {}).get("model") or {}
    return model.get("gguf_file") or model.get("name") or source.base


def _size(item: Path | bytes) -> int:
    return len(item) if isinstance(item, bytes) else item.stat().st_size


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}


def _dry_run(upload: Upload, repo_id: str, private: bool, revision: str | None) -> dict:
    from huggingface_hub import get_token

    return {"dry_run": True, "repo_id": repo_id, "private": private, "revision": revision, "kind": upload.kind,
            "note": upload.note, "card": upload.card, "token_found": bool(get_token()),
            "files": [{"path": rel, "bytes": _size(p), "scrubbed": isinstance(p, bytes)} for rel, p in upload.files.items()]}


def _send(upload: Upload, repo_id: str, private: bool, revision: str | None) -> dict:
    from huggingface_hub import CommitOperationAdd, HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError

    token = get_token()
    if not token:
        raise PushError("no Hugging Face token found", where="push",
                        fix="set HF_TOKEN or run `hf auth login` (a token with write access)")
    api = HfApi(token=token)
    ops = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=p if isinstance(p, bytes) else str(p))
           for rel, p in upload.files.items()]
    ops.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=upload.card.encode("utf-8")))
    try:
        log.info(f"pushing {len(ops)} files to {repo_id}")
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        info = api.create_commit(repo_id, operations=ops, revision=revision, repo_type="model",
                                 commit_message=f"Upload {upload.kind} with lorafit")
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        message = redact(str(e).splitlines()[0], token)
        if status in (401, 403):
            raise PushError(f"the hub refused the token ({status}): {message}", where=repo_id,
                            fix="use a token with write access to this namespace (HF_TOKEN or `hf auth login`)") from None
        raise PushError(f"the hub answered {status}: {message}", where=repo_id, fix="check the repo id and retry") from None
    url = getattr(info, "commit_url", None) or f"https://huggingface.co/{repo_id}"
    return {"dry_run": False, "repo_id": repo_id, "revision": revision, "kind": upload.kind, "files": len(ops),
            "url": url}
