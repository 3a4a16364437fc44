"""Benchmarks of lnsr: the kernels and the training step (``lnsr bench``)."""
