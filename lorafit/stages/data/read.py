"""Reading the rows of a data file (.jsonl .json .csv .parquet) or a cached hub dataset; the records the
data stage's modules pass each other (Source, Tokenized); the fingerprint its caches are keyed by.

Files are read as bytes and parsed here rather than by ``datasets``, so that every bad row is reported as
``file:line``. A hub dataset stays a ``datasets.Dataset`` (memory-mapped Arrow, fingerprinted cache).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from lorafit.core.hub import is_hub_id
from lorafit.core.prompts import kind
from lorafit.errors import DataError
from lorafit.recipe import DataSpec

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
_READ_FIX = "give a .jsonl, .json, .csv or .parquet file, or a hub dataset id (owner/name)"


@dataclass
class Source:
    rows: Any                           # list[dict] of a local file; a datasets.Dataset for a hub dataset
    locs: list[str]                     # "file:line" of each row, for error messages
    digest: bytes                       # sha256 of the file bytes (the dataset's fingerprint for a hub dataset)
    name: str


class Tokenized(NamedTuple):
    """What a task's tokenizer (data.text, data.classify, data.tokens) makes of the sources."""

    parts: list                         # one datasets.Dataset (input_ids, labels) per source: train[, eval]
    label_names: list[str] | None       # the classes or tags (labelled tasks)
    truncated: int                      # rows longer than data.max_length
    dropped: list[str]                  # locations of rows dropped with no trained token left
    lengths: list[int]                  # tokens per row before truncation (the data doctor's percentiles)
    eos_cut: list[str]                  # locations of rows whose trained EOS was cut off


def read_rows(path: str, *, where: str = "data.train", split: str = "train") -> list[dict]:
    """The rows of a local .jsonl/.json/.csv/.parquet file or of a cached hub dataset (as dicts)."""
    rows = read_source(path, where, split).rows
    return rows if isinstance(rows, list) else rows.to_list()


def read_located(path: str, *, where: str = "data.train", split: str = "train") -> tuple[list[dict], list[str]]:
    """(rows, their "file:line" locations), for commands that check rows one by one (predict)."""
    src = read_source(path, where, split)
    return (src.rows if isinstance(src.rows, list) else src.rows.to_list()), src.locs


def read_source(path: str, where: str, split: str) -> Source:
    p = Path(path)
    if not p.exists():
        if not p.suffix and "/" in path and is_hub_id(path):
            return _read_hub(path, where, split)
        import difflib

        folder = p.parent if p.parent.is_dir() else None
        near = difflib.get_close_matches(p.name, [f.name for f in folder.iterdir() if f.is_file()], n=1,
                                         cutoff=0.75) if folder is not None else []
        if near:
            raise DataError(f"file not found: {path}", where=where, fix=f"did you mean {folder / near[0]}?")
        raise DataError(f"file not found: {path}" + ("" if folder is not None else f" (no folder {p.parent})"),
                        where=where, fix=_READ_FIX)
    if p.is_dir():
        raise DataError(f"{path} is a directory", where=where, fix=_READ_FIX)
    suffix = p.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(f"unsupported file type '{suffix or p.name}'", where=where, fix=_READ_FIX)
    data = p.read_bytes()
    if suffix == ".parquet":
        rows, locs = _read_parquet(p)
    else:
        text = _decode(data, path)
        if suffix == ".csv":
            rows, locs = _read_csv(text, path)
        elif suffix == ".json" and text.lstrip().startswith("["):
            rows, locs = _read_json_array(text, path)
        else:
            rows, locs = _read_json_lines(text, path)
    if not rows:
        what = "is empty" if not data.strip() else "holds no rows"
        raise DataError(f"no rows: the file {what}", where=path, fix="add training examples, one per line")
    return Source(rows, locs, hashlib.sha256(data).digest(), path)


def _decode(data: bytes, path: str) -> str:
    data = data.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 BOM, as Excel writes it
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line_start = data.rfind(b"\n", 0, e.start) + 1
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"not valid UTF-8: byte 0x{data[e.start]:02x} at byte {e.start - line_start + 1} "
                        f"of the line ({e.reason})", where=f"{path}:{line}",
                        fix="re-save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None


def _read_json_lines(text: str, path: str) -> tuple[list[dict], list[str]]:
    rows, locs = [], []
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"invalid JSON: {e.msg} (column {e.colno})", where=f"{path}:{n}",
                            fix="each line must be one complete JSON object") from None
        if not isinstance(row, dict):
            raise DataError(f"expected a JSON object ({{...}}), got {kind(row)}", where=f"{path}:{n}",
                            fix="each line must be one JSON object with the data.columns as keys")
        rows.append(row)
        locs.append(f"{path}:{n}")
    return rows, locs


def _read_json_array(text: str, path: str) -> tuple[list[dict], list[str]]:
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"invalid JSON: {e.msg} (column {e.colno})", where=f"{path}:{e.lineno}",
                        fix="a .json file holds one JSON array of objects, or one object per line") from None
    # Walk the (valid) array once more to learn the line each element starts on.
    decoder, ws = json.JSONDecoder(), re.compile(r"[ \t\r\n]*")
    i, line, prev = text.index("[") + 1, 1, 0
    locs = []
    for item in items:
        i = ws.match(text, i).end()
        line += text.count("\n", prev, i)
        prev = i
        if not isinstance(item, dict):
            raise DataError(f"expected a JSON object ({{...}}), got {kind(item)}", where=f"{path}:{line}",
                            fix="the array must hold one object per example")
        locs.append(f"{path}:{line}")
        _, i = decoder.raw_decode(text, i)
        i = ws.match(text, i).end() + 1  # past the comma
    return items, locs


def _read_csv(text: str, path: str) -> tuple[list[dict], list[str]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows, locs = [], []
    for row in reader:
        if None in row:
            raise DataError(f"row has more fields than the header ({len(reader.fieldnames)})",
                            where=f"{path}:{reader.line_num}", fix="quote fields that contain commas")
        rows.append(row)
        locs.append(f"{path}:{reader.line_num}")
    return rows, locs


def _read_parquet(p: Path) -> tuple[list[dict], list[str]]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(p).to_pylist()
    except Exception as e:  # pyarrow raises several unrelated types for a bad file
        raise DataError(f"cannot read parquet: {e}", where=str(p), fix=_READ_FIX) from None
    return rows, [f"{p} row {n}" for n in range(1, len(rows) + 1)]


def _read_hub(name: str, where: str, split: str) -> Source:
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # offline misses, unknown split, bad script: all mean "not usable here"
        raise DataError(f"dataset '{name}' not found locally or in the hub cache ({type(e).__name__})",
                        where=where, fix="download it once with network access, or give a local file") from None
    if len(ds) == 0:
        raise DataError(f"no rows in split '{split}' of dataset '{name}'", where=where)
    # The Dataset itself travels on (memory-mapped Arrow, fingerprinted cache, map(num_proc=...)).
    digest = hashlib.sha256(ds._fingerprint.encode()).digest()
    return Source(ds, [f"{name}[{split}] row {n}" for n in range(1, len(ds) + 1)], digest, name)


_COLUMNS_VERSION = 3  # bump when the tokenize maps' output columns change: cached hub-dataset maps go stale


def fingerprint(src: Source, spec: DataSpec, tokenizer) -> str:
    """What the tokenized rows depend on: the data, the data section, the tokenizer (its vocabulary, special
    tokens and chat template) and lorafit's version. datasets caches a hub dataset's maps under it."""
    from lorafit import __version__

    vocab = hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()
    who = json.dumps([vocab, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id,
                      getattr(tokenizer, "chat_template", None), __version__, _COLUMNS_VERSION], default=str)
    return hashlib.sha256(src.digest + spec.model_dump_json().encode() + who.encode()).hexdigest()[:32]
