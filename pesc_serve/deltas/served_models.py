"""Served model names -> deltas, and which of them are resident (an LRU within the slots).

The ``--model`` is always resident in slot 0.  Every other name is a registered delta: it
is resident in a slot, or its tensors are dropped (evicted) and read again, off the engine
thread, when a request asks for it.  A delta with unfinished requests is never evicted;
unloading one with requests running lets them finish and frees its slot afterwards.  All
methods run on the engine thread except :meth:`get`, a plain dict read.
"""

from __future__ import annotations

import itertools
import logging
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from pesc_serve.deltas.delta import Delta, DeltaSource
from pesc_serve.deltas.table import DeltaTable

logger = logging.getLogger(__name__)


class UnknownModelError(LookupError):
    """The request names a model this server does not serve (an HTTP 404)."""


@dataclass
class ServedModel:
    name: str
    parent: str | None  # the base's served name for a delta; None for the --model itself
    source: DeltaSource | None  # where its delta is (re)read from; None for the --model
    delta: Delta | None = None  # resident tensors (None: evicted, or a bare base)
    slot: int | None = None
    active: int = 0  # unfinished requests
    last_used: int = 0
    loading: Future | None = None
    unloading: bool = False
    # The prefix-cache namespace: fixed at registration, so an evicted and reloaded delta (the
    # same files) finds its cached prefixes again, and a new registration under an old name not.
    cache_salt: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def is_resident(self) -> bool:
        return self.slot is not None


class ServedModels:
    """The names this engine answers to; residency of their deltas within the table's slots."""

    def __init__(self, primary: str, primary_delta: Delta | None, table: DeltaTable,
                 read: Callable[[DeltaSource], Delta]) -> None:
        self.table = table
        self.read = read
        self.primary = ServedModel(primary, None, None, primary_delta, slot=0, cache_salt="")
        if primary_delta is not None:
            table.install(0, primary_delta)
        self.models: dict[str, ServedModel] = {primary: self.primary}
        self._clock = itertools.count(1)
        self._loader: ThreadPoolExecutor | None = None
        self.num_loads = 0  # reads from disk after start-up (runtime loads and reloads)

    # ---- lookups (any thread) ---------------------------------------------------------------

    def get(self, name: str | None) -> ServedModel:
        """The model a request names; an absent or empty name is the --model."""
        if not name:
            return self.primary
        model = self.models.get(name)
        if model is None or model.unloading:
            raise UnknownModelError(f"The model `{name}` does not exist.")
        return model

    def listed(self) -> list[ServedModel]:
        """The models being served (a snapshot: list() copies the dict in one step under the GIL,
        so the HTTP thread may call this while the engine thread registers one)."""
        return [m for m in list(self.models.values()) if not m.unloading]

    # ---- registration -------------------------------------------------------------------------

    def add(self, source: DeltaSource, delta: Delta | None = None) -> ServedModel:
        """Register ``source`` under its name; with its ``delta`` already read, make it resident
        if a slot is free or can be freed (else it loads on first use)."""
        if source.name in self.models and not self.models[source.name].unloading:
            raise ValueError(f"a model named {source.name!r} is already served")
        model = ServedModel(source.name, self.primary.name, source)
        self.models[source.name] = model
        if delta is not None:
            self._place(model, delta)
        return model

    def remove(self, name: str) -> ServedModel:
        """Stop serving ``name``: new requests get 404 at once; its slot frees once its
        unfinished requests are done."""
        model = self.models.get(name)
        if model is None or model.unloading:
            raise UnknownModelError(f"The model `{name}` does not exist.")
        if model is self.primary:
            raise ValueError(f"{name!r} is the base model this server was started with; it cannot be unloaded")
        model.unloading = True
        if model.active == 0:
            self._drop(model)
        return model

    # ---- requests (engine thread) -------------------------------------------------------------

    def acquire(self, model: ServedModel) -> None:
        model.active += 1
        model.last_used = next(self._clock)
        if not model.is_resident:
            self._start_load(model)

    def release(self, model: ServedModel) -> None:
        model.active -= 1
        if model.unloading and model.active == 0:
            self._drop(model)

    def poll(self) -> list[tuple[ServedModel, str | None]]:
        """Finish loads that completed: (model, None) when it became resident, (model, error)
        when its delta could not be read.  A model still waiting for a free slot stays pending."""
        done: list[tuple[ServedModel, str | None]] = []
        for model in list(self.models.values()):
            future = model.loading
            if future is None or not future.done():
                continue
            exc = future.exception()
            if exc is not None:
                model.loading = None
                done.append((model, f"{type(exc).__name__}: {exc}" if not isinstance(exc, ValueError) else str(exc)))
                continue
            if model.unloading:
                model.loading = None
                continue
            if self._place(model, future.result()):
                model.loading = None
                done.append((model, None))
        return done

    def pending_futures(self) -> list[Future]:
        return [m.loading for m in self.models.values() if m.loading is not None]

    # ---- residency ----------------------------------------------------------------------------

    def _start_load(self, model: ServedModel) -> None:
        if model.loading is not None or model.source is None:
            return
        if self._loader is None:
            self._loader = ThreadPoolExecutor(1, thread_name_prefix="delta-loader")
        self.num_loads += 1
        logger.info("loading delta %s from %s", model.name, model.source.path)
        model.loading = self._loader.submit(self.read, model.source)

    def _place(self, model: ServedModel, delta: Delta) -> bool:
        """Install ``delta`` in a free slot, evicting the least recently used idle delta if
        needed; False when every slot is held by a delta with unfinished requests."""
        slot = self.table.free_slot()
        if slot is None:
            idle = [m for m in self.models.values() if m.is_resident and m is not self.primary and m.active == 0]
            if not idle:
                return False
            victim = min(idle, key=lambda m: m.last_used)
            logger.info("evicting delta %s (least recently used) for %s", victim.name, model.name)
            slot = victim.slot
            self._evict(victim)
        self.table.install(slot, delta)
        model.delta, model.slot = delta, slot
        return True

    def _evict(self, model: ServedModel) -> None:
        if model.slot is not None:
            self.table.remove(model.slot)
        model.delta, model.slot = None, None

    def _drop(self, model: ServedModel) -> None:
        self._evict(model)
        if self.models.get(model.name) is model:
            del self.models[model.name]

    def close(self) -> None:
        if self._loader is not None:
            self._loader.shutdown(wait=False, cancel_futures=True)
