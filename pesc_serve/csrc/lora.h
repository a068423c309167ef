// Unmerged LoRA beside a linear layer: y += (x A^T) B^T, row by row.
#pragma once

#include "common.h"

namespace pesc {

// y [M, N] += (x [M, K] A^T) B^T for an unmerged LoRA (A [r, K]; B given transposed, bt [r, N],
// scaling folded in).  Row by row with the same loops for every row, instead of ATen's matmul,
// whose blocking (and so its rounding) changes with M: a row's update, and through the int8
// activation rounding and the router its whole continuation, must not depend on the batch.
// Both loops run over contiguous memory (a dot product over K, then r AXPYs over N) and vectorise.
// `rows` (n entries, null: rows 0..n-1) picks the rows of y [*, N] and x [*, K] to update.
// `cols` ([R, 2], null: all) gives each rank's nonzero columns of B^T: a fused layer's B is
// block-diagonal (each part's rank updates only its own rows), and skipping exact zeros leaves
// every sum as it was (adding 0 * u changes nothing).
inline void lora_add_rows(float* yp, const float* xp, int64_t K, int64_t N, const float* ap, const float* bp, int64_t R,
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
inline void lora_add(torch::Tensor& y, const torch::Tensor& x, const torch::Tensor& a, const torch::Tensor& bt,
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

// Each row's [first, last + 1) nonzero column (an all-zero row: an empty range).
inline torch::Tensor lora_nonzero_columns(const torch::Tensor& bt) {
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


}  // namespace pesc
