"""One module per op family: the public function (argument checks, then the op), the fake
kernels of its schemas, and its entry in the backend table (lepton_fast._backend)."""
