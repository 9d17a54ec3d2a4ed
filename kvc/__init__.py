"""KVC: bring datasets and models to the Kubernetes nodes where ML jobs run."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("kvc")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"
