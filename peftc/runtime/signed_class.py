"""A compiled model's class carries the original class's forward signature, as its instances do.

Tools read some facts from the *class*, not the instance: transformers' Trainer finds its label
columns with `find_labels(type(model))` and whether the model returns a loss with
`can_return_loss(type(model))`, both from `inspect.signature(type(model).forward)`. On the bare
CompiledModel (`forward(*args, **kwargs)`) it would find no labels: no eval loss, no `label_ids`.
So each compiled model gets a subclass per (compiled class, original class), the same name,
whose class-level forward is the compiled one under the original's signature. Pickle and
deepcopy rebuild that subclass from the two classes (`rebuild`), not from a module attribute.
"""

from __future__ import annotations

import inspect

_CLASSES: dict[tuple[type, type], type] = {}


def signed_class(base: type, source: type) -> type:
    """The subclass of `base` whose `forward` has `source.forward`'s signature (made once per pair)."""
    base = getattr(base, "unsigned_class", base)
    key = (base, source)
    if key not in _CLASSES:
        def forward(self, *args, **kwargs):
            return base.forward(self, *args, **kwargs)

        forward.__signature__ = inspect.signature(source.forward)
        forward.__doc__ = getattr(source.forward, "__doc__", None)
        _CLASSES[key] = type(base.__name__, (base,), {
            "forward": forward, "unsigned_class": base, "signed_for": source,
            "__module__": base.__module__, "__qualname__": base.__qualname__, "__reduce_ex__": _reduce_ex})
    return _CLASSES[key]


def rebuild(base: type, source: type):
    """An empty instance of the signed class, for pickle/deepcopy to fill with __setstate__."""
    cls = signed_class(base, source)
    return cls.__new__(cls)


def _reduce_ex(self, protocol):
    cls = type(self)
    return rebuild, (cls.unsigned_class, cls.signed_for), self.__getstate__()
