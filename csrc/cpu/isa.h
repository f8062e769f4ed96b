// The CPU row kernels are compiled three times, for the portable baseline, AVX2 and AVX-512
// (isa_default.cpp, isa_avx2.cpp, isa_avx512.cpp), and each call picks the build that
// matches ATen's own choice, at::get_cpu_capability(): AVX512 or AVX2 where the CPU has it
// and ATEN_CPU_CAPABILITY does not lower it, else the baseline. So one wheel built on any
// x86-64 machine runs on every x86-64 CPU with torch's vector width, and
// ATEN_CPU_CAPABILITY=default|avx2 selects the other builds for testing.
#pragma once

#include <ATen/Version.h>

#include <string>

namespace lepton_fast {
namespace cpu {

enum class Isa { kDefault, kAvx2, kAvx512 };

inline Isa cpu_isa() {
  static const Isa isa = [] {
    const std::string capability = at::get_cpu_capability();
    if (capability == "AVX512") return Isa::kAvx512;
    if (capability == "AVX2") return Isa::kAvx2;
    return Isa::kDefault;
  }();
  return isa;
}

template <typename Fn>
Fn pick_isa(Fn baseline, Fn avx2, Fn avx512) {
  switch (cpu_isa()) {
    case Isa::kAvx512: return avx512;
    case Isa::kAvx2: return avx2;
    default: return baseline;
  }
}

}  // namespace cpu
}  // namespace lepton_fast
