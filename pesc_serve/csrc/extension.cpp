// The CPU kernels' Python bindings: one extension, built on first use by pesc_serve/kernels/build.py.
//
// The kernels live in one header per family, each self-contained:
//   bf16_gemm.h     small-batch bf16 GEMM on weights packed once (AVX512-BF16)
//   low_bit_gemm.h  int4/int8 weight-only GEMM on int8 activations (AVX512-VNNI)
//   amx_gemm.h      the int4 GEMM on AMX int8 tiles (prefill chunks, big batches), and its emulation
//   adapters.h      PESC routing and the expert-grouped adapter kernel over every resident delta
//   lora.h          unmerged LoRA beside a linear layer
//   linear.h        one linear layer: its kernels by batch size, its LoRA by delta slot
//   attention.h     paged attention over the KV blocks
//   decode_model.h  the one-call decode step that strings them together
// Everything compiles as this one translation unit (one compiler pass, about a minute on 2 cores).

#include "amx_gemm.h"
#include "decode_model.h"

using namespace pesc;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  py::class_<PackedBf16>(m, "PackedBf16")
      .def(py::init(&pack_bf16), "pack a [N, K] weight (any float dtype) for bf16_linear")
      .def_readonly("data", &PackedBf16::data)
      .def_readonly("out_features", &PackedBf16::n)
      .def_readonly("in_features", &PackedBf16::k);
  // `dense` is the large-batch weight; `packed` (a PackedBf16 or None) is it packed for our bf16
  // GEMM (the CPU plan decides; without it at::linear, i.e. oneDNN, runs `dense`).
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
  m.def("int4_linear", [](const torch::Tensor& x, const PackedInt4& p) { return int4_linear(x, p); },
        "x [M, K] @ W^T for W packed by PackedInt4 (float32 out)",
        py::call_guard<py::gil_scoped_release>());
  m.def("int8_linear", [](const torch::Tensor& x, const PackedInt8& p) { return int8_linear(x, p); },
        "x [M, K] @ W^T for W packed by PackedInt8 (float32 out)",
        py::call_guard<py::gil_scoped_release>());
  m.def("have_vnni", &have_vnni, "whether this build has the AVX512-VNNI low-bit kernels");
  m.def("int4_linear_amx", [](const torch::Tensor& x, const PackedInt4& p) { return int4_linear_amx(x, p); },
        "int4_linear on AMX int8 tiles (raises unless amx_ready())", py::call_guard<py::gil_scoped_release>());
  m.def("int8_linear_amx", [](const torch::Tensor& x, const PackedInt8& p) { return int8_linear_amx(x, p); },
        "int8_linear on AMX int8 tiles (raises unless amx_ready())", py::call_guard<py::gil_scoped_release>());
  m.def("int4_linear_amx_emulated",
        [](const torch::Tensor& x, const PackedInt4& p) { return int4_linear_tiles<EmulatedTiles>(x, p); },
        "the AMX int4 kernel with its tile instructions emulated in C++ (tests the kernel on any host; slow)",
        py::call_guard<py::gil_scoped_release>());
  m.def("int8_linear_amx_emulated",
        [](const torch::Tensor& x, const PackedInt8& p) { return int8_linear_tiles<EmulatedTiles>(x, p); },
        "the AMX int8 kernel with its tile instructions emulated in C++ (tests the kernel on any host; slow)",
        py::call_guard<py::gil_scoped_release>());
  m.def("have_amx_int4", &have_amx_int4, "whether this build has the AMX low-bit kernels (x86-64 with AVX512-VNNI)");
  m.def("amx_ready", &amx_ready, "whether the CPU has AMX-INT8 and Linux granted this process the tile state");
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
        if (!packed.is_none()) lin.packed = packed.cast<PackedBf16>();  // else at::linear (oneDNN) runs `dense`
        return lin;
      }))
      .def("set_amx_from", [](Linear& lin, int64_t rows) {
        TORCH_CHECK(present(lin.int4.data) || present(lin.int8.data),
                    "only an int4 or int8 layer in this extension's packing runs on AMX tiles");
        TORCH_CHECK(rows > 0 && amx_ready(), "AMX tiles need rows > 0, AMX-INT8 and the tile state granted");
        lin.amx_from = rows;
      }, "low-bit batches of at least `rows` rows run on AMX int8 tiles")
      .def("__call__", [](const Linear& lin, const torch::Tensor& x) { return lin(x.to(at::kFloat).contiguous()); },
           "the layer on x [T, K] as the decode step runs it (float32 out)", py::call_guard<py::gil_scoped_release>());
  py::class_<LoRA, std::shared_ptr<LoRA>>(m, "LoRA")
      .def(py::init(&make_lora),
           "one delta's LoRA on one linear layer: per part A [r, K] and B^T [r, n] (float32 or bfloat16, shared, "
           "not copied when contiguous), the part's first output column, and the scaling",
           py::arg("a"), py::arg("bt"), py::arg("offsets"), py::arg("scale"))
      .def_property_readonly("nbytes", &LoRA::nbytes);
  m.def("lora_add", [](torch::Tensor y, torch::Tensor x, const LoRA& l) { lora_add(y, x, l); },
        "y += scale * (x A^T) B^T in place, row by row (the same numbers whatever the batch)",
        py::call_guard<py::gil_scoped_release>());
  m.def("prefill_attention",
        [](torch::Tensor q, torch::Tensor kv_cache, torch::Tensor table, int64_t start, int64_t block_size,
           int64_t window) {
          TORCH_CHECK(q.dim() == 3 && q.scalar_type() == at::kFloat && q.stride(2) == 1 && q.stride(1) == q.size(2),
                      "prefill_attention: q must be float32 [n, Hq, D] with contiguous heads");
          TORCH_CHECK(kv_cache.dim() == 4 && kv_cache.size(0) == 2 && kv_cache.is_contiguous() &&
                          kv_cache.size(3) == q.size(2) && q.size(1) % kv_cache.size(2) == 0,
                      "prefill_attention: kv_cache must be one layer's contiguous [2, S, Hkv, D]");
          TORCH_CHECK(table.scalar_type() == at::kLong && table.dim() == 1 && table.is_contiguous(),
                      "prefill_attention: table must be contiguous int64 [blocks]");
          const int64_t n = q.size(0), S = kv_cache.size(1);
          TORCH_CHECK(start >= 0 && block_size > 0 && (start + n + block_size - 1) / block_size <= table.size(0),
                      "prefill_attention: the block table does not cover the chunk");
          const int64_t* tp = table.data_ptr<int64_t>();
          for (int64_t i = 0; i < (start + n + block_size - 1) / block_size; ++i)
            TORCH_CHECK(tp[i] >= 0 && (tp[i] + 1) * block_size <= S, "prefill_attention: block id out of range");
          const AttentionShape shape{q.size(1), kv_cache.size(2), q.size(2), window};
          torch::Tensor out = torch::empty({n, q.size(1), q.size(2)}, q.options());
          const int64_t half = S * kv_cache.size(2) * kv_cache.size(3);
          if (kv_cache.scalar_type() == at::kHalf) {
            const at::Half* kv = kv_cache.data_ptr<at::Half>();
            prefill_attention(shape, q.data_ptr<float>(), q.stride(0), n, start, kv, kv + half, tp, block_size,
                              out.data_ptr<float>(), q.size(1) * q.size(2));
          } else {
            TORCH_CHECK(kv_cache.scalar_type() == at::kFloat, "prefill_attention: a float32 or float16 KV cache");
            const float* kv = kv_cache.data_ptr<float>();
            prefill_attention(shape, q.data_ptr<float>(), q.stride(0), n, start, kv, kv + half, tp, block_size,
                              out.data_ptr<float>(), q.size(1) * q.size(2));
          }
          return out;
        },
        "causal attention of a prompt chunk (q [n, Hq, D] at positions start ..) over one layer's paged KV "
        "[2, S, Hkv, D] (the chunk's own K/V already written), block table [blocks]; window -1: none",
        py::call_guard<py::gil_scoped_release>());
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
           "layer, linear (0 qkv, 1 o, 2 gate_up, 3 down), slot, a LoRA (None: remove)")
      .def("set_experts", &DecodeModel::set_experts, "layer, slot, router [E, H], down [E, r, H], up_t [E, r, H], topk")
      .def("use_adapter_stack", &DecodeModel::use_adapter_stack)
      .def("reserve_topk", &DecodeModel::reserve_topk)
      .def("forward", &DecodeModel::forward, py::call_guard<py::gil_scoped_release>());
}
