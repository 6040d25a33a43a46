"""distributed_mtml: multi-task learning, meta-learning and transfer on Ray."""

__version__ = "0.1.0"
