"""Benchmark helpers: peer loaders and the plain-read ceiling the project is compared with."""
