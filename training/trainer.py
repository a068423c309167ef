"""QLoRA-style instruction tuning of a PESC (or, as the dense control, a dense) model.

Frozen base (bf16, or NF4 with ``quantization="nf4"``), LoRA on the seven projections,
float32 routers and adapters; loss on answer tokens only plus the Switch load-balancing
loss; gradient accumulation over micro-batches (token-weighted, so accumulation does not
change the gradient); AdamW without weight decay at a constant learning rate after a
linear warm-up.  A fixed seed fixes the data order, the initialisation and the dropout
masks, and a resumed run continues bit-for-bit where the checkpoint stopped.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from pesc_serve.config import LoadConfig
from pesc_serve.models.loader import load_model
from pesc_serve.models.tokenizer import load_tokenizer
from pesc_serve.registry import resolve_model
from training.data import collate, encode_all, iter_steps, load_data_file
from training.export import base_pointer, write_delta, write_merged
from training.lora import LORA_TARGETS, LoraConfig
from training.losses import answer_loss, load_balancing_loss
from training.trainable import TrainableConfig, TrainableModel

CHECKPOINT = "checkpoint.pt"
EXPERT_PARAMS = ("router", "adapter_down", "adapter_up")  # TrainableModel's names for the routed part
METRICS = "train_log.jsonl"
# Settings a resumed run must share with the checkpoint it continues.  The length of the run
# (--steps/--epochs) may grow when the learning rate is constant after warm-up: resuming with
# more steps simply trains longer on the same deterministic data order.  With --decay-ratio the
# length places the decay, so a resumed decaying run must keep it.
RESUME_KEYS = ("model", "data", "batch_size", "micro_batch_size", "max_len", "lr", "expert_lr", "warmup_ratio", "decay_ratio", "lora_rank",
               "lora_alpha", "lora_dropout", "adapter_dropout", "aux_loss_coef", "quantization", "dtype", "seed",
               "max_examples")


@dataclass(frozen=True)
class TrainConfig:
    model: str
    out: Path
    data: tuple[str, ...]
    steps: int | None = None
    epochs: float = 1.0
    batch_size: int = 16
    micro_batch_size: int = 8
    max_len: int = 256
    lr: float = 2e-4
    # Routers and adapters start from a random craft while LoRA starts at zero over a trained
    # base, so the two may want different step sizes (issue #16's separate-learning-rate knob).
    expert_lr: float | None = None  # None: the same as lr
    warmup_ratio: float = 0.03
    # The last decay_ratio of the steps take the learning rate linearly down to zero (0: constant
    # after warm-up).  Stopping at full learning rate leaves the final weights wherever the last
    # batches pushed them; annealing settles them, so one run says more about its recipe.
    decay_ratio: float = 0.0
    lora_rank: int = 4
    lora_alpha: float = 8.0
    lora_dropout: float = 0.1
    lora_targets: tuple[str, ...] = LORA_TARGETS
    adapter_dropout: float = 0.1
    aux_loss_coef: float = 0.01
    max_grad_norm: float = 1.0
    quantization: str = "none"
    dtype: str = "bfloat16"
    seed: int = 0
    save_every: int = 50
    resume: bool = False
    init_from: Path | None = None  # another run's checkpoint.pt: start from its routers, adapters and LoRA
    merge: bool = False
    max_examples: int | None = None
    note: str = ""
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.data:
            raise ValueError("--data: give at least one .json/.jsonl file (build the offline mixture with `python -m training data`)")
        if self.batch_size < 1 or self.micro_batch_size < 1 or self.batch_size % self.micro_batch_size:
            raise ValueError(f"--batch-size ({self.batch_size}) must be a positive multiple of --micro-batch-size ({self.micro_batch_size})")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {self.steps}")
        if self.epochs <= 0:
            raise ValueError(f"--epochs must be positive, got {self.epochs}")
        if self.max_len < 8:
            raise ValueError(f"--max-len must be >= 8, got {self.max_len}")
        if self.lr <= 0 or not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"need --lr > 0 and 0 <= --warmup-ratio < 1 (got {self.lr}, {self.warmup_ratio})")
        if not 0 <= self.decay_ratio <= 1 or self.warmup_ratio + self.decay_ratio > 1:
            raise ValueError(f"need 0 <= --decay-ratio <= 1 and --warmup-ratio + --decay-ratio <= 1 "
                             f"(got {self.decay_ratio}, {self.warmup_ratio})")
        if self.expert_lr is not None and self.expert_lr <= 0:
            raise ValueError(f"--expert-lr must be positive, got {self.expert_lr}")
        if self.aux_loss_coef < 0:
            raise ValueError(f"--aux-loss-coef must be >= 0, got {self.aux_loss_coef}")
        if self.dtype not in ("bfloat16", "float32"):
            raise ValueError(f"--dtype must be bfloat16 or float32, got {self.dtype!r}")
        if self.save_every < 1:
            raise ValueError(f"--save-every must be >= 1, got {self.save_every}")

    def lora(self) -> LoraConfig:
        return LoraConfig(self.lora_rank, self.lora_alpha, self.lora_dropout, tuple(self.lora_targets))

    def resume_view(self) -> dict:
        d = asdict(self)
        d["data"] = [str(p) for p in self.data]
        return {k: d[k] for k in RESUME_KEYS}


@dataclass
class TrainResult:
    out: Path
    steps: int
    losses: list[float] = field(default_factory=list)
    aux_losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    train_tokens: int = 0
    num_examples: int = 0


def lr_multiplier(step: int, total_steps: int, warmup: int, decay: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based) as a fraction of --lr: a linear
    warm-up over ``warmup`` steps, flat, then a linear fall over the last ``decay`` steps that
    reaches zero after the final step (warm-up, stable, decay)."""
    rise = min(1.0, (step + 1) / warmup)
    if decay <= 0:
        return rise
    return min(rise, max(0.0, (total_steps - step) / decay))


def _save_checkpoint(path: Path, tm: TrainableModel, opt, sched, step: int, cfg: TrainConfig, history: dict) -> None:
    state = {
        "step": step,
        "trainable": tm.trainable_state(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "config": cfg.resume_view(),
        "history": history,
    }
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _load_checkpoint(path: Path, tm: TrainableModel, opt, sched, cfg: TrainConfig) -> tuple[int, dict]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    saved = state["config"]
    older = {"decay_ratio": 0.0}  # checkpoints written before the key existed ran a constant schedule
    diff = [k for k in RESUME_KEYS if saved.get(k, older.get(k)) != cfg.resume_view()[k]]
    if diff:
        raise ValueError(f"--resume: {path} was written with different settings ({', '.join(diff)}); "
                         f"use the same flags or a new --out")
    tm.load_trainable_state(state["trainable"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    return int(state["step"]), state["history"]


@dataclass
class _Run:
    """Everything a training loop needs, built once by :func:`_prepare`."""

    source: object
    tokenizer: object
    encoded: list
    tm: TrainableModel
    params: list[torch.nn.Parameter]
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    total_steps: int
    step: int
    history: dict


def _prepare(cfg: TrainConfig, log: Callable[[str], None]) -> _Run:
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    source = resolve_model(cfg.model)
    if not cfg.merge:
        base_pointer(source, cfg.model)  # fail before training when a delta could not be written
    examples = [ex for path in cfg.data for ex in load_data_file(Path(path))]
    if cfg.max_examples is not None:
        examples = examples[: cfg.max_examples]
    tokenizer = load_tokenizer(source)
    encoded, dropped = encode_all(tokenizer, examples, cfg.max_len)
    lm = load_model(source, LoadConfig(model=cfg.model, dtype=cfg.dtype, device="cpu", quantization="none"),
                    max_positions=max(cfg.max_len, 64))
    tm = TrainableModel(lm.model, TrainableConfig(cfg.lora(), cfg.adapter_dropout, cfg.quantization, cfg.seed))
    params = [p for _, p in tm.trainable_parameters()]
    total_steps = cfg.steps or max(1, math.floor(cfg.epochs * len(encoded) / cfg.batch_size))
    warmup = max(1, round(cfg.warmup_ratio * total_steps))
    decay = round(cfg.decay_ratio * total_steps)
    opt = torch.optim.AdamW(_param_groups(tm, cfg), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_multiplier(s, total_steps, warmup, decay))
    run = _Run(source, tokenizer, encoded, tm, params, opt, sched, total_steps, 0,
               {"loss": [], "aux": [], "tokens": 0, "seconds": 0.0, "total_steps": total_steps})
    cfg.out.mkdir(parents=True, exist_ok=True)
    ckpt = cfg.out / CHECKPOINT
    if cfg.resume and ckpt.is_file():
        run.step, run.history = _load_checkpoint(ckpt, tm, opt, sched, cfg)
        if run.step > total_steps:
            raise ValueError(f"--resume: {ckpt} is already at step {run.step}, beyond --steps {total_steps}")
        planned = run.history.setdefault("total_steps", total_steps)
        if cfg.decay_ratio and planned != total_steps:
            raise ValueError(f"--resume: {ckpt} decays its learning rate over a run of {planned} steps; "
                             f"resume it with that length (here {total_steps} steps from --steps/--epochs)")
        log(f"resumed from {ckpt} at step {run.step}/{total_steps}")
    else:
        if cfg.resume:
            log(f"--resume: no checkpoint in {cfg.out}, starting from step 0")
        (cfg.out / METRICS).unlink(missing_ok=True)
        if cfg.init_from is not None:  # a second stage: new data and schedule, the first stage's weights
            state = torch.load(cfg.init_from, map_location="cpu", weights_only=True)
            try:
                tm.load_trainable_state(state["trainable"])
            except (KeyError, RuntimeError, ValueError) as exc:
                raise ValueError(f"--init-from {cfg.init_from}: not a checkpoint of this model ({exc})") from None
            log(f"started from the trainable weights of {cfg.init_from} (step {state.get('step')})")
    log(f"{'PESC' if tm.has_experts else 'dense'} training of {cfg.model}: {len(encoded)} examples ({dropped} "
        f"dropped: no answer within --max-len {cfg.max_len}), {total_steps} steps x {cfg.batch_size} examples, "
        f"{sum(p.numel() for p in params) / 1e6:.2f}M trainable parameters, base {cfg.dtype}"
        f"{' NF4' if cfg.quantization == 'nf4' else ''}")
    return run


def _param_groups(tm: TrainableModel, cfg: TrainConfig) -> list[dict]:
    """LoRA first (its rate is the one logged), then routers and adapters at ``expert_lr``."""
    named = tm.trainable_parameters()
    if cfg.expert_lr is None:
        return [{"params": [p for _, p in named]}]
    expert = [p for n, p in named if n.rsplit(".", 1)[-1] in EXPERT_PARAMS]
    if not expert:
        raise ValueError(f"--expert-lr: {cfg.model} has no experts (a dense model trains LoRA only; use --lr)")
    ids = {id(p) for p in expert}
    return [{"params": [p for _, p in named if id(p) not in ids]}, {"params": expert, "lr": cfg.expert_lr}]


def _train_step(run: _Run, micro_batches: list, pad_id: int, cfg: TrainConfig) -> dict:
    """One optimizer step over its micro-batches; returns the step's metrics record."""
    tm = run.tm
    batches = [collate(mb, pad_id) for mb in micro_batches]
    answer_tokens = max(sum(b.num_answer_tokens for b in batches), 1)
    loss_sum, aux_sum, load = 0.0, 0.0, None
    for b in batches:
        out = tm(b.input_ids)
        ce, _ = answer_loss(tm.compute_logits, out.hidden, b.labels)
        loss = ce / answer_tokens  # token-weighted over the whole step
        if tm.has_experts:
            bal = load_balancing_loss(out.router_logits, out.router_topk, b.attention_mask, cfg.aux_loss_coef)
            loss = loss + bal.loss / len(batches)
            aux_sum += float(bal.loss.detach()) / len(batches)
            load = bal.load if load is None else load + bal.load
        loss.backward()
        loss_sum += float(ce.detach())
        run.history["tokens"] += int(b.attention_mask.sum())
    grad_norm = float(torch.nn.utils.clip_grad_norm_(run.params, cfg.max_grad_norm))
    lrs = [g["lr"] for g in run.opt.param_groups]
    run.opt.step()
    run.sched.step()
    run.opt.zero_grad(set_to_none=True)
    run.step += 1
    record = {"step": run.step, "loss": round(loss_sum / answer_tokens, 5), "aux": round(aux_sum, 6),
              "grad_norm": round(grad_norm, 4), "lr": lrs[0], "tokens": run.history["tokens"]}
    if len(lrs) > 1:
        record["expert_lr"] = lrs[1]
    if load is not None:
        record["load"] = [round(v, 4) for v in (load / len(batches)).mean(0).tolist()]  # [E], mean over layers
    run.history["loss"].append(record["loss"])
    run.history["aux"].append(record["aux"])
    return record


def train(cfg: TrainConfig, log: Callable[[str], None] = print) -> TrainResult:
    """Run (or resume) one training run and export its delta (or merged model) to ``cfg.out``."""
    start_time = time.time()
    run = _prepare(cfg, log)
    tok = run.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    steps_iter = iter_steps(run.encoded, cfg.batch_size, cfg.micro_batch_size, cfg.seed)
    for _ in range(run.step):
        next(steps_iter)
    progress = _progress(run.total_steps, run.step, cfg.progress)
    clock = time.time() - run.history["seconds"]
    run.tm.train()
    while run.step < run.total_steps:
        record = _train_step(run, next(steps_iter), pad_id, cfg)
        run.history["seconds"] = record["seconds"] = round(time.time() - clock, 1)
        with open(cfg.out / METRICS, "a") as f:
            f.write(json.dumps(record) + "\n")
        _update_progress(progress, record)
        if run.step % cfg.save_every == 0 or run.step == run.total_steps:
            _save_checkpoint(cfg.out / CHECKPOINT, run.tm, run.opt, run.sched, run.step, cfg, run.history)
    if progress is not None:
        progress.close()
    run.tm.eval()
    info = _info(cfg, run.total_steps, len(run.encoded), run.history)
    if cfg.merge:
        write_merged(run.tm, run.source, cfg.out, tok, info)
    else:
        write_delta(run.tm, run.source, cfg.model, cfg.out, info)
    log(f"wrote {'merged model' if cfg.merge else 'delta'} to {cfg.out} "
        f"({run.history['seconds'] / 60:.1f} min of training, {run.history['tokens']} tokens)")
    return TrainResult(cfg.out, run.step, run.history["loss"], run.history["aux"], time.time() - start_time,
                       run.history["tokens"], len(run.encoded))


def _info(cfg: TrainConfig, steps: int, num_examples: int, history: dict) -> dict:
    return {
        "status": "trained",
        "note": cfg.note or f"trained with `python -m training train` for {steps} steps on {num_examples} examples",
        "steps": steps,
        "batch_size": cfg.batch_size,
        "max_len": cfg.max_len,
        "lr": cfg.lr,
        **({"expert_lr": cfg.expert_lr} if cfg.expert_lr is not None else {}),
        "warmup_ratio": cfg.warmup_ratio,
        **({"decay_ratio": cfg.decay_ratio} if cfg.decay_ratio else {}),
        "aux_loss_coef": cfg.aux_loss_coef,
        "adapter_dropout": cfg.adapter_dropout,
        "lora_dropout": cfg.lora_dropout,
        "quantization": cfg.quantization,
        "dtype": cfg.dtype,
        "seed": cfg.seed,
        **({"init_from": str(cfg.init_from)} if cfg.init_from is not None else {}),
        "data": [Path(p).name for p in cfg.data],
        "train_examples": num_examples,
        "train_tokens": history["tokens"],
        "train_minutes": round(history["seconds"] / 60, 1),
        "final_loss": history["loss"][-1] if history["loss"] else None,
    }


def _progress(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True, mininterval=2.0)


def _update_progress(progress, record: dict) -> None:
    if progress is None:
        return
    postfix = {"loss": f"{record['loss']:.3f}"}
    if "load" in record:  # PESC only: aux loss and the min-max share of tokens per expert
        postfix["aux"] = f"{record['aux']:.4f}"
        postfix["load"] = f"{min(record['load']):.2f}-{max(record['load']):.2f}"
    progress.set_postfix(postfix, refresh=False)
    progress.update(1)
