"""The one thread that runs the model. Everything that touches the weights (decoding, classifying, loading
and unloading adapters) is a job on its queue, so the HTTP side never waits on a lock and the model is never
used by two threads at once. Generation answers through a sink (text pieces, then the finished result),
called on this thread; handlers.py turns it into an async stream.

The loop: take what arrived (a request that finds the engine idle waits BATCH_WAIT for company), run
classify / load / unload jobs, let waiting requests join the batch (batcher.py), decode one step. So a new
request joins at the next step boundary; the jobs run between steps.

A failure no request owns (a bug) ends the requests waiting and running with a
500 and the loop goes on: the thread never dies while the server accepts requests. Should it die all the same,
submit() and call() answer 503 at once and /health says so, rather than requests waiting forever.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
import traceback
from typing import Callable

from lorafit.serving.batcher import Batcher, active
from lorafit.serving.decoding import Generation
from lorafit.serving.protocol import ServerError, Unavailable
from lorafit.serving.registry import Registry, Served

BATCH_WAIT = 0.005  # seconds an idle engine waits after a request, for others to start with it


class Engine:
    def __init__(self, registry: Registry, *, max_batch: int = 16):
        self.registry, self.max_batch = registry, max_batch
        self.jobs: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="lorafit-engine", daemon=True)
        self.stopping = False
        self.stats = {"requests": 0, "running": 0, "largest_batch": 0}

    # -- the HTTP side's calls ----------------------------------------------------------------------

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self.stopping = True
        self.jobs.put(None)
        self.thread.join(timeout)

    @property
    def alive(self) -> bool:
        """The engine's thread is running (or about to start)."""
        return self.thread.is_alive() or (self.thread.ident is None and not self.stopping)

    def _accepting(self) -> None:
        if self.stopping:
            raise Unavailable("the server is shutting down")
        if not self.alive:
            raise Unavailable("the model's engine has stopped after an internal error (see the server's log): "
                              "restart the server", code="engine_stopped")

    def submit(self, generation: Generation) -> None:
        self._accepting()
        self.jobs.put(generation)

    def call(self, fn: Callable[[], object]):
        """Run *fn* on the engine's thread, between generations; a concurrent.futures.Future of its result."""
        from concurrent.futures import Future

        self._accepting()
        future: Future = Future()
        self.jobs.put((fn, future))
        return future

    def call_with(self, served: Served, fn: Callable[[object], object]):
        """Run fn(model) on the engine's thread with *served* switched on (its weights loaded first)."""

        def job():
            self.registry.load(served)
            try:
                with active(self.registry.model, None if served.is_base else served.peft_name):
                    return fn(self.registry.model)
            finally:
                self.registry.release(served)

        return self.call(job)

    # -- the engine's thread -----------------------------------------------------------------------

    def _run(self) -> None:
        import torch

        torch.set_grad_enabled(False)
        batcher = Batcher(self.registry, self.max_batch, self.stats)
        while True:
            try:
                if not self._turn(batcher):
                    return
            except BaseException as e:  # nobody's request in particular: fail those in flight, keep serving
                traceback.print_exc(file=sys.stderr)
                error = ServerError(f"internal error while generating: {type(e).__name__}: {e}")
                try:
                    batcher.reset(error)
                except BaseException:
                    traceback.print_exc(file=sys.stderr)
                    batcher = Batcher(self.registry, self.max_batch, self.stats)
                self.stats["running"] = batcher.running

    def _turn(self, batcher: Batcher) -> bool:
        """Take what arrived, run the jobs, admit, decode one step; False once the server has stopped."""
        for job in self._take(block=not batcher.busy):
            if job is None:  # the HTTP side has stopped: nothing is in flight
                return False
            if isinstance(job, tuple):
                fn, future = job
                if not future.set_running_or_notify_cancel():  # its caller left (the client disconnected)
                    continue
                try:
                    future.set_result(fn())
                except BaseException as e:  # handed to the caller, who turns it into an error answer
                    future.set_exception(e)
            else:
                batcher.waiting.append(job)
        batcher.admit()
        batcher.step()
        self.stats["running"] = batcher.running
        return True

    def _take(self, block: bool) -> list:
        """Every job queued now; when *block*, the next one first, and whatever follows within BATCH_WAIT."""
        jobs = []
        if block:
            jobs.append(self.jobs.get())
            deadline = time.monotonic() + BATCH_WAIT
            while (left := deadline - time.monotonic()) > 0:
                try:
                    jobs.append(self.jobs.get(timeout=left))
                except queue.Empty:
                    break
        while True:
            try:
                jobs.append(self.jobs.get_nowait())
            except queue.Empty:
                return jobs
