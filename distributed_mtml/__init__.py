"""distributed_mtml: multi-task learning, meta-learning and transfer on Ray."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("distributed_mtml")  # pyproject.toml's, the one place it is written
except PackageNotFoundError:  # a source tree on sys.path, not installed
    __version__ = "0+unknown"
