"""Tests for flask_executor, in the module's order: config, backends, contexts, futures,
the extension, 1.0 import paths; then gevent, real servers, reliability and databases."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures as cf
import contextlib
import contextvars
import faulthandler
import functools
import gc
import io
import json
import logging
import multiprocessing
import os
import pickle
import queue
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import (
    Flask,
    current_app,
    g,
    has_app_context,
    has_request_context,
    request,
    session,
    url_for,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

import flask_executor
from flask_executor import Backend, Executor, ExecutorJob, FutureCollection, ThreadBackend

HERE = Path(__file__).resolve().parent
# seconds any single wait in a test may take before it fails (a harness test sets it lower)
TIMEOUT = float(os.environ.get("TESTS_WAIT_SECONDS", "30"))

# -- helpers: module level, so process workers can import them ----------------------


def square(x: int) -> int:
    return x * x


def add(x: int, y: int = 0) -> int:
    return x + y


def fail(message: str) -> None:
    raise ValueError(message)


def worker_pid() -> int:
    return os.getpid()


def die() -> None:
    os._exit(3)


def busy_process_executor(make_executor, tmp_path):
    """A process executor of one worker, busy with a task that finishes once ``go`` exists."""
    app, executor = make_executor(EXECUTOR_TYPE="process", EXECUTOR_MAX_WORKERS=1)
    go, started = str(tmp_path / "go"), str(tmp_path / "started")
    with app.app_context():
        running = executor.submit(end_when_file_exists, go, started)
    wait_for(started)
    return app, executor, running, go


def wait_for(path: str, timeout: float = TIMEOUT) -> str:
    """Block (in a worker process) until a file exists: an event across processes."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(path)
        time.sleep(0.01)
    return path


class SlowToSend:
    """A process task's result whose sending waits for a file: its function has returned,
    but the web process has not got its outcome yet ("sending" appears meanwhile)."""

    def __init__(self, folder: str, value: int) -> None:
        self.folder, self.value = folder, value

    def __reduce__(self) -> tuple:
        Path(self.folder, "sending").touch()
        wait_for(os.path.join(self.folder, "go"))
        return (int, (self.value,))


def until_file_or_stopped(path: str) -> str:
    """Run until the file exists ("done") or the task is asked to stop ("stopped")."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        if flask_executor.stop_requested():
            return "stopped"
        if os.path.exists(path):
            return "done"
        time.sleep(0.005)
    raise TimeoutError(path)


def return_slow_to_send(folder: str, value: int) -> SlowToSend:
    return SlowToSend(folder, value)


def in_thread(fn):
    """``fn()`` run in a plain thread, outside any Flask context: its result or exception."""
    box: list = []

    def target() -> None:
        try:
            box.append(fn())
        except BaseException as exc:
            box.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join(TIMEOUT)
    return box[0]


def make_app(**config: object) -> Flask:
    app = Flask("test_app")
    app.secret_key = "test"
    app.config.update(config)

    @app.route("/")
    def index() -> str:
        return "index"

    return app


BACKENDS = ["thread", "process"]
CONTEXT_BACKENDS = ["thread", "gevent"]


STUCK: list[str] = []  # tests that left a task running for good


def end_run_on_stuck_threads() -> None:
    """Called as the interpreter exits, before it joins the pool threads: a stuck one would
    hang it (and CI) for good, so end the process here, failed, naming the tests."""
    print(f"\nending the run: tasks of {STUCK} never ended", file=sys.__stderr__, flush=True)
    os._exit(1)


@pytest.fixture
def executors(request):
    """Executors made by a test, shut down after it within TIMEOUT, or the test fails with
    every thread's stack (a task that never ends would otherwise hang the run silently)."""
    made: list[Executor] = []
    yield made
    for executor in made:
        app = executor.app
        if app is not None and app.config.get(executor.EXECUTOR_TYPE) == "gevent":
            executor.shutdown(wait=True, cancel_futures=True)  # the hub is this thread's
            continue
        closer = threading.Thread(
            target=executor.shutdown, kwargs={"wait": True, "cancel_futures": True}, daemon=True
        )
        closer.start()
        closer.join(TIMEOUT)
        if closer.is_alive():
            faulthandler.dump_traceback(sys.__stderr__)
            if not STUCK:  # runs before the join of the pool threads at exit
                threading._register_atexit(end_run_on_stuck_threads)  # type: ignore[attr-defined]
            STUCK.append(request.node.nodeid)
            pytest.fail(f"the executor did not shut down within {TIMEOUT} s: a task never ended")


@pytest.fixture
def make_executor(executors):
    def make(name: str = "", **config: object) -> tuple[Flask, Executor]:
        app = make_app(**config)
        executor = Executor(app, name=name)
        executors.append(executor)
        return app, executor

    return make


# -- 1. Configuration ---------------------------------------------------------------


class TestConfig:
    def test_defaults_are_set_on_app_config(self, make_executor):
        app, executor = make_executor()
        assert app.config["EXECUTOR_TYPE"] == "thread"
        assert app.config["EXECUTOR_MAX_WORKERS"] is None
        assert app.config["EXECUTOR_FUTURES_MAX_LENGTH"] == 50
        assert app.config["EXECUTOR_PROPAGATE_EXCEPTIONS"] is False
        assert app.config["EXECUTOR_PUSH_APP_CONTEXT"] is True
        assert app.extensions["executor"] is executor
        assert isinstance(executor, cf.Executor)

    def test_named_executor_reads_prefixed_keys(self, make_executor):
        app, executor = make_executor(
            name="custom", CUSTOM_EXECUTOR_MAX_WORKERS=2, EXECUTOR_MAX_WORKERS=7
        )
        assert app.extensions["customexecutor"] is executor
        assert executor.EXECUTOR_MAX_WORKERS == "CUSTOM_EXECUTOR_MAX_WORKERS"  # as in 1.0
        assert app.config[executor.EXECUTOR_TYPE] == "thread"
        state = app.extensions[executor._state_key]
        assert state.max_workers == 2
        assert state.pool._max_workers == 2

    def test_environment_is_used_when_config_lacks_the_key(self, make_executor, monkeypatch):
        monkeypatch.setenv("ENVY_EXECUTOR_TYPE", "process")
        monkeypatch.setenv("ENVY_EXECUTOR_MAX_WORKERS", "3")
        monkeypatch.setenv("ENVY_EXECUTOR_PROPAGATE_EXCEPTIONS", "true")
        app, executor = make_executor(name="envy")
        assert app.config["ENVY_EXECUTOR_MAX_WORKERS"] == 3
        assert app.config["ENVY_EXECUTOR_PROPAGATE_EXCEPTIONS"] is True
        with app.app_context():
            assert executor.submit(worker_pid).result(TIMEOUT) != os.getpid()

    def test_config_wins_over_environment(self, make_executor, monkeypatch):
        monkeypatch.setenv("EXECUTOR_MAX_WORKERS", "3")
        app, _ = make_executor(EXECUTOR_MAX_WORKERS="5")
        assert app.config["EXECUTOR_MAX_WORKERS"] == "5"  # what the user set stays
        assert app.extensions[flask_executor.__name__ + ":executor"].max_workers == 5

    @pytest.mark.parametrize(
        ("value", "expected"),
        [("5", 5), (" 5 ", 5), (4, 4), (None, None), ("none", None), ("", None)],
    )
    def test_worker_counts_are_coerced(self, make_executor, value, expected):
        app, executor = make_executor(EXECUTOR_MAX_WORKERS=value)
        assert app.extensions[executor._state_key].max_workers == expected

    @pytest.mark.parametrize("value", ["five", "2.5", 2.5, 0, -1, "-3", True])
    def test_bad_worker_count_names_key_and_value(self, value):
        with pytest.raises(ValueError, match=r"EXECUTOR_MAX_WORKERS must be .* got") as info:
            Executor(make_app(EXECUTOR_MAX_WORKERS=value))
        assert repr(value) in str(info.value)

    @pytest.mark.parametrize(
        ("value", "expected"),
        [("true", True), ("1", True), ("Yes", True), ("off", False), ("0", False), (0, False)],
    )
    def test_bool_strings_are_coerced(self, make_executor, value, expected):
        app, executor = make_executor(EXECUTOR_PROPAGATE_EXCEPTIONS=value)
        assert app.extensions[executor._state_key].propagate is expected

    def test_bad_bool_names_key_and_value(self):
        with pytest.raises(ValueError, match=r"EXECUTOR_PUSH_APP_CONTEXT must be a bool.*'maybe'"):
            Executor(make_app(EXECUTOR_PUSH_APP_CONTEXT="maybe"))

    def test_bad_futures_max_length(self):
        with pytest.raises(ValueError, match=r"EXECUTOR_FUTURES_MAX_LENGTH .* got 'lots'"):
            Executor(make_app(EXECUTOR_FUTURES_MAX_LENGTH="lots"))

    def test_unknown_type_lists_valid_names(self):
        with pytest.raises(
            ValueError, match=r"'fibre' is not a known.*'gevent', 'process', 'thread'"
        ):
            Executor(make_app(EXECUTOR_TYPE="fibre"))

    @pytest.mark.parametrize("name", ["bad-name", "with space", "dot.ted"])
    def test_bad_names(self, name):
        with pytest.raises(ValueError, match="letters, digits and underscores"):
            Executor(name=name)

    def test_with_statement_shuts_down(self):
        app = make_app()
        with Executor(app) as executor, app.app_context():
            future = executor.submit(square, 3)
        assert future.result(0) == 9
        with app.app_context(), pytest.raises(RuntimeError, match="after shutdown"):
            executor.submit(square, 3)


# -- 2. Contexts ---------------------------------------------------------------------


@pytest.fixture(params=CONTEXT_BACKENDS)
def context_backend(request):
    if request.param == "gevent":
        pytest.importorskip("gevent")
    return request.param


def seen() -> dict[str, object]:
    """What a task sees of Flask's contexts."""
    return {
        "app": current_app.name,
        "arg": request.args.get("q"),
        "session": session.get("user"),
        "g": g.get("value"),
        "url": url_for("index"),
    }


def run(future: cf.Future, timeout: float = TIMEOUT):
    """Result of a future, waiting cooperatively when the backend is gevent."""
    return future.result(timeout)


class TestContexts:
    def test_request_context(self, make_executor, context_backend):
        app, executor = make_executor(EXECUTOR_TYPE=context_backend)
        with app.test_request_context("/?q=one"):
            session["user"] = "ann"
            g.value = "before"
            future = executor.submit(seen)
            g.value = "after"  # not seen: g was copied at submit
            assert run(future) == {
                "app": "test_app",
                "arg": "one",
                "session": "ann",
                "g": "before",
                "url": "/",
            }

    def test_task_changes_to_g_stay_in_the_task(self, make_executor, context_backend):
        app, executor = make_executor(EXECUTOR_TYPE=context_backend)

        def change_g() -> object:
            g.value = "task"
            g.extra = 1
            return g.value

        with app.test_request_context("/"):
            g.value = "view"
            assert run(executor.submit(change_g)) == "task"
            assert g.value == "view" and "extra" not in g

    def test_app_context_only(self, make_executor, context_backend):
        app, executor = make_executor(EXECUTOR_TYPE=context_backend)
        with app.app_context():
            g.value = "cli"
            result = run(executor.submit(lambda: (current_app.name, g.value, bool(request))))
        assert result == ("test_app", "cli", False)

    def test_no_context_uses_the_only_app(self, make_executor, context_backend):
        _, executor = make_executor(EXECUTOR_TYPE=context_backend)
        task = lambda: (current_app.name, "value" in g)  # noqa: E731
        if context_backend == "gevent":  # a gevent pool belongs to its thread's hub
            result = run(executor.submit(task))
        else:
            result = in_thread(lambda: executor.submit(task).result(TIMEOUT))
        assert result == ("test_app", False)

    def test_teardown_runs_after_every_task(self, make_executor, context_backend):
        app, executor = make_executor(EXECUTOR_TYPE=context_backend)
        torn: list[object] = []
        app.teardown_appcontext(lambda exc: torn.append((g.get("value"), exc)))
        with app.app_context():
            g.value = 1
            run(executor.submit(square, 2))
            with pytest.raises(ValueError):
                run(executor.submit(fail, "x"))
        assert torn[0] == (1, None)
        assert torn[1][0] == 1 and isinstance(torn[1][1], ValueError)

    def test_teardown_runs_once_when_the_task_reenters_its_own_context(
        self, make_executor, context_backend
    ):
        from flask.globals import app_ctx

        app, executor = make_executor(EXECUTOR_TYPE=context_backend)
        torn: list[object] = []
        app.teardown_appcontext(lambda exc: torn.append(exc))

        def reenter() -> int:
            with app_ctx._get_current_object():  # as 1.0's copy_current_app_context did
                pass
            return len(torn)  # nothing torn down yet: the task is still running

        with app.app_context():
            assert run(executor.submit(reenter)) == 0
            assert torn == [None]  # the task's teardown, once (the test's own comes later)

    def test_teardown_once_per_task_when_awaited_through_asyncio(self, make_executor):
        import asyncio

        app, executor = make_executor()
        torn: list[object] = []
        app.teardown_appcontext(lambda exc: torn.append(exc))

        async def main() -> tuple[list[int], int]:
            with app.test_request_context("/?q=a"):
                futures = [asyncio.wrap_future(executor.submit(square, n)) for n in range(5)]
                results = list(await asyncio.gather(*futures))
                return results, len(torn)  # before the test's own context is torn down

        assert asyncio.run(asyncio.wait_for(main(), TIMEOUT)) == ([0, 1, 4, 9, 16], 5)

    def test_task_leaves_the_request_and_its_files_to_the_view(
        self, make_executor, context_backend
    ):
        app, executor = make_executor(EXECUTOR_TYPE=context_backend)
        events: list[str] = []
        app.teardown_request(lambda exc: events.append("teardown_request"))
        app.teardown_appcontext(lambda exc: events.append("teardown_appcontext"))

        def read_upload() -> tuple[bytes, str, str]:
            upload = request.files["f"]
            content = upload.read()
            upload.seek(0)
            return content, request.args["q"], url_for("upload", _external=False)

        @app.post("/upload")
        def upload() -> dict[str, object]:
            seen = run(executor.submit(read_upload))
            events.append("view resumes")
            return {
                "seen": [seen[0].decode(), seen[1], seen[2]],
                "closed": request.files["f"].closed,
                "again": request.files["f"].read().decode(),
            }

        reply = app.test_client().post(
            "/upload?q=up", data={"f": (io.BytesIO(b"file body"), "f.txt")}
        )
        assert reply.json == {
            "seen": ["file body", "up", "/upload"],
            "closed": False,
            "again": "file body",
        }
        assert events == [
            "teardown_appcontext",  # the task's, once
            "view resumes",
            "teardown_request",  # the view's, once
            "teardown_appcontext",
        ]

    def test_signals_fire_once_per_task_push_and_pop(self, make_executor, context_backend):
        from flask import appcontext_popped, appcontext_pushed

        app, executor = make_executor(EXECUTOR_TYPE=context_backend)
        heard: list[str] = []
        with (
            appcontext_pushed.connected_to(lambda a: heard.append("pushed"), app),
            appcontext_popped.connected_to(lambda a: heard.append("popped"), app),
        ):
            futures = [executor.submit(square, n) for n in range(3)]  # no context: app's own
            assert [run(f) for f in futures] == [0, 1, 4]
        assert heard == ["pushed", "popped"] * 3

    def test_app_context_signals_fire_for_tasks(self, make_executor, context_backend):
        from flask import appcontext_popped, appcontext_pushed, appcontext_tearing_down

        app, executor = make_executor(EXECUTOR_TYPE=context_backend)
        heard: list[tuple[str, object]] = []
        with app.app_context():
            g.value = "signal"
            run(executor.submit(square, 1))  # nobody listening to pushed/popped: lean path
            with (
                appcontext_pushed.connected_to(lambda a: heard.append(("pushed", g.value)), app),
                appcontext_popped.connected_to(lambda a: heard.append(("popped", a.name)), app),
                appcontext_tearing_down.connected_to(
                    lambda a, exc: heard.append(("down", exc)), app
                ),
            ):
                run(executor.submit(square, 2))
        assert heard == [("pushed", "signal"), ("down", None), ("popped", "test_app")]

    def test_context_variables_of_the_submitter_are_visible(self, make_executor, context_backend):
        app, executor = make_executor(EXECUTOR_TYPE=context_backend)
        span = contextvars.ContextVar("span")
        with app.app_context():
            token = span.set("trace-7")
            try:
                assert run(executor.submit(span.get)) == "trace-7"
            finally:
                span.reset(token)

    def test_map_with_overlapping_tasks_in_a_request(self, make_executor):
        app, executor = make_executor(EXECUTOR_MAX_WORKERS=4)
        barrier = threading.Barrier(4, timeout=TIMEOUT)

        def overlap(n: int) -> tuple[int, str]:
            barrier.wait()  # all four run at once
            return n, request.args["q"]

        with app.test_request_context("/?q=map"):
            results = list(executor.map(overlap, range(4), timeout=TIMEOUT))
        assert results == [(n, "map") for n in range(4)]

    def test_callbacks_run_in_the_same_contexts(self, make_executor, context_backend):
        app, executor = make_executor(EXECUTOR_TYPE=context_backend)
        seen_by: dict[str, object] = {}
        done = threading.Event()
        executor.add_default_done_callback(lambda f: seen_by.update(default=seen()))

        def on_done(future: cf.Future) -> None:
            seen_by["added"] = seen()
            done.set()

        with app.test_request_context("/?q=cb"):
            session["user"] = "bob"
            g.value = "v"
            future = executor.submit(square, 2)
            future.add_done_callback(on_done)
            run(future)
        assert done.wait(TIMEOUT)
        expected = {"app": "test_app", "arg": "cb", "session": "bob", "g": "v", "url": "/"}
        assert seen_by == {"default": expected, "added": expected}

    def test_callback_added_after_done_gets_contexts(self, make_executor):
        app, executor = make_executor()
        with app.test_request_context("/?q=late"):
            future = executor.submit(square, 2)
            future.result(TIMEOUT)
            box: list = []
            future.add_done_callback(lambda f: box.append(request.args["q"]))
        assert box == ["late"]

    def test_process_callbacks_run_in_contexts_of_the_web_process(self, make_executor):
        app, executor = make_executor(EXECUTOR_TYPE="process", EXECUTOR_MAX_WORKERS=1)
        box: list = []
        done = threading.Event()
        with app.test_request_context("/?q=proc"):
            future = executor.submit(square, 3)
            future.add_done_callback(
                lambda f: (box.append((request.args["q"], f.result())), done.set())
            )
        assert done.wait(TIMEOUT)
        assert box == [("proc", 9)]

    def test_push_app_context_false(self, make_executor):
        app, executor = make_executor(EXECUTOR_PUSH_APP_CONTEXT="false")
        torn: list[object] = []
        app.teardown_appcontext(lambda exc: torn.append(exc))
        with app.test_request_context("/?q=raw"):
            g.value = "shared"
            same_g, arg = executor.submit(
                lambda: (g._get_current_object(), request.args["q"])
            ).result(TIMEOUT)
            assert same_g is g._get_current_object() and arg == "raw"
        assert torn == [None]  # only the request's own teardown, none for the task
        outside = in_thread(lambda: executor.submit(lambda: bool(current_app)).result(TIMEOUT))
        assert outside is False  # no context at all outside one

    def test_concurrent_requests_never_see_each_other(self, make_executor):
        app, executor = make_executor(EXECUTOR_MAX_WORKERS=8)
        release = threading.Event()

        @app.route("/task")
        def task() -> dict:
            g.value = request.args["q"]
            session["user"] = request.args["q"]

            def report() -> dict:
                release.wait(TIMEOUT)
                return seen()

            executor.submit_stored(request.args["q"], report)
            return {}

        client = app.test_client()
        for n in range(20):
            client.get(f"/task?q={n}")
        release.set()
        with app.app_context():
            for n in range(20):
                got = executor.futures.pop(str(n)).result(TIMEOUT)
                assert got["arg"] == got["g"] == got["session"] == str(n)


# -- 3. Backends ---------------------------------------------------------------------


class NamedThreadBackend(ThreadBackend):
    """The README's custom backend: threads named from a config key."""

    def create_pool(self, max_workers, config):
        prefix = config.get("EXECUTOR_THREAD_NAME", "background")
        return cf.ThreadPoolExecutor(max_workers, thread_name_prefix=prefix)


class TestBackends:
    @pytest.mark.parametrize("backend", BACKENDS)
    def test_submit_and_map(self, make_executor, backend):
        app, executor = make_executor(EXECUTOR_TYPE=backend, EXECUTOR_MAX_WORKERS=2)
        with app.app_context():
            future = executor.submit(add, 2, y=3)
            assert isinstance(future, cf.Future)
            assert future.result(TIMEOUT) == 5
            assert list(executor.map(square, range(6), timeout=TIMEOUT)) == [0, 1, 4, 9, 16, 25]
            chunked = executor.map(add, range(7), range(7), chunksize=3, timeout=TIMEOUT)
            assert list(chunked) == [0, 2, 4, 6, 8, 10, 12]
            futures = [executor.submit(square, n) for n in range(5)]
            done, _ = cf.wait(futures, timeout=TIMEOUT)
            assert len(done) == 5
            assert sorted(f.result() for f in cf.as_completed(futures, TIMEOUT)) == [0, 1, 4, 9, 16]

    @pytest.mark.parametrize("chunksize", [1, 2])
    @pytest.mark.parametrize("how", ["closed", "timeout"])
    def test_map_left_early_cancels_only_what_has_not_started(self, make_executor, how,
                                                              chunksize):  # fmt: skip
        """As concurrent.futures' map: left early once read from (closed, or past its
        timeout) it cancels the calls not started; those running end, not asked to stop."""
        app, executor = make_executor(EXECUTOR_MAX_WORKERS=1)
        running, release = threading.Event(), threading.Event()
        ran: list[int] = []
        asked: list[bool] = []

        def call(n: int) -> int:
            ran.append(n)
            if n == chunksize:  # the second chunk's first call: it runs until released
                running.set()
                release.wait(TIMEOUT)
                asked.append(flask_executor.stop_requested())
            return n

        with app.app_context():
            results = executor.map(call, range(6), chunksize=chunksize,
                                   timeout=0.2 if how == "timeout" else None)  # fmt: skip
            assert running.wait(TIMEOUT)
            if how == "timeout":
                with pytest.raises(cf.TimeoutError):
                    list(results)
            else:
                assert next(results) == 0
                results.close()
            release.set()
            executor.shutdown(wait=True)
        assert asked == [False]  # the running call was not stopped
        assert sorted(ran) == list(range(2 * chunksize))  # the later ones never ran

    @pytest.mark.parametrize("backend", BACKENDS)
    def test_exception_is_returned_through_the_future(self, make_executor, backend):
        app, executor = make_executor(EXECUTOR_TYPE=backend, EXECUTOR_MAX_WORKERS=1)
        with app.app_context():
            with pytest.raises(ValueError, match="boom"):
                executor.submit(fail, "boom").result(TIMEOUT)
            assert isinstance(executor.submit(fail, "x").exception(TIMEOUT), ValueError)
            assert executor.submit(square, 4).result(TIMEOUT) == 16  # the pool goes on

    def test_process_tasks_run_in_another_process(self, make_executor):
        app, executor = make_executor(EXECUTOR_TYPE="process", EXECUTOR_MAX_WORKERS=1)
        with app.app_context():
            assert executor.submit(worker_pid).result(TIMEOUT) != os.getpid()

    def test_the_process_pool_queues_futures_of_its_own(self, make_executor):
        """Its submit does CPython's with a future of ours: no Python-level Condition made
        for each task, no class changed, work ids in a SimpleQueue. This fails on a Python
        whose ProcessPoolExecutor.submit changed; CPython's own then runs (a third slower)."""
        assert flask_executor._KNOWN_PROCESS_POOL, "CPython's ProcessPoolExecutor changed"
        app, executor = make_executor(EXECUTOR_TYPE="process", EXECUTOR_MAX_WORKERS=1)
        with app.app_context():
            future = executor.submit(square, 3)
            assert type(future) is flask_executor._ProcessFuture  # (no class change)
            assert not isinstance(future._condition, threading.Condition)
            assert future.result(TIMEOUT) == 9
            assert type(executor._state().pool._work_ids) is queue.SimpleQueue  # (a put in C)

    @pytest.mark.parametrize("own", [True, False])
    def test_process_submits_either_way_run_fail_and_refuse_alike(self, make_executor,
                                                                  monkeypatch, own):  # fmt: skip
        monkeypatch.setattr(flask_executor, "_KNOWN_PROCESS_POOL", own)
        app, executor = make_executor(EXECUTOR_TYPE="process", EXECUTOR_MAX_WORKERS=1,
                                      EXECUTOR_TIMEOUT="60")  # fmt: skip
        with app.app_context():
            futures = [executor.submit(square, n) for n in range(20)]
            assert [f.result(TIMEOUT) for f in futures] == [n * n for n in range(20)]
            failed = executor.submit(fail, "boom")
            assert str(failed.exception(TIMEOUT)) == "boom"
            pool = executor._state().pool
            pool.shutdown(wait=True)
            with pytest.raises(RuntimeError, match="cannot schedule new futures after shutdown"):
                pool.submit(square, 2)

    def test_custom_backend_registered_by_name(self, make_executor, monkeypatch):
        monkeypatch.setitem(flask_executor.BACKENDS, "named", NamedThreadBackend())
        app, executor = make_executor(EXECUTOR_TYPE="named", EXECUTOR_THREAD_NAME="mail")
        with app.test_request_context("/?who=me"):
            future = executor.submit(lambda: (threading.current_thread().name, request.args["who"]))
            name, who = future.result(TIMEOUT)
        assert name.startswith("mail") and who == "me"

    def test_register_backend_function(self, make_executor, monkeypatch):
        monkeypatch.setattr(flask_executor, "BACKENDS", dict(flask_executor.BACKENDS))
        flask_executor.register_backend("Named", NamedThreadBackend())
        app, executor = make_executor(EXECUTOR_TYPE="named")
        with app.app_context():
            assert executor.submit(lambda: threading.current_thread().name).result(TIMEOUT)
        with pytest.raises(TypeError, match="needs a Backend instance"):
            flask_executor.register_backend("bad", object())  # type: ignore[arg-type]

    def test_custom_backend_passed_as_object(self, make_executor):
        app, executor = make_executor(EXECUTOR_TYPE=NamedThreadBackend())
        with app.app_context():
            name = executor.submit(lambda: threading.current_thread().name).result(TIMEOUT)
        assert name.startswith("background")

    def test_backend_is_abstract(self):
        with pytest.raises(TypeError):
            Backend()  # type: ignore[abstract]


class TestThreadPool:
    """The thread backend's own pool (its futures are made at submit): what CPython's
    ThreadPoolExecutor does, it does."""

    def test_threads_start_as_needed_and_are_reused(self, make_executor):
        app, executor = make_executor(EXECUTOR_MAX_WORKERS=3)
        pool = executor._self
        assert isinstance(pool, cf.ThreadPoolExecutor) and pool._max_workers == 3
        with app.app_context():
            for n in range(20):  # one at a time: the one idle thread takes each
                assert executor.submit(square, n).result(TIMEOUT) == n * n
            assert len(pool._threads) == 1
            release, started = threading.Event(), threading.Semaphore(0)

            def hold() -> str:
                started.release()
                release.wait(TIMEOUT)
                return threading.current_thread().name

            held = [executor.submit(hold) for _ in range(5)]
            for _ in range(3):
                assert started.acquire(timeout=TIMEOUT)
            assert not started.acquire(timeout=0.05)  # 3 threads at most, all busy
            release.set()
            names = {f.result(TIMEOUT) for f in held}
        assert len(pool._threads) == 3
        assert names == {f"{app.name}-executor_{n}" for n in range(3)}

    @pytest.mark.parametrize("backend", ["thread", "gevent"])
    def test_a_wait_that_times_out_says_whether_the_task_started(self, make_executor, backend):
        app, executor = make_executor(EXECUTOR_TYPE=backend, EXECUTOR_MAX_WORKERS=1)
        if backend == "gevent":
            gevent_event = pytest.importorskip("gevent.event")
            release = gevent_event.Event()
        else:
            release = threading.Event()
        with app.app_context():
            first = executor.submit(release.wait, TIMEOUT)
            queued = executor.submit(int, 3)
            deadline = time.monotonic() + TIMEOUT
            while not first.running() and time.monotonic() < deadline:
                with contextlib.suppress(cf.TimeoutError):  # (a gevent hub runs meanwhile)
                    first.exception(0.001)
            with pytest.raises(cf.TimeoutError, match=r"within 0\.01 s \(it goes on running\)"):
                first.result(0.01)
            with pytest.raises(cf.TimeoutError, match=r"within 0\.01 s \(it has not started"):
                queued.result(0.01)
            release.set()
            assert queued.result(TIMEOUT) == 3

    def test_waiters_time_out_wake_and_leave_no_cycle(self, make_executor):
        """result() with a timeout, two threads waiting at once, then the outcome: every
        waiter wakes, and the future's lock is freed without the cyclic GC."""
        app, executor = make_executor(EXECUTOR_MAX_WORKERS=1)
        release = threading.Event()
        with app.app_context():
            future = executor.submit(release.wait, TIMEOUT)
            with pytest.raises(cf.TimeoutError, match=r"did not finish within 0\.01 s"):
                future.result(0.01)
            assert future._condition._sleepers == []  # the timed-out waiter left nothing
            got: list[object] = []
            readers = [threading.Thread(target=lambda f=future: got.append(f.result(TIMEOUT)))
                       for _ in range(2)]  # fmt: skip
            for reader in readers:
                reader.start()
            deadline = time.monotonic() + TIMEOUT
            while len(future._condition._sleepers or ()) < 2 and time.monotonic() < deadline:
                time.sleep(0.001)
            release.set()
            for reader in readers:
                reader.join(TIMEOUT)
            assert got == [True, True]
        lock = weakref.ref(future._condition)
        gc.disable()
        try:
            del future
            assert lock() is None
        finally:
            gc.enable()

    def test_cancel_futures_cancels_only_the_queued(self, make_executor):
        app, executor = make_executor(EXECUTOR_MAX_WORKERS=1)
        release, started = threading.Event(), threading.Event()

        def hold() -> bool:
            started.set()
            return release.wait(TIMEOUT)

        with app.app_context():
            running = executor.submit(hold)
            assert started.wait(TIMEOUT)
            queued = [executor.submit(square, n) for n in range(5)]

            def release_once_cancelled() -> None:
                wait_until(lambda: all(f.cancelled() for f in queued))
                release.set()

            threading.Thread(target=release_once_cancelled).start()
            executor.shutdown(wait=True, cancel_futures=True)
        assert running.result(0) is True
        assert all(f.cancelled() for f in queued)

    @pytest.mark.parametrize("known", [True, False])  # (CPython's own submit, or ours)
    def test_process_cancel_futures_lets_running_tasks_end(self, make_executor, tmp_path,
                                                           monkeypatch, known):  # fmt: skip
        """As CPython's process pool: shutdown(cancel_futures=True) cancels the calls not
        started, and a task already running ends with its own outcome, not stopped."""
        monkeypatch.setattr(flask_executor, "_KNOWN_PROCESS_POOL", known)
        app, executor, running, go = busy_process_executor(make_executor, tmp_path)
        with app.app_context():
            queued = [executor.submit(square, n) for n in range(5)]
            threading.Timer(0.3, Path(go).touch).start()
            executor.shutdown(wait=True, cancel_futures=True)
        assert running.result(0) == "finished"
        # (two calls may already sit in the pool's call queue, max_workers + 1 in all:
        # running, to CPython's pool)
        assert all(f.cancelled() or f.result(0) == n * n for n, f in enumerate(queued))
        assert sum(f.cancelled() for f in queued) >= 3

    def test_process_cancel_futures_then_a_dead_worker_leaves_every_future_done(
        self, make_executor, tmp_path, monkeypatch
    ):
        """Calls cancelled by shutdown(cancel_futures=True), then a worker dies: the pool
        breaks, and its manager thread fails the rest without tripping on them."""
        crashed: list[BaseException] = []
        monkeypatch.setattr(threading, "excepthook", lambda args: crashed.append(args.exc_value))
        app, executor, running, _ = busy_process_executor(make_executor, tmp_path)
        with app.app_context():
            queued = [executor.submit(square, n) for n in range(6)]
            wait_until(queued[1].running)  # the pool's call queue is full: the rest wait
            worker = next(iter(executor._state().pool._processes))
            executor.shutdown(wait=False, cancel_futures=True)
            os.kill(worker, signal.SIGKILL)
            _, pending = cf.wait([running, *queued], timeout=TIMEOUT)
        assert not pending and not crashed
        assert isinstance(running.exception(0), cf.process.BrokenProcessPool)

    def test_process_cancel_futures_callbacks_may_submit(self, make_executor, tmp_path):
        """The cancelled calls' callbacks run outside the pool's lock: one that submits is
        refused (the pool is shutting down), as on the thread backend."""
        app, executor, running, go = busy_process_executor(make_executor, tmp_path)
        refused: list[str] = []

        def follow_up(_: cf.Future) -> None:
            try:
                executor.submit(square, 2)
            except RuntimeError as exc:
                refused.append(str(exc))

        with app.app_context():
            queued = [executor.submit(square, n) for n in range(4)]
            for future in queued:
                future.add_done_callback(follow_up)
            threading.Timer(0.3, Path(go).touch).start()
            stopper = threading.Thread(target=executor.shutdown, args=(True,),
                                       kwargs={"cancel_futures": True})  # fmt: skip
            stopper.start()
            stopper.join(TIMEOUT)
            assert not stopper.is_alive(), "shutdown(cancel_futures=True) deadlocked"
        assert running.result(0) == "finished"
        assert refused and all("after shutdown" in text for text in refused)

    def test_a_pool_dropped_without_shutdown_ends_its_threads(self):
        app = make_app()
        pool = ThreadBackend().create_pool(2, flask_executor.Config(app, ""))
        assert pool.submit(square, 3).result(TIMEOUT) == 9
        (thread,) = pool._threads
        del pool
        gc.collect()
        thread.join(TIMEOUT)
        assert not thread.is_alive()

    def test_exit_runs_every_queued_task_then_ends(self, tmp_path):
        """As ThreadPoolExecutor: at interpreter exit, with no shutdown(), queued tasks run."""
        log = tmp_path / "ran"
        out = run_script(
            f"""
            import time, flask, flask_executor
            app = flask.Flask("exiting")
            app.config["EXECUTOR_MAX_WORKERS"] = 2
            executor = flask_executor.Executor(app)

            def task(n):
                time.sleep(0.001)
                with open({str(log)!r}, "a") as f:
                    f.write(f"{{n}}\\n")

            with app.app_context():
                for n in range(300):
                    executor.submit(task, n)
            print("leaving")
            """
        )
        assert out.returncode == 0, out.stderr
        assert sorted(int(n) for n in log.read_text().split()) == list(range(300))

    def test_a_forked_child_exits_at_once_beside_its_parents_busy_pool(self):
        """The child of a fork exits without waiting for its parent's pool threads (which it
        does not have) or the tasks in the queue it inherited; the parent's pool runs on."""
        out = run_script(
            """
            import os, threading, flask, flask_executor
            app = flask.Flask("forking")
            app.config["EXECUTOR_MAX_WORKERS"] = 1
            executor = flask_executor.Executor(app)
            release = threading.Event()
            with app.app_context():
                running = executor.submit(release.wait, 30)
                queued = executor.submit(int, 7)
                pid = os.fork()
                if pid == 0:
                    raise SystemExit(3 if flask_executor._POOLS else 0)  # atexit runs
                _, status = os.waitpid(pid, 0)
                release.set()
                print(os.waitstatus_to_exitcode(status), running.result(30), queued.result(30))
            """,
            timeout=60,
        )
        assert out.stdout.split() == ["0", "True", "7"], out.stderr

    def test_a_timeout_at_or_below_zero_does_not_wait(self, make_executor):
        """As Future.result: timeout=0 or less (a deadline already past) raises TimeoutError
        at once, and map() whose caller reads slowly too."""
        app, executor = make_executor(EXECUTOR_MAX_WORKERS=1)
        release = threading.Event()
        with app.app_context():
            future = executor.submit(release.wait, TIMEOUT)
            for timeout in (0, -0.5, -1):
                started = time.monotonic()
                with pytest.raises(cf.TimeoutError):
                    future.result(timeout)
                with pytest.raises(cf.TimeoutError):
                    future.exception(timeout)
                assert time.monotonic() - started < TIMEOUT / 2
            release.set()
            results = executor.map(release.wait, [TIMEOUT, TIMEOUT], timeout=0.2)
            time.sleep(0.3)  # the caller reads late: map's deadline is past
            assert list(results) == [True, True]  # done by then: no wait at all
            release.clear()
            results = executor.map(release.wait, [TIMEOUT], timeout=0.05)
            time.sleep(0.1)
            with pytest.raises(cf.TimeoutError):
                list(results)
            release.set()

    def test_max_workers_below_one_is_refused(self):
        config = flask_executor.Config(make_app(), "")
        for bad in (0, -1):
            with pytest.raises(ValueError, match="max_workers must be greater than 0"):
                ThreadBackend().create_pool(bad, config)

    def test_pools_of_apps_dropped_in_a_cycle_end_their_threads(self):
        """An app, its extension state and its pool hold each other: the cyclic GC frees
        them, and the pool's threads must end then too (an app factory per test)."""
        before = {t for t in threading.enumerate() if "-executor_" in t.name}
        for n in range(5):
            app = make_app()
            app.name = f"dropped{n}"
            executor = Executor(app)
            with app.app_context():
                assert executor.submit(square, 2).result(TIMEOUT) == 4
            del app, executor
        gc.collect()
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            left = {t for t in threading.enumerate() if "-executor_" in t.name} - before
            if not left:
                break
            time.sleep(0.01)
        assert not left

    def test_a_done_callback_that_submits_does_not_hang_shutdown(self, make_executor):
        """shutdown(cancel_futures=True) cancels what is queued; the cancelled futures'
        callbacks may submit (a retry): they get an error, not a deadlock."""
        app, executor = make_executor(EXECUTOR_MAX_WORKERS=1)
        refused: list[str] = []

        def retry(future: cf.Future) -> None:
            try:
                executor.submit(int)
            except RuntimeError as exc:
                refused.append(str(exc))

        executor.add_default_done_callback(retry)
        release, started = threading.Event(), threading.Event()
        with app.app_context():
            executor.submit(lambda: started.set() or release.wait(TIMEOUT))
            assert started.wait(TIMEOUT)
            queued = executor.submit(int)
            stopper = threading.Thread(target=executor.shutdown, args=(True,),
                                       kwargs={"cancel_futures": True})  # fmt: skip
            stopper.start()
            deadline = time.monotonic() + TIMEOUT
            while not queued.cancelled() and time.monotonic() < deadline:
                time.sleep(0.001)
            release.set()
            stopper.join(TIMEOUT)
        assert not stopper.is_alive() and queued.cancelled()
        assert refused and all("after shutdown" in why for why in refused)

    def test_a_task_that_completes_its_own_future_leaves_the_pool_working(self, make_executor):
        app, executor = make_executor(EXECUTOR_MAX_WORKERS=1)
        box: list[cf.Future] = []
        ready = threading.Event()

        def meddle() -> int:
            ready.wait(TIMEOUT)
            box[0].set_result("set by the task")
            return 1

        with app.app_context():
            box.append(executor.submit(meddle))
            ready.set()
            assert box[0].result(TIMEOUT) == "set by the task"
            assert executor.submit(square, 5).result(TIMEOUT) == 25  # the thread lives on

    def test_a_thread_that_cannot_start_leaves_nothing_queued(self, make_executor, monkeypatch):
        app, executor = make_executor(EXECUTOR_MAX_WORKERS=2)
        ran: list[int] = []
        with app.app_context():
            assert executor.submit(ran.append, 1).result(TIMEOUT) is None
            release = threading.Event()
            busy = executor.submit(release.wait, TIMEOUT)  # the one thread is busy

            def refuse(thread: threading.Thread) -> None:
                raise RuntimeError("can't start new thread")

            monkeypatch.setattr(threading.Thread, "start", refuse)
            with pytest.raises(RuntimeError, match="can't start new thread"):
                executor.submit(ran.append, 2)  # refused: it must not run later
            monkeypatch.undo()
            release.set()
            busy.result(TIMEOUT)
            assert executor.submit(ran.append, 3).result(TIMEOUT) is None
        executor.shutdown(wait=True)
        assert ran == [1, 3]

    @pytest.mark.parametrize("how", ["from a task", "from an atexit handler"])
    def test_submit_during_interpreter_exit_is_refused(self, how):
        """As ThreadPoolExecutor: once the interpreter exits, submit raises (a task it took
        then would never run); what was queued before still runs."""
        out = run_script(
            """
            import atexit, sys, time, flask, flask_executor
            how = sys.argv[1]
            def late():
                try:
                    executor.submit(print, "late task ran").result(10)
                except RuntimeError as exc:
                    print("refused:", exc, flush=True)
            if how == "from an atexit handler":
                atexit.register(late)  # registered first: runs after the executor's own
            app = flask.Flask("exiting")
            app.config["EXECUTOR_MAX_WORKERS"] = 2
            executor = flask_executor.Executor(app)
            def first():
                time.sleep(0.3)  # still running when the script ends
                late()
            with app.app_context():
                executor.submit(int).result(10)
                if how == "from a task":
                    executor.submit(first)
            print("leaving", flush=True)
            """.replace("sys.argv[1]", repr(how)),
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        assert "refused: cannot schedule new futures after interpreter shutdown" in out.stdout
        assert "late task ran" not in out.stdout


# -- 3b. The gevent backend ----------------------------------------------------------


def start_script(script: str) -> subprocess.Popen:
    """Start a Python script in another process (its stdout a pipe, read line by line)."""
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)], cwd=HERE,
                            env={**os.environ, "PYTHONPATH": str(HERE)},
                            stdout=subprocess.PIPE, text=True)  # fmt: skip


def run_script(script: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    """Run a Python script in a fresh interpreter (monkey-patching stays in there)."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        env={**os.environ, "PYTHONPATH": str(HERE), **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=HERE,
    )


def sleep_then_current(seconds: float) -> object:
    """Sleep cooperatively, then say which greenlet ran the task."""
    import gevent

    gevent.sleep(seconds)
    return gevent.getcurrent()


class TestGevent:
    @pytest.fixture(autouse=True)
    def _gevent(self):
        pytest.importorskip("gevent")

    def test_gevent_future_lock(self):
        """A gevent future's lock is entered in C (an RLock subclass); every reader still
        works: a plain thread blocked in result(), cf.wait and cf.as_completed."""
        import _thread

        future = flask_executor._GeventFuture()
        assert isinstance(future._condition, _thread.RLock), "fell back to threading.Condition"
        future._hub = object()  # not this thread's hub: result() blocks the thread
        got: list[object] = []
        reader = threading.Thread(target=lambda: got.append(future.result(TIMEOUT)))
        reader.start()
        deadline = time.monotonic() + TIMEOUT
        while future._condition._sleepers is None and time.monotonic() < deadline:
            time.sleep(0.001)  # until the reader waits on the condition
        assert future.set_running_or_notify_cancel()
        future.set_result(7)
        reader.join(TIMEOUT)
        assert got == [7]
        assert cf.wait([future], timeout=TIMEOUT).done == {future}
        assert list(cf.as_completed([future], timeout=TIMEOUT)) == [future]

    @pytest.mark.parametrize("patched", [False, True], ids=["plain", "patched"])
    def test_cancel_under_a_busy_store_completes_a_gevent_future_once(self, patched):
        """cancel() stores the cancel while holding the future's lock; the store is busy
        (SQLite locked by another program), and its wait must not let the task's greenlet
        into that lock: one completion, one run of the done-callbacks."""
        out = run_script(
            f"""
            import os, subprocess, sys, tempfile
            if {patched}:
                from gevent import monkey; monkey.patch_all()
            import gevent
            from flask import Flask
            from flask_executor import Executor, stop_requested
            from test_flask_executor import HOLD_LOCK

            db = os.path.join(tempfile.mkdtemp(), "s.db")
            app = Flask("once")
            app.secret_key = "k"
            app.config.update(EXECUTOR_TYPE="gevent", EXECUTOR_FUTURES_STORE=f"sqlite:///{{db}}")
            executor = Executor(app)
            calls = []
            executor.add_default_done_callback(lambda f: calls.append(f._state))

            def task():
                while not stop_requested():
                    gevent.sleep(0.002)

            with app.app_context():
                future = executor.submit_stored("k", task)
                while not future.running():
                    gevent.sleep(0.005)
                holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, db, "0.4",
                                          "IMMEDIATE"], stdout=subprocess.PIPE, text=True)
                assert holder.stdout.readline().strip() == "locked"
                assert future.cancel() is True
                holder.wait(30)
                gevent.sleep(1)
                print(future._state, future._exception, calls)
            """
        )
        assert out.stdout.strip() == "CANCELLED_AND_NOTIFIED None ['CANCELLED_AND_NOTIFIED']", (
            out.stdout + out.stderr
        )

    def test_a_gevent_future_a_thread_waited_on_needs_no_gc(self):
        import _thread

        future = flask_executor._GeventFuture()
        future._hub = object()  # another thread's hub: result() blocks this thread
        box = [future]

        def complete() -> None:
            waited = box.pop()
            deadline = time.monotonic() + TIMEOUT
            while waited._condition._sleepers is None and time.monotonic() < deadline:
                time.sleep(0.001)  # until result() waits on the condition
            waited.set_running_or_notify_cancel()
            waited.set_result(1)

        completer = threading.Thread(target=complete)
        completer.start()
        assert future.result(TIMEOUT) == 1
        completer.join(TIMEOUT)  # (its frame, which held the future, is gone)
        lock = weakref.ref(future._condition)
        assert isinstance(lock(), _thread.RLock)
        gc.disable()
        try:
            del future
            assert lock() is None  # the lock and its Condition did not hold each other
        finally:
            gc.enable()

    def test_import_does_not_import_gevent(self):
        out = run_script(
            """
            import sys, flask_executor
            assert not any(m.split(".")[0] == "gevent" for m in sys.modules), "gevent imported"
            print("ok")
            """
        )
        assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr

    def test_missing_gevent_says_which_extra(self, monkeypatch):
        monkeypatch.setitem(sys.modules, "gevent", None)
        monkeypatch.setitem(sys.modules, "gevent.pool", None)
        with pytest.raises(ImportError, match=r"needs gevent: pip install gevent"):
            Executor(make_app(EXECUTOR_TYPE="gevent"))

    def test_submit_never_blocks_and_waiting_tasks_run_in_order(self, make_executor):
        import gevent
        import gevent.event

        app, executor = make_executor(EXECUTOR_TYPE="gevent", EXECUTOR_MAX_WORKERS=2)
        release = gevent.event.Event()
        order: list[int] = []

        def task(n: int) -> int:
            order.append(n)
            release.wait()
            return n

        with app.app_context():
            futures = [executor.submit(task, n) for n in range(50)]
            assert order == []  # submit never yielded to the hub, though both slots are busy
            gevent.sleep(0)
            assert order == [0, 1]
            release.set()
            assert [f.result(TIMEOUT) for f in futures] == list(range(50))
        assert order == list(range(50))

    def test_cancel_before_start(self, make_executor):
        import gevent.event

        app, executor = make_executor(EXECUTOR_TYPE="gevent", EXECUTOR_MAX_WORKERS=1)
        release = gevent.event.Event()
        ran: list[str] = []
        with app.app_context():
            first = executor.submit(lambda: release.wait(TIMEOUT))
            second = executor.submit(ran.append, "second")
            third = executor.submit(ran.append, "third")
            assert second.cancel() and second.cancelled()
            release.set()
            assert first.result(TIMEOUT) is True and third.result(TIMEOUT) is None
        assert ran == ["third"]

    def test_cancel_spawned_but_not_started(self, make_executor):
        app, executor = make_executor(EXECUTOR_TYPE="gevent")  # unbounded: spawned at once
        ran: list[int] = []
        with app.app_context():
            future = executor.submit(ran.append, 1)
            assert future.cancel()
            executor.shutdown(wait=True)
        assert ran == [] and future.cancelled()

    @pytest.mark.parametrize("max_workers", [1, 2])
    def test_greenlets_killed_before_they_start_free_their_slots(self, make_executor, max_workers):
        """gevent.killall of the pool's greenlets before they ran: their tasks never run
        and their futures are cancelled; the tasks queued behind them, and later ones, run."""
        import gevent

        app, executor = make_executor(EXECUTOR_TYPE="gevent", EXECUTOR_MAX_WORKERS=max_workers)
        ran: list[int] = []
        with app.app_context():
            killed = [executor.submit(ran.append, n) for n in range(max_workers)]
            queued = [executor.submit(ran.append, n) for n in range(10, 13)]
            gevent.killall([f._greenlet for f in killed])
            later = [executor.submit(ran.append, n) for n in range(20, 23)]
            assert [f.result(TIMEOUT) for f in queued + later] == [None] * 6
            assert all(f.cancelled() for f in killed)
            executor.shutdown(wait=True)
        assert sorted(ran) == [10, 11, 12, 20, 21, 22]

    def test_shutdown_runs_what_killed_greenlets_left_queued(self, make_executor):
        import gevent

        app, executor = make_executor(EXECUTOR_TYPE="gevent", EXECUTOR_MAX_WORKERS=1)
        ran: list[int] = []
        with app.app_context():
            first = executor.submit(ran.append, 0)
            queued = [executor.submit(ran.append, n) for n in (1, 2)]
            gevent.kill(first._greenlet)  # before it started: nothing else will start them
            executor.shutdown(wait=True)
        assert first.cancelled() and all(f.done() for f in queued) and ran == [1, 2]

    def test_killing_a_running_task_does_not_wait_for_the_queue(self, make_executor):
        """greenlet.kill() of a running task returns once that greenlet is dead: the queue
        behind it goes to another greenlet, not to the one being killed."""
        import gevent

        app, executor = make_executor(EXECUTOR_TYPE="gevent", EXECUTOR_MAX_WORKERS=1)
        with app.app_context():
            futures = [executor.submit(sleep_then_current, 0.2) for _ in range(6)]
            gevent.sleep(0.05)
            killed = futures[0]._greenlet
            started = time.monotonic()
            killed.kill()  # waits until it is dead
            assert time.monotonic() - started < 0.6  # (not the queue's 1 s: 5 tasks of 0.2 s)
            assert isinstance(futures[0].exception(TIMEOUT), gevent.GreenletExit)
            assert all(f.result(TIMEOUT) is not killed for f in futures[1:])  # run elsewhere

    def test_callbacks_of_a_task_stopped_at_its_limit_run_in_its_hubs_thread(self, make_executor):
        """Unpatched, the watchdog's stop runs in another thread: a callback run there would
        touch the hub's greenlets and gevent objects from the wrong thread."""
        import gevent

        app, executor = make_executor(EXECUTOR_TYPE="gevent", EXECUTOR_TIMEOUT="0.1")
        threads: list[int] = []

        def callback(_: cf.Future) -> None:
            gevent.sleep(0.001)  # a callback may wait cooperatively: it runs in a greenlet
            threads.append(threading.get_ident())

        with app.app_context():
            future = executor.submit(gevent.sleep, TIMEOUT)
            future.add_done_callback(callback)
            with pytest.raises(flask_executor.TaskTimeout):
                future.result(TIMEOUT)
            deadline = time.monotonic() + TIMEOUT
            while not threads and time.monotonic() < deadline:
                gevent.sleep(0.001)  # (the hub runs the callback)
        assert threads == [threading.get_ident()]

    def test_a_task_that_completes_its_own_future_then_raises(self, make_executor, caplog):
        app, executor = make_executor(EXECUTOR_TYPE="gevent", EXECUTOR_MAX_WORKERS=1)
        box: list[cf.Future] = []

        def meddle() -> None:
            box[0].set_result("set by the task")
            raise ValueError("then failed")

        with app.app_context():
            box.append(executor.submit(meddle))
            assert box[0].result(TIMEOUT) == "set by the task"
            assert executor.submit(square, 3).result(TIMEOUT) == 9
        assert "already done, its outcome was dropped" in caplog.text
        assert "ValueError: then failed" in caplog.text  # with its traceback
        assert executor._max_workers == 1  # 1.0 code reads it through the executor

    def test_task_greenlets_record_no_spawning_stack(self, make_executor):
        import gevent

        app, executor = make_executor(EXECUTOR_TYPE="gevent", EXECUTOR_MAX_WORKERS=2)
        with app.app_context():
            greenlet = executor.submit(gevent.getcurrent).result(TIMEOUT)
        assert isinstance(greenlet, gevent.Greenlet) and greenlet.spawning_stack is None
        assert type(greenlet).spawning_stack_limit == 0

    def test_shutdown_waits_for_every_accepted_task(self, make_executor):
        import gevent

        app, executor = make_executor(EXECUTOR_TYPE="gevent", EXECUTOR_MAX_WORKERS=10)
        ran: list[int] = []

        def task(n: int) -> None:
            gevent.sleep(0)
            ran.append(n)

        with app.app_context():
            for n in range(3000):
                executor.submit(task, n)
            executor.shutdown(wait=True)
        assert sorted(ran) == list(range(3000))
        with app.app_context(), pytest.raises(RuntimeError, match="after shutdown"):
            executor.submit(task, 0)

    def test_shutdown_cancel_futures(self, make_executor):
        import gevent.event

        app, executor = make_executor(EXECUTOR_TYPE="gevent", EXECUTOR_MAX_WORKERS=1)
        release = gevent.event.Event()
        with app.app_context():
            running = executor.submit(lambda: release.wait(TIMEOUT))
            gevent.sleep(0)
            waiting = [executor.submit(square, n) for n in range(5)]
            release.set()
            executor.shutdown(wait=True, cancel_futures=True)
        assert running.result(0) is True
        assert all(f.cancelled() for f in waiting)

    def test_result_timeout_and_exceptions(self, make_executor, caplog):
        import gevent.event

        app, executor = make_executor(EXECUTOR_TYPE="gevent", EXECUTOR_PROPAGATE_EXCEPTIONS=True)
        with app.app_context():
            release = gevent.event.Event()
            slow = executor.submit(release.wait, TIMEOUT)
            with pytest.raises(cf.TimeoutError):
                slow.result(timeout=0.05)
            release.set()
            assert slow.result(TIMEOUT) is True
            with pytest.raises(ValueError, match="green"):
                executor.submit(fail, "green").result(TIMEOUT)
            assert isinstance(executor.submit(fail, "x").exception(TIMEOUT), ValueError)
            assert executor.submit(square, 5).result(TIMEOUT) == 25
        assert "background task" in caplog.text and "Traceback" in caplog.text

    def test_job_and_submit_stored(self, make_executor):
        app, executor = make_executor(EXECUTOR_TYPE="gevent")

        @executor.job
        def greet(name: str) -> str:
            return f"hi {name} from {request.args['via']}"

        with app.test_request_context("/?via=job"):
            assert greet.submit("ann").result(TIMEOUT) == "hi ann from job"
            assert list(greet.map(["a", "b"], timeout=TIMEOUT)) == [
                "hi a from job",
                "hi b from job",
            ]
            greet.submit_stored("g1", "cy").result(TIMEOUT)
            assert executor.futures.done("g1") and executor.futures.pop("g1").result() == (
                "hi cy from job"
            )

    def test_monkey_patched_thousands_of_waits_and_wait_helpers(self):
        out = run_script(
            """
            from gevent import monkey; monkey.patch_all()
            import concurrent.futures as cf, json, time
            import gevent
            from flask import Flask, g, request
            from flask_executor import Executor

            app = Flask("patched")
            app.config.update(EXECUTOR_TYPE="gevent", EXECUTOR_FUTURES_MAX_LENGTH=None)
            executor = Executor(app)

            def io_task(n):
                time.sleep(0.5)  # patched: a cooperative wait
                return n, request.args["who"], g.who

            with app.test_request_context("/?who=patched"):
                g.who = "g-patched"
                start = time.monotonic()
                futures = [executor.submit(io_task, n) for n in range(3000)]
                done, not_done = cf.wait(futures, timeout=60)
                elapsed = time.monotonic() - start
                results = [f.result() for f in futures]
                completed = sum(1 for _ in cf.as_completed(futures, timeout=10))
            wrong = [r for n, r in enumerate(results) if r != (n, "patched", "g-patched")]
            print(json.dumps({"done": len(done), "elapsed": elapsed, "wrong": len(wrong),
                              "as_completed": completed}))
            """
        )
        assert out.returncode == 0, out.stderr
        report = json.loads(out.stdout)
        assert report["done"] == 3000 and report["wrong"] == 0 and report["as_completed"] == 3000
        # 3000 waits of 0.5 s, one after another, would take 25 minutes: they overlapped.
        assert report["elapsed"] < 30

    def test_not_patched_result_from_main_greenlet(self):
        out = run_script(
            """
            import gevent
            from flask import Flask
            from flask_executor import Executor

            app = Flask("plain")
            app.config["EXECUTOR_TYPE"] = "gevent"
            executor = Executor(app)
            with app.app_context():
                future = executor.submit(lambda: gevent.sleep(0.1) or "slept")
                print(future.result(timeout=10), executor.submit(sum, [1, 2]).exception(10))
            """
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == ["slept", "None"]


# -- 4. The futures dict ------------------------------------------------------------


class TestFutures:
    def test_add_pop_len_contains_and_forwarding(self):
        futures = FutureCollection()
        future: cf.Future = cf.Future()
        futures.add("a", future)
        assert len(futures) == 1 and future in futures and cf.Future() not in futures
        assert futures.done("a") is False
        assert futures._state("a") == "PENDING"
        assert futures.running("missing") is None and futures._state("missing") is None
        future.set_result(42)
        assert futures.done("a") is True and futures.result("a", timeout=1) == 42
        assert futures._futures == {"a": future}
        with pytest.raises(ValueError, match="'a' already exists"):
            futures.add("a", cf.Future())
        assert futures.pop("a") is future and futures.pop("a") is None and len(futures) == 0

    def test_oldest_evicted_beyond_max_length(self):
        futures = FutureCollection(max_length=3)
        for n in range(5):
            futures.add(n, cf.Future())
        assert list(futures._futures) == [2, 3, 4]
        assert FutureCollection().max_length == 50
        unbounded = FutureCollection(None)
        for n in range(100):
            unbounded.add(n, cf.Future())
        assert len(unbounded) == 100

    @pytest.mark.parametrize("backend", BACKENDS)
    def test_submit_stored(self, make_executor, backend):
        app, executor = make_executor(EXECUTOR_TYPE=backend, EXECUTOR_FUTURES_MAX_LENGTH="2")
        with app.app_context():
            future = executor.submit_stored("k", square, 5)
            assert future.result(TIMEOUT) == 25
            assert executor.futures.done("k") and executor.futures._state("k") == "FINISHED"
            assert executor.futures._futures["k"]._state == "FINISHED"
            with pytest.raises(ValueError, match="'k' already exists"):
                executor.submit_stored("k", square, 6)
            executor.submit_stored("k2", square, 1).result(TIMEOUT)
            executor.submit_stored("k3", square, 1).result(TIMEOUT)
            assert list(executor.futures._futures) == ["k2", "k3"]

    def test_duplicate_key_does_not_run_the_task(self, make_executor):
        app, executor = make_executor()
        ran: list[int] = []
        with app.app_context():
            executor.submit_stored("dup", ran.append, 1).result(TIMEOUT)
            with pytest.raises(ValueError):
                executor.submit_stored("dup", ran.append, 2)
            executor.shutdown()
        assert ran == [1]

    @pytest.mark.parametrize("backend", ["thread", "process", "gevent"])
    def test_done_callback_pops_its_own_stored_future(self, make_executor, backend):
        if backend == "gevent":
            pytest.importorskip("gevent")
        app, executor = make_executor(EXECUTOR_TYPE=backend)
        popped: list = []
        executor.add_default_done_callback(lambda f: popped.append(executor.futures.pop("mine")))
        with app.app_context():
            future = executor.submit_stored("mine", square, 7)
            assert future.result(TIMEOUT) == 49
            executor.shutdown(wait=True)
        assert popped == [future] and len(executor.futures) == 0

    def test_concurrent_submit_stored_and_pop(self, make_executor):
        app, executor = make_executor(EXECUTOR_FUTURES_MAX_LENGTH=None, EXECUTOR_MAX_WORKERS=4)
        errors: list[BaseException] = []
        results: dict[str, int] = {}
        lock = threading.Lock()

        def writer(w: int) -> None:
            try:
                with app.app_context():
                    for n in range(200):
                        key = f"{w}-{n}"
                        executor.submit_stored(key, square, n)
                        future = executor.futures.pop(key)
                        with lock:
                            results[key] = future.result(TIMEOUT)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=writer, args=(w,)) for w in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(TIMEOUT)
        assert errors == [] and len(results) == 1600
        assert all(results[f"{w}-{n}"] == n * n for w in range(8) for n in range(200))
        assert len(executor.futures) == 0


# -- 5. The extension ---------------------------------------------------------------


class TestExtension:
    def test_before_init_app(self):
        executor = Executor()
        with pytest.raises(
            RuntimeError, match=r"not initialised on any app: call executor.init_app"
        ):
            executor.submit(square, 1)
        futures = executor.futures  # reading it works (1.0 code does at import time)
        with pytest.raises(RuntimeError, match="init_app"):
            futures.done("k")  # using it before any init_app does not

    def test_the_app_given_last_is_kept_alive(self, executors):
        executor = Executor(make_app())  # the app is held by nothing else, as 1.0 allowed
        executors.append(executor)
        gc.collect()
        assert executor.submit(square, 3).result(TIMEOUT) == 9  # no app context pushed
        assert executor.app.name == "test_app"  # 1.0's attribute
        executor.init_app(Flask("second"))  # again, held by nothing else
        gc.collect()  # the first app, dropped by everyone, is gone: one app is served
        assert executor.submit(square, 4).result(TIMEOUT) == 16
        assert executor.app.name == "second"

    def test_app_factory_pattern(self, executors):
        executor = Executor()
        executors.append(executor)

        @executor.job
        def triple(x: int) -> int:
            return 3 * x

        app = make_app()
        executor.init_app(app)
        assert app.extensions["executor"] is executor
        with app.app_context():
            assert triple(2) == 6
            assert triple.submit(3).result(TIMEOUT) == 9
            assert list(triple.map([1, 2])) == [3, 6]
            assert triple.submit_stored("t", 4).result(TIMEOUT) == 12
            assert executor.futures.pop("t").result() == 12
        assert isinstance(triple, ExecutorJob) and triple.__name__ == "triple"

    def test_several_apps(self, executors):
        executor = Executor()
        executors.append(executor)
        one = make_app(EXECUTOR_MAX_WORKERS=1)
        one.name = "one"
        two = make_app(EXECUTOR_TYPE="process", EXECUTOR_MAX_WORKERS=1)
        two.name = "two"
        executor.init_app(one)
        executor.init_app(two)
        with one.app_context():
            assert executor.submit(lambda: current_app.name).result(TIMEOUT) == "one"
            executor.submit_stored("k", square, 2).result(TIMEOUT)
            assert len(executor.futures) == 1
        with two.app_context():
            assert executor.submit(worker_pid).result(TIMEOUT) != os.getpid()
            assert len(executor.futures) == 0  # each app has its own futures dict
        assert (
            one.extensions[executor._state_key].pool is not two.extensions[executor._state_key].pool
        )
        error = in_thread(lambda: executor.submit(square, 1))
        assert isinstance(error, RuntimeError)
        assert "one of 2 apps without an app context" in str(error)
        other = make_app()
        with (
            other.app_context(),
            pytest.raises(RuntimeError, match="not initialised on app 'test_app'"),
        ):
            executor.submit(square, 1)

    def test_job_with_process_backend(self, executors):
        app = make_app(JOBS_EXECUTOR_TYPE="process", JOBS_EXECUTOR_MAX_WORKERS=1)
        job_executor.init_app(app)
        executors.append(job_executor)
        assert pickle.loads(pickle.dumps(cube)) is cube
        with app.app_context():
            assert cube.submit(2).result(TIMEOUT) == 8
            assert job_executor.submit(worker_pid).result(TIMEOUT) != os.getpid()
            assert list(cube.map(range(4), chunksize=2)) == [0, 1, 8, 27]
            assert cube.submit_stored("c", 3).result(TIMEOUT) == 27
            hidden = job_executor.job(square)  # not reachable by its name: cannot be pickled
            with pytest.raises(TypeError, match=r"cannot send .*square"):
                hidden.submit(2).result(TIMEOUT)
            lam = job_executor.job(lambda x: x)
            with pytest.raises(TypeError, match=r"lambda.*closures, lambdas and bound methods"):
                lam.submit(1)

    @pytest.mark.parametrize("backend", BACKENDS)
    def test_submit_after_shutdown(self, make_executor, backend):
        app, executor = make_executor(EXECUTOR_TYPE=backend)
        executor.shutdown()
        with (
            app.app_context(),
            pytest.raises(RuntimeError, match="cannot schedule new futures after shutdown"),
        ):
            executor.submit(square, 1)

    def test_non_callable_is_refused(self, make_executor):
        app, executor = make_executor()
        with app.app_context(), pytest.raises(TypeError, match=r"needs a callable, got 42 \(int\)"):
            executor.submit(42)

    @pytest.mark.parametrize("backend", BACKENDS)
    def test_propagated_exceptions_are_logged(self, make_executor, backend, caplog):
        app, executor = make_executor(
            EXECUTOR_TYPE=backend, EXECUTOR_PROPAGATE_EXCEPTIONS=True, EXECUTOR_MAX_WORKERS=1
        )
        with app.app_context():
            future = executor.submit(fail, "logged")
            with pytest.raises(ValueError):
                future.result(TIMEOUT)
            assert executor.submit(square, 2).result(TIMEOUT) == 4
            executor.shutdown(wait=True)
        records = [r for r in caplog.records if r.name == app.logger.name]
        assert len(records) == 1 and "background task" in records[0].getMessage()
        assert records[0].exc_info[1] is future.exception()
        assert "fail" in caplog.text and "Traceback" in caplog.text

    def test_failing_callback_is_logged_and_pool_goes_on(self, make_executor, caplog):
        app, executor = make_executor(EXECUTOR_MAX_WORKERS=1)

        def bad_callback(future: cf.Future) -> None:
            raise RuntimeError("callback broke")

        executor.add_default_done_callback(bad_callback)
        with app.app_context():
            executor.submit(square, 1).result(TIMEOUT)
            assert executor.submit(square, 3).result(TIMEOUT) == 9
            executor.shutdown(wait=True)
        assert "callback broke" in caplog.text and "done-callback" in caplog.text

    def test_shutdown_runs_every_accepted_task(self, make_executor):
        app, executor = make_executor(EXECUTOR_MAX_WORKERS=2)
        ran: list[int] = []
        with app.app_context():
            for n in range(2000):
                executor.submit(ran.append, n)
            executor.shutdown(wait=True)
        assert sorted(ran) == list(range(2000))


job_executor = Executor(name="jobs")  # decorated before any init_app, as in app factories


@job_executor.job
def cube(x: int) -> int:
    return x * x * x


# -- 1.0's real callers: keyword calls, re-init, current_app, forwarded attributes ----------


def run_command(cmd: str, timeout: float = 1) -> str:
    return f"ran {cmd} within {timeout}"


class TestOneZeroCallers:
    def test_keyword_calls_as_published_extensions_make_them(self, make_executor):
        app, executor = make_executor()

        @app.post("/commands/<key>")
        def start(key: str) -> str:  # as Flask-Shell2HTTP calls it
            executor.submit_stored(future_key=key, fn=run_command, cmd="ls", timeout=3)
            return "accepted"

        client = app.test_client()
        assert client.post("/commands/k1").text == "accepted"
        with app.app_context():
            assert executor.futures.result("k1", timeout=TIMEOUT) == "ran ls within 3"
            assert executor.submit(fn=run_command, cmd="pwd").result(TIMEOUT) == "ran pwd within 1"
            assert executor.submit_stored("k2", fn=run_command, cmd="id").result(TIMEOUT)
            job = executor.job(run_command)
            assert job.submit_stored(future_key="k3", cmd="w").result(TIMEOUT) == "ran w within 1"
            # a task's own keyword argument named fn still reaches the task
            assert executor.submit(lambda fn: fn(), fn=lambda: 5).result(TIMEOUT) == 5
        with pytest.raises(TypeError, match=r"submit\(\) needs a callable"):
            executor.submit(cmd="no task")
        with pytest.raises(TypeError, match=r"submit_stored\(\) needs a future_key"):
            executor.submit_stored(fn=run_command, cmd="no key")

    def test_second_executor_on_an_app_replaces_the_first(self, executors, caplog):
        app = make_app(EXECUTOR_MAX_WORKERS=1)
        first = Executor(app)
        executors.append(first)
        with app.app_context():
            first_pool = first._self
            assert first.submit(square, 2).result(TIMEOUT) == 4
        second = Executor(app)  # a test helper building a fresh executor, as real apps do
        executors.append(second)
        assert app.extensions["executor"] is second
        with app.app_context():
            assert second.submit(square, 3).result(TIMEOUT) == 9
            assert second._self is not first_pool
        assert first_pool._shutdown  # the old pool's threads are not left behind
        assert "replacing" in caplog.text and "app.extensions['executor']" in caplog.text
        second.init_app(app)  # and init_app again on the same executor
        with app.app_context():
            assert second.submit(square, 4).result(TIMEOUT) == 16

    def test_executor_built_in_a_view_on_current_app(self, executors):
        app = make_app()

        @app.route("/build")
        def build() -> str:
            executor = Executor(current_app)  # every request, as some real apps do
            executors.append(executor)
            return str(executor.submit(square, 6).result(TIMEOUT))

        client = app.test_client()
        assert [client.get("/build").text for _ in range(3)] == ["36"] * 3
        assert isinstance(app.extensions["executor"], Executor)

    def test_failed_init_app_leaves_the_app_as_it_was(self):
        class NoPool(Backend):
            def create_pool(self, max_workers, config):
                raise OSError("no threads left")

        app = make_app(EXECUTOR_TYPE=NoPool())
        before = (dict(app.config), dict(app.extensions))
        with pytest.raises(OSError, match="no threads left"):
            Executor(app)
        assert (dict(app.config), dict(app.extensions)) == before
        app.config["EXECUTOR_TYPE"] = "thread"
        executor = Executor(app)  # a retry works
        with app.app_context():
            assert executor.submit(square, 2).result(TIMEOUT) == 4
        executor.shutdown()

    def test_pool_attributes_read_through_the_executor(self, make_executor):
        app, executor = make_executor(EXECUTOR_MAX_WORKERS=3)
        with app.app_context():
            assert executor._max_workers == 3  # real code reads this
            assert isinstance(executor._self, cf.ThreadPoolExecutor)
            assert isinstance(executor._self, cf.ThreadPoolExecutor)
            assert executor._shutdown is False
            executor.shutdown()
            assert executor._shutdown is True
        with pytest.raises(AttributeError):
            executor.no_such_attribute  # noqa: B018

    def test_proxied_object_of_a_future(self, make_executor):
        app, executor = make_executor()
        with app.app_context():
            future = executor.submit(square, 3)
            assert future.result(TIMEOUT) == 9
            assert getattr(future, "__proxied_object")._state == "FINISHED"


# -- 6. 1.0 import paths and vendoring ----------------------------------------------


def test_flask_private_names_we_rely_on_are_where_we_expect():
    """The one private part of Flask we use: how an app context is entered (see the
    comment above ``_MERGED_CONTEXTS``). If this fails, Flask moved it: adapt the module."""
    import inspect

    from flask.globals import _cv_app

    assert isinstance(_cv_app, contextvars.ContextVar), "flask.globals._cv_app moved"
    ctx = make_app().app_context()
    merged = flask_executor._MERGED_CONTEXTS
    names = ["_cv_token", "_push_count"] if merged else ["_cv_tokens"]
    missing = [name for name in names if not hasattr(ctx, name)]
    assert not missing, f"Flask's AppContext no longer has {missing}: update _push/_pop"
    takes_ctx = "ctx" in inspect.signature(Flask.do_teardown_appcontext).parameters
    assert takes_ctx is merged, "do_teardown_appcontext's signature changed: update _pop"


def test_gevent_private_names_we_rely_on_are_where_we_expect():
    """The one private part of gevent we use: asking whether a thread has a hub without
    making one (see ``_hub_here``). If this fails, gevent moved it: adapt the module."""
    pytest.importorskip("gevent")
    from gevent._hub_local import get_hub_if_exists

    seen: list[object] = []
    thread = threading.Thread(
        target=lambda: seen.extend([get_hub_if_exists(), flask_executor._hub_here()])
    )
    thread.start()
    thread.join(TIMEOUT)
    assert seen == [None, None]  # a plain thread has none, and asking made none


def test_one_point_oh_import_paths():
    import flask_executor.executor
    import flask_executor.futures
    from flask_executor.executor import Executor as E
    from flask_executor.executor import ExecutorJob as J
    from flask_executor.futures import Future, FutureCollection

    assert (
        E is Executor and J is ExecutorJob and FutureCollection is flask_executor.FutureCollection
    )
    assert Future is cf.Future
    assert isinstance(flask_executor.__version__, str)


def test_vendored_copy_beside_installed_copy(tmp_path):
    vendor = tmp_path / "myapp" / "_vendor"
    vendor.mkdir(parents=True)
    (tmp_path / "myapp" / "__init__.py").write_text("")
    (vendor / "__init__.py").write_text("")
    shutil.copy(HERE / "flask_executor.py", vendor / "flask_executor.py")
    script = textwrap.dedent(
        """
        import sys
        from flask import Flask, current_app
        from myapp._vendor import flask_executor as vendored
        assert "flask_executor" not in sys.modules, "the vendored copy imported the installed one"
        import flask_executor as installed
        from myapp._vendor.flask_executor.futures import FutureCollection
        assert FutureCollection is vendored.FutureCollection
        assert installed.FutureCollection is not vendored.FutureCollection

        class Inline(vendored.ThreadBackend):
            pass
        vendored.register_backend("inline", Inline())
        assert "inline" not in installed.BACKENDS

        app = Flask("both")
        app.config["VENDORED_EXECUTOR_TYPE"] = "inline"
        mine = vendored.Executor(app, name="vendored")
        theirs = installed.Executor(app)
        with app.app_context():
            assert mine.submit(lambda: current_app.name).result(10) == "both"
            assert theirs.submit(lambda: current_app.name).result(10) == "both"
            mine.submit_stored("k", int, 1).result(10)
            assert len(mine.futures) == 1 and len(theirs.futures) == 0
        mine.shutdown(); theirs.shutdown()
        print("ok")
        """
    )
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{HERE}"}
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


# -- 7. Time limits and stopping one running task (EXECUTOR_TIMEOUT, future.cancel()) ---


def nap(seconds: float) -> None:
    """Sleep in small steps, cooperative in a greenlet; return early once asked to stop."""
    gevent = sys.modules.get("gevent")
    in_greenlet = gevent is not None and gevent.getcurrent().parent is not None
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not flask_executor.stop_requested():
        (gevent.sleep if in_greenlet else time.sleep)(0.005)


def maybe_overrun(n: int) -> int:
    """Every 5th call runs far past any limit the tests set; the others return at once."""
    if n % 5 == 4:
        nap(10)
    return n * n


def swallow_exceptions() -> str:
    try:
        nap(10)
    except Exception:
        return "swallowed"
    return "finished"


def write_until_stopped(path: str) -> None:
    """Write 'running' to path, wait until asked to stop (or killed), write 'stopped'."""
    Path(path).write_text("running")
    try:
        while not flask_executor.stop_requested():
            time.sleep(0.005)  # cooperative under gevent's monkey-patching
    finally:
        Path(path).write_text("stopped")


def wait_at_barrier(barrier_name: str) -> int:
    BARRIERS[barrier_name].wait(TIMEOUT)
    return threading.get_ident()


BARRIERS: dict[str, threading.Barrier] = {}
STOPPABLE = ["thread", "gevent"]


def limited(make_executor, backend: str, **config: object) -> tuple[Flask, Executor]:
    if backend == "gevent":
        pytest.importorskip("gevent")
    return make_executor(EXECUTOR_TYPE=backend, **config)


class TestTimeLimits:
    @pytest.mark.parametrize("backend", ["thread", "gevent", "process"])
    def test_every_fifth_task_overruns_and_the_pool_keeps_serving(self, make_executor, backend):
        app, executor = limited(make_executor, backend, EXECUTOR_TIMEOUT="0.5",
                                EXECUTOR_MAX_WORKERS=4)  # fmt: skip
        with app.app_context():
            futures = [executor.submit(maybe_overrun, n) for n in range(20)]
            for n, future in enumerate(futures):
                if n % 5 == 4:
                    exc = future.exception(TIMEOUT)
                    assert isinstance(exc, cf.TimeoutError)
                    assert isinstance(exc, flask_executor.TaskTimeout)
                    assert "test_flask_executor.maybe_overrun" in str(exc) and "0.5 s" in str(exc)
                else:
                    assert future.result(TIMEOUT) == n * n
            # the pool still has its workers: four tasks run at once, and more after them
            if backend == "thread":
                BARRIERS["full"] = threading.Barrier(4)
                idents = [executor.submit(wait_at_barrier, "full") for _ in range(4)]
                assert len({f.result(TIMEOUT) for f in idents}) == 4
            assert [f.result(TIMEOUT) for f in map(executor.submit, [square] * 8, range(8))] == [
                n * n for n in range(8)
            ]
            if backend == "process":  # stopped inside the worker: the same processes serve on
                assert len(executor._self._processes) == 4

    def test_task_timeout_pickles_and_names_task_and_limit(self):
        exc = flask_executor.TaskTimeout("app.report", 2.5)
        copy = pickle.loads(pickle.dumps(exc))
        assert type(copy) is flask_executor.TaskTimeout and str(copy) == str(exc)
        assert "app.report" in str(exc) and "2.5 s" in str(exc) and "EXECUTOR_TIMEOUT" in str(exc)
        assert isinstance(copy, cf.TimeoutError) and (copy.task, copy.limit) == ("app.report", 2.5)

    @pytest.mark.parametrize("backend", STOPPABLE)
    def test_a_task_catching_exception_is_still_stopped(self, make_executor, backend):
        app, executor = limited(make_executor, backend, EXECUTOR_TIMEOUT="0.3")
        with app.app_context(), pytest.raises(flask_executor.TaskTimeout):
            executor.submit(swallow_exceptions).result(TIMEOUT)

    @pytest.mark.parametrize("backend", STOPPABLE)
    def test_limit_counts_from_start_not_submit(self, make_executor, backend):
        app, executor = limited(make_executor, backend, EXECUTOR_TIMEOUT="0.5",
                                EXECUTOR_MAX_WORKERS=1)  # fmt: skip
        with app.app_context():
            first = executor.submit(nap, 10)  # stopped at its limit, 0.5 s after it started
            second = executor.submit(nap, 0.05)  # queued 0.5 s: out of time if counted from submit
            with pytest.raises(flask_executor.TaskTimeout):
                first.result(TIMEOUT)
            assert second.result(TIMEOUT) is None

    @pytest.mark.parametrize("backend", STOPPABLE)
    def test_teardown_runs_once_after_the_stop_sees_it_and_is_not_interrupted(
        self, make_executor, backend
    ):
        app, executor = limited(make_executor, backend, EXECUTOR_TIMEOUT="0.2")
        seen: list[object] = []

        @app.teardown_appcontext
        def slow_teardown(error: BaseException | None) -> None:
            nap(0.6)  # three times the limit, after the stop: must run to its end
            seen.append(type(error).__name__)

        with app.app_context():
            future = executor.submit(nap, 10)
            with pytest.raises(flask_executor.TaskTimeout):
                future.result(TIMEOUT)
            executor.shutdown(wait=True)
            assert seen == ["TaskTimeout"]  # (this block's own context tears down after)

    @pytest.mark.parametrize("backend", STOPPABLE)
    def test_callbacks_run_in_the_tasks_contexts_after_a_stop(self, make_executor, backend):
        app, executor = limited(make_executor, backend, EXECUTOR_TIMEOUT="0.2")
        got: list[object] = []
        executor.add_default_done_callback(
            lambda f: got.append((type(f.exception()).__name__, request.args["q"]))
        )
        with app.test_request_context("/?q=cb"):
            future = executor.submit(nap, 10)
            with pytest.raises(flask_executor.TaskTimeout):
                future.result(TIMEOUT)
            executor.shutdown(wait=True)
        assert got == [("TaskTimeout", "cb")]

    @pytest.mark.parametrize("backend", STOPPABLE)
    def test_tasks_ending_at_their_deadline_read_as_finished_or_timed_out_never_broken(
        self, make_executor, backend
    ):
        """Many tasks end right around their deadline: each reads as its result or as a
        TaskTimeout; none leaks the stop into teardown or the pool, and the pool keeps its size."""
        app, executor = limited(make_executor, backend, EXECUTOR_TIMEOUT="0.02",
                                EXECUTOR_MAX_WORKERS=4)  # fmt: skip
        teardowns: list[object] = []
        app.teardown_appcontext(lambda error: teardowns.append(error))
        with app.app_context():
            futures = [executor.submit(nap, 0.015 + (n % 10) * 0.001) for n in range(300)]
            outcomes = {type(f.exception(TIMEOUT)).__name__ for f in futures}
            executor.shutdown(wait=True)
            assert outcomes <= {"NoneType", "TaskTimeout"} and len(teardowns) == 300
        assert all(e is None or isinstance(e, flask_executor.TaskTimeout) for e in teardowns)

    def test_no_limit_by_default_and_bad_values(self, make_executor):
        app, executor = make_executor()
        assert app.config["EXECUTOR_TIMEOUT"] is None
        with app.app_context():
            assert executor.submit(nap, 0.2).result(TIMEOUT) is None
        for bad in ["soon", "0", "-1", True, 1e10, "86401", "inf", "nan"]:
            with pytest.raises(
                ValueError,
                match=rf"EXECUTOR_TIMEOUT must be a number of seconds > 0 \(at most 86400, a "
                rf"day\) or None, got {re.escape(repr(bad))}",
            ):
                Executor(make_app(EXECUTOR_TIMEOUT=bad))
        app, executor = make_executor(name="mail", MAIL_EXECUTOR_TIMEOUT="1.5")
        assert executor._state().limit == 1.5


class TestCancelRunning:
    @pytest.mark.parametrize("backend", STOPPABLE)
    def test_cancel_pending_running_and_finished(self, make_executor, backend):
        app, executor = limited(make_executor, backend, EXECUTOR_MAX_WORKERS=1)
        teardowns: list[object] = []
        app.teardown_appcontext(lambda error: teardowns.append(type(error).__name__))
        with app.app_context():
            done = executor.submit(square, 3)
            assert done.result(TIMEOUT) == 9
            running = executor.submit(nap, 10)
            pending = executor.submit(square, 4)
            wait_until(running.running)
            assert pending.cancel() is True and pending.cancelled()
            assert running.cancel() is True and running.cancelled() and running.done()
            with pytest.raises(cf.CancelledError):
                running.result(TIMEOUT)
            assert running.cancel() is True  # as the standard library: already cancelled
            assert done.cancel() is False and not done.cancelled()
            assert executor.submit(square, 5).result(TIMEOUT) == 25  # the worker is free again
            executor.shutdown(wait=True)
            assert teardowns == ["NoneType", "CancelledError", "NoneType"]

    @pytest.mark.parametrize("backend", STOPPABLE)
    def test_cancel_by_stored_key(self, make_executor, backend):
        app, executor = limited(make_executor, backend)
        with app.app_context():
            executor.submit_stored("TEXT_LABEL", nap, 10)
            other = executor.submit_stored("other", nap, 0.5)
            wait_until(lambda: executor.futures.running("TEXT_LABEL"))
            assert executor.futures.cancel("TEXT_LABEL") is True
            assert executor.futures.cancelled("TEXT_LABEL") is True
            assert other.result(TIMEOUT) is None and not other.cancelled()  # only that one

    @pytest.mark.parametrize("backend", STOPPABLE)
    def test_waiters_and_callbacks_see_a_running_task_cancelled(self, make_executor, backend):
        app, executor = limited(make_executor, backend)
        seen: list[bool] = []
        with app.app_context():
            future = executor.submit(nap, 10)
            future.add_done_callback(lambda f: seen.append(f.cancelled()))
            wait_until(future.running)
            waiter = threading.Thread(target=future.cancel)
            waiter.start()
            finished, _ = cf.wait([future], timeout=TIMEOUT)
            waiter.join(TIMEOUT)
            assert finished == {future} and seen == [True]

    def test_many_cancels_and_timeouts_leave_the_pool_whole(self, make_executor):
        app, executor = make_executor(EXECUTOR_MAX_WORKERS=4, EXECUTOR_TIMEOUT="0.05")
        with app.app_context():
            for _ in range(5):
                futures = [executor.submit(nap, 10) for _ in range(8)]
                for future in futures[:4]:
                    wait_until(future.running)
                    future.cancel()
                for future in futures:
                    assert future.cancelled() or isinstance(
                        future.exception(TIMEOUT), cf.TimeoutError
                    )
            BARRIERS["whole"] = threading.Barrier(4)
            idents = [executor.submit(wait_at_barrier, "whole") for _ in range(4)]
            assert len({f.result(TIMEOUT) for f in idents}) == 4

    def test_cancel_by_key_stops_a_running_task_with_a_shared_store(self, make_executor, store_url):
        app, executor = make_executor(EXECUTOR_FUTURES_STORE=store_url)
        with app.app_context():
            local = executor.submit_stored("long", nap, 10)
            wait_until(lambda: executor.futures.running("long"))
            assert executor.futures.cancel("long") is True
            assert executor.futures.cancelled("long") is True and local.cancelled()

    def test_a_running_process_task_is_cancelled_and_asked_to_stop(self, make_executor, tmp_path):
        app, executor = make_executor(EXECUTOR_TYPE="process", EXECUTOR_MAX_WORKERS=1)
        with app.app_context():
            running = executor.submit(write_until_stopped, str(tmp_path / "started"))
            wait_for(str(tmp_path / "started"))
            assert running.cancel() is True and running.cancelled() and running.done()
            assert running.cancel() is True  # as the standard library: already cancelled
            # the worker saw stop_requested() and is free: the next task runs there
            assert executor.submit(square, 5).result(TIMEOUT) == 25
            assert (tmp_path / "started").read_text() == "stopped"


def spin(seconds: float, n: int = 0) -> int:
    """Busy for ``seconds`` in pure Python, asking whether to stop at every turn."""
    started = time.monotonic()
    while time.monotonic() - started < seconds and not flask_executor.stop_requested():
        pass
    return n


def count_to(turns: int) -> int:
    """Busy for ``turns`` turns of a Python loop, never asking whether to stop."""
    for _ in range(turns):
        pass
    return turns


@pytest.fixture
def switch_often():
    """Threads switch every microsecond: races between a task and its stopper show up."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(interval)


class TestStopRaces:
    """Each of these failed before the fixes that followed a prober's report."""

    @pytest.mark.parametrize("stop", ["cancel", "limit"])
    def test_a_process_task_that_returned_keeps_its_result(self, make_executor, tmp_path, stop):
        """Its function returned before the stop, but its outcome was still on its way to
        the web process (pickled, sent): the stop is refused and the result stands."""
        limit = {"EXECUTOR_TIMEOUT": "0.3"} if stop == "limit" else {}
        app, executor = make_executor(EXECUTOR_TYPE="process", EXECUTOR_MAX_WORKERS=1, **limit)
        with app.app_context():
            future = executor.submit(return_slow_to_send, str(tmp_path), 7)
            try:
                wait_for(str(tmp_path / "sending"))
                if stop == "cancel":
                    assert future.cancel() is False
                else:
                    time.sleep(0.6)  # past the limit: the watchdog has looked (and must refuse)
                assert not future.done()
            finally:
                (tmp_path / "go").touch()
            assert future.result(TIMEOUT) == 7

    @pytest.mark.parametrize("push", [True, False])
    def test_tasks_ending_at_the_deadline_never_leak_the_private_stop(
        self, make_executor, switch_often, push
    ):
        app, executor = make_executor(EXECUTOR_TIMEOUT="0.002", EXECUTOR_MAX_WORKERS=2,
                                      EXECUTOR_PUSH_APP_CONTEXT=push)  # fmt: skip
        with app.app_context():
            futures = [executor.submit(spin, 0.0015 + (n % 10) * 0.0001, n) for n in range(3000)]
            kinds = {type(f.exception(TIMEOUT)).__name__ for f in futures}
            executor.shutdown(wait=True)
        assert kinds <= {"NoneType", "TaskTimeout"}

    def test_process_tasks_ending_at_the_deadline_never_leak_the_private_stop(self, make_executor):
        config = {"EXECUTOR_START_METHOD": "fork", "EXECUTOR_MAX_WORKERS": 2}
        app, executor = make_executor(EXECUTOR_TYPE="process", EXECUTOR_TIMEOUT="0.001", **config)
        with app.app_context():
            futures = [executor.submit(spin, 0.0008 + (n % 5) * 0.0001, n) for n in range(6000)]
            kinds = {type(f.exception(TIMEOUT)).__name__ for f in futures}
        assert kinds <= {"NoneType", "TaskTimeout"} and not executor._self._broken

    def test_cancels_racing_starts_leave_time_limits_working(self, make_executor, switch_often):
        app, executor = make_executor(EXECUTOR_TIMEOUT="100", EXECUTOR_MAX_WORKERS=8)
        with app.app_context():
            futures = [executor.submit(int, n) for n in range(2000)]
            answers = []
            for future in futures:
                while not (future.running() or future.done()):
                    pass
                answers.append(future.cancel())
            _, pending = cf.wait(futures, timeout=TIMEOUT)
            assert not pending
            for future, answer in zip(futures, answers, strict=True):  # cancel() says what happened
                assert future.cancelled() is answer
        app, executor = make_executor(EXECUTOR_TIMEOUT="0.2")  # the watchdog still serves
        with app.app_context(), pytest.raises(flask_executor.TaskTimeout):
            executor.submit(spin, 5).result(TIMEOUT)

    @pytest.mark.parametrize("limit", [{}, {"EXECUTOR_TIMEOUT": "100"}])
    def test_a_cancel_racing_the_tasks_end_gives_one_outcome(self, make_executor, switch_often,
                                                            limit):  # fmt: skip
        """The end of a task's function and a cancel() race for it: whichever claims it
        first wins, and the future, cancel()'s answer and teardown all tell the same."""
        app, executor = make_executor(EXECUTOR_MAX_WORKERS=2, **limit)
        torn = queue.SimpleQueue()
        app.teardown_appcontext(torn.put)
        outcomes = collections.Counter()
        with app.app_context():
            for n in range(1500):
                turns = int(1.12 ** (n % 100))  # 1 to 75,000 turns of a Python loop: the
                future = executor.submit(count_to, turns)  # cancel lands before, at, after ends
                while not (future.running() or future.done()):
                    pass
                cancelled = future.cancel()
                error = torn.get(timeout=TIMEOUT)  # the task's teardown, once it ended
                if cancelled:
                    assert future.cancelled() and isinstance(error, cf.CancelledError)
                else:
                    assert future.result(TIMEOUT) == turns and error is None
                outcomes[cancelled] += 1
            assert torn.empty()  # (this test's own context tears down after)
        assert outcomes[True], outcomes  # (the cancel won some races: the test saw them)

    def test_stored_outcomes_agree_with_the_submitters_future(self, make_executor, tmp_path):
        store = f"sqlite:///{tmp_path}/f.db"
        config = {"EXECUTOR_FUTURES_MAX_LENGTH": None, "EXECUTOR_FUTURES_STORE": store}
        app, executor = make_executor(EXECUTOR_TIMEOUT="0.004", EXECUTOR_MAX_WORKERS=2, **config)
        with app.app_context():
            futures = [executor.submit_stored(n, spin, 0.0035, n) for n in range(600)]
            for n, future in enumerate(futures):
                local = type(future.exception(TIMEOUT)).__name__
                stored = type(executor.futures.exception(n, timeout=TIMEOUT)).__name__
                assert local == stored, (n, local, stored)

    def test_a_task_blocked_in_c_is_done_at_its_limit(self, make_executor):
        app, executor = make_executor(EXECUTOR_TIMEOUT="0.2", EXECUTOR_MAX_WORKERS=1)
        EVENTS["stuck"] = release = threading.Event()
        with app.app_context():
            stuck = executor.submit(wait_event, "stuck")  # blocked in C: it never asks
            started = time.monotonic()
            with pytest.raises(flask_executor.TaskTimeout):
                stuck.result(TIMEOUT)
            assert time.monotonic() - started < 0.2 + 0.5
            assert stuck.cancel() is False and not stuck.cancelled()  # it is done
            release.set()
            assert executor.submit(square, 2).result(TIMEOUT) == 4

    @pytest.mark.parametrize("backend", STOPPABLE)
    def test_a_task_cancelling_itself_is_asked_to_stop(self, make_executor, backend):
        app, executor = limited(make_executor, backend)
        box: dict[str, object] = {}

        def cancel_myself() -> str:
            wait_until(lambda: "future" in box)
            box["before"] = flask_executor.stop_requested()
            box["cancel"] = box["future"].cancel()
            box["after"] = flask_executor.stop_requested()
            return "went on"

        with app.app_context():
            box["future"] = future = executor.submit(cancel_myself)
            with pytest.raises(cf.CancelledError):
                future.result(TIMEOUT)
            executor.shutdown(wait=True)
        assert future.cancelled() and (box["before"], box["cancel"], box["after"]) == (
            False, True, True)  # fmt: skip

    def test_cancels_after_the_tasks_end_leave_nothing_behind(self, make_executor):
        """Between a task's end and its future's result (teardown runs there), every
        cancel() is refused, and none is kept."""
        app, executor = make_executor(EXECUTOR_MAX_WORKERS=1)
        tearing, release = threading.Event(), threading.Event()
        app.teardown_appcontext(lambda _: tearing.set() or release.wait(TIMEOUT))
        with app.app_context():
            future = executor.submit(int, 5)
            assert tearing.wait(TIMEOUT)
            assert not any(future.cancel() for _ in range(1000))
            release.set()
            assert future.result(TIMEOUT) == 5
            assert len(future._captured.claims) <= 2  # the end's, and at most one stop's
            tearing.clear()  # (this test's own context tears down next)

    def test_cancel_while_the_context_is_being_pushed(self, make_executor):
        from flask.signals import appcontext_pushed

        app, executor = make_executor()
        pushing = threading.Event()

        def slow_receiver(sender: Flask, **extra: object) -> None:
            pushing.set()
            time.sleep(0.3)

        ran: list[str] = []
        with appcontext_pushed.connected_to(slow_receiver, app), app.app_context():
            pushing.clear()  # (set by this context's own push): the task's push sets it again
            future = executor.submit(ran.append, "ran")
            assert pushing.wait(TIMEOUT) and future.running()
            assert future.cancel() is True
            with pytest.raises(cf.CancelledError):
                future.result(TIMEOUT)
            executor.shutdown(wait=True)
        assert ran == [] and future.cancelled()


QUIET = logging.getLogger("test_flask_executor.quiet")


class QuietHandler(logging.Handler):
    """Takes its lock on every record, as every handler does, and writes nothing."""

    def emit(self, record: logging.LogRecord) -> None:
        pass


QUIET.addHandler(QuietHandler())
QUIET.setLevel(logging.INFO)
QUIET.propagate = False
SHARED_CONDITION = threading.Condition()
SHARED_QUEUE: queue.Queue[int] = queue.Queue()


def use_locks_until_stopped(kind: str) -> None:
    """Take a lock shared with the web process's other threads, over and over, until asked
    to stop (on a main without stop_requested, until stopped by force)."""
    asked = getattr(flask_executor, "stop_requested", lambda: False)
    while not asked():
        if kind == "logging":
            QUIET.info("working")
        elif kind == "condition":
            with SHARED_CONDITION:
                SHARED_CONDITION.notify_all()
        else:
            SHARED_QUEUE.put(1)
            SHARED_QUEUE.get()


def use_lock_in_thread(kind: str) -> bool:
    """Take the same lock once from a plain thread: True if it did within 2 s."""
    thread = threading.Thread(target=use_locks_until_stopped_once, args=(kind,), daemon=True)
    thread.start()
    thread.join(2)
    return not thread.is_alive()


def use_locks_until_stopped_once(kind: str) -> None:
    if kind == "logging":
        QUIET.info("from a request thread")
    elif kind == "condition":
        with SHARED_CONDITION:
            pass
    else:
        SHARED_QUEUE.put(2)
        SHARED_QUEUE.get()


class TestStopsAreSafe:
    """A stop never lands inside the task's code: no lock it shares is ever left held."""

    @pytest.mark.parametrize("kind", ["logging", "condition", "queue"])
    def test_200_stops_of_a_task_using_a_shared_lock_leave_it_free(self, make_executor, kind):
        app, executor = make_executor(EXECUTOR_TIMEOUT="0.01", EXECUTOR_MAX_WORKERS=4)
        with app.app_context():
            for _ in range(25):  # 100 stops by the limit, 100 by cancel()
                timed = [executor.submit(use_locks_until_stopped, kind) for _ in range(4)]
                for future in timed:
                    assert isinstance(future.exception(TIMEOUT), flask_executor.TaskTimeout)
                assert use_lock_in_thread(kind), "a stop left the lock held"
        app, executor = make_executor(EXECUTOR_MAX_WORKERS=4)  # no limit: cancel() only
        with app.app_context():
            for _ in range(25):
                running = [executor.submit(use_locks_until_stopped, kind) for _ in range(4)]
                for future in running:
                    wait_until(future.running)
                    assert future.cancel() is True and future.cancelled()
                assert use_lock_in_thread(kind), "a stop left the lock held"
            executor.shutdown(wait=True)  # every stopped task saw stop_requested() and ended

    @pytest.mark.parametrize("backend", ["thread", "gevent", "process"])
    def test_a_task_swallowing_every_exception_is_done_at_its_limit(self, make_executor, backend):
        app, executor = limited(make_executor, backend, EXECUTOR_TIMEOUT="0.5")
        with app.app_context():
            executor.submit(square, 2).result(TIMEOUT)  # the pool is up (process: spawned)
            started = time.monotonic()
            future = executor.submit(retry_for, 3.0)
            with pytest.raises(flask_executor.TaskTimeout):
                future.result(TIMEOUT)
            assert time.monotonic() - started < 0.5 + 0.5

    def test_stop_requested_outside_a_task_is_false(self):
        assert flask_executor.stop_requested() is False
        assert "stop_requested" in flask_executor.__all__

    def test_a_stopped_tasks_late_outcome_is_logged_once_at_info(self, make_executor, caplog):
        app, executor = make_executor(EXECUTOR_TIMEOUT="0.1")
        EVENTS["late"] = release = threading.Event()
        with app.app_context(), caplog.at_level(logging.INFO, logger="flask_executor"):
            future = executor.submit(wait_event, "late")  # blocked: it never asks
            assert isinstance(future.exception(TIMEOUT), flask_executor.TaskTimeout)
            release.set()
            executor.shutdown(wait=True)
        late = [r for r in caplog.records if "after it was stopped" in r.getMessage()]
        assert len(late) == 1 and late[0].levelno == logging.INFO
        assert "test_flask_executor.wait_event ended" in late[0].getMessage()

    @pytest.mark.parametrize("backend", ["thread", "gevent", "process"])
    def test_cancel_by_key_from_another_process_stops_a_running_task(
        self, store_url, backend, tmp_path
    ):
        """The owner runs a cooperative stored task; this process cancels it by key: every
        reader sees it cancelled at once, and the task sees stop_requested() within ~1 s."""
        if backend == "gevent":
            pytest.importorskip("gevent")
        flag = tmp_path / "flag"
        patch = "from gevent import monkey; monkey.patch_all()" if backend == "gevent" else ""
        script = f"""
            {patch}
            import concurrent.futures as cf
            from flask_executor import Executor
            from test_flask_executor import make_app, write_until_stopped
            app = make_app(EXECUTOR_FUTURES_STORE={store_url!r}, EXECUTOR_TYPE={backend!r})
            executor = Executor(app)
            with app.app_context():
                future = executor.submit_stored("long", write_until_stopped, {str(flag)!r})
                cf.wait([future], timeout=60)
                print(future.cancelled(), flush=True)
                executor.shutdown(wait=True)
        """
        owner = start_script(script)
        try:
            app = make_app(EXECUTOR_FUTURES_STORE=store_url)
            executor = Executor(app)
            with app.app_context():
                wait_until(lambda: flag.exists() and executor.futures.running("long"))
                assert executor.futures.cancel("long") is True
                assert executor.futures.cancelled("long") is True  # at once, for every reader
                started = time.monotonic()
                wait_until(lambda: flag.read_text() == "stopped", timeout=5)
                assert time.monotonic() - started < 2
                assert owner.wait(TIMEOUT) == 0 and owner.stdout.read().split() == ["True"]
                assert executor.futures.cancel("long") is True  # the same answer again
        finally:
            owner.kill()
            owner.wait()

    @pytest.mark.parametrize("store", ["sqlite", "redis"])
    def test_cancel_answers_the_same_on_every_store(self, make_executor, store, request,
                                                    tmp_path):  # fmt: skip
        """pending, running, finished: what cancel() returns is what is read after."""
        if store == "redis":
            url = request.getfixturevalue("redis_server")
            import redis

            redis.Redis.from_url(url).flushall()
        else:
            url = f"sqlite:///{tmp_path}/f.db"
        app, executor = make_executor(EXECUTOR_FUTURES_STORE=url, EXECUTOR_MAX_WORKERS=1)
        with app.app_context():
            running = executor.submit_stored("running", write_until_stopped, str(tmp_path / "r"))
            pending = executor.submit_stored("pending", square, 2)
            wait_until(lambda: executor.futures.running("running"))
            view = executor.futures.get("running")  # read while it ran
            answers = [executor.futures.cancel("pending"), view.cancel()]
            assert answers == [True, True]
            assert executor.futures.cancelled("pending") and executor.futures.cancelled("running")
            assert pending.cancelled() and running.cancelled()
            done = executor.submit_stored("done", square, 3)
            assert done.result(TIMEOUT) == 9
            assert executor.futures.cancel("done") is False
            assert executor.futures.result("done") == 9


class SlowToPickle:
    """A result that takes 0.4 s to pickle: a process task returns it well before its limit,
    and it is still on its way back when the limit passes."""

    def __reduce__(self):
        time.sleep(0.4)
        return (SlowToPickle, ())


def return_slow_to_pickle() -> SlowToPickle:
    time.sleep(0.1)  # stored at 0.5 s (pickled once), back in the web process at 0.9 s
    return SlowToPickle()


def end_when_file_exists(path: str, started: str = "") -> str:
    """Ignore stop_requested(): end only once ``path`` exists (10 s at most)."""
    if started:
        Path(started).touch()
    deadline = time.monotonic() + 10
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.005)
    return "finished"


def ask_until_stopped(seconds: float) -> str:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if flask_executor.stop_requested():
            return "stopped"
        time.sleep(0.005)
    return "never asked"


class TestStopProbes:
    """What the prober of #20 found: each failed before its fix."""

    @pytest.mark.parametrize("store_url", ["sqlite", "redis"], indirect=True)
    def test_a_cancel_from_elsewhere_racing_the_tasks_end_reads_the_same_everywhere(
        self, make_executor, store_url, tmp_path
    ):
        flag = tmp_path / "flag"
        app, executor = make_executor(EXECUTOR_FUTURES_STORE=store_url)
        script = f"""
            from pathlib import Path
            from flask_executor import Executor
            from test_flask_executor import make_app
            app = make_app(EXECUTOR_FUTURES_STORE={store_url!r})
            with app.app_context():
                print(Executor(app).futures.cancel("k"), flush=True)
                Path({str(flag)!r}).touch()  # the task ends now, before its owner looks
        """
        with app.app_context():
            future = executor.submit_stored("k", end_when_file_exists, str(flag))
            wait_until(lambda: executor.futures.running("k"))
            assert run_script(script).stdout.split() == ["True"]
            cf.wait([future], timeout=TIMEOUT)
            assert future.cancelled() and executor.futures.cancelled("k")

    def test_process_stop_requests_never_leak_their_slots(self, make_executor, tmp_path):
        app, executor = make_executor(EXECUTOR_TYPE="process", EXECUTOR_MAX_WORKERS=1)
        with app.app_context():
            executor.submit(square, 1).result(TIMEOUT)
            for n in range(8):  # each ends while its cancel runs a slow done-callback
                future = executor.submit(end_when_file_exists, str(tmp_path / f"{n}"))
                wait_until(future.running)
                future.add_done_callback(lambda f: time.sleep(0.2))
                threading.Timer(0.05, (tmp_path / f"{n}").touch).start()
                future.cancel()
            wait_until(lambda: not any(executor._self._stops), timeout=5)
            asked = executor.submit(ask_until_stopped, 10)
            wait_until(lambda: (tmp_path / "7").exists() and asked.running())
            assert asked.cancel() is True
            wait_until(lambda: not any(executor._self._stops), timeout=5)  # it saw the stop

    def test_process_tasks_cancelled_in_the_call_queue_never_run(self, make_executor, tmp_path):
        app, executor = make_executor(EXECUTOR_TYPE="process", EXECUTOR_MAX_WORKERS=2)
        with app.app_context():
            executor.submit(square, 1).result(TIMEOUT)
            go, started = str(tmp_path / "go"), [str(tmp_path / f"h{n}") for n in range(2)]
            holders = [executor.submit(end_when_file_exists, go, path) for path in started]
            wait_until(lambda: all(os.path.exists(path) for path in started))  # in the workers
            assert all(f.cancel() for f in holders)  # they ignore it: their workers stay busy
            paths = [str(tmp_path / f"q{n}") for n in range(3)]
            queued = [executor.submit(write_until_stopped, path) for path in paths]
            wait_until(lambda: all(f.running() for f in queued))  # in the call queue
            assert all(f.cancel() for f in queued)
            (tmp_path / "go").touch()
            assert executor.submit(square, 3).result(TIMEOUT) == 9
            executor.shutdown(wait=True)
            assert [(tmp_path / f"q{n}").exists() for n in range(3)] == [False] * 3

    def test_a_process_limit_holds_after_its_start_slot_was_reused(
        self, make_executor, tmp_path, monkeypatch
    ):
        monkeypatch.setattr(flask_executor, "_STARTS", 64)  # fork: the workers see it too
        config = {"EXECUTOR_TIMEOUT": "3", "EXECUTOR_START_METHOD": "fork"}
        app, executor = make_executor(EXECUTOR_TYPE="process", EXECUTOR_MAX_WORKERS=2, **config)
        started = str(tmp_path / "started")
        with app.app_context():
            long = executor.submit(end_when_file_exists, "/nonexistent/never", started)
            done_at: list[float] = []
            long.add_done_callback(lambda f: done_at.append(time.monotonic()))
            wait_until(lambda: os.path.exists(started))
            began = time.monotonic()
            list(executor.map(int, range(200), chunksize=1))  # its start slot is reused
            assert isinstance(long.exception(TIMEOUT), flask_executor.TaskTimeout)
            assert done_at[0] - began < 3 + 2  # not at the task's own end (10 s)

    def test_a_process_task_that_returned_keeps_its_result_in_the_store_too(
        self, make_executor, tmp_path
    ):
        config = {"EXECUTOR_TIMEOUT": "0.6", "EXECUTOR_FUTURES_STORE": f"sqlite:///{tmp_path}/f.db"}
        app, executor = make_executor(EXECUTOR_TYPE="process", EXECUTOR_MAX_WORKERS=1, **config)
        with app.app_context():
            executor.submit(square, 1).result(TIMEOUT)
            future = executor.submit_stored("k", return_slow_to_pickle)
            local = type(future.exception(TIMEOUT)).__name__
            stored = type(executor.futures.exception("k", timeout=TIMEOUT)).__name__
            assert local == stored

    def test_a_slow_done_callback_never_holds_up_other_limits(self, make_executor):
        app, executor = make_executor(EXECUTOR_TIMEOUT="0.3", EXECUTOR_MAX_WORKERS=4)
        EVENTS["slow-callback"] = release = threading.Event()
        EVENTS["blocked"] = unblock = threading.Event()
        with app.app_context():
            first = executor.submit(nap, 10)
            first.add_done_callback(lambda f: release.wait(TIMEOUT))
            assert isinstance(first.exception(TIMEOUT), flask_executor.TaskTimeout)
            second = executor.submit(wait_event, "blocked")  # blocked: only the watchdog can
            started = time.monotonic()
            assert isinstance(second.exception(TIMEOUT), flask_executor.TaskTimeout)
            assert time.monotonic() - started < 0.3 + 0.5
            release.set()
            unblock.set()

    def test_a_time_limit_never_keeps_a_dropped_future_alive(self, make_executor):
        app, executor = make_executor(EXECUTOR_TIMEOUT="3600")
        with app.app_context():
            future = executor.submit(bytes, 1_000_000)
            assert len(future.result(TIMEOUT)) == 1_000_000
        ref = weakref.ref(future)
        del future
        gc.collect()
        assert ref() is None

    def test_a_pending_task_cancelled_from_elsewhere_is_cancelled_here_soon(
        self, make_executor, tmp_path
    ):
        url = f"sqlite:///{tmp_path}/f.db"
        app, executor = make_executor(EXECUTOR_FUTURES_STORE=url, EXECUTOR_MAX_WORKERS=1)
        script = f"""
            from flask_executor import Executor
            from test_flask_executor import make_app
            app = make_app(EXECUTOR_FUTURES_STORE={url!r})
            with app.app_context():
                print(Executor(app).futures.cancel("queued"), flush=True)
        """
        with app.app_context():
            executor.submit_stored("blocker", wait_for, str(tmp_path / "go"))
            queued = executor.submit_stored("queued", square, 2)
            assert run_script(script).stdout.split() == ["True"]
            cf.wait([queued], timeout=2)  # not only once the blocker ends
            assert queued.cancelled()
            (tmp_path / "go").touch()

    def test_a_limit_on_a_pool_with_futures_of_its_own_logs_no_error(self, make_executor,
                                                                    caplog):  # fmt: skip
        class OwnFutures(cf.Executor):
            def __init__(self) -> None:
                self.pool = cf.ThreadPoolExecutor(2)

            def submit(self, fn, /, *args, **kwargs):
                inner = self.pool.submit(fn, *args, **kwargs)
                outer = cf.Future()  # a Future subclass of its own would do the same
                outer.__class__ = type("TheirFuture", (cf.Future,), {})
                inner.add_done_callback(lambda f: outer.set_exception(f.exception()))
                return outer

        class OwnBackend(Backend):
            def create_pool(self, max_workers, config):
                return OwnFutures()

        app, executor = make_executor(EXECUTOR_TYPE=OwnBackend(), EXECUTOR_TIMEOUT="0.2")
        with app.app_context(), caplog.at_level(logging.ERROR):
            exc = executor.submit(ask_until_stopped, 5).exception(TIMEOUT)  # asked, it stopped
            assert isinstance(exc, flask_executor.TaskTimeout)
        assert "watchdog" not in caplog.text


def retry_for(seconds: float) -> str:
    """A retry loop with a bare except: it swallows anything raised into it."""
    gevent = sys.modules.get("gevent")
    in_greenlet = gevent is not None and gevent.getcurrent().parent is not None
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:  # noqa: SIM105
            (gevent.sleep if in_greenlet else time.sleep)(0.01)
        except:  # noqa: E722
            pass
    return "finished"


@pytest.mark.parametrize("worker", ["gthread", "gevent"])
def test_gunicorn_cancel_from_any_worker_stops_a_stored_task(worker, tmp_path):
    """Under gunicorn -w 4 with a SQLite store, a cancel POSTed on a new connection stops
    a cooperative stored task within 2 s, whichever worker takes the POST."""
    pytest.importorskip("gunicorn")
    if worker == "gevent":
        pytest.importorskip("gevent")
    port = free_port()
    argv = [sys.executable, "-m", "gunicorn", "-k", worker, "-w", "4", "--threads", "4",
            "-b", f"127.0.0.1:{port}", "test_flask_executor:stored_app()"]  # fmt: skip
    env = {"EXECUTOR_TYPE": "gevent" if worker == "gevent" else "thread",
           "EXECUTOR_FUTURES_STORE": f"sqlite:///{tmp_path}/futures.db"}  # fmt: skip
    server = Server(argv, port, **env)
    try:
        owners, takers = {}, {}
        for n in range(40):  # until two cancels were taken by another worker than the owner
            if sum(owners[k] != takers[k] for k in owners) >= 2:
                break
            flag = tmp_path / f"flag{n}"
            owners[n] = http_get(f"{server.base}/submit?key=k{n}&until_stopped={flag}")["pid"]
            wait_until(lambda flag=flag: flag.exists())
            data = urllib.parse.urlencode({"key": f"k{n}"}).encode()
            with urllib.request.urlopen(f"{server.base}/cancel", data, timeout=TIMEOUT) as reply:
                answer = json.loads(reply.read())
            assert answer["cancelled"] is True
            takers[n] = answer["pid"]
            started = time.monotonic()
            wait_until(lambda flag=flag: flag.read_text() == "stopped", timeout=5)
            assert time.monotonic() - started < 2, server.output()
            assert http_get(f"{server.base}/poll?key=k{n}")["done"] is True
        assert any(owners[n] != takers[n] for n in owners)  # taken by another worker
    finally:
        server.stop()


def test_readme_pebble_recipe(executors):
    pytest.importorskip("pebble")
    readme_recipe("pebble")
    try:
        app = make_app(EXECUTOR_TYPE="pebble", EXECUTOR_TIMEOUT="0.5", EXECUTOR_MAX_WORKERS=2)
        executor = Executor(app)
        executors.append(executor)
        with app.app_context():
            futures = [executor.submit(maybe_overrun, n) for n in range(10)]
            for n, future in enumerate(futures):
                if n % 5 == 4:
                    assert isinstance(future.exception(TIMEOUT), cf.TimeoutError)
                else:
                    assert future.result(TIMEOUT) == n * n
        app = make_app(EXECUTOR_TYPE="pebble", EXECUTOR_MAX_WORKERS=1)
        executor = Executor(app)
        executors.append(executor)
        with app.app_context():
            running = executor.submit(nap, 10)
            wait_until(running.running)
            assert running.cancel() is True and running.cancelled()
            assert executor.submit(square, 3).result(TIMEOUT) == 9  # a new worker serves
    finally:
        flask_executor.BACKENDS.pop("pebble", None)


def test_limits_and_cancel_under_gevent_monkey_patching():
    pytest.importorskip("gevent")
    result = run_script(
        """
        from gevent import monkey; monkey.patch_all()
        import concurrent.futures as cf
        from flask import Flask
        from flask_executor import Executor, TaskTimeout
        from test_flask_executor import maybe_overrun, nap
        for backend in ["thread", "gevent"]:
            app = Flask("patched")
            app.config.update(EXECUTOR_TYPE=backend, EXECUTOR_TIMEOUT=0.3, EXECUTOR_MAX_WORKERS=4)
            executor = Executor(app)
            with app.app_context():
                futures = [executor.submit(maybe_overrun, n) for n in range(10)]
                outcomes = [type(f.exception(30)).__name__ for f in futures]
                expected = (["NoneType"] * 4 + ["TaskTimeout"]) * 2
                assert outcomes == expected, outcomes
                running = executor.submit(nap, 0.25)
                while not running.running():
                    nap(0.01)
                assert running.cancel() and running.cancelled()
                assert executor.submit(maybe_overrun, 3).result(30) == 9
            executor.shutdown()
        print("ok")
        """
    )
    assert result.stdout.strip() == "ok", result.stderr


class TestStopLeftovers:
    """What a stop leaves behind: nothing kept alive, no watchdog lost."""

    def test_the_watchdog_survives_pruning_every_entry(self):
        watchdog = flask_executor._Watchdog()  # not started: add() alone
        done: list[cf.Future] = []
        for _ in range(2048):  # pruned at each multiple of 1024, when all are done
            future = cf.Future()
            future.set_result(None)
            done.append(future)
            watchdog.add(flask_executor._Limit(future, lambda: None, square, 10.0))
        assert watchdog.due == []  # the 2048th add pruned them all, and did not raise

    def test_a_stopped_task_and_its_arguments_need_no_gc(self, make_executor):
        app, executor = make_executor()
        started = threading.Event()

        class Arg:
            pass

        def task(arg):
            started.set()
            while not flask_executor.stop_requested():
                time.sleep(0.005)

        arg = Arg()
        freed = weakref.ref(arg)
        gc.disable()  # the stop error's traceback must not hold the task's frames in a cycle
        try:
            with app.app_context():
                future = executor.submit(task, arg)
                del arg
                assert started.wait(TIMEOUT)
                assert future.cancel()
            wait_until(lambda: freed() is None)
        finally:
            gc.enable()


# -- 8. Shared stores: SQLite and Redis (EXECUTOR_FUTURES_STORE) ---------------------


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A real redis-server on 127.0.0.1 for the whole run, stopped at the end."""
    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is not installed: .ci/run installs it with apt-get")
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    pytest.importorskip("redis")
    port = free_port()
    folder = tmp_path_factory.mktemp("redis")
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(folder)]  # fmt: skip
    server = subprocess.Popen(argv, stdout=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "no redis-server"
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)
        server.wait(TIMEOUT)


@pytest.fixture(params=["sqlite", "redis"])
def store_url(request, tmp_path):
    """A fresh shared store's URL: a new SQLite file, or the Redis server emptied."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/futures.db"  # sqlite:////abs/path: an absolute path
    url = request.getfixturevalue("redis_server")
    import redis

    redis.Redis.from_url(url).flushall()
    return url


def wait_until(check, timeout: float = TIMEOUT) -> None:
    """Poll ``check()`` (a read of state another process, a store or a pool holds) until
    true; under gevent, letting the hub run the greenlets meanwhile."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {check}"
        gevent = sys.modules.get("gevent")
        (gevent.sleep if gevent is not None else time.sleep)(0.01)


def wait_event(event_name: str) -> str:
    """A thread task that blocks on a named module-level Event (set by the test)."""
    STARTED.set()
    EVENTS[event_name].wait(TIMEOUT)
    return event_name


STARTED = threading.Event()
EVENTS: dict[str, threading.Event] = {}


def start_blocked(executor: Executor, key: str) -> threading.Event:
    """Store a thread task that blocks; return, once it runs, the Event that releases it."""
    EVENTS[key] = release = threading.Event()
    STARTED.clear()
    executor.submit_stored(key, wait_event, key)
    assert STARTED.wait(TIMEOUT)
    return release


class TestSharedStores:
    @pytest.mark.parametrize("backend", ["thread", "process", "gevent"])
    def test_reads_by_key_match_a_local_future(self, make_executor, store_url, backend):
        if backend == "gevent":
            pytest.importorskip("gevent")
        app, executor = make_executor(EXECUTOR_TYPE=backend, EXECUTOR_FUTURES_STORE=store_url)
        with app.app_context():
            future = executor.submit_stored("k", square, 5)
            assert future.result(TIMEOUT) == 25
            futures = executor.futures
            assert futures.result("k", timeout=TIMEOUT) == 25
            assert futures.done("k") is True and futures._state("k") == "FINISHED"
            assert futures.exception("k") is None
            assert futures.running("k") is False and futures.cancelled("k") is False
            assert futures["k"].result() == 25 and futures.get("k").done()
            assert futures.keys() == ["k"] and list(futures) == ["k"] and len(futures) == 1
            assert future in futures and futures.items()[0][0] == "k"
            assert futures.get("k") in futures and cf.Future() not in futures
            for read in ("done", "running", "cancelled", "_state", "result", "exception"):
                assert getattr(futures, read)("missing") is None
            assert futures.get("missing") is None and futures.pop("missing") is None
            with pytest.raises(KeyError):
                futures["missing"]
            popped = futures.pop("k")
            assert isinstance(popped, cf.Future) and popped.done() and popped.result() == 25
            assert futures.pop("k") is None and len(futures) == 0 and futures.keys() == []
            for n in range(30):  # once the submitter's future has its result, so does the store
                executor.submit_stored(n, square, n).result(TIMEOUT)
                assert futures.done(n) is True and futures.pop(n).result() == n * n

    def test_add_keeps_any_future_in_the_store(self, make_executor, store_url):
        app, executor = make_executor(EXECUTOR_FUTURES_STORE=store_url)
        with app.app_context():
            future: cf.Future = cf.Future()
            executor.futures.add("mine", future)
            assert executor.futures.done("mine") is False and future in executor.futures
            future.set_result([1, 2])
            assert executor.futures.result("mine", timeout=TIMEOUT) == [1, 2]

    def test_pop_of_a_running_task_resolves_when_it_finishes(self, make_executor, store_url):
        app, executor = make_executor(EXECUTOR_FUTURES_STORE=store_url)
        with app.app_context():
            release = start_blocked(executor, "r")
            popped = executor.futures.pop("r")
            assert popped.running() and executor.futures.get("r") is None
            executor.submit_stored("r", square, 4)  # the key is free again at once
            release.set()
            assert popped.result(TIMEOUT) == "r"
            assert executor.futures.result("r", timeout=TIMEOUT) == 16
            assert executor.futures.store.keys() == ["s:r"]  # the new row holds the key

    def test_a_view_keeps_reading_its_own_task_after_pop_and_reuse(self, make_executor, store_url):
        app, executor = make_executor(EXECUTOR_FUTURES_STORE=store_url, EXECUTOR_MAX_WORKERS=1)
        EVENTS["reuse"] = release = threading.Event()
        with app.app_context():
            executor.submit_stored("k", str, "first").result(TIMEOUT)
            view = executor.futures.get("k")
            executor.futures.pop("k")
            executor.submit_stored("k", str, "second").result(TIMEOUT)
            assert view.result() == "first" and executor.futures.result("k") == "second"
            blocker = executor.submit_stored("block", wait_event, "reuse")
            executor.submit_stored("q", str, "old")
            old = executor.futures.get("q")
            executor.futures.pop("q")
            new = executor.submit_stored("q", str, "new")
            assert old.cancel() is True  # the popped task, still queued: not the new one
            release.set()
            assert new.result(TIMEOUT) == "new" and executor.futures.result("q") == "new"
            assert old.cancelled() and blocker.result(TIMEOUT) == "reuse"

    def test_a_reader_waiting_on_a_key_gets_its_result_though_another_pops_it(
        self, make_executor, store_url
    ):
        app, executor = make_executor(EXECUTOR_FUTURES_STORE=store_url)
        with app.app_context():
            release = start_blocked(executor, "w")
            waiting = executor.futures.get("w")
            reader = cf.ThreadPoolExecutor(1).submit(waiting.result, TIMEOUT)
            popped = executor.futures.pop("w")  # popped while the reader waits
            release.set()
            assert reader.result(TIMEOUT) == "w" and popped.result(TIMEOUT) == "w"

    def test_a_popped_running_future_is_not_dropped_by_the_bound(self, make_executor, store_url):
        app, executor = make_executor(EXECUTOR_FUTURES_STORE=store_url,
                                      EXECUTOR_FUTURES_MAX_LENGTH=2)  # fmt: skip
        with app.app_context():
            release = start_blocked(executor, "r")
            popped = executor.futures.pop("r")
            for n in range(5):
                executor.submit_stored(n, square, n).result(TIMEOUT)
            assert len(executor.futures) == 2
            release.set()
            assert popped.result(TIMEOUT) == "r"

    def test_an_outcome_the_store_failed_to_take_is_stored_again(
        self, make_executor, store_url, monkeypatch
    ):
        app, executor = make_executor(EXECUTOR_FUTURES_STORE=store_url)
        store = executor.futures.store
        failures = [ConnectionError("the store is away")]
        real_finish = store.finish

        def finish(token, outcome, wait):
            if failures:
                raise failures.pop()
            return real_finish(token, outcome, wait)

        monkeypatch.setattr(store, "finish", finish)
        with app.app_context():
            assert executor.submit_stored("k", square, 7).result(TIMEOUT) == 49  # not the error
            assert executor.futures.result("k", timeout=TIMEOUT) == 49 and failures == []

    def test_a_job_of_the_process_backend(self, executors, store_url):
        app = make_app(JOBS_EXECUTOR_TYPE="process", JOBS_EXECUTOR_FUTURES_STORE=store_url)
        job_executor.init_app(app)
        executors.append(job_executor)
        with app.app_context():
            assert cube.submit_stored("job", 6).result(TIMEOUT) == 216
            assert job_executor.futures.result("job", timeout=TIMEOUT) == 216

    def test_a_failed_submit_leaves_the_key_free(self, make_executor, store_url):
        app, executor = make_executor(EXECUTOR_FUTURES_STORE=store_url)
        with app.app_context():
            executor.shutdown()
            with pytest.raises(RuntimeError, match="after shutdown"):
                executor.submit_stored("k", square, 1)
            assert executor.futures.get("k") is None and executor.futures.keys() == []

    def test_cancel_through_the_store_cancels_the_submitters_future(self, make_executor, store_url):
        app, executor = make_executor(EXECUTOR_FUTURES_STORE=store_url, EXECUTOR_MAX_WORKERS=1,
                                      EXECUTOR_PROPAGATE_EXCEPTIONS=True)  # fmt: skip
        EVENTS["local"] = release = threading.Event()
        with app.app_context():
            blocker = executor.submit_stored("a", wait_event, "local")
            queued = executor.submit_stored("b", square, 2)
            assert executor.futures.cancel("b") is True
            release.set()
            assert blocker.result(TIMEOUT) == "local"
            cf.wait([queued], timeout=TIMEOUT)
            assert queued.cancelled()

    def test_a_replaced_file_is_opened_again_by_every_process(self, tmp_path):
        url = f"sqlite:///{tmp_path}/futures.db"
        first = Executor(make_app(EXECUTOR_FUTURES_STORE=url))
        with first._apps[0]().app_context():
            first.submit_stored("before", square, 1).result(TIMEOUT)
            for name in ("futures.db", "futures.db-wal", "futures.db-shm"):
                (tmp_path / name).unlink(missing_ok=True)
            first.submit_stored("after", square, 2).result(TIMEOUT)
            assert first.futures.keys() == ["after"]
        second = Executor(make_app(EXECUTOR_FUTURES_STORE=url))  # as a new worker would
        with second._apps[0]().app_context():
            assert second.futures.keys() == ["after"] and second.futures.result("after") == 4
        first.shutdown()
        second.shutdown()

    def test_a_store_unpickled_in_a_worker_opens_on_first_use(self, tmp_path):
        dead = f"redis://127.0.0.1:{free_port()}/0"
        pytest.importorskip("redis")
        store = flask_executor._shared_store(flask_executor.RedisStore, dead, "ns", 15.0)
        with pytest.raises(Exception, match=r"Connection refused|Error"):
            store.read("s:k")  # the task that uses it fails, not the worker unpickling it
        store = flask_executor._shared_store(flask_executor.SQLiteStore, str(tmp_path), "ns")
        with pytest.raises(sqlite3.OperationalError):
            store.read("s:k")

    def test_the_process_pool_survives_a_store_gone_away(self, make_executor, tmp_path):
        pytest.importorskip("redis")
        port = free_port()
        argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
        if shutil.which("redis-server") is None:
            pytest.skip("redis-server is not installed")
        server = subprocess.Popen(argv, stdout=subprocess.DEVNULL, start_new_session=True)
        try:
            wait_until(lambda: subprocess.run(["redis-cli", "-p", str(port), "ping"],
                                              capture_output=True).returncode == 0)  # fmt: skip
            url = f"redis://127.0.0.1:{port}/0"
            app, executor = make_executor(EXECUTOR_TYPE="process", EXECUTOR_FUTURES_STORE=url,
                                          EXECUTOR_MAX_WORKERS=1)  # fmt: skip
            with app.app_context():
                assert executor.submit_stored("up", square, 2).result(TIMEOUT) == 4
                server.kill()
                server.wait(TIMEOUT)
                plain = [executor.submit(square, n) for n in range(3)]
                assert [f.result(TIMEOUT) for f in plain] == [0, 1, 4]  # no BrokenProcessPool
        finally:
            server.kill()
            server.wait(TIMEOUT)

    def test_a_key_in_use_is_refused_and_nothing_queued(self, make_executor, store_url, tmp_path):
        app, executor = make_executor(EXECUTOR_FUTURES_STORE=store_url)
        log = str(tmp_path / "ran")
        with app.app_context():
            executor.submit_stored("dup", append_line, log, 1).result(TIMEOUT)
            with pytest.raises(ValueError, match="'dup' already exists"):
                executor.submit_stored("dup", append_line, log, 2)
            executor.shutdown(wait=True)
        assert Path(log).read_text() == "1\n"

    def test_pending_running_cancel_and_timeout(self, make_executor, store_url):
        app, executor = make_executor(EXECUTOR_FUTURES_STORE=store_url, EXECUTOR_MAX_WORKERS=1)
        EVENTS["release"] = release = threading.Event()
        STARTED.clear()
        with app.app_context():
            running = executor.submit_stored("a", wait_event, "release")
            queued = executor.submit_stored("b", square, 3)
            assert STARTED.wait(TIMEOUT)
            futures = executor.futures
            assert futures.running("a") is True and futures._state("a") == "RUNNING"
            assert futures.done("b") is False and futures._state("b") == "PENDING"
            with pytest.raises(cf.TimeoutError, match=r"'a' did not finish within 0\.05 s"):
                futures.result("a", timeout=0.05)
            assert futures.cancel("b") is True and futures.cancel("b") is True
            assert futures.cancelled("b") is True and futures.done("b") is True
            view = futures.get("a")
            seen: list[object] = []
            view.add_done_callback(lambda f: seen.append(f.result()))
            release.set()
            assert futures.result("a", timeout=TIMEOUT) == "release"
            assert view.done() and seen == ["release"]  # run by the read that saw it finish
            with pytest.raises(cf.CancelledError):
                queued.result(TIMEOUT)  # the local future: its task never ran
            with pytest.raises(cf.CancelledError):
                futures.result("b")
            assert futures.cancel("a") is False and futures.pop("b").cancelled()
            assert running.result() == "release"

    @pytest.mark.parametrize("backend", BACKENDS)
    def test_exception_comes_back_with_its_traceback_text(self, make_executor, store_url, backend):
        app, executor = make_executor(EXECUTOR_TYPE=backend, EXECUTOR_FUTURES_STORE=store_url)
        with app.app_context():
            executor.submit_stored("e", fail, "boom")
            exc = executor.futures.exception("e", timeout=TIMEOUT)
            assert isinstance(exc, ValueError) and str(exc) == "boom"
            assert "raise ValueError(message)" in str(exc.__cause__)
            with pytest.raises(ValueError, match="boom"):
                executor.futures.pop("e").result()

    def test_what_cannot_be_pickled_reads_as_failed_naming_task_and_type(
        self, make_executor, store_url
    ):
        app, executor = make_executor(EXECUTOR_FUTURES_STORE=store_url)
        with app.app_context():
            local = executor.submit_stored("lock", return_lock)
            executor.submit_stored("two", raise_needs_two_args)
            with pytest.raises(TypeError, match=r"return_lock finished, but its lock result"):
                executor.futures.result("lock", timeout=TIMEOUT)
            with pytest.raises(TypeError, match=r"raise_needs_two_args .* its NeedsTwoArgs"):
                executor.futures.result("two", timeout=TIMEOUT)
            assert local.result() is not None  # the submitter's own future is not pickled

    def test_int_keys_and_keys_a_store_cannot_keep(self, make_executor, store_url):
        app, executor = make_executor(EXECUTOR_FUTURES_STORE=store_url)
        with app.app_context():
            executor.submit_stored(7, square, 2).result(TIMEOUT)
            executor.submit_stored("7", square, 3).result(TIMEOUT)
            assert executor.futures.keys() == [7, "7"]
            assert executor.futures.result(7) == 4 and executor.futures.result("7") == 9
            with pytest.raises(TypeError, match=r"str or int keys, got \(1, 2\) .* str\(key\)"):
                executor.submit_stored((1, 2), square, 1)
            assert executor.futures.done((1, 2)) is None

    def test_max_length_and_ttl_bound_the_store(self, make_executor, store_url, caplog):
        app, executor = make_executor(EXECUTOR_FUTURES_STORE=store_url, EXECUTOR_MAX_WORKERS=1,
                                      EXECUTOR_FUTURES_MAX_LENGTH=3)  # fmt: skip
        EVENTS["bound"] = release = threading.Event()
        with app.app_context():
            for n in range(5):
                executor.submit_stored(n, square, n).result(TIMEOUT)
            assert executor.futures.keys() == [2, 3, 4] and len(executor.futures) == 3
            blockers = [executor.submit_stored(f"b{n}", wait_event, "bound") for n in range(4)]
            assert executor.futures.keys() == ["b1", "b2", "b3"]
            assert "dropped the stored future 'b0' while its task was still running" in caplog.text
            release.set()
            assert [b.result(TIMEOUT) for b in blockers] == ["bound"] * 4  # dropped, not lost
            store = executor.futures.store
            assert store.claim("s:new", "tok", "me", "t", None, 0.0) == []  # ttl 0: finished go
            assert executor.futures.keys() == ["new"]

    def test_ttl_is_read_from_config(self, make_executor, store_url):
        app, executor = make_executor(EXECUTOR_FUTURES_STORE=store_url, EXECUTOR_FUTURES_TTL="60")
        with app.app_context():
            assert executor.futures.ttl == 60
        app, executor = make_executor(EXECUTOR_FUTURES_STORE=store_url)
        assert app.config["EXECUTOR_FUTURES_TTL"] is None  # the default, set by init_app

    @pytest.mark.parametrize("backend", BACKENDS)
    def test_stored_state_read_from_another_process(self, store_url, backend, tmp_path):
        """A task owned by one process, read by another: pending, running, then finished."""
        script = f"""
            import concurrent.futures as cf
            from flask_executor import Executor
            from test_flask_executor import make_app, wait_for
            app = make_app(EXECUTOR_FUTURES_STORE={store_url!r}, EXECUTOR_TYPE={backend!r},
                           EXECUTOR_MAX_WORKERS=1)
            executor = Executor(app)
            with app.app_context():
                future = executor.submit_stored("x", wait_for, {str(tmp_path / "go")!r})
                queued = executor.submit_stored("y", wait_for, {str(tmp_path / "go")!r})
                cf.wait([queued], timeout=60)
                print(future.result(60), queued.cancelled(), flush=True)
        """
        owner = start_script(script)
        try:
            app = make_app(EXECUTOR_FUTURES_STORE=store_url)
            executor = Executor(app)
            with app.app_context():
                futures = executor.futures  # both keys claimed there, "x" started
                wait_until(lambda: futures.running("x") and futures.get("y") is not None)
                assert executor.futures.done("x") is False
                with pytest.raises(ValueError, match="already exists"):
                    executor.submit_stored("x", square, 1)
                assert executor.futures.cancel("y") is True  # queued in the other process
                Path(tmp_path / "go").touch()
                assert executor.futures.result("x", timeout=TIMEOUT) == str(tmp_path / "go")
                assert executor.futures.cancelled("y") is True
                assert owner.wait(TIMEOUT) == 0
                assert owner.stdout.read().split() == [str(tmp_path / "go"), "True"]  # its own
                # future reads cancelled too, as if cancelled there
        finally:
            owner.kill()
            owner.wait()

    def test_a_killed_owner_reads_as_lost_within_seconds(self, store_url, tmp_path):
        script = f"""
            import os, sys
            from flask_executor import Executor
            from test_flask_executor import make_app, wait_for
            app = make_app(EXECUTOR_FUTURES_STORE={store_url!r})
            executor = Executor(app)
            with app.app_context():
                executor.submit_stored("orphan", wait_for, {str(tmp_path / "never")!r}, 600)
                executor.submit_stored("queued", wait_for, {str(tmp_path / "never")!r}, 600)
                os.write(1, b"%d\\n" % os.getpid())
                wait_for({str(tmp_path / "never")!r}, 600)
        """
        owner = start_script(script)
        try:
            pid = int(owner.stdout.readline())
            app = make_app(EXECUTOR_FUTURES_STORE=store_url)
            executor = Executor(app)
            with app.app_context():
                wait_until(lambda: executor.futures.running("orphan"))  # its thread started it
                os.kill(pid, signal.SIGKILL)
                owner.wait(TIMEOUT)
                killed_at = time.monotonic()
                wait_until(lambda: executor.futures.done("orphan"), timeout=5)
                assert time.monotonic() - killed_at < 5
                for key in ("orphan", "queued"):
                    exc = executor.futures.exception(key)
                    assert isinstance(exc, cf.BrokenExecutor)
                    assert executor.futures.store.read(f"s:{key}").state == "finished"  # for all
                    assert f"{key!r} is lost" in str(exc) and f"/{pid}:" in str(exc)
                    assert "wait_for" in str(exc)
        finally:
            owner.kill()
            owner.wait()

    def test_pop_succeeds_in_exactly_one_process(self, store_url):
        app, executor = make_app(EXECUTOR_FUTURES_STORE=store_url), None
        executor = Executor(app)
        with app.app_context():
            for n in range(40):
                executor.submit_stored(f"p{n}", square, n)
            for n in range(40):
                executor.futures.result(f"p{n}", timeout=TIMEOUT)
        with multiprocessing.get_context("spawn").Pool(4) as pool:
            popped = pool.starmap(pop_all, [(store_url, 40)] * 4, chunksize=1)
        executor.shutdown()
        winners = sorted(key for part in popped for key, _ in part)
        assert winners == sorted(f"p{n}" for n in range(40))  # each key once, in total
        assert all(result == int(key[1:]) ** 2 for part in popped for key, result in part)

    def test_processes_booting_on_a_fresh_file_at_once(self, tmp_path):
        ctx = multiprocessing.get_context("spawn")
        for round_ in range(3):
            url = f"sqlite:///{tmp_path}/boot{round_}.db"
            barrier, results = ctx.Barrier(6), ctx.Queue()
            booting = [ctx.Process(target=boot_and_store, args=(url, barrier, results, n))
                       for n in range(6)]  # fmt: skip
            for process in booting:
                process.start()
            got = sorted(results.get(timeout=TIMEOUT) for _ in booting)
            for process in booting:
                process.join(TIMEOUT)
            assert got == [n * n for n in range(6)]

    def test_redis_owner_on_another_machine_is_lost_once_its_lease_runs_out(self, redis_server):
        import redis

        redis.Redis.from_url(redis_server).flushall()
        store = flask_executor.RedisStore(redis_server, "lease-test", lease=1.0)
        app = make_app(EXECUTOR_FUTURES_STORE=store)
        executor = Executor(app)
        elsewhere = "another-host/another-boot/4242:1"
        with app.app_context():
            assert store.claim("s:remote", "t1", elsewhere, "their.task", None, None) == []
            for _ in range(3):  # its lease is renewed: still alive after more than a lease
                time.sleep(0.5)
                assert executor.futures.done("remote") is False
            del flask_executor._RENEWING[os.getpid(), redis_server, elsewhere, 1.0]  # gone
            wait_until(lambda: executor.futures.done("remote"), timeout=5)
            with pytest.raises(cf.BrokenExecutor, match=r"another-host.* their\.task is gone"):
                executor.futures.result("remote")


class DictStore(flask_executor.FuturesStore):
    """A user's own store: the protocol's methods over dicts, for one process (no limits)."""

    def __init__(self) -> None:
        self.rows: dict[str, list] = {}  # token: [key, state, owner, task, outcome]
        self.lock = threading.Lock()

    def _token(self, key: str) -> str | None:
        return next((t for t, row in self.rows.items() if row[0] == key), None)

    def claim(self, key, token, owner, task, max_length, ttl):
        with self.lock:
            if self._token(key) is not None:
                return None
            self.rows[token] = [key, "pending", owner, task, None]
            return []

    def start(self, token, wait):
        with self.lock:
            row = self.rows.get(token)
            if row is not None and row[1] == "pending":
                row[1] = "running"
            return row is None or row[1] != "cancelled"

    def finish(self, token, outcome, wait):
        with self.lock:
            row = self.rows.get(token)
            if row is None or row[1] not in ("pending", "running"):
                return False
            row[1], row[4] = ("cancelled", None) if outcome is None else ("finished", outcome)
            return True

    def forget(self, token):
        self.rows.pop(token, None)

    def read(self, key="", token=""):
        token = self._token(key) if key else token
        row = self.rows.get(token)
        return None if row is None else flask_executor.Row(token, *row[1:4])

    def outcome(self, token):
        return self.rows[token][4] if token in self.rows else None

    def cancel(self, token):
        with self.lock:
            row = self.rows.get(token)
            if row is not None and row[1] in ("pending", "running"):
                row[1] = "cancelled"
            return row is not None and row[1] == "cancelled"

    def pop(self, key):
        with self.lock:
            token = self._token(key)
            if token is not None:
                self.rows[token][0] = f"d:{token}"
            return self.read(token=token) if token else None

    def keys(self):
        return [row[0] for row in self.rows.values() if not row[0].startswith("d:")]

    def alive(self, owner):
        return True


def test_a_store_of_your_own(make_executor):
    store = DictStore()
    app, executor = make_executor(EXECUTOR_FUTURES_STORE=store)
    with app.app_context():
        assert executor.submit_stored("mine", square, 6).result(TIMEOUT) == 36
        assert executor.futures.done("mine") and executor.futures.result("mine") == 36
        with pytest.raises(ValueError, match="already exists"):
            executor.submit_stored("mine", square, 1)
        executor.submit_stored("bad", fail, "no")
        with pytest.raises(ValueError, match="no"):
            executor.futures.result("bad", timeout=TIMEOUT)
        assert (
            executor.futures.keys() == ["mine", "bad"] and store.read("s:mine").state == "finished"
        )
        assert executor.futures.pop("mine").result() == 36 and executor.futures.pop("mine") is None


HOLD_LOCK = """
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN " + (sys.argv[3] if len(sys.argv) > 3 else "IMMEDIATE"))
print("locked", flush=True)
time.sleep(float(sys.argv[2]) if len(sys.argv) > 2 else 1.5)
db.execute("COMMIT")
"""


@contextlib.contextmanager
def sqlite_locked(path: str, seconds: int = 6) -> Iterator[subprocess.Popen]:
    """Another program holds the SQLite file's lock (BEGIN EXCLUSIVE) for ``seconds``."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, path, str(seconds), "EXCLUSIVE"],
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield holder
    finally:
        holder.wait(TIMEOUT)


def test_gevent_keeps_running_while_sqlite_is_locked(tmp_path):
    """A locked SQLite store is waited for in gevent sleeps: other greenlets keep running."""
    pytest.importorskip("gevent")
    url, path = f"sqlite:///{tmp_path}/futures.db", str(tmp_path / "futures.db")
    result = run_script(
        f"""
        from gevent import monkey; monkey.patch_all()
        import subprocess, sys, time, gevent
        from flask_executor import Executor
        from test_flask_executor import HOLD_LOCK, make_app, square
        app = make_app(EXECUTOR_TYPE="gevent", EXECUTOR_FUTURES_STORE={url!r})
        executor = Executor(app)
        holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, {path!r}],
                                  stdout=subprocess.PIPE, text=True)
        assert holder.stdout.readline().strip() == "locked"
        gaps, last = [], [time.monotonic()]
        def tick():
            while True:
                gevent.sleep(0.01)
                gaps.append(time.monotonic() - last[0])
                last[0] = time.monotonic()
        ticker = gevent.spawn(tick)
        with app.app_context():
            started = time.monotonic()
            assert executor.submit_stored("k", square, 3).result(30) == 9
            waited = time.monotonic() - started
        ticker.kill()
        holder.wait(30)
        print(f"{{waited:.2f}} {{max(gaps, default=waited):.3f}}")  # no tick: blocked
        """
    )
    assert result.returncode == 0, result.stderr
    waited, longest_gap = map(float, result.stdout.split())
    assert waited > 1.0  # it did wait for the lock
    assert longest_gap < 0.5, result.stdout  # and the hub ran other greenlets meanwhile


def start_redis(port: int, folder: Path) -> subprocess.Popen:
    """A redis-server of the test's own on 127.0.0.1 (no persistence), waited for."""
    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is not installed: .ci/run installs it with apt-get")
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(folder)]  # fmt: skip
    server = subprocess.Popen(argv, stdout=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + TIMEOUT
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server
        except OSError:
            assert server.poll() is None and time.monotonic() < deadline, "no redis-server"
            time.sleep(0.05)


def stop_redis(server: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGKILL)
    server.wait(TIMEOUT)


def plant(url: str, key: str, blob: bytes) -> None:
    """Write ``blob`` as the stored outcome of ``key``, as anyone with write access could."""
    if url.startswith("sqlite"):
        with contextlib.closing(sqlite3.connect(url[len("sqlite:///") :])) as db, db:
            db.execute("UPDATE executor_rows SET outcome = ? WHERE key = ?", (blob, f"s:{key}"))
    else:
        import redis

        client = redis.Redis.from_url(url)
        for hash_key in client.keys("flask_executor:*:keys"):
            token = client.hget(hash_key, f"s:{key}")
            if token is not None:
                client.hset(hash_key[: -len(b"keys")] + b"row:" + token, "outcome", blob)


class Planted:
    """A pickle that runs code when it is unpickled: it writes a file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path(self.path).write_text, ("the planted pickle ran",))


class TestStoresHoldTheirGround:
    """Resets, replaced files, popped futures, signed outcomes, leaks (#21)."""

    def test_a_reset_sqlite_store_never_serves_one_keys_outcome_for_another(
        self, make_executor, tmp_path
    ):
        path = tmp_path / "futures.db"
        app, executor = make_executor(EXECUTOR_FUTURES_STORE=f"sqlite:///{path}")
        with app.app_context():
            old = executor.submit_stored("old", wait_for, str(tmp_path / "old-go"))
            wait_until(lambda: executor.futures.running("old"))
            for name in ("futures.db", "futures.db-wal", "futures.db-shm"):
                (tmp_path / name).unlink(missing_ok=True)  # the store is reset
            new = executor.submit_stored("new", wait_for, str(tmp_path / "new-go"))
            (tmp_path / "old-go").touch()
            assert old.result(TIMEOUT) == str(tmp_path / "old-go")
            assert executor.futures.done("new") is False  # the old task's finish went nowhere
            (tmp_path / "new-go").touch()
            assert new.result(TIMEOUT) == str(tmp_path / "new-go")
            assert executor.futures.result("new", timeout=TIMEOUT) == str(tmp_path / "new-go")

    def test_a_restarted_redis_never_serves_one_keys_outcome_for_another(
        self, make_executor, tmp_path
    ):
        port = free_port()
        server = start_redis(port, tmp_path)
        try:
            url = f"redis://127.0.0.1:{port}/0"
            app, executor = make_executor(EXECUTOR_FUTURES_STORE=url)
            with app.app_context():
                old = executor.submit_stored("old", wait_for, str(tmp_path / "old-go"))
                wait_until(lambda: executor.futures.running("old"))
                stop_redis(server)  # restarted without persistence: empty, ids from 1 again
                server = start_redis(port, tmp_path)
                new = executor.submit_stored("new", wait_for, str(tmp_path / "new-go"))
                (tmp_path / "old-go").touch()
                assert old.result(TIMEOUT) == str(tmp_path / "old-go")
                assert executor.futures.done("new") is False
                (tmp_path / "new-go").touch()
                assert new.result(TIMEOUT) == str(tmp_path / "new-go")
                assert executor.futures.result("new", timeout=TIMEOUT) == str(tmp_path / "new-go")
        finally:
            stop_redis(server)

    def test_a_popped_future_keeps_its_outcome_for_a_day(self, make_executor, store_url,
                                                         tmp_path):  # fmt: skip
        app, executor = make_executor(EXECUTOR_FUTURES_STORE=store_url)
        with app.app_context():
            executor.submit_stored("report", wait_for, str(tmp_path / "go"))
            popped = executor.futures.pop("report")
            (tmp_path / "go").touch()
            wait_until(popped.done)
            age_popped_rows(store_url, 62)  # as if read 62 s later
            executor.submit_stored("other", square, 2).result(TIMEOUT)  # a claim cleans up
            assert executor.futures.pop("report") is None
            assert popped.result(TIMEOUT) == str(tmp_path / "go")
            executor.submit_stored("later", wait_for, str(tmp_path / "go"))
            late = executor.futures.pop("later")
            wait_until(late.done)
            age_popped_rows(store_url, 25 * 3600)  # past the documented limit: named
            executor.submit_stored("more", square, 2).result(TIMEOUT)
            with pytest.raises(KeyError, match="popped futures are kept 24 hours"):
                late.result(TIMEOUT)

    def test_a_deleted_or_replaced_sqlite_file_is_opened_again_by_two_processes(self, tmp_path):
        url, path = f"sqlite:///{tmp_path}/futures.db", tmp_path / "futures.db"
        script = f"""
            import os, time
            from flask_executor import Executor
            from test_flask_executor import make_app, square, wait_for
            app = make_app(EXECUTOR_FUTURES_STORE={url!r})
            executor = Executor(app)
            with app.app_context():
                for n, step in enumerate(["start", "deleted", "replaced"]):
                    wait_for({str(tmp_path)!r} + "/" + step)
                    executor.submit_stored(f"b-{{step}}", square, n).result(30)
                    print(executor.futures.result(f"b-{{step}}", timeout=30), flush=True)
        """
        other = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)], cwd=HERE,
                                 env={**os.environ, "PYTHONPATH": str(HERE)},
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True)  # fmt: skip
        try:
            app = make_app(EXECUTOR_FUTURES_STORE=url)
            executor = Executor(app)
            with app.app_context():
                executor.submit_stored("a-start", square, 5).result(TIMEOUT)
                (tmp_path / "start").touch()
                said = other.stdout.readline().strip()  # both hold connections after it
                assert said == "0", said or other.communicate(timeout=TIMEOUT)[1]
                path.unlink()  # its -wal and -shm stay
                (tmp_path / "deleted").touch()
                assert executor.submit_stored("a-deleted", square, 6).result(TIMEOUT) == 36
                assert executor.futures.result("a-deleted", timeout=TIMEOUT) == 36
                said = other.stdout.readline().strip()
                assert said == "1", said or other.communicate(timeout=TIMEOUT)[1]
                with contextlib.closing(sqlite3.connect(tmp_path / "other.db")) as db:
                    db.execute("CREATE TABLE unrelated (x)")
                os.replace(tmp_path / "other.db", path)  # replaced under both processes
                (tmp_path / "replaced").touch()
                assert executor.submit_stored("a-replaced", square, 7).result(TIMEOUT) == 49
                assert executor.futures.result("a-replaced", timeout=TIMEOUT) == 49
                assert other.stdout.readline().strip() == "4", other.stderr.read()
                assert sorted(executor.futures.keys()) == ["a-replaced", "b-replaced"]
            assert other.wait(TIMEOUT) == 0
            executor.shutdown()
        finally:
            other.kill()
            other.wait()

    def test_polls_from_plain_threads_never_make_gevent_hubs(self, make_executor, tmp_path):
        pytest.importorskip("gevent")
        import gevent  # noqa: F401  (merely imported, as a gevent-using dependency would)

        app, executor = make_executor(EXECUTOR_FUTURES_STORE=f"sqlite:///{tmp_path}/f.db")
        with app.app_context():
            executor.submit_stored("k", wait_for, str(tmp_path / "go"))
            futures = executor.futures
            in_thread(lambda: futures.done("k"))  # the store's connection is open
            before = len(os.listdir("/proc/self/fd"))
            for _ in range(100):  # a thread per request, each waiting a while on the future
                waited = in_thread(lambda: futures.result("k", timeout=0.02))
                assert isinstance(waited, cf.TimeoutError)
            gc.collect()
            assert len(os.listdir("/proc/self/fd")) - before < 20
            (tmp_path / "go").touch()

    def test_polls_read_state_only_never_the_outcome(self, make_executor, store_url,
                                                     monkeypatch):  # fmt: skip
        app, executor = make_executor(EXECUTOR_FUTURES_STORE=store_url)
        with app.app_context():
            future = executor.submit_stored("big", bytes, 5_000_000)
            assert len(future.result(TIMEOUT)) == 5_000_000
            unpickled: list[int] = []
            real_loads = pickle.loads
            monkeypatch.setattr(pickle, "loads", lambda b, **k: unpickled.append(len(b)) or
                                real_loads(b, **k))  # fmt: skip
            futures = executor.futures
            for _ in range(3):
                assert futures.done("big") and not futures.running("big")
                assert not futures.cancelled("big") and futures.get("big") is not None
                assert future in futures and "big" in futures.keys()  # noqa: SIM118
            assert unpickled == []
            assert len(futures.result("big")) == 5_000_000 and unpickled  # result() loads it

    def test_a_locked_store_never_holds_the_submitters_future(self, make_executor, tmp_path):
        url, path = f"sqlite:///{tmp_path}/futures.db", str(tmp_path / "futures.db")
        app, executor = make_executor(EXECUTOR_FUTURES_STORE=url)
        with app.app_context():
            future = executor.submit_stored("k", wait_for, str(tmp_path / "go"))
            wait_until(lambda: executor.futures.running("k"))
            with sqlite_locked(path) as holder:
                (tmp_path / "go").touch()
                assert future.result(3) == str(tmp_path / "go")  # the lock is held 6 s
                assert holder.poll() is None  # (still held when the future was done)
            assert executor.futures.result("k", timeout=TIMEOUT) == str(tmp_path / "go")

    def test_a_locked_store_never_holds_the_process_pools_futures(self, make_executor, tmp_path):
        """The process pool hands every outcome over in one thread: an owner that waited
        there for the locked store (to write what the worker had written) held up the rest."""
        url, path = f"sqlite:///{tmp_path}/futures.db", str(tmp_path / "futures.db")
        app, executor = make_executor(
            EXECUTOR_TYPE="process", EXECUTOR_MAX_WORKERS=6, EXECUTOR_FUTURES_STORE=url
        )
        with app.app_context():
            keys = [f"k{n}" for n in range(6)]
            futures = [executor.submit_stored(k, wait_for, str(tmp_path / "go")) for k in keys]
            wait_until(lambda: all(executor.futures.running(k) for k in keys))
            with sqlite_locked(path) as holder:
                (tmp_path / "go").touch()
                started = time.monotonic()
                cf.wait(futures, timeout=TIMEOUT)
                took = time.monotonic() - started  # each worker waits 0.5 s on the lock
                assert holder.poll() is None  # (still held when the futures were done)
            assert took < 2, f"{took:.2f} s: one after another, 0.5 s each"
            assert [executor.futures.result(k, timeout=TIMEOUT) for k in keys] == [
                str(tmp_path / "go")
            ] * 6

    def test_two_apps_with_one_name_on_one_store_keep_apart_by_namespace(self, store_url):
        apps = [Flask("app") for _ in range(2)]
        executors = []
        for n, app in enumerate(apps):
            app.config.update(SECRET_KEY="s", EXECUTOR_FUTURES_STORE=store_url,
                              EXECUTOR_FUTURES_NAMESPACE=f"site{n}")  # fmt: skip
            executors.append(Executor(app))
        try:
            with apps[0].app_context():
                executors[0].submit_stored("report", str, "first site").result(TIMEOUT)
            with apps[1].app_context():
                executors[1].submit_stored("report", str, "second site").result(TIMEOUT)
                assert executors[1].futures.result("report", timeout=TIMEOUT) == "second site"
            with apps[0].app_context():
                assert executors[0].futures.result("report") == "first site"
            shared = Flask("app")  # the default: the import name, shared by both `app`s
            shared.config.update(SECRET_KEY="s", EXECUTOR_FUTURES_STORE=store_url)
            assert shared.config.get("EXECUTOR_FUTURES_NAMESPACE") is None
            executors.append(Executor(shared))
            assert shared.config["EXECUTOR_FUTURES_NAMESPACE"] == "app:"
        finally:
            for executor in executors:
                executor.shutdown()

    def test_a_planted_pickle_is_never_unpickled_in_any_process(self, make_executor, store_url,
                                                                tmp_path):  # fmt: skip
        app, executor = make_executor(EXECUTOR_FUTURES_STORE=store_url)
        ran = tmp_path / "ran"
        with app.app_context():
            executor.submit_stored("k", square, 3).result(TIMEOUT)
            plant(store_url, "k", pickle.dumps(Planted(str(ran))))
        script = f"""
            from flask_executor import Executor
            from test_flask_executor import make_app
            app = make_app(EXECUTOR_FUTURES_STORE={store_url!r})
            executor = Executor(app)
            with app.app_context():
                print(executor.futures.done("k"), flush=True)
                try:
                    executor.futures.result("k")
                except RuntimeError as exc:
                    print(exc, flush=True)
        """
        result = run_script(script)
        assert result.returncode == 0, result.stderr
        assert not ran.exists()  # the code in the pickle never ran
        done, message = result.stdout.strip().split("\n")
        assert done == "True" and "'k'" in message and "this app did not write" in message

    def test_a_signed_outcome_cannot_be_moved_to_another_key(self, make_executor, store_url):
        app, executor = make_executor(EXECUTOR_FUTURES_STORE=store_url)
        with app.app_context():
            executor.submit_stored("mine", square, 3).result(TIMEOUT)
            executor.submit_stored("theirs", square, 4).result(TIMEOUT)
            store = executor.futures.store
            plant(store_url, "theirs", store.outcome(store.read(key="s:mine").token))
            with pytest.raises(RuntimeError, match="this app did not write"):
                executor.futures.result("theirs")

    def test_the_secret_key_rotates_and_a_store_without_one_is_refused(self, store_url):
        old = make_app(EXECUTOR_FUTURES_STORE=store_url)
        old.secret_key = "old"
        executor = Executor(old)
        with old.app_context():
            executor.submit_stored("k", square, 5).result(TIMEOUT)
        executor.shutdown()
        new = make_app(EXECUTOR_FUTURES_STORE=store_url, SECRET_KEY_FALLBACKS=["old"])
        new.secret_key = "new"
        executor = Executor(new)
        with new.app_context():
            assert executor.futures.result("k") == 25  # written with the old key
        executor.shutdown()
        other = make_app(EXECUTOR_FUTURES_STORE=store_url)  # another key, no fallback
        executor = Executor(other)
        with other.app_context(), pytest.raises(RuntimeError, match="did not write"):
            executor.futures.result("k")
        executor.shutdown()
        bare = Flask("bare")
        bare.config["EXECUTOR_FUTURES_STORE"] = store_url
        with pytest.raises(ValueError, match=r"needs the app's SECRET_KEY.* Set app\.secret_key"):
            Executor(bare)
        assert "executor" not in bare.extensions


class TestStoreProbes:
    """What the prober of #21 found: each failed before its fix."""

    def test_a_task_taken_for_lost_ends_lost_for_its_submitter_too(
        self, make_executor, store_url, tmp_path
    ):
        """A reader elsewhere that found the owner's lease run out (a process paused, or
        one busy greenlet starving the renewing one) stores the task as lost. When the task
        ends after all, its submitter gets that same outcome: one outcome everywhere."""
        app, executor = make_executor(EXECUTOR_FUTURES_STORE=store_url)
        with app.app_context():
            future = executor.submit_stored("k", wait_for, str(tmp_path / "go"))
            wait_until(lambda: executor.futures.running("k"))
            _, token = future._stored
            lost = cf.BrokenExecutor("stored future 'k' is lost (as a reader elsewhere saw it)")
            data = flask_executor._outcome(wait_for, lost)
            signed = executor.futures.signer.sign("k", token, data)
            assert executor.futures.store.finish(token, signed, 30)  # as that reader does
            (tmp_path / "go").touch()
            with pytest.raises(cf.BrokenExecutor, match="as a reader elsewhere saw it"):
                future.result(TIMEOUT)
            with pytest.raises(cf.BrokenExecutor, match="as a reader elsewhere saw it"):
                executor.futures.result("k", timeout=TIMEOUT)

    @pytest.mark.parametrize("backend", ["thread", "process"])
    def test_a_stop_refused_by_the_store_leaves_the_task_running(
        self, make_executor, store_url, tmp_path, backend
    ):
        """cancel() of a task whose row a reader already finished (taken for lost) is
        refused by the store: the task must not be asked to stop, and its submitter ends
        with the stored outcome (it was asked anyway, and ended CancelledError)."""
        app, executor = make_executor(EXECUTOR_TYPE=backend, EXECUTOR_FUTURES_STORE=store_url)
        with app.app_context():
            go = str(tmp_path / "go")
            future = executor.submit_stored("k", until_file_or_stopped, go)
            wait_until(lambda: executor.futures.running("k"))
            _, token = future._stored
            lost = cf.BrokenExecutor("stored future 'k' is lost (as a reader elsewhere saw it)")
            data = flask_executor._outcome(until_file_or_stopped, lost)
            assert executor.futures.store.finish(token, executor.futures.signer.sign(
                "k", token, data), 30)  # fmt: skip
            gate, asked = future._gate, []

            def gate_then_look(exc: BaseException) -> BaseException | None:
                shown = gate(exc)  # while the store decides, the task is not asked yet
                asked.append(future._captured.stopped is not None)
                return shown

            future._gate = gate_then_look
            assert future.cancel() is False
            assert asked == [False]
            (tmp_path / "go").touch()
            with pytest.raises(cf.BrokenExecutor, match="as a reader elsewhere saw it"):
                future.result(TIMEOUT)

    def test_cancel_by_key_keeps_a_process_tasks_returned_result(
        self, make_executor, store_url, tmp_path
    ):
        """executor.futures.cancel(key) as future.cancel(): refused once the function has
        returned (its outcome is being stored), and the result stands everywhere."""
        app, executor = make_executor(EXECUTOR_TYPE="process", EXECUTOR_FUTURES_STORE=store_url)
        with app.app_context():
            future = executor.submit_stored("k", return_slow_to_send, str(tmp_path), 7)
            try:
                wait_for(str(tmp_path / "sending"))
                assert executor.futures.cancel("k") is False
            finally:
                (tmp_path / "go").touch()
            assert future.result(TIMEOUT) == 7
            assert executor.futures.result("k", timeout=TIMEOUT) == 7

    def test_cancel_of_pending_process_tasks_says_true(self, make_executor, store_url, tmp_path):
        app, executor = make_executor(
            EXECUTOR_TYPE="process", EXECUTOR_MAX_WORKERS=1, EXECUTOR_FUTURES_STORE=store_url
        )
        with app.app_context():
            busy = executor.submit_stored("busy", wait_for, str(tmp_path / "go"))
            wait_until(lambda: executor.futures.running("busy"))
            pending = [executor.submit_stored(f"p{n}", square, n) for n in range(6)]
            answers = [executor.futures.cancel(f"p{n}") for n in range(3)]
            answers += [executor.futures[f"p{n}"].cancel() for n in range(3, 6)]
            (tmp_path / "go").touch()
            assert answers == [True] * 6
            assert all(f.cancelled() for f in pending) and busy.result(TIMEOUT)

    def test_apps_on_one_redis_leave_no_threads_or_connections(self, redis_server):
        """Each Redis store renewed its process's lease in a thread of its own, forever,
        holding the store and its connections: an app per test piled them up."""
        before = (threading.active_count(), len(os.listdir("/proc/self/fd")))
        for n in range(5):
            app = make_app(EXECUTOR_FUTURES_STORE=redis_server, EXECUTOR_FUTURES_NAMESPACE=f"a{n}")
            executor = Executor(app)
            with app.app_context():
                assert executor.submit_stored("k", square, n).result(TIMEOUT) == n * n
            executor.shutdown(wait=True)
            del app, executor
        # each store's cancel watcher ends soon after its last task; one thread renews the lease
        wait_until(lambda: threading.active_count() - before[0] <= 1)
        gc.collect()
        assert len(os.listdir("/proc/self/fd")) - before[1] <= 3, before

    def test_a_redis_lease_lives_on_with_two_lease_lengths_and_a_late_server(self, redis_server):
        """Two stores of one process on one server with leases of 9 s and 1.5 s: renewed
        at the short one's pace (it ran out between the long one's renewals). And a store
        whose first claim found Redis away renews its lease once Redis is back."""
        import redis

        client = redis.Redis.from_url(redis_server)
        owner, late = f"two-leases-{os.getpid()}", f"late-server-{os.getpid()}"
        long = flask_executor.RedisStore(redis_server, "lease-long", lease=9)
        short = flask_executor.RedisStore(redis_server, "lease-short", lease=1.5)
        long.claim("s:x", "t-long", owner, "t", None, None)
        short.claim("s:y", "t-short", owner, "t", None, None)
        away = flask_executor.RedisStore(redis_server, "lease-away", lease=1.2)
        away._renew = lambda owner: fail("Redis is away")  # its first claim fails
        with pytest.raises(ValueError, match="Redis is away"):
            away.claim("s:a", "t-away", late, "t", None, None)
        del away._renew  # back
        assert away.claim("s:b", "t-away2", late, "t", None, None) == []
        started = time.monotonic()
        while time.monotonic() - started < 3:  # two short leases, and more
            for who in (owner, late):
                assert client.exists(f"flask_executor:lease:{who}"), (
                    f"{who}'s lease gone after {time.monotonic() - started:.2f} s"
                )
            time.sleep(0.05)

    def test_two_greenlets_opening_a_locked_new_sqlite_file_never_hang_the_hub(self, tmp_path):
        """Not monkey-patched: another program creates the file and holds it locked; the
        greenlet waiting for it in _open must not switch to another greenlet while it
        holds this process's native _connect_lock."""
        path = str(tmp_path / "s.db")
        hold = (
            "import sqlite3, sys, time\n"
            "db = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
            "db.execute('BEGIN EXCLUSIVE'); db.execute('CREATE TABLE x (a)')\n"
            "print('locked', flush=True); time.sleep(0.8); db.execute('COMMIT')\n"
        )
        out = run_script(
            f"""
            import subprocess, sys
            import gevent
            from flask_executor import SQLiteStore

            holder = subprocess.Popen([sys.executable, "-c", {hold!r}, {path!r}],
                                      stdout=subprocess.PIPE, text=True)
            assert holder.stdout.readline().strip() == "locked"
            store = SQLiteStore.__new__(SQLiteStore)
            store._setup({path!r}, "ns")
            greenlets = [gevent.spawn(store.keys) for _ in range(2)]
            gevent.joinall(greenlets, timeout=20)
            print([g.value for g in greenlets])
            """,
            timeout=60,
        )
        assert out.stdout.strip() == "[[], []]", out.stdout + out.stderr

    def test_two_greenlets_opening_a_replaced_sqlite_file_never_hang_the_hub(self, tmp_path):
        """Not monkey-patched: two greenlets need a new connection while another program
        briefly holds the store's -lock file; the one waiting for it must not switch to
        the other while it holds this process's native _connect_lock."""
        path = str(tmp_path / "s.db")
        hold = "import fcntl, sys, time\n" + (
            "lock = open(sys.argv[1], 'a+b'); fcntl.lockf(lock.fileno(), fcntl.LOCK_EX)\n"
            "print('held', flush=True); time.sleep(0.5)\n"
        )
        out = run_script(
            f"""
            import os, subprocess, sys
            import gevent
            from flask_executor import SQLiteStore

            path = {path!r}
            store = SQLiteStore(path)
            for suffix in ("", "-wal", "-shm", "-gen"):  # replaced: made again on first use
                if os.path.exists(path + suffix):
                    os.remove(path + suffix)
            holder = subprocess.Popen([sys.executable, "-c", {hold!r}, path + "-lock"],
                                      stdout=subprocess.PIPE, text=True)
            assert holder.stdout.readline().strip() == "held"
            greenlets = [gevent.spawn(store.keys) for _ in range(2)]
            gevent.joinall(greenlets, timeout=20)
            print([g.value for g in greenlets])
            """,
            timeout=60,
        )
        assert out.stdout.strip() == "[[], []]", out.stdout + out.stderr

    def test_a_cancel_under_a_locked_store_never_holds_the_future(self, make_executor,
                                                                  tmp_path):  # fmt: skip
        url, path = f"sqlite:///{tmp_path}/futures.db", str(tmp_path / "futures.db")
        app, executor = make_executor(EXECUTOR_FUTURES_STORE=url)
        with app.app_context():
            future = executor.submit_stored("k", write_until_stopped, str(tmp_path / "flag"))
            wait_until(lambda: executor.futures.running("k"))
            with sqlite_locked(path) as holder:
                started = time.monotonic()
                assert future.cancel() is True and future.cancelled()
                assert time.monotonic() - started < 2 and holder.poll() is None
            wait_until(lambda: executor.futures.cancelled("k"))  # stored once it is free

    def test_an_outcome_relabelled_to_another_key_is_refused(self, make_executor, store_url):
        app, executor = make_executor(EXECUTOR_FUTURES_STORE=store_url)
        with app.app_context():
            executor.submit_stored("alice", str, "alice's report").result(TIMEOUT)
            executor.submit_stored("mallory", str, "mallory's").result(TIMEOUT)
            relabel(store_url, "alice", "mallory")  # the key column / keys hash rewritten
            with pytest.raises(RuntimeError, match="this app did not write"):
                executor.futures.result("mallory")

    def test_a_fork_while_opening_the_file_never_holds_its_lock(self, tmp_path):
        url = f"sqlite:///{tmp_path}/futures.db"
        script = f"""
            import os, threading, time
            from flask_executor import Executor
            import flask_executor
            from test_flask_executor import make_app, square
            app = make_app(EXECUTOR_FUTURES_STORE={url!r})
            executor = Executor(app)
            real = flask_executor._lock_file
            forked = []
            def lock_then_fork(fd, path):
                real(fd, path)
                pid = os.fork()
                if pid == 0:
                    time.sleep(20)
                    os._exit(0)
                forked.append(pid)
            flask_executor._lock_file = lock_then_fork
            os.remove({str(tmp_path / "futures.db")!r})  # the next read opens the file anew
            with app.app_context():
                executor.submit_stored("a", square, 2).result(30)
            flask_executor._lock_file = real
            os.replace({str(tmp_path / "other.db")!r}, {str(tmp_path / "futures.db")!r})
            started = time.monotonic()
            with app.app_context():
                executor.submit_stored("b", square, 3).result(30)
            print(round(time.monotonic() - started))
            os.kill(forked[0], 9)
        """
        import sqlite3 as sq

        with contextlib.closing(sq.connect(tmp_path / "other.db")) as db:
            db.execute("CREATE TABLE unrelated (x)")
        result = run_script(script, timeout=60)
        assert result.returncode == 0, result.stderr
        assert result.stdout.split() == ["0"]  # the child's copy of the lock is no lock

    def test_a_new_task_after_a_redis_restart_is_never_read_as_lost(self, make_executor,
                                                                    tmp_path):  # fmt: skip
        port = free_port()
        server = start_redis(port, tmp_path)
        try:
            url = f"redis://127.0.0.1:{port}/0"
            app, executor = make_executor(EXECUTOR_FUTURES_STORE=url)
            with app.app_context():
                executor.submit_stored("first", square, 2).result(TIMEOUT)
                stop_redis(server)
                server = start_redis(port, tmp_path)  # every lease is gone
                executor.submit_stored("new", wait_for, str(tmp_path / "go"))
                store = executor.futures.store
                owner = store.read(key="s:new").owner
                assert store._redis.exists(f"flask_executor:lease:{owner}")  # renewed at once
                (tmp_path / "go").touch()
        finally:
            stop_redis(server)

    def test_a_popped_task_whose_owner_died_leaves_no_row_for_ever(self, make_executor,
                                                                  store_url):  # fmt: skip
        app, executor = make_executor(EXECUTOR_FUTURES_STORE=store_url)
        store = executor.futures.store
        elsewhere = "another-host/boot/ns/4242:1"
        with app.app_context():
            assert store.claim("s:orphan", "t-orphan", elsewhere, "x.y", None, None) == []
            executor.futures.pop("orphan")
            age_popped_rows(store_url, 25 * 3600, unfinished=True)
            executor.submit_stored("next", square, 2).result(TIMEOUT)  # a claim cleans up
            assert store.read(token="t-orphan") is None


def relabel(url: str, source: str, target: str) -> None:
    """Point key ``target`` at ``source``'s row, as anyone with write access could."""
    if url.startswith("sqlite"):
        with contextlib.closing(sqlite3.connect(url[len("sqlite:///") :])) as db, db:
            db.execute("DELETE FROM executor_rows WHERE key = ?", (f"s:{target}",))
            db.execute("UPDATE executor_rows SET key = ? WHERE key = ?",
                       (f"s:{target}", f"s:{source}"))  # fmt: skip
    else:
        import redis

        client = redis.Redis.from_url(url)
        for hash_key in client.keys("flask_executor:*:keys"):
            token = client.hget(hash_key, f"s:{source}")
            if token is not None:
                client.hset(hash_key, f"s:{target}", token)


def age_popped_rows(url: str, seconds: float, unfinished: bool = False) -> None:
    """Move the finish time of every popped row ``seconds`` into the past."""
    if url.startswith("sqlite"):
        column = "popped" if unfinished else "finished"
        with contextlib.closing(sqlite3.connect(url[len("sqlite:///") :])) as db, db:
            db.execute(f"UPDATE executor_rows SET {column} = {column} - ? WHERE key LIKE 'd:%'",
                       (seconds,))  # fmt: skip
    else:
        import redis

        client = redis.Redis.from_url(url)
        for gone in client.keys("flask_executor:*:gone"):
            for member, score in client.zrange(gone, 0, -1, withscores=True):
                client.zadd(gone, {member: score - seconds})


def pop_all(url: str, count: int) -> list[tuple[str, int]]:
    """In another process: pop every key it can; return the ones it won."""
    app = make_app(EXECUTOR_FUTURES_STORE=url)
    executor = Executor(app)
    with app.app_context():
        won = []
        for n in range(count):
            future = executor.futures.pop(f"p{n}")
            if future is not None:
                won.append((f"p{n}", future.result(TIMEOUT)))
    return won


def boot_and_store(url: str, barrier: object, results: object, n: int) -> None:
    barrier.wait(TIMEOUT)  # every process opens the new file at the same moment
    try:
        app = make_app(EXECUTOR_FUTURES_STORE=url)
        executor = Executor(app)
        with app.app_context():
            executor.submit_stored(n, square, n)
            results.put(executor.futures.result(n, timeout=TIMEOUT))
        executor.shutdown()
    except BaseException as exc:
        results.put(repr(exc))


class TestStoreErrors:
    @pytest.mark.parametrize(
        "url",
        [
            "sqlite://",
            "sqlite:///:memory:",
            "mysql://localhost/db",
            "futures.db",
            "sqlite:///f.db?mode=ro",
        ],
    )
    def test_a_malformed_store_url(self, url):
        with pytest.raises(ValueError, match=r"EXECUTOR_FUTURES_STORE=.* is not a futures store"):
            Executor(make_app(EXECUTOR_FUTURES_STORE=url))

    def test_a_missing_folder(self, tmp_path):
        url = f"sqlite:///{tmp_path}/missing/futures.db"
        with pytest.raises(ValueError, match=r"SQLite futures store .* is in a missing folder"):
            Executor(make_app(EXECUTOR_FUTURES_STORE=url))

    def test_a_relative_path_lives_under_the_instance_path(self, tmp_path):
        app = Flask("relative", instance_path=str(tmp_path / "instance"))
        app.config.update(EXECUTOR_FUTURES_STORE="sqlite:///futures.db", SECRET_KEY="s")
        executor = Executor(app)
        assert (tmp_path / "instance" / "futures.db").exists()
        executor.shutdown()

    def test_a_link_to_a_network_filesystem_is_refused(self, tmp_path, monkeypatch):
        table, share = tmp_path / "mounts", tmp_path / "share"
        share.mkdir()
        (tmp_path / "link").symlink_to(share)
        table.write_text(f"/dev/sda1 / ext4 rw 0 0\nserver:/export {share} nfs4 rw 0 0\n")
        real = flask_executor._filesystem
        monkeypatch.setattr(flask_executor, "_filesystem", lambda f: real(f, str(table)))
        with pytest.raises(ValueError, match=r"is on a nfs4 filesystem"):
            Executor(make_app(EXECUTOR_FUTURES_STORE=f"sqlite:///{tmp_path}/link/f.db"))

    @pytest.mark.parametrize("kind", ["nfs4", "cifs", "fuse.sshfs"])
    def test_a_network_filesystem_is_refused(self, tmp_path, monkeypatch, kind):
        table = tmp_path / "mounts"
        table.write_text(f"/dev/sda1 / ext4 rw 0 0\nserver:/export {tmp_path} {kind} rw 0 0\n")
        assert flask_executor._filesystem(str(tmp_path / "sub"), str(table)) == kind
        assert flask_executor._filesystem("/usr", str(table)) == "ext4"
        real = flask_executor._filesystem
        monkeypatch.setattr(flask_executor, "_filesystem", lambda f: real(f, str(table)))
        with pytest.raises(ValueError, match=rf"is on a {kind} filesystem.* use redis://"):
            Executor(make_app(EXECUTOR_FUTURES_STORE=f"sqlite:///{tmp_path}/f.db"))

    def test_the_redis_package_missing(self, monkeypatch):
        monkeypatch.setitem(sys.modules, "redis", None)
        with pytest.raises(ImportError, match="needs the redis package: pip install redis"):
            Executor(make_app(EXECUTOR_FUTURES_STORE="redis://127.0.0.1:1/0"))

    def test_a_malformed_redis_url_names_the_key(self):
        pytest.importorskip("redis")
        with pytest.raises(ValueError, match=r"EXECUTOR_FUTURES_STORE='redis://127.0.0.1:x/0': "):
            Executor(make_app(EXECUTOR_FUTURES_STORE="redis://127.0.0.1:x/0"))

    def test_a_folder_given_as_the_sqlite_file(self, tmp_path):
        with pytest.raises(ValueError, match=r"SQLite futures store .* is a folder"):
            Executor(make_app(EXECUTOR_FUTURES_STORE=f"sqlite:///{tmp_path}"))

    def test_redis_unreachable(self):
        pytest.importorskip("redis")
        url = f"redis://127.0.0.1:{free_port()}/0"
        with pytest.raises(ConnectionError, match=f"cannot reach the Redis futures store '{url}'"):
            Executor(make_app(EXECUTOR_FUTURES_STORE=url))


# -- 8b. Several worker processes: stored futures shared through SQLite and Redis ----


def echo_key(key: str, wait: float) -> dict[str, object]:
    time.sleep(wait)  # cooperative under gevent's monkey-patching
    return {"key": key, "pid": os.getpid()}


def stored_app() -> Flask:
    """The app the shared-store tests serve; EXECUTOR_* (the store too) from the environment."""
    app = Flask("stored")
    app.secret_key = "stored"
    executor = Executor(app)

    @app.route("/submit")
    def submit() -> dict[str, object]:
        key, args = request.args["key"], request.args
        task = (wait_for, args["block"], 600) if "block" in args else (echo_key, key, 0.05)
        if "until_stopped" in args:
            task = (write_until_stopped, args["until_stopped"])
        try:
            executor.submit_stored(key, *task)
        except ValueError:
            return {"refused": True, "pid": os.getpid()}
        return {"refused": False, "pid": os.getpid()}

    @app.route("/poll")
    def poll() -> dict[str, object]:
        return {"done": executor.futures.done(request.args["key"]), "pid": os.getpid()}

    @app.route("/cancel", methods=["POST"])
    def cancel() -> dict[str, object]:
        return {"cancelled": executor.futures.cancel(request.form["key"]), "pid": os.getpid()}

    @app.route("/pop")
    def pop() -> dict[str, object]:
        future = executor.futures.pop(request.args["key"])
        if future is None:
            return {"popped": False, "pid": os.getpid()}
        try:
            return {"popped": True, "result": future.result(TIMEOUT), "pid": os.getpid()}
        except Exception as exc:
            return {"popped": True, "error": f"{type(exc).__name__}: {exc}", "pid": os.getpid()}

    return app


@pytest.mark.parametrize(
    ("worker", "executor_type", "store", "preload"),
    [
        ("gthread", "thread", "sqlite", False),
        ("gevent", "gevent", "sqlite", False),
        ("gthread", "thread", "sqlite", True),
        ("sync", "process", "sqlite", True),
        ("gthread", "thread", "redis", False),
        ("gevent", "gevent", "redis", True),
    ],
)
def test_gunicorn_workers_share_stored_futures(worker, executor_type, store, preload, tmp_path,
                                               request):  # fmt: skip
    pytest.importorskip("gunicorn")
    if worker == "gevent":
        pytest.importorskip("gevent")
    if store == "redis":
        url = request.getfixturevalue("redis_server")
        import redis

        redis.Redis.from_url(url).flushall()
    else:
        url = f"sqlite:///{tmp_path}/futures.db"
    port = free_port()
    # --worker-connections 2: a worker with two connections open accepts no more, so
    # concurrent requests are spread over workers (else one may take them all)
    argv = [sys.executable, "-m", "gunicorn", "-k", worker, "-w", "4", "--threads", "4",
            "--worker-connections", "2", "-b", f"127.0.0.1:{port}",
            *(["--preload"] if preload else []), "test_flask_executor:stored_app()"]  # fmt: skip
    env = {"EXECUTOR_TYPE": executor_type, "EXECUTOR_FUTURES_STORE": url,
           "EXECUTOR_FUTURES_MAX_LENGTH": "1000", "EXECUTOR_MAX_WORKERS": "4"}  # fmt: skip
    server = Server(argv, port, **env)
    get = functools.partial(lambda base, path: http_get(base + path), server.base)
    try:
        keys = [f"k{n}" for n in range(40)]
        with cf.ThreadPoolExecutor(8) as clients:
            owners = dict(
                zip(keys, clients.map(lambda k: get(f"/submit?key={k}"), keys), strict=True)
            )
            assert not any(reply["refused"] for reply in owners.values())
            polls: list[tuple[str, dict]] = []
            pending, deadline = set(keys), time.monotonic() + 60
            while pending and time.monotonic() < deadline:
                waiting = sorted(pending)
                for key, reply in zip(
                    waiting, clients.map(lambda k: get(f"/poll?key={k}"), waiting), strict=True
                ):
                    polls.append((key, reply))
                    if reply["done"]:
                        pending.discard(key)
            assert not pending
            more = 0  # one worker may take every connection for a while: poll on, bounded
            while len({reply["pid"] for _, reply in polls}) < 2 and more < 400:
                polls += zip(keys, clients.map(lambda k: get(f"/poll?key={k}"), keys), strict=True)
                more += len(keys)
            assert all(reply["done"] is not None for _, reply in polls)  # no poll missed its key
            assert len({reply["pid"] for _, reply in polls}) >= 2
            assert any(reply["pid"] != owners[key]["pid"] for key, reply in polls)

            pops = list(clients.map(lambda k: (k, get(f"/pop?key={k}")), keys * 2))
            for key in keys:  # popped twice at once: exactly one pop wins, with the result
                won = [reply for k, reply in pops if k == key and reply["popped"]]
                assert len(won) == 1 and won[0]["result"]["key"] == key
                task_pid = won[0]["result"]["pid"]
                if executor_type == "process":
                    assert task_pid != owners[key]["pid"]
                else:
                    assert task_pid == owners[key]["pid"]  # ran in the worker that took it

            first = get("/submit?key=dup")
            dups: list[dict] = []  # (as above: more, bounded, until another worker answers)
            while all(reply["pid"] == first["pid"] for reply in dups) and len(dups) < 120:
                dups += clients.map(lambda _: get("/submit?key=dup"), range(12))
            assert not first["refused"] and all(reply["refused"] for reply in dups)
            assert any(reply["pid"] != first["pid"] for reply in dups)  # refused elsewhere too

        owner = get(f"/submit?key=blocked&block={tmp_path}/never")["pid"]
        assert get("/poll?key=blocked")["done"] is False
        os.kill(owner, signal.SIGKILL)
        wait_until(lambda: get("/poll?key=blocked")["done"], timeout=10)
        lost = get("/pop?key=blocked")
        assert lost["popped"] and lost["error"].startswith("BrokenExecutor:")
        assert f"/{owner}:" in lost["error"] and "is gone" in lost["error"]
    finally:
        server.stop()


# -- real servers: gunicorn (gevent and gthread workers) and gevent's pywsgi ------------------


def server_app() -> Flask:
    """The app the real-server tests serve; EXECUTOR_* come from the environment."""
    app = Flask("served")
    app.secret_key = "served"
    executor = Executor(app)

    def report(wait: float) -> dict[str, object]:
        time.sleep(wait)  # cooperative under gevent's monkey-patching
        return {"arg": request.args["id"], "g": g.rid, "session": session["rid"]}

    @app.route("/start")
    def start() -> str:
        g.rid = session["rid"] = request.args["id"]
        executor.submit_stored(request.args["id"], report, float(request.args["wait"]))
        return "started"

    @app.route("/result")
    def result() -> dict[str, object]:
        key = request.args["id"]
        if not executor.futures.done(key):
            return {"state": executor.futures._state(key)}
        return {"state": "FINISHED", "seen": executor.futures.pop(key).result()}

    return app


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_get(url: str) -> dict | str:
    with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
        body = response.read().decode()
    return json.loads(body) if body.startswith("{") else body


class Server:
    """A server subprocess on 127.0.0.1, waited for, and always stopped."""

    def __init__(self, argv: list[str], port: int, **env: str) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.log = tempfile.NamedTemporaryFile("w+", prefix="server-", suffix=".log")  # noqa: SIM115
        self.proc = subprocess.Popen(
            argv,
            cwd=HERE,
            env={**os.environ, "PYTHONPATH": str(HERE), **env},
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop() ends whatever it forked
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    output = self.output()
                    self.stop()
                    raise RuntimeError(f"server did not start: {output}") from None
                time.sleep(0.1)

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> None:
        """SIGTERM the server, then SIGKILL its whole process group (workers, pools)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(20)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(20)
        self.log.close()  # (its output is read before the server is stopped)


def drive(base: str, requests: int, wait: float) -> dict[str, int]:
    """Start one stored task per request, concurrently; poll until all are done."""
    with cf.ThreadPoolExecutor(50) as clients:
        started = list(
            clients.map(lambda n: http_get(f"{base}/start?id={n}&wait={wait}"), range(requests))
        )
        assert started == ["started"] * requests
        seen: dict[int, dict] = {}
        deadline = time.monotonic() + 120
        while len(seen) < requests and time.monotonic() < deadline:
            pending = [n for n in range(requests) if n not in seen]
            for n, reply in zip(
                pending,
                clients.map(lambda n: http_get(f"{base}/result?id={n}"), pending),
                strict=True,
            ):
                if reply["state"] == "FINISHED":
                    seen[n] = reply["seen"]
            time.sleep(0.05)
    mismatches = sum(
        1 for n, got in seen.items() if got != {"arg": str(n), "g": str(n), "session": str(n)}
    )
    return {"finished": len(seen), "mismatches": mismatches}


SERVED = {"EXECUTOR_FUTURES_MAX_LENGTH": "10000"}


@pytest.mark.parametrize(("worker", "executor_type"), [("gevent", "gevent"), ("gthread", "thread")])
def test_gunicorn_concurrent_requests_see_only_their_own_data(worker, executor_type):
    pytest.importorskip("gunicorn")
    if worker == "gevent":
        pytest.importorskip("gevent")
    port = free_port()
    argv = [sys.executable, "-m", "gunicorn", "-k", worker, "-w", "1", "--threads", "8",
            "--worker-connections", "1000", "-b", f"127.0.0.1:{port}",
            "test_flask_executor:server_app()"]  # fmt: skip
    server = Server(argv, port, EXECUTOR_TYPE=executor_type, EXECUTOR_MAX_WORKERS="32", **SERVED)
    try:
        assert drive(server.base, requests=300, wait=0.2) == {"finished": 300, "mismatches": 0}
    finally:
        server.stop()


def test_pywsgi_concurrent_requests_see_only_their_own_data():
    pytest.importorskip("gevent")
    port = free_port()
    script = f"""
        from gevent import monkey; monkey.patch_all()
        from gevent.pywsgi import WSGIServer
        from test_flask_executor import server_app
        WSGIServer(("127.0.0.1", {port}), server_app(), log=None).serve_forever()
    """
    argv = [sys.executable, "-c", textwrap.dedent(script)]
    server = Server(argv, port, EXECUTOR_TYPE="gevent", **SERVED)
    try:
        assert drive(server.base, requests=300, wait=0.2) == {"finished": 300, "mismatches": 0}
    finally:
        server.stop()


# -- forks: gunicorn --preload, os.fork(), process workers: no data crosses ------------------

MARK = "as imported"  # a test changes it: a forked worker sees the change, a spawned one not


def read_mark() -> str:
    return MARK


def request_seen_in_process() -> tuple[bool, bool, str]:
    """What a process task sees of Flask: it must be no context at all."""
    from flask import has_app_context, has_request_context

    try:
        seen = f"{request.path}?{request.query_string.decode()}"
    except RuntimeError as exc:
        seen = str(exc)
    return has_request_context(), has_app_context(), seen


NESTED_APP = Flask("nested")
NESTED_APP.config.update(EXECUTOR_TYPE="process", EXECUTOR_MAX_WORKERS=1)
NESTED = Executor(NESTED_APP, name="nested")


def square_via_own_executor(x: int) -> int:
    return NESTED.submit(square, x).result(TIMEOUT)


START_METHODS = ["spawn", "forkserver", "fork"]


class TestForks:
    @pytest.mark.parametrize("method", START_METHODS)
    def test_process_tasks_see_no_request_whatever_the_start_method(self, make_executor, method):
        app, executor = make_executor(
            EXECUTOR_TYPE="process", EXECUTOR_MAX_WORKERS=1, EXECUTOR_START_METHOD=method
        )
        for user in ["alice", "bob", "carol"]:  # alice's request is active when workers start
            with app.test_request_context(f"/me?user={user}"):
                seen = executor.submit(request_seen_in_process).result(TIMEOUT)
            assert seen == (False, False, seen[2]), seen
            assert "outside of request context" in seen[2], seen

    @pytest.mark.parametrize("method", START_METHODS)
    def test_start_method_is_the_one_configured(self, make_executor, monkeypatch, method):
        monkeypatch.setattr(sys.modules[__name__], "MARK", "changed in the web process")
        app, executor = make_executor(EXECUTOR_TYPE="process", EXECUTOR_START_METHOD=method)
        with app.app_context():
            mark = executor.submit(read_mark).result(TIMEOUT)
        assert mark == ("changed in the web process" if method == "fork" else "as imported")

    def test_default_start_method_is_spawn(self, make_executor, monkeypatch):
        monkeypatch.setattr(sys.modules[__name__], "MARK", "changed in the web process")
        app, executor = make_executor(EXECUTOR_TYPE="process")
        assert app.config["EXECUTOR_START_METHOD"] == "spawn"
        with app.app_context():
            assert executor.submit(read_mark).result(TIMEOUT) == "as imported"

    def test_bad_start_method_names_the_key(self):
        with pytest.raises(ValueError, match=r"EXECUTOR_START_METHOD='vfork' is not a start"):
            Executor(make_app(EXECUTOR_TYPE="process", EXECUTOR_START_METHOD="vfork"))

    @pytest.mark.parametrize("method", ["spawn", "fork"])
    def test_process_task_can_submit_to_its_own_executor(self, executors, method):
        NESTED_APP.config["NESTED_EXECUTOR_START_METHOD"] = method
        outer = Executor(make_app(EXECUTOR_TYPE="process", EXECUTOR_START_METHOD=method))
        executors.append(outer)
        with NESTED_APP.app_context():  # NESTED's pool in this process is started first
            assert NESTED.submit(square, 2).result(TIMEOUT) == 4
        futures = [outer.submit(square_via_own_executor, n) for n in range(4)]
        assert [f.result(TIMEOUT) for f in futures] == [0, 1, 4, 9]

    @pytest.mark.parametrize(
        ("backend", "method"),
        [("thread", "fork"), ("process", "fork"), ("process", "forkserver"), ("gevent", "fork")],
    )
    @pytest.mark.parametrize("warm", [True, False], ids=["warm", "cold"])
    def test_os_fork_children_get_their_own_pool_and_futures(self, backend, method, warm):
        if backend == "gevent":
            pytest.importorskip("gevent")
        out = run_script(
            f"""
            import gc, json, os, signal, sys
            from flask import Flask
            from flask_executor import Executor
            from test_flask_executor import add, fail, settle, square

            app = Flask("forked")
            app.config.update(EXECUTOR_TYPE={backend!r}, EXECUTOR_MAX_WORKERS=2,
                              EXECUTOR_START_METHOD={method!r})
            executor = Executor(app)
            if {warm}:  # pools, threads and processes started before the fork
                with app.app_context():
                    assert executor.submit(square, 3).result(30) == 9
                    executor.submit_stored("parent", square, 4).result(30)
                    settle(executor.submit_stored("parent-fail", fail, "the parent's to read"))
            children = []
            for child in (1, 2):
                pid = os.fork()
                if pid == 0:
                    signal.alarm(60)
                    with app.app_context():
                        got = [executor.submit(add, n, 1000 * child).result(30) for n in range(20)]
                        ok = got == [n + 1000 * child for n in range(20)]
                        own = executor.futures.done("parent") is None
                    gc.collect()  # the parent's futures, dropped here, are not logged here
                    line = json.dumps({{"child": child, "ok": ok, "parent_key_gone": own}})
                    os.write(1, (line + "\\n").encode())  # one write: lines never interleave
                    os._exit(0)
                children.append(pid)
            for pid in children:
                assert os.waitpid(pid, 0)[1] == 0
            with app.app_context():  # and the parent's own pool still serves it
                assert executor.submit(add, 1, 1).result(30) == 2
                if {warm}:
                    assert isinstance(executor.futures.pop("parent-fail").exception(), ValueError)
            executor.shutdown()
            print("parent ok")
            """
        )
        assert out.returncode == 0, out.stderr
        assert "never retrieved" not in out.stderr, out.stderr
        lines = out.stdout.split("\n")
        results = sorted(json.loads(line)["child"] for line in lines if line.startswith("{"))
        assert results == [1, 2], out.stdout + out.stderr
        assert all(
            json.loads(line) | {"child": 0} == {"child": 0, "ok": True, "parent_key_gone": True}
            for line in lines
            if line.startswith("{")
        ), out.stdout
        assert "parent ok" in out.stdout


@pytest.mark.parametrize("method", START_METHODS)
def test_pool_workers_exit_when_their_owner_is_killed(method, tmp_path):
    pids_file = tmp_path / "pids"
    owner = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import os, signal
            from flask import Flask
            from flask_executor import Executor
            from test_flask_executor import worker_pid

            app = Flask("owner")
            app.config.update(EXECUTOR_TYPE="process", EXECUTOR_MAX_WORKERS=2,
                              EXECUTOR_START_METHOD={method!r})
            executor = Executor(app)
            pids = {{executor.submit(worker_pid).result(30) for _ in range(8)}}
            open({str(pids_file)!r}, "w").write(" ".join(map(str, pids)))
            os.kill(os.getpid(), signal.SIGKILL)  # as gunicorn kills a worker on --timeout
        """)],
        cwd=HERE, env={**os.environ, "PYTHONPATH": str(HERE)}, start_new_session=True,
    )  # fmt: skip
    try:
        assert owner.wait(TIMEOUT) == -signal.SIGKILL
        pids = [int(pid) for pid in pids_file.read_text().split()]
        deadline = time.monotonic() + TIMEOUT
        while (alive := [pid for pid in pids if is_running(pid)]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert alive == [], f"worker processes outlived their owner: {alive}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(owner.pid, signal.SIGKILL)


def is_running(pid: int) -> bool:
    """Whether a process exists and is not a zombie (an orphan is reaped by init)."""
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


def test_shutdown_before_a_fork_holds_in_the_child():
    out = run_script(
        """
        import os
        from flask import Flask
        from flask_executor import Executor
        from test_flask_executor import square

        app = Flask("shut")
        executor = Executor(app)
        executor.shutdown()
        pid = os.fork()
        if pid == 0:
            try:
                executor.submit(square, 2)
                os._exit(1)  # accepted: wrong
            except RuntimeError as exc:
                os._exit(0 if "after shutdown" in str(exc) else 2)
        assert os.waitpid(pid, 0)[1] == 0, "the child accepted a task after shutdown()"
        print("ok")
        """
    )
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def echo_in_process(n: str) -> tuple[str, int]:
    time.sleep(0.02)  # long enough that requests overlap and spread over the workers
    return n, os.getpid()


def echo_in_task() -> tuple[str, int]:
    time.sleep(0.02)  # cooperative under gevent's monkey-patching
    return f"{request.args['id']}/{g.rid}", os.getpid()


def preload_app() -> Flask:
    """The app the --preload tests serve: built in gunicorn's master, then forked."""
    app = Flask("preloaded")
    executor = Executor(app)  # EXECUTOR_* from the environment
    process = app.config["EXECUTOR_TYPE"] == "process"
    if os.environ.get("WARM_UP"):  # a task run in the master before it forks its workers
        with app.app_context():
            assert executor.submit(square, 3).result(TIMEOUT) == 9
            executor.submit_stored("master", square, 4).result(TIMEOUT)

    @app.route("/task")
    def task() -> dict[str, object]:
        g.rid = n = request.args["id"]
        future = executor.submit(echo_in_process, n) if process else executor.submit(echo_in_task)
        got, pid = future.result(TIMEOUT)
        leaked = executor.futures.done("master")
        return {"got": got, "task_pid": pid, "worker": os.getpid(), "master_key": leaked}

    return app


@pytest.mark.parametrize("warm", [True, False], ids=["warm", "cold"])
@pytest.mark.parametrize(
    ("worker", "executor_type"), [("sync", "process"), ("gthread", "thread"), ("gevent", "gevent")]
)
def test_gunicorn_preload_every_result_is_its_own_request(worker, executor_type, warm):
    pytest.importorskip("gunicorn")
    if worker == "gevent":
        pytest.importorskip("gevent")
    port = free_port()
    argv = [sys.executable, "-m", "gunicorn", "--preload", "-k", worker, "-w", "4",
            "--threads", "2", "--worker-connections", "2", "-b", f"127.0.0.1:{port}",
            "test_flask_executor:preload_app()"]  # fmt: skip
    env = {"EXECUTOR_TYPE": executor_type, "EXECUTOR_MAX_WORKERS": "2"}
    server = Server(argv, port, **env, **({"WARM_UP": "1"} if warm else {}))
    try:
        with cf.ThreadPoolExecutor(8) as clients:
            replies = list(
                clients.map(lambda n: http_get(f"{server.base}/task?id={n}"), range(200))
            )
    finally:
        server.stop()
    expected = [(str(n) if executor_type == "process" else f"{n}/{n}") for n in range(200)]
    assert [reply["got"] for reply in replies] == expected
    assert all(reply["master_key"] is None for reply in replies)  # the master's futures stay there
    assert len({reply["worker"] for reply in replies}) >= 2  # served by several workers
    if executor_type == "process":  # tasks ran in each worker's own pool, never the master's
        assert all(reply["task_pid"] != reply["worker"] for reply in replies)


# -- reliability: faults healed, nothing lost, no leaks, bounded memory ------------------


def write_pid_then_wait(pid_file: str, release_file: str) -> str:
    Path(pid_file + ".tmp").write_text(str(os.getpid()))
    os.replace(pid_file + ".tmp", pid_file)  # appears whole
    return wait_for(release_file)


def append_line(path: str, n: int) -> int:
    with open(path, "a") as out:  # O_APPEND: one short write per task, never interleaved
        out.write(f"{n}\n")
    return n


class TestReliability:
    def test_process_pool_heals_after_os_exit(self, make_executor):
        app, executor = make_executor(EXECUTOR_TYPE="process", EXECUTOR_MAX_WORKERS=2)
        with app.app_context():
            assert executor.submit(square, 2).result(TIMEOUT) == 4
            dying = executor.submit(die)
            with pytest.raises(cf.process.BrokenProcessPool):
                dying.result(TIMEOUT)
            assert executor.submit(square, 3).result(TIMEOUT) == 9  # a fresh pool
            assert executor.submit(worker_pid).result(TIMEOUT) != os.getpid()

    def test_process_pool_heals_after_sigkill(self, make_executor, tmp_path):
        app, executor = make_executor(EXECUTOR_TYPE="process", EXECUTOR_MAX_WORKERS=1)
        pid_file, release = str(tmp_path / "pid"), str(tmp_path / "release")
        with app.app_context():
            held = executor.submit(write_pid_then_wait, pid_file, release)
            queued = [executor.submit(square, n) for n in range(3)]
            wait_for(pid_file)
            os.kill(int(Path(pid_file).read_text()), signal.SIGKILL)
            for future in [held, *queued]:  # every future it held fails; none hangs
                with pytest.raises(cf.process.BrokenProcessPool):
                    future.result(TIMEOUT)
            assert executor.submit(square, 7).result(TIMEOUT) == 49

    @pytest.mark.parametrize("backend", ["thread", "process", "gevent"])
    def test_shutdown_runs_every_accepted_task_exactly_once(self, make_executor, backend, tmp_path):
        if backend == "gevent":
            pytest.importorskip("gevent")
        app, executor = make_executor(EXECUTOR_TYPE=backend, EXECUTOR_MAX_WORKERS=2)
        log = str(tmp_path / "ran")
        with app.app_context():
            futures = [executor.submit(append_line, log, n) for n in range(3000)]
            executor.shutdown(wait=True)
            with pytest.raises(RuntimeError, match="after shutdown"):
                executor.submit(append_line, log, -1)
        assert all(f.done() for f in futures)
        assert sorted(int(line) for line in Path(log).read_text().split()) == list(range(3000))

    def test_finished_tasks_do_not_keep_their_request_alive(self, make_executor):
        app, executor = make_executor()
        with app.test_request_context("/?q=weak"):
            request_ref = weakref.ref(request._get_current_object())
            executor.submit_stored("w", lambda: request.args["q"])
            assert executor.futures.result("w", timeout=TIMEOUT) == "weak"
        future = executor.futures.pop("w")
        assert future.result() == "weak"
        del future
        gc.collect()
        assert request_ref() is None

    def test_memory_stays_flat_over_100k_submit_stored(self, make_executor, monkeypatch):
        psutil = pytest.importorskip("psutil")
        app, executor = make_executor(EXECUTOR_MAX_WORKERS=4)
        monkeypatch.setattr(app.logger, "disabled", True)  # not pytest's records of evictions
        process = psutil.Process()
        with app.test_request_context("/?q=mem"):
            for n in range(10_000):  # warm up: pools, allocator arenas
                executor.submit_stored(n, square, n)
            gc.collect()
            before = process.memory_info().rss
            for n in range(10_000, 110_000):
                executor.submit_stored(n, square, n)
                assert len(executor.futures) <= 50
            executor.shutdown(wait=True)
            gc.collect()
            after = process.memory_info().rss
        assert len(executor.futures) == 50
        assert after - before < 20 * 2**20, f"RSS grew {(after - before) / 2**20:.1f} MiB"

    def test_bound_holds_under_concurrent_writers(self, make_executor):
        app, executor = make_executor(EXECUTOR_FUTURES_MAX_LENGTH=50, EXECUTOR_MAX_WORKERS=4)
        stop = threading.Event()
        sizes: list[int] = []

        def watch() -> None:
            while not stop.is_set():
                sizes.append(len(executor.futures._futures))

        def write(w: int) -> None:
            with app.app_context():
                for n in range(1000):
                    executor.submit_stored((w, n), square, n)

        watcher = threading.Thread(target=watch)
        watcher.start()
        writers = [threading.Thread(target=write, args=(w,)) for w in range(4)]
        for thread in writers:
            thread.start()
        for thread in writers:
            thread.join(TIMEOUT)
        stop.set()
        watcher.join(TIMEOUT)
        assert sizes and max(sizes) <= 50 and len(executor.futures) == 50


class FuturesDictMachine(RuleBasedStateMachine):
    """FutureCollection against a model: an insertion-ordered dict that, when full, drops its
    oldest finished future, else its oldest."""

    def __init__(self) -> None:
        super().__init__()
        self.bound = 4
        self.real = FutureCollection(self.bound)
        self.model: dict[int, cf.Future] = {}

    @rule(key=st.integers(0, 7))
    def add(self, key: int) -> None:
        future: cf.Future = cf.Future()
        if key in self.model:
            with pytest.raises(ValueError, match="already exists"):
                self.real.add(key, future)
            return
        if len(self.model) == self.bound:  # the oldest finished goes first, else the oldest
            done = [k for k, f in self.model.items() if f.done()]
            del self.model[done[0] if done else next(iter(self.model))]
        self.real.add(key, future)
        self.model[key] = future

    @rule(key=st.integers(0, 7))
    def pop(self, key: int) -> None:
        assert self.real.pop(key) is self.model.pop(key, None)

    @rule(key=st.integers(0, 7))
    def finish(self, key: int) -> None:
        future = self.model.get(key)
        if future is not None and not future.done():
            future.set_result(key)
        assert self.real.done(key) == (None if future is None else future.done())
        assert self.real._state(key) == (None if future is None else future._state)

    @invariant()
    def same_contents(self) -> None:
        assert list(self.real._futures.items()) == list(self.model.items())
        assert len(self.real) == len(self.model)
        assert all(future in self.real for future in self.model.values())


TestFuturesDictModel = FuturesDictMachine.TestCase
TestFuturesDictModel.settings = settings(max_examples=60, deadline=None)

OPS = st.lists(
    st.tuples(st.sampled_from(["add", "pop", "contains"]), st.integers(0, 20)), max_size=60
)


@settings(max_examples=40, deadline=None)
@given(st.lists(OPS, min_size=2, max_size=6))
def test_futures_dict_under_concurrent_threads(per_thread_ops):
    """Threads on disjoint keys, all at once: each sees exactly its sequential model."""
    futures = FutureCollection(None)
    start = threading.Barrier(len(per_thread_ops), timeout=TIMEOUT)
    outcomes: dict[int, list] = {}
    models: dict[int, dict] = {}
    errors: list[BaseException] = []

    def worker(t: int, ops: list[tuple[str, int]]) -> None:
        try:
            seen, model = [], {}
            start.wait()
            for op, k in ops:
                key, future = (t, k), cf.Future()
                if op == "add":
                    try:
                        futures.add(key, future)
                        model[key] = future
                        seen.append(True)
                    except ValueError:
                        seen.append(key in model)
                elif op == "pop":
                    seen.append(futures.pop(key) is model.pop(key, None))
                else:
                    seen.append((model.get(key) in futures) is (key in model))
            outcomes[t], models[t] = seen, model
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=item) for item in enumerate(per_thread_ops)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
    assert errors == []
    assert all(all(seen) for seen in outcomes.values())
    expected = {key: f for model in models.values() for key, f in model.items()}
    assert dict(futures._futures) == expected and len(futures) == len(expected)


# -- nothing silent, nothing leaking ---------------------------------------------------


def return_lock() -> object:
    return threading.Lock()


class NeedsTwoArgs(Exception):
    """An exception that pickles but cannot be re-created from its pickle (two required args)."""

    def __init__(self, a: int, b: int) -> None:
        super().__init__(f"{a}+{b}")


def raise_needs_two_args() -> None:
    raise NeedsTwoArgs(1, 2)


def executor_records(caplog, app: Flask) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == app.logger.name]


def settle(future: cf.Future) -> None:
    """Wait for a future without reading it (under gevent, letting its greenlet run)."""
    deadline = time.monotonic() + TIMEOUT
    while not future.done() and time.monotonic() < deadline:
        if "gevent" in sys.modules:
            import gevent

            gevent.sleep(0.005)
        else:
            time.sleep(0.005)


class CallableJob:
    def __call__(self, x: int) -> int:
        return x + 1


class TestNothingSilent:
    def test_eviction_drops_finished_futures_first(self, make_executor, caplog):
        app, executor = make_executor(EXECUTOR_FUTURES_MAX_LENGTH=3)
        release = threading.Event()
        with app.app_context():
            running = [executor.submit_stored(f"run{n}", release.wait, TIMEOUT) for n in range(2)]
            executor.submit_stored("done0", square, 1).result(TIMEOUT)
            executor.submit_stored("new", square, 2).result(TIMEOUT)  # evicts done0, not run0
            assert executor.futures.keys() == ["run0", "run1", "new"]
            assert executor_records(caplog, app) == []  # a finished future goes quietly
            executor.submit_stored("newer", square, 3).result(TIMEOUT)  # evicts "new"
            assert executor.futures.keys() == ["run0", "run1", "newer"]
            release.set()
            assert all(f.result(TIMEOUT) for f in running)

    def test_evicting_a_running_future_warns_with_its_key(self, make_executor, caplog):
        app, executor = make_executor(EXECUTOR_FUTURES_MAX_LENGTH=2)
        release = threading.Event()
        with app.app_context():
            for key in ["a", "b", "c"]:
                executor.submit_stored(key, release.wait, TIMEOUT)
            release.set()
        assert executor.futures.keys() == ["b", "c"]  # the bound holds, as in 1.0
        [record] = executor_records(caplog, app)
        assert record.levelno == logging.WARNING
        assert "'a'" in record.getMessage() and "EXECUTOR_FUTURES_MAX_LENGTH" in record.getMessage()

    @pytest.mark.parametrize(("contexts", "failing"),
                             [(True, "task"), (False, "task"), (True, "teardown")])  # fmt: skip
    def test_unread_exception_logged_when_the_pool_ran_the_task_inside_submit(
        self, make_executor, caplog, contexts, failing
    ):
        class RunsInSubmit(cf.Executor):  # a pool of yours that is done before submit returns
            def submit(self, fn, /, *args, **kwargs):
                future = cf.Future()
                future.set_running_or_notify_cancel()
                run_into(future, fn, args, kwargs)
                return future

        def run_into(future, fn, args, kwargs):
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:
                future.set_exception(exc)
                future = None  # the traceback holds this frame: no cycle
            else:
                future.set_result(result)

        class Backend_(Backend):
            def create_pool(self, max_workers, config):
                return RunsInSubmit()

        Backend_.contexts = contexts
        app, executor = make_executor(EXECUTOR_TYPE=Backend_())
        task = functools.partial(fail, "read by nobody")
        if failing == "teardown":  # it fails around the task, not in it
            app.teardown_appcontext(lambda exc: g.get("in_task") and fail("read by nobody"))
            task = functools.partial(setattr, g, "in_task", True)
        with app.app_context():
            future = executor.submit(task)
        assert future.done()  # before submit returned, so before the future got its class
        del future
        gc.collect()  # the traceback's frames reach submit's, which held the future
        [record] = executor_records(caplog, app)
        assert "never retrieved" in record.getMessage() and "read by nobody" in caplog.text

    @pytest.mark.parametrize("backend", ["thread", "process", "gevent"])
    def test_a_future_whose_result_raised_needs_no_gc(self, make_executor, backend):
        if backend == "gevent":
            pytest.importorskip("gevent")
        app, executor = make_executor(EXECUTOR_TYPE=backend)
        with app.app_context():
            future = executor.submit(fail, "read once")
            with contextlib.suppress(ValueError):
                future.result(TIMEOUT)
        freed = weakref.ref(future)
        gc.disable()  # the raise added result()'s frames to the traceback the future holds
        try:
            del future
            assert freed() is None
        finally:
            gc.enable()

    @pytest.mark.parametrize("backend", ["thread", "process", "gevent"])
    def test_unretrieved_exception_is_logged_once(self, make_executor, caplog, backend):
        if backend == "gevent":
            pytest.importorskip("gevent")
        app, executor = make_executor(EXECUTOR_TYPE=backend)
        with app.app_context():
            future = executor.submit(fail, "nobody read me")
            settle(future)
        future_ref = weakref.ref(future)
        gc.disable()  # logged when dropped: no cycle may keep the future (and its task) alive
        try:
            del future
            assert future_ref() is None
            [record] = executor_records(caplog, app)
            assert "nobody read me" in caplog.text and "Traceback" in caplog.text
            assert "never retrieved" in record.getMessage() and "fail" in record.getMessage()
        finally:
            gc.enable()

    def test_retrieved_exception_is_not_logged(self, make_executor, caplog):
        app, executor = make_executor()
        with app.app_context():
            future = executor.submit(fail, "read")
            assert isinstance(future.exception(TIMEOUT), ValueError)
            with pytest.raises(ValueError):
                executor.submit(fail, "read too").result(TIMEOUT)
            del future
            gc.collect()
        assert executor_records(caplog, app) == []

    def test_propagated_exception_is_logged_once(self, make_executor, caplog):
        app, executor = make_executor(EXECUTOR_PROPAGATE_EXCEPTIONS=True)
        with app.app_context():
            future = executor.submit(fail, "once")
            cf.wait([future], TIMEOUT)
            deadline = time.monotonic() + TIMEOUT
            while not executor_records(caplog, app) and time.monotonic() < deadline:
                time.sleep(0.01)  # the logging callback runs just after the future is done
            del future
            gc.collect()
        assert len(executor_records(caplog, app)) == 1

    @pytest.mark.parametrize("backend", ["thread", "process"])
    @pytest.mark.parametrize("error", [SystemExit, KeyboardInterrupt])
    def test_base_exception_in_callback_does_not_stop_the_pool(
        self, make_executor, caplog, backend, error
    ):
        app, executor = make_executor(EXECUTOR_TYPE=backend, EXECUTOR_MAX_WORKERS=1)

        def bad_callback(future: cf.Future) -> None:
            raise error("callback left")

        with app.app_context():
            first = executor.submit(square, 2)
            first.add_done_callback(bad_callback)
            assert first.result(TIMEOUT) == 4
            executor.add_default_done_callback(bad_callback)
            assert [executor.submit(square, n).result(TIMEOUT) for n in range(3)] == [0, 1, 4]
        assert "callback left" in caplog.text

    def test_gevent_polling_adds_no_callbacks(self, make_executor):
        pytest.importorskip("gevent")
        app, executor = make_executor(EXECUTOR_TYPE="gevent")
        import gevent.event

        release = gevent.event.Event()
        with app.app_context():
            future = executor.submit(release.wait)
            before = len(future._done_callbacks)
            for _ in range(1000):
                with pytest.raises(cf.TimeoutError):
                    future.result(timeout=0)
            assert len(future._done_callbacks) <= before + 1
            release.set()
            assert future.result(TIMEOUT) is True

    def test_gevent_shutdown_wait_inside_a_task_raises(self, make_executor):
        pytest.importorskip("gevent")
        app, executor = make_executor(EXECUTOR_TYPE="gevent")
        with app.app_context():
            future = executor.submit(executor.shutdown, wait=True)
            with pytest.raises(RuntimeError, match="cannot join current greenlet"):
                future.result(TIMEOUT)
            assert executor.submit(square, 3).result(TIMEOUT) == 9  # refused: not shut down
        executor.shutdown(wait=True)  # returns: nothing is left waiting on itself

    def test_big_argument_is_pickled_once(self, make_executor):
        import tracemalloc

        big = b"x" * (50 * 2**20)

        def peak(submit) -> int:
            tracemalloc.start()
            try:
                assert submit(len, big).result(TIMEOUT) == len(big)
                return tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()

        app, executor = make_executor(EXECUTOR_TYPE="process", EXECUTOR_START_METHOD="fork")
        with cf.ProcessPoolExecutor(mp_context=multiprocessing.get_context("fork")) as raw:
            raw.submit(len, b"").result(TIMEOUT)  # workers started before measuring
            raw_peak = peak(raw.submit)
        with app.app_context():
            executor.submit(len, b"").result(TIMEOUT)
            ours_peak = peak(executor.submit)
        assert ours_peak < raw_peak * 1.2 + 2**20, (ours_peak, raw_peak)

    def test_unpicklable_return_value_names_the_task(self, make_executor):
        app, executor = make_executor(EXECUTOR_TYPE="process")
        with app.app_context():
            future = executor.submit(return_lock)
            with pytest.raises(TypeError, match=r"return value of .*return_lock.* sent back"):
                future.result(TIMEOUT)
            assert executor.submit(square, 3).result(TIMEOUT) == 9

    def test_exception_that_cannot_be_recreated_does_not_break_the_pool(self, make_executor):
        app, executor = make_executor(EXECUTOR_TYPE="process", EXECUTOR_MAX_WORKERS=1)
        with app.app_context():
            future = executor.submit(raise_needs_two_args)
            with pytest.raises(Exception, match=r"NeedsTwoArgs.*1\+2") as info:
                future.result(TIMEOUT)
            assert not isinstance(info.value, cf.BrokenExecutor)
            assert "raise_needs_two_args" in str(info.value.__cause__)  # the remote traceback
            assert executor.submit(square, 3).result(TIMEOUT) == 9

    @pytest.mark.parametrize("backend", ["thread", "process"])
    @pytest.mark.parametrize(
        "fn", [functools.partial(add, y=10), CallableJob()], ids=["partial", "object"]
    )
    def test_job_on_partial_or_callable_object(self, make_executor, caplog, backend, fn):
        app, executor = make_executor(EXECUTOR_TYPE=backend, EXECUTOR_PROPAGATE_EXCEPTIONS=True)
        job = executor.job(fn)
        assert repr(fn) in repr(job)
        with app.app_context():
            assert job.submit(1).result(TIMEOUT) == 11 if isinstance(fn, functools.partial) else 2
            cf.wait([job.submit("not a number")], TIMEOUT)
        deadline = time.monotonic() + TIMEOUT
        while "background task" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.01)
        assert "background task" in caplog.text and "Logging error" not in caplog.text

    def test_broken_pool_is_replaced_once_when_another_thread_replaced_it(self, executors):
        healthy = cf.ThreadPoolExecutor(1)
        made: list[cf.Executor] = []

        class BrokenPool(cf.ThreadPoolExecutor):
            def submit(self, fn, /, *args, **kwargs):
                state.pool = healthy  # another thread found it broken and replaced it meanwhile
                raise cf.BrokenExecutor("a worker died")

        class OnceBroken(Backend):
            def create_pool(self, max_workers, config):
                made.append(BrokenPool(1) if not made else cf.ThreadPoolExecutor(1))
                return made[-1]

        app = make_app(EXECUTOR_TYPE=OnceBroken())
        executor = Executor(app)
        executors.append(executor)
        state = app.extensions[executor._state_key]
        with app.app_context():
            assert executor.submit(square, 4).result(TIMEOUT) == 16  # on the replacement
        assert state.pool is healthy and len(made) == 1 and not healthy._shutdown
        healthy.shutdown()

    def test_result_timeout_names_the_task(self, make_executor):
        app, executor = make_executor()
        release = threading.Event()
        with app.app_context():
            future = executor.submit(release.wait, TIMEOUT)
            with pytest.raises(cf.TimeoutError, match=r"wait.* did not finish within 0.01 s"):
                future.result(timeout=0.01)
            release.set()

    def test_help_lists_every_config_key(self):
        for key in flask_executor._KEYS:
            assert key in flask_executor.__doc__


class TestFuturesMapping:
    def test_read_only_mapping_methods(self):
        futures = FutureCollection()
        a, b = cf.Future(), cf.Future()
        futures.add("a", a)
        futures.add("b", b)
        assert list(futures) == ["a", "b"] and futures.keys() == ["a", "b"]
        assert futures.items() == [("a", a), ("b", b)] and futures.values() == [a, b]
        assert futures["a"] is a and futures.get("b") is b
        assert futures.get("missing") is None and futures.get("missing", 5) == 5
        with pytest.raises(KeyError, match="missing"):
            futures["missing"]
        assert a in futures and "a" not in futures  # 1.0: `in` tests futures, not keys
        assert futures.done("a") is False  # by-key forwarding is unchanged


# -- databases in tasks: Flask-SQLAlchemy on a real SQLite file -------------------------


def rename_in_worker(database_url: str, item_id: int, name: str) -> str:
    """The process-backend pattern: take an id, open an engine and a session in the worker."""
    import sqlalchemy as sa
    from sqlalchemy.orm import Session

    engine = sa.create_engine(database_url)
    try:
        with Session(engine) as db_session, db_session.begin():
            table = sa.table("item", sa.column("id"), sa.column("name"))
            db_session.execute(sa.update(table).where(table.c.id == item_id).values(name=name))
        return name
    finally:
        engine.dispose()


@pytest.fixture
def database(tmp_path, executors):
    """An app with Flask-SQLAlchemy on a SQLite file, its table, and an Item model."""
    fsa = pytest.importorskip("flask_sqlalchemy")
    db = fsa.SQLAlchemy()

    class Item(db.Model):  # type: ignore[name-defined]
        id = db.Column(db.Integer, primary_key=True)
        name = db.Column(db.String(50), unique=True)

    def make(backend: str, **config: object) -> Flask:
        app = make_app(
            SQLALCHEMY_DATABASE_URI=f"sqlite:///{tmp_path / 'app.db'}",
            SQLALCHEMY_ENGINE_OPTIONS={"connect_args": {"timeout": 30}},
            EXECUTOR_TYPE=backend,
            **config,
        )
        db.init_app(app)
        with app.app_context():
            db.create_all()
        executors.append(Executor(app))
        return app

    return make, db, Item


DB_BACKENDS = ["thread", "gevent"]


class TestDatabases:
    @pytest.fixture(autouse=True)
    def _backend(self, request):
        if "gevent" in request.node.name:
            pytest.importorskip("gevent")

    @pytest.mark.parametrize("backend", DB_BACKENDS)
    def test_failed_commit_does_not_break_the_next_task(self, database, backend):
        make, db, Item = database
        app = make(backend, EXECUTOR_MAX_WORKERS=1)  # one worker: the thread is reused
        executor = app.extensions["executor"]

        def insert(name: str) -> int:
            item = Item(name=name)
            db.session.add(item)
            db.session.commit()  # no rollback on failure: the task just raises
            return item.id

        with app.app_context():
            assert run(executor.submit(insert, "same")) == 1
            with pytest.raises(sa_integrity_error()):
                run(executor.submit(insert, "same"))  # unique constraint
            assert run(executor.submit(insert, "next")) == 2  # the same worker, a clean session
            assert sorted(db.session.scalars(db.select(Item.name))) == ["next", "same"]

    @pytest.mark.parametrize("backend", DB_BACKENDS)
    def test_concurrent_tasks_each_commit(self, database, backend):
        make, db, Item = database
        app = make(backend, EXECUTOR_MAX_WORKERS=8)
        executor = app.extensions["executor"]

        def insert(n: int) -> int:
            db.session.add(Item(name=f"row-{n}"))
            db.session.commit()
            return n

        with app.app_context():
            futures = [executor.submit(insert, n) for n in range(40)]
            assert sorted(run(f) for f in futures) == list(range(40))
            names = set(db.session.scalars(db.select(Item.name)))
        assert names == {f"row-{n}" for n in range(40)}

    @pytest.mark.parametrize("backend", DB_BACKENDS)
    def test_task_never_shares_the_views_session(self, database, backend):
        make, db, Item = database
        app = make(backend)
        executor = app.extensions["executor"]

        def task_commit() -> tuple[int, bool]:
            seen = db.session.scalar(db.select(db.func.count()).select_from(Item))
            db.session.add(Item(name="from-task"))
            db.session.commit()
            return seen, view_session is db.session()

        with app.test_request_context("/"):
            view_session = db.session()
            db.session.add(Item(name="from-view"))  # pending in the view, never flushed
            seen, shared = run(executor.submit(task_commit))
            assert (seen, shared) == (0, False)  # the view's pending row is not visible
            db.session.rollback()  # the view changes its mind
            names = list(db.session.scalars(db.select(Item.name)))
        assert names == ["from-task"]  # the task's commit did not commit the view's row

    def test_process_backend_pattern_pass_ids(self, database, tmp_path):
        make, db, Item = database
        app = make("process", EXECUTOR_MAX_WORKERS=1)
        executor = app.extensions["executor"]
        with app.app_context():
            item = Item(name="before")
            db.session.add(item)
            db.session.commit()
            url = db.engine.url.render_as_string(hide_password=False)
            future = executor.submit(rename_in_worker, url, item.id, "after")
            assert future.result(TIMEOUT) == "after"
            db.session.expire_all()
            assert db.session.get(Item, item.id).name == "after"


def sa_integrity_error() -> type[BaseException]:
    import sqlalchemy.exc

    return sqlalchemy.exc.IntegrityError


# -- beyond one machine: the README's Dask and loky recipes, against real pools ----------


def readme_recipe(name: str) -> dict[str, object]:
    """Execute the README's ``# recipe: name`` code block; return its namespace."""
    text = (HERE / "README.md").read_text()
    blocks = [b.split("```", 1)[0] for b in text.split("```python\n")[1:]]
    (code,) = [b for b in blocks if b.startswith(f"# recipe: {name}")]
    namespace: dict[str, object] = {"__name__": f"readme_{name}"}
    exec(compile(code, f"README.md ({name})", "exec"), namespace)
    return namespace


def test_readme_quickstart(executors):
    namespace = readme_recipe("quickstart")
    app, executor = namespace["app"], namespace["executor"]
    executors.append(executor)
    client = app.test_client()
    assert client.get("/report/status").status_code == 404
    assert client.get("/signup?email=a@example.com").text == "ok"
    assert client.get("/report/start?month=11").text == "started"
    executor.futures.get("report").result(TIMEOUT)
    assert client.get("/report/status").json == {
        "state": "done",
        "result": {"month": "11", "total": 42},
    }
    assert client.get("/report/status").status_code == 404  # popped once read


def http_call(url: str, method: str = "GET") -> tuple[int, dict]:
    """(status, JSON body) over a new connection, for any status."""
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, method=method), timeout=TIMEOUT
        ) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_readme_workers_recipe_under_gunicorn(tmp_path):
    """The README's status view, served as written by gunicorn -w 4: no poll misses its job."""
    pytest.importorskip("gunicorn")
    text = (HERE / "README.md").read_text()
    (code,) = [b.split("```", 1)[0] for b in text.split("```python\n")[1:]
               if b.startswith("# recipe: workers")]  # fmt: skip
    (tmp_path / "readme_workers.py").write_text(code)
    port = free_port()
    argv = [sys.executable, "-m", "gunicorn", "-k", "gthread", "-w", "4", "--threads", "4",
            "--chdir", str(tmp_path), "-b", f"127.0.0.1:{port}", "readme_workers:app"]  # fmt: skip
    server = Server(argv, port)
    try:
        with cf.ThreadPoolExecutor(8) as clients:
            starts = list(clients.map(
                lambda n: http_call(f"{server.base}/reports?month={n}", "POST"), range(20)
            ))  # fmt: skip
            assert all(status == 202 for status, _ in starts)
            jobs = {n: body["status"] for n, (_, body) in enumerate(starts)}
            results: dict[int, dict] = {}
            deadline = time.monotonic() + 60
            while len(results) < len(jobs) and time.monotonic() < deadline:
                waiting = [n for n in jobs if n not in results]
                replies = clients.map(lambda n: http_call(server.base + jobs[n]), waiting)
                for n, (status, body) in zip(waiting, replies, strict=True):
                    assert status in (200, 202), body  # never "unknown": every worker knows it
                    if status == 200:
                        results[n] = body
        assert results == {n: {"state": "done", "result": {"month": str(n), "total": 42}}
                           for n in jobs}  # fmt: skip
        assert http_call(server.base + jobs[0])[0] == 404  # popped once read
        assert (tmp_path / "instance" / "executor-futures.db").exists()
    finally:
        server.stop()


def pid_after(release: str, pid_dir: str) -> int:
    """Record this worker's pid, wait for the release file, return the pid."""
    Path(pid_dir, str(os.getpid())).write_text("")
    wait_for(release, timeout=60)
    return os.getpid()


remote = Executor(name="remote")  # the Dask tests' executor, with a module-level job


@remote.job
def double(x: int) -> int:
    return 2 * x


@pytest.fixture(scope="module")
def dask_cluster():
    distributed = pytest.importorskip("distributed")
    cluster = distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
        dashboard_address=None, silence_logs=logging.ERROR,
        scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},  # its HTTP endpoint: any free port
    )  # fmt: skip
    try:
        yield cluster
    finally:
        cluster.close()


class TestDask:
    @pytest.fixture
    def dask_app(self, dask_cluster, monkeypatch, executors):
        monkeypatch.setattr(flask_executor, "BACKENDS", dict(flask_executor.BACKENDS))
        readme_recipe("dask")
        app = make_app(
            REMOTE_EXECUTOR_TYPE="dask",
            REMOTE_EXECUTOR_DASK_ADDRESS=dask_cluster.scheduler_address,
            REMOTE_EXECUTOR_PROPAGATE_EXCEPTIONS=True,
        )
        remote.init_app(app)
        executors.append(remote)
        return app, remote

    def test_submit_map_stored_and_jobs(self, dask_app):
        app, executor = dask_app
        with app.test_request_context("/?q=dask"):
            assert executor.submit(add, 2, y=3).result(TIMEOUT) == 5
            assert executor.submit(worker_pid).result(TIMEOUT) != os.getpid()
            assert list(executor.map(square, range(5), timeout=TIMEOUT)) == [0, 1, 4, 9, 16]
            executor.submit_stored("d", square, 9)
            deadline = time.monotonic() + TIMEOUT
            while not executor.futures.done("d") and time.monotonic() < deadline:
                time.sleep(0.01)  # polling the futures dict is what this test is about
            assert executor.futures._state("d") == "FINISHED"
            assert executor.futures.pop("d").result() == 81
            assert double.submit(3).result(TIMEOUT) == 6  # a job, pickled by name
            assert executor.submit(lambda x: x + 1, 1).result(TIMEOUT) == 2  # cloudpickle
            box: list = []
            future = executor.submit(square, 4)
            future.add_done_callback(lambda f: box.append(request.args["q"]))
            future.result(TIMEOUT)
        deadline = time.monotonic() + TIMEOUT
        while not box and time.monotonic() < deadline:
            time.sleep(0.01)  # the callback runs on Dask's client thread
        assert box == ["dask"]  # callbacks run in the web process, in contexts

    def test_exceptions_are_returned_and_logged(self, dask_app, caplog):
        app, executor = dask_app
        with app.app_context():
            future = executor.submit(fail, "remote")
            with pytest.raises(ValueError, match="remote"):
                future.result(TIMEOUT)
        deadline = time.monotonic() + TIMEOUT
        while "background task" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.01)
        assert "background task" in caplog.text and "remote" in caplog.text

    def test_killed_worker_mid_task_is_run_again(self, dask_app, tmp_path):
        app, executor = dask_app
        pids, release = tmp_path / "pids", str(tmp_path / "release")
        pids.mkdir()
        with app.app_context():
            future = executor.submit(pid_after, release, str(pids))
            first = int(Path(wait_for_entry(pids)).name)
            os.kill(first, signal.SIGKILL)  # the worker dies mid-task
            deadline = time.monotonic() + 60
            while len(list(pids.iterdir())) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)  # the scheduler gives the task to another worker
            Path(release).write_text("")
            second = future.result(60)
        assert second != first and {first, second} <= {int(p.name) for p in pids.iterdir()}


def wait_for_entry(folder: Path, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        entries = list(folder.iterdir())
        if entries:
            return str(entries[0])
        time.sleep(0.02)
    raise TimeoutError(folder)


class TestLoky:
    @pytest.fixture
    def loky_app(self, monkeypatch, executors):
        pytest.importorskip("loky")
        monkeypatch.setattr(flask_executor, "BACKENDS", dict(flask_executor.BACKENDS))
        readme_recipe("loky")
        app = make_app(EXECUTOR_TYPE="loky", EXECUTOR_MAX_WORKERS=2)
        executor = Executor(app)
        executors.append(executor)
        return app, executor

    def test_closures_run_in_worker_processes(self, loky_app):
        app, executor = loky_app
        offset = 10
        with app.app_context():
            assert executor.submit(lambda x: x + offset, 5).result(TIMEOUT) == 15
            assert executor.submit(lambda: os.getpid()).result(TIMEOUT) != os.getpid()
            assert list(executor.map(lambda x: x * offset, range(3), timeout=TIMEOUT)) == [
                0,
                10,
                20,
            ]
            with pytest.raises(ValueError, match="loky"):
                executor.submit(fail, "loky").result(TIMEOUT)

    def test_crashed_worker_heals(self, loky_app):
        app, executor = loky_app
        with app.app_context():
            with pytest.raises(cf.BrokenExecutor):
                executor.submit(die).result(TIMEOUT)
            assert executor.submit(square, 6).result(TIMEOUT) == 36


# -- nothing that looks like it works and does not (#22) -------------------------------------


async def async_double(x: int) -> tuple[int, str, str]:
    await asyncio.sleep(0.01)
    where = request.args.get("q", "") if has_request_context() else ""
    return 2 * x, current_app.name if has_app_context() else "", where


def gevent_in_threads_app() -> Flask:
    """EXECUTOR_TYPE='gevent' served by a threaded server (a mistake #22 catches)."""
    app = Flask("gevent_in_threads")
    app.config["EXECUTOR_TYPE"] = "gevent"
    executor = Executor(app)

    @app.route("/submit")
    def submit() -> tuple[str, int]:
        try:
            executor.submit(square, 2)
        except RuntimeError as exc:
            return str(exc), 500
        return "queued", 200

    return app


class TestNoFalseFronts:
    def test_gevent_under_gunicorn_gthread_refuses_with_the_fix(self):
        pytest.importorskip("gunicorn")
        pytest.importorskip("gevent")
        port = free_port()
        app = "test_flask_executor:gevent_in_threads_app()"
        argv = [sys.executable, "-m", "gunicorn", "-k", "gthread", "-w", "2", "--threads", "4",
                "-b", f"127.0.0.1:{port}", app]  # fmt: skip
        server = Server(argv, port)
        try:
            with pytest.raises(urllib.error.HTTPError) as error:
                http_get(f"{server.base}/submit")
            message = error.value.read().decode()
            assert error.value.code == 500 and "runs none: its tasks would never run" in message
            assert "gunicorn -k gevent" in message and "EXECUTOR_TYPE='thread'" in message
        finally:
            server.stop()

    def test_gevent_from_a_plain_thread_refuses_and_from_the_main_thread_runs(self, make_executor):
        pytest.importorskip("gevent")
        app, executor = make_executor(EXECUTOR_TYPE="gevent")
        with app.app_context():
            error = in_thread(lambda: executor.submit(square, 2))
            assert isinstance(error, RuntimeError) and "would never run" in str(error)
            assert executor.submit(square, 3).result(TIMEOUT) == 9  # a script waiting on it

    @pytest.mark.parametrize("backend", ["thread", "process"])
    def test_async_def_tasks_run_to_their_end_in_their_contexts(self, make_executor, backend):
        app, executor = make_executor(EXECUTOR_TYPE=backend)
        with app.test_request_context("/?q=async"), warnings.catch_warnings():
            warnings.simplefilter("error")  # no "coroutine was never awaited"
            result = executor.submit(async_double, 21).result(TIMEOUT)
            stored = executor.submit_stored("a", async_double, 2).result(TIMEOUT)
        if backend == "thread":
            assert result == (42, "test_app", "async") and stored == (4, "test_app", "async")
        else:  # process tasks get no contexts
            assert result == (42, "", "") and stored == (4, "", "")

    def test_async_def_tasks_on_gevent_fail_visibly(self, make_executor):
        pytest.importorskip("gevent")
        app, executor = make_executor(EXECUTOR_TYPE="gevent")
        with app.app_context(), pytest.raises(TypeError, match="cannot run in a gevent greenlet"):
            executor.submit(async_double, 1).result(TIMEOUT)

    def test_futures_read_before_init_app_resolve_when_used(self):
        executor = Executor()
        futures = executor.futures  # 1.0 code keeps this at import time
        app = make_app()
        executor.init_app(app)
        try:
            with app.app_context():
                executor.submit_stored("k", square, 4).result(TIMEOUT)
                assert futures.done("k") and futures.result("k") == 16 and len(futures) == 1
                assert futures["k"].result() == 16 and list(futures) == ["k"]
                assert futures.pop("k").result() == 16 and futures.get("k") is None
        finally:
            executor.shutdown()

    def test_a_flood_of_evictions_logs_a_line_not_thousands(self, make_executor, caplog):
        app, executor = make_executor(EXECUTOR_MAX_WORKERS=1, EXECUTOR_FUTURES_MAX_LENGTH=50)
        EVENTS["flood"] = release = threading.Event()
        with app.app_context(), caplog.at_level(logging.WARNING):
            executor.submit(wait_event, "flood")
            for n in range(10_000):  # all queued behind the blocker: none is done
                executor.submit_stored(n, square, n)
            release.set()
        lines = [r.getMessage() for r in caplog.records if "futures dict full" in r.getMessage()]
        assert 1 <= len(lines) <= 2, len(lines)
        assert "dropped the stored future 0 while its task was still running" in lines[0]

    def test_a_named_executor_holding_executor_in_its_name_warns_of_nothing(self, caplog):
        app = make_app(BG_EXECUTOR_EXECUTOR_TYPE="thread", BG_EXECUTOR_EXECUTOR_TIMOUT=1)
        with caplog.at_level(logging.WARNING):
            Executor(app, name="bg_executor").shutdown()
        lines = [r.getMessage() for r in caplog.records if "is not one" in r.getMessage()]
        assert lines == [
            "config key BG_EXECUTOR_EXECUTOR_TIMOUT is not one flask_executor reads: did you "
            "mean BG_EXECUTOR_EXECUTOR_TIMEOUT?"
        ]

    def test_gevent_from_a_native_thread_of_a_patched_process_refuses(self):
        pytest.importorskip("gevent")
        result = run_script(
            """
            from gevent import monkey; monkey.patch_all()
            import time
            from gevent.monkey import get_original
            from flask_executor import Executor
            from test_flask_executor import make_app, square
            app = make_app(EXECUTOR_TYPE="gevent")
            executor = Executor(app)
            box = []
            def native():
                with app.app_context():
                    try:
                        executor.submit(square, 2)
                        box.append("accepted")
                    except RuntimeError as exc:
                        box.append(str(exc))
            get_original("_thread", "start_new_thread")(native, ())
            deadline = time.monotonic() + 30
            while not box and time.monotonic() < deadline:
                get_original("time", "sleep")(0.01)
            print(box[0])
            """
        )
        assert "its tasks would never run" in result.stdout, result.stdout + result.stderr

    def test_a_misspelt_key_is_named_once_with_the_closest_key(self, caplog):
        app = make_app(EXECUTOR_TIMOUT=5, MAIL_EXECUTOR_MAXWORKERS=2, SCHEDULER_EXECUTORS={})
        with caplog.at_level(logging.WARNING):
            executors = [Executor(app), Executor(app, name="mail")]
        for executor in executors:
            executor.shutdown()
        lines = [r.getMessage() for r in caplog.records if "is not one" in r.getMessage()]
        assert lines == [
            "config key EXECUTOR_TIMOUT is not one flask_executor reads: did you mean "
            "EXECUTOR_TIMEOUT?",
            "config key MAIL_EXECUTOR_MAXWORKERS is not one flask_executor reads: did you "
            "mean MAIL_EXECUTOR_MAX_WORKERS?",
        ]


class DecoratedApp(Flask):
    @functools.cache  # noqa: B019  # a decorator that wraps the function
    def cached(self, x: int) -> int:
        return x


class OddlyNamed:
    """A callable whose __qualname__ is no str (an attribute of the instance)."""

    def __init__(self, name: object) -> None:
        self.__qualname__ = name

    def __call__(self, x: int) -> int:
        return x + 1


# -- misuse: the README's error table, row by row (those not tested above) ----------------


class TestMisuse:
    def test_unpicklable_argument_names_the_object(self, make_executor):
        app, executor = make_executor(EXECUTOR_TYPE="process", EXECUTOR_MAX_WORKERS=1)
        with app.app_context():
            future = executor.submit(add, threading.Lock(), 1)
            with pytest.raises(TypeError, match=r"cannot send <unlocked _thread.lock .* cannot"):
                future.result(TIMEOUT)
            assert executor.submit(add, 1, 1).result(TIMEOUT) == 2  # the pool goes on

    def test_bound_method_of_the_app_is_refused(self, make_executor):
        app, executor = make_executor(EXECUTOR_TYPE="process")
        with app.app_context(), pytest.raises(TypeError, match="bound method of the Flask app"):
            executor.submit(app.make_response, "x")

    def test_decorated_and_builtin_methods_of_the_app_are_refused(self, make_executor):
        app, executor = make_executor(EXECUTOR_TYPE="process")
        decorated = DecoratedApp("decorated")
        for method in (decorated.cached, app.__sizeof__):
            with app.app_context(), pytest.raises(TypeError, match="bound method of the Flask"):
                executor.submit(method, 1)

    def test_closure_is_refused_at_submit(self, make_executor):
        app, executor = make_executor(EXECUTOR_TYPE="process")

        def inner() -> int:
            return 1

        with app.app_context(), pytest.raises(TypeError, match=r"cannot send .*inner.* nested"):
            executor.submit(inner)

    @pytest.mark.parametrize("name", [5, None])
    def test_a_callable_whose_qualname_is_no_str_runs(self, make_executor, name):
        app, executor = make_executor(EXECUTOR_TYPE="process", EXECUTOR_MAX_WORKERS=1)
        with app.app_context():
            assert executor.submit(OddlyNamed(name), 1).result(TIMEOUT) == 2

    @pytest.mark.parametrize("chunksize", [1, 3])
    def test_map_refuses_what_cannot_reach_a_worker_whatever_the_chunks(self, make_executor,
                                                                         chunksize):  # fmt: skip
        app, executor = make_executor(EXECUTOR_TYPE="process", EXECUTOR_MAX_WORKERS=1)
        with app.app_context(), pytest.raises(TypeError, match=r"cannot send .*lambda"):
            executor.map(lambda x: x, range(6), chunksize=chunksize)

    def test_bad_chunksize(self, make_executor):
        app, executor = make_executor()
        with app.app_context(), pytest.raises(ValueError, match="chunksize must be >= 1, got 0"):
            executor.map(square, [1], chunksize=0)


def test_readme_gevent_threads_recipe(monkeypatch, executors):
    pytest.importorskip("gevent")
    monkeypatch.setattr(flask_executor, "BACKENDS", dict(flask_executor.BACKENDS))
    readme_recipe("gevent-threads")
    app = make_app(EXECUTOR_TYPE="gevent-threads")
    executor = Executor(app)
    executors.append(executor)
    heard: list[str] = []
    called = threading.Event()
    executor.add_default_done_callback(lambda f: (heard.append(request.args["q"]), called.set()))
    with app.test_request_context("/?q=real"):
        future = executor.submit(lambda: (request.args["q"], threading.get_ident()))
        assert future.result(TIMEOUT) == ("real", future.result()[1])
        assert future.result()[1] != threading.get_ident()  # a real thread, not the caller
    assert called.wait(TIMEOUT) and heard == ["real"]  # its futures are gevent's own proxies


# -- the test harness itself ------------------------------------------------------------


def test_a_task_that_never_ends_fails_its_test_and_cannot_hang_the_run(tmp_path):
    """What the README's Tests section says of the executors fixture: a test whose task
    never ends fails with every thread's stack, and the run ends instead of hanging."""
    (tmp_path / "test_stuck.py").write_text(
        textwrap.dedent("""
        import threading
        from test_flask_executor import executors, make_executor  # noqa: F401 (fixtures)

        def test_leaves_a_task_running(make_executor):
            app, executor = make_executor()
            started = threading.Event()  # (else shutdown's cancel_futures may cancel it first)
            with app.app_context():
                executor.submit(lambda: started.set() or threading.Event().wait())
                assert started.wait(30)
    """)
    )
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "test_stuck.py"],
        env={**os.environ, "PYTHONPATH": str(HERE), "TESTS_WAIT_SECONDS": "1"},
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    out = run.stdout + run.stderr
    assert run.returncode == 1, out
    assert "did not shut down within 1.0 s" in out, out
    assert "ERROR test_stuck.py::test_leaves_a_task_running" in out, out
    assert "ending the run: tasks of ['test_stuck.py::test_leaves_a_task_running']" in out, out
    assert " in wait" in out, out  # the stuck thread's stack (faulthandler's) was printed
