"""A CPU stand-in for `hf_aace.capture.CUDAGraphs` that keeps a CUDA graph's contract, so that `StepCapture`'s
bookkeeping (static inputs, gradients, outputs, signatures) is tested without a GPU.

- Inside capture and replay, `torch.cuda.is_current_stream_capturing()` is True, as it is in a CUDA capture (where
  a replay repeats what the step decided then): transformers then skips the host reads it makes outside graphs.
- Capture runs the step once to record its operations, then puts back everything it changed (parameters, buffers,
  gradients, the random state): a CUDA capture records kernels without running them. Like a CUDA capture, it fails
  on an operation that reads a value back to the host.
- Replay runs the step again on the same static inputs, fails unless it runs exactly the recorded operations (same
  operators, shapes, dtypes and host-side arguments) on the same memory wherever they read a tensor from outside the
  step (parameters, buffers, static inputs, kept state): a real replay cannot do anything else. It writes its outputs
  and gradients into the tensors the capture returned (a real replay writes the same memory every time).
"""

from contextlib import contextmanager
from typing import Any
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from hf_aace.op_count import SYNC_OPS


class CaptureError(RuntimeError):
    pass


def _describe(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype)
    if isinstance(value, (list, tuple)):
        return tuple(_describe(v) for v in value)
    return repr(value)


class OperationRecorder(TorchDispatchMode):
    def __init__(self, refuse_syncs: bool) -> None:
        super().__init__()
        self.refuse_syncs = refuse_syncs
        self.operations: list[Any] = []
        self._made: set[int] = set()  # storages of tensors made inside the step

    def _outside(self, values: Any) -> tuple[int, ...]:
        """The storages of the tensors in `values` that come from outside the step."""
        storages = [t.untyped_storage().data_ptr() for t in tree_flatten(values)[0] if isinstance(t, torch.Tensor)]
        return tuple(s for s in storages if s not in self._made)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.refuse_syncs and str(func.overloadpacket) in SYNC_OPS:
            raise CaptureError(f"operation not permitted when stream is capturing ({func})")
        if func.overloadpacket is torch.ops.aten.lift_fresh:
            # A tensor made from Python data (`torch.tensor(...)`): a graph keeps the value it had at capture.
            outside = tuple(args[0].reshape(-1).tolist())
        else:
            outside = self._outside((args, kwargs))
        result = func(*args, **kwargs)
        self.operations.append((str(func), _describe(args), _describe(sorted(kwargs.items())), outside))
        for t in tree_flatten(result)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in outside:
                self._made.add(t.untyped_storage().data_ptr())
        return result


@contextmanager
def capturing():
    with mock.patch.object(torch.cuda, "is_current_stream_capturing", lambda: True):
        yield


class EmulatedGraph:
    def __init__(self, step, operations, outputs, grads_in, grads_out):
        self.step, self.operations, self.outputs = step, operations, outputs
        self.grads_in, self.grads_out = grads_in, grads_out


class EmulatedGraphs:
    """`CUDAGraphs`' interface on the CPU for the trainable parameters and buffers of `model` (a module, or a
    function that returns the current one)."""

    def __init__(self, model) -> None:
        self._model = model if isinstance(model, torch.nn.Module) else None
        self._get_model = model if self._model is None else None
        self.captures = 0

    @property
    def model(self) -> torch.nn.Module:
        return self._model if self._model is not None else self._get_model()

    def _params(self) -> list[torch.Tensor]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def run_eagerly(self, step):
        return step()

    def capture(self, step):
        params = self._params()
        state = [t for t in (*self.model.parameters(), *self.model.buffers())]
        values = [t.detach().clone() for t in state]
        grads_in = [p.grad for p in params]
        grad_values = [g.clone() if g is not None else None for g in grads_in]
        rng = torch.get_rng_state()
        recorder = OperationRecorder(refuse_syncs=True)
        grads_out = grads_in
        try:
            with capturing(), recorder:
                outputs = step()
            grads_out = [p.grad for p in params]
        finally:  # a capture runs nothing: put back the values running it changed (`.grad` is the captured output)
            with torch.no_grad():
                for t, v in zip(state, values):
                    t.copy_(v)
                for g, v in zip(grads_in, grad_values):
                    if g is not None:
                        g.copy_(v)
            for p, g in zip(params, grads_out):
                p.grad = g
            torch.set_rng_state(rng)
        self.captures += 1
        return EmulatedGraph(step, recorder.operations, outputs, grads_in, grads_out), outputs

    def replay(self, graph: EmulatedGraph) -> None:
        params = self._params()
        for p, g in zip(params, graph.grads_in):
            p.grad = g
        recorder = OperationRecorder(refuse_syncs=False)
        with capturing(), recorder:
            outputs = graph.step()
        if recorder.operations != graph.operations:
            first = next(
                (i for i, (a, b) in enumerate(zip(recorder.operations, graph.operations)) if a != b),
                min(len(recorder.operations), len(graph.operations)),
            )
            raise AssertionError(
                f"the replayed step runs other operations than the captured one, from operation {first}: "
                f"{recorder.operations[first : first + 1]} instead of {graph.operations[first : first + 1]}"
            )
        with torch.no_grad():
            for static, new in zip(tree_flatten(graph.outputs)[0], tree_flatten(outputs)[0]):
                if isinstance(static, torch.Tensor) and static is not new:
                    static.copy_(new)
            for p, g_out in zip(params, graph.grads_out):
                if g_out is not None and p.grad is not g_out:
                    g_out.copy_(p.grad)
                p.grad = g_out
