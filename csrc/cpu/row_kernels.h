// The interfaces of every CPU row kernel (argument structs and the per-ISA entry points).
// Each isa_<isa>.cpp includes this before it switches the instruction set, so that nothing
// these headers define (ATen's inline functions included) is compiled for AVX2/AVX-512.
#pragma once

#include "adversarial_cpu.h"
#include "kd_loss_cpu.h"
#include "pseudo_labels_cpu.h"
#include "sparse_kd_loss_cpu.h"
