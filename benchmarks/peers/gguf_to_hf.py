"""Benchmark-only: the bundled SmolLM2 GGUF as a Hugging Face bf16 directory (for vLLM's CPU build).

pesc-serve's own loader reads the GGUF (its Q4_1 matrices and Q8_0 tied embedding dequantized
to float32, no re-quantization), and the weights are written under the Llama checkpoint names
(``loader.placements``, the name map the loader itself uses) in bf16, with a LlamaForCausalLM
config and the file's tokenizer and chat template: the peer serves the weights our base
serves.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", default="smollm2", help="a dense GGUF alias or path pesc-serve loads")
    args = ap.parse_args()
    import torch
    from safetensors.torch import save_file

    from pesc_serve.config import LoadConfig
    from pesc_serve.models.loader import build_targets, load_model
    from pesc_serve.models.tokenizer import load_tokenizer
    from pesc_serve.registry import resolve_model

    source = resolve_model(args.model)
    lm = load_model(source, LoadConfig(model=args.model, dtype="float32", device="cpu", quantization="none"))
    tensors = {name: t.view().to(torch.bfloat16).contiguous() for name, t in build_targets(lm.model, lm.config).items()}
    args.out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(args.out / "model.safetensors"), metadata={"format": "pt"})
    config = {k: v for k, v in source.config.items() if k != "architectures"}
    config.update(architectures=["LlamaForCausalLM"], model_type="llama", torch_dtype="bfloat16")
    (args.out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    load_tokenizer(source).save_pretrained(str(args.out))
    print(f"wrote {args.out}: {len(tensors)} tensors, {sum(t.numel() for t in tensors.values()) / 1e6:.1f}M parameters, bf16")


if __name__ == "__main__":
    main()
