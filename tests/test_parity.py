"""Our model (fused weights, paged KV cache, every PESC dispatch) vs the independent reference.

For each tiny checkpoint layout (tests/fixtures/tiny_checkpoints.py) and, for PESC layouts,
each adapter dispatch strategy, float32 logits must match ``tests/reference/pesc_reference.py``
within ``ATOL`` for:

(a) a fresh prefill of a prompt longer than any sliding window,
(b) step-by-step decode through our paged KV cache, each step vs the reference's own cache,
(c) one batched decode call for three sequences of different lengths (padding masks),
(d) a chunked prefill (fresh chunk, then a chunk reading its context from the cache),
(e) one mixed flat batch: a decode token, a continuation chunk and a fresh chunk together.

Cache slots are scattered (a random permutation, like a block table) so every gather is real.
Sliding windows are built here the way the engine must: HF Mistral's convention, query ``i``
sees key ``j`` iff ``i - window < j <= i``.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

from pesc_serve.config import LoadConfig
from pesc_serve.layers.attention import AttentionMetadata, PrefillChunk
from pesc_serve.layers.pesc_mlp import DISPATCHES
from pesc_serve.models.loader import LoadedModel, load_model
from pesc_serve.registry import resolve_model
from tests.fixtures.tiny_checkpoints import DENSE_KINDS, PESC_KINDS
from tests.reference.pesc_reference import ReferenceModel

ATOL = 1e-4
NUM_SLOTS = 256
STRATEGIES = ("loop", "dense", "gather", "grouped", "padded", "auto")
CASES = [(kind, d) for kind in PESC_KINDS for d in STRATEGIES] + [(kind, "auto") for kind in DENSE_KINDS]
CASE_IDS = [f"{kind}-{d}" for kind, d in CASES]

# ---------------------------------------------------------------------------------------------
# helpers


def _token_ids(seed: int, n: int, vocab: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=g).tolist()


def _allowed(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """[len(q), len(k)] bool: causal, and inside the sliding window when there is one."""
    ok = k_pos[None, :] <= q_pos[:, None]
    if window:
        ok &= k_pos[None, :] > q_pos[:, None] - window
    return ok


def _load(path: Path, dispatch: str) -> LoadedModel:
    """Load in float32 on CPU with ``dispatch`` on every PESC MLP."""
    load = LoadConfig(model=str(path), dtype="float32", device="cpu", dispatch=dispatch)
    lm = load_model(resolve_model(str(path)), load)
    if lm.config.is_pesc:
        assert all(layer.mlp.dispatch == dispatch for layer in lm.model.layers)
    return lm


class Runner:
    """Drives our model over a flat paged cache; each sequence owns a scattered set of slots."""

    def __init__(self, lm: LoadedModel, seed: int = 0) -> None:
        self.model, self.cfg = lm.model, lm.config
        self.window = self.cfg.sliding_window
        self.kv = torch.zeros(self.cfg.num_layers, 2, NUM_SLOTS, self.cfg.num_kv_heads, self.cfg.head_dim)
        self.free = torch.randperm(NUM_SLOTS, generator=torch.Generator().manual_seed(seed)).tolist()
        self.slots: dict[str, list[int]] = {}

    def _slots_for(self, seq: str, start: int, end: int) -> list[int]:
        table = self.slots.setdefault(seq, [])
        while len(table) < end:
            table.append(self.free.pop())
        return table[start:end]

    @torch.no_grad()
    def step(
        self, decodes: list[tuple[str, int, int]], prefills: list[tuple[str, list[int], int]]
    ) -> list[torch.Tensor]:
        """One forward call: ``decodes`` (seq, token, pos) first, then ``prefills`` (seq, tokens, start).

        Returns logits per entry: [V] for a decode, [len(tokens), V] for a prefill chunk.
        """
        ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        for seq, token, pos in decodes:
            ids.append(token)
            positions.append(pos)
            slot_mapping += self._slots_for(seq, pos, pos + 1)
        meta = AttentionMetadata(slot_mapping=torch.empty(0, dtype=torch.long), num_decode_tokens=len(decodes))
        if decodes:
            max_ctx = max(pos + 1 for _, _, pos in decodes)
            meta.decode_slots = torch.zeros(len(decodes), max_ctx, dtype=torch.long)  # padded with slot 0
            meta.decode_mask = torch.zeros(len(decodes), 1, 1, max_ctx, dtype=torch.bool)
            for b, (seq, _, pos) in enumerate(decodes):
                meta.decode_slots[b, : pos + 1] = torch.tensor(self.slots[seq][: pos + 1])
                k_pos = torch.arange(pos + 1)
                meta.decode_mask[b, 0, 0, : pos + 1] = _allowed(torch.tensor([pos]), k_pos, self.window)[0]
        for seq, tokens, start in prefills:
            q_start = len(ids)
            end = start + len(tokens)
            ids += tokens
            positions += range(start, end)
            slot_mapping += self._slots_for(seq, start, end)
            q_pos = torch.arange(start, end)
            if start == 0:
                mask = _allowed(q_pos, q_pos, self.window) if self.window else None
                meta.prefills.append(PrefillChunk(q_start, len(ids), mask=mask))
            else:
                context = torch.tensor(self.slots[seq][:end])
                mask = _allowed(q_pos, torch.arange(end), self.window)
                meta.prefills.append(PrefillChunk(q_start, len(ids), context_slots=context, mask=mask))
        meta.slot_mapping = torch.tensor(slot_mapping, dtype=torch.long)
        hidden = self.model(torch.tensor(ids), torch.tensor(positions), self.kv, meta)
        logits = self.model.compute_logits(hidden)
        out: list[torch.Tensor] = [logits[b] for b in range(len(decodes))]
        for chunk in meta.prefills:
            out.append(logits[chunk.q_start : chunk.q_end])
        return out

    def prefill(self, seq: str, tokens: list[int], start: int = 0) -> torch.Tensor:
        return self.step([], [(seq, tokens, start)])[0]

    def decode(self, seq: str, token: int, pos: int) -> torch.Tensor:
        return self.step([(seq, token, pos)], [])[0]


def _close(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    diff = (ours - ref).abs().max().item()
    assert diff < ATOL, f"{what}: max abs logits diff {diff:.3g} >= {ATOL}"


# ---------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def reference(tiny_checkpoint_factory):
    """kind -> ReferenceModel (built once per module)."""
    return functools.lru_cache(maxsize=None)(lambda kind: ReferenceModel.from_dir(tiny_checkpoint_factory(kind)))


@pytest.fixture(scope="module")
def ours(tiny_checkpoint_factory):
    """(kind, dispatch) -> LoadedModel (loaded once per module)."""
    return functools.lru_cache(maxsize=None)(lambda kind, d: _load(tiny_checkpoint_factory(kind), d))


def _vocab(ref: ReferenceModel) -> int:
    return ref.w["model.embed_tokens.weight"].shape[0]


PROMPT_LEN, DECODE_STEPS = 14, 8


# ---------------------------------------------------------------------------------------------
# (a)-(e)


@pytest.mark.parametrize("kind,dispatch", CASES, ids=CASE_IDS)
def test_prefill(kind, dispatch, reference, ours):
    ref, lm = reference(kind), ours(kind, dispatch)
    prompt = _token_ids(1, PROMPT_LEN, _vocab(ref))
    if lm.config.sliding_window:
        assert PROMPT_LEN > lm.config.sliding_window, "prompt must exceed the window to test it"
    logits = Runner(lm).prefill("a", prompt)
    assert logits.shape == (PROMPT_LEN, lm.config.vocab_size) and logits.dtype == torch.float32
    _close(logits, ref.forward(prompt), f"{kind}/{dispatch} prefill")


@pytest.mark.parametrize("kind,dispatch", CASES, ids=CASE_IDS)
def test_decode_steps(kind, dispatch, reference, ours):
    ref, lm = reference(kind), ours(kind, dispatch)
    tokens = _token_ids(2, PROMPT_LEN + DECODE_STEPS, _vocab(ref))
    prompt, continuation = tokens[:PROMPT_LEN], tokens[PROMPT_LEN:]
    expected = ref.decode_with_cache(prompt, continuation)
    runner = Runner(lm, seed=1)
    _close(runner.prefill("a", prompt)[-1], expected[0], f"{kind}/{dispatch} prefill last")
    for i, token in enumerate(continuation):
        _close(runner.decode("a", token, PROMPT_LEN + i), expected[i + 1], f"{kind}/{dispatch} decode step {i}")


@pytest.mark.parametrize("kind,dispatch", CASES, ids=CASE_IDS)
def test_batched_decode_with_padding(kind, dispatch, reference, ours):
    ref, lm = reference(kind), ours(kind, dispatch)
    vocab = _vocab(ref)
    lengths = {"a": PROMPT_LEN, "b": 5, "c": 11}
    seqs = {name: _token_ids(10 + i, n + 3, vocab) for i, (name, n) in enumerate(lengths.items())}
    runner = Runner(lm, seed=2)
    # All three prompts as three fresh chunks of one call, then three batched decode calls.
    runner.step([], [(name, seqs[name][:n], 0) for name, n in lengths.items()])
    for step in range(3):
        decodes = [(name, seqs[name][n + step], n + step) for name, n in lengths.items()]
        logits = runner.step(decodes, [])
        for (name, _, pos), got in zip(decodes, logits):
            want = ref.forward(seqs[name][: pos + 1])[-1]
            _close(got, want, f"{kind}/{dispatch} batched decode seq {name} pos {pos}")


@pytest.mark.parametrize("kind,dispatch", CASES, ids=CASE_IDS)
def test_chunked_prefill(kind, dispatch, reference, ours):
    ref, lm = reference(kind), ours(kind, dispatch)
    prompt = _token_ids(3, PROMPT_LEN + 2, _vocab(ref))
    full = Runner(lm, seed=3).prefill("a", prompt)
    _close(full, ref.forward(prompt), f"{kind}/{dispatch} full prefill")
    runner = Runner(lm, seed=4)
    split = 7
    first = runner.prefill("a", prompt[:split])
    second = runner.prefill("a", prompt[split:], start=split)
    chunked = torch.cat([first, second])
    _close(chunked, full, f"{kind}/{dispatch} chunked vs full prefill")


@pytest.mark.parametrize("kind,dispatch", CASES, ids=CASE_IDS)
def test_mixed_batch(kind, dispatch, reference, ours):
    """Decode + continuation chunk + fresh chunk in one flat batch, as the engine schedules."""
    ref, lm = reference(kind), ours(kind, dispatch)
    vocab = _vocab(ref)
    a, b, c = (_token_ids(20 + i, PROMPT_LEN + 1, vocab) for i in range(3))
    runner = Runner(lm, seed=5)
    runner.prefill("a", a[:PROMPT_LEN])
    runner.prefill("b", b[:4])
    got_a, got_b, got_c = runner.step([("a", a[PROMPT_LEN], PROMPT_LEN)], [("b", b[4:], 4), ("c", c[:9], 0)])
    _close(got_a, ref.forward(a)[-1], f"{kind}/{dispatch} mixed: decode")
    _close(got_b, ref.forward(b)[4:], f"{kind}/{dispatch} mixed: continuation chunk")
    _close(got_c, ref.forward(c[:9]), f"{kind}/{dispatch} mixed: fresh chunk")


# ---------------------------------------------------------------------------------------------
# the tests above are only meaningful if the reference is self-consistent and the fixtures'
# features (experts, window, rope quirk, biases) actually change the logits


@pytest.mark.parametrize("kind", PESC_KINDS + DENSE_KINDS)
def test_reference_cache_matches_recompute(kind, reference):
    ref = reference(kind)
    tokens = _token_ids(4, PROMPT_LEN + 4, _vocab(ref))
    full = ref.forward(tokens)
    steps = ref.decode_with_cache(tokens[:PROMPT_LEN], tokens[PROMPT_LEN:])
    assert len(steps) == 5
    for i, logits in enumerate(steps):
        _close(logits, full[PROMPT_LEN - 1 + i], f"{kind} reference cache step {i}")


def _differs(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a - b).abs().max().item() > 1e-2


@pytest.mark.parametrize("kind", PESC_KINDS)
def test_fixture_experts_matter(kind, tiny_checkpoint_factory, reference):
    ref = reference(kind)
    prompt = _token_ids(5, PROMPT_LEN, _vocab(ref))
    no_adapters = ReferenceModel.from_dir(tiny_checkpoint_factory(kind))
    for name in no_adapters.w:
        if name.endswith("adapter_up.weight"):
            no_adapters.w[name] = torch.zeros_like(no_adapters.w[name])
    assert _differs(ref.forward(prompt), no_adapters.forward(prompt))
    # ...and the routing choice matters: a different top-k gives different logits.
    other_k = ReferenceModel.from_dir(tiny_checkpoint_factory(kind))
    other_k.topk = 1
    assert _differs(ref.forward(prompt), other_k.forward(prompt))


@pytest.mark.parametrize("kind", ["sparsetral", "mistral"])
def test_fixture_sliding_window_matters(kind, tiny_checkpoint_factory, reference):
    ref = reference(kind)
    assert ref.sliding_window and ref.sliding_window < PROMPT_LEN
    prompt = _token_ids(6, PROMPT_LEN, _vocab(ref))
    unwindowed = ReferenceModel.from_dir(tiny_checkpoint_factory(kind))
    unwindowed.sliding_window = None
    a, b = ref.forward(prompt), unwindowed.forward(prompt)
    w = ref.sliding_window
    _close(a[:w], b[:w], "positions inside the first window")
    assert _differs(a[w:], b[w:])


def test_fixture_rope_quirk_matters(tiny_checkpoint_factory, reference):
    ref = reference("camelidae")
    assert ref.rope_base == 10000.0 and ref.config["rope_theta"] == 500000.0
    prompt = _token_ids(7, PROMPT_LEN, _vocab(ref))
    honoured = ReferenceModel.from_dir(tiny_checkpoint_factory("camelidae"))
    honoured.rope_base = 500000.0
    assert _differs(ref.forward(prompt), honoured.forward(prompt))


@pytest.mark.parametrize("kind", ["qwen2idae", "qwen2"])
def test_fixture_qkv_biases_matter(kind, tiny_checkpoint_factory, reference):
    ref = reference(kind)
    prompt = _token_ids(8, PROMPT_LEN, _vocab(ref))
    unbiased = ReferenceModel.from_dir(tiny_checkpoint_factory(kind))
    for name in list(unbiased.w):
        if name.endswith("_proj.bias"):
            unbiased.w[name] = torch.zeros_like(unbiased.w[name])
    assert _differs(ref.forward(prompt), unbiased.forward(prompt))


def test_load_config_accepts_every_dispatch():
    """Every strategy the PESC MLP implements can be chosen with ``--dispatch``."""
    for name in DISPATCHES:
        LoadConfig(model="x", dispatch=name)


@pytest.mark.parametrize("kind", DENSE_KINDS)
def test_reference_matches_transformers(kind, tiny_checkpoint_factory, reference):
    """The reference's dense maths (RoPE, GQA, biases, window, tying) equal Hugging Face's own."""
    transformers = pytest.importorskip("transformers")
    path = tiny_checkpoint_factory(kind)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation="eager")
    ref = reference(kind)
    tokens = _token_ids(9, PROMPT_LEN + 2, _vocab(ref))
    with torch.no_grad():
        want = hf(torch.tensor([tokens])).logits[0].float()
    _close(ref.forward(tokens), want, f"{kind} reference vs transformers")
