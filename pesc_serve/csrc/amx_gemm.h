// int4 and int8 GEMMs on AMX int8 tiles (TDPBSUD) for prefill chunks and big decode batches.
//
// Why: on AVX512-VNNI one instruction does 64 multiply-adds, and the int4 kernel of
// low_bit_gemm.h spends as many instructions again on unpacking and broadcasting; one AMX
// tile instruction does 16 x 16 x 32 of them.  The numbers are the VNNI kernel's exactly:
// activations quantized to int8 per 32-feature group (quantize_rows), int4 weights unpacked
// to unsigned bytes q in 0..15 (one B tile per 16 output rows and group), and per group
//   y += (sum xq * q - 8 * sum xq) * scale * d + (min + 8 * scale) * sum x
// so the per-group scales cost one float pass over each 16 x 16 tile of int32 dot products.
//
// The tile instructions run behind a small interface (zero, load, dot, store by tile pair),
// with two back ends: the hardware (AmxTiles, compiled for any x86-64 and called only once
// Linux granted the process the tile state) and a scalar emulation (EmulatedTiles) with the
// instructions' exact semantics, so the blocking, padding and scale arithmetic are tested on
// hosts without AMX too.
#pragma once

#include "low_bit_gemm.h"

#include <cstring>

#if defined(__x86_64__) && defined(__linux__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace pesc {

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__x86_64__)

constexpr int64_t kAmxRows = 16;                 // activation rows per A tile (and C tile)
constexpr int64_t kAmxBBytes = 8 * 64;           // one group's B tile: 8 rows (32 features / 4) x 64 bytes

// ldtilecfg's 64-byte operand (palette 1).  Tiles 0/1: C (16 x 16 int32), 2/3: A (16 rows x
// 32 int8 features), 4/5: B (8 rows of 16 outputs x 4 features).  Even groups use the first
// tile of each pair and odd groups the second, so one group's dot product overlaps the
// previous group's store and float pass.
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};

  TileConfig() {
    for (int t = 0; t < 2; ++t) {
      rows[t] = 16, colsb[t] = 64;          // C
      rows[2 + t] = 16, colsb[2 + t] = 32;  // A
      rows[4 + t] = 8, colsb[4 + t] = 64;   // B
    }
  }
};

// The hardware.  The tile macros take literal tile numbers, hence one branch per pair.
struct AmxTiles {
  __attribute__((target("amx-tile"))) static void configure(const TileConfig* cfg) { _tile_loadconfig(cfg); }
  __attribute__((target("amx-tile"))) static void release() { _tile_release(); }
  __attribute__((target("amx-tile"))) static void zero_c(int odd) {
    if (odd) _tile_zero(1); else _tile_zero(0);
  }
  __attribute__((target("amx-tile"))) static void load_a(int odd, const void* p, int64_t stride) {
    if (odd) _tile_loadd(3, p, stride); else _tile_loadd(2, p, stride);
  }
  __attribute__((target("amx-tile"))) static void load_b(int odd, const void* p, int64_t stride) {
    if (odd) _tile_loadd(5, p, stride); else _tile_loadd(4, p, stride);
  }
  __attribute__((target("amx-tile,amx-int8"))) static void dot(int odd) {
    if (odd) _tile_dpbsud(1, 3, 5); else _tile_dpbsud(0, 2, 4);
  }
  __attribute__((target("amx-tile"))) static void store_c(int odd, void* p, int64_t stride) {
    if (odd) _tile_stored(1, p, stride); else _tile_stored(0, p, stride);
  }
};

// The same instructions in plain C++: TILELOADD/TILESTORED copy rows[t] rows of colsb[t]
// bytes; TDPBSUD adds, for each C element (m, n), the products of A's signed bytes
// A[m][4r + i] and B's unsigned bytes B[r][4n + i] over every r < colsb[A] / 4 and i < 4.
struct EmulatedTiles {
  struct State {
    TileConfig cfg;
    alignas(64) uint8_t tile[8][16 * 64];
  };
  static State& state() {
    thread_local State s;
    return s;
  }
  static void configure(const TileConfig* cfg) { state().cfg = *cfg; }
  static void release() {}
  static void zero_c(int odd) { std::memset(state().tile[odd], 0, sizeof(state().tile[0])); }
  static void copy_in(int t, const void* p, int64_t stride) {
    State& s = state();
    for (int r = 0; r < s.cfg.rows[t]; ++r)
      std::memcpy(s.tile[t] + 64 * r, static_cast<const uint8_t*>(p) + r * stride, s.cfg.colsb[t]);
  }
  static void load_a(int odd, const void* p, int64_t stride) { copy_in(2 + odd, p, stride); }
  static void load_b(int odd, const void* p, int64_t stride) { copy_in(4 + odd, p, stride); }
  static void dot(int odd) {
    State& s = state();
    const int c = odd, a = 2 + odd, b = 4 + odd;
    auto* cp = reinterpret_cast<int32_t*>(s.tile[c]);
    const auto* ap = reinterpret_cast<const int8_t*>(s.tile[a]);
    const uint8_t* bp = s.tile[b];
    for (int m = 0; m < s.cfg.rows[c]; ++m)
      for (int n = 0; n < s.cfg.colsb[c] / 4; ++n) {
        int32_t acc = cp[16 * m + n];
        for (int r = 0; r < s.cfg.colsb[a] / 4; ++r)
          for (int i = 0; i < 4; ++i) acc += int32_t(ap[64 * m + 4 * r + i]) * int32_t(bp[64 * r + 4 * n + i]);
        cp[16 * m + n] = acc;
      }
  }
  static void store_c(int odd, void* p, int64_t stride) {
    State& s = state();
    for (int r = 0; r < s.cfg.rows[odd]; ++r)
      std::memcpy(static_cast<uint8_t*>(p) + r * stride, s.tile[odd] + 64 * r, s.cfg.colsb[odd]);
  }
};

// One 16-output block's int4 weights as unsigned-byte B tiles, group after group: PackedInt4's
// chunk c (16 outputs x 4 bytes) holds features 8c + j in its low nibbles and 8c + 4 + j in its
// high ones, which are B rows 2c and 2c + 1 as they stand.
inline void unpack_int4_b_tiles(const uint8_t* w, int64_t G, uint8_t* out) {
  const __m512i low = _mm512_set1_epi8(0x0F);
  for (int64_t g = 0; g < G; ++g)
    for (int c = 0; c < 4; ++c) {
      const __m512i v = _mm512_loadu_si512(w + g * kInt4GroupBytes + 64 * c);
      _mm512_storeu_si512(out + g * kAmxBBytes + 128 * c, _mm512_and_si512(v, low));
      _mm512_storeu_si512(out + g * kAmxBBytes + 128 * c + 64, _mm512_and_si512(_mm512_srli_epi16(v, 4), low));
    }
}

// y [M, N] = x [M, K] @ W^T for packed int4 or int8 W, on Tiles; threads split the 16-output
// blocks, each preparing its block's B tiles once for every 16-row tile of x (int4: unpacked;
// int8: PackedInt8's [K/4, 16, 4] layout is B tiles already).  `epilogue` as in low_bit_linear.
template <typename Tiles, bool kInt4, typename Packed>
torch::Tensor low_bit_linear_tiles(const torch::Tensor& x, const Packed& p, const BlockEpilogue* epilogue) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == p.k, "AMX low-bit linear: input has ", x.size(1), " features, weight ", p.k);
  const int64_t M = x.size(0), K = p.k, G = K / kQGroup, blocks = p.n / kQRows;
  const int64_t Mp = (M + kAmxRows - 1) / kAmxRows * kAmxRows;
  torch::Tensor xc = x.to(at::kFloat).contiguous();
  thread_local QuantizedRows xq;
  quantize_rows(xc.data_ptr<float>(), M, K, xq);
  // Rows past M up to a whole tile: zero activations, zero scales, so zero outputs (not stored).
  xq.q.resize(Mp * K, 0);
  xq.d.resize(Mp * G, 0.f);
  xq.sum.resize(Mp * G, 0.f);
  xq.qsum.resize(Mp * G, 0);
  const QuantizedRows& xr = xq;
  torch::Tensor y = torch::empty({M, p.n}, xc.options());
  float* yp = y.data_ptr<float>();
  const uint8_t* wp = p.data.template data_ptr<uint8_t>();
  const LowBitScales scales = scales_of<kInt4>(p);
  const at::Half* sz = scales.groups;
  const float* row_scale = scales.rows;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    const TileConfig cfg;
    Tiles::configure(&cfg);
    thread_local std::vector<uint8_t> unpacked;
    if constexpr (kInt4) unpacked.resize(G * kAmxBBytes);
    alignas(64) int32_t dots[2][kAmxRows * kQRows];
    for (int64_t b = b0; b < b1; ++b) {
      const uint8_t* bt = wp + b * G * kAmxBBytes;  // int8: 8 B rows of 64 bytes per group, in place
      if constexpr (kInt4) {
        unpack_int4_b_tiles(wp + b * G * kInt4GroupBytes, G, unpacked.data());
        bt = unpacked.data();
      }
      const at::Half* bsz = sz ? sz + b * G * (kInt4 ? 2 : 1) * kQRows : nullptr;
      const __m512 out_scale = row_scale ? _mm512_loadu_ps(row_scale + b * kQRows) : _mm512_set1_ps(1.f);
      for (int64_t m0 = 0; m0 < Mp; m0 += kAmxRows) {
        __m512 acc[kAmxRows];
#pragma GCC unroll 16
        for (int r = 0; r < kAmxRows; ++r) acc[r] = _mm512_setzero_ps();
        for (int64_t g = 0; g < G; ++g) {
          const int odd = static_cast<int>(g & 1);
          Tiles::zero_c(odd);
          Tiles::load_a(odd, xr.q.data() + m0 * K + g * kQGroup, K);
          Tiles::load_b(odd, bt + g * kAmxBBytes, 64);
          Tiles::dot(odd);
          Tiles::store_c(odd, dots[odd], 64);
          if constexpr (kInt4) {
            // w = (q - 8) * scale + zero, zero = min + 8 * scale, as in int4_block
            const __m512 scale = load_f16x16(bsz + g * 2 * kQRows);
            const __m512 zero = _mm512_fmadd_ps(_mm512_set1_ps(8.f), scale, load_f16x16(bsz + g * 2 * kQRows + kQRows));
#pragma GCC unroll 16
            for (int r = 0; r < kAmxRows; ++r) {
              const int64_t i = (m0 + r) * G + g;
              const __m512i dot = _mm512_sub_epi32(_mm512_load_si512(dots[odd] + r * kQRows),
                                                   _mm512_set1_epi32(8 * xr.qsum[i]));
              acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(scale, _mm512_set1_ps(xr.d[i])), acc[r]);
              acc[r] = _mm512_fmadd_ps(zero, _mm512_set1_ps(xr.sum[i]), acc[r]);
            }
          } else {
            // the weights are stored as q + 128, as in int8_block
            const __m512 gs = bsz ? load_f16x16(bsz + g * kQRows) : _mm512_set1_ps(1.f);
#pragma GCC unroll 16
            for (int r = 0; r < kAmxRows; ++r) {
              const int64_t i = (m0 + r) * G + g;
              const __m512i dot = _mm512_sub_epi32(_mm512_load_si512(dots[odd] + r * kQRows),
                                                   _mm512_set1_epi32(128 * xr.qsum[i]));
              acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(gs, _mm512_set1_ps(xr.d[i])), acc[r]);
            }
          }
        }
        const int64_t rows = std::min(kAmxRows, M - m0);
        for (int64_t r = 0; r < rows; ++r) {
          const __m512 out = kInt4 ? acc[r] : _mm512_mul_ps(acc[r], out_scale);
          _mm512_storeu_ps(yp + (m0 + r) * p.n + b * kQRows, out);
        }
        if (epilogue) (*epilogue)(yp, p.n, m0, rows, b * kQRows, kQRows);
      }
    }
    Tiles::release();
  });
  return y;
}

template <typename Tiles>
torch::Tensor int4_linear_tiles(const torch::Tensor& x, const PackedInt4& p, const BlockEpilogue* epilogue = nullptr) {
  return low_bit_linear_tiles<Tiles, true>(x, p, epilogue);
}
template <typename Tiles>
torch::Tensor int8_linear_tiles(const torch::Tensor& x, const PackedInt8& p, const BlockEpilogue* epilogue = nullptr) {
  return low_bit_linear_tiles<Tiles, false>(x, p, epilogue);
}

inline bool have_amx_int4() { return true; }
#else
template <typename Tiles>
torch::Tensor int4_linear_tiles(const torch::Tensor&, const PackedInt4&, const BlockEpilogue* = nullptr) {
  TORCH_CHECK(false, "the AMX low-bit kernels need an x86-64 AVX512-VNNI build");
}
template <typename Tiles>
torch::Tensor int8_linear_tiles(const torch::Tensor&, const PackedInt8&, const BlockEpilogue* = nullptr) {
  TORCH_CHECK(false, "the AMX low-bit kernels need an x86-64 AVX512-VNNI build");
}
struct AmxTiles {};
struct EmulatedTiles {};
inline bool have_amx_int4() { return false; }
#endif

// Whether this process may run tile instructions now: the CPU has AMX-TILE and AMX-INT8 and
// Linux granted the tile data state (kernels/cpu_features.py asks for it; without the grant
// the first tile instruction kills the process, so the binding checks first).
inline bool amx_ready() {
#if defined(__x86_64__) && defined(__linux__)
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  const bool tile = d & (1u << 24), int8 = d & (1u << 25);
  if (!tile || !int8) return false;
  constexpr int kArchGetXcompPerm = 0x1022;
  constexpr int kXfeatureXtiledata = 18;
  unsigned long bitmask = 0;
  if (syscall(SYS_arch_prctl, kArchGetXcompPerm, &bitmask) != 0) return false;
  return bitmask & (1ul << kXfeatureXtiledata);
#else
  return false;
#endif
}

inline void check_amx_ready() {
  TORCH_CHECK(amx_ready(), "the AMX low-bit kernels need AMX-INT8 and the tile state granted to this process "
              "(pesc_serve.kernels.cpu_features.request_amx_permission)");
}
inline torch::Tensor int4_linear_amx(const torch::Tensor& x, const PackedInt4& p, const BlockEpilogue* epilogue = nullptr) {
  check_amx_ready();
  return int4_linear_tiles<AmxTiles>(x, p, epilogue);
}
inline torch::Tensor int8_linear_amx(const torch::Tensor& x, const PackedInt8& p, const BlockEpilogue* epilogue = nullptr) {
  check_amx_ready();
  return int8_linear_tiles<AmxTiles>(x, p, epilogue);
}

}  // namespace pesc
