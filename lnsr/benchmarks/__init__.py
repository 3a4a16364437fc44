"""Benchmarks of lnsr (``lnsr bench``, ``cli``): the kernels (``bench_kernels``), the host overhead
of the ops (``host_overhead``), the training step (``step``) and its exact peak memory (``memory``);
CSV writing in ``common``.  Nothing is imported here: each module is imported when it is run."""

__all__ = []
