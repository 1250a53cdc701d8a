"""`lorafit sweep` on the demo task: which rank and which learning rate for date normalisation.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/sweep.py [--workdir DIR] [--alpha tied|recipe] [--quick]

Sweeps recipes/quickstart.yaml (the built-in SmolLM2-135M-Instruct, 60 steps of 8 rows, 50 held-out dates) over
r 2, 8, 32 × learning rate 2e-4, 1e-3: six points, each `lorafit train` in its own process, one after another
on CPU, ranked by exact match on the held-out dates (the task's headline metric). With --alpha tied (the
default) lora.alpha varies with r as 2·r, the recipe's own ratio (16 → 32), so that every point has the same
scale alpha/r; --alpha recipe keeps the recipe's alpha 32 for every r.

It prints the sweep's table, then a block for docs/sweep.md: the machine, the date, the whole sweep's wall
time, and sweep.md's table. Run it alone (nothing else on the machine): tokens/s and times are measured.
A re-run resumes: finished points are reused, an interrupted one trains on. --quick: two points, one step,
eight eval rows, to check that everything runs; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "quickstart.yaml"


def command(workdir: Path, alpha: str, quick: bool) -> list[str]:
    ranks = [2, 8] if quick else [2, 8, 32]
    if alpha == "tied":
        grid = ["--grid", "lora.r,lora.alpha=" + ";".join(f"{r},{2 * r}" for r in ranks)]
    else:
        grid = ["--grid", "lora.r=" + ",".join(map(str, ranks))]
    rates = "1e-3" if quick else "2e-4,1e-3"
    cmd = [sys.executable, "-m", "lorafit", "sweep", str(RECIPE), *grid, "--grid", f"training.learning_rate={rates}",
           "--set", f"output.dir={workdir}"]
    if quick:
        cmd += ["--max-steps", "1", "--set", "evaluation.max_samples=8", "--set", "evaluation.generate_samples=8"]
    return cmd


def machine() -> str:
    import torch

    cpu = "unknown CPU"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} cores, {gpu}; torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"Python {platform.python_version()}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "bench-sweep",
                        help="output.dir of the sweep (the points go to WORKDIR/sweep/)")
    parser.add_argument("--alpha", choices=("tied", "recipe"), default="tied",
                        help="tied: lora.alpha = 2·r for each point; recipe: the recipe's alpha for every r")
    parser.add_argument("--quick", action="store_true", help="two points, one step: does everything run?")
    args = parser.parse_args()
    workdir = args.workdir.resolve()
    cmd = command(workdir, args.alpha, args.quick)
    print("$ lorafit " + shlex.join(cmd[3:]), flush=True)
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    start = time.perf_counter()
    code = subprocess.call(cmd, cwd=REPO, env=env)
    seconds = time.perf_counter() - start
    sweep_dir = workdir / "sweep"
    if not (sweep_dir / "sweep.json").is_file():
        return code or 1
    doc = json.loads((sweep_dir / "sweep.json").read_text(encoding="utf-8"))
    trained = [p for p in doc["points"] if p["action"] in ("trained", "resumed")]
    print("\n--- for docs/sweep.md " + "-" * 60)
    print(f"Measured {datetime.date.today().isoformat()} on {machine()}; `benchmarks/sweep.py"
          f"{' --quick' if args.quick else ''}{' --alpha recipe' if args.alpha == 'recipe' else ''}`: "
          f"{len(trained)} of {len(doc['points'])} points trained in this run, whole sweep {seconds / 60:.1f} min "
          f"wall{' (quick: the numbers mean nothing)' if args.quick else ''}.\n")
    print((sweep_dir / "sweep.md").read_text(encoding="utf-8"))
    return code


if __name__ == "__main__":
    sys.exit(main())
