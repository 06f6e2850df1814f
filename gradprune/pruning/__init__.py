"""Pruning: calibration statistics (stats), saliency scores (criteria), mask selection and
storage (masks), SparseGPT, structured pruning, and the step that applies one config (prune)."""
