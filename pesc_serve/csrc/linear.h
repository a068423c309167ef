// One linear layer as the loader built it: its small- and large-batch kernels and its LoRA by
// delta slot.
#pragma once

#include "amx_gemm.h"
#include "bf16_gemm.h"
#include "low_bit_gemm.h"
#include "lora.h"

namespace pesc {

constexpr int64_t kGemvMaxRows = 4;  // int8_gemv serves up to this many rows (ATen's kernel above)

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
  std::vector<std::shared_ptr<const LoRA>> loras;  // unmerged LoRA beside the weight, by delta slot (null: none)
  int64_t amx_from = -1;    // low-bit batches of at least this many rows run on AMX tiles (-1: never; kernels/plan.py)

  // The packed int4 or int8 weights (present(int4.data) || present(int8.data)) on x.
  torch::Tensor run_low_bit(const torch::Tensor& x, const BlockEpilogue* epilogue = nullptr) const {
    const bool amx = amx_from > 0 && x.size(0) >= amx_from;
    if (present(int4.data)) return amx ? int4_linear_amx(x, int4, epilogue) : int4_linear(x, int4, epilogue);
    return amx ? int8_linear_amx(x, int8, epilogue) : int8_linear(x, int8, epilogue);
  }

  torch::Tensor run_small(const torch::Tensor& x) const {
    if (present(int4.data) || present(int8.data)) return run_low_bit(x);
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
  // On the low-bit kernels the bias and the LoRA are added to each output block as it is
  // finished (in the order base, bias, LoRA, as the PyTorch path adds them): no pass of their own.
  torch::Tensor operator()(const torch::Tensor& x, const int64_t* slots = nullptr) const {
    const bool dense_rows = max_rows >= 0 && present(dense) && x.size(0) > max_rows;
    const bool low_bit = !dense_rows && (present(int4.data) || present(int8.data));
    thread_local std::vector<RowLoRA> rows;
    thread_local std::vector<float> u;
    const bool lora = slots && !loras.empty() && row_loras_of(x, slots, rows, u);
    if (low_bit && (lora || present(bias))) {
      const torch::Tensor xc = x.contiguous();
      const RowLoRA* rp = rows.data();  // workers read the caller's rows
      const float* bp = present(bias) ? bias.data_ptr<float>() : nullptr;
      const BlockEpilogue epilogue = [&](float* y, int64_t ldy, int64_t m0, int64_t n, int64_t c0, int64_t width) {
        for (int64_t m = m0; m < m0 + n; ++m) {
          float* yr = y + m * ldy;
          if (bp)
            for (int64_t c = c0; c < c0 + width; ++c) yr[c] += bp[c];
          if (lora && rp[m].lora) lora_row_block(yr, rp[m], c0, c0 + width);
        }
      };
      return run_low_bit(xc, &epilogue);
    }
    torch::Tensor y;
    if (dense_rows) {
      y = present(packed.data) ? bf16_linear(x, packed) : at::linear(x.to(dense.scalar_type()), dense);
    } else {
      y = run_small(x);
    }
    if (y.scalar_type() != at::kFloat) y = y.to(at::kFloat);
    if (present(bias)) y.add_(bias);
    if (lora) {
      y = y.contiguous();
      lora_add_rows(y.data_ptr<float>(), y.size(1), y.size(0), rows);
    }
    return y;
  }

  // Each row's LoRA (by its delta slot) and scaled x A^T; false when no row has one.
  bool row_loras_of(const torch::Tensor& x, const int64_t* slots, std::vector<RowLoRA>& rows,
                    std::vector<float>& u) const {
    const int64_t M = x.size(0), S = static_cast<int64_t>(loras.size());
    bool any = false;
    for (int64_t m = 0; m < M && !any; ++m) any = slots[m] >= 0 && slots[m] < S && loras[slots[m]];
    if (!any) return false;
    const torch::Tensor xc = x.contiguous();
    auto lora_of = [&](int64_t m) -> const LoRA* {
      const LoRA* l = slots[m] >= 0 && slots[m] < S ? loras[slots[m]].get() : nullptr;
      TORCH_CHECK(!l || l->in_features == x.size(1), "a LoRA takes ", l ? l->in_features : 0, " features, the layer ",
                  x.size(1));
      return l;
    };
    row_loras(xc.data_ptr<float>(), x.size(1), M, lora_of, rows, u);
    return true;
  }

  // One delta's LoRA in `slot` (shared with the PyTorch path's layer); null removes it.
  void set_lora(int64_t slot, std::shared_ptr<const LoRA> lora) {
    TORCH_CHECK(slot >= 0, "slot must be >= 0");
    if (slot >= static_cast<int64_t>(loras.size())) loras.resize(slot + 1);
    if (lora) {
      for (const auto& part : lora->parts)
        TORCH_CHECK(part.offset + part.bt.size(1) <= out_features, "a LoRA part reaches past the layer's outputs");
    }
    loras[slot] = std::move(lora);
  }
};

}  // namespace pesc
