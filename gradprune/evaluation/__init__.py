"""Evaluation: perplexity and parameter counts (perplexity), zero-shot multiple choice
(zeroshot), prefill/decode speed (speed)."""
