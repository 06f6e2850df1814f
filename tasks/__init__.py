"""Pipeline stages: one module per stage of dvc.yaml, each `python -m tasks.<stage>`."""
