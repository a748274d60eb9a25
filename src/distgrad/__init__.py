"""distgrad: data-parallel PyTorch training with a parameter server.

Every optimizer of Hermans' thesis (DOWNPOUR, EASGD/AEASGD/EAMSGD, DynSGD, AGN,
ADAG) on a deterministic simulator of asynchronous workers::

    import distgrad
    result = distgrad.train(algorithm="adag", workers=8, window=10, epochs=3, seed=1)
    result.test_accuracy, result.model
"""

from distgrad.algorithms import REGISTRY as ALGORITHMS
from distgrad.algorithms import Algorithm, Capabilities, get_algorithm, register_algorithm
from distgrad.engines.timing import Timing
from distgrad.errors import ConfigError
from distgrad.job import Job, TrainResult, train

__version__ = "0.1.0"

__all__ = ["ALGORITHMS", "Algorithm", "Capabilities", "ConfigError", "Job", "Timing",
           "TrainResult", "get_algorithm", "register_algorithm", "train"]
