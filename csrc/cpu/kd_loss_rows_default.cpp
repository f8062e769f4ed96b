// The portable build of the kd_loss row kernel: at::vec's generic vectors (8 floats, which
// the compiler maps to SSE2) for any x86-64 or other CPU.
#include "vec_isa_prelude.h"
// (the prelude and this interface compile for the baseline, see vec_isa_prelude.h)
#include "kd_loss_cpu.h"

#define CPU_CAPABILITY DEFAULT
#include "kd_loss_rows.h"

namespace lepton_fast {
namespace cpu {
void kd_rows_default(const KDRows& a, int64_t begin, int64_t end) { kd_rows_any_dtype(a, begin, end); }
}  // namespace cpu
}  // namespace lepton_fast
