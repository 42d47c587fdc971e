"""soup_train: pretrain Soup-of-Experts language models (data, model, trainer, distributed)."""
__version__ = "0.1.0"
