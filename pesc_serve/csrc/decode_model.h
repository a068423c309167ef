// One-call decode step for a PESC (or dense) Llama-family model on CPU.
//
// Why: at decode batch sizes the model is a few big weight-only GEMMs and ~40 tiny ops per
// layer; from Python every tiny op costs several microseconds of dispatch, which on a 2-core
// CPU adds up to more than the GEMMs.  Here the tiny ops are plain loops over float32 data
// (RMSNorm, RoPE, paged attention read straight from the KV blocks, SwiGLU, router, top-k,
// the selected experts' adapters, residuals), and the GEMMs run on this extension's kernels
// (int4/int8 with AVX512-VNNI, bf16 with AVX512-BF16) where the CPU has them, else ATen's.
// The maths is the Python path's (pesc_serve/models/decoder.py); tests check parity.
#pragma once

#include "adapters.h"
#include "attention.h"
#include "linear.h"

namespace pesc {

// One delta's experts in one layer, float32 (the exact per-token path).
struct Experts {
  torch::Tensor router;        // [E, H]
  torch::Tensor adapter_down;  // [E, r, H]
  torch::Tensor adapter_up_t;  // [E, r, H] (U_e transposed, moe_scaling folded)
  int64_t e = 0, k = 0, r = 0;
};

struct Layer {
  torch::Tensor in_norm, post_norm;  // [H] float32
  Linear qkv, o, gate_up, down;
  std::vector<Experts> experts;          // by delta slot: the float32 per-token path
  std::shared_ptr<AdapterStack> stack;   // slots whose experts run grouped (bf16) instead

  Linear& linear(int64_t which) {
    switch (which) {
      case 0: return qkv;
      case 1: return o;
      case 2: return gate_up;
      case 3: return down;
    }
    TORCH_CHECK(false, "linear index must be 0 (qkv), 1 (o), 2 (gate_up) or 3 (down)");
  }
};

inline void rms_norm(const float* x, const float* w, float* out, int64_t rows, int64_t h, double eps) {
  for (int64_t t = 0; t < rows; ++t) {
    const float* xr = x + t * h;
    float* o = out + t * h;
    double ss = 0.0;
    for (int64_t i = 0; i < h; ++i) ss += static_cast<double>(xr[i]) * xr[i];
    const float inv = static_cast<float>(1.0 / std::sqrt(ss / h + eps));
    for (int64_t i = 0; i < h; ++i) o[i] = xr[i] * inv * w[i];
  }
}

// Rotate-half RoPE in place on `heads` consecutive heads of one token.
inline void rope(float* x, const float* cos, const float* sin, int64_t heads, int64_t d) {
  const int64_t half = d / 2;
  for (int64_t hh = 0; hh < heads; ++hh) {
    float* v = x + hh * d;
    for (int64_t i = 0; i < half; ++i) {
      const float a = v[i], b = v[i + half];
      v[i] = a * cos[i] - b * sin[i];
      v[i + half] = b * cos[i + half] + a * sin[i + half];
    }
  }
}

// One (token, KV head) of paged attention: `heads` query heads against the same K/V rows.

class DecodeModel {
 public:
  DecodeModel(int64_t hidden, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
              int64_t intermediate, double eps, int64_t sliding_window, torch::Tensor embed,
              torch::Tensor final_norm, Linear lm_head, bool tied_head, torch::Tensor cos_sin)
      : hidden_(hidden), hq_(num_heads), hkv_(num_kv_heads), d_(head_dim), inter_(intermediate),
        eps_(eps), window_(sliding_window),
        embed_(std::move(embed)), final_norm_(std::move(final_norm)), lm_head_(std::move(lm_head)),
        tied_head_(tied_head), cos_sin_(std::move(cos_sin)) {}

  void add_layer(Layer layer) { layers_.push_back(std::move(layer)); }

  // A delta's pieces, per layer and slot (empty tensors clear them).  Called between steps.
  void set_lora(int64_t layer, int64_t which, int64_t slot, std::shared_ptr<LoRA> lora) {
    TORCH_CHECK(layer >= 0 && layer < static_cast<int64_t>(layers_.size()), "layer out of range");
    layers_[layer].linear(which).set_lora(slot, std::move(lora));
  }

  void set_experts(int64_t layer, int64_t slot, const torch::Tensor& router, const torch::Tensor& down,
                   const torch::Tensor& up_t, int64_t topk) {
    TORCH_CHECK(layer >= 0 && layer < static_cast<int64_t>(layers_.size()) && slot >= 0, "layer or slot out of range");
    auto& experts = layers_[layer].experts;
    if (slot >= static_cast<int64_t>(experts.size())) experts.resize(slot + 1);
    if (!present(router)) {
      experts[slot] = Experts();
      return;
    }
    TORCH_CHECK(router.scalar_type() == at::kFloat && down.scalar_type() == at::kFloat &&
                up_t.scalar_type() == at::kFloat, "experts must be float32");
    TORCH_CHECK(router.size(0) <= 64 && topk >= 1 && topk <= router.size(0), "up to 64 experts and 1 <= k <= E");
    experts[slot] = Experts{router.contiguous(), down.contiguous(), up_t.contiguous(), router.size(0), topk,
                            down.size(1)};
    kout_ = std::max(kout_, topk);
  }

  void use_adapter_stack(int64_t layer, std::shared_ptr<AdapterStack> stack) {
    TORCH_CHECK(layer >= 0 && layer < static_cast<int64_t>(layers_.size()), "layer out of range");
    layers_[layer].stack = std::move(stack);
  }

  // Width of the top-k ids forward returns: the largest k of any delta set so far.
  void reserve_topk(int64_t k) { kout_ = std::max(kout_, k); }

  // input_ids, positions, slot_mapping, delta_slots: [B] int64; block_tables: [B, max_blocks]
  // int64; kv_cache: [L, 2, S, Hkv, D] float32 or float16.  Token b sees positions 0..positions[b]
  // of its sequence (its own K/V included) and runs the delta in slot delta_slots[b].  Returns
  // (logits [B, V] float32, local top-k ids [L, B, k], -1 where a token has fewer experts).
  std::vector<torch::Tensor> forward(const torch::Tensor& input_ids, const torch::Tensor& positions,
                                     torch::Tensor kv_cache, const torch::Tensor& slot_mapping,
                                     const torch::Tensor& block_tables, int64_t block_size,
                                     const torch::Tensor& delta_slots) {
    TORCH_CHECK(kv_cache.is_contiguous(), "kv_cache must be contiguous");
    TORCH_CHECK(delta_slots.scalar_type() == at::kLong && delta_slots.numel() == input_ids.numel() &&
                delta_slots.is_contiguous(), "delta_slots must be contiguous int64 [B]");
    if (kv_cache.scalar_type() == at::kHalf) {
      return run<at::Half>(input_ids, positions, kv_cache, slot_mapping, block_tables, block_size, delta_slots);
    }
    TORCH_CHECK(kv_cache.scalar_type() == at::kFloat, "kv_cache must be float32 or float16");
    return run<float>(input_ids, positions, kv_cache, slot_mapping, block_tables, block_size, delta_slots);
  }

 private:
  template <typename KV>
  std::vector<torch::Tensor> run(const torch::Tensor& input_ids, const torch::Tensor& positions,
                                 torch::Tensor kv_cache, const torch::Tensor& slot_mapping,
                                 const torch::Tensor& block_tables, int64_t block_size,
                                 const torch::Tensor& delta_slots) {
    const int64_t B = input_ids.size(0);
    const int64_t L = static_cast<int64_t>(layers_.size());
    const int64_t H = hidden_, D = d_;
    const int64_t q_size = hq_ * D, kv_size = hkv_ * D;
    const int64_t S = kv_cache.size(2);
    auto f32 = torch::TensorOptions().dtype(at::kFloat);

    torch::Tensor h = embed_.index_select(0, input_ids).to(at::kFloat).contiguous();  // [B, H]
    torch::Tensor x = torch::empty({B, H}, f32);
    torch::Tensor attn = torch::empty({B, q_size}, f32);
    const int64_t kout = std::max<int64_t>(kout_, 1);
    torch::Tensor topk_ids = torch::full({L, B, kout}, -1, torch::TensorOptions().dtype(at::kLong));
    const int64_t* dslots = delta_slots.data_ptr<int64_t>();
    torch::Tensor cs = cos_sin_.index_select(0, positions).contiguous();  // [B, 2, D]

    const int64_t* pos = positions.data_ptr<int64_t>();
    const int64_t* slots = slot_mapping.data_ptr<int64_t>();
    const int64_t* tables = block_tables.data_ptr<int64_t>();
    const int64_t table_w = block_tables.size(1);
    const float* csp = cs.data_ptr<float>();
    KV* cache = kv_cache.data_ptr<KV>();

    for (int64_t l = 0; l < L; ++l) {
      const Layer& ly = layers_[l];
      KV* kc = cache + (l * 2 + 0) * S * kv_size;
      KV* vc = cache + (l * 2 + 1) * S * kv_size;

      rms_norm(h.data_ptr<float>(), ly.in_norm.data_ptr<float>(), x.data_ptr<float>(), B, H, eps_);
      torch::Tensor qkv = ly.qkv(x, dslots).contiguous();  // [B, q + 2kv]
      float* qkvp = qkv.data_ptr<float>();
      for (int64_t b = 0; b < B; ++b) {
        float* row = qkvp + b * (q_size + 2 * kv_size);
        const float* c = csp + b * 2 * D;
        rope(row, c, c + D, hq_ + hkv_, D);  // q heads then k heads, contiguous
        store_kv(row + q_size, kc + slots[b] * kv_size, kv_size);
        store_kv(row + q_size + kv_size, vc + slots[b] * kv_size, kv_size);
      }
      paged_attention(AttentionShape{hq_, hkv_, d_, window_}, qkvp, kc, vc, pos, tables, table_w, block_size, B, attn.data_ptr<float>());
      h.add_(ly.o(attn, dslots));

      rms_norm(h.data_ptr<float>(), ly.post_norm.data_ptr<float>(), x.data_ptr<float>(), B, H, eps_);
      torch::Tensor gu = ly.gate_up(x, dslots);  // [B, 2I]
      torch::Tensor act = at::silu(gu.narrow(1, 0, inter_)).mul_(gu.narrow(1, inter_, inter_));  // ATen's vectorised exp
      torch::Tensor f = ly.down(act, dslots).contiguous();  // [B, H]
      int64_t* ids = topk_ids[l].data_ptr<int64_t>();
      if (ly.stack) grouped_adapters(x.data_ptr<float>(), f.data_ptr<float>(), B, *ly.stack, dslots, ids, kout);
      if (!ly.experts.empty()) adapters(x, f, ly, dslots, ids, kout);
      h.add_(f);
    }
    rms_norm(h.data_ptr<float>(), final_norm_.data_ptr<float>(), x.data_ptr<float>(), B, H, eps_);
    torch::Tensor logits = tied_head_ && !present(lm_head_.a) ? at::linear(x.to(embed_.scalar_type()), embed_).to(at::kFloat)
                                                                : lm_head_(x);
    return {logits, topk_ids};
  }

  // f += sum_j p_j U_j^T GELU(D_j f) over each token's top-k experts of its slot's float32
  // experts (slots the grouped stack serves are skipped); the router sees x.
  void adapters(const torch::Tensor& x, torch::Tensor& f, const Layer& ly, const int64_t* dslots, int64_t* ids,
                int64_t kout) const {
    const int64_t B = x.size(0), H = hidden_;
    const float* xp = x.data_ptr<float>();
    float* fp = f.data_ptr<float>();
    const int64_t num_slots = static_cast<int64_t>(ly.experts.size());
    // Tokens are independent: one task each (a token's adapters are ~150k multiply-adds).
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> logits, weights, z, delta(H), base(H);
      std::vector<int64_t> order, local;
      for (int64_t b = begin; b < end; ++b) {
        const int64_t s = dslots[b];
        if (s < 0 || s >= num_slots || ly.experts[s].e == 0 || (ly.stack && ly.stack->at(s))) continue;
        const Experts& ex = ly.experts[s];
        const int64_t E = ex.e, K = ex.k, R = ex.r;
        logits.resize(E);
        order.resize(E);
        weights.resize(K);
        local.resize(K);
        z.resize(R);
        float* fr = fp + b * H;
        route_token(xp + b * H, ex.router.data_ptr<float>(), E, H, K, local.data(), weights.data(), logits.data(),
                    order.data());
        std::copy(fr, fr + H, base.begin());  // adapters read the FFN output before it is updated
        std::fill(delta.begin(), delta.end(), 0.f);
        const float* down = ex.adapter_down.data_ptr<float>();
        const float* up_t = ex.adapter_up_t.data_ptr<float>();
        for (int64_t j = 0; j < K; ++j) {
          const int64_t e = local[j];
          if (j < kout) ids[b * kout + j] = e;
          const float p = weights[j];
          const float* de = down + e * R * H;
          const float* ue = up_t + e * R * H;
          for (int64_t rr = 0; rr < R; ++rr) {
            float acc = 0.f;
            for (int64_t i = 0; i < H; ++i) acc += de[rr * H + i] * base[i];
            z[rr] = p * gelu_exact(acc);
          }
          for (int64_t rr = 0; rr < R; ++rr) {
            const float zr = z[rr];
            const float* row = ue + rr * H;
            for (int64_t i = 0; i < H; ++i) delta[i] += zr * row[i];
          }
        }
        for (int64_t i = 0; i < H; ++i) fr[i] += delta[i];
      }
    });
  }

  int64_t hidden_, hq_, hkv_, d_, inter_;
  int64_t kout_ = 0;
  double eps_;
  int64_t window_;
  torch::Tensor embed_, final_norm_;
  Linear lm_head_;
  bool tied_head_;
  torch::Tensor cos_sin_;
  std::vector<Layer> layers_;
};

}  // namespace pesc
