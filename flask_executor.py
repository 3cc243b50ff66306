"""Background tasks for Flask apps, on a thread, process or gevent pool, in one module.

``executor.submit(fn, *args)`` returns a :class:`concurrent.futures.Future` at once and
runs ``fn`` with a copy of the Flask contexts it was submitted from. A rewrite of
Flask-Executor 1.0 (MIT): code written for 1.0 keeps working. This file can be vendored.
Sections 1-6 are the core; 7 (time limits) and 8 (shared stores) are optional tails.

Config keys, read from ``app.config``, else the environment (``Executor(name='mail')`` reads
``MAIL_EXECUTOR_TYPE`` and so on):

- ``EXECUTOR_TYPE``: ``'thread'`` (default), ``'process'``, ``'gevent'``, a registered name,
  or a :class:`Backend` object.
- ``EXECUTOR_MAX_WORKERS``: pool size, a whole number >= 1; None lets the pool choose.
- ``EXECUTOR_FUTURES_MAX_LENGTH``: how many futures ``executor.futures`` keeps (50).
- ``EXECUTOR_PROPAGATE_EXCEPTIONS``: log every failing task through ``app.logger`` (False).
- ``EXECUTOR_PUSH_APP_CONTEXT``: run thread and gevent tasks in a fresh app context (True).
- ``EXECUTOR_START_METHOD``: how process workers start: ``'spawn'`` (default),
  ``'forkserver'`` or ``'fork'``.
- ``EXECUTOR_FUTURES_STORE``: where stored futures live: ``'memory'`` (default: this process),
  ``'sqlite:///path.db'`` (every process on the machine; relative to ``app.instance_path``),
  ``'redis://host:port/db'`` (several machines), or a :class:`FuturesStore` object.
- ``EXECUTOR_FUTURES_TTL``: seconds a shared store keeps a finished future (None: no limit).
- ``EXECUTOR_FUTURES_NAMESPACE``: where a shared store keeps this executor's keys (the app's
  import name). A shared store also needs the app's SECRET_KEY: outcomes are signed with it.
- ``EXECUTOR_TIMEOUT``: seconds a task may run (at most a day; None: no limit). Then its
  future is done at once, with TaskTimeout, and the task is asked to stop: stop_requested().
"""

from __future__ import annotations

import _thread
import abc
import asyncio
import atexit
import collections
import concurrent.futures
import contextlib
import contextvars
import difflib
import functools
import hashlib
import heapq
import hmac
import inspect
import itertools
import logging
import multiprocessing
import os
import pickle
import queue
import random
import re
import socket
import sqlite3
import sys
import threading
import time
import traceback
import types
import weakref
from concurrent.futures import Future
from typing import Any, Callable, Iterable, Iterator, NamedTuple, TypeVar

from flask import Flask
from flask.ctx import AppContext
from flask.globals import _cv_app
from flask.signals import appcontext_popped, appcontext_pushed

__version__ = "2.0.0"
# fmt: off
__all__ = ["BACKENDS", "Backend", "Config", "Executor", "ExecutorJob", "FutureCollection",
           "FuturesStore", "GeventBackend", "ProcessBackend", "RedisStore", "Row", "SQLiteStore",
           "TaskTimeout", "ThreadBackend", "register_backend", "stop_requested"]
# fmt: on

T = TypeVar("T")
_MISSING: Any = object()  # no future_key was given positionally
Task = Callable[..., Any]
Callback = Callable[[Future[Any]], object]

# A pool belongs to one process: its threads, queues and worker processes do not survive a
# fork (gunicorn --preload builds the app in its master, then forks the workers). Each app's
# state records the process it built its pool in; a forked child builds its own on first use.
_pid = os.getpid()  # this process, kept current by the fork hook below: a cheap check
# Guards what a process builds for itself on first use after a fork: an app's pool
# (_in_this_process), the watchdog thread (section 7), a SQLite store's connections (8).
_fork_lock = threading.Lock()


class _Pools(weakref.WeakSet["_ThreadPool"]):
    """Every thread pool of this process, for its exit hook (_end_threads, section 3)."""

    exit_hook = False  # registered (once a process, whatever its pools)
    exiting = False  # the interpreter exits: pools take no new task


_POOLS = _Pools()


def _after_fork_in_child() -> None:
    """A forked child's fresh start: its pid, and new locks (another thread of the parent
    may have held one at the fork, and nothing in the child would ever release it)."""
    global _pid, _fork_lock, _connect_lock
    _pid = os.getpid()
    _fork_lock, _connect_lock = threading.Lock(), threading.Lock()
    _POOLS.clear()  # the parent's thread pools (their locks too): not this process's
    forkserver = sys.modules.get("multiprocessing.forkserver")
    if forkserver is not None:  # the parent's fork server is not this process's child
        server: Any = getattr(forkserver, "_forkserver")  # noqa: B009
        preload = server._preload_modules
        server.__init__()  # forgets it, in place (the module's functions are bound to it)
        server._preload_modules = preload


if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork
    os.register_at_fork(after_in_child=_after_fork_in_child)


# -- 1. Configuration ----------------------------------------------------------------

# Every key an executor reads (see the module's docstring), and its default.
_DEFAULTS: dict[str, Any] = {
    "EXECUTOR_TYPE": "thread",
    "EXECUTOR_MAX_WORKERS": None,
    "EXECUTOR_FUTURES_MAX_LENGTH": 50,
    "EXECUTOR_PROPAGATE_EXCEPTIONS": False,
    "EXECUTOR_PUSH_APP_CONTEXT": True,
    "EXECUTOR_START_METHOD": "spawn",
    "EXECUTOR_FUTURES_STORE": "memory",
    "EXECUTOR_FUTURES_TTL": None,
    "EXECUTOR_FUTURES_NAMESPACE": None,  # the app's import name (section 8)
    "EXECUTOR_TIMEOUT": None,
}
_KEYS = list(_DEFAULTS)
_TRUE, _FALSE = {"1", "true", "t", "yes", "y", "on"}, {"0", "false", "f", "no", "n", "off"}


def _prefix(name: str) -> str:
    """What a named executor's keys start with: ``Executor(name='mail')`` reads ``MAIL_...``."""
    return f"{name.upper()}_" if name else ""


class Config:
    """One executor's keys on one app: ``NAME_EXECUTOR_*`` from app.config, else os.environ."""

    def __init__(self, app: Flask, name: str) -> None:
        self.app = app
        self.prefix = _prefix(name)

    def get(self, key: str, default: Any = None) -> Any:
        """The raw value of ``key`` (given unprefixed, e.g. ``'EXECUTOR_TYPE'``)."""
        full = self.prefix + key
        if full in self.app.config:
            return self.app.config[full]
        return os.environ.get(full, _DEFAULTS.get(key, default))

    def number(self, key: str, most: float | None = None) -> Any:
        """A whole number >= 1, or with ``most`` a number of seconds in (0, most]; or None.
        Strings such as ``'5'`` and ``'2.5'`` are accepted, bools are not."""
        value = self.get(key)
        if value is None or str(value).strip().lower() in ("", "none"):
            return None
        try:
            number = 0 if isinstance(value, bool) else (float if most else int)(str(value).strip())
        except ValueError:
            number = 0
        if 0 < number <= (most or number) and (most or number >= 1):
            return number
        what = (
            f"a number of seconds > 0 (at most {most:g}, a day)" if most else "a whole number >= 1"
        )
        raise ValueError(f"{self.prefix}{key} must be {what} or None, got {value!r}")

    def seconds(self, key: str) -> float | None:
        """Seconds > 0 and at most a day (longer is a mistake, and beyond it no timer waits)."""
        return self.number(key, 86400.0)  # type: ignore[no-any-return]

    def flag(self, key: str) -> bool:
        """A bool; strings such as ``'true'``, ``'0'``, ``'off'`` are accepted."""
        value = self.get(key)
        text = str(value).strip().lower()
        if isinstance(value, bool) or text in _TRUE | _FALSE:
            return text in _TRUE
        raise ValueError(
            f"{self.prefix}{key} must be a bool (true/false, 1/0, yes/no, on/off), got {value!r}"
        )


# -- 2. Contexts: what a task captures at submit, and how it runs ---------------------

_current: contextvars.ContextVar[Any] = contextvars.ContextVar(f"{__name__}.task")


class _Task:
    """What a task keeps of its submitter (captured at submit), and its stop state.

    ``stopped`` is how its future was stopped (a factory of the TaskTimeout or
    CancelledError it got). Its function's end and each stop claim the task by appending to
    ``claims`` (None: the end; a stop: a 1-tuple of its error): the first claim wins, so a
    task that returned is never reported stopped. One append, atomic on every CPython (free-
    threaded too), where a lock's acquire and release cost a task 2,000 instructions.
    """

    __slots__ = ("app", "claims", "context", "fn", "g_attrs", "inside", "limit", "pid", "push",
                 "started", "stopped")  # fmt: skip

    def __init__(self, app: Flask, g_attrs: dict[str, Any] | None, push: bool, fn: Task,
                 limit: float | None) -> None:  # fmt: skip
        self.app = app  # (one assignment a line: cheaper than tuples, on the submit path)
        self.g_attrs = g_attrs
        self.push = push
        self.fn = fn
        self.limit = limit
        # the copied variables hold the request, the session and the caller's own variables
        self.context = contextvars.copy_context()
        self.pid = _pid
        self.started: float | None = None
        self.stopped: Callable[[], BaseException] | None = None
        self.claims: list[tuple[Callable[[], BaseException]] | None] = []
        self.inside = False  # in its own function (only there may gevent throw a stop in)

    def stop_requested(self) -> bool:
        if self.stopped is not None:
            return True
        limit, started = self.limit, self.started
        return limit is not None and started is not None and time.monotonic() >= started + limit

    def stop(self, error: Callable[[], BaseException], ask: bool = True) -> bool:
        """Claim it for a stop with ``error``, and ask it to stop (or, not ``ask``, once the
        stop stands: see _gated); False if its function ended (or a stop came) first."""
        if self.claims:  # claimed (stops are one at a time, under the future's lock): a stop
            return False  # that loses leaves nothing behind, however many come
        self.claims.append(mine := (error,))
        if self.claims[0] is not mine:
            return False
        if ask:
            self.stopped = error
        return True

    def finish(self) -> BaseException | None:
        """Claim its function's end: None, or the error its future got if a stop claimed it
        first (past its limit, it is: the watchdog may not have run yet)."""
        if None not in self.claims:  # (_call may have claimed it: only this thread ends it)
            self.claims.append(None)
        if (first := self.claims[0]) is not None:
            self.stopped = first[0]
        elif self.limit is not None and self.stop_requested():
            self.stopped = functools.partial(TaskTimeout, _task_name(self.fn), self.limit)
        return None if self.stopped is None else self.stopped()

    def unstop(self) -> None:
        """Undo a stop that claimed it but was refused (see _gated: its row holds another
        outcome, which stands): it runs on as if its end had claimed it, so no stop can. (If
        its function ended while the stop was being stored, it has raised the stop already.)"""
        self.stopped = None
        self.claims[0] = None


def _run_callback(task: _Task, fn: Callback, future: Future[Any]) -> None:
    """Run a done-callback as its task ran; any exception is logged, never raised: a
    SystemExit raised here would end the pool's thread, and every task queued behind it."""
    try:
        task.context.copy().run(_in_app_context, task, False, fn, (future,), {})
    except BaseException:
        task.app.logger.exception(
            "done-callback %r of background task %s raised", fn, _task_name(task.fn)
        )


def _task_name(fn: object) -> str:
    """How errors name a task: ``module.qualname``, else its repr (a partial, an object)."""
    name = getattr(fn, "__qualname__", None)
    return f"{getattr(fn, '__module__', None)}.{name}" if isinstance(name, str) else repr(fn)


def _in_app_context(task: _Task, is_task: bool, fn: Task, args: Any, kwargs: Any) -> Any:
    """Call fn in a fresh app context of the task's app, its g filled from what was captured.

    Runs in the submitter's copied variables, where ``_cv_app`` still holds its context.
    Pushed and popped as Flask does (signals; a nested ``with`` of the same context inside
    the task tears nothing down). For the task itself (not one of its done-callbacks),
    stop_requested() answers for it, and teardown functions run, once, after it.
    """
    if is_task:
        _current.set(task)
        if task.limit is not None:
            task.started = time.monotonic()
    if not task.push:
        return _call(task, fn, args, kwargs) if is_task else fn(*args, **kwargs)
    app_ctx = _push(task.app, task.g_attrs)
    error: BaseException | None = None
    try:
        if appcontext_pushed.receivers:
            appcontext_pushed.send(task.app, _async_wrapper=task.app.ensure_sync)
        return _call(task, fn, args, kwargs) if is_task else fn(*args, **kwargs)
    except BaseException as exc:
        error = exc
        raise
    finally:
        try:
            _pop(app_ctx, error, is_task)
        finally:
            error = None  # the traceback holds this frame: no cycle keeping the task alive


def _call(task: _Task | _WorkerTask, fn: Task, args: Any, kwargs: Any) -> Any:
    """Call a task's function, then claim its end: if it was stopped first, raise the
    error its future got (so teardown sees it, and a stored task stores nothing)."""
    if type(fn) is _StoredTask:  # marks its row; stops only its function, not its writes
        return fn.run(task, args, kwargs)
    if task.stopped is not None:  # cancelled while its context was pushed
        raise task.stopped()
    task.inside = True
    try:
        result = fn(*args, **kwargs)
        if type(result) is types.CoroutineType:  # an async def task: run it to its end
            result = _run_coroutine(result, fn)
    except BaseException:
        task.inside = False
        if (error := task.finish()) is None:
            raise
        try:
            raise error from None
        finally:
            error = None  # the traceback holds this frame: no cycle keeping the task alive
    task.inside = False
    if type(task) is _Task and task.limit is None:  # the common end, claimed here (a call
        task.claims.append(None)  # less): a thread or gevent task with no limit
        if task.claims[0] is None:
            return result
    if (error := task.finish()) is None:
        return result
    try:
        raise error
    finally:
        error = None


def _run_coroutine(coroutine: Any, fn: Task) -> Any:
    """Run an ``async def`` task in an event loop of its own (asyncio copies the contexts).
    Not in a greenlet: greenlets of one thread would share asyncio's one loop per thread."""
    gevent = sys.modules.get("gevent")
    if gevent is not None and gevent.getcurrent().parent is not None:
        coroutine.close()
        raise TypeError(
            f"{_task_name(fn)} is an async def function, which cannot run in a gevent "
            "greenlet (EXECUTOR_TYPE='gevent', or any task under monkey-patching): greenlets "
            "of one thread would share its one asyncio loop; make it a plain function"
        )
    return asyncio.run(coroutine)


# Pushing a task's context. Flask's own push() and pop() would, on Flask 3.2, route the
# request again, run its teardown_request functions and close its uploaded files: those
# belong to the view. So the task's context is entered as push() does it, which needs the
# private bookkeeping of the installed Flask, detected here: up to 3.1 AppContext keeps a
# list of tokens (_cv_tokens) and the request rides in its own context variable; from 3.2
# (AppContext.has_request) the app context holds the request, one token (_cv_token) and a
# push count. If Flask moves them, test_flask_private_names_we_rely_on_are_where_we_expect
# fails.
_MERGED_CONTEXTS = hasattr(AppContext, "has_request")


def _push(app: Flask, g_attrs: dict[str, Any] | None) -> Any:
    """Enter a new app context of app (on 3.2 with the submitter's request and session),
    its g filled from what was captured."""
    submitter = _cv_app.get(None)
    if _MERGED_CONTEXTS and submitter is not None and submitter.app is app:
        ctx: Any = submitter.copy()  # type: ignore[attr-defined,unused-ignore]
    else:
        ctx = app.app_context()
    if _MERGED_CONTEXTS:
        ctx._cv_token, ctx._push_count = _cv_app.set(ctx), 1
    else:
        ctx._cv_tokens.append(_cv_app.set(ctx))
    if g_attrs:
        ctx.g.__dict__.update(g_attrs)
    return ctx


def _pop(ctx: Any, error: BaseException | None, teardown: bool) -> None:
    """Leave a context _push entered; after a task (not a callback) run the app's teardown
    functions first (do_teardown_appcontext(ctx, exc) from 3.2)."""
    try:
        if teardown and _MERGED_CONTEXTS:
            ctx.app.do_teardown_appcontext(ctx, error)
        elif teardown:
            ctx.app.do_teardown_appcontext(error)
    finally:
        if _MERGED_CONTEXTS:
            _cv_app.reset(ctx._cv_token)
            ctx._cv_token, ctx._push_count = None, 0
        else:
            _cv_app.reset(ctx._cv_tokens.pop())
        if appcontext_popped.receivers:
            appcontext_popped.send(ctx.app, _async_wrapper=ctx.app.ensure_sync)


_DONE = ("FINISHED", "CANCELLED", "CANCELLED_AND_NOTIFIED")  # a Future's states once done

try:

    class _FutureLock(_thread.RLock):  # type: ignore[misc]  # typeshed calls it final; it is not
        """A future's lock and condition in one (Future calls it _condition): entered in C, not
        through threading.Condition's Python methods, five times for each task. A thread that
        waits sleeps on a lock of its own, in a list made by the first wait; notify_all, a
        no-op in C until then, wakes them (it holds the list, not this lock: no cycle to
        collect). A gevent task's waiters in its own hub wait on its Event instead. If a
        Python forbids subclassing RLock, the future falls back to a threading.Condition
        (test_gevent_future_lock fails)."""

        _sleepers: list[Any] | None = None
        notify_all: Callable[[], object] = staticmethod(tuple)  # nobody waits: a no-op, in C

        def wait(self, timeout: float | None = None) -> bool:
            """As Condition.wait: the caller holds this lock, released while it sleeps."""
            sleeper, woken = _thread.allocate_lock(), False
            sleeper.acquire()
            if (sleepers := self._sleepers) is None:
                sleepers = self._sleepers = []
                self.notify_all = functools.partial(_wake_all, sleepers)
            sleepers.append(sleeper)
            held = self._release_save()  # type: ignore[attr-defined]  # as Condition does
            try:
                if timeout is None:
                    woken = sleeper.acquire()
                elif timeout > 0:
                    woken = sleeper.acquire(True, timeout)
                else:  # a deadline already past: no wait at all
                    woken = sleeper.acquire(False)
            finally:
                self._acquire_restore(held)  # type: ignore[attr-defined]
                if sleeper in sleepers:  # timed out, or interrupted: not left to pile up
                    sleepers.remove(sleeper)
            return woken
except TypeError:  # a Python whose RLock cannot be subclassed: the Future's own kind
    _FutureLock = threading.Condition  # type: ignore[misc,assignment]


def _wake_all(sleepers: list[Any]) -> None:
    for sleeper in sleepers:
        sleeper.release()
    sleepers.clear()


class _ContextFuture(Future):  # type: ignore[type-arg]
    """A Future whose done-callbacks run in its task's Flask contexts, whose exception, if
    nobody ever reads it, is logged when the future is dropped (as asyncio does), and which
    cancel() or a time limit makes done at once, even while its task runs on (section 7).

    It makes, reads and writes Future's private state (_condition, _state, _result,
    _exception, _waiters, _done_callbacks, _invoke_callbacks) instead of calling Future's
    methods on each task's path: CPython's own subclasses use these names, which
    concurrent.futures has kept since Python 3.2."""

    _captured: _Task | None = None
    _retrieved = False  # result() or exception() has returned the outcome to someone
    _stopped_at: float | None = None  # when it was stopped: the pool's late outcome is dropped
    _ask: Callable[..., object] | None = None  # the process pool's way to ask its task
    _ended = False  # the pool's outcome came back (the process pool's, under its lock)
    _gate: Callable[[BaseException], BaseException | None] | None = None  # a shared store's
    _hub: Any = None  # a gevent task's: the hub whose loop runs it

    def __init__(self, patched: bool = False) -> None:  # Future's fields; a lock entered in C
        # (where threading is monkey-patched, greenlets must wait for the lock: its own kind)
        self._condition: Any = threading.Condition() if patched else _FutureLock()
        self._state, self._result, self._exception = "PENDING", None, None
        self._waiters: list[Any] = []
        self._done_callbacks: list[Any] = []

    def add_done_callback(self, fn: Callback) -> None:
        if self._captured is not None:
            fn = functools.partial(_run_callback, self._captured, fn)
        super().add_done_callback(fn)

    def cancel(self) -> bool:
        """Cancel a pending task; a running one's future is cancelled at once and its task
        asked to stop (stop_requested()). False once it has finished."""
        if super().cancel():
            return True
        fn = self._captured.fn if self._captured is not None else None
        return _stop(self, functools.partial(_cancelled_error, fn))

    def _kill(self) -> None:
        """Stop the task beyond stop_requested(): the gevent pool's (a process task was
        asked in _stop, before its future was made done)."""

    def _limit_callbacks(self) -> None:
        """Run the callbacks of a future stopped at its limit (gevent's: in its hub)."""
        self._invoke_callbacks()  # type: ignore[attr-defined]

    def set_result(self, result: Any) -> None:
        if self._ask is not None:  # its worker is done with it: free its stop request
            self._ask(self, True)
        try:
            Future.set_result(self, result)
        except concurrent.futures.InvalidStateError:  # stopped first: dropped (and said)
            if self._stopped_at is None:
                raise
            _late(self)

    def set_exception(self, exception: BaseException | None) -> None:
        if self._ask is not None:
            self._ask(self, True)
        if type(exception) is _NotStarted and _stop(self, lambda: exception, kill=False):
            return  # cancelled through the shared store: cancelled here too
        try:
            Future.set_exception(self, exception)
        except concurrent.futures.InvalidStateError:
            if self._stopped_at is not None:  # stopped first: dropped (and said)
                _late(self)
            elif not self.cancelled():  # (a process pool that breaks fails every call it
                raise  # holds; _ProcessPool.shutdown leaves cancelled ones among them)
            elif self._state == "CANCELLED":  # then its waiters (concurrent.futures.wait)
                self.set_running_or_notify_cancel()  # hear it, as from the pool
        else:
            _watch_unread(self)

    def result(self, timeout: float | None = None) -> Any:
        """As Future.result (written out: one call less on every task's path); a wait that
        times out names the task, and a gevent task's waiter in its hub waits as a greenlet."""
        if self._hub is not None:
            self._wait(timeout)  # type: ignore[attr-defined]
        with self._condition:
            if self._state not in _DONE:
                self._condition.wait(timeout)
            state, error = self._state, self._exception
            if state == "FINISHED" and error is None:
                return self._result
        if state == "FINISHED":
            self._retrieved = True
        elif state in _DONE:
            error = concurrent.futures.CancelledError()
        else:
            error = self._timed_out(timeout, state)
        del self  # the raise puts this frame in the traceback that the future holds:
        try:  # without self in it, no cycle keeps the future alive
            raise error  # type: ignore[misc]  # (FINISHED and not a result: an exception)
        finally:
            error = None

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if self._hub is not None:
            self._wait(timeout)  # type: ignore[attr-defined]
        try:
            exception = Future.exception(self, timeout)
        except concurrent.futures.TimeoutError:
            raise self._timed_out(timeout, self._state) from None
        self._retrieved = True
        return exception

    def _timed_out(self, timeout: float | None, state: str) -> concurrent.futures.TimeoutError:
        task = _task_name(self._captured.fn) if self._captured else "the task"
        now = "it has not started: queued" if state == "PENDING" else "it goes on running"
        return concurrent.futures.TimeoutError(
            f"background task {task} did not finish within {timeout} s ({now})"
        )


_NOTHING: dict[str, Any] = {}  # no keyword arguments (one dict, not one per submit)


class _Unread:
    """Mixed into the class of a future that failed: if nobody ever reads its exception,
    it is logged when the future is dropped, as asyncio does. A thread or gevent future
    gets it only once it fails (a finalizer costs every task that has one); a process
    pool's, or one from a pool of yours, gets it at once (see _watch_unread)."""

    def __del__(self) -> None:
        future: Any = self
        task = future._captured
        if future._exception is None or future._retrieved or task is None:
            return
        if task.pid != _pid:  # a copy a forked child inherited: the parent's to read
            return
        with contextlib.suppress(Exception):  # logging may be torn down at interpreter exit
            task.app.logger.error(
                "background task %s raised an exception that was never retrieved: read "
                "future.result() or future.exception(), or set EXECUTOR_PROPAGATE_EXCEPTIONS",
                _task_name(task.fn),
                exc_info=future._exception,
            )


def _watch_unread(future: Any) -> None:
    """Give a failed future the finalizer that logs an exception nobody read: from
    set_exception, or at submit for a pool that made a plain Future (it may fail it itself,
    or before the submitter gave it our class)."""
    cls = type(future)  # (its _captured may not be set yet: the submitter sets it)
    if not issubclass(cls, _Unread):
        future.__class__ = _unread_class(cls)


def _unread_class(cls: type) -> type:
    """The future class ``cls`` with _Unread mixed in (made once)."""
    unread = _UNREAD.get(cls) or type(cls.__name__, (_Unread, cls), {"__module__": __name__})
    return _UNREAD.setdefault(cls, unread)


_UNREAD: dict[type, type] = {}  # each future class, and the same with _Unread mixed in


# 1.0's futures were proxies, and real code reads the future behind one by this name.
setattr(_ContextFuture, "__proxied_object", property(lambda future: future))


# -- 3. Backends ---------------------------------------------------------------------


class Backend(abc.ABC):
    """How the tasks of one EXECUTOR_TYPE run: the pool, and whether they get Flask contexts.

    ``create_pool`` may return any :class:`concurrent.futures.Executor`; to check or wrap
    each task before it is queued, return a pool whose ``submit`` does so.
    """

    #: True: each task runs inside a copy of its submitter's Flask contexts (GUIDE's table).
    contexts = True

    @abc.abstractmethod
    def create_pool(self, max_workers: int | None, config: Config) -> concurrent.futures.Executor:
        """Build the pool that one app's tasks run on."""


# A queued task: (future, fn, args, kwargs). A plain tuple, unpacked where it is read: a
# NamedTuple's Python-level __new__ costs 3% of a whole task.
_Call = tuple[Any, Task, tuple[Any, ...], dict[str, Any]]


def _run_in_future(call: _Call) -> bool:
    """Run a queued call and give its future the outcome; True if the call ended with a
    BaseException that is no Exception (GreenletExit: its greenlet was killed). Future's
    set_running_or_notify_cancel and set_result are written out for the common case (a
    call less each, on every task's path; see _ContextFuture on Future's private state)."""
    future, fn, args, kwargs = call
    del call  # only `future` may hold the future (it is cleared below: no cycle)
    with future._condition:
        if pending := future._state == "PENDING":
            future._state = "RUNNING"
    if not pending and not future.set_running_or_notify_cancel():  # (cancelled)
        return False
    try:
        result = fn(*args, **kwargs)
    except BaseException as exc:
        try:
            future.set_exception(exc)
        except concurrent.futures.InvalidStateError:  # the task set its future itself
            _already_done(future, fn, exc)
        future = None  # the traceback holds this frame: no cycle
        return not isinstance(exc, Exception)
    with future._condition:
        if running := future._state == "RUNNING":  # not stopped meanwhile
            future._result, future._state = result, "FINISHED"
            for waiter in future._waiters:
                waiter.add_result(future)
            future._condition.notify_all()
    if running:
        future._invoke_callbacks()
    elif future._stopped_at is not None:  # stopped first: dropped (and said)
        _late(future)
    else:  # the task (or another) set its future itself
        _already_done(future, fn)
    return False


def _already_done(future: Any, fn: Task, exc: BaseException | None = None) -> None:
    logging.getLogger(__name__).warning(
        "background task %s: its future was already done, its outcome was dropped",
        _task_name(future._captured.fn if future._captured else fn),
        exc_info=exc,
    )


class ThreadBackend(Backend):
    """Tasks on a pool of threads, with Flask contexts."""

    def create_pool(self, max_workers: int | None, config: Config) -> concurrent.futures.Executor:
        return _ThreadPool(max_workers, f"{config.app.name}-{config.prefix}executor")


class _ThreadPool(concurrent.futures.ThreadPoolExecutor):
    """A ThreadPoolExecutor whose queue holds our futures themselves, made at submit: its own
    make a plain Future and a work item, and a Future whose class is changed after it is made
    costs a third more at every later step. Like CPython's, it starts a thread per submit
    while none is idle, up to max_workers, and at exit runs what was queued, then ends.

    Only the class is CPython's (code checks isinstance(pool, ThreadPoolExecutor)): none of
    its methods or private names are used. _shutdown_lock guards _shutdown, _threads, the
    taking of _idle tokens, and what is queued (see _end_threads)."""

    def __init__(self, max_workers: int | None, thread_name_prefix: str) -> None:
        if max_workers is not None and max_workers <= 0:
            raise ValueError("max_workers must be greater than 0")
        self._max_workers = max_workers or min(32, (os.cpu_count() or 1) + 4)
        self._thread_name_prefix = thread_name_prefix
        self._work_queue: Any = queue.SimpleQueue()  # of _Call, or None: end
        self._idle: list[None] = []  # a token from each thread that waits for work again
        self._threads: set[threading.Thread] = set()
        self._shutdown = self._broken = False  # (never broken: 1.0 code reads _broken)
        self._shutdown_lock = threading.Lock()
        monkey = sys.modules.get("gevent.monkey")
        self._patched = monkey is not None and monkey.is_module_patched("threading")
        # Its threads hold this, not the pool: dropped (in a cycle too), they are told to end.
        self._ref = weakref.ref(self, functools.partial(_end_pool_threads, self._work_queue))
        _POOLS.add(self)
        if not _POOLS.exit_hook:  # (threading's own exit hook, as ThreadPoolExecutor's: it runs
            _POOLS.exit_hook = True  # before the interpreter waits for non-daemon threads)
            getattr(threading, "_register_atexit", atexit.register)(_end_threads)

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        future = _ContextFuture(self._patched)
        with self._shutdown_lock:
            if self._shutdown or _POOLS.exiting:
                why = "interpreter shutdown" if _POOLS.exiting else "shutdown"
                raise RuntimeError(f"cannot schedule new futures after {why}")
            if self._idle:  # (only submits take tokens, under this lock; appends are atomic)
                self._idle.pop()
            elif len(self._threads) < self._max_workers:  # started first: if it cannot be,
                name = f"{self._thread_name_prefix}_{len(self._threads)}"  # nothing is queued
                thread = threading.Thread(
                    target=_work, args=(self._ref, self._work_queue, self._idle), name=name,
                    daemon=True,
                )  # fmt: skip
                thread.start()
                self._threads.add(thread)
            self._work_queue.put((future, fn, args, kwargs))
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        queued = []
        with self._shutdown_lock:
            self._shutdown = True
            while cancel_futures:  # those still queued (a thread takes one only to run it)
                try:
                    call = self._work_queue.get_nowait()
                except queue.Empty:
                    break
                if call is not None:
                    queued.append(call)
            self._work_queue.put(None)  # each thread passes it on to the next, and ends
        for future, _, _, _ in queued:  # (their callbacks may submit: not under the lock)
            future.cancel()
        for thread in list(self._threads) if wait else ():
            thread.join()


def _work(pool_ref: object, work_queue: queue.SimpleQueue[_Call | None], idle: list[None]) -> None:
    """A pool thread: run queued calls until it meets None (shutdown, exit, pool dropped).
    It holds the pool's weakref (not the pool), whose callback puts that None."""
    while (call := work_queue.get()) is not None:
        try:
            _run_in_future(call)
        except BaseException:  # (it must not end the thread: the pool counts on it)
            logging.getLogger(__name__).exception("a background task's outcome was lost")
        del call  # (its arguments are not kept alive while the thread waits)
        idle.append(None)
    work_queue.put(None)


def _end_pool_threads(work_queue: queue.SimpleQueue[Any], _: object) -> None:
    work_queue.put(None)


def _end_threads() -> None:
    """At interpreter exit: no pool takes a task from now on (a submit holding a pool's lock
    queued before this None, or sees `exiting`); what is queued runs, then the threads end."""
    _POOLS.exiting = True
    pools = list(_POOLS)
    for pool in pools:
        with pool._shutdown_lock:
            pool._work_queue.put(None)
    for pool in pools:
        for thread in list(pool._threads):
            thread.join()


class GeventBackend(Backend):
    """Tasks as greenlets, for apps served by gevent."""

    def create_pool(self, max_workers: int | None, config: Config) -> concurrent.futures.Executor:
        try:
            import gevent  # noqa: F401
        except ImportError as exc:
            raise ImportError("EXECUTOR_TYPE='gevent' needs gevent: pip install gevent") from exc
        return _GeventExecutor(max_workers)


class _GeventExecutor(concurrent.futures.Executor):
    """Greenlets behind the Executor interface; ``submit`` never blocks. Each greenlet runs
    its task, then any that were queued while max_workers greenlets ran (a gevent Pool
    would do what this does, with more Python-level calls per task).

    No locks: it is used from the greenlets of one hub, which switch only where they wait."""

    _greenlet_class: Any = None  # its greenlets' class (made with the first gevent executor)

    def __init__(self, max_workers: int | None) -> None:
        import gevent
        import gevent.event

        _GeventFuture._new_event = gevent.event.Event
        self._get_hub, self._getcurrent = gevent.get_hub, gevent.getcurrent
        # Its greenlets do not record the lines of the 10 frames above each spawn (gevent's
        # debugging aid, which it lets a Greenlet class turn off): 17,000 instructions for
        # a task submitted from a view, a sixth of its whole cost.
        if _GeventExecutor._greenlet_class is None:
            attrs = {"spawning_stack_limit": 0, "__module__": __name__}
            _GeventExecutor._greenlet_class = type("TaskGreenlet", (gevent.Greenlet,), attrs)
        self._spawn, self._joinall = self._greenlet_class.spawn, gevent.joinall
        self._max_workers = max_workers
        self._greenlets: dict[Any, Future[Any]] = {}  # spawned, not ended: their first task
        monkey = sys.modules.get("gevent.monkey")  # gevent patches before the app is built
        self._patched = monkey is not None and monkey.is_module_patched("threading")
        self._waiting: collections.deque[_Call] = collections.deque()  # oldest first
        self._shutdown = False

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        if self._getcurrent().parent is None and not _runs_a_hub():
            raise RuntimeError(
                "EXECUTOR_TYPE='gevent' runs tasks as greenlets of the submitting thread's "
                f"gevent hub, and this thread ({threading.current_thread().name}) runs none: "
                "its tasks would never run. Serve the app with gevent (gunicorn -k gevent, "
                "gevent.pywsgi) or call gevent.monkey.patch_all() first, or use "
                "EXECUTOR_TYPE='thread'"
            )
        future = _GeventFuture(self._patched)
        future._hub = self._get_hub()  # the hub whose loop will run the greenlet
        call = (future, fn, args, kwargs)
        if (
            self._max_workers is not None
            and len(self._greenlets) >= self._max_workers
            and self._live() >= self._max_workers
        ):
            self._waiting.append(call)
        else:
            future._greenlet = greenlet = self._spawn(self._run, call)  # where a stop is thrown in
            self._greenlets[greenlet] = future
        return future

    def _start(self, call: _Call) -> None:
        future, _, _, _ = call
        future._greenlet = greenlet = self._spawn(self._run, call)
        self._greenlets[greenlet] = future

    def _live(self) -> int:
        """How many of its greenlets live, once those killed before they started are
        dropped (gevent.killall): each one's task never runs, and its future is cancelled."""
        for greenlet in [g for g in self._greenlets if g.dead]:  # (one that ran is not here)
            future = self._greenlets.pop(greenlet, None)  # (a callback below may switch to
            if future is not None:  # another greenlet, which drops it first)
                Future.cancel(future)
        return len(self._greenlets)

    def _run(self, call: _Call) -> None:
        """A greenlet: its call, then those waiting. Killed (GreenletExit thrown in), it ends
        there; killed before one of them ran, that one goes back to the queue; another
        greenlet then runs the rest (a task accepted is run)."""
        greenlet = self._getcurrent()
        try:
            killed = _run_in_future(call)
            while self._waiting and not killed:
                future, _, _, _ = call = self._waiting.popleft()
                future._greenlet = greenlet
                killed = _run_in_future(call)
        finally:
            self._greenlets.pop(greenlet, None)
            future, _, _, _ = call
            if future._state == "PENDING":
                self._waiting.appendleft(call)
            # (a task's traceback may keep this frame alive: it must not hold a future)
            future = call = None  # type: ignore[assignment]
            if self._waiting and self._live() < (self._max_workers or 0):
                self._start(self._waiting.popleft())

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        if wait and self._getcurrent() in self._greenlets:
            raise RuntimeError(
                "cannot join current greenlet: shutdown(wait=True) was called from one of this "
                "executor's own tasks, which would wait for itself; use shutdown(wait=False)"
            )
        self._shutdown = True
        if cancel_futures:  # spawned, not started (a greenlet's args are dropped once it
            # ends; cancelling a started one's first call does nothing)
            calls = [*(call for greenlet in self._greenlets for call in greenlet.args),
                     *self._waiting]  # fmt: skip
            self._waiting.clear()
            for future, _, _, _ in calls:
                Future.cancel(future)  # pending only, not a running one
        while wait and (self._greenlets or self._waiting):
            if self._waiting and self._live() < (self._max_workers or 0):  # (all that
                self._start(self._waiting.popleft())  # ran them were killed)
            self._joinall([g for g in self._greenlets if not g.dead])
            self._live()  # (drops those killed before they started)


def _runs_a_hub() -> bool:
    """Whether this thread, outside any greenlet, lets gevent's hub run: the main thread
    does (a script's main thread runs it while it waits on a result); a plain thread of a
    threaded server, or a native thread of a monkey-patched process, never does."""
    return _MAIN_OS_THREAD is None or _os_thread() == _MAIN_OS_THREAD


# This OS thread's id: threading's is a greenlet's under gevent's monkey-patching, which
# cannot have replaced _thread.get_ident before gevent.monkey was imported.
_monkey = sys.modules.get("gevent.monkey")
_os_thread = _thread.get_ident if _monkey is None else _monkey.get_original("_thread", "get_ident")
del _monkey
# The main thread's OS id, if this module is imported there (else every thread may submit).
_MAIN_OS_THREAD = _os_thread() if threading.current_thread() is threading.main_thread() else None
_hub_lookup: Callable[[], Any] | None = None  # gevent's, once gevent is imported


def _hub_here() -> Any:
    """gevent's hub of this thread, if it has one; never makes one (a hub holds file
    descriptors that only its thread closes). gevent has no public way to ask this; its
    _hub_local module does: if it moves, test_gevent_private_names_we_rely_on_are_where_we_expect
    fails."""
    global _hub_lookup
    if _hub_lookup is None:
        if "gevent" not in sys.modules:
            return None
        from gevent._hub_local import get_hub_if_exists

        _hub_lookup = get_hub_if_exists
    return _hub_lookup()


class _GeventFuture(_ContextFuture):
    """A Future a greenlet can wait on without blocking its hub, patched or not."""

    _new_event: Any = None  # gevent's Event class (set with the first gevent executor)
    _event: Any = None  # one gevent Event, set when done: polling adds nothing per call
    _greenlet: Any = None  # the greenlet that runs its task

    def _invoke_callbacks(self) -> None:
        if self._event is not None:  # a greenlet of its hub waits (see _wait)
            self._event.set()
        super()._invoke_callbacks()  # type: ignore[misc]

    def _limit_callbacks(self) -> None:
        """Stopped at its limit by a thread of the watchdog's: unless gevent patched threads
        into greenlets, that is not its hub's thread, where its callbacks belong."""
        hub = self._hub
        if hub is not None and _os_thread() != hub.thread_ident:  # in a greenlet of its own:
            spawn = sys.modules["gevent"].spawn_raw  # a callback may wait cooperatively
            with contextlib.suppress(Exception):  # (its loop is gone: here, then)
                hub.loop.run_callback_threadsafe(spawn, self._invoke_callbacks)
                return
        self._invoke_callbacks()

    def _kill(self) -> None:
        if self._greenlet is not None:  # thrown in from its hub, whichever thread stops it
            with contextlib.suppress(Exception):  # (its loop is gone: nothing runs it)
                self._hub.loop.run_callback_threadsafe(self._throw)

    def _throw(self) -> None:
        """In the hub: the greenlet waits at a switch. Only inside the task's function."""
        task = self._captured
        if task is not None and task.inside and not self._greenlet.dead:
            self._greenlet.throw(_Stop)

    def _wait(self, timeout: float | None) -> None:
        """In the hub that runs the task, wait as a greenlet: a thread's blocking wait would
        stop the hub, and the task with it. Another thread's wait blocks only that thread."""
        if self._state in _DONE or _hub_here() is not self._hub:
            return
        if self._event is None:
            self._event = self._new_event()  # set by _invoke_callbacks, which runs after
            if self._state in _DONE:  # the state is set: done meanwhile, it found no event
                return
        if not self._event.wait(timeout):
            raise self._timed_out(timeout, self._state)


class ProcessBackend(Backend):
    """Tasks on a :class:`concurrent.futures.ProcessPoolExecutor`: no contexts, pickled calls.

    EXECUTOR_START_METHOD picks how worker processes start: ``'spawn'`` (the default: a fresh
    interpreter, safe whatever threads or forks the web process has), ``'forkserver'`` or
    ``'fork'`` (fastest; workers inherit a copy of the web process as it was).
    """

    contexts = False

    def create_pool(self, max_workers: int | None, config: Config) -> concurrent.futures.Executor:
        method = str(config.get("EXECUTOR_START_METHOD")).strip().lower()
        if method not in multiprocessing.get_all_start_methods():
            raise ValueError(
                f"{config.prefix}EXECUTOR_START_METHOD={method!r} is not a start method on this "
                f"platform; choose one of {multiprocessing.get_all_start_methods()}"
            )
        limit = config.seconds("EXECUTOR_TIMEOUT")
        return _ProcessPool(max_workers, multiprocessing.get_context(method), limit)


class _ProcessPool(concurrent.futures.ProcessPoolExecutor):
    """A process pool that refuses, with the reason, what cannot reach a worker process,
    and that can ask a running task to stop (its shared arrays: see _started, section 7)."""

    def __init__(self, max_workers: int | None, mp_context: Any, limit: float | None) -> None:
        slots = 2 * (max_workers or os.cpu_count() or 1) + 2  # running or in the call queue
        self._stops, self._starts = mp_context.RawArray("q", slots), None
        if limit is not None:  # only a pool with a limit pays for knowing when tasks start
            self._starts = mp_context.RawArray("d", 2 * _STARTS)
        self._ends = mp_context.RawArray("q", _STARTS)  # tasks whose function has returned
        shared = (self._stops, self._starts, self._ends)
        super().__init__(
            max_workers, mp_context=mp_context, initializer=_init_worker, initargs=shared
        )
        self._limit = limit
        self._numbers = itertools.count(1)  # task numbers; 0 marks a free slot
        self._stops_lock = threading.Lock()  # guards _stops, and each future's _ended
        if _KNOWN_PROCESS_POOL:  # (see there)
            self._work_ids: Any = queue.SimpleQueue()
        monkey = sys.modules.get("gevent.monkey")  # (its futures' locks: see _ContextFuture)
        self._patched = monkey is not None and monkey.is_module_patched("threading")
        # The pool pickles calls in its queue's feeder thread and fails the future with the
        # bare pickling error; name the object that failed instead. _on_queue_feeder_error
        # is the hook CPython's process.py has for that (3.9+): if it moves,
        # test_unpicklable_argument_names_the_object fails.
        calls: Any = self._call_queue  # type: ignore[attr-defined]
        calls._on_queue_feeder_error = functools.partial(
            _name_unpicklable, calls._on_queue_feeder_error
        )

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        try:  # what all but a few callables pass, first (the rest: _refuse_unimportable)
            odd = (
                type(fn) in _METHODS
                or "<" in getattr(fn, "__qualname__", "")
                or "__wrapped__" in getattr(fn, "__dict__", ())
            )
        except TypeError:  # a __qualname__ or __dict__ of another type
            odd = True
        if odd:
            _refuse_unimportable(fn)
        number = next(self._numbers)
        args = (number, self._limit, fn, *args)
        if _KNOWN_PROCESS_POOL:
            future = _ProcessFuture(self._patched)
            self._queue(future, args, kwargs)
        else:  # its outcome may come back before the class changes: watched for at once
            plain: Any = super().submit(_in_fresh_context, *args, **kwargs)
            plain.__class__ = _ProcessFuture
            future = plain
        future._ask = functools.partial(_ask_to_stop, self, number)
        if self._limit is not None:
            started = functools.partial(_started, self, number)
            _watchdog().add(_Limit(future, started, fn, self._limit))
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """As CPython's, but cancel_futures cancels only the calls not started: CPython's
        calls cancel() on each call it still holds, and ours asks a running one to stop. (Its
        manager may hand a few more calls to the workers meanwhile: those run.)"""
        pool: Any = self  # (CPython's private state: these names, checked on 3.11 to 3.14)
        if cancel_futures and type(getattr(pool, "_pending_work_items", None)) is dict:
            with pool._shutdown_lock:
                pool._shutdown_thread = True  # no submit from now on (nor from a callback)
                queued = [item.future for item in list(pool._pending_work_items.values())]
            for future in queued:  # (their callbacks may submit: not under the lock)
                Future.cancel(future)  # Future's own: False for a running task
            cancel_futures = False
        super().shutdown(wait, cancel_futures=cancel_futures)

    def _queue(self, future: Future[Any], args: tuple[Any, ...], kwargs: Any) -> None:
        """Queue a call to _in_fresh_context for the pool's manager thread, as CPython's
        submit does, with a future of ours (see _KNOWN_PROCESS_POOL)."""
        pool: Any = self  # (CPython's private state: typeshed does not declare it)
        with pool._shutdown_lock:
            if pool._broken:
                raise _process.BrokenProcessPool(pool._broken)
            if pool._shutdown_thread or _process._global_shutdown:
                why = "interpreter shutdown" if _process._global_shutdown else "shutdown"
                raise RuntimeError(f"cannot schedule new futures after {why}")
            work_id = pool._queue_count
            pool._queue_count += 1
            item = _process._WorkItem(future, _in_fresh_context, args, kwargs)
            pool._pending_work_items[work_id] = item
            pool._work_ids.put(work_id)
            pool._executor_manager_thread_wakeup.wakeup()
            if pool._safe_to_dynamically_spawn_children:
                pool._adjust_process_count()
            pool._start_executor_manager_thread()


# CPython's ProcessPoolExecutor.submit makes a Future with a Python-level Condition, which
# submit then gives our class, and puts each work id in a queue.Queue (Python-level too):
# together a third of a process submit. Where its pool is the one we know (its submit, and
# the manager thread's two methods that take work ids, use the same names, 3.11 to 3.14),
# _queue does submit's work with our future, and the ids go in a SimpleQueue (the manager
# takes them only with get(block=False) and get_nowait()); on any other, CPython's own
# submit runs (then test_the_process_pool_queues_futures_of_its_own fails).
_process: Any = concurrent.futures.process
_KNOWN_PROCESS_POOL = [
    set(method.__code__.co_names)
    for method in (concurrent.futures.ProcessPoolExecutor.submit,
                   _process._ExecutorManagerThread.add_call_item_to_queue,
                   _process._ExecutorManagerThread.flag_executor_shutting_down)
] == [
    {"BrokenProcessPool", "Future", "RuntimeError", "_WorkItem", "_adjust_process_count",
     "_base", "_broken", "_executor_manager_thread_wakeup", "_global_shutdown",
     "_pending_work_items", "_queue_count", "_safe_to_dynamically_spawn_children",
     "_shutdown_lock", "_shutdown_thread", "_start_executor_manager_thread", "_work_ids",
     "put", "wakeup"},
    {"Empty", "_CallItem", "args", "call_queue", "fn", "full", "future", "get", "kwargs",
     "pending_work_items", "put", "queue", "set_running_or_notify_cancel", "work_ids_queue"},
    {"Empty", "_cancel_pending_futures", "_shutdown_thread", "cancel", "executor_reference",
     "future", "get_nowait", "items", "pending_work_items", "queue", "work_ids_queue"},
]  # fmt: skip
# (watched for an unread exception from the start: the pool may fail it before submit returns)
_ProcessFuture: type[_ContextFuture] = _unread_class(_ContextFuture)


def _refuse_unimportable(fn: Callable[..., Any]) -> None:
    """Raise TypeError if ``fn`` cannot reach a worker process, naming why."""
    name = getattr(fn, "__qualname__", "")
    if isinstance(name, str) and ("<lambda>" in name or "<locals>" in name):
        raise TypeError(_unpicklable(fn, "a lambda or nested function has no importable name"))
    target: Any = fn  # (no hasattr, nor getattr of a name most callables lack, such as
    # __self__: each miss formats an AttributeError's message)
    if isinstance(attrs := getattr(fn, "__dict__", None), dict) and "__wrapped__" in attrs:
        target = inspect.unwrap(fn)
    methods: tuple[Any, ...] = (target, fn)
    for method in methods:
        if type(method) in _METHODS and isinstance(method.__self__, Flask):
            raise TypeError(_unpicklable(fn, "it is a bound method of the Flask app"))


_METHODS = (types.MethodType, types.BuiltinMethodType, types.MethodWrapperType)  # bound


def _init_worker(stops: Any, starts: Any, ends: Any) -> None:
    """Each worker's initializer: keep the shared arrays, and exit soon after the process
    owning the pool dies (a gunicorn worker killed on --timeout), instead of waiting on its
    queue forever."""
    global _worker_shared
    _worker_shared = _Shared(stops, starts, ends)
    owner = multiprocessing.parent_process()
    if owner is not None:
        threading.Thread(target=_exit_when_gone, args=(owner,), daemon=True).start()


def _exit_when_gone(owner: multiprocessing.process.BaseProcess) -> None:
    owner.join()  # returns once the owner's end of the sentinel pipe is closed
    os._exit(1)


def _in_fresh_context(
    number: int, limit: float | None, fn: Task, /, *args: Any, **kwargs: Any
) -> Any:
    """Run a process task in empty context variables (a worker started by fork holds a copy
    of whatever request was active in the thread that forked it: not the task's), where
    stop_requested() answers for it, and make sure what it returns or raises can reach the
    web process (else it would fail in the pool's thread, and break the pool)."""
    from multiprocessing.reduction import ForkingPickler

    task = _WorkerTask(number, limit, fn)
    try:
        result = contextvars.Context().run(_call_in_worker, task, fn, args, kwargs)
    except BaseException as exc:
        try:
            pickle.loads(ForkingPickler.dumps(exc))
        except Exception as why:
            message = f"{_task_name(fn)} raised {type(exc).__qualname__}: {exc}"
            raise RuntimeError(f"{message} (not re-creatable in the web process: {why})") from exc
        raise
    if type(result) not in _PLAIN:  # checked here, where the error can name the task
        try:
            ForkingPickler.dumps(result)
        except Exception as exc:
            raise TypeError(
                f"the return value of {_task_name(fn)} could not be sent back to the web "
                f"process: {exc}; return picklable values"
            ) from None
    return result


_PLAIN = {type(None), bool, int, float, str, bytes}  # results that always pickle


def _call_in_worker(task: _WorkerTask, fn: Task, args: Any, kwargs: Any) -> Any:
    _current.set(task)
    if (error := task.finish()) is not None:  # cancelled while it waited in the call queue
        raise error
    task.ran = True
    return _call(task, fn, args, kwargs)


def _name_unpicklable(
    report: Callable[[BaseException, Any], None], exc: BaseException, item: Any
) -> None:
    """The call queue's feeder error hook: fail the future with an error naming the culprit."""
    from multiprocessing.reduction import ForkingPickler

    for culprit in [*getattr(item, "args", ()), *getattr(item, "kwargs", {}).values()]:
        try:  # the task first, then its arguments
            ForkingPickler.dumps(culprit)
        except Exception:
            exc = TypeError(_unpicklable(culprit, str(exc)))
            break
    report(exc, item)


def _unpicklable(obj: object, why: str) -> str:
    return (
        f"cannot send {obj!r} to a worker process ({why}): closures, lambdas and bound methods "
        "of app objects cannot cross processes; submit a module-level function with picklable "
        "arguments, or use EXECUTOR_TYPE='thread'"
    )


BACKENDS: dict[str, Backend] = {
    "thread": ThreadBackend(),
    "process": ProcessBackend(),
    "gevent": GeventBackend(),
}


def register_backend(name: str, backend: Backend) -> None:
    """Make ``EXECUTOR_TYPE=name`` choose ``backend``."""
    if not isinstance(backend, Backend):
        raise TypeError(f"register_backend() needs a Backend instance, got {backend!r}")
    BACKENDS[name.lower()] = backend


def _backend(config: Config) -> Backend:
    """The backend named by EXECUTOR_TYPE (or the Backend object given there)."""
    value = config.get("EXECUTOR_TYPE")
    if isinstance(value, Backend):
        return value
    backend = BACKENDS.get(str(value).strip().lower())
    if backend is None:
        names = ", ".join(repr(name) for name in sorted(BACKENDS))
        raise ValueError(
            f"{config.prefix}EXECUTOR_TYPE={value!r} is not a known executor type; "
            f"choose one of {names}, pass a Backend object, or call register_backend()"
        )
    return backend


# -- 4. Futures ----------------------------------------------------------------------


class FutureCollection:
    """The futures dict: keys to futures, bounded and thread-safe.

    Any Future method or attribute is forwarded by key: ``futures.done(key)``,
    ``futures.result(key, timeout=1)``, ``futures._state(key)``; None if the key is absent.
    Read like a mapping by key (``futures[key]``, ``get``, ``keys``, ``items``, iteration);
    ``future in futures`` tests a future, as in 1.0. Beyond ``max_length`` the oldest
    finished future is dropped; if none has finished, the oldest, with a warning.
    """

    def __init__(self, max_length: int | None = 50, logger: logging.Logger | None = None) -> None:
        self.max_length = max_length
        self._futures: collections.OrderedDict[Any, Future[Any]] = collections.OrderedDict()
        # Guards _futures. Held while a stored task is submitted (so a key is never taken
        # twice), so it comes before the pool's own locks; re-entrant for tasks run inline.
        self._lock = threading.RLock()
        self._logger = logger or logging.getLogger(__name__)
        self._drops, self._said_at = 0, -1.0  # running futures dropped since the last warning

    def add(self, future_key: Any, future: Future[Any]) -> None:
        """Store ``future``; ValueError if ``future_key`` is taken."""
        self._store(future_key, future, lambda _: future)

    def _store(self, future_key: Any, fn: Any, start: Callable[[Task], Future[T]]) -> Future[T]:
        """Claim ``future_key``, then ``start(fn)`` and keep the future it returns."""
        with self._lock:
            if future_key in self._futures:
                raise ValueError(_taken(future_key))
            future = start(fn)
            while self.max_length is not None and len(self._futures) >= self.max_length:
                self._evict()  # before adding: len never exceeds the bound
            self._futures[future_key] = future
            return future

    def _evict(self) -> None:
        key = next((key for key, future in self._futures.items() if future.done()), None)
        if key is None:  # all still running: drop the oldest, as 1.0 did, but say so
            key = next(iter(self._futures))
            self._evicted(key)
        del self._futures[key]

    def _evicted(self, future_key: Any) -> None:
        """Warn that a running future was dropped: the first time, then at most one line a
        minute, with the count (a flood of submits would otherwise flood the log)."""
        self._drops, now, said = self._drops + 1, time.monotonic(), self._said_at >= 0
        if said and now - self._said_at < 60:
            return
        self._logger.warning(
            "futures dict full (%s futures, EXECUTOR_FUTURES_MAX_LENGTH): dropped %s stored "
            "future %r while its task was still running%s (the tasks go on); raise "
            "EXECUTOR_FUTURES_MAX_LENGTH or pop futures once read",
            self.max_length,
            f"{self._drops:,} running futures, the last" if said else "the",
            future_key,
            f" in the last {now - self._said_at:.0f} s" if said else "",
        )
        self._drops, self._said_at = 0, now

    def pop(self, future_key: Any) -> Future[Any] | None:
        """Remove and return the future stored at ``future_key``, or None."""
        with self._lock:
            return self._futures.pop(future_key, None)

    def __len__(self) -> int:
        return len(self._futures)

    def __contains__(self, future: object) -> bool:
        with self._lock:
            return future in self._futures.values()

    def __getitem__(self, future_key: Any) -> Future[Any]:
        return self._futures[future_key]

    def get(self, future_key: Any, default: Any = None) -> Any:
        """The future stored at ``future_key``, else ``default``."""
        return self._futures.get(future_key, default)

    def keys(self) -> list[Any]:
        """The stored keys, oldest first (a snapshot)."""
        with self._lock:
            return list(self._futures)

    def values(self) -> list[Future[Any]]:
        return [future for _, future in self.items()]

    def items(self) -> list[tuple[Any, Future[Any]]]:
        with self._lock:
            return list(self._futures.items())

    def __iter__(self) -> Iterator[Any]:
        return iter(self.keys())

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name.startswith("__"):
            raise AttributeError(name)

        def by_key(future_key: Any, *args: Any, **kwargs: Any) -> Any:
            future = self.get(future_key)
            if future is None:
                return None
            value = getattr(future, name)
            return value(*args, **kwargs) if callable(value) else value

        return by_key


def _taken(future_key: Any) -> str:
    return f"future_key {future_key!r} already exists: pop it first or use another key"


# -- 5. The extension ----------------------------------------------------------------
#
# Per-app state lives in app.extensions, so one Executor serves several apps. Locks of the
# core, in the order they may be taken: a futures dict's _lock, then an app's _pool_lock
# (replacing a broken pool), the pool's own, or _fork_lock (the watchdog started in a child);
# under _fork_lock a pool is built, or shut down, and nothing else is locked.


class _AppState:
    """One app's side of an Executor: its settings, pool and futures dict, in one process."""

    def __init__(self, executor: Executor, app: Flask) -> None:
        config = Config(app, executor.name)
        self.app, self.executor, self.config = app, executor, config
        self.backend = _backend(config)
        self.contexts = self.backend.contexts
        self.max_workers = config.number("EXECUTOR_MAX_WORKERS")
        self.max_length = config.number("EXECUTOR_FUTURES_MAX_LENGTH")
        self.propagate = config.flag("EXECUTOR_PROPAGATE_EXCEPTIONS")
        self.push = config.flag("EXECUTOR_PUSH_APP_CONTEXT")
        self.limit = config.seconds("EXECUTOR_TIMEOUT")
        used = {"EXECUTOR_MAX_WORKERS": self.max_workers, "EXECUTOR_TIMEOUT": self.limit,
                "EXECUTOR_FUTURES_MAX_LENGTH": self.max_length, "EXECUTOR_PUSH_APP_CONTEXT":
                self.push, "EXECUTOR_PROPAGATE_EXCEPTIONS": self.propagate}  # fmt: skip
        self.shared = _shared_futures(config, used)  # the hook to section 8; None: in memory
        self._shutdown = False
        self.own_pool()  # built now, so a bad config fails at init_app, before app changes
        for key in _KEYS:  # app.config shows what it runs with
            app.config.setdefault(config.prefix + key, used.get(key, config.get(key)))

    def own_pool(self) -> None:
        """Give this process its own pool, futures dict and lock (at init, and after a fork).
        The parent's are left untouched: their threads and pipes belong to the parent."""
        self.pool = self.backend.create_pool(self.max_workers, self.config)
        if self.shared is None:
            self.futures = FutureCollection(self.max_length, self.app.logger)
        else:
            self.futures = self.shared(logger=self.app.logger)
        self._pool_lock = threading.Lock()  # guards replacing a broken pool, and _shutdown
        self.pid = _pid
        if self._shutdown:  # shut down before the fork: stays shut down in the child
            self.pool.shutdown(wait=False)

    def start(self, fn: Task, args: tuple[Any, ...], kwargs: Any) -> Future[Any]:
        """Submit one task to the pool, replacing the pool once if it is broken."""
        if not callable(fn):
            raise TypeError(f"submit() needs a callable, got {fn!r} ({type(fn).__name__})")
        app_ctx = _cv_app.get(None)
        g_attrs = app_ctx.g.__dict__.copy() if self.push and app_ctx is not None else None
        task = _Task(self.app, g_attrs, self.push, fn, self.limit)
        if self.contexts:
            # run in its captured variables (entered once: a task runs once)
            fn, args, kwargs = (
                task.context.run,
                (_in_app_context, task, True, fn, args, kwargs),
                _NOTHING,
            )
        pool = self.pool
        try:
            future = pool.submit(fn, *args, **kwargs)
        except concurrent.futures.BrokenExecutor:
            future = self._replace_broken(pool).submit(fn, *args, **kwargs)
        if type(future) is Future:  # a pool of yours: it may fail a future itself
            future.__class__ = _ContextFuture
            _watch_unread(future)
        future._captured = task  # type: ignore[attr-defined]  # for its callbacks and stops
        if self.limit is not None and self.contexts and isinstance(future, _ContextFuture):
            # (the process pool watches its own; another pool's futures cannot be stopped)
            started = functools.partial(getattr, task, "started")
            _watchdog().add(_Limit(future, started, task.fn, self.limit))
        return future

    def attach_callbacks(self, future: Future[T], fn: Task) -> Future[T]:
        callbacks: list[Callback] = list(self.executor._default_callbacks)
        if self.propagate:
            callbacks.insert(0, functools.partial(_log_failure, self.app, fn))
        for callback in callbacks:
            if not isinstance(future, _ContextFuture):  # another pool's future: wrap it here
                callback = functools.partial(_run_callback, future._captured, callback)  # type: ignore[attr-defined]
            future.add_done_callback(callback)
        return future

    def _replace_broken(self, broken: concurrent.futures.Executor) -> concurrent.futures.Executor:
        with self._pool_lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            if self.pool is broken:
                self.app.logger.warning(
                    "executor pool is broken (a worker died); starting a new one"
                )
                broken.shutdown(wait=False)
                self.pool = self.backend.create_pool(self.max_workers, self.config)
            return self.pool

    def shutdown(self, wait: bool, cancel_futures: bool) -> None:
        if self.pid != _pid:  # the pool and its lock are the parent's: leave them alone
            self._shutdown = True
            return
        with self._pool_lock:
            self._shutdown = True
        if cancel_futures and "cancel_futures" in inspect.signature(self.pool.shutdown).parameters:
            self.pool.shutdown(wait=wait, cancel_futures=True)
        else:  # pools that predate cancel_futures (Dask's, loky's) run what they queued
            self.pool.shutdown(wait=wait)


def _warn_unknown_keys(app: Flask) -> None:
    """Warn once per app about a ``*EXECUTOR_*`` config key no executor reads (a typo:
    EXECUTOR_TIMOUT), naming the closest key that is read."""
    warned = app.extensions.setdefault(f"{__name__}:unknown keys", set())
    for key in map(str, app.config):
        prefix, found, rest = key.rpartition("EXECUTOR_")
        known = any(key.endswith(k) and re.fullmatch(r"(\w+_)?", key[: -len(k)]) for k in _KEYS)
        if not found or known or key in warned:
            continue
        warned.add(key)
        close = difflib.get_close_matches(f"EXECUTOR_{rest}", _KEYS, 1, 0.6)
        hint = f"did you mean {prefix}{close[0]}?" if close else f"the keys are {', '.join(_KEYS)}"
        app.logger.warning("config key %s is not one flask_executor reads: %s", key, hint)


def _in_this_process(state: _AppState) -> _AppState:
    """The state, with its own pool in this process: the first use after a fork."""
    with _fork_lock:
        if state.pid != _pid:
            state.own_pool()
    return state


def _log_failure(app: Flask, fn: Task, future: Future[Any]) -> None:
    if not future.cancelled() and (exc := future.exception()) is not None:
        app.logger.error("background task %r raised %r", fn, exc, exc_info=exc)


class Executor(concurrent.futures.Executor):
    """The Flask extension: ``Executor(app)``, or ``Executor()`` then ``init_app(app)``.

    ``name`` prefixes the config keys: ``Executor(name='custom')`` reads
    ``CUSTOM_EXECUTOR_TYPE``. It is registered as ``app.extensions[name + 'executor']``.
    """

    def __init__(self, app: Flask | None = None, name: str = "") -> None:
        if not isinstance(name, str) or not re.fullmatch(r"\w*", name):
            raise ValueError(
                f"Executor name {name!r} may only contain letters, digits and underscores"
            )
        self.name = name
        for key in _KEYS:  # 1.0 exposed the prefixed key names: executor.EXECUTOR_TYPE
            setattr(self, key, _prefix(name) + key)
        self._key = name + "executor"  # 1.0's key; per-app state lives under _state_key
        self._state_key = f"{__name__}:{self._key}"
        self._apps: list[weakref.ref[Flask]] = []  # the apps it serves; dead ones drop out
        self._default_callbacks: list[Callback] = []
        self.app = app  # 1.0's attribute: the app given last (kept alive, as 1.0 kept it)
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Read this executor's config from ``app`` and give ``app`` its own pool.

        Again on the same app (or another executor of the same name), the new one replaces
        the old, as in 1.0, with a warning; the old pool finishes its queued tasks and stops.
        """
        app = getattr(app, "_get_current_object", lambda: app)()  # current_app works too
        state = _AppState(self, app)  # may raise: the app is left as it was
        _warn_unknown_keys(app)
        old: _AppState | None = app.extensions.get(self._state_key)
        if old is not None:
            app.logger.warning(
                "app.extensions[%r] was already set on app %r: replacing it (its pool stops "
                "once its queued tasks finish); create each Executor once, at start-up",
                self._key,
                app.name,
            )
            old.shutdown(wait=False, cancel_futures=False)
        app.extensions[self._state_key] = state
        app.extensions[self._key] = self
        self.app = app
        if not any(ref() is app for ref in self._apps):
            self._apps.append(weakref.ref(app, self._apps.remove))

    def _state(self) -> _AppState:
        """This executor's state on ``current_app``, else on the only app it serves."""
        app_ctx = _cv_app.get(None)
        state: _AppState | None
        if app_ctx is not None:
            state = app_ctx.app.extensions.get(self._state_key)
            if state is not None:
                return state if state.pid == _pid else _in_this_process(state)
            where = f"app {app_ctx.app.name!r} (the current app)"
        elif len(self._apps) == 1 and (app := self._apps[0]()) is not None:
            state = app.extensions[self._state_key]
            return state if state.pid == _pid else _in_this_process(state)
        else:
            apps = len(self._apps)
            where = "any app" if not apps else f"one of {apps} apps without an app context"
        raise RuntimeError(
            f"Executor {self.name!r} is not initialised on {where}: call "
            "executor.init_app(app) first, or push an app context (with app.app_context():)"
        )

    def submit(self, fn: Callable[..., T] | None = None, /, *args: Any, **kwargs: Any) -> Future[T]:
        """Run ``fn(*args, **kwargs)`` in the background; return its Future at once.
        1.0's keyword form ``submit(fn=task, ...)`` works too."""
        if fn is None:
            fn = kwargs.pop("fn", None)
        app_ctx = _cv_app.get(None)  # _state()'s common case, inline: the submit path
        state = None if app_ctx is None else app_ctx.app.extensions.get(self._state_key)
        if state is None or state.pid != _pid:
            state = self._state()
        future = state.start(fn, args, kwargs)
        if state.propagate or self._default_callbacks:
            state.attach_callbacks(future, fn)
        return future

    def submit_stored(
        self, future_key: Any = _MISSING, fn: Callable[..., T] | None = None, /, *args: Any,
        **kwargs: Any
    ) -> Future[T]:  # fmt: skip
        """Like submit, and keep the Future in ``executor.futures`` under ``future_key``.
        1.0's keyword form ``submit_stored(future_key=key, fn=task, ...)`` works too."""
        if future_key is _MISSING:
            if "future_key" not in kwargs:
                raise TypeError("submit_stored() needs a future_key: submit_stored(key, fn, ...)")
            future_key = kwargs.pop("future_key")
        if fn is None:
            fn = kwargs.pop("fn", None)
        state = self._state()
        future = state.futures._store(future_key, fn, lambda task: state.start(task, args, kwargs))
        return state.attach_callbacks(future, fn)

    def map(
        self, fn: Callable[..., T], *iterables: Iterable[Any], timeout: float | None = None,
        chunksize: int = 1
    ) -> Iterator[T]:  # fmt: skip
        """Like :meth:`concurrent.futures.Executor.map`; each call gets its own contexts.
        Left early (closed, or past its timeout), it cancels the calls not started, as that
        map does; those running go on (our cancel() would ask them to stop)."""
        if chunksize < 1:
            raise ValueError(f"chunksize must be >= 1, got {chunksize!r}")
        deadline = None if timeout is None else time.monotonic() + timeout
        calls = zip(*iterables, strict=False)  # (as map(): the shortest ends it)
        if chunksize > 1 and isinstance(self._state().pool, _ProcessPool):  # (it checks the
            _refuse_unimportable(fn)  # callable it runs: _run_chunk, fn only its argument)
        if chunksize == 1:
            return _in_order([self.submit(fn, *args) for args in calls], deadline)
        chunks = [self.submit(_run_chunk, fn, chunk) for chunk in _chunks(calls, chunksize)]
        results: Iterator[T] = _in_order(chunks, deadline, True)
        return results

    def job(self, fn: Callable[..., T]) -> ExecutorJob:
        """Decorator: ``fn.submit(...)``, ``fn.submit_stored(key, ...)``, ``fn.map(...)``."""
        return ExecutorJob(self, fn)

    def add_default_done_callback(self, fn: Callback) -> None:
        """Attach ``fn`` to every Future this executor creates from now on."""
        self._default_callbacks.append(fn)

    @property
    def futures(self) -> FutureCollection:
        """The futures dict of ``current_app`` (else of the only app). Read before
        init_app (1.0 code keeps it at import time), it finds that dict when used."""
        if not self._apps:
            return _FuturesOf(self)  # type: ignore[return-value]
        return self._state().futures

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Shut down the pool of every app this executor serves; later submits raise."""
        for ref in list(self._apps):
            app = ref()
            state = None if app is None else app.extensions.get(self._state_key)
            if state is not None and state.executor is self:  # not a replacement's pool
                state.shutdown(wait, cancel_futures)

    @property
    def _self(self) -> concurrent.futures.Executor:
        """1.0's name for the current app's pool."""
        return self._state().pool


class _FuturesOf:
    """``executor.futures`` read before init_app: each use is the current app's dict's."""

    __slots__ = ("_executor",)

    def __init__(self, executor: Executor) -> None:
        self._executor = executor

    def __getattr__(self, name: str) -> Any:
        return getattr(self._executor._state().futures, name)

    def __len__(self) -> int:
        return len(self._executor._state().futures)

    def __contains__(self, future: object) -> bool:
        return future in self._executor._state().futures

    def __getitem__(self, future_key: Any) -> Future[Any]:
        return self._executor._state().futures[future_key]

    def __iter__(self) -> Iterator[Any]:
        return iter(self._executor._state().futures)


def _forwarded(name: str) -> property:
    return property(lambda executor: getattr(executor._self, name), doc=f"The pool's {name}.")


# 1.0's Executor forwarded the attributes it lacked to its pool; real code reads these. As
# properties, not __getattr__, which would slow every attribute read on the submit path.
for _attribute in ["_max_workers", "_shutdown", "_broken", "_threads", "_work_queue",
                   "_processes", "_mp_context", "_thread_name_prefix"]:  # fmt: skip
    setattr(Executor, _attribute, _forwarded(_attribute))
del _attribute


def _chunks(items: Iterator[tuple[Any, ...]], size: int) -> Iterator[list[tuple[Any, ...]]]:
    while chunk := list(itertools.islice(items, size)):
        yield chunk


def _run_chunk(fn: Task, chunk: list[tuple[Any, ...]]) -> list[Any]:
    return [fn(*args) for args in chunk]


def _in_order(
    futures: list[Future[Any]], deadline: float | None, chunks: bool = False
) -> Iterator[Any]:
    """map()'s results, in order (each chunk's, one by one); left early, those not started
    are cancelled (Future.cancel: a running task is not stopped)."""
    futures.reverse()  # popped as read: a result is not kept once given
    try:
        while futures:
            future = futures.pop()
            try:
                result = future.result(None if deadline is None else deadline - time.monotonic())
            except BaseException:
                Future.cancel(future)
                raise
            if chunks:
                yield from result
            else:
                yield result
    finally:
        for future in futures:
            Future.cancel(future)


class ExecutorJob:
    """What ``@executor.job`` returns: call it to run now, or submit/map it in the background."""

    def __init__(self, executor: Executor, fn: Task) -> None:
        self.executor = executor
        self.fn = fn
        functools.update_wrapper(self, fn)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<ExecutorJob {_task_name(self.fn)}>"

    def __reduce__(self) -> str | tuple[Any, ...]:
        if "__qualname__" in vars(self):  # a function: pickled by name, a worker imports it
            return str(vars(self)["__qualname__"])
        return (functools.partial, (self.fn,))  # a partial or a callable object: by value

    def submit(self, *args: Any, **kwargs: Any) -> Future[Any]:
        return self.executor.submit(self, *args, **kwargs)

    def submit_stored(self, future_key: Any, *args: Any, **kwargs: Any) -> Future[Any]:
        return self.executor.submit_stored(future_key, self, *args, **kwargs)  # 1.0's signature

    def map(self, *iterables: Iterable[Any], **kwargs: Any) -> Iterator[Any]:
        return self.executor.map(self, *iterables, **kwargs)


# -- 6. 1.0 import paths: flask_executor.executor and flask_executor.futures ----------


def propagate_exceptions_callback(future: Future[Any]) -> None:
    """1.0's done-callback that re-raises a task's exception (ours logs it instead)."""
    if (exc := future.exception()) is not None:
        raise exc


_one_zero: dict[str, dict[str, object]] = {
    "executor": {"Executor": Executor, "ExecutorJob": ExecutorJob,
                 "propagate_exceptions_callback": propagate_exceptions_callback},
    "futures": {"FutureCollection": FutureCollection, "Future": Future},
}  # fmt: skip
for _name, _names in _one_zero.items():
    _module = types.ModuleType(f"{__name__}.{_name}")
    vars(_module).update(_names)
    sys.modules.setdefault(_module.__name__, _module)
    globals()[_name] = sys.modules[_module.__name__]
del _name, _names, _module, _one_zero


# -- 7. Time limits and stopping a task ----------------------------------------------


# Time limits and stopping a task (EXECUTOR_TIMEOUT, future.cancel()).
#
# Nothing is ever raised into a running thread or process at an arbitrary instruction: an
# exception injected there (PyThreadState_SetAsyncExc, a signal handler that raises) can land
# between a lock's acquire() and the try: that releases it, in the task's code or the
# standard library's (logging's handler lock, queue.Queue), and hang the whole process. So:
# - the future is made done at once, by whoever stops it: cancel() in the caller's thread,
#   or at the limit the watchdog thread (one per process; it only resolves futures);
# - the task is asked to stop: stop_requested() turns True in it (thread: its _Task; process:
#   a _WorkerTask reading the pool's shared memory); a task that never asks runs to its end,
#   and its late outcome is dropped (logged at INFO);
# - a gevent task is also killed for real: the stop is thrown in at its next switch (as
#   gevent's kill), only while it is inside its own function, never in our code around it.
# A stop and the task's end race for the task: each claims it with one append to its
# _Task's `claims`, and the first claim wins (no lock: see _Task).
# Locks, in the order they are taken: the watchdog's `changed`, then a Future's _condition
# (pruning reads done()): never the other way round.
# After a fork: the watchdog is started again on first use.


class TaskTimeout(concurrent.futures.TimeoutError):
    """A task ran past its time limit (EXECUTOR_TIMEOUT): its future was stopped."""

    def __init__(self, task: str, limit: float) -> None:
        super().__init__(
            f"background task {task} was stopped: it ran past its time limit of {limit} s "
            "(EXECUTOR_TIMEOUT)"
        )
        self.task, self.limit = task, limit

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.task, self.limit))


# True while a greenlet holds a lock that other greenlets of its thread would not wait for
# (a native one): its waits for a shared store then block the thread (see _sleep).
_holding: contextvars.ContextVar[bool] = contextvars.ContextVar(f"{__name__}.held", default=False)


def stop_requested() -> bool:
    """True inside a task once its time limit has passed or it was cancelled.

    Long tasks check it in their loops and return early: nothing else stops a thread or
    process task. False outside a task, and in a task nobody asked to stop.
    """
    task = _current.get(None)
    return task is not None and task.stop_requested()


class _Stop(BaseException):
    """Thrown into a gevent task to kill it; it leaves the task as its public stop error."""


class _WorkerTask:
    """A process task, as its worker sees it: asked to stop through the pool's shared memory."""

    __slots__ = ("deadline", "inside", "limit", "name", "number", "ran", "stopped")

    def __init__(self, number: int, limit: float | None, fn: Task) -> None:
        self.number, self.limit, self.name = number, limit, fn
        self.deadline = None if limit is None else time.monotonic() + limit
        self.stopped: Callable[[], BaseException] | None = None
        self.inside = self.ran = False
        starts = _worker_shared.starts
        if starts is not None:  # the start first, then the number: a reader checks it
            slot = 2 * (number % _STARTS)
            starts[slot + 1], starts[slot] = time.monotonic(), number

    def stop_requested(self) -> bool:
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return True
        stops = _worker_shared.stops
        return stops is not None and self.number in stops[:]

    def finish(self) -> BaseException | None:
        """None, or the error its future got in the web process if it was stopped."""
        ends = _worker_shared.ends
        if self.ran and ends is not None:  # said before it looks for a stop: a stop the web
            ends[self.number % _STARTS] = self.number  # process makes after it is refused
        if not self.stop_requested():
            return None
        if self.limit is not None and self.deadline and time.monotonic() >= self.deadline:
            self.stopped = functools.partial(TaskTimeout, _task_name(self.name), self.limit)
        else:
            self.stopped = functools.partial(_cancelled_error, self.name)
        return self.stopped()


def _cancelled_error(fn: object) -> BaseException:
    return concurrent.futures.CancelledError(f"background task {_task_name(fn)} was cancelled")


class _Limit:
    """One task's time limit, as the watchdog keeps it: counted from the task's start."""

    __slots__ = ("error", "future", "limit", "started")

    def __init__(self, future: Future[Any], started: Callable[[], float | None], fn: Task,
                 limit: float) -> None:  # fmt: skip
        self.future = weakref.ref(future)  # not kept alive by the watchdog: a dropped future
        self.started, self.limit = started, limit  # is logged (and freed) at once
        self.error = functools.partial(TaskTimeout, _task_name(fn), limit)

    def done(self) -> bool:
        future = self.future()
        return future is None or future.done()

    def check(self) -> float | None:
        """Stop the task if its time is up; else when to look again (None: never)."""
        future = self.future()
        if future is None or future.done():
            return None
        started, now = self.started(), time.monotonic()
        if started is None:  # not started yet: its limit cannot end before now + limit
            return now + self.limit
        if now < started + self.limit:
            return started + self.limit
        # In a thread of its own: the stop runs done-callbacks, and may write a shared store,
        # neither of which may hold up the other tasks' limits.
        threading.Thread(target=_stop, args=(future, self.error, True, True), daemon=True).start()
        return None


class _Due(NamedTuple):
    """A time limit in the watchdog's heap: when to look at it; ties by order added."""

    when: float
    order: int
    limit: _Limit


class _Watchdog(threading.Thread):
    """One thread per process that makes futures done at their time limits."""

    def __init__(self) -> None:
        super().__init__(name=f"{__name__} time limits", daemon=True)
        self.pid = _pid
        self.due: list[_Due] = []  # a heap: the earliest first
        self.count = itertools.count()
        self.changed = threading.Condition()  # guards due

    def add(self, limit: _Limit, when: float | None = None) -> None:
        when = time.monotonic() + limit.limit if when is None else when
        with self.changed:
            heapq.heappush(self.due, _Due(when, next(self.count), limit))
            if len(self.due) > 1024 and len(self.due) & 1023 == 0:  # done long before
                self.due = [due for due in self.due if not due.limit.done()]
                heapq.heapify(self.due)
            if self.due and self.due[0].limit is limit:
                self.changed.notify()

    def run(self) -> None:
        while True:
            with self.changed:
                wait = self.due[0].when - time.monotonic() if self.due else None
                if wait is None or wait > 0:  # a day at most: within threading.TIMEOUT_MAX
                    self.changed.wait(None if wait is None else min(wait, 86400))
                    continue
                limit = heapq.heappop(self.due).limit
            try:
                again = limit.check()
            except Exception:  # a failing check must not end the watchdog
                logging.getLogger(__name__).exception("time limit watchdog")
                again = None
            if again is not None:
                self.add(limit, again)


_the_watchdog: _Watchdog | None = None


def _watchdog() -> _Watchdog:
    """This process's watchdog, started on first use (again in a forked child)."""
    global _the_watchdog
    watchdog = _the_watchdog
    if watchdog is not None and watchdog.pid == _pid:
        return watchdog
    with _fork_lock:
        if _the_watchdog is None or _the_watchdog.pid != _pid:
            _the_watchdog = _Watchdog()
            _the_watchdog.start()
        return _the_watchdog


_STARTS = 16384  # task start times kept by the process pool: far more than run at once


class _Shared(NamedTuple):
    """A process worker's view of its pool's shared arrays (see _ProcessPool)."""

    stops: Any
    starts: Any
    ends: Any


_worker_shared = _Shared(None, None, None)


def _stop(future: _ContextFuture, error: Callable[[], BaseException], kill: bool = True,
          at_limit: bool = False) -> bool:  # fmt: skip
    """Make a running future done with ``error()`` (a CancelledError: cancelled) unless
    its task's function has ended; ask the task to stop, then run the callbacks.

    A stored task's stop is stored first (the gate): if its row already holds another
    outcome (a process task that returned just then), that one stands, here too."""
    task = future._captured
    with future._condition:
        if future._state != "RUNNING":
            return future.cancelled()
        ask = future._ask if kill else None  # a process task's: asked once the stop stands
        if ask is not None and not ask(future, False, False):
            return False  # its function has returned: its outcome stands
        if task is not None and kill and not task.stop(error, future._gate is None):
            return future.cancelled()
        exc = error()
        if future._gate is not None and kill:
            gated = _gated(future._gate, task, exc, error)
            if gated is None:
                return False
            exc = gated
        if ask is not None:
            ask(future)
        future._stopped_at = time.monotonic()
        if isinstance(exc, concurrent.futures.CancelledError):
            future._state = "CANCELLED_AND_NOTIFIED"
            for waiter in future._waiters:
                waiter.add_cancelled(future)
        else:
            future._exception, future._state = exc, "FINISHED"
            _watch_unread(future)
            for waiter in future._waiters:
                waiter.add_exception(future)
        future._condition.notify_all()
    if kill:
        future._kill()
    (future._limit_callbacks if at_limit else future._invoke_callbacks)()  # type: ignore[attr-defined]
    return True


def _gated(gate: Callable[[BaseException], BaseException | None], task: _Task | None,
           exc: BaseException,
           error: Callable[[], BaseException]) -> BaseException | None:  # fmt: skip
    """A stored task's stop, stored before its future shows it (and before its task is
    asked): the error to show, or None if the row holds another outcome (that one stands,
    and the task runs on, unasked)."""
    holding = _holding.set(True)  # the store's waits must not let the task greenlet into
    try:  # the future's lock, held by _stop (a gevent future's lock is the thread's)
        shown = gate(exc)
    finally:
        _holding.reset(holding)
    if task is not None and shown is None:
        task.unstop()
    elif task is not None:  # it stands: the task is asked now
        task.stopped = error
    return shown


def _late(future: _ContextFuture) -> None:
    """The pool's outcome of a task stopped earlier: dropped, and said once."""
    task = _task_name(future._captured.fn) if future._captured else "the task"
    late = time.monotonic() - (future._stopped_at or 0)
    logging.getLogger(__name__).info(
        "background task %s ended %.3f s after it was stopped: its outcome was dropped",
        task,
        late,
    )


def _started(pool: _ProcessPool, number: int) -> float | None:
    """When task ``number`` started in a worker, or None if it has not (yet). Its slot
    may hold a later task's start by now: the queue is first in, first out, so it
    started no later than that (its limit may then end a little late, never early)."""
    starts: Any = pool._starts
    slot = 2 * (number % _STARTS)
    there, when = starts[slot], starts[slot + 1]
    return when if there >= number and (there - number) % _STARTS == 0 else None


def _ask_to_stop(pool: _ProcessPool, number: int, future: Any, ended: bool = False,
                 ask: bool = True) -> bool:  # fmt: skip
    """Ask task ``number`` to stop (``ask``: else only tell whether it may be): False if
    its function has returned (its outcome is on its way: it stands). ``ended``: its
    outcome came back, free its slot.

    The worker marks the end before it looks for a stop; _stop reads the mark before it
    writes the stop. The one race left (the mark lands between the two) is a stop that
    wins: the outcome then arrives late, and is dropped and logged (_late); a stored
    task's worker finds the stop in its row, and raises it (_StoredTask._record)."""
    with pool._stops_lock:
        if ended or future._ended:
            future._ended = True
            for at, asked in enumerate(pool._stops):
                if asked == number:
                    pool._stops[at] = 0
            return False
        if pool._ends[number % _STARTS] == number:
            return False
        free = next((at for at, asked in enumerate(pool._stops) if asked == 0), None)
        if ask and free is not None:  # else: more stopped tasks than can be queued or run
            pool._stops[free] = number
        return True


# -- 8. Shared stores ----------------------------------------------------------------


# Stored futures shared by every process (EXECUTOR_FUTURES_STORE). A store keeps a row per
# stored future: its key, a token, its state, the process that owns the task ("owner") and,
# once done, its signed, pickled outcome. Any process reads rows; the owner runs the task and
# writes its row. Every write names the row by its token, random and never reissued, so a
# writer whose row is gone (popped, evicted, the store reset) can never touch another key's.
# Polls read the state only; the outcome is loaded by result() and exception(). A popped
# row loses its key (it becomes 'd:<token>') but stays readable by its token, for whoever
# still waits on it, until it has been finished for _POPPED_KEPT seconds.
# Locks: a _SharedFutures' _watch_lock guards its _local tasks and _watching (never held
# while the store is read); a SQLite store's _idle_lock guards its idle connections, and
# _connect_lock with a lockf on the "-lock" file lets one thread of one process open the
# file at a time. Order: a Future's _condition (a stop stores itself through _gate), then
# the store's own. After a fork the child opens its own connections (the parent's are kept,
# never used), holds its own Redis lease from its first claim, and builds its own
# _SharedFutures (own_pool), whose watcher thread starts on first use.
PENDING, RUNNING, FINISHED, CANCELLED = "pending", "running", "finished", "cancelled"
_POPPED_KEPT = 24 * 3600.0  # a day: long enough for any reader still waiting on a pop
_WATCH_EVERY = 0.5  # seconds between reads of the store for cancels of running tasks
_PATIENCE = 0.5  # seconds a task's own store write waits for a locked store; then the owner
# writes it from a thread of its own, and the submitter's future does not wait for the store


class Row(NamedTuple):
    """A stored future as a store reads it: never its outcome (see FuturesStore.outcome)."""

    token: str
    state: str
    owner: str
    task: str


class FuturesStore(abc.ABC):
    """Where a shared futures dict keeps its rows: subclass it to plug in your own store.

    Keys are strings, tokens unique strings; each method is atomic across processes. The
    object must pickle: process workers write through it. ``finish`` and ``cancel`` change
    only rows still pending or running: an outcome, once stored, is final. ``wait`` is how
    long a write may wait for a busy store before it raises.
    """

    @abc.abstractmethod
    def claim(self, key: str, token: str, owner: str, task: str, max_length: int | None,
              ttl: float | None) -> list[str] | None:  # fmt: skip
        """Add a pending row under ``key``; None if ``key`` is taken. First delete popped
        rows finished (unfinished: popped) over _POPPED_KEPT seconds ago, keyed rows
        finished over ``ttl``
        seconds ago; then, while ``max_length`` keyed rows or more remain, the one that
        finished first, else the oldest: return the keys of those dropped unfinished."""

    @abc.abstractmethod
    def start(self, token: str, wait: float) -> bool:
        """Pending to running; False if the row was cancelled (its task must not run)."""

    @abc.abstractmethod
    def finish(self, token: str, outcome: bytes | None, wait: float) -> bool:
        """Pending or running to finished with ``outcome``, or to cancelled if None; False
        if the row was not pending or running (or is gone)."""

    @abc.abstractmethod
    def forget(self, token: str) -> None:
        """Delete a row (its task could not be queued)."""

    @abc.abstractmethod
    def read(self, key: str = "", token: str = "") -> Row | None:
        """The row stored under ``key``, or (popped or not) the one with ``token``."""

    @abc.abstractmethod
    def outcome(self, token: str) -> bytes | None:
        """A finished row's outcome."""

    @abc.abstractmethod
    def cancel(self, token: str, wait: float = 30.0) -> bool:
        """Pending or running to cancelled; True if the row is cancelled now."""

    @abc.abstractmethod
    def pop(self, key: str) -> Row | None:
        """Take the row's key away (it becomes ``'d:<token>'``) and return the row."""

    @abc.abstractmethod
    def keys(self) -> list[str]:
        """The keys of the rows not popped, oldest first."""

    @abc.abstractmethod
    def alive(self, owner: str) -> bool:
        """Whether the process ``owner`` may still finish its tasks."""


_TAGS: dict[type, str] = {str: "s:", int: "i:"}  # stored keys carry their type


def _key_text(future_key: Any) -> str:
    tag = _TAGS.get(type(future_key))
    if tag is None:
        raise TypeError(
            f"a shared futures store keeps str or int keys, got {future_key!r} "
            f"({type(future_key).__name__}): use str(key)"
        )
    return f"{tag}{future_key}"


def _read_key(future_key: Any) -> str:
    """The stored text a read looks for: a key no store keeps (a tuple) matches nothing."""
    return _TAGS.get(type(future_key), "?") + str(future_key)


def _key_of(text: str) -> Any:
    return int(text[2:]) if text.startswith("i:") else text[2:]


_owners: dict[int, str] = {}  # this process as stores name it, by pid (computed once)


def _owner() -> str:
    """This process, as stores name it: machine, pid and start time (pids are reused)."""
    owner = _owners.get(_pid)
    if owner is None:
        owner = _owners[_pid] = f"{_HOST}/{_process_start(_pid)}"
    return owner


def _process_start(pid: int) -> str:
    """``pid:start`` (its start time in clock ticks since boot, from Linux's /proc)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
    except OSError:
        return f"{pid}:"
    return f"{pid}:{fields[19].decode()}" if fields[0] not in (b"Z", b"X") else f"{pid}:dead"


def _alive_here(owner: str) -> bool | None:
    """Whether ``owner`` is alive, if it runs on this machine (else None: cannot tell)."""
    host, _, process = owner.rpartition("/")
    if host != _HOST:
        return None
    pid, _, start = process.partition(":")
    if start:  # Linux: the process with that pid must be the one that started then
        return _process_start(int(pid)) == process
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:
        pass
    return True


def _machine() -> str:
    """This machine since it last booted, and its pid namespace (containers on one host may
    share its name, under --network host, but not each other's pids)."""
    boot = namespace = ""
    with contextlib.suppress(OSError), open("/proc/sys/kernel/random/boot_id") as file:
        boot = file.read().strip()
    with contextlib.suppress(OSError):
        namespace = os.readlink("/proc/self/ns/pid")
    return f"{socket.gethostname()}/{boot}/{namespace}"


_HOST = _machine()


class _Signer:
    """Signs what a shared store keeps, and checks it before anything is unpickled.

    Whoever can write the store (a Redis shared with other services, a folder others can
    write) could otherwise plant a pickle that runs code in every web process. The MAC is
    an HMAC-SHA256 keyed from the app's SECRET_KEY (SECRET_KEY_FALLBACKS are accepted for
    reading, so the key can rotate), over the namespace, the key, the row's token and the
    bytes: an outcome cannot be moved to another row, key or namespace either.
    """

    __slots__ = ("keys", "namespace")

    def __init__(self, secrets: Iterable[str | bytes], namespace: str = "") -> None:
        self.keys = [
            hashlib.sha256(b"flask_executor outcome\0" + _bytes(secret)).digest()
            for secret in secrets
        ]
        self.namespace = namespace

    def sign(self, key: Any, token: str, data: bytes) -> bytes:
        return self._mac(self.keys[0], key, token, data) + data

    def verify(self, key: Any, token: str, blob: bytes) -> bytes | None:
        """The signed bytes, or None if no key of this app signed them for this row."""
        mac, data = blob[:32], blob[32:]
        macs = (self._mac(secret, key, token, data) for secret in self.keys)
        return data if any(hmac.compare_digest(mac, other) for other in macs) else None

    def _mac(self, secret: bytes, key: Any, token: str, data: bytes) -> bytes:
        row = f"{self.namespace}\0{_read_key(key)}\0{token}\0".encode()
        return hmac.new(secret, row + data, hashlib.sha256).digest()


def _bytes(secret: str | bytes) -> bytes:
    return secret.encode() if isinstance(secret, str) else secret


def _outcome(fn: Task, exc: BaseException | None, result: Any = None) -> bytes:
    """A task's outcome as a store keeps it: (pickled exception or result, whether it
    failed, a summary, the traceback text), so a process that cannot re-create the value
    can still say what it was. What cannot be pickled becomes a TypeError naming it."""
    value, summary = (exc, f"{type(exc).__qualname__}: {exc}") if exc else (result, "")
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)) if exc else ""
    try:
        pickled = pickle.dumps(value)
        pickle.loads(pickled)  # what pickles but cannot be re-created fails here, in the owner
    except Exception as why:
        kind = f"its {type(exc).__qualname__}" if exc else f"its {type(result).__name__} result"
        value = TypeError(
            f"stored task {_task_name(fn)} finished, but {kind} cannot be pickled for other "
            f"processes to read ({why}); return picklable values, or use the memory store"
        )
        pickled, exc = pickle.dumps(value), value
    return pickle.dumps((pickled, exc is not None, summary, text))


def _loads(data: bytes, task: str) -> tuple[bool, Any]:
    """(failed, the exception or result) of a stored outcome whose signature was checked."""
    pickled, failed, summary, text = pickle.loads(data)
    try:
        value = pickle.loads(pickled)
    except Exception as why:
        what = f"raised {summary}" if failed else "returned a value that"
        value = RuntimeError(f"stored task {task} {what}: it cannot be re-created here ({why})")
        failed = True
    if failed and text:
        value.__cause__ = _RemoteTraceback(text)
    return failed, value


class _RemoteTraceback(Exception):
    """The traceback of a stored task's exception, as the process that ran it printed it."""

    def __str__(self) -> str:
        return f'\n"""\n{self.args[0]}"""'


class _NotStarted(concurrent.futures.CancelledError):
    """A stored task cancelled through the store before it started: its future is cancelled."""


class _StoredTask:
    """A stored task: marks its row running as it starts (not at all if it was cancelled),
    and stores its outcome before the submitter's future has it, so every read agrees (if
    the store is locked past _PATIENCE, the owner stores it a little later)."""

    def __init__(self, futures: _SharedFutures, token: str, future_key: Any, fn: Task) -> None:
        functools.update_wrapper(self, fn, updated=())  # its name: errors, process checks
        self.store, self.signer, self.token = futures.store, futures.signer, token
        self.future_key, self.fn = future_key, fn
        self.recorded = False  # this copy stored the outcome (in a process worker: its copy)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:  # on a pool of a Backend of yours
        return self.run(_WorkerTask(0, None, self.fn), args, kwargs)

    def run(self, task: Any, args: Any, kwargs: Any) -> Any:
        """Mark the row running, call the task's function, store its outcome."""
        try:
            started = self.store.start(self.token, _PATIENCE)
        except Exception:  # the store is locked or away: it runs, unmarked
            started = True
        if not started:
            raise _NotStarted(f"stored future {self.future_key!r} was cancelled")
        try:
            result = _call(task, self.fn, args, kwargs)
        except BaseException as exc:
            if task.stopped is None:  # else it was stopped: the owner stores that
                self._record(_outcome(self.fn, exc))
            raise
        self._record(_outcome(self.fn, None, result))
        return result

    def _record(self, outcome: bytes) -> None:
        """Store the outcome. If the row got another meanwhile, raise that one, so the
        submitter's future ends as every reader sees it: cancelled from another process,
        or lost (a reader found this process's lease run out: it was paused, or busy)."""
        try:
            signed = self.signer.sign(self.future_key, self.token, outcome)
            stored = self.store.finish(self.token, signed, _PATIENCE)
            self.recorded = True
            row = None if stored else self.store.read(token=self.token)
            blob = self.store.outcome(self.token) if row and row.state == FINISHED else None
        except Exception:  # the store is away: the owner tries again
            return
        if row is not None and row.state == CANCELLED:
            raise _NotStarted(f"stored future {self.future_key!r} was cancelled")
        data = None if blob is None else self.signer.verify(self.future_key, self.token, blob)
        if data is not None and (other := _loads(data, row.task if row else ""))[0]:
            raise other[1]  # (only a reader writes a finished row: the error that it is lost)


class _StoredFuture(Future):  # type: ignore[type-arg]
    """A stored future as a shared store has it: each read asks the store again.

    Polls (done, running, cancelled) read the row's state; result() and exception() load
    its outcome once. Done-callbacks added to it run in the thread whose read sees the task
    finish; it is not woken by itself, so ``concurrent.futures.wait`` on it does not return.
    """

    def __init__(self, futures: _SharedFutures, future_key: Any, row: Row) -> None:
        super().__init__()
        self._futures, self._key, self._token, self._task = futures, future_key, row.token, row.task
        self._loaded = False
        with self._condition:
            self._update(row)

    def _update(self, row: Row | None) -> None:
        if row is None:
            self._exception, self._loaded = KeyError(self._gone()), True
        elif row.state in (PENDING, RUNNING) and self._futures.store.alive(row.owner):
            self._state = row.state.upper()
            return
        elif row.state in (PENDING, RUNNING):  # its owner is gone: so it is for everyone
            lost = concurrent.futures.BrokenExecutor(
                f"stored future {self._key!r} is lost: the process {row.owner} that ran its "
                f"task {row.task} is gone"
            )
            lost_outcome = _outcome(self.cancel, lost)
            outcome = self._futures.signer.sign(self._key, self._token, lost_outcome)
            self._futures.store.finish(self._token, outcome, 30)
            return self._update(self._futures.store.read(token=self._token))
        self._state = "CANCELLED_AND_NOTIFIED" if row and row.state == CANCELLED else "FINISHED"
        self._condition.notify_all()
        self._invoke_callbacks()  # type: ignore[attr-defined]

    def _gone(self) -> str:
        return (
            f"stored future {self._key!r} is no longer in the store: popped futures are kept "
            f"{_POPPED_KEPT / 3600:g} hours after their task finished, others until "
            "EXECUTOR_FUTURES_TTL or EXECUTOR_FUTURES_MAX_LENGTH drops them"
        )

    def _load(self) -> None:
        """Read the outcome of a finished row (once), checking its signature first."""
        with self._condition:
            if self._state != "FINISHED" or self._loaded:
                return
            holding = _holding.set(True)  # (its lock is native: see _sleep)
            try:
                blob = self._futures.store.outcome(self._token)
            finally:
                _holding.reset(holding)
            signer = self._futures.signer
            data = None if blob is None else signer.verify(self._key, self._token, blob)
            value: Any
            if blob is None:
                failed, value = True, KeyError(self._gone())
            elif data is None:
                failed, value = True, RuntimeError(
                    f"stored future {self._key!r}: the store holds an outcome this app did not "
                    "write (its signature does not match the app's SECRET_KEY); it was not "
                    "unpickled. Give every process that shares the store the same SECRET_KEY"
                )  # fmt: skip
            else:
                failed, value = _loads(data, self._task)
            if failed:
                self._exception = value
            else:
                self._result = value
            self._loaded = True

    def _refresh(self) -> None:
        with self._condition:  # one read at a time resolves it
            if self._state in ("PENDING", "RUNNING"):
                holding = _holding.set(True)  # (its lock is native: see _sleep)
                try:
                    self._update(self._futures.store.read(token=self._token))
                finally:
                    _holding.reset(holding)

    def done(self) -> bool:
        self._refresh()
        return super().done()

    def running(self) -> bool:
        self._refresh()
        return super().running()

    def cancelled(self) -> bool:
        self._refresh()
        return super().cancelled()

    def cancel(self) -> bool:
        """Cancel the task, pending or running, for every process at once. Its owner asks
        a running task to stop: at once in this process, else within _WATCH_EVERY s."""
        local = self._futures._local.get(self._token)  # its task is this process's
        if local is None or not (
            local.cancel() or local.done() or isinstance(local, _ContextFuture)
        ):  # a pool of yours may not stop a running task: the store can
            self._futures.store.cancel(self._token)
        # (else the local future's done-callback has stored the cancel; or its function
        # returned, and its outcome stands)
        return self.cancelled()

    def result(self, timeout: float | None = None) -> Any:
        self._poll(timeout)
        self._load()
        return super().result(0)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self._poll(timeout)
        self._load()
        return super().exception(0)

    def _poll(self, timeout: float | None) -> None:
        """Wait for the task, reading the store with a backoff (1 ms, doubling to 50 ms)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.001
        while not self.done():
            left = 1.0 if deadline is None else deadline - time.monotonic()
            if left <= 0:
                raise concurrent.futures.TimeoutError(
                    f"stored future {self._key!r} did not finish within {timeout} s"
                )
            _sleep(min(delay, left))
            delay = min(delay * 2, 0.05)


def _sleep(seconds: float) -> None:
    """Sleep without blocking gevent's hub, in a thread that has one, unless this greenlet
    holds a lock another greenlet of the thread could then take too (_holding); else a
    plain sleep (the original time.sleep, where gevent has monkey-patched it)."""
    gevent = sys.modules.get("gevent")
    if gevent is None:
        return time.sleep(seconds)
    if _hub_here() is not None and not _holding.get():
        return gevent.sleep(seconds)  # type: ignore[no-any-return]
    monkey = sys.modules.get("gevent.monkey")  # not imported: nothing was patched
    (time.sleep if monkey is None else monkey.get_original("time", "sleep"))(seconds)


class _SharedFutures(FutureCollection):
    """The futures dict over a shared store: every process sees the same keys and outcomes.

    Reads return fresh views of the stored rows (:class:`_StoredFuture`); the task and its
    done-callbacks run in the process that submitted it, which stores the outcome. A thread
    watches the store for cancels from other processes while a task of this process runs.
    """

    def __init__(self, store: FuturesStore, max_length: int | None, ttl: float | None,
                 logger: Any, signer: _Signer) -> None:  # fmt: skip
        super().__init__(max_length, logger)
        self.store, self.ttl, self.signer = store, ttl, signer
        self._local: weakref.WeakValueDictionary[str, Future[Any]] = weakref.WeakValueDictionary()
        self._watching = False  # a thread watches the store for cancels of _local's tasks
        self._watch_lock = threading.Lock()  # guards _watching

    def _store(self, future_key: Any, fn: Any, start: Callable[[Task], Future[T]]) -> Future[T]:
        text, token = _key_text(future_key), os.urandom(16).hex()
        dropped = self.store.claim(text, token, _owner(), _task_name(fn), self.max_length, self.ttl)
        if dropped is None:
            raise ValueError(_taken(future_key))
        for key in dropped:
            self._evicted(_key_of(key))
        task = _StoredTask(self, token, future_key, fn)
        try:
            future = start(task)
        except BaseException:
            self.store.forget(token)  # nothing was queued: free the key
            raise
        with self._watch_lock:
            self._local[token] = future
        if not self._watching:
            self._watch()
        if isinstance(future, _ContextFuture):
            future._gate = functools.partial(self._gate, task)
        Future.add_done_callback(future, functools.partial(self._record, task, future is fn))
        future._stored = (text, token)  # type: ignore[attr-defined]
        return future

    def _watch(self) -> None:
        """Start the thread that stops this process's tasks cancelled from elsewhere."""
        with self._watch_lock:
            if not self._watching:
                self._watching = True
                name = f"{__name__} cancel watcher"
                threading.Thread(target=self._watch_store, name=name, daemon=True).start()

    def _watch_store(self) -> None:
        """Every _WATCH_EVERY s, while a stored task of this process is unfinished, read
        its row: cancelled there (by another process), its future is cancelled here, and
        its task stopped. Nothing is read while none is; the thread ends then."""
        while True:
            _sleep(_WATCH_EVERY)
            with self._watch_lock:
                futures = [(token, f) for token, f in self._local.items() if not f.done()]
                self._watching = bool(futures)
            if not futures:
                return
            for token, future in futures:
                try:
                    row = self.store.read(token=token)
                    if row is not None and row.state == CANCELLED:
                        future.cancel()
                except Exception:  # the store is away: next time
                    continue

    def _gate(self, task: _StoredTask, error: BaseException) -> BaseException | None:
        """Store a stop (a cancel, a time limit) before the future shows it: the error to
        show, or None if the row holds another outcome already (then that one stands)."""
        try:
            if isinstance(error, concurrent.futures.CancelledError):
                stored = self.store.cancel(task.token, _PATIENCE)
            else:
                outcome = self.signer.sign(task.future_key, task.token, _outcome(task.fn, error))
                stored = self.store.finish(task.token, outcome, _PATIENCE)
            row = None if stored else self.store.read(token=task.token)
        except Exception:  # the store is away: stop here; _record stores it later
            return error
        if row is None or row.state == CANCELLED:
            return error if row is None or stored else _cancelled_error(task.fn)
        return None

    def _record(self, task: _StoredTask, added: bool, future: Future[Any]) -> None:
        """Store what the task did not: a cancel, a stop, a pool's failure, an added future,
        an outcome the task could not write (then from a thread: the store is busy)."""
        future._retrieved = True  # type: ignore[attr-defined]  # kept for reads by key
        if task.recorded and not added:
            return
        if not added and getattr(future, "_ask", None) is not None and not future.cancelled():
            # A process task: its worker's copy of the task stored the outcome (unless the
            # store was away). This runs in the pool's one thread that hands outcomes over:
            # check and store from another, or every later future waits behind this one.
            check = functools.partial(self._record_unless_stored, task, future)
            threading.Thread(target=check, daemon=True).start()
            return
        outcome = self._signed(task, future)
        try:
            self.store.finish(task.token, outcome, _PATIENCE)
        except Exception:
            args = (task, outcome)
            threading.Thread(target=self._record_later, args=args, daemon=True).start()

    def _record_unless_stored(self, task: _StoredTask, future: Future[Any]) -> None:
        with contextlib.suppress(Exception):  # (the store is away: store it below, later)
            row = self.store.read(token=task.token)
            if row is None or row.state not in (PENDING, RUNNING):
                return  # stored by the worker (or popped, or evicted)
        self._record_later(task, self._signed(task, future))

    def _signed(self, task: _StoredTask, future: Future[Any]) -> bytes | None:
        """A done future's outcome as the store keeps it (None: cancelled)."""
        if future.cancelled():
            return None
        exc = future.exception()
        data = _outcome(task.fn, exc, None if exc else future.result())
        return self.signer.sign(task.future_key, task.token, data)

    def _record_later(self, task: _StoredTask, outcome: bytes | None) -> None:
        for delay in (0.5, 2, 5, 15, 0):  # the store may be away for a while
            try:
                self.store.finish(task.token, outcome, 30)
                return
            except Exception:
                if not delay:
                    self._logger.exception(
                        "could not store the outcome of %s: its key reads as unfinished",
                        _task_name(task.fn),
                    )
                time.sleep(delay)

    def get(self, future_key: Any, default: Any = None) -> Any:
        row = self.store.read(key=_read_key(future_key))
        return default if row is None else _StoredFuture(self, future_key, row)

    def __getitem__(self, future_key: Any) -> Future[Any]:
        future = self.get(future_key)
        if future is None:
            raise KeyError(future_key)
        return future  # type: ignore[no-any-return]

    def pop(self, future_key: Any) -> Future[Any] | None:
        row = self.store.pop(_read_key(future_key))
        return None if row is None else _StoredFuture(self, future_key, row)

    def keys(self) -> list[Any]:
        return [_key_of(text) for text in self.store.keys()]  # noqa: SIM118

    def __len__(self) -> int:
        return len(self.store.keys())

    def __contains__(self, future: object) -> bool:
        if isinstance(future, _StoredFuture):
            key, token = _read_key(future._key), future._token
        else:
            key, token = getattr(future, "_stored", ("", ""))
        row = self.store.read(key=key) if key else None
        return row is not None and row.token == token

    def items(self) -> list[tuple[Any, Future[Any]]]:
        futures = ((key, self.get(key)) for key in self.keys())
        return [(key, future) for key, future in futures if future is not None]


def _shared_store(cls: type[FuturesStore], *args: Any) -> FuturesStore:
    """A store unpickled in a worker process: one per process, opened on first use (so a
    store that is away fails that task, not the worker process and its queue)."""
    store = _STORES.get((cls, args))
    if store is None:
        store = _STORES[(cls, args)] = cls.__new__(cls)
        store._setup(*args)  # type: ignore[attr-defined]
    return store


def _shared_futures(config: Config, used: dict[str, Any]) -> Callable[..., Any] | None:
    """The hook _AppState calls: how to build a futures dict (given the app's logger) over
    the shared store EXECUTOR_FUTURES_STORE names, or None to keep it in memory. It adds the
    settings it reads to ``used``, for app.config."""
    used["EXECUTOR_FUTURES_TTL"] = ttl = config.number("EXECUTOR_FUTURES_TTL")
    used["EXECUTOR_FUTURES_NAMESPACE"] = _namespace(config)
    store = _open_store(config)
    if store is None:
        return None
    signer, length = _signer(config), used["EXECUTOR_FUTURES_MAX_LENGTH"]
    return functools.partial(_SharedFutures, store, length, ttl, signer=signer)


def _open_store(config: Config) -> FuturesStore | None:
    """The shared store EXECUTOR_FUTURES_STORE names; None for this process's memory."""
    value = config.get("EXECUTOR_FUTURES_STORE")
    if isinstance(value, FuturesStore):
        return value
    url = "" if value is None else str(value).strip()
    namespace = _namespace(config)
    if url.lower() in ("", "memory", "none"):
        return None
    if url.startswith("sqlite:///") and url[10:] not in ("", ":memory:") and "?" not in url:
        path = url[10:]  # sqlite:////abs.db: an absolute path; else under instance_path
        if not os.path.isabs(path):
            os.makedirs(config.app.instance_path, exist_ok=True)
            path = os.path.join(config.app.instance_path, path)
        return SQLiteStore(path, namespace)
    if url.startswith(("redis://", "rediss://", "unix://")):
        try:
            return RedisStore(url, namespace)
        except ValueError as exc:  # redis-py's reading of the URL
            raise ValueError(f"{config.prefix}EXECUTOR_FUTURES_STORE={value!r}: {exc}") from exc
    raise ValueError(
        f"{config.prefix}EXECUTOR_FUTURES_STORE={value!r} is not a futures store: use "
        "'memory', 'sqlite:///relative/path.db', 'sqlite:////absolute/path.db', "
        "'redis://host:port/db' or a FuturesStore object"
    )


def _namespace(config: Config) -> str:
    """Where this executor's keys live in a shared store: EXECUTOR_FUTURES_NAMESPACE,
    else the app's import name (two apps both called ``app`` share it: set the key)."""
    default = f"{config.app.import_name}:{config.prefix}"
    return str(config.get("EXECUTOR_FUTURES_NAMESPACE") or default)


def _signer(config: Config) -> _Signer:
    """How a shared store's outcomes are signed: with the app's SECRET_KEY."""
    secrets = [config.app.secret_key, *(config.app.config.get("SECRET_KEY_FALLBACKS") or [])]
    if not secrets[0]:
        raise ValueError(
            f"{config.prefix}EXECUTOR_FUTURES_STORE={config.get('EXECUTOR_FUTURES_STORE')!r} "
            "needs the app's SECRET_KEY: outcomes in a shared store are signed with it, so "
            "that whoever can write the store cannot run code in this app by planting a "
            "pickle there. Set app.secret_key (SECRET_KEY), the same in every process that "
            "shares the store"
        )
    return _Signer(secrets, _namespace(config))


_STORES: dict[tuple[Any, ...], FuturesStore] = {}
_NETWORK_FILESYSTEMS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "ceph", "glusterfs")


def _filesystem(folder: str, table: str = "/proc/mounts") -> str:
    """The type of the filesystem ``folder`` is on, from the mount table ('' if unknown)."""
    best, kind = "", ""
    with contextlib.suppress(OSError), open(table) as mounts:
        for line in mounts:
            _, point, fstype = line.split()[:3]
            point = point.replace("\\040", " ")
            inside = folder == point or folder.startswith(point.rstrip("/") + "/")
            if inside and len(point) >= len(best):
                best, kind = point, fstype
    return kind


def _file_id(path: str) -> tuple[int, ...] | None:
    """Which file ``path`` is now: the database's device and inode, and its "-gen" marker's
    inode, made anew whenever the file is (re)created (inode numbers of deleted files are
    reused at once, so the database's alone cannot tell a new file from the old)."""
    try:
        db, gen = os.stat(path), os.stat(path + "-gen")
    except OSError:
        return None
    return db.st_dev, db.st_ino, gen.st_ino


def _db_id(path: str) -> str:
    with contextlib.suppress(OSError):
        stat = os.stat(path)
        return f"{stat.st_dev}:{stat.st_ino}"
    return ""


class _Connection(NamedTuple):
    """A pooled SQLite connection, and which file it opened (see _file_id)."""

    file: tuple[int, ...] | None
    db: sqlite3.Connection


class SQLiteStore(FuturesStore):
    """Rows in a SQLite file (WAL), shared by the processes of one machine that share a pid
    namespace (containers with their own pids cannot tell whether each other's are alive).

    Connections come from a pool of this process's (a forked child opens its own). Every
    checkout checks which file the path names: a deleted or replaced file is opened
    (created) again, in every process. A locked database is waited for in short sleeps that
    let gevent's other greenlets run.
    """

    def __init__(self, path: str, namespace: str = "") -> None:
        self._setup(path, namespace)
        folder = os.path.dirname(self.path)
        if not os.path.isdir(folder) or os.path.isdir(self.path):
            what = "is a folder" if os.path.isdir(self.path) else "is in a missing folder"
            raise ValueError(
                f"the SQLite futures store {self.path!r} {what}: set EXECUTOR_FUTURES_STORE "
                "to a file path in an existing folder"
            )
        kind = _filesystem(os.path.realpath(folder))
        if kind in _NETWORK_FILESYSTEMS or kind.startswith("fuse"):
            raise ValueError(
                f"the SQLite futures store {self.path!r} is on a {kind} filesystem, where "
                "SQLite's locks are not reliable: put it on a local disk, or use redis://"
            )
        self._run(lambda db: None)  # creates the file and its table now: errors at init_app

    def _setup(self, path: str, namespace: str) -> None:
        self.path, self.namespace = os.path.abspath(path), namespace
        self._pid = -1
        self._idle: list[_Connection] = []
        self._idle_lock = threading.Lock()  # guards _idle
        self._inherited: list[Any] = []  # a parent's: kept, never used or closed

    def __reduce__(self) -> tuple[Any, ...]:
        return (_shared_store, (type(self), self.path, self.namespace))

    def _run(self, op: Callable[[sqlite3.Connection], T], wait: float = 30.0) -> T:
        """``op(connection)``, again after a short sleep while the database is locked."""
        delay, deadline = 0.001, time.monotonic() + wait
        while True:
            with self._db() as db:
                try:
                    return op(db)
                except sqlite3.OperationalError as exc:
                    busy = "locked" in str(exc) or "busy" in str(exc)
                    if not busy or time.monotonic() > deadline:
                        raise
            _sleep(delay)
            delay = min(delay * 2, 0.05)

    @contextlib.contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        if self._pid != _pid:  # first use in this process: the parent's connections stay put
            with _fork_lock:
                if self._pid != _pid:
                    self._inherited += self._idle
                    self._idle, self._idle_lock, self._pid = [], threading.Lock(), _pid
        with self._idle_lock:
            entry = self._idle.pop() if self._idle else None
        if entry is None or entry.file != _file_id(self.path):  # else replaced or deleted
            entry = self._connect()
        try:
            yield entry.db
        finally:
            if entry.db.in_transaction:
                entry.db.rollback()
            with self._idle_lock:
                self._idle.append(entry)

    def _connect(self) -> _Connection:
        """A new connection, and the file it opened. A WAL left behind by a deleted or
        replaced file would be read as the new file's: so, under an exclusive lock on the
        "-lock" file, the "-wal" and "-shm" are removed first unless the "-gen" marker says
        they belong to the file the path names now (the marker is written after them)."""
        holding = _holding.set(True)  # (_connect_lock is native: no greenlet switch under it)
        try:
            return self._connect_locked()
        finally:
            _holding.reset(holding)

    def _connect_locked(self) -> _Connection:
        with _connect_lock, open(self.path + "-lock", "a+b") as lock:
            _lock_file(lock.fileno(), self.path)
            try:
                with open(self.path + "-gen") as gen:
                    fresh = gen.read() == _db_id(self.path)
            except OSError:
                fresh = False
            if not fresh:
                for stale in ("-wal", "-shm"):
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(self.path + stale)
            db = self._open()
            if not fresh:  # a new marker file, with a new inode: see _file_id
                with open(self.path + "-gen.tmp", "w") as gen:
                    gen.write(_db_id(self.path))
                os.replace(self.path + "-gen.tmp", self.path + "-gen")
            return _Connection(_file_id(self.path), db)

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=0.01, isolation_level=None, check_same_thread=False)
        for attempt in range(200):  # another process may hold the lock WAL mode needs
            try:
                if db.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal":
                    db.execute("PRAGMA synchronous=NORMAL")
                    db.executescript(_SCHEMA)
                    return db
                error = "it did not switch to WAL"
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise
                error = str(exc)
            _sleep(random.uniform(0.005, 0.025) * min(attempt + 1, 4))
        raise RuntimeError(f"cannot open the SQLite futures store {self.path!r}: {error}")

    def claim(self, key: str, token: str, owner: str, task: str, max_length: int | None,
              ttl: float | None) -> list[str] | None:  # fmt: skip
        def claim(db: sqlite3.Connection) -> list[str] | None:
            now, ns = time.time(), self.namespace
            db.execute("BEGIN IMMEDIATE")
            kept = now - _POPPED_KEPT  # popped rows finished then, or popped then unfinished
            db.execute(_DELETE + "key LIKE 'd:%' AND finished < ?", (ns, kept))
            db.execute(_DELETE + "popped < ? AND finished IS NULL", (ns, kept))
            if ttl is not None:
                db.execute(_DELETE + "key NOT LIKE 'd:%' AND finished < ?", (ns, now - ttl))
            if db.execute(_SELECT + "key = ?", (ns, key)).fetchone():
                return None  # _db() rolls back
            dropped: list[str] = []  # (rows are counted only where there is a bound)
            count = 0 if max_length is None else db.execute(_COUNT, (ns,)).fetchone()[0]
            while max_length is not None and count >= max_length:
                old, old_key, state = db.execute(_OLDEST, (ns, FINISHED, CANCELLED)).fetchone()
                db.execute("DELETE FROM executor_rows WHERE token = ?", (old,))
                if state not in (FINISHED, CANCELLED):
                    dropped.append(old_key)
                count -= 1
            db.execute(
                "INSERT INTO executor_rows (token, ns, key, owner, task, state) VALUES "
                "(?, ?, ?, ?, ?, ?)",
                (token, ns, key, owner, task, PENDING),
            )
            db.execute("COMMIT")
            return dropped

        return self._run(claim)

    def start(self, token: str, wait: float) -> bool:
        def start(db: sqlite3.Connection) -> bool:
            db.execute(_SET_STATE + "token = ? AND state = ?", (RUNNING, None, token, PENDING))
            row = db.execute("SELECT state FROM executor_rows WHERE token = ?", (token,))
            return bool(row.fetchone() != (CANCELLED,))  # evicted (no row): it still runs

        return self._run(start, wait)

    def finish(self, token: str, outcome: bytes | None, wait: float) -> bool:
        state = CANCELLED if outcome is None else FINISHED
        return self._run(lambda db: db.execute(
            "UPDATE executor_rows SET state = ?, outcome = ?, finished = ? "
            "WHERE token = ? AND state IN (?, ?)",
            (state, outcome, time.time(), token, PENDING, RUNNING),
        ).rowcount == 1, wait)  # fmt: skip

    def forget(self, token: str) -> None:
        self._run(lambda db: db.execute("DELETE FROM executor_rows WHERE token = ?", (token,)))

    def read(self, key: str = "", token: str = "") -> Row | None:
        where, value = ("key = ?", key) if key else ("token = ?", token)
        row = self._run(lambda db: db.execute(_SELECT + where, (self.namespace, value)).fetchone())
        return None if row is None else Row(*row)

    def outcome(self, token: str) -> bytes | None:
        select = "SELECT outcome FROM executor_rows WHERE token = ?"
        row = self._run(lambda db: db.execute(select, (token,)).fetchone())
        return None if row is None else row[0]

    def cancel(self, token: str, wait: float = 30.0) -> bool:
        def cancel(db: sqlite3.Connection) -> bool:
            db.execute(
                _SET_STATE + "token = ? AND state IN (?, ?)",
                (CANCELLED, time.time(), token, PENDING, RUNNING),
            )
            row = db.execute("SELECT state FROM executor_rows WHERE token = ?", (token,))
            return bool(row.fetchone() == (CANCELLED,))

        return self._run(cancel, wait)

    def pop(self, key: str) -> Row | None:
        def pop(db: sqlite3.Connection) -> Row | None:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute(_SELECT + "key = ?", (self.namespace, key)).fetchone()
            if row is not None:
                db.execute(
                    "UPDATE executor_rows SET key = 'd:' || token, popped = ? WHERE token = ?",
                    (time.time(), row[0]),
                )
            db.execute("COMMIT")
            return None if row is None else Row(*row)

        return self._run(pop)

    def keys(self) -> list[str]:
        select = "SELECT key FROM executor_rows WHERE ns = ? AND key NOT LIKE 'd:%' ORDER BY seq"
        rows = self._run(lambda db: db.execute(select, (self.namespace,)).fetchall())
        return [key for (key,) in rows]

    def alive(self, owner: str) -> bool:
        return _alive_here(owner) is not False  # another machine's: cannot tell, so alive


def _lock_file(fd: int, path: str) -> None:
    """Take an exclusive lock on ``fd``, waiting in sleeps that let gevent's hub run. A
    POSIX record lock (lockf): unlike flock, a child forked meanwhile does not inherit it;
    it is the process's, so _connect_lock keeps this process's threads apart."""
    try:
        import fcntl
    except ImportError:  # Windows: no lockf, and no inode numbers to tell files apart
        return
    deadline = time.monotonic() + 30
    while True:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the SQLite futures store {path!r}: its -lock file was held by another "
                    "process for 30 s (a process stopped while opening the file?)"
                ) from None
            _sleep(0.005)


_connect_lock = threading.Lock()  # one thread of this process opens a store file at a time


_SCHEMA = """CREATE TABLE IF NOT EXISTS executor_rows (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, token TEXT NOT NULL UNIQUE, ns TEXT NOT NULL,
    key TEXT NOT NULL, owner TEXT NOT NULL, task TEXT NOT NULL, state TEXT NOT NULL,
    outcome BLOB, finished REAL, popped REAL, UNIQUE (ns, key));
CREATE INDEX IF NOT EXISTS executor_rows_finished ON executor_rows (ns, finished);
CREATE INDEX IF NOT EXISTS executor_rows_popped ON executor_rows (ns, popped);"""
_SELECT = "SELECT token, state, owner, task FROM executor_rows WHERE ns = ? AND "
_DELETE = "DELETE FROM executor_rows WHERE ns = ? AND "  # finished rows (NULL < x is not)
_SET_STATE = "UPDATE executor_rows SET state = ?, finished = ? WHERE "
_COUNT = "SELECT COUNT(*) FROM executor_rows WHERE ns = ? AND key NOT LIKE 'd:%'"
_OLDEST = (  # the first to finish, then the oldest unfinished (NULLs sort first: skip them)
    "SELECT token, key, state FROM executor_rows WHERE ns = ? AND key NOT LIKE 'd:%' "
    "ORDER BY state NOT IN (?, ?), finished, seq LIMIT 1"
)


# The leases this process holds, (pid, Redis URL, owner, seconds): each renewed by one
# thread, which ends once its entry is gone (a forked child has no such thread: it starts
# its own). Stores of one owner with leases of different lengths share its key, which then
# outlives a pause only as long as the shortest lease.
_RENEWING: dict[tuple[int, str, str, float], object] = {}


def _renew_forever(client: Any, lease: tuple[int, str, str, float], me: object) -> None:
    owner, seconds = lease[2], lease[3]
    while _RENEWING.get(lease) is me:
        time.sleep(seconds / 3)  # a greenlet's sleep where threads are monkey-patched
        with contextlib.suppress(Exception):  # Redis away: try again next time
            client.set(f"flask_executor:lease:{owner}", 1, px=int(seconds * 1000))


class RedisStore(FuturesStore):
    """Rows in Redis, shared by processes on several machines (one server, not a cluster).

    Each process holds a lease, renewed every ``lease / 3`` seconds: its unfinished tasks
    read as lost once its lease has run out (at once, when read on its own machine).
    """

    def __init__(self, url: str, namespace: str = "", lease: float = 15.0) -> None:
        try:
            import redis
        except ImportError as exc:
            raise ImportError(
                f"the futures store {url!r} needs the redis package: pip install redis"
            ) from exc
        self._setup(url, namespace, lease)
        try:
            self._redis.ping()
        except redis.RedisError as exc:
            raise ConnectionError(f"cannot reach the Redis futures store {url!r}: {exc}") from exc

    def _setup(self, url: str, namespace: str, lease: float) -> None:
        import redis

        self.url, self.namespace, self.lease = url, namespace, lease
        # A blocking pool: under gevent, many greenlets wait for a connection, not fail.
        # Its connections are opened again in a forked child.
        pool = redis.BlockingConnectionPool.from_url(
            url, max_connections=50, timeout=30, socket_timeout=30, socket_connect_timeout=10
        )
        self._redis = redis.Redis(connection_pool=pool)
        quick = redis.BlockingConnectionPool.from_url(  # a task's own writes: see _PATIENCE
            url, max_connections=50, timeout=_PATIENCE, socket_timeout=_PATIENCE
        )
        self._quick = redis.Redis(connection_pool=quick)
        self._prefix = f"flask_executor:{namespace}:"
        self._scripts = {name: self._redis.register_script(_LUA + body) for name, body in _OPS}
        self._leased = -1  # the process whose lease is being renewed

    def __reduce__(self) -> tuple[Any, ...]:
        return (_shared_store, (type(self), self.url, self.namespace, self.lease))

    def _run(self, name: str, *args: Any, wait: float = 30.0) -> Any:
        client = self._quick if wait < 30 else self._redis
        return self._scripts[name](args=[self._prefix, *args], client=client)

    def claim(self, key: str, token: str, owner: str, task: str, max_length: int | None,
              ttl: float | None) -> list[str] | None:  # fmt: skip
        if self._leased != _pid:  # the first claim in this process: hold a lease from now
            self._leased = _pid
            # One thread renews it per process, server and lease, not per store; it is given
            # the client, never the store, so a store an app drops is freed with its
            # connections. Started first: Redis may be away now, and back later.
            first, held = object(), (_pid, self.url, owner, self.lease)
            if _RENEWING.setdefault(held, first) is first:
                renew = (self._redis, held, first)
                threading.Thread(target=_renew_forever, args=renew, daemon=True).start()
            self._renew(owner)
        limits = [-1 if max_length is None else max_length, -1 if ttl is None else ttl]
        lease = int(self.lease * 1000)  # renewed by each claim too (a restarted Redis)
        claimed = self._run(
            "claim", key, token, owner, task, *limits, time.time(), _POPPED_KEPT, lease
        )
        return None if claimed is None else [key.decode() for key in claimed[1:]]

    def _renew(self, owner: str) -> None:
        self._redis.set(f"flask_executor:lease:{owner}", 1, px=int(self.lease * 1000))

    def start(self, token: str, wait: float) -> bool:
        return bool(self._run("start", token, wait=wait))

    def finish(self, token: str, outcome: bytes | None, wait: float) -> bool:
        state = CANCELLED if outcome is None else FINISHED
        return bool(self._run("finish", token, state, outcome or b"", time.time(), wait=wait))

    def forget(self, token: str) -> None:
        self._run("forget", token)

    def read(self, key: str = "", token: str = "") -> Row | None:
        raw = self._run("read", key, token)
        return None if raw is None else Row(*(field.decode() for field in raw))

    def outcome(self, token: str) -> bytes | None:
        outcome: Any = self._redis.hget(self._prefix + "row:" + token, "outcome")
        return outcome  # type: ignore[no-any-return]

    def cancel(self, token: str, wait: float = 30.0) -> bool:
        return bool(self._run("cancel", token, time.time(), wait=wait))

    def pop(self, key: str) -> Row | None:
        raw = self._run("pop", key, time.time())
        return None if raw is None else Row(*(field.decode() for field in raw))

    def keys(self) -> list[str]:
        return [key.decode() for key in self._run("keys")]

    def alive(self, owner: str) -> bool:
        here = _alive_here(owner)
        if here is not None:
            return here
        return bool(self._redis.exists(f"flask_executor:lease:{owner}"))


# Redis: each operation is one Lua script (atomic). ARGV[1] is the namespace's prefix P:
# P..'keys' maps keys to tokens; P..'row:'..token is a row's hash; the zsets P..'order'
# (keyed rows, by a counter), P..'done' (finished keyed rows) and P..'gone' (finished
# popped rows), the last two by finish time.
_LUA = """
local p = ARGV[1]
local function row(t) return p .. 'row:' .. t end
local function fetch(t)
  if not t then return false end
  local r = redis.call('HMGET', row(t), 'state', 'owner', 'task')
  if not r[1] then return false end
  return {t, r[1], r[2], r[3]}
end
local function drop(t)
  local k = redis.call('HGET', row(t), 'key')
  if k and redis.call('HGET', p .. 'keys', k) == t then redis.call('HDEL', p .. 'keys', k) end
  redis.call('DEL', row(t))
  for _, set in ipairs({'order', 'done', 'gone'}) do redis.call('ZREM', p .. set, t) end
  return k
end
local function settle(t, state, outcome, now)
  local s = redis.call('HGET', row(t), 'state')
  if s ~= 'pending' and s ~= 'running' then return 0 end
  redis.call('HSET', row(t), 'state', state, 'outcome', outcome, 'finished', now)
  local popped = not redis.call('ZSCORE', p .. 'order', t)
  redis.call('ZADD', p .. (popped and 'gone' or 'done'), now, t)
  return 1
end
"""
_OPS = [
    (
        "claim",
        """
local key, max_length, ttl, now = ARGV[2], tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
for _, t in ipairs(redis.call('ZRANGEBYSCORE', p .. 'gone', '-inf', now - ARGV[9])) do drop(t) end
if ttl >= 0 then
  for _, t in ipairs(redis.call('ZRANGEBYSCORE', p .. 'done', '-inf', now - ttl)) do drop(t) end
end
if redis.call('HEXISTS', p .. 'keys', key) == 1 then return false end
local dropped = {0}
local count = redis.call('ZCARD', p .. 'order')
while max_length >= 0 and count >= max_length do
  local t, running = redis.call('ZRANGE', p .. 'done', 0, 0)[1], false
  if not t then t, running = redis.call('ZRANGE', p .. 'order', 0, 0)[1], true end
  local k = drop(t)
  if running then table.insert(dropped, k) end
  count = count - 1
end
local t = ARGV[3]
redis.call('SET', 'flask_executor:lease:' .. ARGV[4], 1, 'PX', ARGV[10])
redis.call('HSET', row(t), 'state', 'pending', 'owner', ARGV[4], 'task', ARGV[5], 'key', key)
redis.call('HSET', p .. 'keys', key, t)
redis.call('ZADD', p .. 'order', redis.call('INCR', p .. 'seq'), t)
return dropped""",
    ),
    (
        "start",
        """
local state = redis.call('HGET', row(ARGV[2]), 'state')
if state == 'pending' then redis.call('HSET', row(ARGV[2]), 'state', 'running') end
return state ~= 'cancelled' and 1 or 0""",
    ),
    ("finish", "return settle(ARGV[2], ARGV[3], ARGV[4], ARGV[5])"),
    ("forget", "drop(ARGV[2])"),
    (
        "read",
        """
if ARGV[2] ~= '' then return fetch(redis.call('HGET', p .. 'keys', ARGV[2])) end
return fetch(ARGV[3])""",
    ),
    (
        "cancel",
        """
settle(ARGV[2], 'cancelled', '', ARGV[3])
return redis.call('HGET', row(ARGV[2]), 'state') == 'cancelled' and 1 or 0""",
    ),
    (
        "pop",
        """
local t = redis.call('HGET', p .. 'keys', ARGV[2])
local r = fetch(t)
if not r then return false end
redis.call('HDEL', p .. 'keys', ARGV[2])
redis.call('HSET', row(t), 'key', 'd:' .. t)
redis.call('ZREM', p .. 'order', t)
local finished = redis.call('ZSCORE', p .. 'done', t)
redis.call('ZREM', p .. 'done', t)
redis.call('ZADD', p .. 'gone', finished or ARGV[3], t)  -- unfinished: from now (see settle)
return r""",
    ),
    (
        "keys",
        """
local keys = {}
for _, t in ipairs(redis.call('ZRANGE', p .. 'order', 0, -1)) do
  table.insert(keys, redis.call('HGET', row(t), 'key'))
end
return keys""",
    ),
]
