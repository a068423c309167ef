// Small-batch bf16 GEMM on weights packed once (AVX512-BF16), and the packing.
#pragma once

#include "common.h"

namespace pesc {

// ---- small-batch bf16 GEMM -------------------------------------------------------------------
// Why: ATen's bf16 linear (oneDNN) re-lays out the weight on every call, ~90 us per call at
// these sizes, and reaches about 150 GFLOP/s at 16 rows.  Packing once at load time and
// running AVX512-BF16 dot products straight from the packed tiles roughly doubles that.
// Layout: 48-column tiles; within a tile, for each pair of input features, 48 columns x 2
// bf16 (three zmm registers).  One broadcast of a row's feature pair feeds all three.

constexpr int64_t kTileVecs = 3;               // zmm registers of output columns per tile
constexpr int64_t kTileCols = 16 * kTileVecs;  // 48: divides the hidden, FFN and vocab sizes we serve
constexpr int64_t kMaxTileRows = 8;            // 8 x 3 accumulators + 3 weight registers + 1 broadcast

struct PackedBf16 {
  torch::Tensor data;  // bf16 [tiles, K/2, 48, 2]
  int64_t n = 0, k = 0, kp = 0, tiles = 0;
};

inline PackedBf16 pack_bf16(const torch::Tensor& w) {
  PackedBf16 p;
  p.n = w.size(0);
  p.k = w.size(1);
  p.kp = (p.k + 1) / 2;
  p.tiles = (p.n + kTileCols - 1) / kTileCols;
  torch::Tensor padded = torch::zeros({p.tiles * kTileCols, p.kp * 2}, torch::TensorOptions().dtype(at::kBFloat16));
  padded.narrow(0, 0, p.n).narrow(1, 0, p.k).copy_(w);
  p.data = padded.view({p.tiles, kTileCols, p.kp, 2}).permute({0, 2, 1, 3}).contiguous();
  return p;
}

#ifdef PESC_BF16_GEMM
inline __mmask16 column_mask(int64_t valid, int64_t vec) {
  const int64_t n = std::clamp<int64_t>(valid - 16 * vec, 0, 16);
  return static_cast<__mmask16>((1u << n) - 1);
}

// MB rows x the first NB column vectors of one tile: the accumulators stay in registers (the
// pragmas make GCC unroll the register arrays instead of spilling them), one weight load
// feeds MB rows.  A tile whose valid columns fit in fewer vectors (the last one, e.g. 16 of
// an adapter's 64 columns) skips the padding's loads and products.
template <int MB, int NB>
inline void bf16_tile(const uint32_t* xp, int64_t kp, const uint16_t* wt, float* y, int64_t ldy, int64_t valid) {
  __m512 acc[MB][NB];
#pragma GCC unroll 8
  for (int m = 0; m < MB; ++m) {
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) acc[m][j] = _mm512_setzero_ps();
  }
  for (int64_t kk = 0; kk < kp; ++kk) {
    __m512bh w[NB];
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) w[j] = (__m512bh)_mm512_loadu_si512(wt + (kk * kTileVecs + j) * 32);
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) {
      const __m512bh xb = (__m512bh)_mm512_set1_epi32(static_cast<int>(xp[m * kp + kk]));
#pragma GCC unroll 4
      for (int j = 0; j < NB; ++j) acc[m][j] = _mm512_dpbf16_ps(acc[m][j], xb, w[j]);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MB; ++m) {
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) _mm512_mask_storeu_ps(y + m * ldy + 16 * j, column_mask(valid, j), acc[m][j]);
  }
}

template <int MB>
void bf16_rows(const uint32_t* xp, int64_t kp, const uint16_t* wt, float* y, int64_t ldy, int64_t valid, int64_t rows) {
  if constexpr (MB > 1) {
    if (rows < MB) return bf16_rows<MB - 1>(xp, kp, wt, y, ldy, valid, rows);
  }
  static_assert(kTileVecs == 3, "bf16_rows dispatches on 1..3 column vectors");
  if (valid > 32) return bf16_tile<MB, 3>(xp, kp, wt, y, ldy, valid);
  if (valid > 16) return bf16_tile<MB, 2>(xp, kp, wt, y, ldy, valid);
  bf16_tile<MB, 1>(xp, kp, wt, y, ldy, valid);
}
#endif

// Rows of float32 -> bf16 feature pairs, zero-padded to an even width (the GEMM's input).
inline void to_bf16_rows(const float* x, int64_t rows, int64_t k, int64_t ldx, at::BFloat16* out, int64_t kp) {
  for (int64_t m = 0; m < rows; ++m) {
    const float* xr = x + m * ldx;
    at::BFloat16* o = out + m * kp * 2;
    int64_t i = 0;
#ifdef PESC_BF16_GEMM
    for (; i + 16 <= k; i += 16) {  // round-to-nearest-even, as at::BFloat16 does
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + i), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(xr + i)));
    }
#endif
    for (; i < k; ++i) o[i] = at::BFloat16(xr[i]);
    if (k % 2) o[k] = at::BFloat16(0.f);
  }
}

#ifdef PESC_BF16_GEMM
// y [M, N] (row stride ldy) = x @ W^T over the tiles t0 .. t1-1, on the calling thread.
inline void bf16_gemm_tiles(const at::BFloat16* xb, int64_t M, const PackedBf16& p, float* y, int64_t ldy, int64_t t0,
                     int64_t t1) {
  const uint32_t* xp = reinterpret_cast<const uint32_t*>(xb);
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(p.data.data_ptr<at::BFloat16>());
  const int64_t tile_elems = p.kp * kTileCols * 2;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t valid = std::min<int64_t>(kTileCols, p.n - t * kTileCols);
    for (int64_t m0 = 0; m0 < M; m0 += kMaxTileRows) {
      bf16_rows<kMaxTileRows>(xp + m0 * p.kp, p.kp, wp + t * tile_elems, y + m0 * ldy + t * kTileCols, ldy, valid,
                              std::min<int64_t>(kMaxTileRows, M - m0));
    }
  }
}
#endif

// y [M, N] float32 = x [M, K] float32 @ W^T, W packed by pack_bf16.
inline torch::Tensor bf16_linear(const torch::Tensor& x, const PackedBf16& p) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == p.k, "bf16_linear: input has ", x.size(1), " features, weight ", p.k);
  const int64_t M = x.size(0);
  torch::Tensor xb = torch::zeros({M, p.kp * 2}, torch::TensorOptions().dtype(at::kBFloat16));
  xb.narrow(1, 0, p.k).copy_(x);
#ifdef PESC_BF16_GEMM
  torch::Tensor y = torch::empty({M, p.n}, x.options().dtype(at::kFloat));
  const at::BFloat16* xbp = xb.data_ptr<at::BFloat16>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, p.tiles, 1, [&](int64_t t0, int64_t t1) { bf16_gemm_tiles(xbp, M, p, yp, p.n, t0, t1); });
  return y;
#else
  torch::Tensor w = p.data.permute({0, 2, 1, 3}).reshape({p.tiles * kTileCols, p.kp * 2}).narrow(0, 0, p.n);
  return at::linear(xb, w).to(at::kFloat);
#endif
}

inline bool have_bf16_gemm() {
#ifdef PESC_BF16_GEMM
  return true;
#else
  return false;
#endif
}

}  // namespace pesc
