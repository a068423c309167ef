"""Write a model directory with a released checkpoint's shapes and no weights.

    python -m benchmarks.shaped_model camelidae-8x7b /tmp/camelidae-8x7b
    python -m pesc_serve --model /tmp/camelidae-8x7b --load-format dummy

For benchmarking the engine at real sizes without downloading 14+ GB: config.json carries the
geometry from DESIGN.md section 2, and a synthetic word-level tokenizer (one token per
vocabulary id, so any sampled id decodes) stands in for the real one.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SHAPES = {
    "camelidae-8x7b": dict(model_type="camelidae", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                           num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, num_experts=8, topk=2,
                           adapter_dim=512, moe_scaling=0.25, max_position_embeddings=4096, rms_norm_eps=1e-5),
    "sparsetral-16x7b": dict(model_type="sparsetral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=8, vocab_size=32000, num_experts=16, topk=4,
                             adapter_dim=512, moe_scaling=1.0, max_position_embeddings=32768, rms_norm_eps=1e-5,
                             rope_theta=1e6, sliding_window=None),
    "small": dict(model_type="camelidae", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                  num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, num_experts=8, topk=2,
                  adapter_dim=64, moe_scaling=0.25, max_position_embeddings=8192, rms_norm_eps=1e-5),
}
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def write_tokenizer(out: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    specials = ["<unk>", "<|im_start|>", "<|im_end|>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for i in range(len(specials), vocab_size):
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins pieces with spaces
    tok.add_special_tokens(specials)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>", "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>", "chat_template": CHATML,
    }, indent=2))


def write(shape: str, out: Path) -> Path:
    if shape not in SHAPES:
        raise SystemExit(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    out.mkdir(parents=True, exist_ok=True)
    cfg = {"architectures": ["LlamaForCausalLM"], "hidden_act": "silu", "tie_word_embeddings": False,
           "bos_token_id": 1, "eos_token_id": 2, **SHAPES[shape]}
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    write_tokenizer(out, cfg["vocab_size"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shape", choices=sorted(SHAPES))
    ap.add_argument("out", type=Path)
    args = ap.parse_args()
    print(write(args.shape, args.out))


if __name__ == "__main__":
    main()
