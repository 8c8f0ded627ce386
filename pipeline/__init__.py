"""The CLI (cli/), the stages it wires (stages/; extract's in extraction/ with its loop) and the modules
shared below them (directly in pipeline/); README.md's layer table.

torch's own choice of memory pages is kept: asking it for transparent huge pages
(THP_MEM_ALLOC_ENABLE=1, which `pipeline` set from 531fdd2 on) made full-size extraction slower on the
project's Zen 4 host (benchmarks/results/README.md, "Transparent huge pages"). Set it in the
environment to try it on another machine.
"""
