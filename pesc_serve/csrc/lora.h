// Unmerged LoRA beside a linear layer: y += scale * (x A^T) B^T, row by row.
#pragma once

#include "common.h"

namespace pesc {

// One checkpoint pair on a (possibly fused) linear layer: A [r, K] and B transposed [r, n],
// float32 or bf16 as the delta stores them, updating output columns offset .. offset + n - 1
// (a fused q/k/v or gate/up layer has one part per projection: no block-diagonal zeros are
// stored or multiplied).
struct LoRAPart {
  torch::Tensor a, bt;
  int64_t offset = 0;
};

// One delta's LoRA on one linear layer: its parts and the scaling (alpha / r), kept out of the
// weights so they stay exactly the file's.
struct LoRA {
  std::vector<LoRAPart> parts;
  float scale = 1.f;
  int64_t in_features = 0, ranks = 0;  // K and the parts' summed rank

  int64_t nbytes() const {
    int64_t n = 0;
    for (const auto& p : parts) n += p.a.numel() * p.a.element_size() + p.bt.numel() * p.bt.element_size();
    return n;
  }
};

inline std::shared_ptr<LoRA> make_lora(const std::vector<torch::Tensor>& a, const std::vector<torch::Tensor>& bt,
                                       const std::vector<int64_t>& offsets, double scale) {
  TORCH_CHECK(!a.empty() && a.size() == bt.size() && a.size() == offsets.size(), "LoRA: one A, B^T and offset per part");
  auto l = std::make_shared<LoRA>();
  l->scale = static_cast<float>(scale);
  l->in_features = a[0].size(1);
  for (size_t i = 0; i < a.size(); ++i) {
    TORCH_CHECK(a[i].dim() == 2 && bt[i].dim() == 2 && a[i].size(0) == bt[i].size(0) && a[i].size(1) == l->in_features,
                "LoRA part ", i, ": A [r, K] and B^T [r, n] must share r and K");
    TORCH_CHECK(a[i].scalar_type() == bt[i].scalar_type() &&
                    (a[i].scalar_type() == at::kFloat || a[i].scalar_type() == at::kBFloat16),
                "LoRA part ", i, ": A and B^T must both be float32 or both bfloat16");
    TORCH_CHECK(offsets[i] >= 0, "LoRA part ", i, ": negative offset");
    l->parts.push_back(LoRAPart{a[i].contiguous(), bt[i].contiguous(), offsets[i]});
    l->ranks += a[i].size(0);
  }
  return l;
}

inline float to_float(float v) { return v; }
inline float to_float(at::BFloat16 v) { return static_cast<float>(v); }

#if defined(__AVX512F__)
inline __m512 load_f32x16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load_f32x16(const at::BFloat16* p) {  // bf16 -> float32 is exact: the bits shifted up
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
#endif

// sum_k x[k] * w[k] in a fixed order (16 lanes, then the lanes in order): the same for every row.
template <typename W>
inline float lora_dot(const float* x, const W* w, int64_t K) {
  int64_t k = 0;
  float s = 0.f;
#if defined(__AVX512F__)
  __m512 acc = _mm512_setzero_ps();
  for (; k + 16 <= K; k += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(x + k), load_f32x16(w + k), acc);
  s = _mm512_reduce_add_ps(acc);
#endif
  for (; k < K; ++k) s += x[k] * to_float(w[k]);
  return s;
}

// y[c] += sum_r u[r] * bt[r][c] for c in [c0, c1): y is loaded and stored once per column block.
// Vector lanes and the scalar tail both fuse each multiply-add (std::fma), so an element's
// numbers do not depend on where a block of columns starts.
template <typename W>
inline void lora_axpy(float* y, const float* u, const W* bt, int64_t R, int64_t n, int64_t c0, int64_t c1) {
  int64_t c = c0;
#if defined(__AVX512F__)
  for (; c + 16 <= c1; c += 16) {
    __m512 acc = _mm512_loadu_ps(y + c);
    for (int64_t r = 0; r < R; ++r) acc = _mm512_fmadd_ps(_mm512_set1_ps(u[r]), load_f32x16(bt + r * n + c), acc);
    _mm512_storeu_ps(y + c, acc);
  }
#endif
  for (; c < c1; ++c) {
    float acc = y[c];
    for (int64_t r = 0; r < R; ++r) acc = std::fma(u[r], to_float(bt[r * n + c]), acc);
    y[c] = acc;
  }
}

// One row's LoRA: the delta's pairs (null: none) and the row's scaled x A^T, every part's
// ranks in order (lora_row_dots).
struct RowLoRA {
  const LoRA* lora = nullptr;
  float* u = nullptr;
};

// u [ranks] = scale * x A^T over every part, for one row x [K].
inline void lora_row_dots(const float* xr, const LoRA& l, float* u) {
  for (const auto& p : l.parts) {
    const int64_t R = p.a.size(0), K = p.a.size(1);
    for (int64_t r = 0; r < R; ++r) {
      u[r] = l.scale * (p.a.scalar_type() == at::kBFloat16 ? lora_dot(xr, p.a.data_ptr<at::BFloat16>() + r * K, K)
                                                            : lora_dot(xr, p.a.data_ptr<float>() + r * K, K));
    }
    u += R;
  }
}

// The update of one row yr [layer outputs] on its columns c0 .. c1 - 1 (whichever parts cover them).
inline void lora_row_block(float* yr, const RowLoRA& rl, int64_t c0, int64_t c1) {
  const float* u = rl.u;
  for (const auto& p : rl.lora->parts) {
    const int64_t R = p.bt.size(0), n = p.bt.size(1);
    const int64_t lo = std::max(c0, p.offset), hi = std::min(c1, p.offset + n);
    if (lo < hi) {
      if (p.bt.scalar_type() == at::kBFloat16) {
        lora_axpy(yr + p.offset, u, p.bt.data_ptr<at::BFloat16>(), R, n, lo - p.offset, hi - p.offset);
      } else {
        lora_axpy(yr + p.offset, u, p.bt.data_ptr<float>(), R, n, lo - p.offset, hi - p.offset);
      }
    }
    u += R;
  }
}

// The rows' RowLoRA: `lora_of(m)` names row m's LoRA (null: none); u storage in `u_buf`.
template <typename F>
inline void row_loras(const float* xp, int64_t K, int64_t M, F&& lora_of, std::vector<RowLoRA>& rows,
                      std::vector<float>& u_buf) {
  int64_t total = 0;
  rows.assign(M, RowLoRA());
  for (int64_t m = 0; m < M; ++m) {
    rows[m].lora = lora_of(m);
    if (rows[m].lora) total += rows[m].lora->ranks;
  }
  u_buf.resize(total);
  for (int64_t m = 0, at = 0; m < M; ++m) {
    if (!rows[m].lora) continue;
    rows[m].u = u_buf.data() + at;
    at += rows[m].lora->ranks;
  }
  RowLoRA* rp = rows.data();  // workers read the caller's vectors
  at::parallel_for(0, M, M >= 8 ? 1 : M, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      if (rp[m].lora) lora_row_dots(xp + m * K, *rp[m].lora, rp[m].u);
  });
}

// y [M, ldy] += each row's update (rows without a LoRA unchanged; row_loras made `rows`).
// Why row by row, not ATen's matmul: its blocking (and so its rounding) changes with M, and a
// row's update, through the int8 activation rounding and the router its whole continuation,
// must not depend on the batch.  Every row runs the same loops whatever M is and however the
// work is split between threads (each output element's sum has one fixed order).  One row is
// a few microseconds of work, cheaper than waking the other thread; many rows split columns.
inline void lora_add_rows(float* yp, int64_t ldy, int64_t M, const std::vector<RowLoRA>& rows) {
  constexpr int64_t kCols = 256;  // columns per task (a multiple of the 16-wide vector)
  int64_t work = 0;
  for (const auto& rl : rows)
    if (rl.lora) work += rl.lora->ranks * ldy;
  const int64_t tasks = (ldy + kCols - 1) / kCols;
  const RowLoRA* rp = rows.data();
  at::parallel_for(0, tasks, work >= (1 << 16) ? 1 : tasks, [&](int64_t t0, int64_t t1) {
    for (int64_t m = 0; m < M; ++m) {
      if (rp[m].lora) lora_row_block(yp + m * ldy, rp[m], t0 * kCols, std::min(ldy, t1 * kCols));
    }
  });
}

// The Python entry: y [M, N] float32 (contiguous) += the update for x [M, K] float32.
inline void lora_add(torch::Tensor& y, const torch::Tensor& x, const LoRA& l) {
  TORCH_CHECK(y.scalar_type() == at::kFloat && x.scalar_type() == at::kFloat && y.is_contiguous() && y.dim() == 2,
              "lora_add: y and x must be float32, y contiguous [M, N]");
  TORCH_CHECK(x.dim() == 2 && x.size(0) == y.size(0) && x.size(1) == l.in_features, "lora_add: x must be [M, K]");
  for (const auto& p : l.parts)
    TORCH_CHECK(p.offset + p.bt.size(1) <= y.size(1), "lora_add: a part reaches past the layer's outputs");
  const torch::Tensor xc = x.contiguous();
  thread_local std::vector<RowLoRA> rows;
  thread_local std::vector<float> u;
  row_loras(xc.data_ptr<float>(), x.size(1), x.size(0), [&](int64_t) { return &l; }, rows, u);
  lora_add_rows(y.data_ptr<float>(), y.size(1), x.size(0), rows);
}

}  // namespace pesc
