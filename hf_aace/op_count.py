"""Counts the tensor operations and host syncs of a piece of code, on any device (CPU included).

A host sync is a value read back from the device (`.item()`, `bool(tensor)`: aten's `_local_scalar_dense`,
`is_nonzero` and `equal`; `.tolist()` of a CPU tensor dispatches nothing): on a GPU each stalls the host until the
device has caught up. Kernels are the operations that are not views (a view launches nothing). `bench/step_ops.py`
counts both for one optimizer step of every method.

Example:
```python
>>> import torch
>>> from hf_aace.op_count import OpCounter
>>> with OpCounter() as counter:
...     total = (torch.ones(3) * 2).sum().item()
>>> counter.syncs, counter.kernels
(1, 4)
```
"""

from collections import Counter

from torch.utils._python_dispatch import TorchDispatchMode

SYNC_OPS = frozenset({"aten._local_scalar_dense", "aten.is_nonzero", "aten.equal"})


class OpCounter(TorchDispatchMode):
    """Inside the block, counts every aten operation (forward and backward) by name.

    Attributes:
        counts: the operations that are not views, by name (e.g. "aten.mm").
        views: the view operations, by name.
        kernels: the total of `counts`.
        syncs: how many operations read a value back to the host.
    """

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()
        self.views: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        (self.views if func.is_view else self.counts)[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def kernels(self) -> int:
        return sum(self.counts.values())

    @property
    def syncs(self) -> int:
        return sum(count for name, count in self.counts.items() if name in SYNC_OPS)


__all__ = ["OpCounter", "SYNC_OPS"]
