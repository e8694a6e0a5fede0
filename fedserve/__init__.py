"""fedserve: a federated-learning orchestration server for PyTorch models."""

__version__ = "0.1.0"
