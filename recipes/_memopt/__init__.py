"""memopt: memory-efficient PyTorch optimizers."""
__version__ = "0.1.0"
