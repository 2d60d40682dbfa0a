"""Benchmark tooling kept out of the installed library: random-weight models and the mlx-lm runtime.

Importable from a checkout (the repository root on `sys.path`): the scripts here put it there, and
the tests' conftest does. Needs the `bench` or `test` extra (mlx-lm, matplotlib).
"""
