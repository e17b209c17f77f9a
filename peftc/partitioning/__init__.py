"""Split a compiled model into a frozen-base program and a user-adapter program (DLoRA).

    part = peftc.partition(cm)      # see peftc.partitioning.model
"""

from peftc.partitioning.model import Partition, connect, partition, serve_base

__all__ = ["Partition", "partition", "connect", "serve_base"]
