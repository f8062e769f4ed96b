// The interface between adversarial.cpp (tensor checks, operands, threads, error messages)
// and the step kernel, which is compiled once per CPU capability (isa_<isa>.cpp) and chosen
// at run time. Only baseline headers here: the ISA files include this before they switch the
// instruction set.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

#include "../adversarial.h"

namespace lepton_fast {
namespace cpu {

struct StepBuffers {
  const void* x;  // fgsm: x; pgd: x_adv. May be `out` itself (in place)
  const void* orig;  // pgd: x_orig
  const void* grad;
  void* out;
  c10::ScalarType dtype;
  bool pgd;
  adv::StepArgs args;
};

// The first element of a range with a fault (csrc/adversarial.h): its flat index (-1: none)
// and the value of the input the fault is about (fgsm: x, pgd: x_orig), read before an
// in-place step overwrote it.
struct Fault {
  int64_t index = -1;
  double input = 0;
};

struct StepFaults {
  Fault outside_box;
  Fault overflow;
};

// Elements [begin, end) of one step; one function per instruction set, all bit-identical.
StepFaults adversarial_step_default(const StepBuffers& a, int64_t begin, int64_t end);
StepFaults adversarial_step_avx2(const StepBuffers& a, int64_t begin, int64_t end);
StepFaults adversarial_step_avx512(const StepBuffers& a, int64_t begin, int64_t end);

}  // namespace cpu
}  // namespace lepton_fast
