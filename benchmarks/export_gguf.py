"""The demo run exported to llama.cpp and proven there: `lorafit export --to gguf --verify` at each type, on the
held-out dates of recipes/quickstart.yaml (builtin:smollm2-135m, 50 dates never trained on).

    .venv/bin/python benchmarks/export_gguf.py                       # trains the demo run first (~4 min)
    .venv/bin/python benchmarks/export_gguf.py --run runs/quickstart --dates 50 --quants f16,q8_0

For each type: file sizes, export and verify time, exact match of lorafit (base + unmerged adapter), of the
float32 merge, of llama.cpp (merged file; base + GGUF LoRA) and of transformers' GGUF reader, the answers
identical to lorafit's, and the issue's bar: llama.cpp within 2 points of lorafit's exact match. Prints a
markdown table (docs/export.md) and writes OUT/export_benchmark.json. Run it alone on the machine: the
times are wall clock.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def train_demo(out: Path) -> Path:
    run = out / "quickstart"
    if not (run / "adapter" / "adapter_config.json").is_file():
        print(f"training the demo run into {run} (recipes/quickstart.yaml)", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "lorafit", "train", str(REPO / "recipes" / "quickstart.yaml"),
                        "--output-dir", str(run)], check=True)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, help="a trained demo run (default: train recipes/quickstart.yaml)")
    parser.add_argument("--dates", type=int, default=None, help="held-out dates to answer (default: all 50)")
    parser.add_argument("--quants", default="f16,q8_0", help="comma-separated: f16, q8_0, q4_k_m")
    parser.add_argument("--output", type=Path, help="where the exports go (default: a temporary directory)")
    args = parser.parse_args()

    from lorafit.cli import main as _  # noqa: F401  (the CLI's library set-up: quiet libraries)
    from lorafit.commands.export import export
    from lorafit.core import libs

    libs.prepare()
    out = args.output or Path(tempfile.mkdtemp(prefix="lorafit-export-bench-"))
    run = args.run or train_demo(out)
    rows = []
    for quant in args.quants.split(","):
        start = time.perf_counter()
        report = export(run, "gguf", out / f"dates-{quant}", quant=quant, verify=True, overwrite=True,
                        verify_rows=args.dates)
        seconds = time.perf_counter() - start
        v = report["verify"]
        em = v["exact_match"]
        rows.append({"quant": quant, "seconds": round(seconds, 1), "prompts": v["prompts"],
                     "mb": {k: round(b / 1e6, 2) for k, b in report["bytes"].items()},
                     "exact_match": em, "agreement": {k: a["identical"] for k, a in v["agreement"].items()},
                     "within_2_points": abs(em.get("gguf", 0) - em["lorafit"]) <= 0.02 + 1e-9,
                     "passed": v["passed"], "failures": v["failures"]})
        print(json.dumps(rows[-1]), file=sys.stderr)
    (out / "export_benchmark.json").write_text(json.dumps(rows, indent=2) + "\n")

    print("| type | merged GGUF | LoRA GGUF | base GGUF | lorafit EM | float32 merge EM | llama.cpp EM | "
          "llama.cpp base + LoRA EM | transformers' GGUF reader EM | identical to lorafit | within 2 points | "
          "export + verify |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        em, n = r["exact_match"], r["prompts"]
        cell = lambda k: f"{em[k]:.0%}" if k in em else "–"  # noqa: E731
        print(f"| {r['quant']} | {r['mb']['merged']} MB | {r['mb'].get('lora', '–')} MB | {r['mb']['base']} MB | "
              f"{cell('lorafit')} | {cell('merged')} | {cell('gguf')} | {cell('gguf_lora')} | "
              f"{cell('transformers_gguf')} | {r['agreement'].get('gguf_vs_lorafit', 0)}/{n} | "
              f"{'yes' if r['within_2_points'] else 'NO'} | {r['seconds']} s |")
    print(f"\nexports and JSON in {out}")
    if not all(r["within_2_points"] for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
