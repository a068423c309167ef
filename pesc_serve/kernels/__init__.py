"""The CPU kernels: one C++ extension (``pesc_serve/csrc/``) and what Python needs around it.

* :mod:`.cpu_features` reads what this CPU can run (AVX2, AVX-512 VNNI/BF16/FP16, AMX) and asks
  the kernel for AMX's tile state; nothing assumes a feature the host lacks.
* :mod:`.build` compiles the extension on first use and caches it per CPU, Python and torch.
* :mod:`.cpu_kernels` installs the kernels on a loaded model: repacked low-bit and bf16 weights,
  the expert-grouped adapters, each delta's LoRA, and the one-call decode step.
"""
