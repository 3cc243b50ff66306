"""Background tasks for Flask apps, on a thread, process or gevent pool, in one module.

``executor.submit(fn, *args)`` returns a :class:`concurrent.futures.Future` at once and
runs ``fn`` with a copy of the Flask contexts it was submitted from. A rewrite of
Flask-Executor 1.0 (MIT): code written for 1.0 keeps working. This file can be vendored.

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
"""

from __future__ import annotations

import abc
import collections
import concurrent.futures
import contextlib
import contextvars
import functools
import inspect
import itertools
import logging
import multiprocessing
import os
import pickle
import re
import sys
import threading
import types
import weakref
from concurrent.futures import Future
from typing import Any, Callable, Iterable, Iterator, Optional, TypeVar

from flask import Flask
from flask.ctx import AppContext
from flask.globals import _cv_app
from flask.signals import appcontext_popped, appcontext_pushed

__version__ = "2.0.0"
__all__ = [
    "BACKENDS",
    "Backend",
    "Config",
    "Executor",
    "ExecutorJob",
    "FutureCollection",
    "GeventBackend",
    "ProcessBackend",
    "ThreadBackend",
    "register_backend",
]

T = TypeVar("T")
_MISSING: Any = object()  # no future_key was given positionally
Task = Callable[..., Any]
Callback = Callable[[Future[Any]], object]


# -- 1. Configuration --------------------------------------------------------------

_KEYS = [
    "EXECUTOR_TYPE",
    "EXECUTOR_MAX_WORKERS",
    "EXECUTOR_FUTURES_MAX_LENGTH",
    "EXECUTOR_PROPAGATE_EXCEPTIONS",
    "EXECUTOR_PUSH_APP_CONTEXT",
    "EXECUTOR_START_METHOD",
]
_TRUE = {"1", "true", "t", "yes", "y", "on"}
_FALSE = {"0", "false", "f", "no", "n", "off"}


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
        return os.environ.get(full, default)

    def number(self, key: str, default: int | None) -> int | None:
        """A whole number >= 1, or None; strings such as ``'5'`` are accepted."""
        value = self.get(key, default)
        if value is None or str(value).strip().lower() in ("", "none"):
            return None
        try:
            number = int(str(value).strip())  # rejects floats and bools, whose str() is no int
        except ValueError:
            number = 0
        if number < 1:
            raise ValueError(
                f"{self.prefix}{key} must be a whole number >= 1 or None, got {value!r}"
            )
        return number

    def flag(self, key: str, default: bool) -> bool:
        """A bool; strings such as ``'true'``, ``'0'``, ``'off'`` are accepted."""
        value = self.get(key, default)
        text = str(value).strip().lower()
        if isinstance(value, bool) or text in _TRUE | _FALSE:
            return text in _TRUE
        raise ValueError(
            f"{self.prefix}{key} must be a bool (true/false, 1/0, yes/no, on/off), got {value!r}"
        )

    def backend(self) -> Backend:
        """The backend named by EXECUTOR_TYPE (or the Backend object given there)."""
        value = self.get("EXECUTOR_TYPE", "thread")
        if isinstance(value, Backend):
            return value
        backend = BACKENDS.get(str(value).strip().lower())
        if backend is None:
            names = ", ".join(repr(name) for name in sorted(BACKENDS))
            raise ValueError(
                f"{self.prefix}EXECUTOR_TYPE={value!r} is not a known executor type; "
                f"choose one of {names}, pass a Backend object, or call register_backend()"
            )
        return backend


# -- 2. Backends -------------------------------------------------------------------


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


class ThreadBackend(Backend):
    """Tasks on a :class:`concurrent.futures.ThreadPoolExecutor`, with Flask contexts."""

    def create_pool(self, max_workers: int | None, config: Config) -> concurrent.futures.Executor:
        prefix = f"{config.app.name}-{config.prefix}executor"
        return concurrent.futures.ThreadPoolExecutor(max_workers, thread_name_prefix=prefix)


class ProcessBackend(Backend):
    """Tasks on a :class:`concurrent.futures.ProcessPoolExecutor`: no contexts, pickled calls.

    EXECUTOR_START_METHOD picks how worker processes start: ``'spawn'`` (the default: a fresh
    interpreter, safe whatever threads or forks the web process has), ``'forkserver'`` or
    ``'fork'`` (fastest; workers inherit a copy of the web process as it was).
    """

    contexts = False

    def create_pool(self, max_workers: int | None, config: Config) -> concurrent.futures.Executor:
        method = str(config.get("EXECUTOR_START_METHOD", "spawn")).strip().lower()
        if method not in multiprocessing.get_all_start_methods():
            raise ValueError(
                f"{config.prefix}EXECUTOR_START_METHOD={method!r} is not a start method on this "
                f"platform; choose one of {multiprocessing.get_all_start_methods()}"
            )
        return _ProcessPool(max_workers, mp_context=multiprocessing.get_context(method))


class _ProcessPool(concurrent.futures.ProcessPoolExecutor):
    """A process pool that refuses, with the reason, what cannot reach a worker process."""

    def __init__(self, max_workers: int | None, mp_context: Any) -> None:
        super().__init__(max_workers, mp_context=mp_context, initializer=_exit_with_owner)
        # The pool pickles calls in its queue's feeder thread and fails the future with the
        # bare pickling error; name the object that failed instead (CPython 3.9+ hook).
        queue: Any = self._call_queue  # type: ignore[attr-defined]
        queue._on_queue_feeder_error = functools.partial(
            _name_unpicklable, queue._on_queue_feeder_error
        )

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        name = getattr(fn, "__qualname__", "")
        if "<lambda>" in name or "<locals>" in name:
            raise TypeError(_unpicklable(fn, "a lambda or nested function has no importable name"))
        if isinstance(getattr(fn, "__self__", None), Flask):
            raise TypeError(_unpicklable(fn, "it is a bound method of the Flask app"))
        return super().submit(_in_fresh_context, fn, *args, **kwargs)


def _exit_with_owner() -> None:
    """Each worker's initializer: exit soon after the process owning the pool dies (a
    gunicorn worker killed on --timeout), instead of waiting on its queue forever."""
    owner = multiprocessing.parent_process()
    if owner is not None:
        threading.Thread(target=_exit_when_gone, args=(owner,), daemon=True).start()


def _exit_when_gone(owner: multiprocessing.process.BaseProcess) -> None:
    owner.join()  # returns once the owner's end of the sentinel pipe is closed
    os._exit(1)


def _in_fresh_context(fn: Task, /, *args: Any, **kwargs: Any) -> Any:
    """Run a process task in empty context variables (a worker started by fork holds a copy
    of whatever request was active in the thread that forked it: not the task's), and make
    sure what it returns or raises can reach the web process."""
    from multiprocessing.reduction import ForkingPickler

    try:
        result = contextvars.Context().run(fn, *args, **kwargs)
    except BaseException as exc:
        try:
            pickle.loads(ForkingPickler.dumps(exc))
        except Exception as why:  # it would fail in the pool's thread and break the pool
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


def _name_unpicklable(
    report: Callable[[BaseException, Any], None], exc: BaseException, item: Any
) -> None:
    """The call queue's feeder error hook: fail the future with an error naming the culprit."""
    from multiprocessing.reduction import ForkingPickler

    parts = [*getattr(item, "args", ()), *getattr(item, "kwargs", {}).values()]
    for culprit in parts:  # the task first, then its arguments
        try:
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


class GeventBackend(Backend):
    """Tasks as greenlets in a ``gevent.pool.Pool``, for apps served by gevent."""

    def create_pool(self, max_workers: int | None, config: Config) -> concurrent.futures.Executor:
        try:
            import gevent.pool  # noqa: F401
        except ImportError as exc:
            raise ImportError("EXECUTOR_TYPE='gevent' needs gevent: pip install gevent") from exc
        return _GeventExecutor(max_workers)


class _GeventExecutor(concurrent.futures.Executor):
    """A ``gevent.pool.Pool`` behind the Executor interface; ``submit`` never blocks."""

    def __init__(self, max_workers: int | None) -> None:
        import gevent.pool

        self._get_hub = gevent.get_hub
        self._getcurrent = gevent.getcurrent
        self._pool = gevent.pool.Pool(max_workers)
        # Tasks that found every slot busy, oldest first: a full Pool.spawn would block.
        self._waiting: collections.deque[tuple[Any, ...]] = collections.deque()
        self._shutdown = False

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        future = _GeventFuture()
        future._hub = self._get_hub()  # the hub whose loop will run the greenlet
        if self._pool.full():
            self._waiting.append((future, fn, args, kwargs))
        else:
            self._spawn((future, fn, args, kwargs))
        return future

    def _spawn(self, task: tuple[Any, ...]) -> None:
        greenlet = self._pool.spawn(_run_in_future, *task)
        if self._pool.size is not None:
            greenlet.rawlink(self._start_next)  # runs after the pool has freed the slot

    def _start_next(self, _greenlet: object) -> None:
        if self._waiting:
            self._spawn(self._waiting.popleft())

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        if wait and self._getcurrent() in self._pool.greenlets:
            raise RuntimeError(
                "cannot join current greenlet: shutdown(wait=True) was called from one of this "
                "executor's own tasks, which would wait for itself; use shutdown(wait=False)"
            )
        self._shutdown = True
        if cancel_futures:
            for greenlet in list(self._pool):  # spawned, not started: cancel() succeeds
                if greenlet.args:  # gevent drops args once a greenlet has run
                    greenlet.args[0].cancel()
            while self._waiting:
                self._waiting.popleft()[0].cancel()
        while wait and (self._pool or self._waiting):
            self._pool.join()


def _run_in_future(future: Future[Any], fn: Task, args: tuple[Any, ...], kwargs: Any) -> None:
    if not future.set_running_or_notify_cancel():
        return
    try:
        result = fn(*args, **kwargs)
    except BaseException as exc:
        future.set_exception(exc)
        future = None  # type: ignore[assignment]  # the traceback holds this frame: no cycle
    else:
        future.set_result(result)


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


# -- 3. Contexts -------------------------------------------------------------------


# What a task keeps of its submitter, captured at submit (kept to a tuple: submit is the
# request path): (app, a copy of the context variables, a copy of g's attributes or None,
# whether to push a fresh app context, the task itself, the process that submitted it).
Captured = tuple[Flask, contextvars.Context, Optional[dict[str, Any]], bool, Task, int]


def _run_task(captured: Captured, /, *args: Any, **kwargs: Any) -> Any:
    """Run a task in the captured variables (entered once: a task runs once)."""
    app, context, g_attrs, push, fn, _ = captured
    return context.run(_in_app_context, app, g_attrs, push, True, fn, args, kwargs)


def _run_callback(captured: Captured, fn: Callback, future: Future[Any]) -> None:
    """Run a done-callback as its task ran; any exception is logged, never raised: a
    SystemExit raised here would end the pool's thread, and every task queued behind it."""
    app, context, g_attrs, push, task, _ = captured
    try:
        context.copy().run(_in_app_context, app, g_attrs, push, False, fn, (future,), {})
    except BaseException:
        app.logger.exception("done-callback %r of background task %s raised", fn, _task_name(task))


def _task_name(fn: object) -> str:
    """How errors name a task: ``module.qualname``, else its repr (a partial, an object)."""
    name = getattr(fn, "__qualname__", None)
    return f"{getattr(fn, '__module__', None)}.{name}" if isinstance(name, str) else repr(fn)


def _in_app_context(
    app: Flask,
    g_attrs: dict[str, Any] | None,
    push: bool,
    teardown: bool,
    fn: Task,
    args: Any,
    kwargs: Any,
) -> Any:
    """Call fn in a fresh app context of app, its g filled from g_attrs.

    Runs in the submitter's copied variables, where ``_cv_app`` still holds its context.
    Pushed and popped as Flask does (signals; a nested ``with`` of the same context inside
    the task tears nothing down), but teardown functions run only if ``teardown`` (once per
    task, not again for each of its done-callbacks).
    """
    if not push:
        return fn(*args, **kwargs)
    app_ctx = _fresh_context(app, _cv_app.get(None))
    if g_attrs:
        app_ctx.g.__dict__.update(g_attrs)
    _enter(app_ctx)
    error: BaseException | None = None
    try:
        if appcontext_pushed.receivers:
            appcontext_pushed.send(app, _async_wrapper=app.ensure_sync)
        return fn(*args, **kwargs)
    except BaseException as exc:
        error = exc
        raise
    finally:
        try:
            if teardown:
                _teardown(app_ctx, error)
        finally:
            error = None  # the traceback holds this frame: no cycle keeping the task alive
            _leave(app_ctx)
            if appcontext_popped.receivers:
                appcontext_popped.send(app, _async_wrapper=app.ensure_sync)


# Pushing a task's context. Flask's own push() and pop() would, on Flask 3.2, route the
# request again, run its teardown_request functions and close its uploaded files: those
# belong to the view. So the task's context is entered as push() does it, which needs the
# private bookkeeping of the installed Flask, detected here (a test fails if Flask moves it):
# up to 3.1 AppContext keeps a list of tokens and the request rides in its own context
# variable; from 3.2 (AppContext.has_request) the app context holds the request itself.
_MERGED_CONTEXTS = hasattr(AppContext, "has_request")


def _fresh_context(app: Flask, submitter: AppContext | None) -> AppContext:
    """A new app context of app; on 3.2 with the submitter's request and session."""
    if _MERGED_CONTEXTS and submitter is not None and submitter.app is app:
        return submitter.copy()  # type: ignore[attr-defined,no-any-return,unused-ignore]
    return app.app_context()


def _enter(ctx: Any) -> None:
    if _MERGED_CONTEXTS:
        ctx._cv_token, ctx._push_count = _cv_app.set(ctx), 1
    else:
        ctx._cv_tokens.append(_cv_app.set(ctx))


def _leave(ctx: Any) -> None:
    if _MERGED_CONTEXTS:
        _cv_app.reset(ctx._cv_token)
        ctx._cv_token, ctx._push_count = None, 0
    else:
        _cv_app.reset(ctx._cv_tokens.pop())


def _teardown(ctx: Any, error: BaseException | None) -> None:
    if _MERGED_CONTEXTS:  # do_teardown_appcontext(ctx, exc) from 3.2
        ctx.app.do_teardown_appcontext(ctx, error)
    else:
        ctx.app.do_teardown_appcontext(error)


class _ContextFuture(Future):  # type: ignore[type-arg]
    """A Future whose done-callbacks run inside its task's Flask contexts, and whose
    exception, if nobody ever reads it, is logged when the future is dropped (as asyncio)."""

    _captured: Captured | None = None
    _retrieved = False  # result() or exception() has returned the outcome to someone

    def add_done_callback(self, fn: Callback) -> None:
        if self._captured is not None:
            fn = functools.partial(_run_callback, self._captured, fn)
        super().add_done_callback(fn)

    def result(self, timeout: float | None = None) -> Any:
        return self._read(Future.result, timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        return self._read(Future.exception, timeout)  # type: ignore[no-any-return]

    def _read(self, read: Callable[[Future[Any], float | None], Any], timeout: float | None) -> Any:
        """result() or exception(): a timeout names the task; the outcome counts as read."""
        try:
            return read(self, self._wait(timeout))
        except concurrent.futures.TimeoutError:
            raise concurrent.futures.TimeoutError(self._late(timeout)) from None
        finally:
            self._retrieved = self._retrieved or self._state == "FINISHED"

    def _wait(self, timeout: float | None) -> float | None:
        """What is left of ``timeout`` for the blocking wait (the gevent future waits first)."""
        return timeout

    def _late(self, timeout: float | None) -> str:
        task = _task_name(self._captured[4]) if self._captured else "the task"
        return f"background task {task} did not finish within {timeout} s (it goes on running)"

    def __del__(self) -> None:
        if self._exception is None or self._retrieved or self._captured is None:
            return
        if self._captured[5] != _pid:  # a copy a forked child inherited: the parent's to read
            return
        app, task = self._captured[0], self._captured[4]
        with contextlib.suppress(Exception):  # logging may be torn down at interpreter exit
            app.logger.error(
                "background task %s raised an exception that was never retrieved: read "
                "future.result() or future.exception(), or set EXECUTOR_PROPAGATE_EXCEPTIONS",
                _task_name(task),
                exc_info=self._exception,
            )


# 1.0's futures were proxies, and real code reads the future behind one by this name.
setattr(_ContextFuture, "__proxied_object", property(lambda future: future))


class _GeventFuture(_ContextFuture):
    """A Future a greenlet can wait on without blocking its hub, patched or not."""

    _hub: Any = None
    _event: Any = None  # one gevent Event, set when done: polling adds nothing per call

    def _wait(self, timeout: float | None) -> float | None:
        import gevent

        if self.done() or gevent.get_hub() is not self._hub:
            return timeout  # another thread's waits block only that thread
        if self._event is None:
            import gevent.event

            self._event = event = gevent.event.Event()
            Future.add_done_callback(self, lambda _: event.set())
        self._event.wait(timeout)
        return 0


# -- 4. Futures --------------------------------------------------------------------


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
        self._lock = threading.RLock()  # guards _futures; re-entrant for tasks run inline
        self._logger = logger or logging.getLogger(__name__)

    def add(self, future_key: Any, future: Future[Any]) -> None:
        """Store ``future``; ValueError if ``future_key`` is taken."""
        self._store(future_key, lambda: future)

    def _store(self, future_key: Any, make: Callable[[], Future[T]]) -> Future[T]:
        with self._lock:
            if future_key in self._futures:
                raise ValueError(
                    f"future_key {future_key!r} already exists: pop it first or use another key"
                )
            future = make()
            while self.max_length is not None and len(self._futures) >= self.max_length:
                self._evict()  # before adding: len never exceeds the bound
            self._futures[future_key] = future
            return future

    def _evict(self) -> None:
        key = next((key for key, future in self._futures.items() if future.done()), None)
        if key is None:  # all still running: drop the oldest, as 1.0 did, but say so
            key = next(iter(self._futures))
            self._logger.warning(
                "futures dict full (%s futures, EXECUTOR_FUTURES_MAX_LENGTH): dropped the "
                "stored future %r while its task is still running (the task goes on); "
                "raise EXECUTOR_FUTURES_MAX_LENGTH or pop futures once read",
                self.max_length,
                key,
            )
        del self._futures[key]

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
        with self._lock:
            return list(self._futures.values())

    def items(self) -> list[tuple[Any, Future[Any]]]:
        with self._lock:
            return list(self._futures.items())

    def __iter__(self) -> Iterator[Any]:
        return iter(self.keys())

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name.startswith("__"):
            raise AttributeError(name)

        def by_key(future_key: Any, *args: Any, **kwargs: Any) -> Any:
            future = self._futures.get(future_key)
            if future is None:
                return None
            value = getattr(future, name)
            return value(*args, **kwargs) if callable(value) else value

        return by_key


# -- 5. The extension --------------------------------------------------------------

# A pool belongs to one process: its threads, queues and worker processes do not survive a
# fork (gunicorn --preload builds the app in its master, then forks the workers). Each app's
# state records the process it built its pool in; a forked child builds its own on first use.
_pid = os.getpid()  # this process, kept current by the fork hook below: a cheap check
_fork_lock = threading.Lock()  # guards giving a state its own pool in a forked child


def _after_fork_in_child() -> None:
    global _pid, _fork_lock
    _pid = os.getpid()
    _fork_lock = threading.Lock()  # another thread may have held it at the fork
    forkserver = sys.modules.get("multiprocessing.forkserver")
    if forkserver is not None:  # the parent's fork server is not this process's child
        server: Any = getattr(forkserver, "_forkserver")  # noqa: B009
        preload = server._preload_modules
        server.__init__()  # forgets it, in place (the module's functions are bound to it)
        server._preload_modules = preload


if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork
    os.register_at_fork(after_in_child=_after_fork_in_child)


class _AppState:
    """One app's side of an Executor: its settings, pool and futures dict, in one process."""

    def __init__(self, executor: Executor, app: Flask) -> None:
        config = Config(app, executor.name)
        self.app = app
        self.executor = executor
        self.backend = config.backend()
        self.contexts = self.backend.contexts
        max_workers = config.number("EXECUTOR_MAX_WORKERS", None)
        max_length = config.number("EXECUTOR_FUTURES_MAX_LENGTH", 50)
        self.propagate = config.flag("EXECUTOR_PROPAGATE_EXCEPTIONS", False)
        self.push = config.flag("EXECUTOR_PUSH_APP_CONTEXT", True)
        self.max_workers = max_workers
        self.max_length = max_length
        self.config = config
        self._shutdown = False
        self.own_pool()  # built now, so a bad config fails at init_app, before app changes
        used = [config.get("EXECUTOR_TYPE", "thread"), max_workers, max_length]
        method = config.get("EXECUTOR_START_METHOD", "spawn")
        for key, value in zip(_KEYS, [*used, self.propagate, self.push, method]):  # _KEYS' order
            app.config.setdefault(config.prefix + key, value)

    def own_pool(self) -> None:
        """Give this process its own pool, futures dict and lock (at init, and after a fork).

        The parent's are left untouched: their threads and pipes belong to the parent.
        """
        self.pool = self.backend.create_pool(self.max_workers, self.config)
        self.futures = FutureCollection(self.max_length, self.app.logger)
        self._pool_lock = threading.Lock()  # guards replacing a broken pool
        self.pid = _pid
        if self._shutdown:  # shut down before the fork: stays shut down in the child
            self.pool.shutdown(wait=False)

    def start(self, fn: Task, args: tuple[Any, ...], kwargs: Any) -> Future[Any]:
        """Submit one task to the pool, replacing the pool once if it is broken."""
        if not callable(fn):
            raise TypeError(f"submit() needs a callable, got {fn!r} ({type(fn).__name__})")
        app_ctx = _cv_app.get(None)
        g_attrs = app_ctx.g.__dict__.copy() if self.push and app_ctx is not None else None
        # the copied variables hold the request, the session and the caller's own variables
        captured = (self.app, contextvars.copy_context(), g_attrs, self.push, fn, _pid)
        if self.contexts:
            fn, args = _run_task, (captured, *args)
        pool = self.pool
        try:
            future = pool.submit(fn, *args, **kwargs)
        except concurrent.futures.BrokenExecutor:
            future = self._replace_broken(pool).submit(fn, *args, **kwargs)
        if type(future) is Future:
            future.__class__ = _ContextFuture
        future._captured = captured  # type: ignore[attr-defined]  # for its callbacks
        return future

    def attach_callbacks(self, future: Future[T], fn: Task) -> Future[T]:
        callbacks: list[Callback] = list(self.executor._default_callbacks)
        if self.propagate:
            callbacks.insert(0, functools.partial(_log_failure, self.app, fn))
        captured = future._captured  # type: ignore[attr-defined]
        for callback in callbacks:
            if not isinstance(future, _ContextFuture):  # another pool's future: wrap it here
                callback = functools.partial(_run_callback, captured, callback)
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
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Read this executor's config from ``app`` and give ``app`` its own pool.

        Again on the same app (or another executor of the same name), the new one replaces
        the old, as in 1.0, with a warning; the old pool finishes its queued tasks and stops.
        """
        app = getattr(app, "_get_current_object", lambda: app)()  # current_app works too
        state = _AppState(self, app)  # may raise: the app is left as it was
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

        1.0's keyword form ``submit(fn=task, ...)`` works too.
        """
        if fn is None:
            fn = kwargs.pop("fn", None)
        state = self._state()
        future = state.start(fn, args, kwargs)
        if state.propagate or self._default_callbacks:
            state.attach_callbacks(future, fn)
        return future

    def submit_stored(
        self,
        future_key: Any = _MISSING,
        fn: Callable[..., T] | None = None,
        /,
        *args: Any,
        **kwargs: Any,
    ) -> Future[T]:
        """Like submit, and keep the Future in ``executor.futures`` under ``future_key``.

        1.0's keyword form ``submit_stored(future_key=key, fn=task, ...)`` works too.
        """
        if future_key is _MISSING:
            if "future_key" not in kwargs:
                raise TypeError("submit_stored() needs a future_key: submit_stored(key, fn, ...)")
            future_key = kwargs.pop("future_key")
        if fn is None:
            fn = kwargs.pop("fn", None)
        state = self._state()
        future = state.futures._store(future_key, lambda: state.start(fn, args, kwargs))
        return state.attach_callbacks(future, fn)

    def map(
        self,
        fn: Callable[..., T],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
    ) -> Iterator[T]:
        """Like :meth:`concurrent.futures.Executor.map`; each call gets its own contexts."""
        if chunksize < 1:
            raise ValueError(f"chunksize must be >= 1, got {chunksize!r}")
        if chunksize == 1:
            return super().map(fn, *iterables, timeout=timeout)
        chunks = _chunks(zip(*iterables), chunksize)
        results = super().map(_run_chunk, itertools.repeat(fn), chunks, timeout=timeout)
        return itertools.chain.from_iterable(results)

    def job(self, fn: Callable[..., T]) -> ExecutorJob:
        """Decorator: ``fn.submit(...)``, ``fn.submit_stored(key, ...)``, ``fn.map(...)``."""
        return ExecutorJob(self, fn)

    def add_default_done_callback(self, fn: Callback) -> None:
        """Attach ``fn`` to every Future this executor creates from now on."""
        self._default_callbacks.append(fn)

    @property
    def futures(self) -> FutureCollection:
        """The futures dict of ``current_app`` (else of the only app)."""
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
    exc = future.exception()
    if exc is not None:
        raise exc


_one_zero: dict[str, dict[str, object]] = {
    "executor": {
        "Executor": Executor,
        "ExecutorJob": ExecutorJob,
        "propagate_exceptions_callback": propagate_exceptions_callback,
    },
    "futures": {"FutureCollection": FutureCollection, "Future": Future},
}
for _name, _names in _one_zero.items():
    _module = types.ModuleType(f"{__name__}.{_name}")
    vars(_module).update(_names)
    sys.modules.setdefault(_module.__name__, _module)
    globals()[_name] = sys.modules[_module.__name__]
del _name, _names, _module, _one_zero
