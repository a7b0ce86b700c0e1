"""roadwork core: pure Python + PyTorch. Never imports dagster."""

__version__ = "0.1.0"
