"""The Serve application: the ingress bound to N engine replicas, from the CLI's configs.

``build_app`` is what ``python -m pesc_serve.ray`` deploys; ``app_builder`` is the same for
``serve run`` / ``serve deploy`` / KubeRay config files, whose ``args`` are the CLI's flags
(``max_loaded_adapters: 2`` for ``--max-loaded-adapters 2``; see deploy/ray/).
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from pesc_serve.config import EngineConfig
from pesc_serve.ray.config import HEALTH_CHECK_PERIOD_S, MAX_CONSTRUCTOR_RETRIES, RayServeConfig, ReplicaSpec
from pesc_serve.ray.ingress import IngressSettings, OpenAIIngress
from pesc_serve.ray.replica import PescReplica
from pesc_serve.ray.routing import PrefixAffinityRouter

ENGINE_DEPLOYMENT = "PescEngine"
INGRESS_DEPLOYMENT = "OpenAIIngress"
# After the drain: the engine's answer grace (ANSWER_GRACE_S twice) and a margin for Serve's wait loop.
SHUTDOWN_MARGIN_S = 15.0


def engine_options(spec: ReplicaSpec, ray_cfg: RayServeConfig) -> dict[str, Any]:
    """Serve deployment options of the engine replicas."""
    engine: EngineConfig = spec.engine
    max_ongoing = ray_cfg.max_ongoing_requests or engine.max_num_seqs
    options: dict[str, Any] = {
        "name": ENGINE_DEPLOYMENT,
        "max_ongoing_requests": max_ongoing,
        # Beyond the running batches, requests wait in the ingress's queue for whichever replica
        # frees first; past this many the client gets a 429 (the engine's own queue limit).
        "max_queued_requests": engine.max_queue_len,
        "ray_actor_options": {
            "num_cpus": spec.num_cpus,
            "num_gpus": spec.num_gpus,
            "runtime_env": {"env_vars": spec.env_vars()},
        },
        "health_check_period_s": HEALTH_CHECK_PERIOD_S,
        "graceful_shutdown_timeout_s": spec.server.shutdown_timeout_s + SHUTDOWN_MARGIN_S,
        "max_constructor_retry_count": MAX_CONSTRUCTOR_RETRIES,
    }
    if ray_cfg.autoscaling:
        low, high = ray_cfg.replica_bounds
        options["autoscaling_config"] = {
            "min_replicas": low,
            "max_replicas": high,
            "initial_replicas": ray_cfg.num_replicas,
            "target_ongoing_requests": ray_cfg.target_ongoing_requests or max(1.0, engine.max_num_seqs / 2),
        }
    else:
        options["num_replicas"] = ray_cfg.num_replicas
    if ray_cfg.router == "prefix":
        options["request_router_config"] = RequestRouterConfig(request_router_class=PrefixAffinityRouter)
    return options


def build_app(spec: ReplicaSpec, ray_cfg: RayServeConfig) -> Application:
    """The ingress in front of the engine deployment, ready for ``serve.run``."""
    engine = serve.deployment(PescReplica).options(**engine_options(spec, ray_cfg)).bind(spec)
    settings = IngressSettings(frozenset(spec.delta_names), spec.server.max_body_bytes)
    ingress = serve.deployment(OpenAIIngress).options(
        name=INGRESS_DEPLOYMENT,
        num_replicas=1,
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=100_000,  # it only waits on replicas; their limits apply there
        graceful_shutdown_timeout_s=spec.server.shutdown_timeout_s + SHUTDOWN_MARGIN_S,
    )
    return ingress.bind(engine, settings)


def app_builder(args: dict[str, Any]) -> Application:
    """``import_path: pesc_serve.ray.app:app_builder`` in a Serve config: ``args`` holds the CLI's
    flags by name; the HTTP host and port come from the config's ``http_options``."""
    from pesc_serve.ray.cli import build_parser, specs_from_args

    for name in ("host", "port", "address"):
        if name in args:
            raise ValueError(f"args.{name}: set it in the Serve config (http_options, or the cluster) instead")
    parsed = build_parser().parse_args(flags_from_dict(args))
    spec, ray_cfg = specs_from_args(parsed, default_cpus=1.0)
    return build_app(spec, ray_cfg)


def flags_from_dict(args: dict[str, Any]) -> list[str]:
    """``{"max_loaded_adapters": 2, "adapters": ["a=/p"], "no_prefix_caching": true}`` -> argv."""
    argv: list[str] = []
    for name, value in args.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is False or value is None:
            continue
        elif isinstance(value, (list, tuple)):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return argv

