"""``python -m pesc_serve.ray``: the server's flags plus Ray's -> a Serve app on a Ray cluster.

Without ``--address`` it starts a local Ray cluster and stops it on exit; with one it joins
that cluster and on exit deletes only its own application.  SIGTERM or SIGINT drains: Serve
lets running requests finish (``--shutdown-timeout``), then stops the replicas, the ingress
and, for a local cluster, every Ray process it started.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from types import FrameType

from pesc_serve.__main__ import build_parser as build_server_parser
from pesc_serve.__main__ import configs_from_args
from pesc_serve.ray.config import (DEFAULT_STREAM_INTERVAL_MS, ROUTER_CHOICES, RayServeConfig, ReplicaSpec,
                                    replica_spec, serve_env_defaults)

log = logging.getLogger("pesc_serve.ray")

DRAIN_CALL_TIMEOUT_S = 15.0  # telling the replicas to drain (replicas still loading are skipped)


def build_parser() -> argparse.ArgumentParser:
    """``python -m pesc_serve``'s parser with the Ray flags added."""
    p = build_server_parser()
    p.prog = "python -m pesc_serve.ray"
    p.description = ("OpenAI-compatible server for PESC models on Ray Serve: N engine replicas behind one "
                     "endpoint, requests for a delta routed to a replica that holds it.")
    g = p.add_argument_group("Ray Serve")
    g.add_argument("--address", default=None,
                   help="join this Ray cluster (e.g. 10.0.0.1:6379, or auto); default: start a local cluster "
                        "and stop it on exit")
    g.add_argument("--app-name", default="pesc", help="Serve application name")
    g.add_argument("--num-replicas", type=int, default=1,
                   help="engine replicas (the initial count when autoscaling)")
    g.add_argument("--min-replicas", type=int, default=None, help="autoscale down to this many replicas")
    g.add_argument("--max-replicas", type=int, default=None, help="autoscale up to this many replicas")
    g.add_argument("--target-ongoing-requests", type=float, default=None,
                   help="autoscaling target of requests per replica (default: --max-num-seqs / 2)")
    g.add_argument("--max-ongoing-requests", type=int, default=None,
                   help="requests a replica takes at once (default: --max-num-seqs); more wait in Serve's queue, "
                        "up to --max-queue-len, then 429")
    g.add_argument("--num-cpus-per-replica", type=float, default=None,
                   help="CPUs Ray reserves per replica, also its torch/OpenMP threads (default: this machine's "
                        "CPUs shared out over --max-replicas or --num-replicas; 1 on a joined cluster)")
    g.add_argument("--num-gpus-per-replica", type=float, default=0.0,
                   help="GPUs per replica (1: one replica per GPU; the replica runs on cuda)")
    g.add_argument("--router", default="pow2", choices=ROUTER_CHOICES,
                   help="pow2: power of two choices (Serve's default); prefix: prompt-prefix affinity (the two "
                        "replicas a prompt's first characters hash to). Either way a delta's requests go to a "
                        "replica holding it")
    g.add_argument("--stream-interval-ms", type=float, default=DEFAULT_STREAM_INTERVAL_MS,
                   help="a stream's tokens cross the Serve hops at most this often, those produced meanwhile "
                        "together (0: each chunk as it comes; every crossing wakes the proxy, the ingress and "
                        "the replica)")
    return p


def ray_config_from_args(args: argparse.Namespace) -> RayServeConfig:
    return RayServeConfig(
        address=args.address,
        app_name=args.app_name,
        num_replicas=args.num_replicas,
        min_replicas=args.min_replicas,
        max_replicas=args.max_replicas,
        target_ongoing_requests=args.target_ongoing_requests,
        max_ongoing_requests=args.max_ongoing_requests,
        num_cpus_per_replica=args.num_cpus_per_replica,
        num_gpus_per_replica=args.num_gpus_per_replica,
        router=args.router,
        stream_interval_ms=args.stream_interval_ms,
    )


def specs_from_args(args: argparse.Namespace, default_cpus: float) -> tuple[ReplicaSpec, RayServeConfig]:
    """The validated replica spec and Ray settings (ValueError naming the flag)."""
    ray_cfg = ray_config_from_args(args)
    load, engine_cfg, server_cfg = configs_from_args(args)
    if args.chat_template is not None and not args.chat_template.is_file():
        raise ValueError(f"--chat-template {args.chat_template}: no such file")
    num_cpus = ray_cfg.num_cpus_per_replica or default_cpus
    return replica_spec(load, engine_cfg, server_cfg, args.chat_template, ray_cfg, num_cpus, args.log_level), ray_cfg


def local_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class Stopped(BaseException):
    """SIGTERM or SIGINT while starting: unwind to the cleanup."""


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        bounds_cfg = ray_config_from_args(args)
        cpus = local_cpus()
        default_cpus = 1.0 if args.address else float(max(1, cpus // bounds_cfg.replica_bounds[1]))
        spec, ray_cfg = specs_from_args(args, default_cpus)
        if ray_cfg.address is None:
            from pesc_serve.registry import resolve_model

            resolve_model(spec.load.model)  # a wrong --model fails here, before Ray starts
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    serving = threading.Event()
    stop = threading.Event()

    def on_signal(signum: int, _: FrameType | None) -> None:
        stop.set()
        if not serving.is_set():
            raise Stopped()

    def handle_signals() -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, on_signal)

    handle_signals()
    import ray
    from ray import serve

    from pesc_serve.ray.app import build_app

    started_cluster = ray_cfg.address is None
    started_serve = started_cluster
    status = 0
    try:
        try:
            if started_cluster:
                os.environ.update(serve_env_defaults(os.environ))  # inherited by every process of the cluster
                ray.init(address="local", num_cpus=cpus, include_dashboard=False)
            else:
                ray.init(address=ray_cfg.address)
        except (ConnectionError, RuntimeError) as exc:
            where = "a local Ray cluster" if started_cluster else f"--address {ray_cfg.address}"
            print(f"error: {where}: {str(exc).splitlines()[0]}", file=sys.stderr)
            return 1
        handle_signals()  # Ray's core installs its own SIGTERM handler, which aborts the process
        if not started_cluster:
            current = serve.status()
            started_serve = not (current.proxies or current.applications)
        serve.start(http_options={"host": spec.server.host, "port": spec.server.port})
        log.info("deploying %d replica(s) of %s (%.3g CPU, %.3g GPU, %d thread(s) each) ...",
                 ray_cfg.num_replicas, spec.load.model, spec.num_cpus, spec.num_gpus, spec.threads)
        serve.run(build_app(spec, ray_cfg), name=ray_cfg.app_name, route_prefix="/")
        serving.set()
        log.info("serving on http://%s:%d (OpenAI API under /v1), app %r", spec.server.host, spec.server.port,
                 ray_cfg.app_name)
        while not stop.wait(1.0):
            pass
    except Stopped:
        log.info("stopping while the application was being deployed")
    except RuntimeError as exc:  # the deployment failed (a replica could not load its model, ...)
        print(f"error: {exc}", file=sys.stderr)
        status = 1
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)  # the cleanup runs to its end
        _stop(ray_cfg.app_name, started_cluster, started_serve, spec.server.shutdown_timeout_s)
    return status


def _stop(app_name: str, started_cluster: bool, started_serve: bool, drain_timeout_s: float) -> None:
    """Drain the engines, delete what this command deployed, stop the Serve instance and the
    local cluster it started (a joined cluster's Serve stays up while it runs other apps).

    The drain comes first and through the engines themselves: each refuses new requests (503
    ``shutting_down``) and gives running ones ``drain_timeout_s`` before aborting them with
    their partial answer, while Serve's HTTP proxy stays up to deliver those answers.  Deleting
    the application then waits for the requests still in flight; only after that does
    ``serve.shutdown`` take the proxy down.
    """
    import ray
    from ray import serve

    from pesc_serve.ray.app import ENGINE_DEPLOYMENT

    if not ray.is_initialized():
        return
    try:
        if app_name in serve.status().applications:  # also when stopped while its replicas were starting
            log.info("stopping: draining running requests (up to %.0f s)", drain_timeout_s)
            try:
                handle = serve.get_deployment_handle(ENGINE_DEPLOYMENT, app_name)
                handle.broadcast("drain").results(timeout_s=DRAIN_CALL_TIMEOUT_S, return_exceptions=True)
            except Exception as exc:  # e.g. the deployment failed: nothing runs there to drain
                log.info("no replica to drain: %s", exc)
        serve.delete(app_name)
        if started_cluster or (started_serve and not serve.status().applications):
            serve.shutdown()
    except Exception as exc:
        log.warning("stopping Serve failed: %s", exc)
    finally:
        ray.shutdown()
