"""The stages: extract, train, evaluate, score (and the CLI that wires them)."""

import os

# torch allocates tensors of 2 MB and more on transparent huge pages when this is set before its first
# allocation (torch reads it once). Otherwise the kernel faults a fresh tensor's pages in and zeroes them
# 4 KB at a time on first touch, and a full-size backbone's large activations are fresh on every segment:
# one huge page takes the place of 512 such faults (benchmarks/results/README.md, "Against this
# machine's own ceiling"). THP_MEM_ALLOC_ENABLE=0 in the environment keeps torch's default.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
