"""The PESC MLP: one shared dense FFN per layer plus each delta's top-k routed bottleneck adapters.

    F = W_down(silu(W_gate x) * W_up x)            shared FFN, once per token
    p, idx = softmax(topk(W_router x, k))           router sees the FFN input x
    y = F + sum_j p_j * U_idx_j GELU(D_idx_j F)     moe_scaling folded into U at load time

A delta's experts are stacked (:class:`ExpertSet`): ``down`` is ``[E, r, H]`` and ``up``
``[E, H, r]`` (the dispatches read a contiguous ``[E, r, H]`` transpose of the latter).  One
layer holds the experts of every resident delta, by slot; each token runs its own delta's.
Because the top-k weights sum to one, the FFN output is added once instead of being
replicated k times as the authors' code does.  The adapter part has several dispatch
strategies with the same maths; :func:`choose_dispatch` picks one per batch size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pesc_serve.deltas.batch import DeltaBatch
from pesc_serve.layers.lora import SlotLoRA

Dispatch = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class SharedFFN(nn.Module):
    """SwiGLU FFN with fused gate/up projection; its linears are what quantization swaps, and
    each has the deltas' unmerged LoRA beside it (``lora``)."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.intermediate_size = intermediate_size
        self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.lora = nn.ModuleDict({"gate_up_proj": SlotLoRA(), "down_proj": SlotLoRA()})

    def forward(self, x: torch.Tensor, deltas: DeltaBatch | None = None) -> torch.Tensor:
        gate, up = self.lora["gate_up_proj"](self.gate_up_proj(x), x, deltas).chunk(2, dim=-1)
        act = F.silu(gate) * up
        return self.lora["down_proj"](self.down_proj(act), act, deltas)


def route(x: torch.Tensor, router_weight: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k experts per token and their weights (softmax over the k selected logits only)."""
    logits = F.linear(x, router_weight)  # [T, E]
    top_logits, top_idx = torch.topk(logits, k, dim=-1)
    return torch.softmax(top_logits.float(), dim=-1).to(x.dtype), top_idx


# Every dispatch takes f [T, H], down [E, r, H], up_t [E, r, H] (U_e transposed, so both
# stack the same way), p [T, k] and idx [T, k], and returns y = f + sum_j p_j U_j GELU(D_j f):
# adding f inside lets each strategy fold the residual into its last GEMM or scatter.


def adapters_loop(f: torch.Tensor, down: torch.Tensor, up_t: torch.Tensor, p: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The authors' dispatch: a Python loop over every expert with boolean gathers (reference)."""
    out = f.clone()
    for e in range(down.shape[0]):
        token_pos, slot = torch.nonzero(idx == e, as_tuple=True)
        if token_pos.numel() == 0:
            continue
        h = F.gelu(f[token_pos] @ down[e].t()) @ up_t[e]
        out.index_add_(0, token_pos, h * p[token_pos, slot, None])
    return out


def adapters_dense(f: torch.Tensor, down: torch.Tensor, up_t: torch.Tensor, p: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """All experts in two GEMMs; unselected experts get weight 0. Static shapes, no host sync."""
    num_experts, r, hidden = down.shape
    t = f.shape[0]
    z = F.gelu(F.linear(f, down.view(num_experts * r, hidden))).view(t, num_experts, r)  # [T, E, r]
    dense_p = torch.zeros(t, num_experts, dtype=f.dtype, device=f.device).scatter_(1, idx, p)
    z = (z * dense_p.unsqueeze(-1)).view(t, num_experts * r)
    return torch.addmm(f, z, up_t.reshape(num_experts * r, hidden))


def adapters_gather(f: torch.Tensor, down: torch.Tensor, up_t: torch.Tensor, p: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Per token, gather its k experts' matrices and run two small batched GEMMs.

    Reads only the selected experts' weights and has no host sync: the decode-batch path.
    """
    t, k = idx.shape
    _, r, hidden = down.shape
    flat = idx.view(-1)
    d = down.index_select(0, flat).view(t, k * r, hidden)
    z = torch.bmm(d, f.unsqueeze(-1)).view(t, k, r)
    z = (F.gelu(z) * p.unsqueeze(-1)).view(t, 1, k * r)
    u = up_t.index_select(0, flat).view(t, k * r, hidden)
    return torch.baddbmm(f.unsqueeze(1), z, u).view(t, hidden)


def adapters_grouped(f: torch.Tensor, down: torch.Tensor, up_t: torch.Tensor, p: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Sort (token, expert) pairs by expert; one GEMM pair per active expert segment."""
    t, k = idx.shape
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=down.shape[0]).tolist()
    tokens = order // k
    rows = f.index_select(0, tokens)  # [T*k, H], grouped by expert
    weights = p.reshape(-1)[order].unsqueeze(-1)
    out_rows = torch.empty_like(rows)
    start = 0
    for e, n in enumerate(counts):
        if n:
            seg = rows[start : start + n]
            out_rows[start : start + n] = F.gelu(seg @ down[e].t()) @ up_t[e]
            start += n
    return f.index_add(0, tokens, out_rows * weights)


def adapters_padded(f: torch.Tensor, down: torch.Tensor, up_t: torch.Tensor, p: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Pairs sorted by expert into a padded ``[E, C, H]`` layout, then two batched GEMMs.

    C is the largest expert's share of this batch: only the selected experts' work is done
    (plus padding), in a fixed number of ops whatever the batch size.  Padding slots read
    and write an extra zero row that is dropped at the end.
    """
    t, k = idx.shape
    num_experts, r, hidden = down.shape
    flat = idx.view(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    cap = int(counts.max())
    expert = flat.index_select(0, order)
    slot = torch.arange(t * k, device=f.device) - (torch.cumsum(counts, 0) - counts).index_select(0, expert)
    dest = expert * cap + slot  # where each sorted pair sits in the [E * C] layout
    src = torch.full((num_experts * cap,), t, dtype=torch.long, device=f.device).index_copy_(0, dest, order // k)
    w = f.new_zeros(num_experts * cap).index_copy_(0, dest, p.reshape(-1).index_select(0, order))
    f_pad = torch.cat([f, f.new_zeros(1, hidden)])
    xs = f_pad.index_select(0, src).view(num_experts, cap, hidden)
    h = F.gelu(torch.bmm(xs, down.transpose(1, 2))) * w.view(num_experts, cap, 1)  # [E, C, r]
    o = torch.bmm(h, up_t).view(num_experts * cap, hidden)  # [E * C, H]
    return f_pad.index_add_(0, src, o)[:t]


DISPATCHES: dict[str, Dispatch] = {
    "padded": adapters_padded,
    "loop": adapters_loop,
    "dense": adapters_dense,
    "gather": adapters_gather,
    "grouped": adapters_grouped,
}


# From benchmarks/bench_moe_layer.py on a 2-core CPU: below this many tokens the padded
# layout's fixed op cost outweighs skipping the unselected experts' GEMM work.
PADDED_MIN_TOKENS = 32


def choose_dispatch(policy: str, num_tokens: int, num_experts: int, topk: int, on_cpu: bool = True) -> Dispatch:
    """The one place that maps a policy and a batch size to a dispatch function.

    ``auto``: gather for tiny decode batches (reads only k experts per token), dense-stacked
    for middling ones, the padded grouped layout once skipping unselected experts pays.
    """
    if policy != "auto":
        return DISPATCHES[policy]
    if num_tokens * topk <= num_experts:
        return adapters_gather
    if num_tokens >= PADDED_MIN_TOKENS and on_cpu:  # the padded layout needs one host sync
        return adapters_padded
    return adapters_dense


@dataclass
class ExpertSet:
    """One delta's experts in one layer: router ``[E, H]``, ``down [E, r, H]``, ``up [E, H, r]``
    (moe_scaling folded in) and its top-k."""

    router: torch.Tensor
    down: torch.Tensor | None
    up: torch.Tensor | None
    topk: int
    moe_scaling: float = 1.0  # already folded into ``up``; kept for exporters that unfold it
    # The C++ grouped kernel's packed copy; once it exists it is the only copy of down and up.
    packed: object | None = None
    num_experts: int = field(init=False)
    adapter_dim: int = field(init=False)
    _up_t: torch.Tensor | None = field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        self.num_experts, self.adapter_dim = self.down.shape[0], self.down.shape[1]

    @property
    def up_t(self) -> torch.Tensor:
        """[E, r, H] contiguous: what the dispatches read (derived on first use)."""
        if self._up_t is None:
            if self.up is None:
                raise RuntimeError("these experts live only in the C++ kernel's packed copy")
            self._up_t = self.up.transpose(1, 2).contiguous()
        return self._up_t

    def keep_only_packed(self, packed: object) -> None:
        """Hand the weights over to the kernel's packed copy: one resident copy per delta."""
        self.packed = packed
        self.down = self.up = self._up_t = None

    @property
    def nbytes(self) -> int:
        tensors = [t for t in (self.router, self.down, self.up, self._up_t) if t is not None]
        packed = self.packed.nbytes if self.packed is not None else 0
        return packed + sum(t.numel() * t.element_size() for t in tensors)

    def apply(self, x: torch.Tensor, f: torch.Tensor, policy: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
        """(f + routed adapters, top-k ids [T, k]) for the FFN input x and output f."""
        if self.down is None:
            raise RuntimeError("these experts live only in the C++ kernel's packed copy (run with --dispatch auto)")
        p, idx = route(x, self.router, self.topk)
        run = choose_dispatch(policy, x.shape[0], self.num_experts, self.topk, x.is_cpu)
        return run(f, self.down, self.up_t, p, idx), idx


class PescMLP(nn.Module):
    """The shared FFN plus, per delta slot, that delta's routed adapters (none: the dense FFN).

    Each token runs the experts of its own delta (``deltas`` says which); a dense base, or a
    delta without experts, runs the FFN alone.  Serving-only: no dropout, no training flags.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, dispatch: str = "auto") -> None:
        super().__init__()
        self.dispatch = dispatch
        self.ffn = SharedFFN(hidden_size, intermediate_size)
        self.experts: dict[int, ExpertSet] = {}
        # The last forward's local expert choices [T, k] (-1: fewer), read for router-load metrics.
        self.last_topk: torch.Tensor | None = None
        # (x, f, slots, k) -> (f + adapters, ids) on the C++ expert-grouped kernel, for the slots in
        # ``packed_slots`` (kernels/cpu_kernels.py installs it); other slots take the dispatches.
        self.grouped_adapters: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]] | None = None
        self.packed_slots: set[int] = set()

    @property
    def topk_width(self) -> int:
        """Columns of ``last_topk``: the largest k of the resident deltas."""
        return max((e.topk for e in self.experts.values()), default=0)

    def forward(self, x: torch.Tensor, deltas: DeltaBatch | None = None) -> torch.Tensor:
        f = self.ffn(x, deltas)
        groups = deltas.groups if deltas is not None else [(0, None)]
        present = [(s, rows) for s, rows in groups if s in self.experts]
        if not present:
            self.last_topk = None
            return f
        kout = self.topk_width
        y, ids = f, None
        if self.grouped_adapters is not None and x.is_cpu and self.dispatch == "auto" and any(
                s in self.packed_slots for s, _ in present):
            slots = deltas.slots if deltas is not None else torch.zeros(x.shape[0], dtype=torch.long)
            y, ids = self.grouped_adapters(x, f, slots, kout)
            present = [(s, rows) for s, rows in present if s not in self.packed_slots]
        if present and ids is None:
            ids = torch.full((x.shape[0], kout), -1, dtype=torch.long, device=x.device)
        for slot, rows in present:
            experts = self.experts[slot]
            if rows is None:
                y, idx = experts.apply(x, f, self.dispatch)
                ids[:, : idx.shape[1]] = idx
            else:
                ys, idx = experts.apply(x.index_select(0, rows), f.index_select(0, rows), self.dispatch)
                if y is f:
                    y = f.clone()  # later groups still read their rows of f
                y.index_copy_(0, rows, ys)
                ids[rows, : idx.shape[1]] = idx
        self.last_topk = ids
        return y

    def route_only(self, x: torch.Tensor, slot: int = 0) -> torch.Tensor:
        """Expert ids [T, k] the delta in ``slot`` picks for x: for routing statistics."""
        experts = self.experts[slot]
        return route(x, experts.router, experts.topk)[1]
