"""Resident deltas by slot, installed into the model's per-slot tables (and the C++ kernels').

Slot 0 is what ``--model`` names (a delta over its base, a full checkpoint's own experts, or
nothing for a bare base); ``--adapters`` and runtime loads take slots 1, 2, ...  Installing
and removing only swap table entries, so the engine thread does it between steps.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pesc_serve.deltas.delta import Delta
from pesc_serve.models.decoder import PescForCausalLM, lora_site

if TYPE_CHECKING:
    from pesc_serve.kernels.cpu_kernels import CpuKernels


class DeltaTable:
    """Which delta sits in which slot, for a model with ``num_slots`` of them."""

    def __init__(self, model: PescForCausalLM, kernels: CpuKernels | None, num_slots: int) -> None:
        self.model = model
        self.kernels = kernels
        self.num_slots = num_slots
        self.resident: dict[int, Delta] = {}

    def free_slot(self) -> int | None:
        """The lowest empty slot above 0, if any."""
        return next((s for s in range(1, self.num_slots) if s not in self.resident), None)

    def install(self, slot: int, delta: Delta) -> None:
        if not 0 <= slot < self.num_slots or slot in self.resident:
            raise ValueError(f"slot {slot} is taken or out of range")
        layers = self.model.layers
        if delta.experts is not None and len(delta.experts) != len(layers):
            raise ValueError(f"{delta.origin}: experts for {len(delta.experts)} layers, the base has {len(layers)}")
        for i, layer in enumerate(layers):
            experts = delta.experts[i] if delta.experts is not None else None
            if experts is not None:
                layer.mlp.experts[slot] = experts
            if self.kernels is not None:
                self.kernels.set_experts(i, slot, experts, delta.stored_dtype)
        for name, weights in delta.lora.items():
            lora_site(self.model, name).by_slot[slot] = weights
            if self.kernels is not None:
                self.kernels.set_lora(name, slot, weights)
        self.resident[slot] = delta

    def remove(self, slot: int) -> Delta:
        delta = self.resident.pop(slot)
        for i, layer in enumerate(self.model.layers):
            layer.mlp.experts.pop(slot, None)
            if self.kernels is not None:
                self.kernels.set_experts(i, slot, None, None)
        for name in delta.lora:
            lora_site(self.model, name).by_slot.pop(slot, None)
            if self.kernels is not None:
                self.kernels.set_lora(name, slot, None)
        return delta
