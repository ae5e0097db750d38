"""Benchmark data loaders. Each module turns files into token tensors; none imports a model."""
