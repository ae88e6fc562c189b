"""finetune: turn a folder of labelled images into a trained image classifier."""

__version__ = "0.1.0"

from .config import PredictConfig, TrainConfig  # noqa: E402
from .errors import FinetuneError  # noqa: E402

__all__ = ["FinetuneError", "PredictConfig", "TrainConfig", "__version__"]
