"""``python -m pesc_serve --model camelidae``: parse flags -> configs -> engine -> uvicorn."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

# OpenMP waiters: libgomp's default spins for ~300k iterations (up to milliseconds) and
# starves the HTTP thread and any other process on a small CPU (measured 4 vs 80 tok/s on 2
# cores with one other busy process); OMP_WAIT_POLICY=PASSIVE sleeps at once, but then every
# parallel region pays a futex wake-up, ~150 per decode step (18 vs 8 ms per one-row step).
# A short spin catches the next region of the same step and sleeps between steps.  libgomp
# reads this at load, so it must precede torch; a user's own setting wins.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "50000")
# numpy's OpenBLAS starts a thread per core at import and its threads busy-wait after each use:
# the server does no BLAS work in numpy (torch has its own), so they would only compete with
# the OpenMP team for the cores.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from pesc_serve.allocator import freeze_startup_objects, keep_freed_buffers  # noqa: E402
from pesc_serve.config import (  # noqa: E402
    DISPATCH_CHOICES,
    DTYPE_CHOICES,
    KV_CACHE_DTYPE_CHOICES,
    QUANTIZATION_CHOICES,
    EngineConfig,
    LoadConfig,
    ServerConfig,
)
from pesc_serve.registry import ALIASES  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def build_parser() -> argparse.ArgumentParser:
    """The server's flags; ``python -m pesc_serve.ray`` adds its own on top of the same parser."""
    aliases = "; ".join(f"{k}: {v}" for k, v in ALIASES.items())
    p = argparse.ArgumentParser(
        prog="python -m pesc_serve",
        description="OpenAI-compatible server for PESC sparse adapter-MoE models (and their dense bases).",
    )
    p.add_argument("--model", default="camelidae", help=f"alias, local directory, .gguf file or hub id ({aliases})")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None, help="name clients use in 'model' (default: the model's name)")
    p.add_argument("--adapters", nargs="+", default=[], metavar="NAME=PATH",
                   help="deltas served beside --model under NAME: a PESC delta or PEFT LoRA directory, or a "
                        "delta alias (camelidae, ...); requests pick one with 'model'")
    p.add_argument("--max-loaded-adapters", type=int, default=None,
                   help="deltas resident at once (least recently used ones are evicted and re-read on demand; "
                        "default: all)")
    p.add_argument("--enable-runtime-adapters", action="store_true",
                   help="serve POST /v1/load_lora_adapter and /v1/unload_lora_adapter (behind --api-key)")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--quantization", default="auto", choices=("auto",) + QUANTIZATION_CHOICES,
                   help="weight-only quantization of the shared FFN (routers and adapters stay unquantized)")
    p.add_argument("--load-format", default="auto", choices=("auto", "dummy"),
                   help="dummy: random weights shaped by the model's config.json (benchmarking only)")
    p.add_argument("--dispatch", default="auto", choices=DISPATCH_CHOICES, help="expert-adapter dispatch strategy")
    p.add_argument("--max-num-seqs", type=int, default=64, help="requests running at once")
    p.add_argument("--max-queue-len", type=int, default=256, help="requests waiting beyond those (then 429)")
    p.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    p.add_argument("--max-num-batched-tokens", type=int, default=512, help="token budget per engine step")
    p.add_argument("--cpu-kernels", default="auto", choices=("auto", "on", "off"),
                   help="run CPU decode steps through the compiled C++ step (built on first use, then cached)")
    p.add_argument("--kv-cache-memory", type=float, default=None, help="KV-cache budget in GiB")
    p.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPE_CHOICES,
                   help="KV-cache element type; auto: float16 for a float32 model on CPU, else the model's (model)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--chat-template", type=Path, default=None, help="a Jinja chat template file overriding the model's")
    p.add_argument("--api-key", default=os.environ.get("PESC_SERVE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (or set PESC_SERVE_API_KEY)")
    p.add_argument("--request-timeout", type=float, default=None, help="seconds before a request is aborted")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM/SIGINT, seconds running requests get to finish; those left then end "
                        "with finish_reason 'abort' and their partial output")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    return p


def configs_from_args(args: argparse.Namespace) -> tuple[LoadConfig, EngineConfig, ServerConfig]:
    """The validated configs the CLI flags describe (raises ValueError with the flag's name)."""
    load = LoadConfig(args.model, args.dtype, args.device, args.quantization, args.dispatch, args.load_format,
                      adapters=tuple(parse_adapter(a) for a in args.adapters))
    engine_cfg = EngineConfig(
        max_num_seqs=args.max_num_seqs,
        max_model_len=args.max_model_len,
        max_num_batched_tokens=args.max_num_batched_tokens,
        block_size=args.block_size,
        kv_cache_memory_gb=args.kv_cache_memory,
        enable_prefix_caching=not args.no_prefix_caching,
        max_queue_len=args.max_queue_len,
        seed=args.seed,
        cpu_kernels=args.cpu_kernels,
        kv_cache_dtype=args.kv_cache_dtype,
        max_loaded_adapters=args.max_loaded_adapters,
    )
    server_cfg = ServerConfig(
        host=args.host,
        port=args.port,
        served_model_name=args.served_model_name,
        api_key=args.api_key,
        request_timeout_s=args.request_timeout,
        shutdown_timeout_s=args.shutdown_timeout,
        enable_runtime_adapters=args.enable_runtime_adapters,
    )
    return load, engine_cfg, server_cfg


def parse_adapter(value: str) -> tuple[str, str]:
    """``NAME=PATH`` (PATH a delta directory or alias), or a bare alias served under its own name."""
    name, sep, path = value.partition("=")
    return (name.strip(), path.strip()) if sep else (value.strip(), value.strip())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _exit_cleanly_on_signals()
    keep_freed_buffers()
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("pesc_serve")
    try:
        load, engine_cfg, server_cfg = configs_from_args(args)
        if args.chat_template is not None and not args.chat_template.is_file():
            raise ValueError(f"--chat-template {args.chat_template}: no such file")
        from pesc_serve.launcher import build_server

        log.info("loading %s ...", args.model)
        server = build_server(load, engine_cfg, server_cfg, args.chat_template)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from pesc_serve.server.http_server import http_server

    freeze_startup_objects()
    log.info("serving %r on http://%s:%d (OpenAI API under /v1)", server.model_name, args.host, args.port)
    http_server(server.app, server.engine, server_cfg, args.log_level).run()
    return 0


def _exit_cleanly_on_signals() -> None:
    """SIGTERM/SIGINT exit with status 0: while loading at once, while serving after the drain.

    uvicorn handles the signal itself (stop accepting, let running requests finish), then
    re-raises it to the handler that was installed before it started.  With the default
    handlers that kills the process after a clean drain (status 143, or a KeyboardInterrupt
    traceback); a finished drain is a successful exit.  Installing a handler also matters
    in a container, where PID 1 ignores a SIGTERM that has none.
    """

    def exit_ok(*_: object) -> None:
        raise SystemExit(0)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, exit_ok)


if __name__ == "__main__":
    sys.exit(main())
