// Weight-only int4/int8 GEMV/GEMM on int8 activations (AVX512-VNNI), and the packings.
#pragma once

#include "common.h"

namespace pesc {

// y = scale * (x @ W^T) for int8 W [N, K], float32 x [B, K] with few rows: each weight row is
// read once for all rows of x.  ATen's int8 kernel converts activations to bf16 and is about
// half as fast at one row (it is built for larger batches).
inline torch::Tensor int8_gemv(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& scale) {
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

// Called on a finished output block: rows m0 .. m0 + rows - 1, columns c0 .. c0 + width - 1 of y
// (row stride ldy).
using BlockEpilogue = std::function<void(float* y, int64_t ldy, int64_t m0, int64_t rows, int64_t c0, int64_t width)>;

constexpr int64_t kQGroup = 32;     // features per activation (and int4 weight) scale
constexpr int64_t kQRows = 16;      // output rows per 64-byte weight vector (one int32 lane each)
constexpr int64_t kQTileRows = 4;   // activation rows per pass over a block of weights
constexpr int64_t kInt4GroupBytes = kQRows * kQGroup / 2;  // 256: 16 rows x 32 nibbles
constexpr int64_t kInt8GroupBytes = kQRows * kQGroup;      // 512

inline bool have_vnni() {
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
inline PackedInt4 pack_int4(const torch::Tensor& qweight, const torch::Tensor& scale_min) {
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
inline PackedInt8 pack_int8(const torch::Tensor& weight, const torch::Tensor& scale) {
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

inline void quantize_rows(const float* x, int64_t M, int64_t K, QuantizedRows& out) {
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

// A packed weight's scales as the kernels read them (this file's and amx_gemm.h's).
struct LowBitScales {
  const at::Half* groups = nullptr;  // int4: per-group scales and mins; grouped int8: per-group scales
  const float* rows = nullptr;       // int8: per-row scales
};

template <bool kInt4, typename Packed>
inline LowBitScales scales_of(const Packed& p) {
  if constexpr (kInt4) {
    return {p.scales.template data_ptr<at::Half>(), nullptr};
  } else if (present(p.group_scales)) {
    return {p.group_scales.template data_ptr<at::Half>(), nullptr};
  } else {
    return {nullptr, p.scale.template data_ptr<float>()};
  }
}

// y [M, N] = x [M, K] @ W^T for packed int4 / int8 W; threads split the 16-row blocks.
// `epilogue`, if given, runs on each finished block, on the thread that computed it (what a
// layer adds to its output, e.g. a bias and an unmerged LoRA, then costs no pass of its own).
template <bool kInt4, typename Packed>
torch::Tensor low_bit_linear(const torch::Tensor& x, const Packed& p, const BlockEpilogue* epilogue = nullptr) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == p.k, "low-bit linear: input has ", x.size(1), " features, weight ", p.k);
  const int64_t M = x.size(0), K = p.k, G = K / kQGroup, blocks = p.n / kQRows;
  torch::Tensor xc = x.to(at::kFloat).contiguous();
  thread_local QuantizedRows xq;
  quantize_rows(xc.data_ptr<float>(), M, K, xq);
  const QuantizedRows& xr = xq;  // the worker threads read the caller's buffers
  torch::Tensor y = torch::empty({M, p.n}, xc.options());
  float* yp = y.data_ptr<float>();
  const uint8_t* wp = p.data.template data_ptr<uint8_t>();
  const LowBitScales scales = scales_of<kInt4>(p);
  const at::Half* sz = scales.groups;
  const float* scale = scales.rows;
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
        if (epilogue) (*epilogue)(yp, p.n, m0, std::min(kQTileRows, M - m0), b * kQRows, kQRows);
      }
    }
  });
  return y;
}

inline torch::Tensor int4_linear(const torch::Tensor& x, const PackedInt4& p, const BlockEpilogue* epilogue = nullptr) {
  return low_bit_linear<true>(x, p, epilogue);
}
inline torch::Tensor int8_linear(const torch::Tensor& x, const PackedInt8& p, const BlockEpilogue* epilogue = nullptr) {
  return low_bit_linear<false>(x, p, epilogue);
}
#else
inline torch::Tensor int4_linear(const torch::Tensor&, const PackedInt4&, const BlockEpilogue* = nullptr) {
  TORCH_CHECK(false, "the int4 kernel needs an AVX512-VNNI build");
}
inline torch::Tensor int8_linear(const torch::Tensor&, const PackedInt8&, const BlockEpilogue* = nullptr) {
  TORCH_CHECK(false, "the int8 kernel needs an AVX512-VNNI build");
}
#endif

}  // namespace pesc
