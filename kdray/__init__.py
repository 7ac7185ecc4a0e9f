"""kdray: knowledge distillation (Hinton, Vinyals & Dean, 2015) on Ray."""

__version__ = "0.1.0"
