"""tests/waiting.py: wait_until and its async twin return the accepted value, call at least once and
once past the deadline, and time out with what was awaited, the timeout and the last value or error."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.waiting import wait_until, wait_until_async


def counter(*values):
    """A predicate returning `values` one by one (the last one from then on), counting its calls."""
    calls = []

    def predicate():
        calls.append(time.monotonic())
        return values[min(len(calls), len(values)) - 1]

    return predicate, calls


def run(coroutine):
    return asyncio.run(coroutine)


@pytest.fixture(params=["sync", "async"])
def wait(request):
    """wait_until, or wait_until_async run to completion: both behave the same."""
    if request.param == "sync":
        return wait_until
    return lambda *args, **kwargs: run(wait_until_async(*args, **kwargs))


def test_returns_the_first_truthy_value(wait):
    predicate, calls = counter(None, 0, [], {"ready": True})
    assert wait(predicate, "readiness", timeout=5, step=0.001) == {"ready": True}
    assert len(calls) == 4


def test_accept_decides_and_the_accepted_value_is_returned(wait):
    predicate, calls = counter(0, 1, 2, 3)
    assert wait(predicate, "three", timeout=5, step=0.001, accept=lambda n: n == 3) == 3
    # a falsy value can be the one awaited
    predicate, _ = counter(5, 0)
    assert wait(predicate, "zero", timeout=5, step=0.001, accept=lambda n: n == 0) == 0


def test_times_out_naming_what_the_timeout_and_the_last_value(wait):
    predicate, calls = counter(1, 2, 3)
    began = time.monotonic()
    with pytest.raises(AssertionError) as error:
        wait(predicate, "the count to reach 7", timeout=0.3, step=0.01, accept=lambda n: n == 7)
    assert time.monotonic() - began >= 0.3
    message = str(error.value)
    assert "the count to reach 7" in message and "0.3 s" in message and "the last value was 3" in message
    assert calls[-1] - began >= 0.3  # a last check at or past the deadline


def test_checks_once_with_no_time_at_all(wait):
    predicate, calls = counter(False)
    with pytest.raises(AssertionError, match="waiting for nothing"):
        wait(predicate, "nothing", timeout=0)
    assert len(calls) == 1
    predicate, calls = counter(True)
    assert wait(predicate, "at once", timeout=0) is True and len(calls) == 1


def test_without_raising_the_last_value_comes_back(wait):
    predicate, calls = counter([1], [1, 2])
    assert wait(predicate, "three items", timeout=0.1, step=0.01, accept=lambda v: len(v) == 3,
                raise_on_timeout=False) == [1, 2]
    predicate, _ = counter(False)
    assert wait(predicate, "truth", timeout=0.05, step=0.01, raise_on_timeout=False) is False


def test_ignored_errors_count_as_not_yet_and_the_last_one_is_reported(wait):
    outcomes = iter([ConnectionRefusedError("starting"), TimeoutError("slow"), "up"])

    def predicate():
        outcome = next(outcomes)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    assert wait(predicate, "the server", timeout=5, step=0.001, ignore=(OSError,)) == "up"

    def refused():
        raise ConnectionRefusedError("still starting")

    with pytest.raises(AssertionError) as error:
        wait(refused, "the server to answer", timeout=0.05, step=0.01, ignore=(OSError,))
    assert "the server to answer" in str(error.value) and "ConnectionRefusedError('still starting')" in str(error.value)
    assert isinstance(error.value.__cause__, ConnectionRefusedError)
    assert wait(refused, "the server", timeout=0.05, step=0.01, ignore=(OSError,), raise_on_timeout=False) is None


def test_other_errors_end_the_wait_at_once(wait):
    calls = []

    def broken():
        calls.append(1)
        raise KeyError("backend")

    with pytest.raises(KeyError):
        wait(broken, "a backend", timeout=5, step=0.001, ignore=(OSError,))
    assert len(calls) == 1


def test_the_async_twin_lets_the_loop_run_between_checks():
    async def scenario():
        seen = []

        async def producer():
            for n in range(5):
                await asyncio.sleep(0.01)
                seen.append(n)

        task = asyncio.ensure_future(producer())
        assert await wait_until_async(lambda: len(seen) == 5 and list(seen), "five items", timeout=5, step=0.005) \
            == [0, 1, 2, 3, 4]
        await task

    run(scenario())


def test_a_coroutine_predicate_is_refused():
    async def ready():
        return True

    with pytest.raises(TypeError, match="returned a coroutine"):
        run(wait_until_async(ready, "readiness", timeout=1))
