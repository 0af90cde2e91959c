"""Reading PyTorch checkpoint files without running their pickles.

BarcodeBERT's training checkpoints (``barcodebert/pretraining.py``, saved with
``barcodebert/io.py::safe_save_model``) hold the model state next to the optimizer and scheduler
state, an argparse ``Namespace`` and, in the scheduler state of older torch releases, references to
Python functions. ``torch.load(weights_only=True)`` refuses such files, and plain ``torch.load``
would execute whatever the pickle names. :func:`load` first tries ``weights_only=True``; when that
refuses the file, it unpickles with :class:`RestrictedUnpickler`, which resolves only the globals
torch needs to rebuild tensors and containers and turns every other global into an inert
:class:`Placeholder` that records its arguments and state but runs nothing.
"""

from __future__ import annotations

import collections
import importlib
import os
import pickle
from typing import Any

#: Globals resolved to the real object: torch's tensor and storage rebuilders and plain containers.
_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "tuple"): tuple,
    ("builtins", "list"): list,
    ("builtins", "dict"): dict,
}
_TORCH_ALLOWED = {
    ("torch._utils", "_rebuild_tensor"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_tensor_v3"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch._tensor", "_rebuild_from_type_v2"),
    ("torch.nn.parameter", "Parameter"),
    ("torch", "Size"),
    ("torch", "Tensor"),
    ("torch", "device"),
}


class Placeholder:
    """What an unknown global becomes: calling, constructing or restoring it only records data."""

    module = ""
    name = ""

    def __init__(self, *args: Any, **kwargs: Any):
        self.args, self.kwargs, self.state = args, kwargs, None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key, value) -> None:  # dict subclasses restored with SETITEMS
        if not isinstance(self.state, dict):
            self.state = {}
        self.state[key] = value

    def as_dict(self) -> dict[str, Any]:
        """An argparse ``Namespace`` (or any object restored from its ``__dict__``) as a dict."""
        return dict(self.state) if isinstance(self.state, dict) else {}

    def __repr__(self) -> str:
        return f"<placeholder for {self.module}.{self.name}>"


def _placeholder(module: str, name: str) -> type:
    return type(f"Placeholder[{module}.{name}]", (Placeholder,), {"module": module, "name": name})


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only allow-listed globals (see the module docstring); torch uses this class
    through ``torch.load(pickle_module=...)`` for its persistent-id storage loading."""

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if (module, name) in _TORCH_ALLOWED or (module == "torch" and (name.endswith("Storage") or _is_dtype(name))):
            return getattr(importlib.import_module(module), name)  # torch is loaded: torch.load is running
        return _placeholder(module, name)


def _is_dtype(name: str) -> bool:
    import torch

    return isinstance(getattr(torch, name, None), torch.dtype)


class _PickleModule:
    """The ``pickle_module`` torch.load accepts: ``pickle`` with a restricted Unpickler."""

    Unpickler = RestrictedUnpickler
    UnpicklingError = pickle.UnpicklingError
    __name__ = "bioscan_jax.convert.torch_pickle"

    @staticmethod
    def load(file, **kwargs):
        return RestrictedUnpickler(file, **kwargs).load()


def load(path: str | os.PathLike) -> Any:
    """The object in a torch checkpoint file, tensors on the CPU, never running its pickle code."""
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"reading {path} needs torch (pip install 'bioscan-jax[torch]')") from e
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        pass  # names globals weights_only refuses (optimizer/scheduler objects, a Namespace)
    return torch.load(str(path), map_location="cpu", weights_only=False, pickle_module=_PickleModule)
