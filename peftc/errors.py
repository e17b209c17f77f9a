"""Every error peftc raises, in one place. Each message names the problem and the fix."""


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


class ScopeError(ValueError):
    """A `scope` (report, diff, dot, networkx) names no module path of the graph."""


class UsageError(ValueError):
    """Command-line input peftc cannot use; the message says what to pass instead."""


class GraphvizNotFoundError(RuntimeError):
    """The graphviz `dot` program is not on PATH."""


class InvariantError(RuntimeError):
    """A pass broke one of peftc's invariants: a bug in that pass, not in the user's input."""


class ShardedError(RuntimeError):
    """What needs a model's whole weights was asked of a model FSDP2 sharded; says where to do it instead."""


class CallError(ValueError):
    """A call the compiled graph cannot run though the original model accepts it; names the argument."""


class PartitionError(ValueError):
    """A compiled model that cannot be split into a base program and a user program (peftc.partition)."""


class LinkError(RuntimeError):
    """The other program of a partition (over torch.distributed) failed, disagreed or did not answer in time."""
