"""Verifier calls guarded against untrusted reward code: a time limit per call, every failure
scored 0 and counted by kind, and optionally worker processes so that a crash cannot take the
trainer down.

A verifier (a JSONL task's `module:function`, reasoning-gym's `score_answer`, a Task subclass) is
user code: it may raise (`sys.exit` included), return a non-number or NaN (kind `error`,
`tasks.safe_score`), hang (kind `timeout`), or kill its process — a segfault in a C extension,
`os._exit` (kind `crash`). Each call gives (reward, kind or None); the trainer logs the failures per
step (`reward_errors`, of which `reward_timeouts` and `reward_crashes`) and goes on.

Two modes (config keys `reward_workers`, `reward_timeout`):
- in the trainer's process (`reward_workers: 0`, the default). The limit is a SIGALRM timer, which
  exists on POSIX only and in the main thread only, and which interrupts Python code only between
  bytecodes: a call stuck inside C code (a backtracking regex, a C extension's loop) is not cut
  short, and a verifier that sets its own SIGALRM timer replaces ours for that call. Where there is
  no timer (another thread, Windows) calls run without a limit and a warning says so. A crash
  kills the trainer: use workers for code that may crash.
- in worker processes (`reward_workers: N`, POSIX): N fresh interpreters — started with
  `sys.executable`, not forked, since a fork of the trainer would copy locks held by its torch and
  tokenizer threads — each load the task once (a pickled copy without its example lists, unpickled
  after taking the trainer's `sys.path`, so a `module:function` importable in the trainer is
  importable there) and score one call at a time. A call that outlives the limit has its worker
  killed, with the processes its verifier started (each worker leads its own process group; a
  process that leaves the group, e.g. by `setsid`, is not tracked); a worker that dies is
  replaced; either way the call scores 0. Workers import no torch.

Rewards do not depend on scheduling: each outcome is mapped back to its call's index. This is fault
isolation, not a security sandbox: workers run with the trainer's permissions.
"""

from __future__ import annotations

import copy
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
import traceback
import warnings
import weakref
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from multiprocessing import Pipe
from multiprocessing.connection import Connection, wait
from typing import cast

from divrl.tasks import Example, Task, TaskError, safe_score

ERROR, TIMEOUT, CRASH = "error", "timeout", "crash"
DEFAULT_TIMEOUT = 10.0  # seconds per call (config key reward_timeout)
STARTUP_SECONDS = 120.0  # a worker that has not loaded the task by then is refused

Outcome = tuple[float, str | None]  # (reward, failure kind or None)


class VerifierTimeout(BaseException):
    """Raised inside the verifier by the in-process timer; a BaseException, so a verifier's own
    `except Exception` cannot swallow it (one that does, with a bare `except:`, is still timed out
    once it returns, `time_limit`)."""


@contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """Raise VerifierTimeout in the body after `seconds` (None: no limit), and again on leaving it
    if the body swallowed it (a verifier's bare `except:`), so a late result never counts; a
    no-op, with a warning, where SIGALRM cannot be used (see the module docstring)."""
    if seconds is None:
        yield
        return
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        warnings.warn(
            "reward_timeout cannot interrupt a verifier here (SIGALRM needs POSIX and the main "
            "thread): calls run without a time limit; set reward_workers ≥ 1 to enforce it",
            RuntimeWarning,
            stacklevel=3,
        )
        yield
        return
    fired = False

    def expire(signum, frame):
        nonlocal fired
        fired = True
        raise VerifierTimeout

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    if fired:
        raise VerifierTimeout


class GuardedVerifier:
    """The task's verifier, called with a time limit per call (seconds; None: none), in the
    trainer's process (`workers` 0) or in `workers` worker processes."""

    def __init__(self, task: Task, timeout: float | None = DEFAULT_TIMEOUT, workers: int = 0):
        self.task, self.timeout = task, timeout
        self.pool = WorkerPool(task, workers, timeout) if workers else None

    @classmethod
    def from_config(cls, task: Task, cfg) -> GuardedVerifier:
        return cls(task, cfg.reward_timeout, cfg.reward_workers)

    def score(self, calls: Sequence[tuple[str, Example]]) -> list[Outcome]:
        """(reward, failure kind or None) of each (completion, example), in order."""
        if self.pool is not None:
            return self.pool.score(calls)
        return [self._score_here(completion, example) for completion, example in calls]

    def _score_here(self, completion: str, example: Example) -> Outcome:
        try:
            with time_limit(self.timeout):
                reward, ok = safe_score(self.task, completion, example)
        except VerifierTimeout:  # (also when the timer fires just after the call returned)
            return 0.0, TIMEOUT
        return reward, None if ok else ERROR

    def close(self) -> None:
        """Stop the worker processes, if any (also done when this object is collected)."""
        if self.pool is not None:
            self.pool.close()


# Run by each worker's fresh interpreter: take the trainer's sys.path first, so that `divrl` and the
# verifier's module import as they do in the trainer.
_BOOTSTRAP = (
    "import sys\nfrom multiprocessing.connection import Connection\n"
    "conn = Connection(int(sys.argv[1]))\nsys.path[:] = conn.recv()\n"
    "from divrl.guarded_verifier import serve\nserve(conn)\n"
)


def serve(conn: Connection) -> None:
    """A worker's loop: load the task (answer None, or the error's traceback), then answer each
    (completion, example) with (reward, ok) until the trainer closes the pipe."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's to handle
    try:
        task = pickle.loads(conn.recv_bytes())
    except Exception:
        conn.send(traceback.format_exc(limit=4))
        return
    conn.send(None)
    while True:
        try:
            completion, example = conn.recv()
        except EOFError:
            return
        conn.send(safe_score(task, completion, example))


class _Worker:
    """One worker process, its pipe, and the call it is scoring (index, deadline) if any."""

    def __init__(self, payload: bytes):
        self.conn, child = Pipe()
        self.process = subprocess.Popen(  # its own process group: `stop` kills what the verifier started
            [sys.executable, "-c", _BOOTSTRAP, str(child.fileno())],
            pass_fds=[child.fileno()],
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        child.close()
        self.conn.send(sys.path)
        self.conn.send_bytes(payload)
        self.ready = False
        self.deadline: float | None = time.monotonic() + STARTUP_SECONDS  # of loading, then of the call
        self.index: int | None = None

    def start_call(self, index: int, call: tuple[str, Example], timeout: float | None) -> bool:
        """Send the call; False if the worker is gone."""
        self.index, self.deadline = index, None if timeout is None else time.monotonic() + timeout
        try:
            self.conn.send(call)
        except OSError:
            return False
        return True

    def stop(self) -> None:
        """Kill the worker and the processes its verifier started (those still in its group)."""
        self.conn.close()
        try:  # the worker is not yet reaped, so its group id cannot have been reused
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()


def _stop_all(workers: list[_Worker]) -> None:
    for worker in workers:
        worker.stop()
    workers.clear()


class WorkerPool:
    """`size` worker processes scoring one task's calls, each with a time limit; a worker that
    dies or overruns is killed and replaced, its call scored 0 (`crash`, `timeout`)."""

    def __init__(self, task: Task, size: int, timeout: float | None):
        scorer = copy.copy(task)  # the examples stay here: a worker needs only the scoring state
        scorer.train, scorer.eval = [], []
        try:
            self.payload = pickle.dumps(scorer)
        except Exception as err:
            raise TaskError(
                f"config key 'reward_workers': task '{task.name}' cannot be sent to a worker "
                f"process ({err}); define its verifier as a module-level function of an "
                f"importable module, or set reward_workers=0"
            ) from None
        self.timeout = timeout
        self.workers = [_Worker(self.payload) for _ in range(size)]
        self._finalizer = weakref.finalize(self, _stop_all, self.workers)
        while not all(w.ready for w in self.workers):
            self._receive([])

    def score(self, calls: Sequence[tuple[str, Example]]) -> list[Outcome]:
        """(reward, failure kind or None) of each call, in order, whatever order they finish in."""
        if not self.workers:
            raise RuntimeError("the verifier's worker pool is closed")
        outcomes: list[Outcome | None] = [None] * len(calls)
        queue = deque(range(len(calls)))
        while queue or any(w.index is not None for w in self.workers):
            for worker in self.workers:
                if queue and worker.ready and worker.index is None:
                    index = queue.popleft()
                    if not worker.start_call(index, calls[index], self.timeout):
                        self._replace(worker, outcomes, CRASH)
            self._receive(outcomes)
        # the loop ends only once no call is queued or in flight: every call has its outcome
        assert None not in outcomes
        return cast("list[Outcome]", outcomes)

    def _receive(self, outcomes: list) -> None:
        """Wait for answers until the nearest deadline; take them, and replace the workers that
        died or overran."""
        deadlines = [w.deadline for w in self.workers if w.deadline is not None]
        conns = {w.conn: w for w in self.workers if not w.ready or w.index is not None}
        timeout = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
        # wait returns the objects it was given, here Connections
        for conn in cast("list[Connection]", wait(list(conns), timeout=timeout)):
            worker = conns[conn]
            try:
                message = conn.recv()
            except (EOFError, OSError):
                self._replace(worker, outcomes, CRASH)
                continue
            if not worker.ready:
                self._loaded(worker, message)
            else:
                reward, ok = message
                assert worker.index is not None  # a ready worker is waited on only mid-call
                outcomes[worker.index] = (reward, None if ok else ERROR)
                worker.index = worker.deadline = None
        now = time.monotonic()
        for worker in list(self.workers):
            if worker.deadline is not None and worker.deadline <= now:
                self._replace(worker, outcomes, TIMEOUT)

    def _loaded(self, worker: _Worker, error: str | None) -> None:
        if error is not None:
            raise TaskError(
                f"config key 'reward_workers': a worker process cannot load the task's "
                f"verifier; make its module importable from the trainer's sys.path, or set "
                f"reward_workers=0:\n{error}"
            )
        worker.ready, worker.deadline = True, None

    def _replace(self, worker: _Worker, outcomes: list, kind: str) -> None:
        """Kill `worker` (its call, if any, scores 0 as `kind`) and start another in its place."""
        if not worker.ready:
            worker.stop()
            why = (
                f"not done after {STARTUP_SECONDS:.0f} s"
                if kind == TIMEOUT
                else f"it exited with code {worker.process.returncode}"
            )
            self.workers.remove(worker)
            raise TaskError(
                f"config key 'reward_workers': a worker process could not load the task's "
                f"verifier ({why}); check that its module imports cleanly, or set "
                f"reward_workers=0"
            )
        if worker.index is not None:
            outcomes[worker.index] = (0.0, kind)
        worker.stop()
        self.workers[self.workers.index(worker)] = _Worker(self.payload)

    def close(self) -> None:
        self._finalizer()
