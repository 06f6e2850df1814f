"""gradprune: gradient-saliency pruning of Transformer language models (library layer, torch only)."""

__version__ = "0.1.0"
