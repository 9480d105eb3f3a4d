"""Jobs at once in forked workers (workers.py): results, forwarded output, errors, and no worker outliving its
parent."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import helper_up

from iterative_rlhf import _quiet, console
from iterative_rlhf.errors import DataError, UserError
from iterative_rlhf.workers import Helper, HelperGone, at_once, enabled, small_checkpoint

pytestmark = pytest.mark.skipif("forkserver" not in __import__("multiprocessing").get_all_start_methods(),
                                reason="needs a fork server")


# Jobs travel pickled to their worker: module-level functions.

def _pid_and_threads(wait: float = 0.0) -> tuple[int, int]:
    time.sleep(wait)
    return os.getpid(), _quiet.training_threads()


def _chatty() -> int:
    console.log("hello from the worker")
    with console.progress("worker bar", 3) as advance:
        for _ in range(3):
            advance()
    console.table("worker table", ["x"], [[1.5]])
    return 7


def _hello() -> str:
    console.log("hello from here")
    return "main"


def _bad_data() -> None:
    raise DataError("no margin", path="x.jsonl", row=3)


def _crash() -> None:
    raise ZeroDivisionError("boom")


def _killed() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _forever(pid_file: str) -> None:
    Path(pid_file + ".tmp").write_text(str(os.getpid()))
    os.replace(pid_file + ".tmp", pid_file)
    time.sleep(600)


def _fail_once_started(pid_file: str) -> None:
    for _ in range(600):
        if Path(pid_file).exists():
            break
        time.sleep(0.05)
    raise RuntimeError("here")


def _doubler(conn, shared, pid_file: str = "") -> None:
    """A helper's loop: writes its pid, then doubles ``shared`` in place on each message."""
    if pid_file:
        Path(pid_file + ".tmp").write_text(str(os.getpid()))
        os.replace(pid_file + ".tmp", pid_file)
    while (message := conn.recv()) is not None:
        if message == "fail":
            raise ValueError("cannot do that")
        shared.mul_(2)
        conn.send(("ok", float(shared.sum())))


def test_a_helper_works_on_shared_tensors_step_by_step():
    import torch

    shared = torch.ones(4).share_memory_()
    helper = helper_up(Helper("doubler", _doubler, shared))
    try:
        assert helper.process.pid != os.getpid()
        for step in range(1, 4):
            helper.send("go")
            assert helper.answer() == 4 * 2**step
            assert shared.tolist() == [2.0**step] * 4  # its in-place writes are seen here
            shared.add_(0)  # and this process may write between steps
        helper.send("fail")
        with pytest.raises(HelperGone, match=r"doubler: its worker process failed \(ValueError: cannot do that\)"):
            helper.answer()
    finally:
        helper.stop()
    assert not helper.process.is_alive()


def _dies_with_its_parent(tmp_path, main: str, what: str) -> None:
    """Run ``main`` (the body of a script's ``__main__``; it starts a worker that writes its pid to ``{pid_file}``)
    in a process, SIGKILL that process once the worker is up, and fail if the worker outlives it."""
    pid_file = tmp_path / "pid"
    script = textwrap.dedent("""
        import functools, time, torch
        from iterative_rlhf.workers import Helper, at_once
        from test_workers import _doubler, _forever
        if __name__ == "__main__":
    """) + textwrap.indent(textwrap.dedent(main).format(pid_file=repr(str(pid_file))), "    ")
    (tmp_path / "campaign.py").write_text(script)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, str(tmp_path / "campaign.py")], env=env)
    try:
        for _ in range(1200):  # the fork server imports torch first
            if pid_file.exists() or proc.poll() is not None:
                break
            time.sleep(0.05)
        worker = int(pid_file.read_text())
    finally:
        proc.kill()
        proc.wait()
    for _ in range(200):
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    os.kill(worker, signal.SIGKILL)
    pytest.fail(f"the {what} outlived its parent")


def test_a_helper_dies_with_its_parent(tmp_path):
    _dies_with_its_parent(tmp_path, """
        helper = Helper("doubler", _doubler, torch.ones(2).share_memory_(), {pid_file})
        time.sleep(600)
    """, "helper")


def test_jobs_run_in_other_processes_and_return_in_order():
    done = []
    results = at_once([("a", _pid_and_threads), ("b", functools.partial(_pid_and_threads, 0.5))],
                      workers=True, done=lambda name, result: done.append(name))
    (pid_a, threads_a), (pid_b, threads_b) = results
    assert pid_a == os.getpid() and pid_b != os.getpid()
    assert threads_a == threads_b == _quiet.training_threads()  # as alone: the same arithmetic
    assert done == ["a", "b"]
    assert not _quiet.sharing_cores()


def test_a_worker_forwards_its_lines_and_progress_bars(capsys):
    assert at_once([("main", _hello), ("worker", _chatty)], workers=True) == ["main", 7]
    err = capsys.readouterr().err
    assert "hello from the worker" in err and "hello from here" in err
    assert "table" in err and "1.500" in err  # the rendered table (its title wraps to its width)


def test_progress_bars_open_together_share_one_display():
    with console.progress("first", 2) as a, console.progress("second", 2) as b:  # rich allows one live display
        a()
        b()
        assert console._live[1] == 2
    assert console._live == [None, 0]


def test_a_workers_error_is_raised_here_with_its_message():
    with pytest.raises(DataError, match=r"x.jsonl, row 3: no margin"):
        at_once([("main", _hello), ("safety", _bad_data)], workers=True)
    with pytest.raises(ZeroDivisionError, match="boom"):
        at_once([("main", _hello), ("safety", _crash)], workers=True)


def test_a_worker_killed_from_outside_is_a_user_error_naming_it():
    with pytest.raises(UserError, match=r"safety RM: its worker process ended with signal 9 \(SIGKILL\)"):
        at_once([("main", _hello), ("safety RM", _killed)], workers=True)


def test_an_error_here_stops_the_workers(tmp_path):
    pid_file = str(tmp_path / "pid")
    with pytest.raises(RuntimeError, match="here"):
        at_once([("main", functools.partial(_fail_once_started, pid_file)),
                 ("worker", functools.partial(_forever, pid_file))], workers=True)
    pid = int(Path(pid_file).read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_a_worker_dies_with_its_parent(tmp_path):
    """A SIGKILLed campaign leaves no worker behind to write into its run directory."""
    _dies_with_its_parent(tmp_path, """
        at_once([("main", functools.partial(time.sleep, 600)),
                 ("worker", functools.partial(_forever, {pid_file}))], workers=True)
    """, "worker")


def test_when_jobs_run_at_once(monkeypatch, tmp_path):
    monkeypatch.setattr("iterative_rlhf.workers.cores", lambda: 2)
    monkeypatch.delenv("ITERATIVE_RLHF_AT_ONCE", raising=False)
    assert enabled(2) and not enabled(1) and not enabled(3)
    assert enabled(2, [17_000, 2_000]) and not enabled(2, [400, 300])  # too little to hide the server's start
    monkeypatch.setenv("ITERATIVE_RLHF_AT_ONCE", "1")
    assert enabled(2, [400, 300])
    monkeypatch.setenv("ITERATIVE_RLHF_AT_ONCE", "0")
    assert not enabled(2) and not enabled(2, [17_000, 2_000])
    monkeypatch.setenv("ITERATIVE_RLHF_AT_ONCE", "yes please")
    with pytest.raises(UserError, match="ITERATIVE_RLHF_AT_ONCE"):
        enabled(2)
    monkeypatch.delenv("ITERATIVE_RLHF_AT_ONCE")
    monkeypatch.setenv("WORLD_SIZE", "2")  # a process of a launched stage trains its own share
    assert not enabled(2)
    monkeypatch.delenv("WORLD_SIZE")
    (tmp_path / "small").mkdir()
    (tmp_path / "small" / "model.safetensors").write_bytes(b"\0" * 1000)
    assert small_checkpoint(tmp_path / "small")
    assert not small_checkpoint(tmp_path / "missing") and not small_checkpoint("meta-llama/Llama-2-7b-hf")


def test_no_fork_server_means_one_after_the_other_with_a_warning(monkeypatch, capsys):
    import iterative_rlhf.workers as workers

    def no_server(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise OSError("AF_UNIX path too long")

    monkeypatch.setattr(workers, "_context", no_server)
    assert at_once([("a", os.getpid), ("b", os.getpid)], workers=True) == [os.getpid(), os.getpid()]
    assert "could not start a worker process (AF_UNIX path too long)" in capsys.readouterr().err


def test_one_after_the_other_runs_here():
    assert at_once([("a", os.getpid), ("b", os.getpid)], workers=False) == [os.getpid(), os.getpid()]


def test_rm_report_time_counts_rms_trained_at_once_once(tmp_path):
    import json

    from iterative_rlhf.report import _add_rm_time

    for folder, at in (("rm", True), ("v1/rm", False)):
        for kind, sec in (("helpful", 30.0), ("safety", 6.0)):
            d = tmp_path / folder / kind
            d.mkdir(parents=True)
            (d / "train_summary.json").write_text(json.dumps({"train_seconds": sec, "at_once": at}))
    r0, r1 = {}, {}
    _add_rm_time(Path(tmp_path), 0, r0)
    _add_rm_time(Path(tmp_path), 1, r1)
    assert r0["times"]["rm"] == 30.0 and r1["times"]["rm"] == 36.0


def _wait_alone(timeout: float = 60.0) -> tuple[bool, bool]:
    from iterative_rlhf.workers import others_running

    beside = others_running()
    deadline = time.monotonic() + timeout
    while others_running() and time.monotonic() < deadline:
        time.sleep(0.02)
    return beside, others_running()


def test_this_process_can_tell_when_its_workers_are_done():
    """A Helper takes a core only once at_once's workers have ended (workers.step_grads asks others_running)."""
    (beside, after), _ = at_once([("here", _wait_alone), ("there", functools.partial(_pid_and_threads, 1.0))],
                                 workers=True)
    assert beside and not after
