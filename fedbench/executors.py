"""Where a matrix's tasks run: the worker side (one task in, one plain-data outcome out) and the
three backends the driver (:func:`fedbench.matrix.run_matrix`) hands tasks to.

* :class:`Inline` -- ``jobs=1``: in the driver process itself.
* :class:`Processes` -- ``jobs=N``: N spawned worker processes, one torch thread each.
* :class:`RayTasks` -- ``--executor ray``: one Ray task per cell, on a local or an existing cluster.

A backend has ``slots`` (tasks it runs at once), ``where`` (for the progress line) and
``submit(task) -> handle``, ``wait(handles, timeout) -> done handles``, ``result(handle) -> outcome``
(:class:`WorkerDied` when the worker went away without one), ``progress() -> [(key, round)]``,
``restart()`` and ``close(abort)``. Every backend runs :func:`execute`, which never raises for a
problem of the cell, so where a cell runs never changes its outcome.
"""

from __future__ import annotations

import os
import platform
import socket
import traceback
from typing import Any, Callable, Sequence

from fedbench.errors import DataError, FedbenchError, one_line
from fedbench.spec import CellSpec

# --------------------------------------------------------------------------------------------------
# The worker side: one task in, one plain-data outcome out
# --------------------------------------------------------------------------------------------------
_progress_queue = None  # set in worker processes by _init_worker


def versions() -> dict[str, Any]:
    """What produced a result: fedbench, torch, Python and every loaded plugin."""
    import torch

    from fedbench import __version__
    from fedbench.plugins import plugin_versions

    return {"fedbench": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "plugins": plugin_versions()}


def execute(task: dict[str, Any], on_round: Callable[[str, int], None] | None = None) -> dict[str, Any]:
    """Run one task (a cell, or the clean warm-up a group of cells shares) and return its outcome.

    Never raises for a problem of the cell: the exception becomes a ``failed`` outcome with its
    message and traceback. A :class:`DataError` while loading the dataset is a problem of where the
    task ran (files missing on this worker), not of the cell: it becomes an ``interrupted`` outcome,
    which the next run re-runs without ``--retry-failed``. ``on_round(key, round)`` reports progress;
    in a worker process the rounds go to the driver through the progress queue."""
    import io

    import torch

    from fedbench import engine
    from fedbench.data import load_dataset

    key = task["key"]
    if _worker_error is not None:
        return {"key": key, "status": "failed", "message": _worker_error, "error": "", "result": None,
                "worker": worker_id()}
    report = on_round
    if report is None and _progress_queue is not None:
        queue = _progress_queue
        report = lambda k, r: queue.put((k, r))  # noqa: E731
    outcome: dict[str, Any] = {"key": key, "worker": worker_id()}
    loaded = False
    try:
        cell = CellSpec.from_dict(task["cell"])
        load_dataset(cell.dataset, task.get("data_dir"))  # what run_cell loads next, from the same cache
        loaded = True
        kwargs: dict[str, Any] = {"data_dir": task.get("data_dir"), "device": task.get("device", "cpu"),
                                  "trainer": task.get("trainer", "stacked")}
        if report is not None:
            kwargs["on_round"] = lambda rnd, row: report(key, rnd)
        if task.get("checkpoint") is not None:
            state = torch.load(io.BytesIO(task["checkpoint"]), weights_only=True)
            kwargs.update(initial_params=state["params"], start_round=task["warmup_rounds"] + 1)
        result = engine.run_cell(cell, **kwargs)
        outcome.update(outcome_of(result))
        if task["kind"] == "warmup":
            if result.status != "ok":
                raise FedbenchError(f"the clean warm-up diverged: {result.message}")
            buffer = io.BytesIO()
            torch.save({"params": result.final_params.detach().cpu().clone()}, buffer)
            outcome["checkpoint"] = buffer.getvalue()
    except Exception as error:  # noqa: BLE001 - a failing cell must not stop the matrix
        outcome.update(failure_of(error, environment=isinstance(error, DataError) and not loaded))
    outcome["versions"] = versions()
    return outcome


def worker_id() -> str:
    """``host:pid`` of this process, as the store records who ran a cell."""
    return f"{socket.gethostname()}:{os.getpid()}"


def outcome_of(result) -> dict[str, Any]:
    """The outcome of a finished run (a :class:`fedbench.engine.RunResult`), as the store records it."""
    return {"status": result.status, "message": result.message, "error": "", "result": result.to_dict()}


def failure_of(error: BaseException, *, environment: bool = False) -> dict[str, Any]:
    """The outcome of a run that raised ``error``: ``failed`` with its first line and traceback, or
    ``interrupted`` when the ``environment`` (not the cell) is to blame, so that a re-run retries it."""
    message = one_line(error)
    if environment:
        message += " (not the cell's fault: the next run retries it)"
    return {"status": "interrupted" if environment else "failed", "message": message,
            "error": "".join(traceback.format_exception(error)), "result": None}


def _init_worker(queue, threads: int | None, plugins: Sequence[tuple[str, str, Any]]) -> None:
    """Set up a worker process: progress queue, thread count, the driver's directly registered
    plugins, and Ctrl-C handling (the driver decides what an interrupt means, so workers ignore
    SIGINT; they exit when the driver goes away)."""
    import signal
    import threading
    from multiprocessing import parent_process
    from multiprocessing.connection import wait

    global _progress_queue, _worker_error
    _progress_queue = queue
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = parent_process()
    if parent is not None:
        def exit_with_parent() -> None:
            wait([parent.sentinel])
            os._exit(1)

        threading.Thread(target=exit_with_parent, daemon=True).start()
    if threads:
        import torch

        torch.set_num_threads(threads)
    _worker_error = load_plugins(plugins)


_worker_error: str | None = None  # why this worker cannot run cells (a plugin it could not load)


def load_plugins(plugins: Sequence[tuple[str, str, Any]]) -> str | None:
    """Register the driver's direct plugins (see :func:`direct_plugins`) in a worker; returns what
    went wrong, if anything, so every cell of this worker can fail with that message."""
    import importlib
    import pickle

    from fedbench import plugins as manager

    known = {name for _, name in manager.registered_plugins()}
    for how, name, what in plugins:
        if name in known:
            continue
        try:
            plugin = importlib.import_module(what) if how == "module" else pickle.loads(what)
            manager.register_plugin(plugin, name=name)
        except Exception as error:  # noqa: BLE001
            return f"the worker cannot load plugin '{name}' registered in the driver: {type(error).__name__}: {error}"
    return None


def direct_plugins() -> list[tuple[str, str, Any]]:
    """Plugins registered with :func:`fedbench.register_plugin` in this process, in a form worker
    processes can load: ``("module", name, module name)`` or ``("pickle", name, bytes)``. One that
    can be neither (defined in ``__main__``, say) is refused before any work starts."""
    import importlib.util
    import pickle
    import types

    from fedbench import plugins

    out = []
    for plugin, name in plugins.registered_plugins():
        if isinstance(plugin, types.ModuleType):
            if plugin.__name__ != "__main__" and importlib.util.find_spec(plugin.__name__) is not None:
                out.append(("module", name, plugin.__name__))
                continue
        else:
            try:
                blob = pickle.dumps(plugin)
                if type(plugin).__module__ != "__main__":
                    out.append(("pickle", name, blob))
                    continue
            except Exception:  # noqa: BLE001 - not picklable: refused below
                pass
        raise FedbenchError(
            f"plugin '{name}' was registered in this process only and worker processes cannot load it; "
            "use --jobs 1 (jobs=1), or put it in an importable module or an installed entry point"
        )
    return out


# --------------------------------------------------------------------------------------------------
# Backends: where tasks run
# --------------------------------------------------------------------------------------------------
class WorkerDied(Exception):
    """The process running a task went away without an outcome (killed, out of memory, segfault)."""


class _Done:
    """A finished task's handle (hashable, unlike its outcome)."""

    def __init__(self, outcome: dict[str, Any]) -> None:
        self.outcome = outcome


class Inline:
    """``jobs=1``: run each task in the driver itself (no start-up cost; tests can monkeypatch)."""

    slots = 1
    where = "in this process"

    def __init__(self, on_round: Callable[[str, int], None]) -> None:
        self._on_round = on_round

    def submit(self, task):
        return _Done(execute(task, self._on_round))

    def wait(self, handles, timeout):
        return list(handles)

    def result(self, handle):
        return handle.outcome

    def progress(self):
        return []

    def restart(self):
        pass

    def close(self, abort: bool = False):
        pass


class Processes:
    """``jobs=N``: N spawned worker processes, one torch thread each, reporting rounds on a queue."""

    def __init__(self, jobs: int) -> None:
        import multiprocessing

        self.slots = jobs
        self.where = f"on {jobs} worker processes"
        self._ctx = multiprocessing.get_context("spawn")
        self._plugins = direct_plugins()
        self._start()

    def _start(self) -> None:
        from concurrent.futures import ProcessPoolExecutor

        # A fresh queue per pool: a worker killed mid-write could leave the old one's lock held.
        self._queue = self._ctx.Queue()
        self._pool = ProcessPoolExecutor(self.slots, mp_context=self._ctx, initializer=_init_worker,
                                         initargs=(self._queue, 1 if self.slots > 1 else None, self._plugins))

    def submit(self, task):
        return self._pool.submit(execute, task)

    def wait(self, handles, timeout):
        from concurrent.futures import FIRST_COMPLETED, wait

        return list(wait(handles, timeout=timeout, return_when=FIRST_COMPLETED).done)

    def result(self, handle):
        from concurrent.futures.process import BrokenProcessPool

        try:
            return handle.result()
        except BrokenProcessPool as error:
            raise WorkerDied(str(error)) from None

    def progress(self):
        import queue

        out = []
        while True:
            try:
                out.append(self._queue.get_nowait())
            except (queue.Empty, OSError, ValueError, EOFError):
                return out

    def restart(self):
        self.close(abort=True)
        self._start()

    def close(self, abort: bool = False):
        if abort:  # workers ignore SIGINT and would finish their cells first
            for proc in list((getattr(self._pool, "_processes", None) or {}).values()):
                proc.terminate()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._queue.close()


class RayTasks:
    """``--executor ray``: one Ray task per cell on a local or existing cluster (``address``)."""

    def __init__(self, jobs: int | None, address: str | None) -> None:
        try:
            import ray
        except ImportError:
            raise FedbenchError(
                "--executor ray needs Ray, which is not installed; install it with "
                "pip install 'fedbench-suite[ray]', or use --executor process"
            ) from None
        self._ray = ray
        self._owned = not ray.is_initialized()
        if self._owned:
            env = {k: v for k, v in os.environ.items() if k in ("FEDBENCH_PLUGINS", "FEDBENCH_DATA_DIR")}
            ray.init(address=address, include_dashboard=False, log_to_driver=False,
                     runtime_env={"env_vars": env} if env else None)
        self._plugins = direct_plugins()
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self.slots = max(1, min(jobs or cpus, cpus))
        self.where = f"as Ray tasks, {self.slots} at a time"
        self._remote = ray.remote(num_cpus=1, max_retries=1)(_ray_execute)
        self._inflight: set = set()

    def submit(self, task):
        ref = self._remote.remote(task, self._plugins)
        self._inflight.add(ref)
        return ref

    def wait(self, handles, timeout):
        done, _ = self._ray.wait(list(handles), num_returns=1, timeout=timeout)
        return done

    def result(self, handle):
        self._inflight.discard(handle)
        try:
            return self._ray.get(handle)
        except Exception as error:  # noqa: BLE001 - execute() never raises, so the worker itself died
            raise WorkerDied(f"{type(error).__name__}: {error}") from None

    def progress(self):
        return []

    def restart(self):
        pass

    def close(self, abort: bool = False):
        if abort:
            for ref in self._inflight:
                self._ray.cancel(ref, force=True)
        self._inflight.clear()
        if self._owned:
            self._ray.shutdown()


def _ray_execute(task, plugins):
    import torch

    torch.set_num_threads(1)
    problem = load_plugins(plugins)
    if problem is not None:
        return {"key": task["key"], "status": "failed", "message": problem, "error": "", "result": None}
    return execute(task)
