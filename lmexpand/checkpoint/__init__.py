"""Reading and writing checkpoints, model sources and architecture families.

This package imports nothing else from lmexpand (but the shared helpers: errors, faults,
jsonio, progress and units), and nothing heavy at import time: torch is imported only
where tensor values are touched.
"""

from lmexpand.checkpoint.families import FAMILIES, Family, detect_family
from lmexpand.checkpoint.reader import CheckpointReader
from lmexpand.checkpoint.safetensors_format import TensorInfo, TensorSlot
from lmexpand.checkpoint.sources import EMBEDDED, open_source, resolve_source
from lmexpand.checkpoint.writer import (Computed, OutputTensor, RawCopy, Zeros, copy_checkpoint,
                                        write_checkpoint)

__all__ = [
    "FAMILIES", "Family", "detect_family", "CheckpointReader", "TensorInfo", "TensorSlot",
    "EMBEDDED", "open_source", "resolve_source", "Computed", "OutputTensor", "RawCopy", "Zeros",
    "copy_checkpoint", "write_checkpoint",
]
