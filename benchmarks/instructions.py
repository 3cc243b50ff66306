"""Costs in CPU instructions (valgrind's callgrind): repeatable on a noisy machine.

    python benchmarks/instructions.py          # needs valgrind (apt-get install valgrind)

Wall-clock figures on a shared machine move by tens of percent between runs; instruction
counts do not. Each figure is the difference between a run doing N operations and a run
doing none, divided by N, for this project and for the raw pool it wraps, side by side:

- submit: the instructions the caller spends in ``submit`` (thread backend, the pool's
  workers held busy so no task runs), from a request, an app context, and no context;
- process submit: the same for the process backend against ProcessPoolExecutor, from a
  request, counting the caller's thread only (the pool's threads wake when they may);
- whole task: ``submit(int).result()`` one after another on one worker, inside a request,
  all threads and greenlets counted, for the thread and gevent backends; beside ours, the
  raw pool and the floor for any task with an app context (the raw pool running
  ``with app.app_context(): int()``). The cyclic GC is off in every run (after warm-up),
  so a collection landing in one side's loop does not count against it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

N = 4000
WHOLE = 3000


def child(where: str, side: str, n: int) -> None:
    """Submit n no-op tasks with every worker held busy, then leave at once."""
    import concurrent.futures as cf

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from flask import Flask, g

    import flask_executor

    hold, started = threading.Event(), threading.Semaphore(0)

    def block() -> None:
        started.release()
        hold.wait()

    app = Flask("instructions")
    app.config["EXECUTOR_MAX_WORKERS"] = 4
    submit = (
        flask_executor.Executor(app).submit if side == "ours" else cf.ThreadPoolExecutor(4).submit
    )
    contexts = {"request": app.test_request_context("/?q=1"), "app": app.app_context()}
    if where in contexts:
        contexts[where].push()
        g.user = "ann"
    for _ in range(4):
        submit(block)
    for _ in range(4):
        started.acquire()
    for _ in range(n):
        submit(int)
    os._exit(0)  # no shutdown: only the submits are counted


def process_child(side: str, n: int) -> None:
    """Submit n no-op tasks to a process pool from a request, its 2 workers (and the calls
    queued for them) held busy. count() reads this process's main thread only."""
    import concurrent.futures as cf
    import multiprocessing
    import time

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from flask import Flask

    import flask_executor

    app = Flask("instructions")
    app.config.update(EXECUTOR_TYPE="process", EXECUTOR_MAX_WORKERS=2)
    if side == "ours":
        pool = flask_executor.Executor(app)
    else:
        pool = cf.ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn"))
    with app.test_request_context("/?q=1"):
        held = [pool.submit(time.sleep, 600) for _ in range(3)]  # 2 running, 1 in the queue
        pool.submit(int)  # (started: every worker is up)
        while sum(f.running() for f in held) < 2:
            time.sleep(0.01)
        for _ in range(n):
            pool.submit(int)
    workers = pool._processes.values() if side == "raw" else pool._self._processes.values()
    for worker in list(workers):
        worker.kill()
    os._exit(0)


def whole(backend: str, side: str, n: int) -> None:
    """n tasks, each submitted and waited for, one worker, inside a request."""
    import concurrent.futures as cf
    import gc

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from flask import Flask

    import flask_executor

    app = Flask("instructions")
    app.config.update(EXECUTOR_TYPE=backend, EXECUTOR_MAX_WORKERS=1)

    task = int  # the task every side runs

    def floor() -> int:
        with app.app_context():
            return task()

    if backend == "gevent":
        import gevent.pool

        raw = gevent.pool.Pool(1)
        run = {"raw": lambda: raw.spawn(task).get(), "floor": lambda: raw.spawn(floor).get()}
    else:
        pool = cf.ThreadPoolExecutor(1)
        run = {
            "raw": lambda: pool.submit(task).result(),
            "floor": lambda: pool.submit(floor).result(),
        }
    executor = flask_executor.Executor(app)
    run["ours"] = lambda: executor.submit(task).result()

    def measure(depth: int) -> None:
        if depth:  # see below
            return measure(depth - 1)
        with app.test_request_context("/?q=1"):
            for _ in range(200):  # warm-up: pools, threads, caches
                run[side]()
            gc.collect()
            gc.disable()
            for _ in range(n):
                run[side]()

    # gevent records where each greenlet was spawned: the line of each of the 10 frames
    # above it, at a cost that grows with each frame's code (this module's top level costs
    # 3,000 instructions). Measured 12 frames deep, every side records small frames only.
    measure(12)
    os._exit(0)


def count(where: str, side: str, n: int, mode: str = "--child") -> int:
    """Instructions of a run: all its threads; for --process, its main thread's only (the
    process pool's own threads wake as the scheduler lets them, which moves by 10%)."""
    with tempfile.TemporaryDirectory() as folder:
        out = subprocess.run(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={folder}/out",
             "--separate-threads=yes", sys.executable, __file__, mode, where, side, str(n)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        if mode == "--process":
            totals = Path(folder, "out-01").read_text().split("\ntotals:")[1]
            return int(totals.split()[0])
    line = next(line for line in out.stderr.splitlines() if "Collected" in line)
    return int(line.split()[-1])


def main() -> int:
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    if sys.argv[1:2] == ["--whole"]:
        whole(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    if sys.argv[1:2] == ["--process"]:
        process_child(sys.argv[3], int(sys.argv[4]))
    if not shutil.which("valgrind"):
        print("valgrind is not installed: apt-get install valgrind")
        return 1
    print(f"Instructions per submit, thread backend, workers held busy ({N} submits)")
    print("| submitted from | ours | raw ThreadPoolExecutor | ratio |")
    print("| --- | --- | --- | --- |")
    for where in ("request", "app", "none"):
        per = {
            side: (count(where, side, N) - count(where, side, 0)) / N for side in ("ours", "raw")
        }
        print(f"| {where} | {per['ours']:,.0f} | {per['raw']:,.0f} | "
              f"**{per['ours'] / per['raw']:.2f}x** |", flush=True)  # fmt: skip
    per = {side: (count("-", side, N, "--process") - count("-", side, 0, "--process")) / N
           for side in ("ours", "raw")}  # fmt: skip
    print(f"| request, process backend (vs ProcessPoolExecutor) | {per['ours']:,.0f} | "
          f"{per['raw']:,.0f} | **{per['ours'] / per['raw']:.2f}x** |", flush=True)  # fmt: skip
    print(f"\nInstructions per whole task: submit, then result(); one worker, in a request "
          f"({WHOLE} tasks, GC off)")  # fmt: skip
    print(
        "| backend | ours | raw pool | floor: raw pool + app context | ours / raw | floor / raw |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for backend in ("thread", "gevent"):
        sides = ("ours", "raw", "floor")
        per = {s: (count(backend, s, WHOLE, "--whole") - count(backend, s, 0, "--whole")) / WHOLE
               for s in sides}  # fmt: skip
        print(f"| {backend} | {per['ours']:,.0f} | {per['raw']:,.0f} | {per['floor']:,.0f} | "
              f"**{per['ours'] / per['raw']:.2f}x** | {per['floor'] / per['raw']:.2f}x |",
              flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
