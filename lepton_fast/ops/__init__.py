"""One module per op family: the schemas of its ops (``_backend.define``) with their fake
kernels, and the public functions (argument checks, then the op). ``_reference`` holds every
op's reference kernel, ``_autograd`` the Python autograd kernel of the fused losses; the C++,
CUDA and Triton kernels live in csrc/ and kernels/ (lepton_fast._backend says which runs).

Conventions of every schema (the kernels rely on them):
  - logits are [N, C] with rows contiguous along C (the public functions flatten [..., C]);
  - a floating hyper-parameter (a threshold, eps, ...) is a 0-d float64 CPU tensor, so that a
    changing value neither recompiles a torch.compile graph nor syncs a device; the KD ops take
    all of theirs packed in one 1-D float64 CPU tensor ``hyper`` (_validate.KD_FIELDS);
  - argument values are checked once, in Python (lepton_fast/_validate.py), before any kernel
    runs; kernels check shapes, dtypes, devices and strides, and the data they read (label
    ranges, rows whose softmax is undefined), raising ValueError on the CPU.

Autocast: the ops register no Autocast kernel, so under ``torch.autocast`` they take their
inputs as given (the dispatcher falls through): the kernels read float16 and bfloat16 and
accumulate in float32 (float64 for float64), the precision autocast's float32 list gives
F.cross_entropy and F.kl_div, without a float32 copy of the logits. fused_linear_kd_loss casts
each head to autocast's dtype first, as F.linear would.
"""
