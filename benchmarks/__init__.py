"""Benchmarks: training-step throughput, analytic model FLOPs and utilisation, memory and visual-token counts
(``python -m benchmarks.bench [--quick] [--out DIR]``)."""
