"""The stages: extract, train, evaluate, score (and the CLI that wires them)."""

import os

# torch allocates tensors of 2 MB and more on transparent huge pages when this is set before its first
# allocation (torch reads it once). Otherwise the kernel faults a fresh tensor's pages in and zeroes them
# 4 KB at a time on first touch: Video Swin-B took ~200,000 page faults per segment (0.7-0.9 s of kernel
# time on two cores), 10x fewer with huge pages, for 1.08x its segment rate (benchmarks/results/README.md).
# THP_MEM_ALLOC_ENABLE=0 in the environment keeps torch's default.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
