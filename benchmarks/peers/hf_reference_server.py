"""Benchmark peer: the authors' way of serving a PESC model.

Hugging Face transformers' eager Llama (the dense SmolLM2 base, dequantized from its GGUF),
each MLP replaced by the authors' PESC MLP (FFN once, ``repeat_interleave(k)``, a Python loop
over every expert with boolean masks), decoding with ``generate`` one request at a time behind
a minimal OpenAI-style HTTP wrapper (``/v1/completions`` and ``/v1/chat/completions``,
streamed or not).  This is a benchmark peer only, never part of the product.

    python benchmarks/peers/hf_reference_server.py --model camelidae --port 8100
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
import uuid

import torch
import torch.nn.functional as F
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from safetensors.torch import load_file
from sse_starlette.sse import EventSourceResponse
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, TextIteratorStreamer

from pesc_serve.models.gguf_reader import GGUFCheckpoint
from pesc_serve.models.tokenizer import load_tokenizer
from pesc_serve.registry import resolve_model


class AuthorsPescMLP(nn.Module):
    """The reference modeling code's MLP: dense FFN, then a loop over experts."""

    def __init__(self, dense_mlp: nn.Module, router: torch.Tensor, downs: list, ups: list, topk: int, scaling: float) -> None:
        super().__init__()
        self.dense = dense_mlp
        self.router = nn.Linear(router.shape[1], router.shape[0], bias=False)
        self.router.weight.data = router
        self.down = nn.ModuleList()
        self.up = nn.ModuleList()
        for d, u in zip(downs, ups):
            ld = nn.Linear(d.shape[1], d.shape[0], bias=False)
            ld.weight.data = d
            lu = nn.Linear(u.shape[1], u.shape[0], bias=False)
            lu.weight.data = u
            self.down.append(ld)
            self.up.append(lu)
        self.topk = topk
        self.scaling = scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        f = self.dense(x2)
        weights, selected = torch.topk(self.router(x2), self.topk, dim=-1)
        weights = torch.softmax(weights, dim=-1, dtype=torch.float32).to(x.dtype)
        flat = selected.view(-1)
        h = f.repeat_interleave(self.topk, dim=0)
        y = torch.empty_like(h)
        for e in range(len(self.down)):
            mask = flat == e
            y[mask] = h[mask] + self.scaling * self.up[e](F.gelu(self.down[e](h[mask])))
        out = (y.view(*weights.shape, -1) * weights.unsqueeze(-1)).sum(dim=1)
        return out.view(shape)


def merge_lora(hf: nn.Module, delta: dict[str, torch.Tensor], info: dict) -> None:
    """Fold a delta's LoRA pairs into transformers' weights: W += (alpha / rank) * B @ A (as PEFT's merge)."""
    stems = sorted(k[: -len(".lora_A.weight")] for k in delta if k.endswith(".lora_A.weight"))
    if not stems:
        return
    scaling = float(info["lora_alpha"]) / float(info["lora_rank"])
    params = dict(hf.named_parameters())
    with torch.no_grad():
        for stem in stems:
            weight = params[stem + ".weight"]
            a, b = delta[stem + ".lora_A.weight"].float(), delta[stem + ".lora_B.weight"].float()
            weight.copy_((weight.float() + scaling * (b @ a)).to(weight.dtype))


def load_reference(model: str, dtype: torch.dtype):
    source = resolve_model(model)
    base = source.base if source.kind == "delta" else source
    if base is None or base.kind != "gguf":
        raise SystemExit("this peer serves the bundled models (a GGUF base, optionally with a PESC delta)")
    # transformers' own Llama, filled with the GGUF's dequantized weights (the same tensors
    # pesc-serve loads; transformers' GGUF path would need accelerate).
    config = LlamaConfig(**{k: v for k, v in base.config.items() if k not in ("model_type", "architectures")})
    hf = LlamaForCausalLM(config)
    state = dict(GGUFCheckpoint(base.path).tensors())
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (config.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise SystemExit(f"weights do not fit transformers' Llama: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if config.tie_word_embeddings:
        hf.tie_weights()
    hf = hf.to(dtype)
    if source.kind == "delta":
        delta = load_file(str(source.path / "adapter_model.safetensors"))
        merge_lora(hf, delta, source.delta)
        cfg = source.config
        for i, layer in enumerate(hf.model.layers):
            p = f"model.layers.{i}.mlp.moe_adapter."
            downs = [delta[p + f"experts.expert_{e}.adapter_down.weight"].to(dtype) for e in range(cfg["num_experts"])]
            ups = [delta[p + f"experts.expert_{e}.adapter_up.weight"].to(dtype) for e in range(cfg["num_experts"])]
            layer.mlp = AuthorsPescMLP(layer.mlp, delta[p + "router.weight"].to(dtype), downs, ups, cfg["topk"], cfg["moe_scaling"])
    hf.eval()
    return hf, load_tokenizer(source)


def build_app(hf, tok, name: str) -> FastAPI:
    app = FastAPI()
    lock = asyncio.Lock()  # the authors' path serves one request at a time

    def prompt_ids(body: dict) -> list[int]:
        if "messages" in body:
            return tok.apply_chat_template(body["messages"], add_generation_prompt=True, tokenize=True, return_dict=False)
        p = body["prompt"]
        return list(p) if isinstance(p, list) else tok.encode(p)

    def generate_kwargs(body: dict, ids: list[int], streamer) -> dict:
        temp = float(body.get("temperature", 1.0))
        kw = dict(
            input_ids=torch.tensor([ids]),
            max_new_tokens=int(body.get("max_tokens") or 16),
            do_sample=temp > 0,
            streamer=streamer,
            pad_token_id=tok.eos_token_id,
        )
        if temp > 0:
            kw["temperature"] = temp
        if body.get("ignore_eos"):
            kw["eos_token_id"] = None
            kw["min_new_tokens"] = kw["max_new_tokens"]
        return kw

    def piece(oid: str, chat: bool, text: str, finish: str | None) -> dict:
        choice = {"index": 0, "finish_reason": finish}
        choice.update({"delta": {"content": text}} if chat else {"text": text})
        obj = "chat.completion.chunk" if chat else "text_completion"
        return {"id": oid, "object": obj, "created": int(time.time()), "model": name, "choices": [choice]}

    async def run_locked(body: dict, ids: list[int], counts: dict):
        """Yield text pieces of one generation while holding the one-at-a-time lock."""
        async with lock:
            streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
            kwargs = generate_kwargs(body, ids, streamer)

            def work() -> None:
                with torch.inference_mode():
                    out = hf.generate(**kwargs)
                counts["completion_tokens"] = int(out.shape[1]) - len(ids)

            thread = threading.Thread(target=work, daemon=True)
            thread.start()
            loop = asyncio.get_running_loop()
            it = iter(streamer)
            while True:
                text = await loop.run_in_executor(None, lambda: next(it, None))
                if text is None:
                    break
                if text:
                    yield text
            await loop.run_in_executor(None, thread.join)

    async def handle(request: Request, chat: bool):
        body = await request.json()
        ids = prompt_ids(body)
        oid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        counts: dict = {"prompt_tokens": len(ids)}

        def final(text: str) -> dict:
            body_ = piece(oid, chat, text, "length")
            counts["total_tokens"] = counts["prompt_tokens"] + counts.get("completion_tokens", 0)
            body_["usage"] = counts
            return body_

        if body.get("stream"):
            async def events():
                async for text in run_locked(body, ids, counts):
                    yield json.dumps(piece(oid, chat, text, None))
                yield json.dumps(final(""))
                yield "[DONE]"

            return EventSourceResponse(events(), sep="\n")
        text = "".join([t async for t in run_locked(body, ids, counts)])
        return JSONResponse(final(text))

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await handle(request, chat=True)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model"}]}

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    return app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="camelidae")
    ap.add_argument("--port", type=int, default=8100)
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    hf, tok = load_reference(args.model, getattr(torch, args.dtype))
    uvicorn.run(build_app(hf, tok, args.model), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
