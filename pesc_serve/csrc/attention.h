// Paged attention straight from the KV blocks (float32 or float16 cache).
#pragma once

#include "common.h"

namespace pesc {

// Context positions per attention chunk.  A sequence's context is split by its length alone,
// never by the batch size or the thread count, so its numbers (and a seeded request's text) do
// not depend on what else runs in the step; the chunks also keep both threads busy when few
// sequences with long contexts decode.
constexpr int64_t kChunkPositions = 256;

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

// A model's attention heads: query heads, KV heads, head size and sliding window (-1: none).
struct AttentionShape {
  int64_t hq, hkv, d, window;
};

// Paged attention straight from the KV blocks.  A task is one token's KV head with the
// query heads that share it (GQA), so each K/V row is read (and, from a float16 cache,
// converted) once for the whole group.  With too few such tasks to feed every thread (a
// few short requests), long contexts are split into chunks whose softmaxes are merged by
// their log-sum-exp (flash-decoding).
template <typename KV>
void paged_attention(const AttentionShape& shape, const float* qkvp, const KV* kc, const KV* vc, const int64_t* pos,
                     const int64_t* tables, int64_t table_w, int64_t block_size, int64_t B, float* ap) {
  const int64_t hkv = shape.hkv, D = shape.d, window = shape.window;
  const int64_t q_size = shape.hq * D, kv_size = hkv * D, row_w = q_size + 2 * kv_size;
  const int64_t G = shape.hq / hkv;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  // (b * hkv + kvh, first position, count, chunk index, chunks of this head)
  thread_local std::vector<std::array<int64_t, 5>> tasks;
  tasks.clear();
  for (int64_t b = 0; b < B; ++b) {
    const int64_t last = pos[b];
    const int64_t first = window > 0 ? std::max<int64_t>(0, last - window + 1) : 0;
    const int64_t n = last - first + 1;
    const int64_t chunks = (n + kChunkPositions - 1) / kChunkPositions;
    for (int64_t kvh = 0; kvh < hkv; ++kvh) {
      for (int64_t c = 0; c < chunks; ++c) {
        const int64_t c0 = first + c * n / chunks, c1 = first + (c + 1) * n / chunks;
        tasks.push_back({b * hkv + kvh, c0, c1 - c0, c, chunks});
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
      const int64_t b = bh / hkv, kvh = bh % hkv;
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
    const int64_t b = bh / hkv, kvh = bh % hkv;
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

// ---- prefill: blocked causal attention over the paged KV (flash-attention style) -------------
// Why: a prompt chunk attends to its whole context.  Gathering that context out of the KV
// blocks into a dense copy and building a [queries, context] mask (the PyTorch path) costs
// memory traffic proportional to their product; here the context's K/V are staged once per
// call in float32 blocks (StagedKV, linear in the context) and each task runs a block of
// queries over them with a running softmax (max, sum, output), so nothing of size queries x
// context is ever stored.
//
// A query's numbers depend only on its position and the cache: key blocks are aligned to
// absolute positions (0, 64, 128, ...) and visited in order, so a prompt prefilled in one
// chunk or several, or after a cached prefix, gives each position the same output.

constexpr int64_t kPrefillKeys = 64;     // keys per block (four 16-wide vectors of scores)
constexpr int64_t kPrefillQueries = 64;  // query positions per task (x the GQA group's heads)

template <typename KV>
inline float kv_value(const KV* p, int64_t i) { return static_cast<float>(p[i]); }

// The chunk's context in float32, staged once per call for all its tasks: per KV head and
// 64-key block, K transposed ([D][64], the score loop's layout) and V ([64][D]); keys past the
// chunk's last position are zeros (masked by the tasks).  Why: each task used to gather and
// convert its key blocks out of the paged (float16) cache itself, once per query block, which
// cost as much as its dot products.  Size: twice one layer's K/V of the context, in float32.
struct StagedKV {
  std::vector<float> k, v;  // [hkv][blocks][D * 64]
  int64_t first_block = 0, blocks = 0, d = 0;
  int64_t offset(int64_t kvh, int64_t block) const { return (kvh * blocks + block - first_block) * d * kPrefillKeys; }
  const float* kt(int64_t kvh, int64_t block) const { return k.data() + offset(kvh, block); }
  const float* vb(int64_t kvh, int64_t block) const { return v.data() + offset(kvh, block); }
};

// One key row of D values as float32 (vector conversions from a half cache).
template <typename KV>
inline void key_row(const KV* src, int64_t D, float* dst) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= D; i += 16) _mm512_storeu_ps(dst + i, load16(src + i));
#endif
  for (; i < D; ++i) dst[i] = kv_value(src, i);
}

// Positions first_block * 64 .. last of each KV head, out of the sequence's blocks (`table`).
template <typename KV>
void stage_kv(StagedKV& staged, int64_t hkv, int64_t D, int64_t first_block, int64_t last, const KV* kc, const KV* vc,
              const int64_t* table, int64_t block_size) {
  staged.first_block = first_block;
  staged.blocks = last / kPrefillKeys + 1 - first_block;
  staged.d = D;
  const int64_t per_block = D * kPrefillKeys, kv_stride = hkv * D;
  staged.k.resize(hkv * staged.blocks * per_block);
  staged.v.resize(hkv * staged.blocks * per_block);
  at::parallel_for(0, hkv * staged.blocks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> row(D);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t kvh = t / staged.blocks, block = first_block + t % staged.blocks;
      float* kt = staged.k.data() + staged.offset(kvh, block);
      float* vb = staged.v.data() + staged.offset(kvh, block);
      for (int64_t j = 0; j < kPrefillKeys; ++j) {
        const int64_t pos = block * kPrefillKeys + j;
        if (pos > last) {
          for (int64_t d = 0; d < D; ++d) kt[d * kPrefillKeys + j] = 0.f;
          std::fill(vb + j * D, vb + (j + 1) * D, 0.f);
          continue;
        }
        const int64_t slot = table[pos / block_size] * block_size + pos % block_size;
        key_row(kc + slot * kv_stride + kvh * D, D, row.data());
        for (int64_t d = 0; d < D; ++d) kt[d * kPrefillKeys + j] = row[d];
        key_row(vc + slot * kv_stride + kvh * D, D, vb + j * D);
      }
    }
  });
}

#if defined(__AVX512F__)
// Pins vectors in registers: without it GCC folds a reused load into every multiply-add as a
// memory operand, and the loop then waits on loads (one 512-bit load a cycle on Zen 4) instead
// of multiply-adds.
inline void in_register(__m512& v) { asm("" : "+v"(v)); }
template <typename... V>
inline void in_registers(V&... v) {
  (in_register(v), ...);
}

// Scores of four query rows (already scaled) against one block of 64 keys (kt: [D][64]):
// s_u[j] = sum_d q_u[d] * k_j[d], summed over d in order, as the scalar loop does.
inline void prefill_scores4(const float* const* q, const float* kt, int64_t D, float* const* s) {
  __m512 a[4][4];
#pragma GCC unroll 4
  for (int u = 0; u < 4; ++u)
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) a[u][v] = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; ++d) {
    const float* kd = kt + d * kPrefillKeys;
    __m512 k0 = _mm512_loadu_ps(kd), k1 = _mm512_loadu_ps(kd + 16), k2 = _mm512_loadu_ps(kd + 32),
           k3 = _mm512_loadu_ps(kd + 48);
    in_registers(k0, k1, k2, k3);
#pragma GCC unroll 4
    for (int u = 0; u < 4; ++u) {
      const __m512 qd = _mm512_set1_ps(q[u][d]);
      a[u][0] = _mm512_fmadd_ps(qd, k0, a[u][0]);
      a[u][1] = _mm512_fmadd_ps(qd, k1, a[u][1]);
      a[u][2] = _mm512_fmadd_ps(qd, k2, a[u][2]);
      a[u][3] = _mm512_fmadd_ps(qd, k3, a[u][3]);
    }
  }
#pragma GCC unroll 4
  for (int u = 0; u < 4; ++u)
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) _mm512_storeu_ps(s[u] + 16 * v, a[u][v]);
}

// Lanes base .. base + 15 that fall in [lo, hi).
inline __mmask16 lanes_in(int64_t lo, int64_t hi, int64_t base) {
  const int64_t a = std::clamp<int64_t>(lo - base, 0, 16), b = std::clamp<int64_t>(hi - base, 0, 16);
  return b <= a ? 0 : static_cast<__mmask16>(((1u << b) - 1) & ~((1u << a) - 1));
}

// One row's block of 64 scores -> probabilities under the new running max m (returned), keys
// outside [jlo, jhi) zero; *total gets their sum.  Vector max and sum: the scalar loops'
// dependency chains (64 maxes, 64 adds) cost as much as the row's dot products.
inline float block_softmax(float* s, int64_t jlo, int64_t jhi, float running_max, float* total) {
  __mmask16 mk[4];
  __m512 sv[4];
  __m512 mv = _mm512_set1_ps(running_max);
#pragma GCC unroll 4
  for (int v = 0; v < 4; ++v) {
    mk[v] = lanes_in(jlo, jhi, 16 * v);
    sv[v] = _mm512_loadu_ps(s + 16 * v);
    mv = _mm512_mask_max_ps(mv, mk[v], mv, sv[v]);
  }
  const float m = _mm512_reduce_max_ps(mv);
  const __m512 mm = _mm512_set1_ps(m);
  __m512 sum = _mm512_setzero_ps();
#pragma GCC unroll 4
  for (int v = 0; v < 4; ++v) {  // masked lanes: exp(0), then zeroed (exp's argument stays <= 0)
    const __m512 e = _mm512_maskz_mov_ps(mk[v], exp_nonpositive(_mm512_maskz_sub_ps(mk[v], sv[v], mm)));
    _mm512_storeu_ps(s + 16 * v, e);
    sum = _mm512_add_ps(sum, e);
  }
  *total = _mm512_reduce_add_ps(sum);
  return m;
}

// R query rows' outputs o_u [NV x 16] = o_u * shrink_u + sum_{jj in [jlo, jhi)} p_u[jj] * v[jj],
// held in registers across the block's keys; each V vector loaded once feeds R rows.  A row's
// probabilities are zero outside its own keys, and adding 0 * v leaves its sums as they were,
// so rows with different key ranges share the union of them; per row, the same fused
// multiply-adds in the same order as the scalar loop.
template <int R, int NV>
inline void prefill_pv_rows(float* const* o, const float* shrink, const float* const* p, const float* vb, int64_t jlo,
                            int64_t jhi, int64_t D) {
  __m512 r[R][NV];
#pragma GCC unroll 4
  for (int u = 0; u < R; ++u) {
    const __m512 sh = _mm512_set1_ps(shrink[u]);
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) r[u][v] = _mm512_mul_ps(_mm512_loadu_ps(o[u] + 16 * v), sh);
  }
  for (int64_t jj = jlo; jj < jhi; ++jj) {
    const float* vr = vb + jj * D;
    __m512 vv[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      vv[v] = _mm512_loadu_ps(vr + 16 * v);
      in_registers(vv[v]);
    }
#pragma GCC unroll 4
    for (int u = 0; u < R; ++u) {
      const __m512 pj = _mm512_set1_ps(p[u][jj]);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) r[u][v] = _mm512_fmadd_ps(pj, vv[v], r[u][v]);
    }
  }
#pragma GCC unroll 4
  for (int u = 0; u < R; ++u)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(o[u] + 16 * v, r[u][v]);
}

// Rows i .. i + R - 1 of a task's block through prefill_pv_rows (a row with no keys here has
// shrink 1 and zero probabilities).
template <int R, int NV>
inline void prefill_pv_group(float* acc, const float* sc, const float* shrink, const int64_t* jlo, const int64_t* jhi,
                             int64_t i, const float* vb, int64_t D) {
  int64_t lo = kPrefillKeys, hi = 0;
  float* o[R];
  const float* p[R];
  for (int u = 0; u < R; ++u) {
    if (jlo[i + u] < jhi[i + u]) {
      lo = std::min(lo, jlo[i + u]);
      hi = std::max(hi, jhi[i + u]);
    }
    o[u] = acc + (i + u) * D;
    p[u] = sc + (i + u) * kPrefillKeys;
  }
  if (lo < hi) prefill_pv_rows<R, NV>(o, shrink + i, p, vb, lo, hi, D);
}
#endif

// Portable softmax of one row's block (no AVX-512): the same result up to the order of the sum.
inline float block_softmax_scalar(float* s, int64_t jlo, int64_t jhi, float running_max, float* total) {
  float m = running_max;
  for (int64_t j = jlo; j < jhi; ++j) m = std::max(m, s[j]);
  float t = 0.f;
  for (int64_t j = 0; j < kPrefillKeys; ++j) {
    s[j] = j >= jlo && j < jhi ? std::exp(s[j] - m) : 0.f;
    t += s[j];
  }
  *total = t;
  return m;
}

// One task: query positions q0 .. q0 + nq - 1 (chunk rows r0 ..) of one KV head's G query heads.
inline void prefill_task(const AttentionShape& shape, const StagedKV& kv, const float* q, int64_t row_stride,
                         int64_t r0, int64_t nq, int64_t start, int64_t kvh, float scale, float* out,
                         int64_t out_stride) {
  const int64_t D = shape.d, G = shape.hq / shape.hkv;
  const int64_t rows = nq * G;  // query vectors: position-major, then the group's heads
  const int64_t q_first = start + r0, q_last = q_first + nq - 1;
  const int64_t window = shape.window;
  const int64_t lo = window > 0 ? std::max<int64_t>(0, q_first - window + 1) : 0;
  thread_local std::vector<float> qs, sc, acc, mx, sum, sh;  // sh: each row's shrink in this block
  thread_local std::vector<int64_t> lo_k, hi_k;             // each row's keys in this block
  qs.resize(rows * D);              // the rows' queries, times the softmax scale
  sc.resize(rows * kPrefillKeys);   // scores, then probabilities
  acc.assign(rows * D, 0.f);
  mx.assign(rows, -std::numeric_limits<float>::infinity());
  sum.assign(rows, 0.f);
  sh.resize(rows);
  lo_k.resize(rows);
  hi_k.resize(rows);
  for (int64_t i = 0; i < rows; ++i) {
    const float* qr = q + (r0 + i / G) * row_stride + (kvh * G + i % G) * D;
    for (int64_t d = 0; d < D; ++d) qs[i * D + d] = qr[d] * scale;
  }
  for (int64_t k0 = lo - lo % kPrefillKeys; k0 <= q_last; k0 += kPrefillKeys) {
    const int64_t nk = std::min(kPrefillKeys, q_last + 1 - k0);
    const float* kt = kv.kt(kvh, k0 / kPrefillKeys);
    const float* vb = kv.vb(kvh, k0 / kPrefillKeys);
#if defined(__AVX512F__)
    // Scores of four query rows at a time: each key vector loaded once feeds four rows.
    for (int64_t i = 0; i < rows; i += 4) {
      const float* qrs[4];
      float* srows[4];
      for (int64_t u = 0; u < 4; ++u) {
        const int64_t row = std::min(i + u, rows - 1);  // a short last group repeats its last row
        qrs[u] = qs.data() + row * D;
        srows[u] = sc.data() + row * kPrefillKeys;
      }
      prefill_scores4(qrs, kt, D, srows);
    }
#endif
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t pos = q_first + i / G;
      float* s = sc.data() + i * kPrefillKeys;
      const int64_t first_key = window > 0 ? pos - window + 1 : 0;
#if !defined(__AVX512F__)
      const float* qr = qs.data() + i * D;
      for (int64_t j = 0; j < kPrefillKeys; ++j) s[j] = 0.f;
      for (int64_t d = 0; d < D; ++d) {
        for (int64_t j = 0; j < kPrefillKeys; ++j) s[j] += qr[d] * kt[d * kPrefillKeys + j];
      }
#endif
      // The keys this query sees in the block: [jlo, jhi) (causal, window, the block's end).
      const int64_t jlo = std::clamp<int64_t>(first_key - k0, 0, kPrefillKeys);
      const int64_t jhi = std::clamp<int64_t>(pos + 1 - k0, 0, nk);
      lo_k[i] = jlo;
      hi_k[i] = jhi;
      if (jlo >= jhi) {  // none: the block leaves this query's sums as they are
        sh[i] = 1.f;
        std::fill(s, s + kPrefillKeys, 0.f);
        continue;
      }
      // The block's probabilities under the new running max; the old sums shrink to match.
      float total = 0.f;
#if defined(__AVX512F__)
      const float m = block_softmax(s, jlo, jhi, mx[i], &total);
#else
      const float m = block_softmax_scalar(s, jlo, jhi, mx[i], &total);
#endif
      sh[i] = mx[i] == -std::numeric_limits<float>::infinity() ? 0.f : std::exp(mx[i] - m);
      mx[i] = m;
      sum[i] = sum[i] * sh[i] + total;
    }
    int64_t i = 0;
#if defined(__AVX512F__)
    if (D == 64) {
      for (; i + 4 <= rows; i += 4) prefill_pv_group<4, 4>(acc.data(), sc.data(), sh.data(), lo_k.data(), hi_k.data(), i, vb, D);
      for (; i < rows; ++i) prefill_pv_group<1, 4>(acc.data(), sc.data(), sh.data(), lo_k.data(), hi_k.data(), i, vb, D);
    } else if (D == 128) {
      for (; i + 2 <= rows; i += 2) prefill_pv_group<2, 8>(acc.data(), sc.data(), sh.data(), lo_k.data(), hi_k.data(), i, vb, D);
      for (; i < rows; ++i) prefill_pv_group<1, 8>(acc.data(), sc.data(), sh.data(), lo_k.data(), hi_k.data(), i, vb, D);
    }
#endif
    for (; i < rows; ++i) {
      float* o = acc.data() + i * D;
      const float* pr = sc.data() + i * kPrefillKeys;
      if (lo_k[i] >= hi_k[i]) continue;
      for (int64_t d = 0; d < D; ++d) o[d] *= sh[i];
      for (int64_t jj = lo_k[i]; jj < hi_k[i]; ++jj) {
        const float* vr = vb + jj * D;
        for (int64_t d = 0; d < D; ++d) o[d] = std::fma(pr[jj], vr[d], o[d]);
      }
    }
  }
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t head = kvh * G + i % G;
    float* dst = out + (r0 + i / G) * out_stride + head * D;
    const float inv = 1.0f / sum[i];
    for (int64_t d = 0; d < D; ++d) dst[d] = acc[i * D + d] * inv;
  }
}

// Causal attention of one prompt chunk: n query positions start .. start + n - 1 (q [n, Hq, D],
// row stride row_stride floats) over positions 0 .. start + n - 1 of the sequence's KV blocks
// (`table`), whose K/V for the chunk are already in the cache.  out: [n, Hq, D] (row stride out_stride).
template <typename KV>
void prefill_attention(const AttentionShape& shape, const float* q, int64_t row_stride, int64_t n, int64_t start,
                       const KV* kc, const KV* vc, const int64_t* table, int64_t block_size, float* out,
                       int64_t out_stride) {
  const float scale = 1.0f / std::sqrt(static_cast<float>(shape.d));
  const int64_t last = start + n - 1;
  const int64_t lo = shape.window > 0 ? std::max<int64_t>(0, start - shape.window + 1) : 0;
  // Reused across layers and steps (one allocation per size).  The tasks must see the calling
  // thread's copy: a lambda does not capture a thread_local, so they get it through `kv`.
  thread_local StagedKV staged;
  const StagedKV& kv = staged;
  stage_kv(staged, shape.hkv, shape.d, lo / kPrefillKeys, last, kc, vc, table, block_size);
  const int64_t qblocks = (n + kPrefillQueries - 1) / kPrefillQueries;
  // Later query blocks see more keys: hand them out first so the threads finish together.
  at::parallel_for(0, qblocks * shape.hkv, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t qb = qblocks - 1 - t / shape.hkv, kvh = t % shape.hkv;
      const int64_t r0 = qb * kPrefillQueries, nq = std::min(kPrefillQueries, n - r0);
      prefill_task(shape, kv, q, row_stride, r0, nq, start, kvh, scale, out, out_stride);
    }
  });
}

}  // namespace pesc
