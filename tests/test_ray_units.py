"""The Ray Serve package without a cluster: flags and their errors, deployment options, the
routers' inputs, the merged metrics page, and the shipped Serve / KubeRay configs."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

pytest.importorskip("ray.serve")

import yaml  # noqa: E402  (a Ray dependency)

from ray import serve  # noqa: E402

from pesc_serve.ray.app import ENGINE_DEPLOYMENT, app_builder, build_app, engine_options, flags_from_dict  # noqa: E402
from pesc_serve.ray.cli import build_parser, main, specs_from_args  # noqa: E402
from pesc_serve.ray.config import SERVE_ENV_DEFAULTS, RayServeConfig, serve_env_defaults  # noqa: E402
from pesc_serve.ray.forwarding import HTTPCall, prompt_prefix, read_call, replay  # noqa: E402
from pesc_serve.ray.metrics import merge_metrics  # noqa: E402
from pesc_serve.ray.replica import PescReplica  # noqa: E402
from pesc_serve.ray.routing import rendezvous_order  # noqa: E402

DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "ray"


def _specs(*flags: str, cpus: float = 1.0):
    return specs_from_args(build_parser().parse_args(["--model", "camelidae", *flags]), default_cpus=cpus)


@pytest.mark.parametrize("flags,expected", [
    (["--num-replicas", "0"], "--num-replicas must be an integer >= 1"),
    (["--min-replicas", "3", "--max-replicas", "2"], "--min-replicas (3) is above --max-replicas (2)"),
    (["--num-replicas", "5", "--max-replicas", "4"], "--num-replicas (5) must lie within"),
    (["--target-ongoing-requests", "0"], "--target-ongoing-requests must be positive"),
    (["--num-cpus-per-replica", "-1"], "--num-cpus-per-replica must be positive"),
    (["--enable-runtime-adapters"], "--enable-runtime-adapters is not available with Ray Serve"),
    (["--num-gpus-per-replica", "1", "--device", "cpu"], "--device cpu contradicts --num-gpus-per-replica"),
    (["--device", "cuda"], "--device cuda needs --num-gpus-per-replica"),
    (["--max-num-seqs", "0"], "--max-num-seqs must be a positive integer"),
    (["--stream-interval-ms", "-1"], "--stream-interval-ms must lie within 0 and 1000"),
])
def test_bad_flags_are_one_line_errors_naming_the_flag(flags, expected, capsys):
    assert main(["--model", "camelidae", *flags]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err


def test_a_missing_model_fails_before_ray_starts(capsys):
    assert main(["--model", "/no/such/model"]) == 2
    assert "not found" in capsys.readouterr().err


def test_replica_spec_pins_threads_and_device_to_the_replicas_share():
    spec, ray_cfg = _specs("--num-replicas", "2", "--max-loaded-adapters", "3", "--adapters", "a=/x", "b=/y",
                           cpus=2.5)
    assert spec.threads == 2 and spec.env_vars()["OMP_NUM_THREADS"] == "2"
    assert spec.load.device == "cpu" and spec.delta_names == ("a", "b") and spec.resident_deltas == 3
    gpu, _ = _specs("--num-gpus-per-replica", "1")
    assert gpu.load.device == "cuda" and gpu.num_gpus == 1
    options = engine_options(spec, ray_cfg)
    assert options["name"] == ENGINE_DEPLOYMENT and options["num_replicas"] == 2
    assert options["ray_actor_options"]["num_cpus"] == 2.5
    assert options["ray_actor_options"]["runtime_env"]["env_vars"]["OMP_NUM_THREADS"] == "2"
    assert options["max_ongoing_requests"] == spec.engine.max_num_seqs
    assert options["max_queued_requests"] == spec.engine.max_queue_len


def test_autoscaling_flags_become_serves_autoscaling_config():
    spec, ray_cfg = _specs("--num-replicas", "2", "--min-replicas", "1", "--max-replicas", "4",
                           "--target-ongoing-requests", "8")
    options = engine_options(spec, ray_cfg)
    assert "num_replicas" not in options
    assert options["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "initial_replicas": 2,
                                             "target_ongoing_requests": 8.0}
    assert RayServeConfig(max_replicas=3).replica_bounds == (1, 3)
    assert RayServeConfig(num_replicas=2).replica_bounds == (2, 2)
    deployment = serve.deployment(PescReplica).options(**options)  # Serve validates the options here
    assert deployment.name == ENGINE_DEPLOYMENT
    assert build_app(spec, ray_cfg) is not None


def test_prefix_router_option_uses_the_pesc_router():
    spec, ray_cfg = _specs("--router", "prefix")
    config = engine_options(spec, ray_cfg)["request_router_config"]
    assert "PrefixAffinityRouter" in str(config.request_router_class)


def test_read_call_takes_model_and_prompt_prefix_from_the_body():
    call = read_call("POST", "/v1/chat/completions", b"", [], b'{"model": "alpha", "messages": '
                     b'[{"role": "system", "content": "be brief"}, {"role": "user", "content": [{"type": "text", '
                     b'"text": "hi"}]}]}', None)
    assert call.model == "alpha" and call.prefix_key == "be briefhi"
    assert read_call("POST", "/x", b"", [], b"{broken", None).model is None
    assert read_call("GET", "/v1/models", b"", [], b"", None).prefix_key is None
    assert read_call("POST", "/x", b"", [], b'{"model": 3, "prompt": "p"}', None).model is None
    assert prompt_prefix({"prompt": "x" * 1000}) == "x" * 256
    assert prompt_prefix({"prompt": [[1, 2, 3]]}) is not None and prompt_prefix({"prompt": [1, 2]}) == "1,2"


def test_rendezvous_order_is_stable_and_moves_little_when_a_replica_goes():
    replicas = [f"r{i}" for i in range(5)]
    keys = [f"system prompt {i}" for i in range(200)]
    first = {k: rendezvous_order(k, replicas)[0] for k in keys}
    assert first == {k: rendezvous_order(k, list(reversed(replicas)))[0] for k in keys}  # order-free
    assert len(set(first.values())) == 5  # prefixes spread over every replica
    fewer = {k: rendezvous_order(k, replicas[:-1])[0] for k in keys}
    assert all(fewer[k] == first[k] for k in keys if first[k] != "r4")  # only r4's prefixes move


def test_merged_metrics_label_every_sample_with_its_replica():
    text = ('# HELP pesc:generation_tokens_total Tokens generated\n# TYPE pesc:generation_tokens_total counter\n'
            'pesc:generation_tokens_total{model="m"} 7.0\n'
            '# HELP pesc:num_requests_running Requests\n# TYPE pesc:num_requests_running gauge\n'
            'pesc:num_requests_running 2.0\n')
    reports = [{"info": {"replica": r, "pid": p, "node": "n", "healthy": h}, "metrics": text}
               for r, p, h in (("b", 2, True), ("a", 1, False))]
    page = merge_metrics(reports).decode()
    assert 'pesc:generation_tokens_total{model="m",replica="a"} 7.0' in page
    assert 'pesc:num_requests_running{replica="b"} 2.0' in page
    assert 'pesc:replica_up{node="n",pid="1",replica="a"} 0.0' in page
    assert page.count("# TYPE pesc:num_requests_running gauge") == 1  # one family, both replicas


def test_flags_from_dict_matches_the_cli():
    argv = flags_from_dict({"model": "camelidae", "adapters": ["a=/x", "b=/y"], "no_prefix_caching": True,
                            "num_replicas": 2, "seed": None, "enable_runtime_adapters": False})
    assert argv == ["--model", "camelidae", "--adapters", "a=/x", "b=/y", "--no-prefix-caching", "--num-replicas", "2"]
    with pytest.raises(ValueError, match="args.port"):
        app_builder({"model": "camelidae", "port": 9000})


def _serve_apps(config: dict) -> list[dict]:
    return config["applications"]


def test_the_shipped_serve_config_and_kuberay_manifest_build_the_app():
    configs = [yaml.safe_load((DEPLOY / "serve_config.yaml").read_text())]
    for doc in yaml.safe_load_all((DEPLOY / "rayservice.yaml").read_text()):
        if doc and doc.get("kind") == "RayService":
            configs.append(yaml.safe_load(doc["spec"]["serveConfigV2"]))
    assert len(configs) == 2
    for config in configs:
        (app,) = _serve_apps(config)
        assert app["import_path"] == "pesc_serve.ray.app:app_builder" and app["route_prefix"] == "/"
        spec, ray_cfg = specs_from_args(build_parser().parse_args(flags_from_dict(app["args"])), default_cpus=1.0)
        assert ray_cfg.num_replicas >= 1 and spec.load.model


def _streaming_app(chunks: int, gap_s: float):
    """An ASGI app that streams ``chunks`` SSE events, ``gap_s`` apart (as an engine emits tokens)."""

    async def app(scope, receive, send):
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        for i in range(chunks):
            await send({"type": "http.response.body", "body": f"data: {i}\n\n".encode(), "more_body": True})
            await asyncio.sleep(gap_s)
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})

    return app


def _replayed(app, interval_s: float) -> tuple[list[bytes], float]:
    """The body messages ``replay`` forwards, and how long the whole stream took."""

    async def run():
        loop = asyncio.get_running_loop()
        start, bodies = loop.time(), []
        call = HTTPCall("POST", "/v1/chat/completions", b"", [], b"{}")
        async for message in replay(app, call, "r1", set(), interval_s):
            if message["type"] == "http.response.body":
                bodies.append(message["body"])
        return bodies, loop.time() - start

    return asyncio.run(run())


def test_a_stream_crosses_the_serve_hop_at_most_once_per_interval_with_every_token():
    """After the first body, a stream's tokens leave together at most every --stream-interval-ms:
    the count of crossings is bounded by the stream's duration, whatever the machine's speed,
    and the bytes are the app's, in order."""
    want = b"".join(f"data: {i}\n\n".encode() for i in range(30)) + b"data: [DONE]\n\n"
    bodies, took = _replayed(_streaming_app(30, 0.005), interval_s=0.05)
    assert b"".join(bodies) == want
    assert len(bodies) <= 2 + took / 0.05, (len(bodies), took)
    assert len(bodies) < 30
    unbatched, _ = _replayed(_streaming_app(30, 0.005), interval_s=0.0)
    assert b"".join(unbatched) == want


def test_a_streams_end_leaves_at_once_not_after_the_interval():
    bodies, took = _replayed(_streaming_app(2, 0.0), interval_s=60.0)
    assert bodies[-1].endswith(b"[DONE]\n\n") and took < 30


def test_the_stream_interval_flag_reaches_the_replicas():
    spec, ray_cfg = _specs("--stream-interval-ms", "40")
    assert ray_cfg.stream_interval_ms == 40 and spec.stream_interval_s == pytest.approx(0.04)
    assert _specs()[0].stream_interval_s == pytest.approx(0.1)


def test_a_started_cluster_gets_the_serve_defaults_unless_the_user_set_them():
    """The names must be the ones Serve reads, or the setting silently does nothing."""
    import inspect

    import ray.serve._private.constants as serve_constants

    source = inspect.getsource(serve_constants)
    for name in SERVE_ENV_DEFAULTS:
        assert f'"{name}"' in source, name
    assert serve_env_defaults({}) == SERVE_ENV_DEFAULTS
    mine = {"RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.1"}
    assert "RAY_SERVE_CONTROL_LOOP_INTERVAL_S" not in serve_env_defaults(mine)
    assert "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS" in serve_env_defaults(mine)
