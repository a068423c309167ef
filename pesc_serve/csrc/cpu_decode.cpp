// One-call decode step for a PESC (or dense) Llama-family model on CPU.
//
// Why: at decode batch sizes the model is a few big weight-only GEMMs and ~40 tiny ops per
// layer; from Python every tiny op costs several microseconds of dispatch, which on a 2-core
// CPU adds up to more than the GEMMs.  Here the tiny ops are plain loops over float32 data
// (RMSNorm, RoPE, paged attention read straight from the KV blocks, SwiGLU, router, top-k,
// the selected experts' adapters, residuals) and only the GEMMs go through ATen kernels.
// The maths is the Python path's (pesc_serve/models/decoder.py); tests check parity.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

enum LinearKind : int64_t { DENSE = 0, INT8 = 1, INT4 = 2 };

// Python passes empty tensors for "none".
inline bool present(const torch::Tensor& t) { return t.defined() && t.numel() > 0; }

// y = scale * (x @ W^T) for int8 W [N, K], float32 x [B, K] with few rows: each weight row is
// read once for all rows of x.  ATen's int8 kernel converts activations to bf16 and is about
// half as fast at one row (it is built for larger batches).
torch::Tensor int8_gemv(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& scale) {
  const int64_t B = x.size(0), K = x.size(1), N = w.size(0);
  torch::Tensor y = torch::empty({B, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const int8_t* wp = w.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, 256, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const int8_t* row = wp + n * K;
      for (int64_t b = 0; b < B; ++b) {
        const float* xr = xp + b * K;
        float s = 0.f;
        for (int64_t k = 0; k < K; ++k) s += xr[k] * static_cast<float>(row[k]);
        yp[b * N + n] = s * sp[n];
      }
    }
  });
  return y;
}

constexpr int64_t kGemvMaxRows = 4;

// A linear layer as the Python loader built it: a weight-only kernel for small batches and,
// optionally, dense weights for batches above max_rows.  Kernels run in kernel_dtype.
struct Linear {
  int64_t kind;
  torch::Tensor a;      // DENSE: weight [N, K]; INT8: int8 weight [N, K]; INT4: packed weight
  torch::Tensor b;      // INT8: scale [N]; INT4: scales_zeros [G, N, 2]; DENSE: unused
  int64_t group;        // INT4 group size
  int64_t max_rows;     // use `dense` above this many rows (-1: never)
  torch::Tensor dense;  // dense weight [N, K] for large batches (undefined: none)
  torch::Tensor bias;   // [N] float32 or undefined
  int64_t out_features;

  torch::Tensor scale_f32;  // INT8: the scales as float32, for int8_gemv

  torch::Tensor run_small(const torch::Tensor& x) const {
    switch (kind) {
      case INT8:
        if (x.size(0) <= kGemvMaxRows) return int8_gemv(x.contiguous(), a, scale_f32);
        return at::_weight_int8pack_mm(x.to(b.scalar_type()), a, b);
      case INT4: return at::_weight_int4pack_mm_for_cpu(x.to(b.scalar_type()), a, group, b);
      default: return at::linear(x.to(a.scalar_type()), a);
    }
  }

  // x: [T, K] float32 -> [T, N] float32
  torch::Tensor operator()(const torch::Tensor& x) const {
    torch::Tensor y = (max_rows >= 0 && present(dense) && x.size(0) > max_rows)
                          ? at::linear(x.to(dense.scalar_type()), dense)
                          : run_small(x);
    if (y.scalar_type() != at::kFloat) y = y.to(at::kFloat);
    if (present(bias)) y.add_(bias);
    return y;
  }
};

struct Layer {
  torch::Tensor in_norm, post_norm;  // [H] float32
  Linear qkv, o, gate_up, down;
  torch::Tensor router;              // [E, H] float32 (undefined for dense models)
  torch::Tensor adapter_down;        // [E, r, H] float32
  torch::Tensor adapter_up_t;        // [E, r, H] float32 (U_e transposed, moe_scaling folded)
};

void rms_norm(const float* x, const float* w, float* out, int64_t rows, int64_t h, double eps) {
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
void rope(float* x, const float* cos, const float* sin, int64_t heads, int64_t d) {
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

inline float gelu_exact(float x) { return 0.5f * x * (1.0f + std::erf(x * 0.70710678118654752f)); }

class DecodeModel {
 public:
  DecodeModel(int64_t hidden, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
              int64_t intermediate, int64_t num_experts, int64_t topk, int64_t adapter_dim,
              double eps, int64_t sliding_window, torch::Tensor embed, torch::Tensor final_norm,
              Linear lm_head, bool tied_head, torch::Tensor cos_sin)
      : hidden_(hidden), hq_(num_heads), hkv_(num_kv_heads), d_(head_dim), inter_(intermediate),
        e_(num_experts), k_(topk), r_(adapter_dim), eps_(eps), window_(sliding_window),
        embed_(std::move(embed)), final_norm_(std::move(final_norm)), lm_head_(std::move(lm_head)),
        tied_head_(tied_head), cos_sin_(std::move(cos_sin)) {}

  void add_layer(Layer layer) { layers_.push_back(std::move(layer)); }

  // input_ids, positions, slot_mapping: [B] int64; block_tables: [B, max_blocks] int64;
  // kv_cache: [L, 2, S, Hkv, D] float32.  Token b sees positions 0..positions[b] of its
  // sequence (its own K/V included).  Returns (logits [B, V] float32, top-k ids [L, B, k]).
  std::vector<torch::Tensor> forward(const torch::Tensor& input_ids, const torch::Tensor& positions,
                                     torch::Tensor kv_cache, const torch::Tensor& slot_mapping,
                                     const torch::Tensor& block_tables, int64_t block_size) {
    TORCH_CHECK(kv_cache.scalar_type() == at::kFloat && kv_cache.is_contiguous(), "kv_cache must be contiguous float32");
    const int64_t B = input_ids.size(0);
    const int64_t L = static_cast<int64_t>(layers_.size());
    const int64_t H = hidden_, D = d_;
    const int64_t q_size = hq_ * D, kv_size = hkv_ * D;
    const int64_t S = kv_cache.size(2);
    auto f32 = torch::TensorOptions().dtype(at::kFloat);

    torch::Tensor h = embed_.index_select(0, input_ids).to(at::kFloat).contiguous();  // [B, H]
    torch::Tensor x = torch::empty({B, H}, f32);
    torch::Tensor attn = torch::empty({B, q_size}, f32);
    torch::Tensor topk_ids = torch::zeros({L, B, std::max<int64_t>(k_, 1)}, torch::TensorOptions().dtype(at::kLong));
    torch::Tensor cs = cos_sin_.index_select(0, positions).contiguous();  // [B, 2, D]

    const int64_t* pos = positions.data_ptr<int64_t>();
    const int64_t* slots = slot_mapping.data_ptr<int64_t>();
    const int64_t* tables = block_tables.data_ptr<int64_t>();
    const int64_t table_w = block_tables.size(1);
    const float* csp = cs.data_ptr<float>();
    float* cache = kv_cache.data_ptr<float>();
    const float scale = 1.0f / std::sqrt(static_cast<float>(D));
    const int64_t group = hq_ / hkv_;

    for (int64_t l = 0; l < L; ++l) {
      const Layer& ly = layers_[l];
      float* kc = cache + (l * 2 + 0) * S * kv_size;
      float* vc = cache + (l * 2 + 1) * S * kv_size;

      rms_norm(h.data_ptr<float>(), ly.in_norm.data_ptr<float>(), x.data_ptr<float>(), B, H, eps_);
      torch::Tensor qkv = ly.qkv(x).contiguous();  // [B, q + 2kv]
      float* qkvp = qkv.data_ptr<float>();
      for (int64_t b = 0; b < B; ++b) {
        float* row = qkvp + b * (q_size + 2 * kv_size);
        const float* c = csp + b * 2 * D;
        rope(row, c, c + D, hq_ + hkv_, D);  // q heads then k heads, contiguous
        std::copy(row + q_size, row + q_size + kv_size, kc + slots[b] * kv_size);
        std::copy(row + q_size + kv_size, row + q_size + 2 * kv_size, vc + slots[b] * kv_size);
      }
      // Paged attention straight from the blocks: one task per (token, query head).
      float* ap = attn.data_ptr<float>();
      at::parallel_for(0, B * hq_, 1, [&](int64_t begin, int64_t end) {
        std::vector<float> scores;
        for (int64_t task = begin; task < end; ++task) {
          const int64_t b = task / hq_, head = task % hq_, kvh = head / group;
          const float* q = qkvp + b * (q_size + 2 * kv_size) + head * D;
          const int64_t last = pos[b];
          const int64_t first = window_ > 0 ? std::max<int64_t>(0, last - window_ + 1) : 0;
          const int64_t n = last - first + 1;
          scores.resize(n);
          const int64_t* table = tables + b * table_w;
          float mx = -std::numeric_limits<float>::infinity();
          for (int64_t c = 0; c < n; ++c) {
            const int64_t p = first + c;
            const float* kr = kc + (table[p / block_size] * block_size + p % block_size) * kv_size + kvh * D;
            float s = 0.f;
            for (int64_t i = 0; i < D; ++i) s += q[i] * kr[i];
            s *= scale;
            scores[c] = s;
            mx = std::max(mx, s);
          }
          float denom = 0.f;
          for (int64_t c = 0; c < n; ++c) {
            scores[c] = std::exp(scores[c] - mx);
            denom += scores[c];
          }
          float* out = ap + b * q_size + head * D;
          std::fill(out, out + D, 0.f);
          for (int64_t c = 0; c < n; ++c) {
            const int64_t p = first + c;
            const float* vr = vc + (table[p / block_size] * block_size + p % block_size) * kv_size + kvh * D;
            const float w = scores[c] / denom;
            for (int64_t i = 0; i < D; ++i) out[i] += w * vr[i];
          }
        }
      });
      h.add_(ly.o(attn));

      rms_norm(h.data_ptr<float>(), ly.post_norm.data_ptr<float>(), x.data_ptr<float>(), B, H, eps_);
      torch::Tensor gu = ly.gate_up(x);  // [B, 2I]
      torch::Tensor act = at::silu(gu.narrow(1, 0, inter_)).mul_(gu.narrow(1, inter_, inter_));  // ATen's vectorised exp
      torch::Tensor f = ly.down(act).contiguous();  // [B, H]
      if (e_ > 0) adapters(x, f, ly, topk_ids[l]);
      h.add_(f);
    }
    rms_norm(h.data_ptr<float>(), final_norm_.data_ptr<float>(), x.data_ptr<float>(), B, H, eps_);
    torch::Tensor logits = tied_head_ && !present(lm_head_.a) ? at::linear(x.to(embed_.scalar_type()), embed_).to(at::kFloat)
                                                                : lm_head_(x);
    return {logits, topk_ids};
  }

 private:
  // f += sum_j p_j U_j^T GELU(D_j f) over each token's top-k experts; the router sees x.
  void adapters(const torch::Tensor& x, torch::Tensor& f, const Layer& ly, torch::Tensor ids_out) const {
    const int64_t B = x.size(0), H = hidden_;
    const float* xp = x.data_ptr<float>();
    float* fp = f.data_ptr<float>();
    const float* router = ly.router.data_ptr<float>();
    const float* down = ly.adapter_down.data_ptr<float>();
    const float* up_t = ly.adapter_up_t.data_ptr<float>();
    int64_t* ids = ids_out.data_ptr<int64_t>();
    std::vector<float> logits(e_), z(r_), delta(H), base(H);
    std::vector<int64_t> order(e_);
    for (int64_t b = 0; b < B; ++b) {
      const float* xr = xp + b * H;
      float* fr = fp + b * H;
      for (int64_t e = 0; e < e_; ++e) {
        float s = 0.f;
        for (int64_t i = 0; i < H; ++i) s += router[e * H + i] * xr[i];
        logits[e] = s;
      }
      for (int64_t e = 0; e < e_; ++e) order[e] = e;
      std::partial_sort(order.begin(), order.begin() + k_, order.end(), [&](int64_t a, int64_t c) {
        return logits[a] > logits[c] || (logits[a] == logits[c] && a < c);
      });
      const float mx = logits[order[0]];
      float denom = 0.f;
      for (int64_t j = 0; j < k_; ++j) denom += std::exp(logits[order[j]] - mx);
      std::copy(fr, fr + H, base.begin());  // adapters read the FFN output before it is updated
      std::fill(delta.begin(), delta.end(), 0.f);
      for (int64_t j = 0; j < k_; ++j) {
        const int64_t e = order[j];
        ids[b * k_ + j] = e;
        const float p = std::exp(logits[e] - mx) / denom;
        const float* de = down + e * r_ * H;
        const float* ue = up_t + e * r_ * H;
        for (int64_t rr = 0; rr < r_; ++rr) {
          float s = 0.f;
          for (int64_t i = 0; i < H; ++i) s += de[rr * H + i] * base[i];
          z[rr] = p * gelu_exact(s);
        }
        for (int64_t rr = 0; rr < r_; ++rr) {
          const float zr = z[rr];
          const float* row = ue + rr * H;
          for (int64_t i = 0; i < H; ++i) delta[i] += zr * row[i];
        }
      }
      for (int64_t i = 0; i < H; ++i) fr[i] += delta[i];
    }
  }

  int64_t hidden_, hq_, hkv_, d_, inter_, e_, k_, r_;
  double eps_;
  int64_t window_;
  torch::Tensor embed_, final_norm_;
  Linear lm_head_;
  bool tied_head_;
  torch::Tensor cos_sin_;
  std::vector<Layer> layers_;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  py::class_<Linear>(m, "Linear")
      .def(py::init([](int64_t kind, torch::Tensor a, torch::Tensor b, int64_t group, int64_t max_rows,
                       torch::Tensor dense, torch::Tensor bias, int64_t out_features) {
        Linear lin{kind, a, b, group, max_rows, dense, bias, out_features};
        if (kind == INT8) lin.scale_f32 = b.to(at::kFloat).contiguous();
        return lin;
      }));
  py::class_<Layer>(m, "Layer")
      .def(py::init([](torch::Tensor in_norm, torch::Tensor post_norm, Linear qkv, Linear o, Linear gate_up,
                       Linear down, torch::Tensor router, torch::Tensor adapter_down, torch::Tensor adapter_up_t) {
        return Layer{in_norm, post_norm, qkv, o, gate_up, down, router, adapter_down, adapter_up_t};
      }));
  py::class_<DecodeModel>(m, "DecodeModel")
      .def(py::init<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, double, int64_t,
                    torch::Tensor, torch::Tensor, Linear, bool, torch::Tensor>())
      .def("add_layer", &DecodeModel::add_layer)
      .def("forward", &DecodeModel::forward, py::call_guard<py::gil_scoped_release>());
}
