"""A counter of what makes the host wait for a GPU, run on the CPU.

A GPU runs ahead of the host only as long as the host never waits for it. Three kinds of call make
it wait, and all three are visible on the CPU, where nothing waits:

* **a tensor built from host data for a device** (``torch.tensor(0.5, device=d)``,
  ``torch.as_tensor(list, device=d)``, ``t.new_tensor(...)``): a blocking host-to-device copy;
* **aten ops whose result depends on device values** (``nonzero``, ``masked_select``, indexing
  with a boolean mask, ``unique``, ``repeat_interleave`` without ``output_size``, ``is_nonzero``,
  ``equal``, ``_local_scalar_dense``): the host must read the values to size the result;
* **a Python read of a tensor's value** (``item``, ``tolist``, ``bool``, ``int``, ``float``,
  ``index``, ``numpy``).

:func:`counting_host_syncs` counts all three while it is active (in this process and in processes
forked from it).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy")
SYNCING_OPS = {"aten.nonzero", "aten._local_scalar_dense", "aten.masked_select", "aten.is_nonzero", "aten.equal",
               "aten.unique_consecutive", "aten._unique", "aten._unique2", "aten.unique_dim"}
BOOL_INDEXED = {"aten.index", "aten.index_put", "aten.index_put_"}  # sync on CUDA when an index is a mask
HOST_DATA_FACTORIES = ("tensor", "as_tensor", "asarray")


def syncs_on_cuda(func, args: tuple, kwargs: dict) -> bool:
    """Whether this aten op waits for the GPU: its result's size or a Python value depends on device data."""
    name = str(func.overloadpacket)
    if name in SYNCING_OPS:
        return True
    if name in BOOL_INDEXED:
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(isinstance(i, Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices)
    return name == "aten.repeat_interleave" and kwargs.get("output_size") is None


class _SyncingOps(TorchDispatchMode):
    def __init__(self, seen: list[str]) -> None:
        super().__init__()
        self.seen = seen

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if syncs_on_cuda(func, args, kwargs):
            self.seen.append(str(func))
        return func(*args, **kwargs)


@contextlib.contextmanager
def counting_host_syncs() -> Iterator[list[str]]:
    """The list of every host sync made inside, by name, as it grows."""
    seen: list[str] = []
    patched: list[tuple[object, str, object]] = []

    def patch(owner: object, name: str, replacement: object) -> None:
        patched.append((owner, name, getattr(owner, name)))
        setattr(owner, name, replacement)

    for name in READS:
        def read(self, *args, _name=name, _original=getattr(Tensor, name), **kwargs):
            seen.append(f"Tensor.{_name}")
            return _original(self, *args, **kwargs)
        patch(Tensor, name, read)
    for name in HOST_DATA_FACTORIES:
        def build(data, *args, _name=name, _original=getattr(torch, name), **kwargs):
            if kwargs.get("device") is not None and not isinstance(data, Tensor):
                seen.append(f"torch.{_name}(host data, device=)")
            return _original(data, *args, **kwargs)
        patch(torch, name, build)

    def new_tensor(self, data, *args, _original=Tensor.new_tensor, **kwargs):
        if not isinstance(data, Tensor):
            seen.append("Tensor.new_tensor(host data)")
        return _original(self, data, *args, **kwargs)
    patch(Tensor, "new_tensor", new_tensor)
    try:
        with _SyncingOps(seen):
            yield seen
    finally:
        for owner, name, original in reversed(patched):
            setattr(owner, name, original)
