"""The stages below the CLI, one module per command: train, evaluate, score, reproduce, importers
(import-features), import_checkpoint (import-checkpoint), demo. extract's stage is pipeline/extraction/
(entry.py, and on_ray.py for --ray) next to its loop. Nothing is imported here, so importing one stage
loads only that stage and what it imports."""
