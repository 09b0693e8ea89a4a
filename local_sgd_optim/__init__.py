"""Local SGD as a drop-in :class:`torch.optim.Optimizer`."""

from local_sgd_optim.accelerate import prepare_local_sgd
from local_sgd_optim.averaging import CommStats
from local_sgd_optim.errors import RoundError
from local_sgd_optim.optimizer import LocalSGDOptimizer
from local_sgd_optim.presets import diloco

__version__ = "0.1.0.dev0"

__all__ = [
    "CommStats",
    "LocalSGDOptimizer",
    "RoundError",
    "__version__",
    "diloco",
    "prepare_local_sgd",
]
