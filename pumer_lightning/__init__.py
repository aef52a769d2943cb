"""pumer-lightning: PuMer token reduction for vision-language transformers on PyTorch Lightning."""

__version__ = "0.1.0"
