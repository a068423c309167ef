"""The Ray Serve settings of ``python -m pesc_serve.ray``, and what one replica is built from.

Plain dataclasses, validated on construction like :mod:`pesc_serve.config`: a bad value is a
``ValueError`` that names the flag, which the CLI prints instead of a traceback.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path

from pesc_serve.config import EngineConfig, LoadConfig, ServerConfig

ROUTER_CHOICES = ("pow2", "prefix")
HEALTH_CHECK_PERIOD_S = 5.0  # how soon Serve notices an engine whose thread died
MAX_CONSTRUCTOR_RETRIES = 3  # a replica whose model cannot load fails the deployment quickly


def _count(value: object, flag: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{flag} must be an integer >= {minimum}, got {value!r}")


# Serve settings for a cluster this command starts (a setting already in the environment wins).
# Serve's background loops are slowed: each one wakes a Python process several times a second,
# and on a host whose cores the engine uses, every wake-up preempts an engine thread, whose
# OpenMP team then waits at its next barrier for the preempted one.  Neither slows a reaction
# that matters: the controller acts on a failed health check within half a second, and
# autoscaling averages over 30-second windows anyway.  And the ingress's and the replica's code
# run on their actor's own event loop rather than on a second loop in another thread: each
# streamed chunk then crosses no thread inside the process (every handler here is async or
# already sent to a thread pool, so nothing blocks that loop).
SERVE_ENV_DEFAULTS = {
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5",  # the controller's reconcile loop (default 0.1 s)
    "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "1000",  # each Serve actor's metric export (default 100 ms)
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",  # default 1: user code on a loop in its own thread
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",  # default 1: the handle's router on its own loop too
}


def serve_env_defaults(environ: dict[str, str]) -> dict[str, str]:
    """The :data:`SERVE_ENV_DEFAULTS` settings ``environ`` does not set itself."""
    return {k: v for k, v in SERVE_ENV_DEFAULTS.items() if k not in environ}


# Ten updates a second: a reader sees text arrive in lines rather than words, and each crossing
# (about 2 ms of the ingress's and the proxy's CPU) carries ~15 tokens at this model's speed; at
# 25 ms the crossings cost a 2-core host about a quarter of its decode speed (README, Ray Serve).
DEFAULT_STREAM_INTERVAL_MS = 100.0
MAX_STREAM_INTERVAL_MS = 1000.0


@dataclass(frozen=True)
class RayServeConfig:
    """How many replicas, what each one gets from Ray, and how requests reach them."""

    address: str | None = None  # join this cluster; None: start a local one and stop it on exit
    app_name: str = "pesc"
    num_replicas: int = 1  # fixed count, or the initial count when autoscaling
    min_replicas: int | None = None  # either bound given: autoscaling between them
    max_replicas: int | None = None
    target_ongoing_requests: float | None = None  # autoscaling target per replica (default: max_num_seqs / 2)
    max_ongoing_requests: int | None = None  # per replica (default: max_num_seqs; more wait in Serve's queue)
    num_cpus_per_replica: float | None = None  # default: the local CPUs shared out, or 1 on a joined cluster
    num_gpus_per_replica: float = 0.0
    router: str = "pow2"
    # A stream's chunks cross the two Serve hops (replica -> ingress -> proxy) at most this often;
    # tokens produced meanwhile travel together.  Each crossing costs every process on the way a
    # wake-up, which on a small CPU is taken from the engine's own threads.
    stream_interval_ms: float = DEFAULT_STREAM_INTERVAL_MS

    def __post_init__(self) -> None:
        if not self.app_name or not self.app_name.strip():
            raise ValueError("--app-name must not be empty")
        _count(self.num_replicas, "--num-replicas", 1)
        if self.min_replicas is not None:
            _count(self.min_replicas, "--min-replicas", 0)
        if self.max_replicas is not None:
            _count(self.max_replicas, "--max-replicas", 1)
        if self.autoscaling:
            low, high = self.replica_bounds
            if low > high:
                raise ValueError(f"--min-replicas ({low}) is above --max-replicas ({high})")
            if not low <= self.num_replicas <= high:
                raise ValueError(f"--num-replicas ({self.num_replicas}) must lie within --min-replicas ({low}) "
                                 f"and --max-replicas ({high}) when autoscaling")
        if self.target_ongoing_requests is not None and not self.target_ongoing_requests > 0:
            raise ValueError(f"--target-ongoing-requests must be positive, got {self.target_ongoing_requests}")
        if self.max_ongoing_requests is not None:
            _count(self.max_ongoing_requests, "--max-ongoing-requests", 1)
        if self.num_cpus_per_replica is not None and not self.num_cpus_per_replica > 0:
            raise ValueError(f"--num-cpus-per-replica must be positive, got {self.num_cpus_per_replica}")
        if not self.num_gpus_per_replica >= 0:
            raise ValueError(f"--num-gpus-per-replica must be >= 0, got {self.num_gpus_per_replica}")
        if not 0 <= self.stream_interval_ms <= MAX_STREAM_INTERVAL_MS:
            raise ValueError(f"--stream-interval-ms must lie within 0 and {MAX_STREAM_INTERVAL_MS:g}, "
                             f"got {self.stream_interval_ms}")
        if self.router not in ROUTER_CHOICES:
            raise ValueError(f"--router must be one of {', '.join(ROUTER_CHOICES)}, got {self.router!r}")

    @property
    def autoscaling(self) -> bool:
        return self.min_replicas is not None or self.max_replicas is not None

    @property
    def replica_bounds(self) -> tuple[int, int]:
        """(min, max) replicas; both ``num_replicas`` without autoscaling."""
        if not self.autoscaling:
            return self.num_replicas, self.num_replicas
        low = self.min_replicas if self.min_replicas is not None else min(1, self.num_replicas)
        high = self.max_replicas if self.max_replicas is not None else max(self.num_replicas, low)
        return low, high


@dataclass(frozen=True)
class ReplicaSpec:
    """Everything one engine replica is built from (pickled into each replica by Serve)."""

    load: LoadConfig
    engine: EngineConfig
    server: ServerConfig
    chat_template: Path | None
    num_cpus: float
    num_gpus: float
    log_level: str = "info"
    stream_interval_s: float = DEFAULT_STREAM_INTERVAL_MS / 1000

    @property
    def threads(self) -> int:
        """Torch / OpenMP threads: the whole CPUs of the replica's share, at least one."""
        return max(1, math.floor(self.num_cpus))

    @property
    def delta_names(self) -> tuple[str, ...]:
        """The ``--adapters`` names: the models whose requests are routed to a replica holding them."""
        return tuple(name for name, _ in self.load.adapters)

    @property
    def resident_deltas(self) -> int:
        """Deltas a replica keeps loaded at once (Serve's per-replica multiplex cache has this size)."""
        return self.engine.max_loaded_adapters or max(1, len(self.delta_names))

    def env_vars(self) -> dict[str, str]:
        """Set in the replica's process before Python starts there, so before torch loads:
        libgomp sizes its pool from OMP_NUM_THREADS once, at load (GOMP_SPINCOUNT: see
        pesc_serve/__main__.py)."""
        env = {"OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads)}
        if "OMP_WAIT_POLICY" not in os.environ:
            env["GOMP_SPINCOUNT"] = os.environ.get("GOMP_SPINCOUNT", "50000")
        return env


def replica_spec(load: LoadConfig, engine: EngineConfig, server: ServerConfig, chat_template: Path | None,
                 ray_cfg: RayServeConfig, num_cpus: float, log_level: str = "info") -> ReplicaSpec:
    """Check the server flags against Ray mode and pin each replica's device to its share."""
    if server.enable_runtime_adapters:
        raise ValueError("--enable-runtime-adapters is not available with Ray Serve: a load would reach one "
                         "replica only; declare deltas with --adapters (every replica registers them, and "
                         "--max-loaded-adapters bounds how many each keeps loaded)")
    device = load.device
    if ray_cfg.num_gpus_per_replica > 0:
        if device == "cpu":
            raise ValueError("--device cpu contradicts --num-gpus-per-replica "
                             f"{ray_cfg.num_gpus_per_replica}")
        if device == "auto" or device.startswith("cuda"):
            device = "cuda"  # Ray sets CUDA_VISIBLE_DEVICES to the replica's GPU(s): cuda:0 there
    elif device.startswith("cuda"):
        raise ValueError(f"--device {device} needs --num-gpus-per-replica (Ray gives each replica its GPU)")
    else:
        device = "cpu"  # a replica without a GPU share must not pick up a GPU Ray gave another one
    return ReplicaSpec(dataclasses.replace(load, device=device), engine, server, chat_template, num_cpus,
                       ray_cfg.num_gpus_per_replica, log_level, ray_cfg.stream_interval_ms / 1000)
