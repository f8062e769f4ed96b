"""One module per op: argument checks, backend choice, and the torch.ops.lepton_fast custom op."""
