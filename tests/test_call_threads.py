"""runtime/call_threads.py: the threads a replica runs the user's sync code in, with ThreadPoolExecutor's semantics."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from opbox.runtime.call_threads import CallThreads


def test_one_thread_runs_every_call_in_order():
    async def main():
        threads = CallThreads(1, "one")
        seen = []
        results = await asyncio.gather(*(threads.run(lambda i=i: seen.append((i, threading.get_ident())) or i * 2)
                                         for i in range(50)))
        threads.shutdown()
        return results, seen

    results, seen = asyncio.run(main())
    assert results == [i * 2 for i in range(50)]
    assert [i for i, _ in seen] == list(range(50)) and len({ident for _, ident in seen}) == 1
    assert threading.get_ident() not in {ident for _, ident in seen}


def test_at_most_size_threads_run_at_once():
    async def main():
        threads = CallThreads(3, "three")
        together = threading.Barrier(3, timeout=30)  # passes only when three calls run at once
        running, peak, lock = [0], [0], threading.Lock()

        def work(first: bool):
            with lock:
                running[0] += 1
                peak[0] = max(peak[0], running[0])
            if first:
                together.wait()
            with lock:
                running[0] -= 1
            return threading.current_thread().name

        names = await asyncio.gather(*(threads.run(work, n < 3) for n in range(12)))
        threads.shutdown()
        return peak[0], set(names), threads.threads

    peak, names, started = asyncio.run(main())
    assert peak == 3 and started == 3 and names == {"three_0", "three_1", "three_2"}


def test_an_idle_thread_is_reused_before_another_starts():
    async def main():
        threads = CallThreads(8, "reuse")
        for _ in range(20):  # one call at a time: the first thread takes each
            await threads.run(time.sleep, 0)
        threads.shutdown()
        return threads.threads

    assert asyncio.run(main()) == 1


def test_exceptions_reach_the_caller():
    class Broken(Exception):
        pass

    def broken():
        raise Broken("no")

    async def main():
        threads = CallThreads(2, "errors")
        with pytest.raises(Broken, match="no"):
            await threads.run(broken)
        with pytest.raises(RuntimeError, match="StopIteration") as raised:  # an asyncio future refuses StopIteration
            await threads.run(next, iter(()))
        assert isinstance(raised.value.__cause__, StopIteration)
        assert await threads.run(next, iter(()), "end") == "end"
        threads.shutdown()
        with pytest.raises(RuntimeError, match="shut down"):
            threads.run(time.sleep, 0)

    asyncio.run(main())


def test_a_caller_that_went_away_leaves_the_threads_working():
    async def main():
        threads = CallThreads(1, "cancel")
        slow = threads.run(time.sleep, 0.05)
        slow.cancel()
        assert await threads.run(lambda: "next") == "next"  # after the cancelled call finished in its thread
        threads.shutdown()

    asyncio.run(main())
