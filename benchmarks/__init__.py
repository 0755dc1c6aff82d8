"""Benchmarks of forward-only Lanczos gradients against Cholesky, GPyTorch CG and differentiated Lanczos."""
