"""lnsr: Layerwise Noise Stability Regularization for fine-tuning language models."""
from . import ops
from .config import LNSRConfig, NORMALIZE_MODES
from .regularizer import LNSR
from .dropout import DROPOUT_MODES
from .models import BLOCKS_BY_MODEL_TYPE, enable_activation_checkpointing, find_blocks, unwrap

__version__ = "0.1.0"
__all__ = ["LNSR", "LNSRConfig", "ops", "find_blocks", "unwrap", "BLOCKS_BY_MODEL_TYPE", "NORMALIZE_MODES",
           "DROPOUT_MODES", "enable_activation_checkpointing", "__version__"]
