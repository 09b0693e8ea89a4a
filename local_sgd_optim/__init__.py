"""Local SGD as a drop-in :class:`torch.optim.Optimizer`."""

from local_sgd_optim.optimizer import LocalSGDOptimizer

__version__ = "0.1.0.dev0"

__all__ = ["LocalSGDOptimizer", "__version__"]
