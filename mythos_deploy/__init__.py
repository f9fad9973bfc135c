"""mythos-deploy: export and edge deployment for OpenMythos recurrent-depth transformers.

Importing this package loads torch only; onnx, onnxruntime, tensorrt and triton are imported
inside the code paths that need them.
"""

from mythos_deploy.version import __version__
from mythos_deploy.cache import KVCache, slot_names
from mythos_deploy.checkpoint import load_checkpoint, save_checkpoint
from mythos_deploy.config import PRESETS, MythosConfig
from mythos_deploy.errors import (CacheError, CheckpointError, ConfigError, InputError,
                                  InternalError, MissingDependencyError, MythosError, NumericalError,
                                  ParityError)
from mythos_deploy.model import ModelOutput, MythosModel
from mythos_deploy.openmythos_import import from_openmythos, from_openmythos_file

__all__ = [
    "__version__", "MythosConfig", "PRESETS", "MythosModel", "ModelOutput", "KVCache",
    "slot_names", "load_checkpoint", "save_checkpoint", "from_openmythos",
    "from_openmythos_file", "MythosError", "ConfigError", "CheckpointError", "InputError",
    "CacheError", "MissingDependencyError", "InternalError", "ParityError", "NumericalError",
]
