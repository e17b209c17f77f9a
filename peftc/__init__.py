"""peftc: a compiler for parameter-efficient fine-tuning.

    cm = peftc.compile(model, {"adapters": [{"method": "lora", "targets": ["q_proj", "v_proj"]}]})
"""

from .compiled import CompiledModel, GraphDispatch
from .compiler import compile
from .errors import CaptureError, CheckpointError, SpecError
from .interop import from_peft
from .spec import Spec

__version__ = "0.1.0"

__all__ = ["compile", "Spec", "CompiledModel", "GraphDispatch", "SpecError", "CaptureError", "CheckpointError",
           "from_peft"]
