"""Routing statistics of a PESC model: share of tokens per expert, per layer, per domain.

A forward pre-hook on every :class:`PescMLP` re-runs the (tiny) router on the layer input
and counts the top-k choices, so the serving model needs no instrumentation.  Counting is
on whatever tokens flow through the model (prompt and generated ones) while a domain is set.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from pesc_serve.layers.pesc_mlp import PescMLP
from pesc_serve.models.decoder import PescForCausalLM


class RoutingRecorder:
    """Counts of (layer, expert) selections per domain; ``share()`` normalises per layer."""

    def __init__(self, model: PescForCausalLM) -> None:
        self.num_layers = model.config.num_layers
        self.num_experts = model.layers[0].mlp.experts[0].num_experts  # the loaded model's own (slot 0)
        self.counts: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}
        self._domain: str | None = None
        self._handles = []
        for i, layer in enumerate(model.layers):
            if 0 in layer.mlp.experts:
                self._handles.append(layer.mlp.register_forward_pre_hook(self._hook(i)))

    def _hook(self, layer: int):
        def hook(module: PescMLP, inputs: tuple[torch.Tensor, ...]) -> None:
            if self._domain is None:
                return
            idx = module.route_only(inputs[0])  # [T, k]
            counts = self.counts.setdefault(self._domain, torch.zeros(self.num_layers, self.num_experts, dtype=torch.long))
            counts[layer] += torch.bincount(idx.reshape(-1).cpu(), minlength=self.num_experts)
            if layer == 0:
                self.tokens[self._domain] = self.tokens.get(self._domain, 0) + idx.shape[0]

        return hook

    @contextmanager
    def domain(self, name: str) -> Iterator[None]:
        self._domain = name
        try:
            yield
        finally:
            self._domain = None

    def share(self, domain: str | None = None) -> torch.Tensor:
        """[L, E] fraction of a layer's token-slots that chose each expert (rows sum to 1)."""
        counts = sum(self.counts.values()) if domain is None else self.counts[domain]
        counts = counts.float()
        return counts / counts.sum(-1, keepdim=True).clamp(min=1)

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def middle_layers(num_layers: int) -> range:
    """The middle half of the stack (where the collapse criterion is checked)."""
    return range(num_layers // 4, num_layers - num_layers // 4)


def domain_expert_information(counts: dict[str, torch.Tensor]) -> tuple[list[float], float]:
    """Per layer, the mutual information (bits) between a routing slot's domain and its expert,
    from ``counts`` (domain -> [L, E] top-k slot counts), and the domains' entropy (its upper
    bound).  0 means every domain spreads over the experts alike; H(domain) would mean an
    expert alone tells the domain."""
    joint = torch.stack([c.double() for c in counts.values()])  # [D, L, E]
    p = joint / joint.sum(dim=(0, 2), keepdim=True).clamp(min=1)  # per layer, sums to 1 over (domain, expert)
    pd, pe = p.sum(2, keepdim=True), p.sum(0, keepdim=True)
    terms = torch.where(p > 0, p * torch.log2(p / (pd * pe).clamp(min=1e-300)), torch.zeros_like(p))
    share = joint.sum(dim=(1, 2)) / joint.sum().clamp(min=1)
    entropy = float(-(share[share > 0] * torch.log2(share[share > 0])).sum())
    return [round(float(v), 5) for v in terms.sum(dim=(0, 2))], round(entropy, 5)


def summary(recorder: RoutingRecorder) -> dict:
    """JSON-able statistics: per-domain shares, token counts, the balance checks, and how much
    each layer's routing says about the domain (mutual information)."""
    overall = recorder.share()
    mid = list(middle_layers(recorder.num_layers))
    information, entropy = domain_expert_information(recorder.counts) if len(recorder.counts) > 1 else ([], 0.0)
    return {
        "num_layers": recorder.num_layers,
        "num_experts": recorder.num_experts,
        "tokens": dict(recorder.tokens),
        "share": {d: [[round(v, 5) for v in row] for row in recorder.share(d).tolist()] for d in recorder.counts},
        "share_all": [[round(v, 5) for v in row] for row in overall.tolist()],
        "middle_layers": [mid[0], mid[-1]],
        "min_share_middle_layers": round(float(overall[mid].min()), 5),
        "max_share_middle_layers": round(float(overall[mid].max()), 5),
        "min_share_any_layer": round(float(overall.min()), 5),
        "domain_expert_mutual_information_bits": information,
        "domain_entropy_bits": entropy,
    }


def plot_heatmap(stats: dict, title: str, path: Path) -> None:
    """One panel per domain (+ all): layers x experts, colour = share of tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(stats["share"].items()) + [("all", stats["share_all"])]
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels) + 1, 6), sharey=True, squeeze=False)
    vmax = max(max(max(row) for row in share) for _, share in panels)
    image = None
    for ax, (name, share) in zip(axes[0], panels):
        image = ax.imshow(torch.tensor(share).numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=vmax)
        ax.set_title(f"{name}\n({stats['tokens'].get(name, sum(stats['tokens'].values()))} tokens)", fontsize=9)
        ax.set_xlabel("expert")
        ax.set_xticks(range(stats["num_experts"]))
    axes[0][0].set_ylabel("layer")
    fig.colorbar(image, ax=axes[0].tolist(), label="share of tokens (top-k slots)", shrink=0.8)
    fig.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
