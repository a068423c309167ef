"""Assemble the pieces: configs -> model + tokenizer -> engine -> app (used by the CLI and tests)."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from fastapi import FastAPI

from pesc_serve.config import EngineConfig, LoadConfig, ServerConfig
from pesc_serve.engine.async_engine import AsyncEngine
from pesc_serve.engine.engine import LLMEngine
from pesc_serve.engine.engine_thread import EngineThread
from pesc_serve.deltas.delta import find_delta
from pesc_serve.models.loader import LoadedModel, load_model
from pesc_serve.models.tokenizer import load_tokenizer
from pesc_serve.registry import resolve_delta_path, resolve_model
from pesc_serve.server.app import create_app
from pesc_serve.server.chat import ChatFormatter
from pesc_serve.server.metrics import ServerMetrics

logger = logging.getLogger("pesc_serve")


@dataclass
class Server:
    app: FastAPI
    engine: AsyncEngine
    loaded: LoadedModel
    model_name: str


def build_engine(load: LoadConfig, engine_cfg: EngineConfig, served_name: str | None = None) -> LLMEngine:
    """The base (and its own delta), then each ``--adapters`` delta read and checked against it."""
    source = resolve_model(load.model)
    max_positions = engine_cfg.max_model_len
    # The tokenizer (mostly importing transformers, ~1 s) loads on a second thread meanwhile:
    # the weights' work is numpy and torch, which release the GIL.
    with ThreadPoolExecutor(1, thread_name_prefix="tokenizer") as pool:
        tokenizer_future = pool.submit(load_tokenizer, source)
        loaded = load_model(source, load, max_positions=max_positions)
        tokenizer = tokenizer_future.result()
    engine = LLMEngine(loaded, tokenizer, engine_cfg, model_name=served_name or source.name)
    for name, value in load.adapters:
        if name in engine.models.models:
            raise ValueError(f"--adapters: {name!r} is already the name of a served model")
        delta_source = find_delta(name, resolve_delta_path(value))
        engine.models.add(delta_source, engine.models.read(delta_source))
    return engine


def describe(engine: LLMEngine) -> list[str]:
    """The start-up summary: what was loaded and how it will run."""
    lm = engine.loaded
    cfg = lm.config
    lines = [
        f"model {lm.source.name} ({lm.source.kind} at {lm.source.path}): {cfg.model_type} / {cfg.family} family, "
        f"{cfg.num_parameters / 1e6:.1f}M parameters, {cfg.num_layers} layers, hidden {cfg.hidden_size}, "
        f"heads {cfg.num_heads}/{cfg.num_kv_heads} kv",
    ]
    for model in engine.models.listed():
        role = "the --model" if model.parent is None else f"a delta served beside {model.parent}"
        what = model.delta.describe() if model.delta is not None else f"{model.name}: the base alone (no experts)"
        lines.append(f"serves {role}: {what}")
    lines.append(f"expert dispatch {engine.runner.model.layers[0].mlp.dispatch}")
    for note in lm.source.notes:
        lines.append(f"note: {note}")
    lines.append(
        f"dtype {str(lm.dtype).removeprefix('torch.')}, quantization: {lm.quantization.describe()}, device {lm.device}, "
        f"weights {lm.weight_bytes / 2**20:.0f} MiB"
    )
    kv_mib = engine.runner.kv_caches.numel() * engine.runner.kv_caches.element_size() / 2**20
    lines.append(
        f"KV cache: {engine.num_blocks} blocks x {engine.config.block_size} tokens "
        f"({kv_mib:.0f} MiB, {str(engine.runner.kv_caches.dtype).removeprefix('torch.')}), "
        f"max model len {engine.max_model_len}, max seqs {engine.config.max_num_seqs}, "
        f"token budget {engine.config.max_num_batched_tokens}/step, prefix caching "
        f"{'on' if engine.config.enable_prefix_caching else 'off'}"
    )
    if lm.device.type == "cpu":
        step = "C++ decode kernels" if engine.runner.decode_model is not None else "PyTorch"
        lines.append(f"CPU threads: {torch.get_num_threads()}, decode step: {step}")
    return lines


def build_server(
    load: LoadConfig,
    engine_cfg: EngineConfig,
    server_cfg: ServerConfig,
    chat_template: Path | None = None,
) -> Server:
    thread = EngineThread()  # loads the model, then runs the engine loop (see engine_thread.py)
    engine = thread.call(lambda: build_engine(load, engine_cfg, server_cfg.served_model_name))
    for line in describe(engine):
        logger.info(line)
    counts = engine.expert_load.snapshot
    async_engine = AsyncEngine(engine, max_queue_len=engine_cfg.max_queue_len, thread=thread)
    template = chat_template.read_text() if chat_template is not None else None
    formatter = ChatFormatter(engine.tokenizer, template)
    if formatter.uses_fallback:
        logger.info("the tokenizer has no chat template: using the Camelidae '### Human:' format")
    name = engine.models.primary.name
    metrics = ServerMetrics(async_engine.stats, counts)
    app = create_app(async_engine, formatter, name, server_cfg, metrics)
    return Server(app, async_engine, engine.loaded, name)
