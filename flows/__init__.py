"""Orchestration: Prefect flows over the stage graph that dvc.yaml declares."""
