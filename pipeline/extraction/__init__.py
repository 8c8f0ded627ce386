"""The extract stage as a package: its entry point (entry.py: `extract_into`), the loop (loop.py) and
its parts (source, events, batcher, writer, progress), and the same loop spread over Ray actors
(on_ray.py)."""
