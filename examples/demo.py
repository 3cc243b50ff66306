"""A runnable tour: a real local server whose views start background tasks and poll them.

    python examples/demo.py            # thread backend
    python examples/demo.py process    # any EXECUTOR_TYPE: thread, process, gevent

It serves the app on 127.0.0.1 (a free port), sends requests that each start a stored
task, polls the futures dict over HTTP until every task is done, prints what each task
saw, shuts everything down and exits 0 (1 if any task failed or saw the wrong request).
"""

from __future__ import annotations

import sys

EXECUTOR_TYPE = sys.argv[1] if len(sys.argv) > 1 else "thread"
if EXECUTOR_TYPE == "gevent":  # greenlet tasks need a gevent server: patch before all else
    from gevent import monkey

    monkey.patch_all()

import json
import logging
import threading
import time
import urllib.request
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from flask import Flask, g, jsonify, request
from werkzeug.serving import make_server

from flask_executor import Executor

executor = Executor()


def slow_square(n: int) -> dict[str, object]:
    """The background task: a little work, then report what it saw."""
    time.sleep(0.2)
    if EXECUTOR_TYPE == "process":  # no Flask contexts in another process
        return {"n": n, "square": n * n}
    return {"n": n, "square": n * n, "user": request.args.get("user"), "g": g.started_by}


def create_app(executor_type: str) -> Flask:
    app = Flask("demo")
    app.config["EXECUTOR_TYPE"] = executor_type
    app.config["EXECUTOR_MAX_WORKERS"] = 4
    executor.init_app(app)

    @app.route("/start/<int:n>")
    def start(n: int):  # type: ignore[no-untyped-def]
        g.started_by = request.args.get("user")
        executor.submit_stored(f"job-{n}", slow_square, n)
        return jsonify(started=f"job-{n}")

    @app.route("/status/<int:n>")
    def status(n: int):  # type: ignore[no-untyped-def]
        key = f"job-{n}"
        if not executor.futures.done(key):
            return jsonify(state=executor.futures._state(key))  # 1.0's by-key forwarding
        future = executor.futures.pop(key)
        if future is None:
            return jsonify(state="UNKNOWN"), 404
        return jsonify(state="FINISHED", result=future.result())

    return app


def get(base: str, path: str) -> dict[str, object]:
    with urllib.request.urlopen(base + path, timeout=10) as response:
        return json.loads(response.read())  # type: ignore[no-any-return]


def serve(app: Flask) -> tuple[str, Callable[[], object]]:
    """Start a real server on a free loopback port; return its URL and a stop function."""
    if EXECUTOR_TYPE == "gevent":
        from gevent.pywsgi import WSGIServer

        gserver = WSGIServer(("127.0.0.1", 0), app, log=None)
        gserver.start()
        return f"http://127.0.0.1:{gserver.server_port}", gserver.stop
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_port}", server.shutdown


def main() -> int:
    app = create_app(EXECUTOR_TYPE)
    base, stop = serve(app)
    print(f"serving on {base} with EXECUTOR_TYPE={EXECUTOR_TYPE!r}")
    users = ["ann", "bob", "cy", "dee", "eve", "fay"]
    try:
        for n, user in enumerate(users):
            print(f"GET /start/{n}?user={user} ->", get(base, f"/start/{n}?user={user}"))
        results: dict[int, dict[str, object]] = {}
        deadline = time.monotonic() + 30
        while len(results) < len(users) and time.monotonic() < deadline:
            for n in range(len(users)):
                if n not in results:
                    reply = get(base, f"/status/{n}")
                    if reply["state"] == "FINISHED":
                        results[n] = reply["result"]  # type: ignore[assignment]
                        print(f"GET /status/{n} -> {reply}")
            time.sleep(0.05)
    finally:
        stop()
        executor.shutdown(wait=True)
    ok = len(results) == len(users) and all(
        r["square"] == n * n and r.get("user", users[n]) == users[n] == r.get("g", users[n])
        for n, r in results.items()
    )
    print(f"{len(results)}/{len(users)} tasks finished, each saw its own request: {ok}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
