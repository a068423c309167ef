"""The engine thread: the model loads on the thread that later runs the engine loop.

libgomp keeps one OpenMP pool per thread that runs parallel regions; a second pool (model
loaded on the main thread, stepped on another) makes it stop spinning between regions, and
every decode step then pays ~150 futex wake-ups (engine_thread.py).
"""

from __future__ import annotations

import asyncio
import threading

import pytest

from pesc_serve import launcher
from pesc_serve.allocator import freeze_startup_objects, keep_freed_buffers
from pesc_serve.config import EngineConfig, LoadConfig, ServerConfig
from pesc_serve.engine.engine_thread import EngineThread
from pesc_serve.engine.request import SamplingParams


def test_tasks_run_in_order_on_one_thread_and_errors_come_back():
    thread = EngineThread()
    order: list[int] = []
    idents = [thread.submit(lambda i=i: (order.append(i), threading.get_ident())[1]) for i in range(5)]
    assert len({f.result(timeout=10) for f in idents}) == 1 and order == list(range(5))
    assert idents[0].result() != threading.get_ident()
    with pytest.raises(ValueError, match="bad model"):
        thread.call(lambda: (_ for _ in ()).throw(ValueError("bad model")))
    thread.stop()


def test_the_engine_loop_runs_on_the_thread_that_loaded_the_model(tiny_checkpoint_factory, monkeypatch):
    seen: list[tuple[str, int]] = []
    real_build = launcher.build_engine

    def build_spy(*args):
        seen.append(("load", threading.get_ident()))
        return real_build(*args)

    monkeypatch.setattr(launcher, "build_engine", build_spy)
    server = launcher.build_server(
        LoadConfig(model=str(tiny_checkpoint_factory("camelidae")), dtype="float32", device="cpu"),
        EngineConfig(max_num_seqs=2, max_model_len=64, kv_cache_memory_gb=0.01),
        ServerConfig(),
    )
    engine = server.engine.engine
    real_step = engine.step

    def step_spy():
        seen.append(("step", threading.get_ident()))
        return real_step()

    engine.step = step_spy

    async def serve_one() -> None:
        server.engine.start()
        async for _ in server.engine.generate("r", [5, 9, 33], SamplingParams(max_tokens=3, temperature=0)):
            pass
        await server.engine.shutdown()

    asyncio.run(serve_one())
    assert seen[0][0] == "load" and any(kind == "step" for kind, _ in seen)
    assert {ident for _, ident in seen} == {seen[0][1]} != {threading.main_thread().ident}
    assert not server.engine.is_healthy  # shut down


def test_allocator_tuning_applies_on_glibc():
    assert keep_freed_buffers() is True  # the CI machine runs glibc


def test_startup_objects_leave_the_cyclic_gcs_reach():
    import gc

    class Node:
        def __init__(self) -> None:
            self.me = self  # a cycle: only the cyclic GC could ever free it

    keep = Node()
    try:
        assert freeze_startup_objects() > 0
        assert not any(o is keep for o in gc.get_objects())  # frozen objects are not tracked by generations
    finally:
        gc.unfreeze()
    assert any(o is keep for o in gc.get_objects())
