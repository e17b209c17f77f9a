"""Kill and Revive (DLoRA): switch off adapter sites whose updates stayed small, switch them back on later."""

from __future__ import annotations


class KillRevive:
    dead_sites: frozenset = frozenset()
