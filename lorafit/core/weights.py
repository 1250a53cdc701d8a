"""Weight files on disk, read without their tensors: the one safetensors header reader (names, shapes,
dtypes, in milliseconds and without torch) and the one rule for which tensors are LoRA's.

save (checks the adapter it wrote), merge (shapes against the base, the streaming merge's plan, no LoRA
key left), blend and export (ranks per module), and models (a saved head's classes) all read headers through here.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from lorafit.errors import ModelError

# safetensors dtype codes → torch dtype names.
DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
          "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
          "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
_MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: str              # the safetensors code: F32, BF16, I64, ...


def read_header(path: str | Path) -> dict[str, TensorInfo]:
    """A safetensors file's tensors by name (sorted, as safetensors lists them): shape and dtype, no data read."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            head = f.read(8)
            size = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 0 < size <= _MAX_HEADER:
                raise ValueError("no safetensors header")
            doc = json.loads(f.read(size))
        tensors = {name: TensorInfo(tuple(int(n) for n in v["shape"]), str(v["dtype"]))
                   for name, v in doc.items() if name != "__metadata__"}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ModelError(f"not a readable safetensors file ({type(e).__name__}: {str(e)[:120]})",
                         where=str(path)) from None
    return dict(sorted(tensors.items()))


def tensor_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """A safetensors file's tensor names and shapes."""
    return {name: t.shape for name, t in read_header(path).items()}


def model_index(model_dir: str | Path) -> dict[str, tuple[Path, tuple, str]]:
    """Tensor name → (file, shape, dtype code) over every safetensors file of a model directory ({} when the
    checkpoint has none: .bin pickles only)."""
    index: dict[str, tuple[Path, tuple, str]] = {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        for name, t in read_header(path).items():
            index[name] = (path, t.shape, t.dtype)
    return index


# ----------------------------------------------------------------------------------------------
# Which tensors are LoRA's


# A LoRA factor: in a file `MODULE.lora_A.weight` (`MODULE.lora_embedding_A` for an embedding), in a live
# peft model the module `MODULE.lora_A` (its per-adapter child `MODULE.lora_A.default` is not counted again).
_FACTOR = re.compile(r"^(?P<module>.+)\.lora_(?P<embedding>embedding_)?(?P<part>[AB])(?:\.weight)?$")
PEFT_PREFIX = "base_model.model."  # peft's prefix before the base model's own module paths


def is_lora_key(name: str) -> bool:
    """Any tensor of LoRA's own (factors, DoRA magnitudes), as opposed to the base's or a saved head's."""
    return "lora_" in name


def lora_factor(name: str) -> tuple[str, str, bool] | None:
    """(module, 'A' | 'B', is an embedding's) for a LoRA factor's name, file key or live module; else None."""
    m = _FACTOR.match(name)
    return (m["module"], m["part"], bool(m["embedding"])) if m else None


@dataclass(frozen=True)
class LoraModule:
    """One adapted module of a saved adapter, from its factors' shapes."""

    name: str                    # as in the file: base_model.model.<path in the base model>
    a: tuple[int, ...]           # lora_A: (r, in_features)
    b: tuple[int, ...] | None    # lora_B: (out_features, r)
    embedding: bool = False      # lora_embedding_A/B (A: (r, vocab), B: (dim, r))

    @property
    def rank(self) -> int:
        return int(self.a[0])

    @property
    def path(self) -> str:
        """The module's path in the base model."""
        return self.name.removeprefix(PEFT_PREFIX)


def lora_modules(header: dict[str, TensorInfo]) -> dict[str, LoraModule]:
    """The adapted modules of an adapter file's header, by name: a module is adapted when it has an A."""
    parts: dict[str, dict] = {}
    for key, t in header.items():
        found = lora_factor(key)
        if found:
            module, part, embedding = found
            parts.setdefault(module, {"embedding": embedding})[part] = t.shape
    return {m: LoraModule(m, p["A"], p.get("B"), p["embedding"]) for m, p in parts.items() if "A" in p}


def count_adapted(peft_model) -> int:
    """Modules of a live peft model that carry LoRA factors (the same rule as lora_modules for a file). A live
    layer holds both containers, lora_A and lora_embedding_A (one of them empty): each module counts once."""
    return len({found[0] for name, _ in peft_model.named_modules() if (found := lora_factor(name)) and found[1] == "A"})


ADAPTER_WEIGHTS = "adapter_model.safetensors"


def adapter_weights(adapter_dir: str | Path) -> Path:
    """An adapter directory's safetensors file; ModelError with the fix when it holds none (or only a pickle)."""
    path = Path(adapter_dir) / ADAPTER_WEIGHTS
    if not path.is_file():
        fix = ("re-save it with safetensors (peft's save_pretrained does by default)"
               if (Path(adapter_dir) / "adapter_model.bin").is_file() else "the directory must hold peft's weights")
        raise ModelError(f"no {ADAPTER_WEIGHTS}", where=str(adapter_dir), fix=fix)
    return path


def adapter_ranks(adapter_dir: str | Path) -> dict[str, int]:
    """{adapted module (as in the file): its rank} of an adapter directory, from its header; ModelError when the
    file holds no LoRA factor."""
    path = adapter_weights(adapter_dir)
    ranks = {m.name: m.rank for m in lora_modules(read_header(path)).values()}
    if not ranks:
        raise ModelError("the adapter holds no LoRA weights", where=str(path))
    return ranks
