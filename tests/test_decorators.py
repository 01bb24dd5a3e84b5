"""process_locked: names, templates, on_contention, wrapping, methods, coroutines, generators."""

from __future__ import annotations

import asyncio
import gc
import inspect
import os
import threading

import pytest

from helpers import held_by_another_description, held_by_child, taken_elsewhere
from proclock import (
    LockHeldError,
    LockNameError,
    ProcessLock,
    _core,
    lock_path,
    process_locked,
)

MODULE = __name__


# -- one behaviour over every kind of callable --------------------------------------------------


@process_locked
def plain_function():
    """A plain function."""
    return taken_elsewhere(f"{MODULE}.plain_function")


@process_locked
async def coroutine_function():
    return taken_elsewhere(f"{MODULE}.coroutine_function")


class Box:
    def __init__(self, ident=1):
        self.id = ident

    @process_locked
    def method(self):
        return taken_elsewhere(f"{MODULE}.Box.method")

    @process_locked
    @classmethod
    def klass(cls):
        assert cls is Box
        return taken_elsewhere(f"{MODULE}.Box.klass")

    @process_locked
    @staticmethod
    def static():
        return taken_elsewhere(f"{MODULE}.Box.static")

    @process_locked
    async def amethod(self):
        return taken_elsewhere(f"{MODULE}.Box.amethod")

    @process_locked
    def other_method(self):
        return (
            taken_elsewhere(f"{MODULE}.Box.other_method"),
            taken_elsewhere(f"{MODULE}.Box.method"),
        )

    @process_locked(blocking=False, on_contention="skip")
    def shared_by_instances(self, inside=None):
        if inside is not None:
            return inside()
        return "ran"

    @process_locked("box-{self.id}", blocking=False, on_contention="skip")
    def per_instance(self, inside=None):
        if inside is not None:
            return inside()
        return "ran"


KINDS = [
    pytest.param(plain_function, f"{MODULE}.plain_function", id="function"),
    pytest.param(Box().method, f"{MODULE}.Box.method", id="method"),
    pytest.param(Box.klass, f"{MODULE}.Box.klass", id="classmethod"),
    pytest.param(Box().klass, f"{MODULE}.Box.klass", id="classmethod-via-instance"),
    pytest.param(Box.static, f"{MODULE}.Box.static", id="staticmethod"),
    pytest.param(Box().static, f"{MODULE}.Box.static", id="staticmethod-via-instance"),
    pytest.param(lambda: asyncio.run(coroutine_function()), None, id="coroutine"),
    pytest.param(lambda: asyncio.run(Box().amethod()), None, id="async-method"),
]


@pytest.mark.parametrize(("call", "name"), KINDS)
def test_body_runs_holding_the_derived_lock(lock_dir, call, name):
    assert call() is True  # inside the body, another thread cannot take the lock
    if name is not None:
        assert not taken_elsewhere(name)  # released after the call
        assert os.path.isfile(lock_path(name))  # and it was that name's file


def test_every_kind_is_contended(lock_dir):
    # A non-blocking copy of each kind, contended by an open file description of our own.
    @process_locked("k", blocking=False)
    def function():
        return "ran"

    class Kinds:
        @process_locked("k", blocking=False)
        def method(self):
            return "ran"

        @process_locked("k", blocking=False)
        @classmethod
        def klass(cls):
            return "ran"

        @process_locked("k", blocking=False)
        @staticmethod
        def static():
            return "ran"

    @process_locked("k", blocking=False)
    async def coroutine():
        return "ran"

    calls = [
        function,
        Kinds().method,
        Kinds.klass,
        Kinds.static,
        lambda: asyncio.run(coroutine()),
    ]
    for call in calls:
        assert call() == "ran"
    with held_by_another_description("k"):
        for call in calls:
            with pytest.raises(LockHeldError):
                call()


def test_one_lock_per_function(lock_dir):
    # Two methods of one class do not share a lock.
    assert Box().other_method() == (True, False)


def test_instances_share_the_method_lock(lock_dir):
    a, b = Box(1), Box(2)
    result = []
    thread_result = []

    def from_another_thread():
        t = threading.Thread(target=lambda: thread_result.append(b.shared_by_instances()))
        t.start()
        t.join(30)
        return "inner"

    result.append(a.shared_by_instances(from_another_thread))
    assert result == ["inner"]
    assert thread_result == [None]  # skipped: the other instance held the same lock
    assert b.shared_by_instances() == "ran"


def test_a_template_gives_one_lock_per_instance(lock_dir):
    a, b, a_again = Box(1), Box(2), Box(1)
    thread_result = []

    def inside():
        def run():
            thread_result.append((b.per_instance(), a_again.per_instance()))

        t = threading.Thread(target=run)
        t.start()
        t.join(30)
        return taken_elsewhere("box-1")

    assert a.per_instance(inside) is True
    assert thread_result == [("ran", None)]


# -- names --------------------------------------------------------------------------------------


def test_bare_decorator_derives_module_and_qualname(lock_dir):
    qualname = "test_bare_decorator_derives_module_and_qualname.<locals>.local"

    @process_locked
    def local():
        return taken_elsewhere(f"{MODULE}.{qualname}")

    assert local() is True


def test_closures_of_the_same_code_share_one_lock(lock_dir):
    def make(tag):
        @process_locked(blocking=False, on_contention="skip")
        def closure(inside=None):
            return inside() if inside else tag

        return closure

    first, second = make("first"), make("second")
    assert "<locals>" in first.__qualname__
    assert first(lambda: in_thread(second)) is None  # second was skipped: the same lock
    assert second() == "second"


def test_explicit_name_positionally_and_by_keyword(lock_dir):
    @process_locked("explicit")
    def positional():
        return taken_elsewhere("explicit")

    @process_locked(name="by-keyword")
    def keyword():
        return taken_elsewhere("by-keyword")

    assert positional() is True
    assert keyword() is True
    with pytest.raises(TypeError):
        process_locked("one", name="two")


def test_name_callable_receives_the_call_arguments(lock_dir):
    seen = []

    def namer(account_id, dry_run=False):
        seen.append((account_id, dry_run))
        return f"acct-{account_id}"

    @process_locked(name=namer)
    def sync(account_id, dry_run=False):
        return taken_elsewhere(f"acct-{account_id}"), taken_elsewhere("acct-other")

    assert sync(5) == (True, False)
    assert sync(6, dry_run=True) == (True, False)
    assert seen == [(5, False), (6, True)]


def test_name_callable_for_a_method_gets_self(lock_dir):
    class Account:
        ident = "a7"

        @process_locked(name=lambda self, n: f"{self.ident}-{n}")
        def work(self, n):
            return taken_elsewhere(f"a7-{n}")

    assert Account().work(3) is True


def test_name_callable_must_return_a_str(lock_dir):
    @process_locked(name=lambda: 42)
    def f():
        return "ran"

    with pytest.raises(LockNameError):
        f()


@process_locked("sync-{account_id}", blocking=False)
def sync(account_id, dry_run=False):
    """Synchronise one account."""
    return ("synced", account_id, dry_run)


def test_template_is_filled_from_the_call(lock_dir):
    assert sync(1) == ("synced", 1, False)
    with held_by_another_description("sync-1"):
        with pytest.raises(LockHeldError) as info:
            sync(1)
        assert info.value.name == "sync-1"
        with pytest.raises(LockHeldError):
            sync(account_id=1, dry_run=True)
        assert sync(2) == ("synced", 2, False)  # another account, another lock


def test_template_name_is_the_lock_name_across_processes(lock_dir):
    with held_by_child("sync-1", lock_dir) as child:
        with pytest.raises(LockHeldError) as info:
            sync(1)
        assert info.value.holder.pid == child.pid
        assert info.value.path == str(lock_path("sync-1"))
        assert sync(2) == ("synced", 2, False)
    assert sync(1) == ("synced", 1, False)


def test_template_applies_defaults(lock_dir):
    @process_locked("run-{account_id}-{dry_run}")
    def run(account_id, dry_run=False):
        return taken_elsewhere(f"run-{account_id}-{dry_run}")

    assert run(1) is True
    assert run(1, dry_run=True) is True
    assert run(dry_run=None, account_id="x") is True


def test_template_attribute_and_index_fields(lock_dir):
    class Job:
        def __init__(self, ident):
            self.id = ident

        @process_locked("job-{self.id}-{spec[name]}-{spec[tags][0]}")
        def run(self, spec):
            return taken_elsewhere(f"job-{self.id}-{spec['name']}-{spec['tags'][0]}")

    assert Job(4).run({"name": "nightly", "tags": ["a"]}) is True


def test_template_field_naming_no_parameter_fails_at_decoration():
    def f(account_id):
        return account_id

    with pytest.raises(LockNameError, match="nope"):
        process_locked("sync-{nope}")(f)
    with pytest.raises(LockNameError):
        process_locked("sync-{nope.attr}")(f)
    with pytest.raises(LockNameError):
        process_locked("sync-{0}")(f)
    with pytest.raises(LockNameError):
        process_locked("sync-{")(f)


def test_template_field_a_call_cannot_fill_fails_at_that_call(lock_dir):
    ran = []

    @process_locked("job-{job[name]}-{job.missing}")
    def run(job):
        ran.append(job)

    class Job(dict):
        missing = "m"

    run(Job(name="ok"))
    with pytest.raises(LockNameError):
        run({"name": "dict-has-no-attribute"})
    with pytest.raises(LockNameError):
        run(Job())  # no "name" key
    assert len(ran) == 1
    assert not any(s["owners"] or s["waiters"] for s in _core.snapshot().values())


def test_empty_and_nul_names_are_refused():
    with pytest.raises(LockNameError):
        process_locked("")(plain_function)
    with pytest.raises(LockNameError):
        process_locked("a\x00b")(plain_function)


def test_a_lambda_needs_an_explicit_name(lock_dir):
    with pytest.raises(LockNameError):
        process_locked(lambda: None)
    assert process_locked("named-lambda")(lambda: "ran")() == "ran"


def test_a_template_filled_to_an_empty_name_fails_at_the_call(lock_dir):
    @process_locked("{label}")
    def f(label):
        return label

    assert f("x") == "x"
    with pytest.raises(LockNameError):
        f("")


# -- on_contention ------------------------------------------------------------------------------


def test_on_contention_raise_is_the_default(lock_dir):
    ran = []
    wrapped = process_locked("c-raise", blocking=False)(lambda: ran.append(1))
    with held_by_another_description("c-raise"), pytest.raises(LockHeldError):
        wrapped()
    assert ran == []


def test_on_contention_skip_returns_none_without_running(lock_dir):
    ran = []

    @process_locked("c-skip", blocking=False, on_contention="skip")
    def f():
        ran.append(1)
        return "ran"

    with held_by_another_description("c-skip"):
        assert f() is None
    assert ran == []
    assert f() == "ran"


def test_on_contention_callable_gets_the_error_and_its_result_is_returned(lock_dir):
    seen = []

    def fallback(error):
        seen.append(error)
        return "fallback"

    @process_locked("c-call", blocking=False, on_contention=fallback)
    def f():
        return "ran"

    with held_by_child("c-call", lock_dir) as child:
        assert f() == "fallback"
    (error,) = seen
    assert isinstance(error, LockHeldError)
    assert error.name == "c-call"
    assert error.path == str(lock_path("c-call"))
    assert error.holder is not None
    assert error.holder.pid == child.pid
    assert f() == "ran"


def test_on_contention_exit(lock_dir, capsys):
    ran = []

    @process_locked("c-exit", blocking=False, on_contention="exit", exit_code=4)
    def f():
        ran.append(1)

    with held_by_child("c-exit", lock_dir) as child:
        holder = ProcessLock("c-exit").holder()
        with pytest.raises(SystemExit) as info:
            f()
    assert info.value.code == 4
    assert ran == []
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert str(child.pid) in lines[0]
    assert holder.argv
    assert holder.short_command() in lines[0]  # the holder's command line, as ps shows it


def test_on_contention_exit_defaults_to_code_1(lock_dir, capsys):
    f = process_locked("c-exit1", blocking=False, on_contention="exit")(lambda: None)
    with held_by_another_description("c-exit1"), pytest.raises(SystemExit) as info:
        f()
    assert info.value.code == 1
    assert len(capsys.readouterr().err.splitlines()) == 1


def test_on_contention_applies_to_coroutines(lock_dir):
    @process_locked("c-async", blocking=False, on_contention="skip")
    async def skipped():
        return "ran"

    @process_locked("c-async", blocking=False, on_contention=lambda e: ("fallback", e.name))
    async def fallback():
        return "ran"

    with held_by_another_description("c-async"):
        assert asyncio.run(skipped()) is None
        assert asyncio.run(fallback()) == ("fallback", "c-async")
    assert asyncio.run(skipped()) == "ran"


# -- wrapping -------------------------------------------------------------------------------------


def test_signature_name_and_docstring_are_preserved():
    assert sync.__name__ == "sync"
    assert sync.__qualname__ == "sync"
    assert sync.__doc__ == "Synchronise one account."
    assert sync.__module__ == MODULE
    assert str(inspect.signature(sync)) == "(account_id, dry_run=False)"
    assert plain_function.__doc__ == "A plain function."
    assert callable(sync.__wrapped__)
    assert inspect.iscoroutinefunction(coroutine_function)
    assert str(inspect.signature(Box().method)) == "()"
    assert str(inspect.signature(Box.klass)) == "()"


def test_wrapped_function_passes_arguments_results_and_exceptions(lock_dir):
    @process_locked("pass")
    def f(a, *args, b=2, **kwargs):
        if a == "boom":
            raise KeyError(a)
        return a, args, b, kwargs

    assert f(1, 2, 3, b=4, c=5) == (1, (2, 3), 4, {"c": 5})
    with pytest.raises(KeyError):
        f("boom")
    assert not taken_elsewhere("pass")  # released on the exception too


def test_the_decorated_function_is_reentrant_by_default(lock_dir):
    @process_locked("rec")
    def countdown(n):
        return 0 if n == 0 else 1 + countdown(n - 1)

    assert countdown(5) == 5


# -- generators -----------------------------------------------------------------------------------


@process_locked("gen")
def numbers(n):
    for i in range(n):
        yield i, taken_elsewhere("gen")


def test_generator_holds_from_first_next_to_exhaustion(lock_dir):
    g = numbers(3)
    assert not taken_elsewhere("gen")  # creating the generator takes nothing
    assert next(g) == (0, True)
    assert taken_elsewhere("gen")  # held between items
    assert list(g) == [(1, True), (2, True)]
    assert not taken_elsewhere("gen")  # exhausted: released


def test_generator_close_releases(lock_dir):
    g = numbers(3)
    next(g)
    assert taken_elsewhere("gen")
    g.close()
    assert not taken_elsewhere("gen")


def test_generator_garbage_collection_releases(lock_dir):
    g = numbers(3)
    next(g)
    assert taken_elsewhere("gen")
    del g
    gc.collect()
    assert not taken_elsewhere("gen")


def test_generator_never_started_holds_nothing(lock_dir):
    g = numbers(3)
    del g
    gc.collect()
    assert not taken_elsewhere("gen")


def test_generator_send_throw_and_return_value_pass_through(lock_dir):
    @process_locked("gen-send")
    def echo():
        received = yield "ready"
        while received != "stop":
            try:
                received = yield received * 2
            except ValueError:
                received = yield "caught"
        return "done"

    g = echo()
    assert next(g) == "ready"
    assert g.send(2) == 4
    assert g.throw(ValueError()) == "caught"
    with pytest.raises(StopIteration) as info:
        g.send("stop")
    assert info.value.value == "done"
    assert not taken_elsewhere("gen-send")


def test_generator_contention(lock_dir):
    @process_locked("gen-busy", blocking=False, on_contention="skip")
    def items():
        yield 1

    @process_locked("gen-busy", blocking=False)
    def raising():
        yield 1

    with held_by_another_description("gen-busy"):
        assert list(items()) == []
        g = raising()
        with pytest.raises(LockHeldError):
            next(g)


@process_locked("agen")
async def async_numbers(n):
    for i in range(n):
        await asyncio.sleep(0)
        yield i, taken_elsewhere("agen")


def test_async_generator_holds_from_first_anext_to_exhaustion(lock_dir):
    async def main():
        g = async_numbers(3)
        assert not taken_elsewhere("agen")
        assert await g.__anext__() == (0, True)
        assert taken_elsewhere("agen")
        assert [x async for x in g] == [(1, True), (2, True)]
        assert not taken_elsewhere("agen")

    asyncio.run(main())


def test_async_generator_aclose_releases(lock_dir):
    async def main():
        g = async_numbers(3)
        await g.__anext__()
        assert taken_elsewhere("agen")
        await g.aclose()
        assert not taken_elsewhere("agen")

    asyncio.run(main())


def test_async_generator_garbage_collection_releases(lock_dir):
    async def main():
        g = async_numbers(3)
        await g.__anext__()
        assert taken_elsewhere("agen")
        del g
        gc.collect()
        # The loop's finaliser hook schedules aclose(); let it run.
        for _ in range(10):
            await asyncio.sleep(0)
        assert not taken_elsewhere("agen")

    asyncio.run(main())


def test_async_generator_asend_and_athrow_pass_through(lock_dir):
    @process_locked("agen-send")
    async def echo():
        received = yield "ready"
        while received != "stop":
            try:
                received = yield received * 2
            except ValueError:
                received = yield "caught"

    async def main():
        g = echo()
        assert await g.asend(None) == "ready"
        assert await g.asend(3) == 6
        assert await g.athrow(ValueError()) == "caught"
        with pytest.raises(StopAsyncIteration):
            await g.asend("stop")
        assert not taken_elsewhere("agen-send")

    asyncio.run(main())


# -- shared ---------------------------------------------------------------------------------------


@process_locked("rw", shared=True, blocking=False)
def read(inside=None):
    return inside() if inside else "read"


@process_locked("rw", blocking=False)
def write(inside=None):
    return inside() if inside else "written"


def in_thread(call):
    result = []

    def run():
        try:
            result.append(call())
        except LockHeldError as error:
            result.append(error)

    t = threading.Thread(target=run)
    t.start()
    t.join(30)
    return result[0]


def test_readers_share_and_a_writer_excludes_them(lock_dir):
    def while_reading():
        return in_thread(read), in_thread(write)

    other_reader, writer = read(while_reading)
    assert other_reader == "read"
    assert isinstance(writer, LockHeldError)

    def while_writing():
        return in_thread(read), in_thread(write)

    reader, other_writer = write(while_writing)
    assert isinstance(reader, LockHeldError)
    assert isinstance(other_writer, LockHeldError)


def test_readers_share_with_another_process(lock_dir):
    with held_by_child("rw", lock_dir, shared=True):
        assert read() == "read"
        with pytest.raises(LockHeldError):
            write()
    with held_by_child("rw", lock_dir), pytest.raises(LockHeldError):
        read()


@pytest.mark.parametrize("decorator", [process_locked, process_locked("named")])
def test_decorating_a_class_says_to_decorate_a_method(decorator):
    class Job:
        def run(self):
            pass

    with pytest.raises(TypeError, match=r"not a class \(.*Job\): decorate the method"):
        decorator(Job)
