// The routed expert adapters of a PESC layer: routing, packing, and the expert-grouped kernel
// over every resident delta's experts.
#pragma once

#include "bf16_gemm.h"

namespace pesc {

// ---- routed adapters, grouped by expert ------------------------------------------------------
// Why: one token's adapters are ~150k multiply-adds spread over 2k tiny dot products; run
// per token they reach ~17 GFLOP/s.  Sorting the (token, expert) pairs by expert turns them
// into two small GEMMs per active expert on the bf16 kernel above (bf16 adapter weights are
// what PESC checkpoints store; the activations are rounded to bf16 like any bf16 model's).

struct PackedAdapters {
  torch::Tensor router;             // [E, H] float32
  std::vector<PackedBf16> down;     // per expert: D_e [r, H]
  std::vector<PackedBf16> up;       // per expert: U_e [H, r], moe_scaling folded in
  int64_t e = 0, r = 0, h = 0, k = 0;
};

inline PackedAdapters pack_adapters(const torch::Tensor& router, const torch::Tensor& down, const torch::Tensor& up,
                             int64_t topk) {
  PackedAdapters a;
  a.router = router.to(at::kFloat).contiguous();
  a.e = down.size(0);
  a.r = down.size(1);
  a.h = down.size(2);
  a.k = topk;
  TORCH_CHECK(a.e <= 64 && topk >= 1 && topk <= a.e, "grouped adapters support up to 64 experts and 1 <= k <= E");
  TORCH_CHECK(up.size(0) == a.e && up.size(1) == a.h && up.size(2) == a.r, "adapter_up must be [E, H, r]");
  for (int64_t e = 0; e < a.e; ++e) {
    a.down.push_back(pack_bf16(down[e]));
    a.up.push_back(pack_bf16(up[e]));
  }
  return a;
}

// Top-k experts of one token (ties to the lower id) and their softmax weights; `logits` and
// `order` are scratch for E entries.
inline void route_token(const float* xr, const float* router, int64_t E, int64_t H, int64_t k, int64_t* ids,
                        float* weights, float* logits, int64_t* order) {
  for (int64_t e = 0; e < E; ++e) {
    float s = 0.f;
    for (int64_t i = 0; i < H; ++i) s += router[e * H + i] * xr[i];
    logits[e] = s;
    order[e] = e;
  }
  std::partial_sort(order, order + k, order + E, [&](int64_t a, int64_t c) {
    return logits[a] > logits[c] || (logits[a] == logits[c] && a < c);
  });
  const float mx = logits[order[0]];
  float denom = 0.f;
  for (int64_t j = 0; j < k; ++j) denom += std::exp(logits[order[j]] - mx);
  for (int64_t j = 0; j < k; ++j) {
    ids[j] = order[j];
    weights[j] = std::exp(logits[order[j]] - mx) / denom;
  }
}

// One layer's packed experts for every delta slot (e == 0: the slot has none here).  Shared
// between the PyTorch path and the decode step, and changed in place when a delta is loaded or
// unloaded (between engine steps).
struct AdapterStack {
  std::vector<PackedAdapters> by_slot;

  const PackedAdapters* at(int64_t slot) const {
    if (slot < 0 || slot >= static_cast<int64_t>(by_slot.size()) || by_slot[slot].e == 0) return nullptr;
    return &by_slot[slot];
  }
  void set(int64_t slot, PackedAdapters a) {
    TORCH_CHECK(slot >= 0, "slot must be >= 0");
    if (slot >= static_cast<int64_t>(by_slot.size())) by_slot.resize(slot + 1);
    by_slot[slot] = std::move(a);
  }
  void clear(int64_t slot) {
    if (slot >= 0 && slot < static_cast<int64_t>(by_slot.size())) by_slot[slot] = PackedAdapters();
  }
};

// f [T, H] += sum_j p_j U_j GELU(D_j f) for every token whose slot (slots[t], or 0 when slots is
// null) has packed experts in `stack`, routed by that slot's router on x [T, H]; ids [T, kout]
// receives each token's local expert ids (-1 where it has fewer, or none).  The experts of all
// slots form one table: the (token, expert) pairs of the whole batch are sorted by expert and
// each expert's rows run as one GEMM pair, so a step mixing deltas costs what one delta's does.
inline void grouped_adapters(const float* xp, float* fp, int64_t T, const AdapterStack& stack, const int64_t* slots,
                      int64_t* ids, int64_t kout) {
#ifdef PESC_BF16_GEMM
  const int64_t S = static_cast<int64_t>(stack.by_slot.size());
  std::vector<int64_t> first_expert(S + 1, 0);  // slot -> its first row in the global expert table
  for (int64_t s = 0; s < S; ++s) first_expert[s + 1] = first_expert[s] + stack.by_slot[s].e;
  const int64_t E = first_expert[S];
  // Scratch reused across calls (grow-only): fresh multi-100-KiB buffers cost page faults.
  // Lambdas below must use the pointers: inside them a thread_local names the worker's copy.
  thread_local std::vector<float> weight_buf, out_buf;
  thread_local std::vector<int64_t> pstart_buf, gid_buf, start_buf, order_buf, slot_buf, fill, task_buf, owner_buf;
  thread_local std::vector<const PackedAdapters*> of_buf;
  pstart_buf.assign(T + 1, 0);
  of_buf.assign(T, nullptr);
  int64_t H = 0;
  for (int64_t t = 0; t < T; ++t) {
    const PackedAdapters* a = stack.at(slots ? slots[t] : 0);
    of_buf[t] = a;
    pstart_buf[t + 1] = pstart_buf[t] + (a ? a->k : 0);
    if (a) H = a->h;
    for (int64_t j = 0; j < kout; ++j) ids[t * kout + j] = -1;
  }
  const int64_t pairs = pstart_buf[T];
  if (pairs == 0) return;
  const PackedAdapters* const* of = of_buf.data();
  const int64_t* pstart = pstart_buf.data();
  weight_buf.resize(pairs);
  gid_buf.resize(pairs);
  start_buf.assign(E + 1, 0);
  order_buf.resize(pairs);
  slot_buf.resize(pairs);
  out_buf.resize(pairs * H);  // adapter outputs, in expert-sorted pair order
  float* weight = weight_buf.data();
  float* out = out_buf.data();
  int64_t* gid = gid_buf.data();      // pair -> global expert id
  int64_t* start = start_buf.data();
  int64_t* order = order_buf.data();  // sorted position -> pair
  int64_t* slot = slot_buf.data();    // pair -> sorted position
  at::parallel_for(0, T, 8, [&](int64_t t0, int64_t t1) {
    float logits[64];  // pack_adapters checks E <= 64
    int64_t scratch[64], local[64];
    for (int64_t t = t0; t < t1; ++t) {
      const PackedAdapters* a = of[t];
      if (!a) continue;
      route_token(xp + t * a->h, a->router.data_ptr<float>(), a->e, a->h, a->k, local, weight + pstart[t], logits,
                  scratch);
      const int64_t base = first_expert[slots ? slots[t] : 0];
      for (int64_t j = 0; j < a->k; ++j) {
        if (j < kout) ids[t * kout + j] = local[j];
        gid[pstart[t] + j] = base + local[j];
      }
    }
  });
  for (int64_t i = 0; i < pairs; ++i) ++start[gid[i] + 1];
  for (int64_t e = 0; e < E; ++e) start[e + 1] += start[e];
  fill.assign(start, start + E);
  owner_buf.resize(pairs);  // pair -> token
  for (int64_t t = 0; t < T; ++t)
    for (int64_t i = pstart[t]; i < pstart[t + 1]; ++i) owner_buf[i] = t;
  for (int64_t i = 0; i < pairs; ++i) {  // stable: token order within an expert
    slot[i] = fill[gid[i]]++;
    order[slot[i]] = i;
  }
  const int64_t* owner = owner_buf.data();
  // (slot, local expert) of each global expert, for the tasks below.
  thread_local std::vector<std::pair<const PackedAdapters*, int64_t>> expert_of;
  expert_of.resize(E);
  for (int64_t s = 0; s < S; ++s)
    for (int64_t e = 0; e < stack.by_slot[s].e; ++e) expert_of[first_expert[s] + e] = {&stack.by_slot[s], e};
  const std::pair<const PackedAdapters*, int64_t>* owner_of = expert_of.data();  // thread_local: lambdas use this
  // Tasks of up to one GEMM tile of rows from one expert: equal-sized work whatever the
  // routing, so a static split over threads stays balanced.
  task_buf.clear();
  for (int64_t e = 0; e < E; ++e) {
    for (int64_t m0 = start[e]; m0 < start[e + 1]; m0 += kMaxTileRows) {
      task_buf.push_back(e);
      task_buf.push_back(m0);
    }
  }
  const int64_t* tasks = task_buf.data();
  const int64_t num_tasks = static_cast<int64_t>(task_buf.size() / 2);
  at::parallel_for(0, num_tasks, 1, [&](int64_t i0, int64_t i1) {
    thread_local std::vector<at::BFloat16> xb, zb;
    thread_local std::vector<float> z;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t e = tasks[2 * i], m0 = tasks[2 * i + 1];
      const int64_t n = std::min<int64_t>(kMaxTileRows, start[e + 1] - m0);
      const PackedAdapters& a = *owner_of[e].first;
      const PackedBf16& d = a.down[owner_of[e].second];
      const PackedBf16& u = a.up[owner_of[e].second];
      const int64_t R = a.r;
      xb.resize(n * d.kp * 2);
      for (int64_t r = 0; r < n; ++r) to_bf16_rows(fp + owner[order[m0 + r]] * H, 1, H, H, xb.data() + r * d.kp * 2, d.kp);
      z.resize(n * R);
      bf16_gemm_tiles(xb.data(), n, d, z.data(), R, 0, d.tiles);
      for (int64_t r = 0; r < n; ++r) {
        const float p = weight[order[m0 + r]];
        for (int64_t j = 0; j < R; ++j) z[r * R + j] = p * gelu_exact(z[r * R + j]);
      }
      zb.resize(n * u.kp * 2);
      to_bf16_rows(z.data(), n, R, R, zb.data(), u.kp);
      bf16_gemm_tiles(zb.data(), n, u, out + m0 * H, H, 0, u.tiles);
    }
  });
  // Each token gathers its own outputs: no two tasks write one row.
  at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      float* fr = fp + t * H;
      for (int64_t i = pstart[t]; i < pstart[t + 1]; ++i) {
        const float* o = out + slot[i] * H;
        for (int64_t c = 0; c < H; ++c) fr[c] += o[c];
      }
    }
  });
#else
  TORCH_CHECK(false, "grouped adapters need an AVX512-BF16 build");
#endif
}

// The PyTorch path's entry: (f + adapters in f's dtype, local top-k ids [T, kout], -1 padded).
inline std::vector<torch::Tensor> routed_adapters(const torch::Tensor& x, const torch::Tensor& f, const torch::Tensor& slots,
                                           const AdapterStack& stack, int64_t kout) {
  TORCH_CHECK(x.dim() == 2 && f.sizes() == x.sizes(), "routed_adapters: x and f must be [T, H]");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.numel() == x.size(0), "routed_adapters: slots must be int64 [T]");
  torch::Tensor x32 = x.to(at::kFloat).contiguous();
  torch::Tensor y = f.to(at::kFloat, /*non_blocking=*/false, /*copy=*/true).contiguous();
  torch::Tensor s = slots.contiguous();
  torch::Tensor ids = torch::empty({x.size(0), kout}, torch::TensorOptions().dtype(at::kLong));
  grouped_adapters(x32.data_ptr<float>(), y.data_ptr<float>(), x.size(0), stack, s.data_ptr<int64_t>(),
                   ids.data_ptr<int64_t>(), kout);
  return {f.scalar_type() == at::kFloat ? y : y.to(f.scalar_type()), ids};
}

}  // namespace pesc
