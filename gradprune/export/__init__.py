"""Exports of a pruned model beyond the Hugging Face folder: the sparse file (sparse)."""
