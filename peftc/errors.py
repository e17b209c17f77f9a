"""The errors peftc raises. Each names the problem and the fix."""


class SpecError(ValueError):
    """A spec field holds a value peftc cannot use; the message names the field path."""


class CaptureError(ValueError):
    """torch.export could not capture the model; `reason` keeps export's own message."""

    def __init__(self, message: str, reason: str = ""):
        super().__init__(message)
        self.reason = reason


class CheckpointError(ValueError):
    """An adapter checkpoint is missing, truncated, or does not fit the compiled model."""


class ExportError(ValueError):
    """A model or option that ONNX export cannot handle; nothing is left at the target path."""


class CallError(ValueError):
    """A call the compiled graph cannot run though the original model accepts it; names the argument."""
