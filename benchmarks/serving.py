"""`lorafit serve` under load: mixed-adapter batches against one request at a time, and memory against one
process per adapter (docs/serving.md).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/serving.py [--tiny] [--workdir DIR] [--output FILE.json]

Run it alone on the machine: every number is a wall-clock or a resident-memory reading.

1. Adapters: --adapters (4) and --memory-adapters (8) LoRA adapters of SmolLM2-135M-Instruct (the built-in
   GGUF, dequantized once by lorafit), r=16 on all linear layers, made here with peft and a seeded random
   B (so each changes the answers, as a trained one does), saved with the base's tokenizer. --adapter DIR
   (repeatable) uses trained ones instead.
2. Throughput: one server (`lorafit serve --max-batch 16`), then the same server with `--max-batch 1` (one
   request at a time). --clients (16) threads each send --requests (4) chat requests in turn, the adapters
   round-robin, greedy, max_tokens --max-tokens (64). Reported: requests/s, generated tokens/s, p50/p95
   latency, the largest batch, and the ratio (goal: batched ≥ 3× one-at-a-time at 16 clients).
3. Identity: every request's batched answer against its one-at-a-time answer; where they differ, the first
   token that differs and the top-2 logit gap there (the alone decode, recomputed in this process): a
   near-tie flipped by the batch's different float summation order, or a bug.
4. Memory: resident memory (VmRSS) of a server after every adapter answered once: the base alone, one
   adapter, --memory-adapters adapters. Goal: with 8 adapters ≤ (the base as served + the adapters' own
   sizes) × 1.05, against 8 × (one adapter) for one process per adapter. "The base as served" is the
   one-adapter process less that adapter's size: peft's import and wrapper are paid once, and a plain-model
   server (also reported) never pays them.

--tiny: the shipped tiny Llama and 2 clients × 2 requests, to check that everything runs (its numbers mean
nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROMPTS = ["Normalise the date to YYYY-MM-DD: 3rd of March 2021", "What is the capital of France?",
           "Write one sentence about the sea.", "Name three colours.", "Count from one to ten in words.",
           "Explain what a LoRA adapter is in one sentence.", "Translate 'good morning' into French.",
           "What is two plus two?"]


# ----------------------------------------------------------------------------------------------- set-up


def base_dir(tiny: bool) -> Path:
    if tiny:
        return REPO / "examples" / "tiny-llama"
    from lorafit.core import gguf, libs
    from lorafit.recipe import ModelSpec

    libs.quiet_libraries()
    return Path(gguf.materialize_gguf(ModelSpec(name="builtin:smollm2-135m")).name)


def make_adapters(base: Path, out: Path, n: int) -> list[Path]:
    """n LoRA adapters of *base* (r=16, all linear layers), B drawn with seed i, saved with its tokenizer."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dirs = [out / f"adapter{i}" for i in range(n)]
    if all((d / "adapter_config.json").is_file() for d in dirs):
        return dirs
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    for i, d in enumerate(dirs):
        model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0))
        generator = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
        model.save_pretrained(str(d))
        tokenizer.save_pretrained(str(d))
    return dirs


class Server:
    """`python -m lorafit serve --port 0 ARGS`, its URL read from the banner."""

    def __init__(self, args: list[str], log: Path):
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.log = log.open("w")
        self.proc = subprocess.Popen([sys.executable, "-m", "lorafit", "serve", "--port", "0", *args], cwd=REPO,
                                     env=env, stdout=subprocess.PIPE, stderr=self.log, text=True)
        lines: queue.Queue = queue.Queue()

        def read() -> None:
            for line in self.proc.stdout:
                lines.put(line)

        threading.Thread(target=read, daemon=True).start()
        deadline, self.url = time.monotonic() + 600, None
        while self.url is None and time.monotonic() < deadline:
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            if line and line.startswith("serving on "):
                self.url = line.split()[2].removesuffix("/v1")
        if self.url is None:
            self.stop()
            raise SystemExit(f"lorafit serve did not start; see {log}")

    def chat(self, model: str, prompt: str, max_tokens: int) -> dict:
        body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                "temperature": 0}
        request = urllib.request.Request(f"{self.url}/v1/chat/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=3600) as r:
            return json.loads(r.read())

    def health(self) -> dict:
        with urllib.request.urlopen(f"{self.url}/health", timeout=60) as r:
            return json.loads(r.read())

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


# ----------------------------------------------------------------------------------------------- measures


def load(server: Server, names: list[str], clients: int, requests: int, max_tokens: int) -> dict:
    """*clients* threads, *requests* each, adapters round-robin: answers, latencies, wall time."""
    asks = [(c, r, names[(c * requests + r) % len(names)], PROMPTS[(c + r) % len(PROMPTS)])
            for c in range(clients) for r in range(requests)]
    answers, latencies, tokens = {}, [], [0]
    lock = threading.Lock()
    start = threading.Barrier(clients)

    def client(c: int) -> None:
        start.wait()
        for _, r, model, prompt in [a for a in asks if a[0] == c]:
            t = time.perf_counter()
            reply = server.chat(model, prompt, max_tokens)
            with lock:
                latencies.append(time.perf_counter() - t)
                answers[(c, r)] = (model, prompt, reply["choices"][0]["message"]["content"])
                tokens[0] += reply["usage"]["completion_tokens"]

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    q = statistics.quantiles(latencies, n=20) if len(latencies) > 1 else latencies * 19
    return {"requests": len(asks), "wall_s": round(wall, 2), "requests_per_s": round(len(asks) / wall, 3),
            "tokens_per_s": round(tokens[0] / wall, 1), "p50_s": round(statistics.median(latencies), 3),
            "p95_s": round(q[18], 3), "largest_batch": server.health()["largest_batch"], "answers": answers}


def divergences(batched: dict, alone: dict, adapters: dict[str, Path], max_tokens: int) -> list[dict]:
    """Requests whose batched answer differs from the alone one: where, and the top-2 logit gap there."""
    differ = [key for key in batched if batched[key] != alone[key]]
    if not differ:
        return []
    import torch

    from lorafit.core.adapters import find_named
    from lorafit.core.generation import stop_ids
    from lorafit.serving import protocol as p
    from lorafit.serving.batcher import active, forward, new_cache
    from lorafit.serving.handlers import _tokens, render_chat
    from lorafit.serving.registry import open_registry

    torch.set_grad_enabled(False)
    registry = open_registry(find_named(list(adapters.items())), None, max_loaded=len(adapters))
    found = []
    for key in differ:
        model_name, prompt, text = batched[key]
        served = registry.get(model_name)
        registry.load(served)
        ids = _tokens(served, render_chat(served, [p.ChatMessage(role="user", content=prompt)]))
        stops, out, gaps = stop_ids(served.tokenizer, served.data), [], []
        with active(registry.model, None if served.is_base else served.peft_name):
            cache, x = new_cache(), torch.tensor([ids])
            logits = forward(registry.model, x, torch.ones_like(x), None, cache)[0]
            while len(out) < max_tokens:
                top = logits.topk(2)
                out.append(int(top.indices[0]))
                gaps.append(float(top.values[0] - top.values[1]))
                if out[-1] in stops:
                    break
                logits = forward(registry.model, torch.tensor([[out[-1]]]), torch.ones(1, len(ids) + len(out),
                                 dtype=torch.long), None, cache)[0]
        registry.release(served)
        k = next((i for i in range(len(out))
                  if not text.startswith(served.tokenizer.decode(out[:i + 1], skip_special_tokens=True).strip())),
                 len(out) - 1)
        found.append({"model": model_name, "prompt": prompt, "first_differing_token": k,
                      "top2_logit_gap": round(gaps[k], 6), "alone": alone[key][2][:80], "batched": text[:80]})
    return found


# ----------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny test model, a few requests: a smoke run")
    parser.add_argument("--workdir", type=Path, default=None, help="adapters and server logs (default: a temp dir)")
    parser.add_argument("--output", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--adapter", action="append", default=[], help="a trained adapter dir (repeatable)")
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--memory-adapters", type=int, default=8)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=4, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=16)
    args = parser.parse_args()
    if args.tiny:
        args.clients, args.requests, args.max_tokens, args.adapters, args.memory_adapters = 2, 2, 8, 2, 3
    work = args.workdir or Path(tempfile.mkdtemp(prefix="lorafit-serving-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    base = base_dir(args.tiny)
    made = make_adapters(base, work / "adapters", max(args.adapters, args.memory_adapters))
    pool = [Path(a) for a in args.adapter] or made
    adapters = {f"a{i}": pool[i % len(pool)] for i in range(args.adapters)}
    served = [x for name, d in adapters.items() for x in ("--adapter", f"{name}={d}")]
    results: dict = {"base": str(base), "cpus": os.cpu_count(), "clients": args.clients,
                     "requests_per_client": args.requests, "max_tokens": args.max_tokens, "adapters": len(adapters)}

    runs = {}
    for mode, max_batch in (("batched", args.max_batch), ("one_at_a_time", 1)):
        server = Server(served + ["--max-batch", str(max_batch), "--max-loaded", str(len(adapters))],
                        work / f"serve-{mode}.log")
        try:
            for name in adapters:  # every adapter loaded and warm before the clock starts
                server.chat(name, PROMPTS[0], 4)
            runs[mode] = load(server, list(adapters), args.clients, args.requests, args.max_tokens)
        finally:
            server.stop()
        print(f"{mode}: {runs[mode]['requests_per_s']} requests/s, p50 {runs[mode]['p50_s']} s, "
              f"p95 {runs[mode]['p95_s']} s, largest batch {runs[mode]['largest_batch']}", flush=True)
    results["throughput"] = {m: {k: v for k, v in r.items() if k != "answers"} for m, r in runs.items()}
    results["speedup"] = round(runs["batched"]["requests_per_s"] / runs["one_at_a_time"]["requests_per_s"], 2)
    results["divergences"] = divergences(runs["batched"]["answers"], runs["one_at_a_time"]["answers"], adapters,
                                         args.max_tokens)
    results["identical_answers"] = f"{len(runs['batched']['answers']) - len(results['divergences'])}/" \
                                   f"{len(runs['batched']['answers'])}"

    memory = {}
    for label, names in (("base", []), ("one_adapter", ["m0"]),
                         (f"{args.memory_adapters}_adapters", [f"m{i}" for i in range(args.memory_adapters)])):
        dirs = {n: made[i] for i, n in enumerate(names)}
        server = Server([str(base)] if not names else
                        [x for n, d in dirs.items() for x in ("--adapter", f"{n}={d}")] +
                        ["--max-loaded", str(max(1, len(names)))], work / f"serve-memory-{label}.log")
        try:
            for n in names or ["base"]:
                server.chat(n, PROMPTS[0], 4)
            memory[label] = round(server.rss_mb(), 1)
        finally:
            server.stop()
    size = [(made[i] / "adapter_model.safetensors").stat().st_size / 2**20 for i in range(args.memory_adapters)]
    many = memory[f"{args.memory_adapters}_adapters"]
    # The base as an adapter server holds it: one adapter's process less that adapter (peft and its machinery
    # are paid once, whatever the number of adapters; the plain base's process never imports peft).
    served_base = memory["one_adapter"] - size[0]
    goal = (served_base + sum(size)) * 1.05
    results["memory_mb"] = {**memory, "base_as_served": round(served_base, 1), "adapters_own_size": round(sum(size), 1),
                            "goal": round(goal, 1), "goal_met": many <= goal,
                            "one_process_per_adapter": round(args.memory_adapters * memory["one_adapter"], 1)}

    print(json.dumps(results, indent=2))
    print(markdown(results))
    if args.output:
        args.output.write_text(json.dumps(results, indent=2) + "\n")


def markdown(r: dict) -> str:
    b, o, m = r["throughput"]["batched"], r["throughput"]["one_at_a_time"], r["memory_mb"]
    n = [k for k in m if k.endswith("_adapters")][0]
    return "\n".join([
        f"| {r['clients']} clients, {r['adapters']} adapters | requests/s | tokens/s | p50 latency | p95 latency | largest batch |",
        "|---|---|---|---|---|---|",
        f"| batched | {b['requests_per_s']} | {b['tokens_per_s']} | {b['p50_s']} s | {b['p95_s']} s | {b['largest_batch']} |",
        f"| one at a time | {o['requests_per_s']} | {o['tokens_per_s']} | {o['p50_s']} s | {o['p95_s']} s | 1 |",
        "",
        f"speed-up {r['speedup']}×; identical answers {r['identical_answers']}; divergences: {r['divergences'] or 'none'}",
        "",
        "| resident memory | MB |", "|---|---|",
        f"| base alone (a plain model server: no peft) | {m['base']} |",
        f"| base + 1 adapter | {m['one_adapter']} |",
        f"| base + {n.split('_')[0]} adapters | {m[n]} |",
        f"| goal: (base as served, {m['base_as_served']}, + the adapters' own {m['adapters_own_size']} MB) × 1.05 "
        f"| {m['goal']} ({'met' if m['goal_met'] else 'missed'}) |",
        f"| one process per adapter ({n.split('_')[0]} × base + 1 adapter) | {m['one_process_per_adapter']} |"])


if __name__ == "__main__":
    main()
