"""Independent jobs at once on a CPU machine: the first in this process, each other one in a worker process.

A small model's training step gains little from a second torch thread (1.03-1.22x on two cores,
``bench/README.md``, "Threads"), while two processes on two cores train at 1.8x the throughput of one.
So a campaign on a CPU machine with two or more cores trains its helpfulness and safety reward models at
once (:func:`at_once`). Each training seeds itself and keeps the torch threads it has alone (the thread count
can change a small model's last bits), so the checkpoints are bit for bit those of one training after the
other; the stage takes about the longer training's time instead of the sum (``bench/rm_at_once.py``).

Workers come from a fork server (``multiprocessing``'s ``forkserver``): a clean process started on first
use, which imports torch, transformers and TRL once and forks a worker per job. Not a fork of this process:
once OpenMP has run threads here, a forked child that starts its own hangs (GNU OpenMP is not fork-safe).
A job and its result travel pickled. A worker:

* sends its log lines and progress bars to this process, which shows them with its own
  (:func:`console.forward_to`, :func:`console.show`);
* dies with this process: a thread of the worker waits on a pipe whose other end only this process
  holds, and ends the worker when it closes; a killed campaign leaves no worker writing into its run
  directory, and a rerun starts the stage again;
* ignores Ctrl-C, which this process answers by stopping it;
* returns its job's result, or its error, which is raised here with the worker's message (a
  :class:`~iterative_rlhf.errors.UserError` stays one). A worker killed from outside (out of memory) is a
  UserError naming the job.

The fork server's start (about 10 s of imports, once per process) is hidden behind the main job only when
that trains long enough: by default jobs run at once when the largest has at least ``MIN_WORK`` pairs x
epochs (TinyWorld's RMs: 15,000-17,000; the tests' small world: a few hundred).
``ITERATIVE_RLHF_AT_ONCE=0`` runs them one after the other in this process, ``=1`` at once whatever their size.

:class:`Helper` is the same kind of worker for one loop: it takes a share of each step (half of each step's
micro-batches: TinyWorld's pre-training, ``tinyworld/policy.py``, and an RM trained in micro-batches,
``reward._micro_batched``, through :func:`step_grads`), reading and writing tensors in shared memory, one
message per step; if it dies, the loop goes on alone. It takes its share only while no :func:`at_once`
worker runs beside this process (:func:`others_running`): the helpfulness RM's helper starts once the safety
RM, trained beside it, is done.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import threading
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import console
from ._quiet import SMALL_MODEL_PARAMS, become_worker, cores, siblings
from .errors import UserError

ENV = "ITERATIVE_RLHF_AT_ONCE"
#: Pairs x epochs of the largest job below which jobs run one after the other (unless ITERATIVE_RLHF_AT_ONCE=1).
MIN_WORK = 4096
#: What the fork server imports once, so that a worker starts in milliseconds.
PRELOAD = ["iterative_rlhf._forkserver", "torch", "transformers", "trl", "datasets", "accelerate",
           "iterative_rlhf.reward"]


def _context():  # noqa: ANN202
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def warm_up() -> None:
    """Start the fork server now (it imports in the background, on a core this process may leave idle), so
    that the first :func:`at_once` does not wait for it; nothing where workers are off."""
    if enabled(2):
        from multiprocessing import forkserver

        _context()
        try:
            forkserver.ensure_running()
        except OSError:
            pass  # at_once says so when it needs the server


def enabled(n_jobs: int, work: Sequence[float] = ()) -> bool:
    """Whether :func:`at_once` uses workers: 2+ jobs, as many cores, no GPU, a fork server available, not a
    launched process; ``ITERATIVE_RLHF_AT_ONCE`` unset and the largest ``work`` (pairs x epochs) at least
    ``MIN_WORK``, or it is 1."""
    setting = os.environ.get(ENV, "").strip().lower()
    if setting not in ("", "0", "1"):
        raise UserError(f"{ENV}={setting!r}: expected 1 (work at once in several processes), 0 (one process), "
                        "or nothing (at once where it pays, the default)")
    if setting == "0" or n_jobs < 2 or n_jobs > cores():
        return False
    if setting == "" and work and max(work) < MIN_WORK:
        return False
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return False
    from .launch import inside_launch

    if inside_launch():
        return False
    import torch

    return not torch.cuda.is_available()


def small_checkpoint(path: str | Path) -> bool:
    """A local checkpoint of under 20M float32 parameters (by its weight files' size); False for hub names."""
    p = Path(path)
    if not p.is_dir():
        return False
    size = sum(f.stat().st_size for f in p.iterdir() if f.suffix in (".safetensors", ".bin", ".pt"))
    return 0 < size < SMALL_MODEL_PARAMS * 4


def at_once(jobs: Sequence[tuple[str, Callable[[], Any]]], *, workers: bool | None = None,
            done: Callable[[str, Any], None] | None = None) -> list[Any]:
    """Run named jobs and return their results in order; ``done(name, result)`` runs here as each one ends.

    With ``workers`` (default: :func:`enabled`), jobs 2.. run in workers while this process runs the first (each
    job and its result must pickle: a module-level function, or a ``functools.partial`` of one);
    else one after the other here. Each job keeps the torch threads it would have alone, so that its arithmetic,
    and a trained model's weights, are those of one after the other.
    An error stops the workers still running and is raised; the jobs that ended before it keep their ``done``.
    """
    def finished(name: str, result: Any) -> Any:
        if done is not None:
            done(name, result)
        return result

    if workers is None:
        workers = enabled(len(jobs))
    started: list[_Worker] = []
    if workers:
        try:
            for name, job in jobs[1:]:
                started.append(_Worker(name, job))
        except OSError as e:  # no fork server here (a sandbox without UNIX sockets, no /tmp, ...)
            for w in started:
                w.stop()
            console.warn(f"could not start a worker process ({e}); running the jobs one after the other "
                         f"(set {ENV}=0 to skip trying)")
            workers, started = False, []
    if not workers:
        return [finished(name, job()) for name, job in jobs]
    try:
        with siblings():  # the first job can tell it runs beside others
            results = [finished(jobs[0][0], jobs[0][1]())]
        results += [finished(w.name, w.result()) for w in started]
    finally:
        for w in started:
            w.stop()
    return results


_RUNNING: set[Any] = set()  # the at_once workers still running a job


def others_running() -> bool:
    """Whether an :func:`at_once` worker is still running its job beside this process (a :class:`Helper`
    would then take a core it uses)."""
    return bool(_RUNNING)


class _Worker:
    """One job in a worker process; a thread here shows its forwarded output."""

    def __init__(self, name: str, job: Callable[[], Any]) -> None:
        self.name = name
        self._recv, send = _context().Pipe(duplex=False)  # EOF here when the worker exits
        self._outcome: tuple | None = None
        try:
            self.process, self._lifeline = _spawn(name, _run, send, job)
        except BaseException:
            self._recv.close()
            raise
        _RUNNING.add(self)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _events(self):  # noqa: ANN202
        while True:
            try:
                event = self._recv.recv()
            except (EOFError, OSError):
                return
            if event[0] in ("done", "error"):
                self._outcome = event
                _RUNNING.discard(self)
                continue
            yield event

    def _read(self) -> None:
        try:
            console.show(self._events())
        finally:
            _RUNNING.discard(self)

    def result(self) -> Any:
        self.process.join()
        self._reader.join()
        outcome = self._outcome
        if outcome is None:
            code = self.process.exitcode
            how = f"signal {-code} ({signal.Signals(-code).name})" if code and code < 0 else f"exit status {code}"
            raise UserError(f"{self.name}: its worker process ended with {how} before finishing (out of memory? "
                            f"set {ENV}=0 to run it in the main process); rerun the command to continue")
        if outcome[0] == "done":
            return outcome[1]
        error, text = outcome[1], outcome[2]
        if isinstance(error, BaseException):
            if not isinstance(error, UserError):
                console.log(text.rstrip())  # the worker's traceback: where it failed
            raise error
        raise RuntimeError(f"{self.name} failed in its worker process:\n{text}")

    def stop(self) -> None:
        _RUNNING.discard(self)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(10)
            if self.process.is_alive():
                self.process.kill()
                self.process.join()
        self._reader.join(5)
        self._recv.close()
        self._lifeline.close()


def step_grads(params: Sequence[Any], chunks: Sequence[Any], grads_of: Callable[[Any], tuple[list, Any]],
               helper: Helper | None, slots: Sequence[Sequence[Any]], message: Callable[[list], Any],
               what: str) -> tuple[Helper | None, bool, list]:
    """Set each of ``params``' ``.grad`` to the sum, in order, of the ``chunks``' gradients, exactly as
    ``backward`` accumulates them one micro-batch after the other.

    ``grads_of(chunk)`` computes one chunk's gradients here: a fresh tensor (or None) per parameter, and an
    extra value (its loss, ...). With a ready ``helper`` and no :func:`at_once` worker running beside this
    process, the helper computes the middle chunks (the second, with two), each into a slot of ``slots``, from
    ``message(chunks)``, and answers with their extras; this process computes the others meanwhile. The sum, and
    so every bit of the step, is the same either way. Returns the helper (None once it is gone: this process
    then does all the work, after a warning naming ``what``), whether it took part, and the chunks' extras.
    """
    if helper is not None and helper.error is not None:  # its worker could not start
        helper = _lost(helper, HelperGone(f"{helper.name}: could not start a worker process ({helper.error})"),
                       what)
    n = len(chunks)
    mine = [0, n - 1] if n > 2 else [0]
    theirs = [i for i in range(n) if i not in mine]
    shared = (helper is not None and helper.ready() and 0 < len(theirs) <= len(slots)
              and not others_running())
    if shared:
        try:
            helper.send(message([chunks[i] for i in theirs]))
        except HelperGone as e:
            helper, shared = _lost(helper, e, what), False
    got = {i: grads_of(chunks[i]) for i in mine}
    if shared:
        try:
            extras = helper.answer()
            got.update({i: (list(slots[j]), extras[j]) for j, i in enumerate(theirs)})
        except HelperGone as e:
            helper, shared = _lost(helper, e, what), False
    if not shared:
        got.update({i: grads_of(chunks[i]) for i in theirs})
    grads = [got[i][0] for i in range(n)]
    for k, p in enumerate(params):
        parts = [g[k] for g in grads if g[k] is not None]
        total = None
        if parts:  # the sum goes into this process's own first tensor, never into a helper's slot
            total = parts[0] if grads[0][k] is not None else parts[0].clone()
        for g in parts[1:]:
            total.add_(g)  # AccumulateGrad's ``grad += new`` in the same order
        p.grad = total
    return helper, shared, [got[i][1] for i in range(n)]


def start_grad_helper(name: str, model: Any, chunks: int, work: float, build: Callable[[], Any],
                      grads_of: Callable[..., tuple[list, Any]]) -> tuple[Helper, list] | tuple[None, None]:
    """A :class:`Helper` for :func:`step_grads` over ``chunks`` micro-batches per step, and its slots, where
    workers pay (:func:`enabled`, ``work`` = pairs or sequences x epochs) and this process is not itself a worker;
    else ``(None, None)``. ``model``'s weights go to shared memory (the helper reads this process's updates);
    the helper's own model is ``build()``, and it answers each message ``(chunks, *args)`` with
    ``grads_of(model, chunk, *args)`` per chunk: its gradients into a slot, its extra value back. Without shared
    memory: a one-line warning, and this process trains alone."""
    from ._quiet import in_worker

    if in_worker() or not enabled(2, [work]):
        return None, None
    try:
        model.share_memory()
        slots = [[p.new_zeros(p.shape).share_memory_() for p in model.parameters()]
                 for _ in range(1 if chunks == 2 else chunks - 2)]
    except (RuntimeError, OSError) as e:  # no shared memory here (/dev/shm full or missing)
        console.warn(f"{name}: no shared memory for a helper process ({e}); training in this process alone (the "
                     "same weights, more slowly)")
        return None, None
    return Helper(name, _serve_grads, build, list(model.parameters()), slots, grads_of), slots


def _serve_grads(conn: Any, build: Callable[[], Any], params: list, slots: list[list],
                 grads_of: Callable[..., tuple[list, Any]]) -> None:
    """A :func:`start_grad_helper` helper's loop: its model's weights are ``params`` (shared with the trainer,
    which updates them between steps); each message ``(chunks, *args)`` asks for the chunks' gradients, written
    into ``slots``; the answer is each chunk's extra value."""
    model = build()
    for p, shared in zip(model.parameters(), params, strict=True):
        p.data = shared
    model.train()
    while (message := conn.recv()) is not None:
        chunks, *args = message
        extras = []
        for chunk, slot in zip(chunks, slots, strict=False):
            grads, extra = grads_of(model, chunk, *args)
            for out, g in zip(slot, grads, strict=True):
                out.copy_(g)
            extras.append(extra)
        conn.send(("ok", extras))


def _lost(helper: Helper, error: Exception, what: str) -> None:
    console.warn(f"{error}; {what} goes on in this process alone (the same weights, more slowly)")
    helper.stop()
    return None


class HelperGone(Exception):
    """A :class:`Helper`'s process ended or failed; the caller does its share itself from then on."""


class Helper:
    """A long-lived worker process that takes a share of each step of a loop in this process.

    ``target(conn, *args)`` runs in a worker from the fork server: it answers each message this process sends
    (:meth:`send`, then :meth:`answer`) and returns on ``None``. Tensors among ``args`` travel in shared memory
    (``Tensor.share_memory_()`` first), so the worker sees this process's in-place updates. The worker starts in
    the background (the fork server may still be importing): until :meth:`ready`, this process does all the
    work itself. Like :func:`at_once`'s workers it dies with this process and ignores Ctrl-C.
    """

    def __init__(self, name: str, target: Callable[..., None], *args: Any) -> None:
        self.name = name
        self._lock = threading.Lock()
        self._stopped = False
        self._conn: Any = None
        self._lifeline: Any = None
        self.process: Any = None
        self.error: BaseException | None = None
        threading.Thread(target=self._start, args=(target, args), daemon=True).start()

    def _start(self, target: Callable[..., None], args: tuple) -> None:
        try:
            here, there = _context().Pipe()
            try:
                process, keep = _spawn(self.name, _serve, there, target, args)
            except BaseException:
                here.close()
                raise
        except BaseException as e:  # noqa: BLE001 - no fork server: this process does all the work
            self.error = e
            return
        with self._lock:
            self.process, self._lifeline = process, keep
            if self._stopped:  # stopped while starting
                self._end(here)
            else:
                self._conn = here

    def ready(self) -> bool:
        """Whether the worker is up and takes work."""
        return self._conn is not None

    def send(self, message: Any) -> None:
        try:
            self._conn.send(message)
        except (OSError, ValueError) as e:
            raise HelperGone(f"{self.name}: its worker process is gone ({e})") from e

    def answer(self) -> Any:
        """The worker's answer to the last message; :class:`HelperGone` if it ended or failed."""
        try:
            kind, value = self._conn.recv()
        except (EOFError, OSError) as e:
            code = self.process.exitcode if self.process is not None else None
            raise HelperGone(f"{self.name}: its worker process ended (exit status {code})") from e
        if kind == "error":
            last = value.strip().splitlines()[-1] if value.strip() else "no traceback"
            raise HelperGone(f"{self.name}: its worker process failed ({last})")
        return value

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            conn, self._conn = self._conn, None
        if conn is not None:
            self._end(conn)

    def _end(self, conn: Any) -> None:
        try:
            conn.send(None)
        except (OSError, ValueError):
            pass
        self.process.join(10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        conn.close()
        self._lifeline.close()


def _spawn(name: str, body: Callable[..., None], child_end: Any, *args: Any) -> tuple[Any, Any]:
    """Start ``body(child_end, lifeline, *args)`` in a worker forked by the fork server; returns the process and
    this side of its lifeline (only this process writes there: the worker reads EOF when this process dies).
    ``child_end``, the worker's end of a pipe, is closed here once the worker holds it (or failed to start)."""
    ctx = _context()
    lifeline, keep = ctx.Pipe(duplex=False)
    process = ctx.Process(target=body, args=(child_end, lifeline, *args), name=f"iterative-rlhf {name}",
                          daemon=True)
    try:
        process.start()
    except BaseException:
        keep.close()
        raise
    finally:
        child_end.close()
        lifeline.close()
    return process, keep


def _serve(conn: Any, lifeline: Any, target: Callable[..., None], args: tuple) -> None:
    """A helper's body: run ``target(conn, *args)``; an error goes back as ("error", traceback)."""
    _tie_to_parent(lifeline)
    try:
        _as_the_cli()
        target(conn, *args)
    except BaseException:  # noqa: BLE001 - everything goes back to the parent
        try:
            conn.send(("error", traceback.format_exc()))
        except (OSError, ValueError):
            pass
    conn.close()


def _tie_to_parent(lifeline: Any) -> None:
    """End this worker as soon as ``lifeline`` reads EOF (its parent, the only writer, has died); leave Ctrl-C
    to the parent, which stops the worker."""
    def wait() -> None:
        try:
            lifeline.recv()
        except (EOFError, OSError):
            pass
        os._exit(1)

    threading.Thread(target=wait, daemon=True).start()
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _as_the_cli() -> None:
    """A worker's settings: the CLI's (one torch thread unless a stage asks for more, quiet libraries), and
    a job can tell it runs beside others (an RM's train_summary.json says so)."""
    from ._quiet import cpu_threads, quiet_libraries

    cpu_threads()
    quiet_libraries()
    become_worker()


def _run(send: Any, lifeline: Any, job: Callable[[], Any]) -> None:
    """A worker's body: forward output, run the job, send ("done", result) or ("error", exception, traceback)."""
    _tie_to_parent(lifeline)
    console.forward_to(send.send)
    try:
        _as_the_cli()
        outcome: tuple = ("done", job())
    except BaseException as e:  # noqa: BLE001 - everything goes back to the parent
        text = traceback.format_exc()
        try:
            pickle.dumps(e)
            outcome = ("error", e, text)
        except Exception:  # noqa: BLE001
            outcome = ("error", None, text)
    console.forward_to(None)
    try:
        send.send(outcome)
    except Exception:  # noqa: BLE001 - an unpicklable result
        send.send(("error", None, traceback.format_exc()))
    send.close()
