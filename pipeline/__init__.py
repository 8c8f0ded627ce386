"""The stages: extract, train, evaluate, score (and the CLI that wires them)."""

import os

# torch allocates tensors of 2 MB and more on transparent huge pages when this is set before its first
# allocation (torch reads it once). A fresh tensor's pages are faulted in and zeroed by the kernel on first touch, 4 KB at
# a time otherwise: Video Swin-B took ~200,000 page faults per segment (0.7-0.9 s of kernel time on two
# cores) and 10x fewer with huge pages, 1.08x the segment rate (benchmarks/results/README.md).
# THP_MEM_ALLOC_ENABLE=0 in the environment keeps torch's default.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
