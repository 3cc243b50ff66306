"""Submit cost in CPU instructions (valgrind's callgrind): repeatable on a noisy machine.

    python benchmarks/instructions.py          # needs valgrind (apt-get install valgrind)

Wall-clock figures on a shared machine move by tens of percent between runs; instruction
counts do not. For the thread backend, in each place of submission, this counts the
instructions the caller spends in N submits (the pool's workers held busy, so no task runs)
for this project and for a raw ThreadPoolExecutor, as the difference between a run with N
submits and a run with none, and prints the per-submit counts and their ratio.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

N = 4000


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


def count(where: str, side: str, n: int) -> int:
    out = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable,
         __file__, "--child", where, side, str(n)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    line = next(line for line in out.stderr.splitlines() if "Collected" in line)
    return int(line.split()[-1])


def main() -> int:
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2], sys.argv[3], int(sys.argv[4]))
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
