"""The engine replica: one pesc-serve engine and its FastAPI app in one Ray actor process.

Requests arrive from the ingress as :class:`HTTPCall` objects and are replayed into the app
``python -m pesc_serve`` serves.  Serve allows one ``@serve.ingress`` FastAPI deployment per
application and the ingress is that one, so the replica runs the app's lifespan itself: it
enters it once the engine is built (starting the engine thread on the replica's event loop)
and leaves it when Serve stops the replica (draining the engine).

A request for a delta carries it as Serve's multiplexed model id: the replica records the
delta in a Serve multiplex cache of ``--max-loaded-adapters`` entries, which tells Serve's
router where each delta is loaded.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

import ray
from ray import serve
from starlette.types import ASGIApp, Message

from pesc_serve.ray.config import ReplicaSpec
from pesc_serve.ray.forwarding import HTTPCall, replay

logger = logging.getLogger("pesc_serve.ray")


class ResidentDelta:
    """An entry of the replica's multiplex cache: the engine holds the delta's tensors itself
    (and loads an evicted delta again on the request that needs it)."""

    def __init__(self, name: str) -> None:
        self.name = name


class PescReplica:
    """One engine per replica process; the same routes as ``python -m pesc_serve``."""

    async def __init__(self, spec: ReplicaSpec) -> None:
        import torch  # after Ray set OMP_NUM_THREADS from the replica's CPU share (ReplicaSpec.env_vars)

        from pesc_serve.allocator import freeze_startup_objects, keep_freed_buffers
        from pesc_serve.launcher import build_server

        torch.set_num_threads(spec.threads)
        keep_freed_buffers()
        _log_to_stderr(spec.log_level)
        self.spec = spec
        context = serve.get_replica_context()
        self.replica_id = context.replica_id.unique_id
        # Off the event loop: the model loads on the engine thread (launcher.build_server).
        self.server = await asyncio.to_thread(build_server, spec.load, spec.engine, spec.server, spec.chat_template)
        self.app: ASGIApp = self.server.app
        self.lifespan = self.server.app.router.lifespan_context(self.server.app)
        await self.lifespan.__aenter__()
        self.deltas = frozenset(spec.delta_names)
        self.background: set[asyncio.Task] = set()

        async def load_delta(name: str) -> ResidentDelta:
            return ResidentDelta(name)

        self.delta_cache = serve.multiplexed(max_num_models_per_replica=spec.resident_deltas)(load_delta)
        freeze_startup_objects()

    async def handle(self, call: HTTPCall) -> AsyncIterator[Message]:
        """Replay ``call`` into the app, streaming its ASGI response messages back."""
        delta = serve.get_multiplexed_model_id()
        if delta in self.deltas:
            await self.delta_cache(delta)
        async for message in replay(self.app, call, self.replica_id, self.background, self.spec.stream_interval_s):
            yield message

    def info(self) -> dict[str, Any]:
        """What ``/health`` and ``/metrics`` show about this replica."""
        import torch

        engine = self.server.engine
        return {
            "replica": self.replica_id,
            "pid": os.getpid(),
            "node": ray.util.get_node_ip_address(),
            "num_cpus": self.spec.num_cpus,
            "num_gpus": self.spec.num_gpus,
            "torch_threads": torch.get_num_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "device": str(self.server.loaded.device),
            "healthy": engine.is_healthy and not engine.is_draining,
            "in_flight": engine.num_in_flight,
            "resident_deltas": sorted(m.name for m in engine.engine.models.listed()
                                      if m.parent is not None and m.is_resident),
        }

    def check_health(self) -> None:
        """Serve replaces a replica whose engine thread has died."""
        engine = self.server.engine
        if not engine.is_healthy:
            raise RuntimeError(f"engine is not running: {engine.dead_error or 'stopped'}")

    async def drain(self) -> None:
        """Shutdown's first step (the CLI broadcasts it): refuse new requests, give running ones
        ``--shutdown-timeout``, then abort them with their partial answer."""
        self.server.engine.begin_drain(self.spec.server.shutdown_timeout_s)

    def metrics_report(self) -> dict[str, Any]:
        """This replica's status and Prometheus text, for the ingress's ``/metrics``."""
        metrics = self.server.app.state.serving.metrics
        return {"info": self.info(), "metrics": metrics.render().decode() if metrics is not None else ""}

    async def __del__(self) -> None:
        """Serve's graceful stop, once no request is running here (or its timeout is over):
        leave the lifespan, which drains and stops the engine."""
        lifespan = getattr(self, "lifespan", None)  # absent when the constructor failed
        if lifespan is not None:
            await lifespan.__aexit__(None, None, None)


def _log_to_stderr(level: str) -> None:
    """The engine's start-up summary and warnings in the replica's log (Ray forwards it to the driver)."""
    log = logging.getLogger("pesc_serve")
    log.setLevel(level.upper())
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
