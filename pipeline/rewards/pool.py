"""A small process pool whose tasks each have a deadline; a worker past it is killed and replaced.

Reward checks run untrusted model output through sympy (and user code through custom reward
functions); either can hang inside C code or allocate without bound. `concurrent.futures` cannot
cancel a running task, so this pool owns its processes: one pipe per worker, a deadline per
dispatched task, SIGKILL and a fresh worker when the deadline passes. Each worker also caps its
own address space (RLIMIT_AS) so a runaway allocation becomes a MemoryError in that worker
instead of the machine's OOM killer taking the trainer.

Tasks name their function as `"module:function"` so nothing but plain data crosses the pipe,
and a worker imports each function once.

The pool's processes (the fork server and the workers) block SIGTERM. Slurm's
`scancel --signal=TERM` and preemption signal every process of the job step; the trainer
answers by finishing its step and checkpointing, which needs the reward workers alive to
score that step. Blocked, the signal stays pending in them; they still end when the pool
closes (a stop message, then SIGKILL) or when the trainer dies (their pipe reaches EOF).
"""

from __future__ import annotations

import importlib
import multiprocessing
import multiprocessing.connection
import signal
import threading
import time
import traceback
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Sequence

OK, ERROR, TIMEOUT, CRASHED = "ok", "error", "timeout", "crashed"

Call = tuple[tuple, dict]


@dataclass(frozen=True)
class TaskOutcome:
    """The result of one task: status is ok | error | timeout | crashed.

    `value` is the function's return value when ok; `error` is the worker's traceback text
    (error) or a description of the death (crashed).
    """

    status: str
    value: Any = None
    error: str | None = None


def resolve_function(path: str) -> Callable:
    """`"package.module:function"` -> the function object; ValueError naming what is missing."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{path!r} is not an import path of the form 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"{path!r}: cannot import module {module_name!r} ({exc})") from exc
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{path!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{path!r}: {attr!r} is not callable")
    return obj


_READY = -1  # task id of the message a worker sends once its imports are done


def _worker_main(conn, memory_limit_mb: int, imports: Sequence[str]) -> None:
    """Worker loop: import `imports`, send READY, then answer (task_id, fn_path, args, kwargs)
    messages with (task_id, ok, value or traceback text)."""
    # Also blocked by the mask the worker inherits, unless a fork server started by someone
    # else forked it; see the module docstring.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    if memory_limit_mb > 0:
        import resource

        limit = memory_limit_mb << 20
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    for name in imports:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - the first call reports it, with its traceback
            pass
    conn.send((_READY, True, None))
    functions: dict[str, Callable] = {}
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        task_id, fn_path, args, kwargs = message
        try:
            fn = functions.get(fn_path)
            if fn is None:
                fn = functions[fn_path] = resolve_function(fn_path)
            reply = (task_id, True, fn(*args, **kwargs))
        except BaseException:  # noqa: BLE001 - a task's failure must never take the worker down
            reply = (task_id, False, traceback.format_exc())
        try:
            conn.send(reply)
        except Exception:  # noqa: BLE001 - e.g. an unpicklable return value
            conn.send((task_id, False, traceback.format_exc()))


def _start_without_sigterm(process, attempts: int = 4) -> None:
    """Start `process` with SIGTERM blocked in this thread, so the child (and a fork server
    that this start launches) inherits the block. A signal arriving meanwhile stays pending
    here and is delivered when the mask is restored: the trainer never misses its TERM.

    A fork server that died (killed by someone) is relaunched by multiprocessing once it has
    been reaped; until then connecting to it fails, so the start is retried briefly.
    """
    # multiprocessing's resource tracker, when this start launches it, unblocks SIGTERM in the
    # calling thread after spawning itself; launched first, it leaves the mask alone.
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        for attempt in range(attempts):
            try:
                process.start()
                return
            except (ConnectionError, EOFError, FileNotFoundError):
                if attempt == attempts - 1:
                    raise
                time.sleep(0.1 * 4 ** attempt)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class _Worker:
    def __init__(self, ctx, memory_limit_mb: int, imports: Sequence[str]):
        self.conn, child = ctx.Pipe(duplex=True)
        self.process = ctx.Process(target=_worker_main, args=(child, memory_limit_mb, list(imports)), daemon=True)
        _start_without_sigterm(self.process)
        child.close()
        self.ready = False
        self.task: int | None = None
        self.deadline = 0.0

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(timeout=10)
        self.conn.close()

    def stop(self) -> None:
        try:
            self.conn.send(None)
        except OSError:
            pass
        self.process.join(timeout=2)
        self.kill()


def _shutdown(workers: list[_Worker]) -> None:
    for worker in workers:
        worker.kill()


class WorkerPool:
    """N worker processes running `"module:function"` tasks, each under a wall-clock deadline.

    `run(fn_path, calls, timeout_s)` -> one `TaskOutcome` per call, in order. Calls from several
    threads are served one `run` at a time (no signals are used, so any thread may call).
    `restarts` counts workers replaced after a timeout or a crash. `imports` are imported by each
    worker before it reports ready (and preloaded into the fork server); a worker's start-up
    counts against `startup_timeout_s`, never against a call's deadline, so a slow start on a
    busy machine is not mistaken for a hanging call.

    As with any spawn/forkserver pool, a script that creates one needs the
    `if __name__ == "__main__":` guard.
    """

    def __init__(
        self,
        num_workers: int,
        *,
        memory_limit_mb: int = 4096,
        start_method: str = "forkserver",
        imports: Sequence[str] = (),
        startup_timeout_s: float = 120.0,
    ):
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        self._ctx = multiprocessing.get_context(start_method)
        if start_method == "forkserver" and imports:
            # Heavy imports (sympy) happen once in the fork server, so a worker that replaces a
            # killed one is ready in milliseconds. Has no effect if the server already runs.
            self._ctx.set_forkserver_preload(list(imports))
        self._memory_limit_mb = memory_limit_mb
        self._imports = list(imports)
        self._startup_timeout_s = startup_timeout_s
        self._workers = [self._new_worker() for _ in range(num_workers)]
        self.restarts = 0
        self._lock = threading.Lock()
        self._finalizer = weakref.finalize(self, _shutdown, self._workers)

    @property
    def num_workers(self) -> int:
        return len(self._workers)

    def _new_worker(self) -> _Worker:
        return _Worker(self._ctx, self._memory_limit_mb, self._imports)

    def _replace(self, index: int) -> None:
        self._workers[index].kill()
        self._workers[index] = self._new_worker()
        self.restarts += 1

    def run(self, fn_path: str, calls: Sequence[Call], timeout_s: float) -> list[TaskOutcome]:
        """(function path, [(args, kwargs)], seconds per call) -> [TaskOutcome] in call order.

        A call's clock starts when a ready worker receives it, so neither a long queue nor a
        worker's start-up eats into it.
        """
        with self._lock:
            return self._run(fn_path, calls, timeout_s)

    def _dispatch(self, i: int, task: int, fn_path: str, call: Call, timeout_s: float) -> bool:
        """Send one call to idle worker i; False if the worker turned out to be dead."""
        worker = self._workers[i]
        args, kwargs = call
        try:
            worker.conn.send((task, fn_path, tuple(args), dict(kwargs)))
        except (OSError, EOFError):
            return False
        worker.task = task
        budget = timeout_s if worker.ready else self._startup_timeout_s + timeout_s
        worker.deadline = time.monotonic() + budget
        return True

    def _receive(self, i: int, timeout_s: float, outcomes: list) -> bool:
        """Read worker i's messages (READY and/or its result); False if it died."""
        worker = self._workers[i]
        try:
            while worker.task is not None and worker.conn.poll():
                task_id, ok, payload = worker.conn.recv()
                if task_id == _READY:
                    worker.ready = True
                    worker.deadline = time.monotonic() + timeout_s
                    continue
                assert task_id == worker.task, (task_id, worker.task)
                outcomes[task_id] = TaskOutcome(OK, payload) if ok else TaskOutcome(ERROR, error=payload)
                worker.task = None
        except (EOFError, OSError):
            return False
        return worker.task is None or worker.process.is_alive()

    def _run(self, fn_path: str, calls: Sequence[Call], timeout_s: float) -> list[TaskOutcome]:
        if not self._workers:
            raise RuntimeError("WorkerPool.run called after close()")
        outcomes: list[TaskOutcome | None] = [None] * len(calls)
        pending = deque(range(len(calls)))
        while pending or any(w.task is not None for w in self._workers):
            for i in range(len(self._workers)):
                idle = self._workers[i]
                if idle.task is None and idle.ready and not idle.process.is_alive():
                    # It started once, so replacing it cannot loop; its death was not a call's.
                    self._replace(i)
                if self._workers[i].task is None and pending:
                    task = pending.popleft()
                    if not self._dispatch(i, task, fn_path, calls[task], timeout_s):
                        # Died while idle. Not retried: a worker that cannot even start would
                        # otherwise be replaced forever.
                        outcomes[task] = TaskOutcome(CRASHED, error=f"reward worker died before running {fn_path}")
                        self._replace(i)
            busy = [w for w in self._workers if w.task is not None]
            if not busy:
                continue
            wait_s = max(0.0, min(w.deadline for w in busy) - time.monotonic())
            ready = set(
                multiprocessing.connection.wait(
                    [w.conn for w in busy] + [w.process.sentinel for w in busy], timeout=wait_s
                )
            )
            for i, worker in enumerate(self._workers):
                if worker.task is None:
                    continue
                task = worker.task
                if worker.conn in ready or worker.process.sentinel in ready:
                    if not self._receive(i, timeout_s, outcomes):
                        worker.process.join(timeout=1)
                        outcomes[task] = TaskOutcome(
                            CRASHED, error=f"reward worker died (exit code {worker.process.exitcode}) running {fn_path}"
                        )
                        worker.task = None
                        self._replace(i)
                elif time.monotonic() >= worker.deadline:
                    what = "ran past its" if worker.ready else "did not start within the start-up budget plus its"
                    outcomes[task] = TaskOutcome(TIMEOUT, error=f"{fn_path} {what} {timeout_s:g} s deadline")
                    worker.task = None
                    self._replace(i)
        assert all(o is not None for o in outcomes)
        return outcomes  # type: ignore[return-value]

    def close(self) -> None:
        """Stop every worker (a graceful stop, then SIGKILL for any that do not exit)."""
        with self._lock:
            for worker in self._workers:
                worker.stop()
            self._workers = []
            self._finalizer.detach()

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
