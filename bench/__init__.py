"""signgate benchmarks: `python -m bench` (or `make bench`) starts everything it measures on
127.0.0.1, runs each benchmark and prints one table of figures and ratios from the same run.

The machine is shared and noisy, so every figure is paired with a reference measured in the
same run (raw crypto, openssl, OpenBao transit, a bare Temporal workflow) and the ratio is what
counts. Results are also written to `bench/results/<date>.json` with a description of the
machine. Benchmarks are goals, never timed tests.
"""
