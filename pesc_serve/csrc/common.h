// Shared by every kernel family: the includes, instruction-set switches and small helpers.
#pragma once

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
#include <functional>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

namespace pesc {

enum LinearKind : int64_t { DENSE = 0, INT8 = 1, INT4 = 2 };

// Python passes empty tensors for "none".
inline bool present(const torch::Tensor& t) { return t.defined() && t.numel() > 0; }

inline float gelu_exact(float x) { return 0.5f * x * (1.0f + std::erf(x * 0.70710678118654752f)); }

}  // namespace pesc
