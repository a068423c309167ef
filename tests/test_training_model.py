"""Training on tiny random models: craft identity, trainability, export round trip, runs, eval.

Everything here uses the tiny checkpoints of ``tests/fixtures/tiny_checkpoints.py`` (hidden
64, 2 layers) so the whole module runs in seconds on CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pesc_serve.config import LoadConfig
from pesc_serve.layers.attention import AttentionMetadata, PrefillChunk
from pesc_serve.models.loader import load_model
from pesc_serve.registry import resolve_model
from tests.fixtures.tiny_checkpoints import make_checkpoint
from training.average import average_deltas
from training.craft import craft
from training.data import Example, write_jsonl
from training.export import delta_tensors, write_delta
from training.lora import LoRALinear
from training.trainable import TrainableConfig, TrainableModel
from training.trainer import TrainConfig, train

NUM_EXPERTS, TOPK, ADAPTER_DIM = 4, 2, 8


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory) -> Path:
    return make_checkpoint("llama", tmp_path_factory.mktemp("dense"), seed=3, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def crafted_dir(dense_dir, tmp_path_factory) -> Path:
    return craft(str(dense_dir), tmp_path_factory.mktemp("crafted"), NUM_EXPERTS, TOPK, ADAPTER_DIM, 0.25, seed=1,
                 dtype=torch.float32)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    """A learnable toy task in the tiny tokenizer's vocabulary: repeat a number word."""
    words = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
    examples = []
    for i in range(64):
        w = words[i % len(words)]
        examples.append(Example(({"role": "user", "content": f"Please count: {w}"},
                                 {"role": "assistant", "content": f"The robot said {w} {w}."}), "toy"))
    path = tmp_path_factory.mktemp("data") / "toy.jsonl"
    write_jsonl(path, examples)
    return path


def _load(path, dtype="float32"):
    return load_model(resolve_model(str(path)), LoadConfig(model=str(path), dtype=dtype, device="cpu"))


@torch.no_grad()
def _serving_logits(lm, ids: list[int]) -> torch.Tensor:
    m, cfg = lm.model, lm.config
    kv = torch.zeros(cfg.num_layers, 2, len(ids), cfg.num_kv_heads, cfg.head_dim)
    t = len(ids)
    meta = AttentionMetadata(slot_mapping=torch.arange(t), prefills=[PrefillChunk(0, t)])
    return m.compute_logits(m(torch.tensor(ids), torch.arange(t), kv, meta))


def _tokens(n: int, seed: int = 0) -> list[int]:
    return torch.randint(3, 300, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _randomise(tm: TrainableModel, seed: int = 0) -> None:
    """Make every trainable tensor nonzero, as after training (bf16-exact, so export is lossless)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in tm.trainable_parameters():
            p.copy_((torch.randn(p.shape, generator=g) * 0.1).to(torch.bfloat16).float())


# --- craft -----------------------------------------------------------------------------------


def test_crafted_model_decodes_exactly_like_its_base(dense_dir, crafted_dir):
    dense, pesc = _load(dense_dir), _load(crafted_dir)
    assert pesc.delta.num_experts == NUM_EXPERTS and dense.delta is None
    experts = pesc.model.layers[0].mlp.experts[0]
    assert experts.up.abs().sum() == 0 and experts.down.abs().sum() > 0 and experts.router.abs().sum() > 0
    bound = 1 / 64**0.5  # kaiming-uniform(a=sqrt(5)) over fan-in 64
    assert experts.router.abs().max() <= bound and experts.down.abs().max() <= bound
    ids = _tokens(20)
    assert torch.equal(_serving_logits(dense, ids), _serving_logits(pesc, ids))


def test_craft_cli_rejects_pesc_base(tmp_path, crafted_dir, capsys):
    from training.__main__ import main

    assert main(["craft", "--base", str(crafted_dir), "--out", str(tmp_path / "x")]) == 2
    assert "already a PESC model" in capsys.readouterr().err


# --- trainable wrapper -----------------------------------------------------------------------


def _randomised_eval_model(crafted_dir: Path) -> TrainableModel:
    """The crafted model made trainable, with random deltas (so experts matter), dropout off."""
    tm = TrainableModel(_load(crafted_dir).model, TrainableConfig(seed=0))
    _randomise(tm)
    tm.eval()
    return tm


def test_trainable_forward_matches_serving_model(crafted_dir):
    """Our full-sequence forward == the serving model's paged forward (eval mode, random deltas)."""
    tm = _randomised_eval_model(crafted_dir)
    ids = _tokens(12, seed=2)
    with torch.no_grad():
        ours = tm.compute_logits(tm(torch.tensor([ids])).hidden[0])
    out = crafted_dir.parent / "delta_match"
    write_delta(tm, resolve_model(str(crafted_dir)), str(crafted_dir), out, {"status": "trained", "note": "test"})
    served = _serving_logits(_load(out), ids)
    assert (ours - served).abs().max().item() < 1e-4


def test_right_padding_does_not_change_real_tokens(crafted_dir):
    tm = _randomised_eval_model(crafted_dir)
    ids = _tokens(7, seed=4)
    with torch.no_grad():
        alone = tm(torch.tensor([ids]))
        padded = tm(torch.tensor([ids + [0, 0, 0], _tokens(10, seed=5)]))
    assert torch.allclose(alone.hidden[0], padded.hidden[0, :7], atol=1e-5)
    assert torch.equal(alone.router_topk[1][0], padded.router_topk[1][0, :7])


def test_only_lora_routers_and_adapters_train(crafted_dir):
    lm = _load(crafted_dir)
    tm = TrainableModel(lm.model, TrainableConfig(seed=0))
    names = [n for n, _ in tm.trainable_parameters()]
    assert names and all(".lora_" in n or n.startswith("banks.") for n in names)
    assert sum(".lora_A." in n for n in names) == 2 * 7  # 2 layers x q,k,v,o,gate,up,down
    frozen = [n for n, p in tm.named_parameters() if not p.requires_grad]
    for piece in ("embed_tokens", "norm.weight", "lm_head", "qkv_proj.base", "gate_up_proj.base", "layernorm"):
        assert any(piece in n for n in frozen), piece
    assert all(p.dtype == torch.float32 for _, p in tm.trainable_parameters())
    before = {n: p.detach().clone() for n, p in tm.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for _, p in tm.trainable_parameters()], lr=1e-2)
    tm.train()
    for _ in range(2):  # two steps: B and adapter_up move first, then A and adapter_down get gradients
        out = tm(torch.tensor([_tokens(10)]))
        loss = tm.compute_logits(out.hidden).logsumexp(-1).mean() + sum(l.float().pow(2).mean() for l in out.router_logits)
        loss.backward()
        grads = {n: p.grad.abs().sum().item() for n, p in tm.trainable_parameters()}
        opt.step()
        opt.zero_grad()
    assert all(g > 0 for g in grads.values()), [n for n, g in grads.items() if g == 0]
    after = {n: p for n, p in tm.named_parameters() if not p.requires_grad}
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_nf4_base_trains(crafted_dir):
    import bitsandbytes as bnb

    tm = TrainableModel(_load(crafted_dir, dtype="bfloat16").model, TrainableConfig(quantization="nf4", seed=0))
    qkv = tm.model.layers[0].self_attn.qkv_proj
    assert isinstance(qkv, LoRALinear) and isinstance(qkv.base, bnb.nn.Linear4bit)
    assert isinstance(tm.model.layers[1].mlp.ffn.down_proj.base, bnb.nn.Linear4bit)
    out = tm(torch.tensor([_tokens(6)]))
    tm.compute_logits(out.hidden).logsumexp(-1).mean().backward()
    assert qkv.lora_B["q_proj"].grad.abs().sum() > 0
    assert tm.banks[0].adapter_up.grad.abs().sum() > 0


def test_dense_control_has_lora_only(dense_dir):
    tm = TrainableModel(_load(dense_dir).model, TrainableConfig(seed=0))
    assert not tm.has_experts
    assert all(".lora_" in n for n, _ in tm.trainable_parameters())
    assert tm(torch.tensor([_tokens(5)])).router_logits == []


# --- export ----------------------------------------------------------------------------------


def test_delta_layout_and_size(crafted_dir, tmp_path):
    tm = TrainableModel(_load(crafted_dir).model, TrainableConfig(seed=0))
    tensors = delta_tensors(tm)
    assert tensors["model.layers.0.mlp.moe_adapter.router.weight"].shape == (NUM_EXPERTS, 64)
    assert tensors["model.layers.1.mlp.moe_adapter.experts.expert_3.adapter_down.weight"].shape == (ADAPTER_DIM, 64)
    assert tensors["model.layers.1.mlp.moe_adapter.experts.expert_3.adapter_up.weight"].shape == (64, ADAPTER_DIM)
    assert tensors["model.layers.0.self_attn.k_proj.lora_A.weight"].shape == (4, 64)
    assert tensors["model.layers.0.self_attn.k_proj.lora_B.weight"].shape == (32, 4)
    assert tensors["model.layers.0.mlp.down_proj.lora_A.weight"].shape == (4, 128)
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())


def test_export_reload_round_trip_and_merge(crafted_dir, data_file, tmp_path):
    """train -> delta -> server loader, and --merge -> full HF dir: same logits as the trained model."""
    cfg = TrainConfig(model=str(crafted_dir), out=tmp_path / "delta", data=(str(data_file),), steps=2, batch_size=4,
                      micro_batch_size=2, lr=1e-2, progress=False)
    train(cfg, log=lambda s: None)
    delta_cfg = json.loads((tmp_path / "delta" / "config.json").read_text())
    assert delta_cfg["pesc_delta"]["status"] == "trained" and delta_cfg["pesc_delta"]["lora_rank"] == 4
    assert delta_cfg["num_experts"] == NUM_EXPERTS and Path(delta_cfg["base_model_name_or_path"]).is_dir()
    merged_cfg = TrainConfig(**{**cfg.__dict__, "out": tmp_path / "merged", "merge": True})
    train(merged_cfg, log=lambda s: None)
    assert (tmp_path / "merged" / "model.safetensors").is_file() and (tmp_path / "merged" / "tokenizer.json").is_file()
    ids = _tokens(16, seed=9)
    a = _serving_logits(_load(tmp_path / "delta"), ids)
    b = _serving_logits(_load(tmp_path / "merged"), ids)
    assert (a - b).abs().max().item() < 5e-2  # merged weights stored in bf16
    assert (a - _serving_logits(_load(crafted_dir), ids)).abs().max().item() > 1e-3  # training changed it


# --- training runs ---------------------------------------------------------------------------


def test_tiny_training_run_loss_falls_and_is_reproducible(crafted_dir, data_file, tmp_path):
    def run(out: Path):
        cfg = TrainConfig(model=str(crafted_dir), out=out, data=(str(data_file),), steps=24, batch_size=8,
                          micro_batch_size=4, lr=1e-2, warmup_ratio=0.1, save_every=100, progress=False)
        return train(cfg, log=lambda s: None)

    r1 = run(tmp_path / "a")
    first, last = sum(r1.losses[:4]) / 4, sum(r1.losses[-4:]) / 4
    assert last < 0.6 * first, r1.losses
    assert all(a > 0 for a in r1.aux_losses)
    r2 = run(tmp_path / "b")
    assert r1.losses == r2.losses
    log = [json.loads(line) for line in (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 24 and len(log[0]["load"]) == NUM_EXPERTS and log[0]["lr"] < log[-1]["lr"]


def test_resume_continues_exactly(crafted_dir, data_file, tmp_path, monkeypatch):
    from training import trainer

    base = dict(model=str(crafted_dir), data=(str(data_file),), steps=6, batch_size=4, micro_batch_size=2, lr=1e-2,
                save_every=3, progress=False)
    full = train(TrainConfig(out=tmp_path / "full", **base), log=lambda s: None)

    class Killed(Exception):
        pass

    real_save = trainer._save_checkpoint

    def save_then_die(path, tm, opt, sched, step, cfg, history):
        real_save(path, tm, opt, sched, step, cfg, history)
        if step == 3:
            raise Killed

    monkeypatch.setattr(trainer, "_save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        train(TrainConfig(out=tmp_path / "run", **base), log=lambda s: None)
    monkeypatch.setattr(trainer, "_save_checkpoint", real_save)
    resumed = train(TrainConfig(out=tmp_path / "run", resume=True, **base), log=lambda s: None)
    assert resumed.losses == full.losses
    a = (tmp_path / "full" / "adapter_model.safetensors").read_bytes()
    assert a == (tmp_path / "run" / "adapter_model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="different settings"):
        train(TrainConfig(out=tmp_path / "run", resume=True, **{**base, "lr": 5e-3}), log=lambda s: None)
    longer = train(TrainConfig(out=tmp_path / "run", resume=True, **{**base, "steps": 8}), log=lambda s: None)
    assert len(longer.losses) == 8 and longer.losses[:6] == full.losses


def test_decay_ends_the_run_at_a_small_learning_rate_and_fixes_its_length(crafted_dir, data_file, tmp_path):
    base = dict(model=str(crafted_dir), data=(str(data_file),), steps=8, batch_size=4, micro_batch_size=2, lr=1e-2,
                decay_ratio=0.5, save_every=4, progress=False)
    full = train(TrainConfig(out=tmp_path / "full", **base), log=lambda s: None)
    log = [json.loads(line) for line in (tmp_path / "full" / "train_log.jsonl").read_text().splitlines()]
    assert [round(r["lr"] / 1e-2, 3) for r in log[-4:]] == [1.0, 0.75, 0.5, 0.25]
    info = json.loads((tmp_path / "full" / "config.json").read_text())["pesc_delta"]
    assert info["decay_ratio"] == 0.5
    half = dict(base, save_every=100, steps=4)
    train(TrainConfig(out=tmp_path / "half", **half), log=lambda s: None)
    with pytest.raises(ValueError, match="decays its learning rate over a run of 4 steps"):
        train(TrainConfig(out=tmp_path / "half", resume=True, **{**half, "steps": 8}), log=lambda s: None)
    old = dict(base, decay_ratio=0.0, steps=4)
    train(TrainConfig(out=tmp_path / "old", **old), log=lambda s: None)
    state = torch.load(tmp_path / "old" / "checkpoint.pt", weights_only=True)
    del state["config"]["decay_ratio"]  # a checkpoint from before the flag: it ran a constant schedule
    torch.save(state, tmp_path / "old" / "checkpoint.pt")
    assert train(TrainConfig(out=tmp_path / "old", resume=True, **old), log=lambda s: None).steps == 4
    with pytest.raises(ValueError, match="decay_ratio"):
        train(TrainConfig(out=tmp_path / "old", resume=True, **{**old, "decay_ratio": 0.5}), log=lambda s: None)


def test_a_second_stage_starts_from_the_first_stages_weights(crafted_dir, data_file, tmp_path):
    """--init-from: new data and schedule, the first stage's routers, adapters and LoRA."""
    base = dict(model=str(crafted_dir), data=(str(data_file),), batch_size=4, micro_batch_size=2, lr=1e-2,
                save_every=100, progress=False)
    first = train(TrainConfig(out=tmp_path / "first", steps=6, **base), log=lambda s: None)
    cold = train(TrainConfig(out=tmp_path / "cold", steps=2, **base), log=lambda s: None)
    warm = train(TrainConfig(out=tmp_path / "warm", steps=2, init_from=tmp_path / "first" / "checkpoint.pt", **base),
                 log=lambda s: None)
    assert warm.losses[0] < cold.losses[0] and warm.losses[0] <= first.losses[0]
    with pytest.raises(ValueError, match="init-from"):
        bad = tmp_path / "bad.pt"
        torch.save({"trainable": {"nope": torch.zeros(1)}}, bad)
        train(TrainConfig(out=tmp_path / "bad", steps=1, init_from=bad, **base), log=lambda s: None)


def test_average_of_a_run_and_its_continuation(crafted_dir, dense_dir, data_file, tmp_path):
    """``python -m training average``: the weighted mean of a run and its --init-from
    continuation, tensor by tensor; it serves, its provenance is recorded, and deltas of
    different shapes or kinds are refused by name."""
    from safetensors.torch import load_file

    from training.__main__ import main

    base = dict(model=str(crafted_dir), data=(str(data_file),), batch_size=4, micro_batch_size=2, lr=1e-2,
                save_every=100, progress=False)
    train(TrainConfig(out=tmp_path / "a", steps=3, **base), log=lambda s: None)
    train(TrainConfig(out=tmp_path / "b", steps=3, decay_ratio=0.9, init_from=tmp_path / "a" / "checkpoint.pt",
                      **base), log=lambda s: None)
    assert main(["average", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "m"),
                 "--weights", "1,3"]) == 0
    a, b, m = (load_file(tmp_path / d / "adapter_model.safetensors") for d in "abm")
    assert m.keys() == a.keys() and any((a[k] != b[k]).any() for k in a)
    for k in a:
        want = (0.25 * a[k].float() + 0.75 * b[k].float()).to(a[k].dtype)
        assert torch.equal(m[k], want), k
    info = json.loads((tmp_path / "m" / "config.json").read_text())["pesc_delta"]
    assert [x["weight"] for x in info["averaged_from"]] == [0.25, 0.75]
    assert json.loads((tmp_path / "b" / "config.json").read_text())["pesc_delta"]["init_from"].endswith("checkpoint.pt")
    ids = _tokens(9)
    la, lb, lm = (_serving_logits(_load(tmp_path / d), ids) for d in "abm")
    assert (lm - la).abs().max() > 0 and (lm - lb).abs().max() > 0

    dense = train(TrainConfig(model=str(dense_dir), out=tmp_path / "lora", data=(str(data_file),), steps=1,
                              batch_size=4, micro_batch_size=2, save_every=100, progress=False), log=lambda s: None)
    with pytest.raises(ValueError, match="one training trajectory"):
        average_deltas([tmp_path / "a", dense.out], tmp_path / "x")
    wide = train(TrainConfig(out=tmp_path / "wide", steps=1, lora_rank=8, **base), log=lambda s: None)
    with pytest.raises(ValueError, match="lora_rank"):
        average_deltas([tmp_path / "a", wide.out], tmp_path / "x")
    with pytest.raises(ValueError, match="at least two"):
        average_deltas([tmp_path / "a"], tmp_path / "x")
    with pytest.raises(ValueError, match="--weights"):
        average_deltas([tmp_path / "a", tmp_path / "b"], tmp_path / "x", [1.0])
    with pytest.raises(ValueError, match="not a trained delta"):
        average_deltas([tmp_path / "a", tmp_path / "nowhere"], tmp_path / "x")
    assert main(["average", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "y"),
                 "--weights", "1,x"]) == 2


def test_expert_lr_moves_routers_and_adapters_alone(crafted_dir, dense_dir, data_file, tmp_path):
    """--expert-lr sets the routers' and adapters' step size apart from LoRA's: at a tiny expert
    rate the routed part barely moves while LoRA trains as before; a dense model refuses it."""
    from safetensors.torch import load_file

    base = dict(model=str(crafted_dir), data=(str(data_file),), steps=3, batch_size=4, micro_batch_size=2, lr=1e-2,
                save_every=100, progress=False)
    same = train(TrainConfig(out=tmp_path / "same", **base), log=lambda s: None)
    slow = train(TrainConfig(out=tmp_path / "slow", expert_lr=1e-9, **base), log=lambda s: None)
    crafted = delta_tensors(TrainableModel(_load(crafted_dir).model, TrainableConfig(seed=0)))

    def moved(run: str, part: str) -> float:
        t = load_file(tmp_path / run / "adapter_model.safetensors")
        return max((t[k].float() - crafted[k].float()).abs().max().item() for k in t if part in k)

    assert moved("slow", "adapter_up") < 1e-3 < moved("same", "adapter_up")
    assert moved("slow", "router") < 1e-3 < moved("same", "router")
    assert moved("slow", "lora_B") > 1e-3 and same.losses[0] == slow.losses[0]
    log = [json.loads(line) for line in (tmp_path / "slow" / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["lr"] == 1e-2 and log[-1]["expert_lr"] == 1e-9 and "expert_lr" not in json.loads(
        (tmp_path / "same" / "train_log.jsonl").read_text().splitlines()[-1])
    info = json.loads((tmp_path / "slow" / "config.json").read_text())["pesc_delta"]
    assert info["expert_lr"] == 1e-9
    with pytest.raises(ValueError, match="has no experts"):
        train(TrainConfig(**{**base, "model": str(dense_dir)}, out=tmp_path / "d", expert_lr=1e-3), log=lambda s: None)
    with pytest.raises(ValueError, match="--expert-lr must be positive"):
        TrainConfig(**base, out=tmp_path / "x", expert_lr=0.0)


def test_dense_control_run_exports_lora_delta(dense_dir, data_file, tmp_path):
    train(TrainConfig(model=str(dense_dir), out=tmp_path / "d", data=(str(data_file),), steps=2, batch_size=4,
                      micro_batch_size=4, progress=False), log=lambda s: None)
    cfg = json.loads((tmp_path / "d" / "config.json").read_text())
    assert "num_experts" not in cfg and cfg["pesc_delta"]["lora_alpha"] == 8.0
    lm = _load(tmp_path / "d")
    assert lm.delta is not None and lm.delta.experts is None and lm.delta.lora


def test_train_cli_reports_bad_data(tmp_path, crafted_dir, capsys):
    from training.__main__ import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no chat here"}\n')
    code = main(["train", "--model", str(crafted_dir), "--out", str(tmp_path / "o"), "--data", str(bad), "--no-progress"])
    assert code == 2 and "bad.jsonl:1: unknown record format" in capsys.readouterr().err


# --- evaluation ------------------------------------------------------------------------------


@pytest.mark.parametrize("serving", ["defaults", "offline"])
def test_eval_writes_table_json_and_heatmap(dense_dir, crafted_dir, tmp_path, serving):
    """Through a real pesc-serve with its default flags (routing from its metrics), and offline."""
    from training.evaluate import EvalConfig, run_eval

    cfg = EvalConfig(serving=serving, dtype="float32", limit=2, batch_size=4)
    results = run_eval([("base", str(dense_dir)), ("pesc", str(crafted_dir))], tmp_path, cfg, log=lambda s: None)
    assert [r.label for r in results] == ["base", "pesc"]
    # The crafted model is the base: identical replies, identical scores.
    assert results[0].replies == results[1].replies and results[0].suites == results[1].suites
    table = (tmp_path / "eval_table.md").read_text()
    assert "maths: arithmetic" in table and "| base (" in table
    routing = json.loads((tmp_path / "routing_pesc.json").read_text())
    assert len(routing["share_all"]) == 2 and len(routing["share_all"][0]) == NUM_EXPERTS
    assert abs(sum(routing["share"]["maths"][0]) - 1) < 1e-4
    assert (tmp_path / "routing_pesc.png").stat().st_size > 1000
