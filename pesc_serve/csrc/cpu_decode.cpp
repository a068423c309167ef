// One-call decode step for a PESC (or dense) Llama-family model on CPU.
//
// Why: at decode batch sizes the model is a few big weight-only GEMMs and ~40 tiny ops per
// layer; from Python every tiny op costs several microseconds of dispatch, which on a 2-core
// CPU adds up to more than the GEMMs.  Here the tiny ops are plain loops over float32 data
// (RMSNorm, RoPE, paged attention read straight from the KV blocks, SwiGLU, router, top-k,
// the selected experts' adapters, residuals), and the GEMMs run on this file's kernels
// (int4/int8 with AVX512-VNNI, bf16 with AVX512-BF16) where the CPU has them, else ATen's.
// The maths is the Python path's (pesc_serve/models/decoder.py); tests check parity.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#if defined(__AVX512BF16__)
#define PESC_BF16_GEMM 1
#endif

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <memory>
#include <type_traits>
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

PackedBf16 pack_bf16(const torch::Tensor& w) {
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
void to_bf16_rows(const float* x, int64_t rows, int64_t k, int64_t ldx, at::BFloat16* out, int64_t kp) {
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
void bf16_gemm_tiles(const at::BFloat16* xb, int64_t M, const PackedBf16& p, float* y, int64_t ldy, int64_t t0,
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
torch::Tensor bf16_linear(const torch::Tensor& x, const PackedBf16& p) {
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

bool have_bf16_gemm() {
#ifdef PESC_BF16_GEMM
  return true;
#else
  return false;
#endif
}

// ---- low-bit GEMV/GEMM on int8 activations (AVX512-VNNI) -------------------------------------
// Why: ATen's int4 kernel converts every weight to bf16 before multiplying and tops out near
// 15 GB/s of weights at one row, so decode was compute-bound well below memory bandwidth.
// Here the activations are quantized to int8 once per call (symmetric, one scale per 32
// features: llama.cpp's Q8 scheme) and the weights stay integers: one VNNI instruction does
// 64 multiply-adds of u8 weights x s8 activations into int32.  The weights are repacked once
// so that one 64-byte load holds 16 output rows x 4 (int8) or 8 (int4) consecutive features.
//
// int4 (w = q * scale + min per 32-feature group, q in 0..15: llama.cpp's Q4_1 blocks exactly,
// scale and min kept in float16 as the GGUF file has them):
//   y = sum_g scale_g * d_g * (sum q * xq - 8 * sum xq) + (min_g + 8 * scale_g) * sum_g x
// int8 (w = q * scale per output row, stored as q + 128 so it can be the unsigned operand):
//   y = scale * sum_g d_g * (sum (q + 128) * xq - 128 * sum xq)

constexpr int64_t kQGroup = 32;     // features per activation (and int4 weight) scale
constexpr int64_t kQRows = 16;      // output rows per 64-byte weight vector (one int32 lane each)
constexpr int64_t kQTileRows = 4;   // activation rows per pass over a block of weights
constexpr int64_t kInt4GroupBytes = kQRows * kQGroup / 2;  // 256: 16 rows x 32 nibbles
constexpr int64_t kInt8GroupBytes = kQRows * kQGroup;      // 512

bool have_vnni() {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  return true;
#else
  return false;
#endif
}

// Weights in the kernels' layouts.  Block b holds output rows 16b .. 16b+15.
struct PackedInt4 {
  torch::Tensor data;    // uint8 [N/16, G, 256]: per group, 4 chunks of (16 rows x 4 bytes); a byte's
                         // low nibble is feature 8c + j, its high nibble feature 8c + 4 + j
  torch::Tensor scales;  // float16 [N/16, G, 2, 16]: scale then min of the 16 rows
  int64_t n = 0, k = 0;
};

struct PackedInt8 {
  torch::Tensor data;   // uint8 [N/16, K/4, 16, 4]: q + 128
  torch::Tensor scale;  // float32 [N] (per row) ...
  torch::Tensor group_scales;  // ... or float16 [N/16, G, 16]: one per 32 inputs (llama.cpp's Q8_0 blocks)
  int64_t n = 0, k = 0;
};

// qweight: uint8 [N, K/2], feature 2i in the low nibble of byte i, 2i+1 in the high one;
// scales_zeros: [K/32, N, 2] (the layout ATen's int4 kernel takes).
// qweight uint8 [N, K/2] (feature 2i in the low nibble); scale_min [G, N, 2]: w = q * scale + min.
PackedInt4 pack_int4(const torch::Tensor& qweight, const torch::Tensor& scale_min) {
  PackedInt4 p;
  p.n = qweight.size(0);
  p.k = qweight.size(1) * 2;
  TORCH_CHECK(p.n % kQRows == 0 && p.k % kQGroup == 0, "int4 packing needs N % 16 == 0 and K % 32 == 0");
  const int64_t nb = p.n / kQRows, g = p.k / kQGroup;
  torch::Tensor q = torch::stack({qweight.bitwise_and(15), qweight.bitwise_right_shift(4)}, -1).view({nb, kQRows, g, 4, 2, 4});
  torch::Tensor bytes = q.select(4, 0).bitwise_or(q.select(4, 1).bitwise_left_shift(4));  // [nb, 16, g, 4, 4]
  p.data = bytes.permute({0, 2, 3, 1, 4}).contiguous().view({nb, g, kInt4GroupBytes});
  p.scales = scale_min.to(at::kHalf).view({g, nb, kQRows, 2}).permute({1, 0, 3, 2}).contiguous();
  return p;
}

// weight: int8 [N, K]; scale: [N] per row, or [N, K/32] per 32-input group (w = q * scale).
PackedInt8 pack_int8(const torch::Tensor& weight, const torch::Tensor& scale) {
  PackedInt8 p;
  p.n = weight.size(0);
  p.k = weight.size(1);
  TORCH_CHECK(p.n % kQRows == 0 && p.k % kQGroup == 0, "int8 packing needs N % 16 == 0 and K % 32 == 0");
  torch::Tensor shifted = weight.to(at::kShort).add(128).to(at::kByte);
  p.data = shifted.view({p.n / kQRows, kQRows, p.k / 4, 4}).permute({0, 2, 1, 3}).contiguous();
  if (scale.dim() == 2) {
    TORCH_CHECK(scale.size(0) == p.n && scale.size(1) == p.k / kQGroup, "group scales must be [N, K/32]");
    p.group_scales = scale.to(at::kHalf).view({p.n / kQRows, kQRows, p.k / kQGroup}).permute({0, 2, 1}).contiguous();
  } else {
    p.scale = scale.to(at::kFloat).contiguous();
  }
  return p;
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
// Activation rows quantized per 32-feature group.
struct QuantizedRows {
  std::vector<int8_t> q;   // [M, K]
  std::vector<float> d;    // [M, G] scale
  std::vector<float> sum;  // [M, G] exact sum of the group's features
  std::vector<int32_t> qsum;  // [M, G] sum of the quantized features
};

void quantize_rows(const float* x, int64_t M, int64_t K, QuantizedRows& out) {
  const int64_t G = K / kQGroup;
  out.q.resize(M * K);
  out.d.resize(M * G);
  out.sum.resize(M * G);
  out.qsum.resize(M * G);
  for (int64_t i = 0; i < M * G; ++i) {
    const float* xr = x + i * kQGroup;
    const __m512 a = _mm512_loadu_ps(xr), b = _mm512_loadu_ps(xr + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
    const __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
    const __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, inv));  // round to nearest even
    const __m512i qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, inv));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out.q.data() + i * kQGroup), _mm512_cvtsepi32_epi8(qa));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out.q.data() + i * kQGroup + 16), _mm512_cvtsepi32_epi8(qb));
    out.d[i] = amax / 127.f;
    out.sum[i] = _mm512_reduce_add_ps(_mm512_add_ps(a, b));
    out.qsum[i] = _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb));
  }
}

inline __m512 load_f16x16(const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// 16 output rows x MB activation rows.  Two int32 accumulators per row halve the dependency
// chain of VNNI instructions; the float accumulators carry the per-group scales.
template <int MB>
inline void int4_block(const uint8_t* w, const at::Half* sz, int64_t G, const QuantizedRows& xq, int64_t m0,
                       int64_t K, float* y, int64_t ldy) {
  const __m512i low = _mm512_set1_epi8(0x0F);
  __m512 acc[MB];
#pragma GCC unroll 4
  for (int m = 0; m < MB; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    const uint8_t* p = w + g * kInt4GroupBytes;
    __m512i lo_acc[MB], hi_acc[MB];
#pragma GCC unroll 4
    for (int m = 0; m < MB; ++m) lo_acc[m] = hi_acc[m] = _mm512_setzero_si512();
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) {
      const __m512i v = _mm512_loadu_si512(p + 64 * c);
      const __m512i lo = _mm512_and_si512(v, low);
      const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
#pragma GCC unroll 4
      for (int m = 0; m < MB; ++m) {
        const int32_t* xr = reinterpret_cast<const int32_t*>(xq.q.data() + (m0 + m) * K + g * kQGroup + 8 * c);
        lo_acc[m] = _mm512_dpbusd_epi32(lo_acc[m], lo, _mm512_set1_epi32(xr[0]));
        hi_acc[m] = _mm512_dpbusd_epi32(hi_acc[m], hi, _mm512_set1_epi32(xr[1]));
      }
    }
    const __m512 scale = load_f16x16(sz + g * 2 * kQRows);
    // w = (q - 8) * scale + zero with zero = min + 8 * scale (exact in float32 for float16 inputs):
    // the centred q multiplies the activations' rounding error by at most 8 steps, not 15.
    const __m512 zero = _mm512_fmadd_ps(_mm512_set1_ps(8.f), scale, load_f16x16(sz + g * 2 * kQRows + kQRows));
#pragma GCC unroll 4
    for (int m = 0; m < MB; ++m) {
      const int64_t i = (m0 + m) * G + g;
      const __m512i dot = _mm512_sub_epi32(_mm512_add_epi32(lo_acc[m], hi_acc[m]), _mm512_set1_epi32(8 * xq.qsum[i]));
      acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(scale, _mm512_set1_ps(xq.d[i])), acc[m]);
      acc[m] = _mm512_fmadd_ps(zero, _mm512_set1_ps(xq.sum[i]), acc[m]);
    }
  }
#pragma GCC unroll 4
  for (int m = 0; m < MB; ++m) _mm512_storeu_ps(y + m * ldy, acc[m]);
}

// scale_row: the 16 rows' scales, or null with group_scales ([G, 16] float16) instead.
template <int MB>
inline void int8_block(const uint8_t* w, const float* scale_row, const at::Half* group_scales, int64_t G,
                       const QuantizedRows& xq, int64_t m0, int64_t K, float* y, int64_t ldy) {
  __m512 acc[MB];
#pragma GCC unroll 4
  for (int m = 0; m < MB; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    const uint8_t* p = w + g * kInt8GroupBytes;
    __m512i a0[MB], a1[MB];
#pragma GCC unroll 4
    for (int m = 0; m < MB; ++m) a0[m] = a1[m] = _mm512_setzero_si512();
#pragma GCC unroll 8
    for (int c = 0; c < 8; c += 2) {
      const __m512i v0 = _mm512_loadu_si512(p + 64 * c);
      const __m512i v1 = _mm512_loadu_si512(p + 64 * c + 64);
#pragma GCC unroll 4
      for (int m = 0; m < MB; ++m) {
        const int32_t* xr = reinterpret_cast<const int32_t*>(xq.q.data() + (m0 + m) * K + g * kQGroup + 4 * c);
        a0[m] = _mm512_dpbusd_epi32(a0[m], v0, _mm512_set1_epi32(xr[0]));
        a1[m] = _mm512_dpbusd_epi32(a1[m], v1, _mm512_set1_epi32(xr[1]));
      }
    }
    const __m512 gs = group_scales ? load_f16x16(group_scales + g * kQRows) : _mm512_set1_ps(1.f);
#pragma GCC unroll 4
    for (int m = 0; m < MB; ++m) {
      const int64_t i = (m0 + m) * G + g;
      const __m512i dot = _mm512_sub_epi32(_mm512_add_epi32(a0[m], a1[m]), _mm512_set1_epi32(128 * xq.qsum[i]));
      acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(gs, _mm512_set1_ps(xq.d[i])), acc[m]);
    }
  }
  const __m512 scale = scale_row ? _mm512_loadu_ps(scale_row) : _mm512_set1_ps(1.f);
#pragma GCC unroll 4
  for (int m = 0; m < MB; ++m) _mm512_storeu_ps(y + m * ldy, _mm512_mul_ps(acc[m], scale));
}

// Runs BLOCK<MB> for the last few rows of a tile with MB matching them.
template <int MB, typename Fn>
inline void with_tile_rows(int64_t rows, Fn&& fn) {
  if constexpr (MB > 1) {
    if (rows < MB) return with_tile_rows<MB - 1>(rows, fn);
  }
  fn(std::integral_constant<int, MB>{});
}

// y [M, N] = x [M, K] @ W^T for packed int4 / int8 W; threads split the 16-row blocks.
template <bool kInt4, typename Packed>
torch::Tensor low_bit_linear(const torch::Tensor& x, const Packed& p) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == p.k, "low-bit linear: input has ", x.size(1), " features, weight ", p.k);
  const int64_t M = x.size(0), K = p.k, G = K / kQGroup, blocks = p.n / kQRows;
  torch::Tensor xc = x.to(at::kFloat).contiguous();
  thread_local QuantizedRows xq;
  quantize_rows(xc.data_ptr<float>(), M, K, xq);
  const QuantizedRows& xr = xq;  // the worker threads read the caller's buffers
  torch::Tensor y = torch::empty({M, p.n}, xc.options());
  float* yp = y.data_ptr<float>();
  const uint8_t* wp = p.data.template data_ptr<uint8_t>();
  const at::Half* sz = nullptr;  // int4: per-group scales and mins; grouped int8: per-group scales
  const float* scale = nullptr;      // int8: per-row scales
  if constexpr (kInt4) {
    sz = p.scales.template data_ptr<at::Half>();
  } else if (present(p.group_scales)) {
    sz = p.group_scales.template data_ptr<at::Half>();
  } else {
    scale = p.scale.template data_ptr<float>();
  }
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t m0 = 0; m0 < M; m0 += kQTileRows) {
        float* yb = yp + m0 * p.n + b * kQRows;
        with_tile_rows<kQTileRows>(std::min(kQTileRows, M - m0), [&](auto mb) {
          if constexpr (kInt4) {
            int4_block<decltype(mb)::value>(wp + b * G * kInt4GroupBytes, sz + b * G * 2 * kQRows, G, xr, m0, K, yb,
                                             p.n);
          } else {
            int8_block<decltype(mb)::value>(wp + b * G * kInt8GroupBytes, scale ? scale + b * kQRows : nullptr,
                                             sz ? sz + b * G * kQRows : nullptr, G, xr, m0, K, yb, p.n);
          }
        });
      }
    }
  });
  return y;
}

torch::Tensor int4_linear(const torch::Tensor& x, const PackedInt4& p) { return low_bit_linear<true>(x, p); }
torch::Tensor int8_linear(const torch::Tensor& x, const PackedInt8& p) { return low_bit_linear<false>(x, p); }
#else
torch::Tensor int4_linear(const torch::Tensor&, const PackedInt4&) {
  TORCH_CHECK(false, "the int4 kernel needs an AVX512-VNNI build");
}
torch::Tensor int8_linear(const torch::Tensor&, const PackedInt8&) {
  TORCH_CHECK(false, "the int8 kernel needs an AVX512-VNNI build");
}
#endif

inline float gelu_exact(float x) { return 0.5f * x * (1.0f + std::erf(x * 0.70710678118654752f)); }

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

PackedAdapters pack_adapters(const torch::Tensor& router, const torch::Tensor& down, const torch::Tensor& up,
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
void grouped_adapters(const float* xp, float* fp, int64_t T, const AdapterStack& stack, const int64_t* slots,
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
std::vector<torch::Tensor> routed_adapters(const torch::Tensor& x, const torch::Tensor& f, const torch::Tensor& slots,
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

// y [M, N] += (x [M, K] A^T) B^T for an unmerged LoRA (A [r, K]; B given transposed, bt [r, N],
// scaling folded in).  Row by row with the same loops for every row, instead of ATen's matmul,
// whose blocking (and so its rounding) changes with M: a row's update, and through the int8
// activation rounding and the router its whole continuation, must not depend on the batch.
// Both loops run over contiguous memory (a dot product over K, then r AXPYs over N) and vectorise.
// `rows` (n entries, null: rows 0..n-1) picks the rows of y [*, N] and x [*, K] to update.
// `cols` ([R, 2], null: all) gives each rank's nonzero columns of B^T: a fused layer's B is
// block-diagonal (each part's rank updates only its own rows), and skipping exact zeros leaves
// every sum as it was (adding 0 * u changes nothing).
void lora_add_rows(float* yp, const float* xp, int64_t K, int64_t N, const float* ap, const float* bp, int64_t R,
                   const int64_t* rows, int64_t M, const int64_t* cols = nullptr) {
  constexpr int64_t kRows = 4;  // rows sharing each pass over B (every row's own sums stay in order)
  at::parallel_for(0, (M + kRows - 1) / kRows, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> u(kRows * R);
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t m0 = blk * kRows, n = std::min(kRows, M - m0);
      for (int64_t i = 0; i < n; ++i) {
        const int64_t row = rows ? rows[m0 + i] : m0 + i;
        const float* xr = xp + row * K;
        for (int64_t r = 0; r < R; ++r) {
          const float* ar = ap + r * K;
          float s = 0.f;
          for (int64_t k = 0; k < K; ++k) s += xr[k] * ar[k];
          u[i * R + r] = s;
        }
      }
      for (int64_t r = 0; r < R; ++r) {
        const float* br = bp + r * N;
        const int64_t c0 = cols ? cols[2 * r] : 0, c1 = cols ? cols[2 * r + 1] : N;
        for (int64_t i = 0; i < n; ++i) {
          const float ur = u[i * R + r];
          float* yr = yp + (rows ? rows[m0 + i] : m0 + i) * N;
          for (int64_t c = c0; c < c1; ++c) yr[c] += ur * br[c];
        }
      }
    }
  });
}

// cols: int64 [R, 2] (each rank's nonzero column range of bt) or empty for all columns.
void lora_add(torch::Tensor& y, const torch::Tensor& x, const torch::Tensor& a, const torch::Tensor& bt,
              const torch::Tensor& cols) {
  TORCH_CHECK(y.scalar_type() == at::kFloat && x.scalar_type() == at::kFloat && y.is_contiguous(), "lora_add: float32");
  const int64_t M = x.size(0), K = x.size(1), R = a.size(0), N = bt.size(1);
  TORCH_CHECK(a.size(1) == K && bt.size(0) == R && y.size(0) == M && y.size(1) == N, "lora_add: shapes do not fit");
  TORCH_CHECK(!present(cols) || (cols.scalar_type() == at::kLong && cols.numel() == 2 * R && cols.is_contiguous()),
              "lora_add: cols must be int64 [R, 2]");
  const torch::Tensor xc = x.contiguous();
  lora_add_rows(y.data_ptr<float>(), xc.data_ptr<float>(), K, N, a.data_ptr<float>(), bt.data_ptr<float>(), R,
                nullptr, M, present(cols) ? cols.data_ptr<int64_t>() : nullptr);
}

// One delta's unmerged LoRA on one linear layer: A [r, K] and B transposed [r, N], float32,
// scaling folded in (layers/lora.py), and each rank's nonzero columns of B^T ([r, 2]).
struct LoRA {
  torch::Tensor a, bt, cols;
};

constexpr int64_t kGemvMaxRows = 4;
// Context positions per attention chunk.  A sequence's context is split by its length alone,
// never by the batch size or the thread count, so its numbers (and a seeded request's text) do
// not depend on what else runs in the step; the chunks also keep both threads busy when few
// sequences with long contexts decode.
constexpr int64_t kChunkPositions = 256;

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

  // Derived at construction (not part of the aggregate the binding fills in):
  torch::Tensor scale_f32;  // INT8: the scales as float32, for int8_gemv
  PackedBf16 packed;        // `dense` packed for bf16_linear when it is bf16 (else empty)
  PackedInt4 int4;          // INT4 weights for int4_linear (when `a` is that packing's data)
  PackedInt8 int8;          // INT8 weights for int8_linear (likewise)
  std::vector<LoRA> loras;  // unmerged LoRA beside the weight, by delta slot (undefined a: none)

  torch::Tensor run_small(const torch::Tensor& x) const {
    if (present(int4.data)) return int4_linear(x, int4);
    if (present(int8.data)) return int8_linear(x, int8);
    switch (kind) {
      case INT8:
        // ATen's kernel needs in_features in multiples of 16 (it crashes otherwise).
        if (x.size(0) <= kGemvMaxRows || a.size(1) % 16 != 0) return int8_gemv(x.contiguous(), a, scale_f32);
        return at::_weight_int8pack_mm(x.to(b.scalar_type()), a, b);
      case INT4: return at::_weight_int4pack_mm_for_cpu(x.to(b.scalar_type()), a, group, b);
      default: return at::linear(x.to(a.scalar_type()), a);
    }
  }

  // x: [T, K] float32 -> [T, N] float32; row t gets the LoRA of delta slot slots[t] (null: none).
  torch::Tensor operator()(const torch::Tensor& x, const int64_t* slots = nullptr) const {
    torch::Tensor y;
    if (max_rows >= 0 && present(dense) && x.size(0) > max_rows) {
      y = present(packed.data) ? bf16_linear(x, packed) : at::linear(x.to(dense.scalar_type()), dense);
    } else {
      y = run_small(x);
    }
    if (y.scalar_type() != at::kFloat) y = y.to(at::kFloat);
    if (present(bias)) y.add_(bias);
    if (slots && !loras.empty()) add_loras(y, x, slots);
    return y;
  }

  void add_loras(torch::Tensor& y, const torch::Tensor& x, const int64_t* slots) const {
    y = y.contiguous();
    const torch::Tensor xc = x.contiguous();
    const int64_t M = x.size(0), K = x.size(1), N = y.size(1);
    std::vector<int64_t> rows;
    for (int64_t s = 0; s < static_cast<int64_t>(loras.size()); ++s) {
      const LoRA& l = loras[s];
      if (!present(l.a)) continue;
      rows.clear();
      for (int64_t m = 0; m < M; ++m)
        if (slots[m] == s) rows.push_back(m);
      if (rows.empty()) continue;
      lora_add_rows(y.data_ptr<float>(), xc.data_ptr<float>(), K, N, l.a.data_ptr<float>(), l.bt.data_ptr<float>(),
                    l.a.size(0), rows.data(), static_cast<int64_t>(rows.size()), l.cols.data_ptr<int64_t>());
    }
  }

  // One delta's LoRA in `slot`, B given transposed ([r, N], the layout lora_add reads); empty
  // tensors remove it.  Float32 contiguous tensors are shared with the caller, not copied.
  void set_lora_t(int64_t slot, const torch::Tensor& a, const torch::Tensor& bt) {
    TORCH_CHECK(slot >= 0, "slot must be >= 0");
    if (slot >= static_cast<int64_t>(loras.size())) loras.resize(slot + 1);
    if (!present(a)) {
      loras[slot] = LoRA();
      return;
    }
    TORCH_CHECK(a.dim() == 2 && bt.dim() == 2 && a.size(0) == bt.size(0) && bt.size(1) == out_features,
                "LoRA A [r, K] and B^T [r, N] must fit the layer");
    torch::Tensor b32 = bt.to(at::kFloat).contiguous();
    loras[slot] = LoRA{a.to(at::kFloat).contiguous(), b32, nonzero_columns(b32)};
  }

  // Each row's [first, last + 1) nonzero column (an all-zero row: an empty range).
  static torch::Tensor nonzero_columns(const torch::Tensor& bt) {
    const int64_t R = bt.size(0), N = bt.size(1);
    torch::Tensor cols = torch::zeros({R, 2}, torch::TensorOptions().dtype(at::kLong));
    const float* b = bt.data_ptr<float>();
    int64_t* c = cols.data_ptr<int64_t>();
    for (int64_t r = 0; r < R; ++r) {
      int64_t lo = N, hi = 0;
      for (int64_t n = 0; n < N; ++n) {
        if (b[r * N + n] != 0.f) {
          lo = std::min(lo, n);
          hi = n + 1;
        }
      }
      c[2 * r] = lo < hi ? lo : 0;
      c[2 * r + 1] = hi;
    }
    return cols;
  }
};

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

// One (token, KV head) of paged attention: `heads` query heads against the same K/V rows.
// KV is the cache's element type: float, or at::Half (half the bytes to read per step).
template <typename KV>
struct AttentionTask {
  const float* q;        // [heads, D] contiguous
  int64_t heads, d;
  int64_t first, n;      // attend to positions first .. first + n - 1
  const int64_t* table;  // the sequence's block table
  int64_t block_size;
  const KV* k;           // this KV head's K in the layer's cache (row stride kv_stride)
  const KV* v;
  int64_t kv_stride;
  float scale;
  float* out;            // [heads, D]
};

#if defined(__AVX512F__)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
#endif

// One token's K or V row into the cache, rounded to nearest for a half cache.
inline void store_kv(const float* src, float* dst, int64_t n) { std::copy(src, src + n, dst); }
inline void store_kv(const float* src, at::Half* dst, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16) {
    const __m256i h = _mm512_cvtps_ph(_mm512_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), h);
  }
#endif
  for (; i < n; ++i) dst[i] = at::Half(src[i]);
}


// Softmax over each head's n scores in place.
#if defined(__AVX512F__)
// e^x for x <= 0 (softmax arguments), Cephes' expf polynomial (relative error ~1e-7): a
// scalar std::exp per score was the largest part of attention over long contexts.
inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));  // e^-87 ~ 1.6e-38: still a normal float
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);  // x - n ln2, in two parts
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);  // p * 2^n
}
#endif

// With `lse`, each head's log-sum-exp too (to merge softmaxes taken over parts of a context).
inline void softmax_rows(float* scores, int64_t heads, int64_t n, float* lse) {
  for (int64_t g = 0; g < heads; ++g) {
    float* sg = scores + g * n;
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t c = 0; c < n; ++c) mx = std::max(mx, sg[c]);
    float total = 0.f;
    int64_t c = 0;
#if defined(__AVX512F__)
    __m512 sum = _mm512_setzero_ps();
    for (; c + 16 <= n; c += 16) {
      const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(sg + c), _mm512_set1_ps(mx)));
      _mm512_storeu_ps(sg + c, e);
      sum = _mm512_add_ps(sum, e);
    }
    total = _mm512_reduce_add_ps(sum);
#endif
    for (; c < n; ++c) {
      sg[c] = std::exp(sg[c] - mx);
      total += sg[c];
    }
    const float inv = 1.0f / total;
    for (int64_t c = 0; c < n; ++c) sg[c] *= inv;
    if (lse != nullptr) lse[g] = mx + std::log(total);
  }
}

// DV = D / 16 AVX-512 vectors per head (K/V rows held in registers); 0 = portable loops.
template <int DV, typename KV>
void attend(const AttentionTask<KV>& t, float* scores, float* lse) {
  const int64_t n = t.n, G = t.heads, D = t.d;
  // Row offsets once per position: the block-table lookup (a division) leaves the loops.
  thread_local std::vector<int64_t> rows;
  rows.resize(n);
  for (int64_t c = 0, p = t.first; c < n;) {
    const int64_t blk = p / t.block_size, off = p % t.block_size;
    const int64_t run = std::min(t.block_size - off, n - c);
    const int64_t base = (t.table[blk] * t.block_size + off) * t.kv_stride;
    for (int64_t j = 0; j < run; ++j) rows[c + j] = base + j * t.kv_stride;
    c += run;
    p += run;
  }
#if defined(__AVX512F__)
  if constexpr (DV > 0) {
    // Scores, four positions at a time: their four dot products share one horizontal sum.
    for (int64_t g = 0; g < G; ++g) {
      const float* qg = t.q + g * D;
      __m512 q[DV];
#pragma GCC unroll 8
      for (int i = 0; i < DV; ++i) q[i] = _mm512_loadu_ps(qg + 16 * i);
      float* sg = scores + g * n;
      int64_t c = 0;
      for (; c + 4 <= n; c += 4) {
        __m512 acc[4];
#pragma GCC unroll 4
        for (int j = 0; j < 4; ++j) {
          const KV* kr = t.k + rows[c + j];
          acc[j] = _mm512_mul_ps(q[0], load16(kr));
#pragma GCC unroll 8
          for (int i = 1; i < DV; ++i) acc[j] = _mm512_fmadd_ps(q[i], load16(kr + 16 * i), acc[j]);
        }
        // Per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3], then [a, b, c, d] partials.
        const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(acc[0], acc[1]), _mm512_unpackhi_ps(acc[0], acc[1]));
        const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(acc[2], acc[3]), _mm512_unpackhi_ps(acc[2], acc[3]));
        const __m512 abcd = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(ab), _mm512_castps_pd(cd))),
                                          _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(ab), _mm512_castps_pd(cd))));
        const __m256 half = _mm256_add_ps(_mm512_castps512_ps256(abcd), _mm512_extractf32x8_ps(abcd, 1));
        const __m128 four = _mm_add_ps(_mm256_castps256_ps128(half), _mm256_extractf128_ps(half, 1));
        _mm_storeu_ps(sg + c, _mm_mul_ps(four, _mm_set1_ps(t.scale)));
      }
      for (; c < n; ++c) {
        const KV* kr = t.k + rows[c];
        __m512 acc = _mm512_mul_ps(q[0], load16(kr));
#pragma GCC unroll 8
        for (int i = 1; i < DV; ++i) acc = _mm512_fmadd_ps(q[i], load16(kr + 16 * i), acc);
        sg[c] = _mm512_reduce_add_ps(acc) * t.scale;
      }
    }
    softmax_rows(scores, G, n, lse);
    // Values: each V row is read once for up to kHeads heads (accumulators in registers).
    constexpr int kHeads = DV <= 4 ? 4 : 2;
    for (int64_t g0 = 0; g0 < G; g0 += kHeads) {
      const int64_t hg = std::min<int64_t>(kHeads, G - g0);
      __m512 acc[kHeads][DV];
#pragma GCC unroll 4
      for (int h = 0; h < kHeads; ++h) {
#pragma GCC unroll 8
        for (int i = 0; i < DV; ++i) acc[h][i] = _mm512_setzero_ps();
      }
      for (int64_t c = 0; c < n; ++c) {
        const KV* vr = t.v + rows[c];
        __m512 v[DV];
#pragma GCC unroll 8
        for (int i = 0; i < DV; ++i) v[i] = load16(vr + 16 * i);
#pragma GCC unroll 4
        for (int h = 0; h < kHeads; ++h) {
          if (h < hg) {
            const __m512 w = _mm512_set1_ps(scores[(g0 + h) * n + c]);
#pragma GCC unroll 8
            for (int i = 0; i < DV; ++i) acc[h][i] = _mm512_fmadd_ps(w, v[i], acc[h][i]);
          }
        }
      }
      for (int64_t h = 0; h < hg; ++h) {
#pragma GCC unroll 8
        for (int i = 0; i < DV; ++i) _mm512_storeu_ps(t.out + (g0 + h) * D + 16 * i, acc[h][i]);
      }
    }
    return;
  }
#endif
  for (int64_t c = 0; c < n; ++c) {
    const KV* kr = t.k + rows[c];
    for (int64_t g = 0; g < G; ++g) {
      const float* qg = t.q + g * D;
      float s = 0.f;
      for (int64_t i = 0; i < D; ++i) s += qg[i] * static_cast<float>(kr[i]);
      scores[g * n + c] = s * t.scale;
    }
  }
  softmax_rows(scores, G, n, lse);
  std::fill(t.out, t.out + G * D, 0.f);
  for (int64_t c = 0; c < n; ++c) {
    const KV* vr = t.v + rows[c];
    for (int64_t g = 0; g < G; ++g) {
      const float w = scores[g * n + c];
      float* og = t.out + g * D;
      for (int64_t i = 0; i < D; ++i) og[i] += w * static_cast<float>(vr[i]);
    }
  }
}

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
  void set_lora(int64_t layer, int64_t which, int64_t slot, const torch::Tensor& a, const torch::Tensor& bt) {
    TORCH_CHECK(layer >= 0 && layer < static_cast<int64_t>(layers_.size()), "layer out of range");
    layers_[layer].linear(which).set_lora_t(slot, a, bt);
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
      paged_attention(qkvp, kc, vc, pos, tables, table_w, block_size, B, attn.data_ptr<float>());
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

  // Paged attention straight from the KV blocks.  A task is one token's KV head with the
  // query heads that share it (GQA), so each K/V row is read (and, from a float16 cache,
  // converted) once for the whole group.  With too few such tasks to feed every thread (a
  // few short requests), long contexts are split into chunks whose softmaxes are merged by
  // their log-sum-exp (flash-decoding).
  template <typename KV>
  void paged_attention(const float* qkvp, const KV* kc, const KV* vc, const int64_t* pos,
                       const int64_t* tables, int64_t table_w, int64_t block_size, int64_t B, float* ap) const {
    const int64_t D = d_, q_size = hq_ * D, kv_size = hkv_ * D, row_w = q_size + 2 * kv_size;
    const int64_t G = hq_ / hkv_;
    const float scale = 1.0f / std::sqrt(static_cast<float>(D));
    // (b * hkv + kvh, first position, count, chunk index, chunks of this head)
    thread_local std::vector<std::array<int64_t, 5>> tasks;
    tasks.clear();
    for (int64_t b = 0; b < B; ++b) {
      const int64_t last = pos[b];
      const int64_t first = window_ > 0 ? std::max<int64_t>(0, last - window_ + 1) : 0;
      const int64_t n = last - first + 1;
      const int64_t chunks = (n + kChunkPositions - 1) / kChunkPositions;
      for (int64_t kvh = 0; kvh < hkv_; ++kvh) {
        for (int64_t c = 0; c < chunks; ++c) {
          const int64_t c0 = first + c * n / chunks, c1 = first + (c + 1) * n / chunks;
          tasks.push_back({b * hkv_ + kvh, c0, c1 - c0, c, chunks});
        }
      }
    }
    const int64_t num_tasks = static_cast<int64_t>(tasks.size());
    thread_local std::vector<float> partial;  // per task: G x D outputs, then G log-sum-exps
    partial.resize(num_tasks * G * (D + 1));
    const auto* tp = tasks.data();
    float* pp = partial.data();
    at::parallel_for(0, num_tasks, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> scores;
      for (int64_t i = begin; i < end; ++i) {
        const auto& [bh, c0, n, c, chunks] = tp[i];
        const int64_t b = bh / hkv_, kvh = bh % hkv_;
        float* out = chunks == 1 ? ap + b * q_size + kvh * G * D : pp + i * G * (D + 1);
        const AttentionTask<KV> t{qkvp + b * row_w + kvh * G * D, G, D, c0, n, tables + b * table_w, block_size,
                                  kc + kvh * D, vc + kvh * D, kv_size, scale, out};
        scores.resize(G * n);
        float* lse = chunks == 1 ? nullptr : out + G * D;
        switch (D) {
          case 64: attend<4, KV>(t, scores.data(), lse); break;
          case 128: attend<8, KV>(t, scores.data(), lse); break;
          default: attend<0, KV>(t, scores.data(), lse);
        }
      }
    });
    // Merge the chunks of each split head: weights exp(lse_c - max lse), renormalised.
    for (int64_t i = 0; i < num_tasks;) {
      const auto& [bh, c0, n, c, chunks] = tp[i];
      if (chunks == 1) {
        ++i;
        continue;
      }
      const int64_t b = bh / hkv_, kvh = bh % hkv_;
      for (int64_t g = 0; g < G; ++g) {
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t j = 0; j < chunks; ++j) mx = std::max(mx, pp[(i + j) * G * (D + 1) + G * D + g]);
        float* o = ap + b * q_size + (kvh * G + g) * D;
        std::fill(o, o + D, 0.f);
        float total = 0.f;
        for (int64_t j = 0; j < chunks; ++j) {
          const float* part = pp + (i + j) * G * (D + 1);
          const float w = std::exp(part[G * D + g] - mx);
          total += w;
          for (int64_t e = 0; e < D; ++e) o[e] += w * part[g * D + e];
        }
        const float inv = 1.0f / total;
        for (int64_t e = 0; e < D; ++e) o[e] *= inv;
      }
      i += chunks;
    }
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

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  py::class_<PackedBf16>(m, "PackedBf16")
      .def(py::init(&pack_bf16), "pack a [N, K] weight (any float dtype) for bf16_linear")
      .def_readonly("data", &PackedBf16::data)
      .def_readonly("out_features", &PackedBf16::n)
      .def_readonly("in_features", &PackedBf16::k);
  // `dense` is the large-batch weight; `packed` (a PackedBf16 or None) is it already packed.
  // A bf16 `dense` without one is packed here when the CPU has the bf16 GEMM.
  py::class_<PackedInt4>(m, "PackedInt4")
      .def(py::init(&pack_int4), "pack qweight uint8 [N, K/2] (low nibble first) and scale_min [K/32, N, 2] (w = q * scale + min)")
      .def_readonly("data", &PackedInt4::data)
      .def_readonly("scales", &PackedInt4::scales)
      .def_readonly("out_features", &PackedInt4::n)
      .def_readonly("in_features", &PackedInt4::k);
  py::class_<PackedInt8>(m, "PackedInt8")
      .def(py::init(&pack_int8), "pack an int8 weight [N, K] with its per-row scales [N] or group scales [N, K/32]")
      .def_readonly("data", &PackedInt8::data)
      .def_readonly("out_features", &PackedInt8::n)
      .def_readonly("in_features", &PackedInt8::k);
  m.def("int4_linear", &int4_linear, "x [M, K] @ W^T for W packed by PackedInt4 (float32 out)",
        py::call_guard<py::gil_scoped_release>());
  m.def("int8_linear", &int8_linear, "x [M, K] @ W^T for W packed by PackedInt8 (float32 out)",
        py::call_guard<py::gil_scoped_release>());
  m.def("have_vnni", &have_vnni, "whether this build has the AVX512-VNNI low-bit kernels");
  // `low_bit` (a PackedInt4 or PackedInt8 or None) is the small-batch weight in this
  // extension's layout; with it, `a` and `b` are ignored.
  py::class_<Linear>(m, "Linear")
      .def(py::init([](int64_t kind, torch::Tensor a, torch::Tensor b, int64_t group, int64_t max_rows,
                       torch::Tensor dense, torch::Tensor bias, int64_t out_features, py::object packed,
                       py::object low_bit) {
        Linear lin{kind, a, b, group, max_rows, dense, bias, out_features};
        if (py::isinstance<PackedInt4>(low_bit)) lin.int4 = low_bit.cast<PackedInt4>();
        if (py::isinstance<PackedInt8>(low_bit)) lin.int8 = low_bit.cast<PackedInt8>();
        if (kind == INT8 && !present(lin.int8.data)) lin.scale_f32 = b.to(at::kFloat).contiguous();
        if (!packed.is_none()) {
          lin.packed = packed.cast<PackedBf16>();
        } else if (max_rows >= 0 && present(dense) && dense.scalar_type() == at::kBFloat16 && have_bf16_gemm()) {
          lin.packed = pack_bf16(dense);
        }
        return lin;
      }));
  m.def("lora_add",
        [](torch::Tensor y, torch::Tensor x, torch::Tensor a, torch::Tensor bt, torch::Tensor cols) {
          lora_add(y, x, a, bt, cols);
        },
        "y += (x A^T) B^T in place for bt = B^T [r, N], row by row (the same numbers whatever the batch); "
        "cols [r, 2]: each rank's nonzero columns (empty: all)",
        py::call_guard<py::gil_scoped_release>());
  m.def("lora_columns", [](torch::Tensor bt) { return Linear::nonzero_columns(bt.to(at::kFloat).contiguous()); },
        "each row's [first, last + 1) nonzero column of bt [r, N], as lora_add takes them");
  m.def("bf16_linear", &bf16_linear, "x [M, K] float32 @ W^T with W packed by PackedBf16",
        py::call_guard<py::gil_scoped_release>());
  m.def("have_bf16_gemm", &have_bf16_gemm, "whether this build has the AVX512-BF16 GEMM");
  py::class_<Layer>(m, "Layer")
      .def(py::init([](torch::Tensor in_norm, torch::Tensor post_norm, Linear qkv, Linear o, Linear gate_up,
                       Linear down) {
        return Layer{in_norm, post_norm, qkv, o, gate_up, down, {}, nullptr};
      }));
  py::class_<PackedAdapters>(m, "PackedAdapters")
      .def(py::init(&pack_adapters), "router [E, H], adapter_down [E, r, H], adapter_up [E, H, r], topk")
      .def_readonly("num_experts", &PackedAdapters::e)
      .def_readonly("topk", &PackedAdapters::k)
      .def_property_readonly("nbytes", [](const PackedAdapters& a) {
        int64_t n = a.router.numel() * a.router.element_size();
        for (const auto& p : a.down) n += p.data.numel() * p.data.element_size();
        for (const auto& p : a.up) n += p.data.numel() * p.data.element_size();
        return n;
      });
  py::class_<AdapterStack, std::shared_ptr<AdapterStack>>(m, "AdapterStack")
      .def(py::init<>())
      .def("set", &AdapterStack::set, "put a delta's packed experts in a slot")
      .def("clear", &AdapterStack::clear, "empty a slot")
      .def("has", [](const AdapterStack& s, int64_t slot) { return s.at(slot) != nullptr; });
  m.def("routed_adapters", &routed_adapters,
        "(f + routed adapters, local top-k ids [T, kout]) for x, f [T, H] and delta slots [T]",
        py::call_guard<py::gil_scoped_release>());
  py::class_<DecodeModel>(m, "DecodeModel")
      .def(py::init<int64_t, int64_t, int64_t, int64_t, int64_t, double, int64_t, torch::Tensor, torch::Tensor,
                    Linear, bool, torch::Tensor>())
      .def("add_layer", &DecodeModel::add_layer)
      .def("set_lora", &DecodeModel::set_lora,
           "layer, linear (0 qkv, 1 o, 2 gate_up, 3 down), slot, A [r, K], B^T [r, N] (float32: shared, not copied)")
      .def("set_experts", &DecodeModel::set_experts, "layer, slot, router [E, H], down [E, r, H], up_t [E, r, H], topk")
      .def("use_adapter_stack", &DecodeModel::use_adapter_stack)
      .def("reserve_topk", &DecodeModel::reserve_topk)
      .def("forward", &DecodeModel::forward, py::call_guard<py::gil_scoped_release>());
}
