"""Side-by-side cost per task: flask_executor against the raw pool it wraps, in one run.

    python benchmarks/bench.py            # full run (a few minutes)
    python benchmarks/bench.py --smoke    # tiny N, one repeat: checks that it runs
    python benchmarks/bench.py --with-1.0 # also Flask-Executor 1.0 (thread), fetched by pip

For each backend (thread, process, gevent) and each place of submission (inside a request,
an app context only, no context) the same no-op tasks go through this project and through
the raw pool (ThreadPoolExecutor / ProcessPoolExecutor / gevent.pool.Pool, same worker
count), alternating A B A B. It prints per-task microseconds and the ratios of:

- submit latency: time the caller spends in submit, with the pool's workers held busy
  (blocked on an event) so it is the caller's own cost; timed in batches of 100 submits,
  the fastest batch over all repeats (noise on a shared machine only ever adds time);
- submit-to-done: N tasks submitted and all finished; the median ratio of the pairs.

Both are timed with the cyclic GC off on both sides (see submit_to_done).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import gc
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flask import Flask, g

import flask_executor

WORKERS = 4
HOLD = multiprocessing.Event()  # inherited by forked process workers: holds them busy
STARTED = multiprocessing.Semaphore(0)  # released by each blocker once it runs
Submit = Callable[..., Any]


def noop() -> None:
    pass


def block() -> None:
    STARTED.release()
    HOLD.wait(60)


# -- the two sides of each backend ---------------------------------------------------


class Side:
    """One pool, ours or raw: how to submit, hold its workers busy, and wait for tasks."""

    def __init__(self, submit: Submit, wait_all: Callable[[list[Any]], None], busy: int) -> None:
        self.submit = submit
        self.wait_all = wait_all
        self.busy = busy  # tasks that occupy every worker; 0 where submit never competes

    def hold(self) -> list[Any]:
        """Occupy every worker, and return once each of them is blocked."""
        HOLD.clear()
        held = [self.submit(block) for _ in range(self.busy)]
        for _ in held:
            if not STARTED.acquire(timeout=60):
                raise RuntimeError("a blocker never started")
        return held

    def release(self, held: list[Any]) -> None:
        HOLD.set()
        self.wait_all(held)


def wait_futures(futures: list[Any]) -> None:
    for future in futures:
        future.result(120)


def sides(backend: str) -> tuple[Flask, Side, Side, Callable[[], None]]:
    """(our app, ours, raw, close) for one backend."""
    app = Flask("bench")
    # Process pools on both sides start their workers by fork: the blockers wait on HOLD,
    # which a worker can only inherit (ours defaults to spawn; like is compared with like).
    app.config.update(
        EXECUTOR_TYPE=backend, EXECUTOR_MAX_WORKERS=WORKERS, EXECUTOR_START_METHOD="fork"
    )
    if backend == "gevent":
        import gevent.pool

        app.config["EXECUTOR_MAX_WORKERS"] = None  # a full raw Pool.spawn would block
        raw_pool = gevent.pool.Pool(None)
        raw = Side(raw_pool.spawn, lambda greenlets: raw_pool.join(), busy=0)
    elif backend == "thread":
        raw_pool = cf.ThreadPoolExecutor(WORKERS)
        raw = Side(raw_pool.submit, wait_futures, busy=WORKERS)
    else:
        raw_pool = cf.ProcessPoolExecutor(WORKERS, mp_context=multiprocessing.get_context("fork"))
        raw = Side(raw_pool.submit, wait_futures, busy=WORKERS)
    executor = flask_executor.Executor(app)
    ours = Side(executor.submit, wait_futures, busy=0 if backend == "gevent" else WORKERS)

    def close() -> None:
        HOLD.set()
        executor.shutdown()
        if backend == "gevent":
            raw_pool.join()
        else:
            raw_pool.shutdown()

    return app, ours, raw, close


def place(app: Flask, where: str) -> Any:
    """The context a view, a CLI command or a plain thread would submit from."""
    if where == "request":
        ctx = app.test_request_context("/report?month=11", headers={"X-User": "ann"})
    elif where == "app":
        ctx = app.app_context()
    else:
        return _NoContext()
    return ctx


class _NoContext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


# -- the two measurements ------------------------------------------------------------


def submit_latency(side: Side, n: int, batch: int = 100) -> list[float]:
    """Seconds per submit, workers held busy: one figure per batch of `batch` submits."""
    held = side.hold()
    submit, futures, per_batch = side.submit, [], []
    clock = time.perf_counter
    gc.disable()
    for _ in range(max(1, n // batch)):
        start = clock()
        for _ in range(batch):
            futures.append(submit(noop))
        per_batch.append((clock() - start) / batch)
    gc.enable()
    side.release(held)
    side.wait_all(futures)
    return per_batch


def submit_to_done(side: Side, n: int) -> float:
    """Seconds per task from the first submit until all n are done, with the cyclic GC
    off (collected just before, untimed): a full collection landing in one side's run
    would otherwise count against that side (it swung gevent's ratio by 0.5x)."""
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter()
        futures = [side.submit(noop) for _ in range(n)]
        side.wait_all(futures)
        return (time.perf_counter() - start) / n
    finally:
        gc.enable()


def compare(backend: str, where: str, n: int, repeats: int) -> dict[str, float]:
    app, ours, raw, close = sides(backend)
    try:
        with place(app, where):
            if where == "request":
                g.user = "ann"
                g.items = list(range(10))
            submit_to_done(ours, min(n, 200))  # warm up: workers started, caches filled
            submit_to_done(raw, min(n, 200))
            lat_ours, lat_raw, done_ratios, done_ours, done_raw = [], [], [], [], []
            for _ in range(repeats):  # alternate A B A B
                lat_ours.extend(submit_latency(ours, n))
                lat_raw.extend(submit_latency(raw, n))
                a, b = submit_to_done(ours, n), submit_to_done(raw, n)
                done_ours.append(a)
                done_raw.append(b)
                done_ratios.append(a / b)
    finally:
        close()
    return {
        "submit_ours_us": min(lat_ours) * 1e6,
        "submit_raw_us": min(lat_raw) * 1e6,
        "submit_ratio": min(lat_ours) / min(lat_raw),
        "done_ours_us": statistics.median(done_ours) * 1e6,
        "done_raw_us": statistics.median(done_raw) * 1e6,
        "done_ratio": statistics.median(done_ratios),
    }


# -- memory and concurrent waits -----------------------------------------------------


def stored_memory(calls: int) -> float:
    """Peak traced MiB over `calls` submit_stored calls with the default bounded dict."""
    app = Flask("memory")
    app.config["EXECUTOR_MAX_WORKERS"] = WORKERS
    app.logger.disabled = True  # submits outrun the pool: each eviction of a running one warns
    executor = flask_executor.Executor(app)
    with app.test_request_context("/"):
        for key in range(1000):
            executor.submit_stored(key, noop)
        gc.collect()
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        for key in range(1000, 1000 + calls):
            executor.submit_stored(key, noop)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    executor.shutdown()
    return (peak - base) / 2**20


# -- shared stores: memory, SQLite, Redis ------------------------------------------------


def store_costs(store: str, n: int) -> dict[str, float]:
    """Median µs per submit_stored, per poll (futures.done) and per pop, from inside a
    request, thread backend with its workers held busy (the caller's own cost)."""
    app = Flask("stores")
    app.config.update(EXECUTOR_FUTURES_STORE=store, EXECUTOR_FUTURES_MAX_LENGTH=None)
    app.config["SECRET_KEY"] = "bench"
    app.config["EXECUTOR_MAX_WORKERS"] = WORKERS
    executor = flask_executor.Executor(app)
    side = Side(executor.submit, wait_futures, busy=WORKERS)
    costs: dict[str, list[float]] = {"submit_stored": [], "poll": [], "pop": []}
    with app.test_request_context("/"):
        held = side.hold()
        keys = [f"k{n}" for n in range(n)]
        costs["submit_stored"] = per_call(lambda k: executor.submit_stored(k, noop), keys)
        side.release(held)
        wait_futures([executor.futures.pop(k) for k in keys[:1]])
        for k in keys[1:]:
            executor.futures.result(k, timeout=120)
        costs["poll"] = per_call(executor.futures.done, keys[1:])
        costs["pop"] = per_call(executor.futures.pop, keys[1:])
        executor.submit_stored("big", bytes, 50_000_000).result(120)  # a 50 MB result
        executor.futures.result("big", timeout=120)
        costs["big poll"] = per_call(executor.futures.done, ["big"] * 40)
    executor.shutdown()
    return {name: statistics.median(values) for name, values in costs.items()}


def per_call(call: Callable[[str], object], keys: list[str], batch: int = 20) -> list[float]:
    """µs per call, one figure per batch of `batch` calls."""
    figures = []
    for start in range(0, len(keys) - batch + 1, batch):
        t0 = time.perf_counter()
        for key in keys[start : start + batch]:
            call(key)
        figures.append((time.perf_counter() - t0) / batch * 1e6)
    return figures


def polls_per_second(store: str, processes: int, seconds: float) -> float:
    """Polls of a finished key per second, summed over `processes` processes at once."""
    app = Flask("stores")
    app.config.update(EXECUTOR_FUTURES_STORE=store, SECRET_KEY="bench")
    executor = flask_executor.Executor(app)
    with app.app_context():
        executor.submit_stored("polled", noop).result(60)
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(processes) as pool:
        counts = pool.starmap(poll_for, [(store, seconds)] * processes, chunksize=1)
    executor.shutdown()
    return sum(counts) / seconds


def poll_for(store: str, seconds: float) -> int:
    app = Flask("stores")
    app.config.update(EXECUTOR_FUTURES_STORE=store, SECRET_KEY="bench")
    executor = flask_executor.Executor(app)
    polls, deadline = 0, time.monotonic() + seconds
    with app.app_context():
        if store == "memory":  # each process has its own dict: poll a key of its own
            executor.submit_stored("polled", noop).result(60)
        while time.monotonic() < deadline:
            for _ in range(100):
                if executor.futures.done("polled") is None:
                    raise RuntimeError("a poll missed its key")
            polls += 100
    return polls


def redis_server() -> tuple[str, Any] | None:
    """A redis-server on 127.0.0.1 for the run, if one is installed (and redis-py)."""
    try:
        import redis  # noqa: F401
    except ImportError:
        return None
    import shutil
    import socket

    binary = shutil.which("redis-server")
    if binary is None:
        return None
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    server = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return f"redis://127.0.0.1:{port}/0", server
        except OSError:
            time.sleep(0.05)
    server.kill()
    return None


def stores(smoke: bool) -> None:
    folder = tempfile.mkdtemp()
    urls = {"memory": "memory", "SQLite": f"sqlite:///{folder}/futures.db"}
    redis = redis_server()
    if redis is not None:
        urls["Redis"] = redis[0]
    n, seconds = (100, 0.2) if smoke else (4000, 2.0)
    print("\n| store | submit_stored µs | poll µs | poll of a 50 MB result µs | pop µs | "
          "polls/s, 4 processes |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- |")
    try:
        for name, url in urls.items():
            c = store_costs(url, n)
            rate = polls_per_second(url, 4, seconds)
            print(f"| {name} | {c['submit_stored']:.1f} | {c['poll']:.1f} | "
                  f"{c['big poll']:.1f} | {c['pop']:.1f} | {rate:,.0f} |", flush=True)  # fmt: skip
    finally:
        if redis is not None:
            redis[1].kill()
            redis[1].wait()


def gevent_waits(tasks: int, seconds: float) -> dict[str, float]:
    """Wall time for `tasks` concurrent waits of `seconds` each, ours and raw."""
    import gevent
    import gevent.pool

    app = Flask("waits")
    app.config.update(EXECUTOR_TYPE="gevent", EXECUTOR_FUTURES_MAX_LENGTH=None)
    executor = flask_executor.Executor(app)
    raw_pool = gevent.pool.Pool(None)
    with app.test_request_context("/"):
        start = time.perf_counter()
        futures = [executor.submit(gevent.sleep, seconds) for _ in range(tasks)]
        wait_futures(futures)
        ours = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(tasks):
            raw_pool.spawn(gevent.sleep, seconds)
        raw_pool.join()
        raw = time.perf_counter() - start
    executor.shutdown()
    return {"ours_s": ours, "raw_s": raw, "ratio": ours / raw}


# -- Flask-Executor 1.0, side by side (thread backend, in a request) ------------------

ONE_POINT_OH = """
import sys, json
sys.path.insert(0, {path!r})
sys.path.insert(1, {bench!r})
import flask_executor, bench
assert flask_executor.__version__ == "1.0.0", flask_executor.__file__
bench.flask_executor = flask_executor
print(json.dumps(bench.compare("thread", "request", {n}, {repeats})))
"""


def one_point_oh(n: int, repeats: int) -> dict[str, float]:
    """Run the thread/request comparison against Flask-Executor 1.0 in a subprocess."""
    cache = Path(tempfile.gettempdir()) / "flask-executor-1.0"
    if not (cache / "flask_executor").exists():
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target",
             str(cache), "flask-executor==1.0.0"],
            check=True,
        )  # fmt: skip
    script = ONE_POINT_OH.format(
        path=str(cache), bench=str(Path(__file__).parent), n=n, repeats=repeats
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)  # type: ignore[no-any-return]


# -- report --------------------------------------------------------------------------

TARGETS = {  # (submit latency, submit-to-done) ratios the performance issue asks for
    ("thread", "request"): (1.5, 2.0),
    ("thread", "app"): (1.3, 1.5),
    ("process", "request"): (1.1, 1.1),
    ("process", "app"): (1.1, 1.1),
    ("process", "none"): (1.1, 1.1),
    ("gevent", "request"): (1.5, 2.0),
}


PLACES = {"request": "a request", "app": "app context", "none": "no context"}


def row(label: str, r: dict[str, float], target: tuple[float, float] | None) -> str:
    goal = f"<= {target[0]}x / <= {target[1]}x" if target else "-"
    return (
        f"| {label} | {r['submit_ours_us']:.2f} / {r['submit_raw_us']:.2f} | "
        f"**{r['submit_ratio']:.2f}x** | {r['done_ours_us']:.2f} / {r['done_raw_us']:.2f} | "
        f"**{r['done_ratio']:.2f}x** | {goal} |"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny N, one repeat")
    parser.add_argument(
        "--with-1.0", dest="one", action="store_true", help="add Flask-Executor 1.0"
    )
    parser.add_argument("--only", help="backend to run: thread, process or gevent")
    args = parser.parse_args()
    scale = 0.01 if args.smoke else 1.0
    repeats = 1 if args.smoke else 7
    sizes = {"thread": 20_000, "process": 2_000, "gevent": 20_000}
    try:
        import gevent  # noqa: F401
    except ImportError:
        sizes.pop("gevent")
    if args.only:
        sizes = {args.only: sizes[args.only]}
    print(f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, {WORKERS} workers per pool")
    print("| backend, submitted from | submit µs ours / raw | ratio | submit-to-done µs "
          "ours / raw | ratio | target |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- |")
    results: dict[str, dict[str, float]] = {}
    for backend, size in sizes.items():
        for where in ("request", "app", "none"):
            n = max(20, int(size * scale))
            r = compare(backend, where, n, repeats)
            results[f"{backend}/{where}"] = r
            label = f"{backend}, {PLACES[where]}"
            print(row(label, r, TARGETS.get((backend, where))), flush=True)
    if args.one:
        r = one_point_oh(int(sizes["thread"] * scale), repeats)
        print(row("Flask-Executor 1.0: thread, a request", r, None), flush=True)
    calls = 1000 if args.smoke else 100_000
    print(f"\nPeak traced memory over {calls:,} submit_stored calls (default bound 50): "
          f"{stored_memory(calls):.2f} MiB")  # fmt: skip
    if not args.only:
        stores(args.smoke)
    if "gevent" in sizes:
        tasks = 100 if args.smoke else 10_000
        w = gevent_waits(tasks, 0.1)
        print(f"{tasks:,} concurrent 100 ms waits on gevent: ours {w['ours_s']:.3f} s, raw "
              f"{w['raw_s']:.3f} s ({w['ratio']:.2f}x)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
