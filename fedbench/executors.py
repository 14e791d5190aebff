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

A cell timeout (the task's ``timeout``, ``--cell-timeout``) is kept in two places: :func:`execute`
arms an alarm in the worker (:class:`CellTimeout`), and the driver kills the workers of a task that
does not stop anyway (:func:`fedbench.matrix._drive`, process pool only: ``stops_stuck``).
"""

from __future__ import annotations

import contextlib
import os
import platform
import socket
import time
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
    in a worker process the rounds go to the driver through the progress queue, after a ``(key, 0)``
    that says the run itself starts (its data loaded): the driver times a stuck task from there.

    With ``task["timeout"]`` (seconds) the run is stopped by :class:`CellTimeout` once it has run that
    long and recorded ``failed``, naming the last round it finished and the plugin it was in. The
    timer starts after the data is loaded (loading is the worker's cost, not the cell's) and works
    in a process's main thread on a platform with ``SIGALRM`` (every backend runs tasks there); code
    that never returns to Python (stuck in C) is not reached by it, which is what the driver's
    backstop is for."""
    import io

    import torch

    from fedbench import engine
    from fedbench.data import load_dataset

    key = task["key"]
    if _worker_error is not None:
        return refused(task, _worker_error)
    report = on_round
    if report is None and _progress_queue is not None:
        queue = _progress_queue
        report = lambda k, r: queue.put((k, r))  # noqa: E731
    if task["kind"] == "group":
        return execute_group(task, report)
    outcome: dict[str, Any] = {"key": key, "worker": worker_id()}
    loaded = False
    timeout = task.get("timeout")
    finished: list[int] = []  # the rounds the run finished, for a timeout's message

    def round_done(rnd: int, row: dict[str, Any]) -> None:
        finished.append(rnd)
        if report is not None:
            report(key, rnd)

    try:
        cell = CellSpec.from_dict(task["cell"])
        load_dataset(cell.dataset, task.get("data_dir"))  # what run_cell loads next, from the same cache
        loaded = True
        kwargs: dict[str, Any] = {"data_dir": task.get("data_dir"), "device": task.get("device", "cpu"),
                                  "trainer": task.get("trainer", "stacked"), "on_round": round_done}
        if task.get("checkpoint") is not None:
            state = torch.load(io.BytesIO(task["checkpoint"]), weights_only=True)
            kwargs.update(initial_params=state["params"], start_round=task["warmup_rounds"] + 1)
        if _progress_queue is not None:
            _progress_queue.put((key, 0))
        with Alarm(timeout):
            result = engine.run_cell(cell, **kwargs)
        outcome.update(outcome_of(result))
        if task["kind"] == "warmup":
            if result.status != "ok":
                raise FedbenchError(f"the clean warm-up diverged: {result.message}")
            buffer = io.BytesIO()
            torch.save({"params": result.final_params.detach().cpu().clone()}, buffer)
            outcome["checkpoint"] = buffer.getvalue()
    except CellTimeout as stop:
        where = culprit(stop)
        message = timeout_message(timeout, timeout, finished[-1] if finished else None)
        outcome.update({"status": "failed", "message": message + (f"; it was stopped in {where}" if where else ""),
                        "error": "".join(traceback.format_exception(stop)), "result": None})
    except Exception as error:  # noqa: BLE001 - a failing cell must not stop the matrix
        outcome.update(failure_of(error, environment=isinstance(error, DataError) and not loaded))
    outcome["versions"] = versions()
    return outcome


def refused(task: dict[str, Any], problem: str) -> dict[str, Any]:
    """The outcome of a task this worker cannot run at all (a plugin it could not load): ``failed``
    with ``problem``, for the task and, in a lockstep group, for every cell of it."""
    failed = {"status": "failed", "message": problem, "error": "", "result": None, "worker": worker_id()}
    outcome = {**failed, "key": task["key"]}
    if task["kind"] == "group":
        outcome["outcomes"] = [{**failed, "key": t["key"]} for t in task["tasks"]]
    return outcome


def execute_group(task: dict[str, Any], report: Callable[[str, int], None] | None = None) -> dict[str, Any]:
    """Run a lockstep group (``task["tasks"]``: cell tasks of one :func:`fedbench.lockstep.group_key`)
    and return ``{"key", "status", "outcomes": [one outcome per cell, in order]}``.

    Each cell's outcome is what :func:`execute` would record for it alone -- its result, or its own
    failure (a cell that raises leaves the group, the others go on) -- with ``worker`` saying it ran
    in lockstep and with how many cells. ``task["timeout"]`` bounds the whole group: cells not
    finished when it fires are recorded ``failed`` with the timeout's message."""
    from fedbench.data import load_dataset
    from fedbench.lockstep import run_lockstep

    key, children = task["key"], task["tasks"]
    who = f"{worker_id()} lockstep x{len(children)}"
    outcomes: list[dict[str, Any] | None] = [None] * len(children)
    finished: dict[int, int] = {}
    try:
        cells = [CellSpec.from_dict(t["cell"]) for t in children]
        load_dataset(cells[0].dataset, task.get("data_dir"))
    except Exception as error:  # noqa: BLE001 - the whole group: data missing here, or a bad spec
        bad = failure_of(error, environment=isinstance(error, DataError))
        return {"key": key, "status": bad["status"], "outcomes": [{**bad, "key": t["key"], "worker": who} for t in children]}

    def round_done(i: int, rnd: int, row: dict[str, Any]) -> None:
        finished[i] = rnd
        if report is not None:
            report(children[i]["key"], rnd)

    def cell_done(out) -> None:
        i = out.index
        if out.error is not None:
            outcomes[i] = {"key": children[i]["key"], "worker": who, **failure_of(out.error)}
        else:
            outcomes[i] = {"key": children[i]["key"], "worker": who, **outcome_of(out.result)}

    if _progress_queue is not None:
        _progress_queue.put((key, 0))
    timeout = task.get("timeout")
    try:
        with Alarm(timeout):
            run_lockstep(cells, data_dir=task.get("data_dir"), device=task.get("device", "cpu"),
                         trainer=task.get("trainer", "stacked"), on_round=round_done, on_finished=cell_done)
    except CellTimeout as stop:
        trace = "".join(traceback.format_exception(stop))
        for i, child in enumerate(children):
            if outcomes[i] is None:
                outcomes[i] = {"key": child["key"], "worker": who, "status": "failed", "error": trace, "result": None,
                               "message": timeout_message(timeout, timeout, finished.get(i)) + " (in a lockstep group)"}
    stamp = versions()
    for out in outcomes:
        out["versions"] = stamp
    return {"key": key, "status": "ok", "outcomes": outcomes}


class CellTimeout(BaseException):
    """A cell ran past its timeout (raised by :class:`Alarm`). A ``BaseException``, as
    ``KeyboardInterrupt`` is, so that a plugin's ``except Exception`` does not swallow it."""


class Alarm:
    """``with Alarm(seconds):`` raises :class:`CellTimeout` in the block once it has run ``seconds``
    (``None``: never), through ``SIGALRM``: a busy loop or a ``time.sleep`` is interrupted at once.

    Only in the main thread of a platform with ``SIGALRM``; elsewhere the block runs untimed. On
    exit the alarm is disarmed and the previous handler restored; a timer that was already armed
    (pytest-timeout's, say) is re-armed with the time it had left, and an earlier deadline of its
    own waits until the block ends."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self._armed = False

    def __enter__(self) -> "Alarm":
        import signal
        import threading

        if (self.seconds is None or not hasattr(signal, "setitimer")
                or threading.current_thread() is not threading.main_thread()):
            return self
        self._previous = signal.signal(signal.SIGALRM, self._fire)
        self._started = time.monotonic()
        self._armed = True
        self._outer = signal.setitimer(signal.ITIMER_REAL, self.seconds)
        return self

    def _fire(self, signum, frame) -> None:
        if self._armed:  # a signal that arrives while the block ends is dropped
            self._armed = False
            raise CellTimeout(f"ran past its timeout of {self.seconds:g} s")

    def __exit__(self, *exc) -> None:
        import signal

        if not hasattr(self, "_previous"):
            return
        self._armed = False
        try:
            signal.setitimer(signal.ITIMER_REAL, 0)
        finally:
            signal.signal(signal.SIGALRM, self._previous if self._previous is not None else signal.SIG_DFL)
            delay, interval = self._outer
            if delay > 0:
                signal.setitimer(signal.ITIMER_REAL, max(delay - (time.monotonic() - self._started), 0.001), interval)


def timeout_message(timeout: float, seconds: float, last_round: int | None, *, killed: bool = False) -> str:
    """What a cell stopped by its timeout is recorded with: ``stopped after 30 s (--cell-timeout 30):
    the cell did not finish; the last round it finished was 3``. ``killed``: its worker process had
    to be killed (see :func:`fedbench.matrix._drive`)."""
    text = f"stopped after {round(seconds, 1):g} s (--cell-timeout {timeout:g}): the cell did not finish"
    if killed:
        text += (" and did not stop at its timeout (stuck where the alarm cannot reach it, in C code say), "
                 "so its worker process was killed")
    return text + (f"; the last round it finished was {last_round}" if last_round is not None else "; no round had finished")


def worker_id() -> str:
    """``host:pid`` of this process, as the store records who ran a cell."""
    return f"{socket.gethostname()}:{os.getpid()}"


def outcome_of(result) -> dict[str, Any]:
    """The outcome of a finished run (a :class:`fedbench.engine.RunResult`), as the store records it."""
    return {"status": result.status, "message": result.message, "error": "", "result": result.to_dict()}


def failure_of(error: BaseException, *, environment: bool = False) -> dict[str, Any]:
    """The outcome of a run that raised ``error``: ``failed`` with its first line and traceback, or
    ``interrupted`` when the ``environment`` (not the cell) is to blame, so that a re-run retries it.

    When a plugin's code raised, the message names it first (:func:`culprit`): ``attack 'boom' of
    plugin 'x' (entry point fedbench.x = x, x-pkg 1.0) raised RuntimeError: ...``; a plugin author
    then knows whose bug it is without reading the traceback."""
    message = one_line(error)
    if environment:
        message += " (not the cell's fault: the next run retries it)"
    else:
        who = culprit(error)
        if who is not None:
            message = f"{who} raised {message}"
    return {"status": "interrupted" if environment else "failed", "message": message,
            "error": "".join(traceback.format_exception(error)), "result": None}


_KIND_WORDS = {"defense": "client defense", "preaggregator": "pre-aggregator"}


def culprit(error: BaseException) -> str | None:
    """The plugin whose code ``error`` came out of -- the innermost frame of its traceback whose
    module belongs to a loaded plugin (:func:`fedbench.plugins.plugin_of_module`) -- with the
    component that was running, e.g. ``aggregator 'krum' of plugin 'krum' (entry point ...)``.
    ``None`` when no plugin's code is on the traceback: the core raised, and says so itself. A
    plugin that calls torch wrongly is to blame too (its frame is the innermost plugin frame)."""
    from fedbench.components import Component
    from fedbench.plugins import plugin_of_module

    frames = [frame for frame, _ in traceback.walk_tb(error.__traceback__)]
    for depth in range(len(frames) - 1, -1, -1):
        owner = plugin_of_module(frames[depth].f_globals.get("__name__"))
        if owner is not None:
            break
    else:
        return None
    name, source = owner
    for frame in reversed(frames[: depth + 1]):
        component = frame.f_locals.get("self")
        if isinstance(component, Component) and plugin_of_module(type(component).__module__) == owner:
            kind = _KIND_WORDS.get(component.kind, component.kind)
            return f"{kind} '{component.name}' of plugin '{name}' ({source})"
    return f"plugin '{name}' ({source})"


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
    """``jobs=N``: N spawned worker processes, one torch thread each, reporting rounds on a queue.

    ``stops_stuck``: the driver may kill the workers (``restart(kill=True)``) to stop a task that
    ran past its timeout without stopping itself."""

    stops_stuck = True

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

    def restart(self, kill: bool = False):
        """A fresh pool; the tasks in flight are lost. ``kill``: SIGKILL the workers, which nothing
        in them (a stuck plugin's own signal handling, say) can catch or delay, instead of SIGTERM."""
        self.close(abort=True, kill=kill)
        self._start()

    def close(self, abort: bool = False, kill: bool = False):
        if abort:  # workers ignore SIGINT and would finish their cells first
            for proc in list((getattr(self._pool, "_processes", None) or {}).values()):
                if kill:
                    proc.kill()
                else:
                    proc.terminate()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._queue.close()


class RayTasks:
    """``--executor ray``: one Ray task per cell on a local or existing cluster (``address``).

    Attaching to an existing cluster is time-boxed (:attr:`connect_seconds`): Ray itself retries a
    cluster that does not answer for many minutes, and one that refuses this process's token for
    20 s, before it raises a ``ConnectionError`` that names neither cause. Here a failed attach is
    one :class:`FedbenchError` line with the cause (unknown host, nothing listening, not a Ray head,
    token authentication, versions) and what to check."""

    connect_seconds = 30.0  # the most an attach may take, all tries together
    connect_tries = 5  # Ray's own tries, about 1 s apart (RAY_gcs_server_port_wait_time_s overrides)

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
            env = {k: v for k, v in os.environ.items() if k in ("FEDBENCH_PLUGINS", "FEDBENCH_DATA_DIR", "FEDBENCH_COMPILE")}
            options = {"include_dashboard": False, "log_to_driver": False,
                       "runtime_env": {"env_vars": env} if env else None}
            target = address or os.environ.get("RAY_ADDRESS")  # what ray.init(address=None) attaches to
            if target and target != "local":
                self._attach(target, options)
            else:
                with _keep_sigterm_handler():
                    ray.init(address=address, **options)
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

    def _attach(self, address: str, options: dict[str, Any]) -> None:
        """``ray.init(address=address)`` within :attr:`connect_seconds`, or one FedbenchError line.

        A plain TCP connection comes first: an unknown host or a closed port is known at once. Then
        ``ray.init`` runs in a thread that the driver waits for at most what is left of the time
        box, because no Ray setting bounds every way an attach hangs (a port that accepts but is no
        Ray head holds each of Ray's tries for about 40 s). Ray's tries are capped so that a refused
        token is reported rather than waited out. In a thread ``ray.init`` also leaves the driver's
        SIGTERM handler alone (in the main thread it installs its own, which skips the matrix's
        clean-up)."""
        import logging
        import threading

        ray = self._ray
        started = time.monotonic()
        where = self._host_port(address)
        problem = self._unreachable(*where) if where is not None else None
        if problem is not None:
            raise self._cannot_attach(address, *problem, started)
        state: dict[str, Any] = {}
        lock = threading.Lock()

        def connect() -> None:
            try:
                ray.init(address=address, **options)
            except BaseException as error:  # noqa: BLE001 - the driver thread reports it
                with lock:
                    state["error"] = error
                return
            with lock:
                state["attached"] = True
                abandoned = state.get("abandoned", False)
            if abandoned:  # attached after the driver gave up: do not stay attached behind its back
                ray.shutdown()

        tries = "RAY_gcs_server_port_wait_time_s"  # how many times Ray tries the head, ~1 s apart
        preset = tries in os.environ
        if not preset:
            os.environ[tries] = str(self.connect_tries)
        quiet = lambda record: "SIGTERM handler is not set" not in record.getMessage()  # noqa: E731
        log = logging.getLogger("ray._private.worker")
        log.addFilter(quiet)
        try:
            thread = threading.Thread(target=connect, name="fedbench-ray-attach", daemon=True)
            thread.start()
            thread.join(max(0.0, self.connect_seconds - (time.monotonic() - started)))
        finally:
            with lock:
                if not state:
                    state["abandoned"] = True
            log.removeFilter(quiet)
            if not preset:
                os.environ.pop(tries, None)
        if "error" in state:
            ray.shutdown()  # a half-made attach: versions are compared after the node connects
            raise self._cannot_attach(address, *self._why_not(state["error"], where), started)
        if "abandoned" in state:
            raise self._cannot_attach(address, *self._why_not(None, where), started)

    @staticmethod
    def _host_port(address: str) -> tuple[str, int] | None:
        """``(host, port)`` of ``host:port`` or ``ray://host:port``; ``None`` for an address that names
        no port (``auto``: Ray looks the cluster up itself)."""
        host, sep, port = address.split("://", 1)[-1].rpartition(":")
        return (host.strip("[]"), int(port)) if sep and port.isdigit() else None

    def _unreachable(self, host: str, port: int) -> tuple[str, str] | None:
        """Why no TCP connection to ``host:port`` can be made, and what to check; ``None`` when one can."""
        try:
            socket.create_connection((host, port), timeout=min(5.0, self.connect_seconds)).close()
        except socket.gaierror as error:
            return (f"the host '{host}' is unknown ({error.strerror or error})",
                    "check the address: the head node's IP and port, as `ray start --head` prints them")
        except ConnectionRefusedError:
            return (f"nothing listens on port {port} of {host}",
                    f"check the address and port, and that `ray start --head --port {port}` runs on that machine")
        except TimeoutError:
            return (f"{host}:{port} did not answer",
                    f"check the address, that the machine is up and that no firewall blocks port {port}")
        except OSError as error:
            return (one_line(error), "check the address, that the machine is up and reachable from here")
        return None

    def _why_not(self, error: BaseException | None, where: tuple[str, int] | None) -> tuple[str, str]:
        """The cause and what to check for a ``ray.init`` that raised ``error`` (``None``: it did not
        finish in time) after something accepted a connection at ``where`` (``None``: not probed).
        Ray wraps the cause in a ``ConnectionError``; its chain tells a refused token and different
        versions apart; anything else there is no Ray head this process can attach to."""
        here = f"Ray {self._ray.__version__} with Python {platform.python_version()}"
        token = ("the token authentication: a head started with RAY_AUTH_MODE=token, or without RAY_AUTH_MODE "
                 "while a Ray token exists (~/.ray/auth_token, which any local ray.init writes), accepts only "
                 "its token; set RAY_AUTH_MODE=token here and the head's token in RAY_AUTH_TOKEN or "
                 "~/.ray/auth_token (`ray get-auth-token` on the head prints it), or start the head with "
                 "RAY_AUTH_MODE=disabled")
        if where is None:
            advice = (f"check the address and port, that `ray start --head` runs there with {here} like this "
                      f"machine, and {token}")
        else:
            advice = (f"check that {where[1]} is the head's port (`ray start --head --port`, 6379 by default; not a "
                      f"worker node's, the dashboard's or the Ray Client's), that the head runs {here} like this "
                      f"machine, and {token}")
        listens = "something listens there, but " if where is not None else ""
        if error is None:
            return f"{listens}no Ray head answered", advice
        chain, seen = [], error
        while seen is not None and len(chain) < 10:
            chain.append(f"{type(seen).__name__}: {seen}")
            seen = seen.__cause__ or seen.__context__
        text = "\n".join(chain)
        if "Version mismatch" in text:
            mismatch = next(line for line in chain if "Version mismatch" in line)
            return (" ".join(mismatch[mismatch.index("Version mismatch"):].split()),
                    f"install the head's Ray and Python versions here, or start the cluster with {here}")
        if any(word in text for word in ("AuthenticationError", "InvalidAuthToken", "Unauthenticated")):
            missing = "no authentication token was found" in text
            return ("token authentication is on here but no token was found" if missing
                    else "the cluster refused this process's authentication (no token, or not the head's token)",
                    f"check {token}")
        return f"{listens}Ray could not attach to it ({one_line(error)})", advice

    @staticmethod
    def _cannot_attach(address: str, reason: str, advice: str, started: float) -> FedbenchError:
        return FedbenchError(f"cannot attach to the Ray cluster at {address}: {reason} "
                             f"(tried for {time.monotonic() - started:.1f} s); {advice}")


@contextlib.contextmanager
def _keep_sigterm_handler():
    """Starting a local Ray replaces the SIGTERM handler with one that exits at once, which would skip
    the matrix's own (cells in flight recorded ``interrupted``, :func:`fedbench.matrix.run_matrix`);
    the driver's handler is put back."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGTERM"):
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _ray_execute(task, plugins):
    """One task on a Ray worker. Its ``worker`` names the Ray node too, as ``host:pid (Ray node
    ID)``: the nodes of a cluster may share a host name (containers, several nodes on one machine),
    so ``host:pid`` alone does not say where a cell ran."""
    import ray
    import torch

    torch.set_num_threads(1)
    problem = load_plugins(plugins)
    outcome = refused(task, problem) if problem is not None else execute(task)
    node = f"(Ray node {ray.get_runtime_context().get_node_id()})"
    outcome["worker"] = f"{worker_id()} {node}"
    for part in outcome.get("outcomes", ()):  # a lockstep group: each cell says where it ran, and how
        part["worker"] = f"{part.get('worker') or worker_id()} {node}"
    return outcome
