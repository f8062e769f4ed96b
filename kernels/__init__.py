"""Triton kernels, installed as lepton_fast.kernels. Each module imports triton."""
