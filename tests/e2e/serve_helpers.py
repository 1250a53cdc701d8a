"""A real `lorafit serve` process for the serving tests: started on a free port (--port 0, the port read from
its banner), its stderr (one line per request) kept in a file, stopped at teardown. Every wait is bounded."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

START_TIMEOUT = 180  # seconds: the interpreter, torch, the base and the first adapter on a busy 2-core machine


class Server:
    def __init__(self, args, *, cwd: Path, env: dict | None = None):
        self.log = Path(cwd) / f"serve-{os.getpid()}-{time.monotonic_ns()}.log"
        self.stderr = self.log.open("w")
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        full_env.pop("LORAFIT_DEBUG", None)
        self.proc = subprocess.Popen([sys.executable, "-m", "lorafit", "serve", "--port", "0", *map(str, args)],
                                     cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=self.stderr, text=True)
        self.lines: queue.Queue = queue.Queue()
        self.stdout: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        self.url = self._wait_for_banner()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.stdout.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def _wait_for_banner(self) -> str:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                continue
            if line is None:
                break
            if line.startswith("serving on "):
                return line.split()[2].removesuffix("/v1")
        self.stop()
        raise RuntimeError(f"lorafit serve did not start:\n{''.join(self.stdout)}\n{self.log.read_text()}")

    def client(self, api_key: str = "none"):
        from openai import OpenAI

        return OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=120)

    def post(self, path: str, body, *, key: str | None = None, raw: bytes | None = None):
        """(status, JSON body) of a POST made without the openai client (malformed bodies, vLLM's endpoints)."""
        return self._send("POST", path, raw if raw is not None else json.dumps(body).encode(), key)

    def get(self, path: str, *, key: str | None = None):
        return self._send("GET", path, None, key)

    def _send(self, method: str, path: str, data: bytes | None, key: str | None):
        import urllib.error
        import urllib.request

        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
        request = urllib.request.Request(f"{self.url}{path}", data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=120) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def stderr_text(self) -> str:
        self.stderr.flush()
        return self.log.read_text()

    def wait_for_log(self, parse, count: int, timeout: float = 30) -> list:
        """parse(stderr lines) once it finds *count* items (bounded wait): the server logs a request just after
        its client has the answer."""
        deadline = time.monotonic() + timeout
        while True:
            found = parse(self.stderr_text().splitlines())
            if len(found) >= count or time.monotonic() > deadline:
                assert len(found) >= count, found
                return found
            time.sleep(0.05)

    def terminate(self, timeout: float = 120) -> int:
        """SIGTERM, then the exit code (bounded wait)."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        self.stderr.close()
