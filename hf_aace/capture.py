"""Whole-step CUDA graph capture of the training step (`step_capture="cuda_graph"`).

A training step of a small network on a fast GPU is bound by the host: hundreds of kernel launches, each a few
microseconds of Python and driver work, for kernels that take less. Captured once into a CUDA graph, the whole step
(both passes, the perturbation and its restore, every backward) is one launch. `StepCapture` does it for any step
function that reads its inputs from tensors and makes no host sync, which the two-pass step is built to be:

1. each kind of step (two-pass, plain, reused perturbation) and each input signature (shapes, strides, dtypes, and
   the host-side values the step branches on) gets its own graph;
2. the first `warmup_steps` steps of a signature run eagerly (on a side stream on CUDA, as CUDA graphs ask), and the
   next one is captured, with its inputs copied into static buffers that every later replay reads;
3. before a replay the new batch is copied into those buffers and the gradients the step accumulates into are made to
   hold the current `.grad` (zeroed where the optimizer set it to None); after it, each parameter's `.grad` is the
   graph's output gradient again, so the optimizer, clipping and logging read it as usual;
4. a step that cannot be captured (an operation that reads a value back to the host, an unregistered random
   generator) runs eagerly from then on, after one warning that names the error; so does every signature beyond
   `max_graphs` (variable-length batches: pad to a fixed length).

The graph's outputs are static: they are overwritten by the next replay, so callers copy what they keep. Only the
step's tensor work is replayed: Python inside the step (a `compute_loss` override that appends to a list, counts
calls or logs) runs once, at capture.
"""

import warnings
import weakref
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten
from transformers import Trainer

WARMUP_STEPS = 2
MAX_GRAPHS = 8
CAPTURE_CHOICES = ("none", "cuda_graph")


class CUDAGraphs:
    """Runs and captures steps on the current CUDA device with `torch.cuda.CUDAGraph`."""

    def __init__(self) -> None:
        self._stream: torch.cuda.Stream | None = None

    def run_eagerly(self, step: Callable[[], Any]) -> Any:
        """A warm-up step on a side stream (lazy initialisation happens there, as graph capture requires)."""
        if self._stream is None:
            self._stream = torch.cuda.Stream()
        self._stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self._stream):
            result = step()
        torch.cuda.current_stream().wait_stream(self._stream)
        return result

    def capture(self, step: Callable[[], Any]) -> tuple[Any, Any]:
        """`(graph, outputs)`: the step recorded, not run; `replay(graph)` runs it."""
        graph = torch.cuda.CUDAGraph()
        # Only this thread's unsafe calls end the capture: a DataLoader's pin-memory thread goes on meanwhile.
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            outputs = step()
        return graph, outputs

    def replay(self, graph: Any) -> None:
        graph.replay()


@dataclass
class _Graph:
    """One captured signature: its static inputs and outputs and the gradients it reads and writes."""

    warmups: int = 0
    failed: bool = False
    used: list[bool] | None = None  # which parameters the step gives a gradient (seen in the warm-up steps)
    graph: Any = None
    static_leaves: list[Any] = field(default_factory=list)
    outputs: Any = None
    params: list[torch.Tensor] = field(default_factory=list)
    pointers: list[int] = field(default_factory=list)
    grads_in: list[torch.Tensor] = field(default_factory=list)
    grads_out: list[torch.Tensor | None] = field(default_factory=list)
    replays: int = 0


def _leaf_signature(leaf: Any) -> Hashable:
    if isinstance(leaf, torch.Tensor):
        return ("tensor", tuple(leaf.shape), leaf.stride(), leaf.dtype, leaf.device, leaf.requires_grad)
    try:
        hash(leaf)
    except TypeError:
        return ("value", repr(leaf))
    return ("value", leaf)


class StepCapture:
    """Captures a step function per signature and replays it (see the module's docstring).

    Args:
        backend: runs, captures and replays steps; `CUDAGraphs` on a GPU.
        warmup_steps: eager steps of each signature before it is captured.
        max_graphs: most signatures captured; later ones run eagerly.
    """

    def __init__(self, backend: Any, warmup_steps: int = WARMUP_STEPS, max_graphs: int = MAX_GRAPHS) -> None:
        self.backend = backend
        self.warmup_steps = warmup_steps
        self.max_graphs = max_graphs
        self.graphs: dict[Hashable, _Graph] = {}
        self._warned: set[str] = set()
        self._model: weakref.ref | None = None

    def reset(self) -> None:
        """Drops every graph (and the memory it holds); the next steps warm up and capture again."""
        self.graphs = {}

    def bind(self, model: torch.nn.Module) -> None:
        """The graphs belong to one model: a step of another one (a hyperparameter search's next trial, built by
        `model_init`) drops them, with the memory they hold."""
        if self._model is not None and self._model() is not model:
            self.reset()
        self._model = weakref.ref(model)

    @property
    def replays(self) -> int:
        """Steps run by replaying a graph, over all signatures."""
        return sum(graph.replays for graph in self.graphs.values())

    def __call__(
        self, key: Hashable, step: Callable[..., Any], args: tuple, params: Callable[[], Sequence[torch.Tensor]]
    ) -> Any:
        """Runs `step(*args)`: eagerly, captured, or by replaying its graph.

        Args:
            key: the host-side state the step branches on (its kind, the accumulation count, ...); with the shapes,
                strides and dtypes of the tensors in `args` and the other values in it, it names the graph.
            step: the step; it reads every input that changes between steps from `args`.
            args: the step's arguments: any nesting of tuples, lists and dicts of tensors and other values.
            params: returns the trainable parameters whose `.grad` the step accumulates into (called only for warm-up
                and capture steps, not on a replay's path).
        """
        leaves, spec = tree_flatten(args)
        signature = (key, spec, tuple(_leaf_signature(leaf) for leaf in leaves))
        graph = self.graphs.get(signature)
        if graph is None:
            if len(self.graphs) >= self.max_graphs:
                self._warn_once(
                    "max_graphs",
                    f"step_capture: more than {self.max_graphs} different step signatures (batch shapes, kinds of "
                    "step); the new ones run without a graph. Batches of varying shapes defeat capture: pad them to "
                    "a fixed length and drop the last incomplete batch (--dataloader_drop_last).",
                )
                return step(*args)
            graph = self.graphs[signature] = _Graph()
        if graph.graph is not None and graph.pointers != [p.data_ptr() for p in graph.params]:
            graph.graph, graph.warmups = None, 0  # the parameters moved (e.g. cast): the graph reads stale memory
        if graph.failed:
            return step(*args)
        if graph.graph is None:
            if graph.warmups < self.warmup_steps:
                graph.warmups += 1
                return self._warm_up(graph, step, args, params())
            current = self._capture(graph, step, leaves, spec, params())
            if graph.failed:
                return step(*args)
        else:
            current = [p.grad for p in graph.params]
        return self._replay(graph, leaves, current)

    def _warm_up(self, graph: _Graph, step: Callable[..., Any], args: tuple, params: Sequence[torch.Tensor]) -> Any:
        result = self.backend.run_eagerly(lambda: step(*args))
        used = [p.grad is not None for p in params]
        graph.used = used if graph.used is None else [a or b for a, b in zip(graph.used, used)]
        return result

    def _capture(
        self, graph: _Graph, step: Callable[..., Any], leaves: list, spec: Any, params: Sequence[torch.Tensor]
    ) -> list[torch.Tensor | None]:
        """Captures the step on static copies of `leaves`; returns the parameters' `.grad` from before it."""
        used = graph.used or [True] * len(params)
        graph.params = [p for p, u in zip(params, used) if u]
        current = [p.grad for p in graph.params]
        graph.static_leaves = [
            torch.empty_strided(leaf.shape, leaf.stride(), dtype=leaf.dtype, device=leaf.device).copy_(leaf)
            if isinstance(leaf, torch.Tensor)
            else leaf
            for leaf in leaves
        ]
        # The graph accumulates into tensors it holds from now on (`+=` into them, or a new sum it owns).
        graph.grads_in = [g if g is not None else torch.zeros_like(p) for p, g in zip(graph.params, current)]
        for p, g in zip(graph.params, graph.grads_in):
            p.grad = g
        static_args = tree_unflatten(graph.static_leaves, spec)
        try:
            graph.graph, graph.outputs = self.backend.capture(lambda: step(*static_args))
        except Exception as error:  # noqa: BLE001 - any failure to capture falls back to the eager step
            graph.failed, graph.graph = True, None
            graph.static_leaves, graph.grads_in = [], []
            for p, g in zip(graph.params, current):
                p.grad = g
            self._warn_once(
                "capture",
                f"step_capture: this step could not be captured as a CUDA graph ({type(error).__name__}: {error}); "
                "it runs without one from now on. Steps that read values back to the host (.item(), data-dependent "
                "shapes) cannot be captured.",
            )
            return current
        graph.grads_out = [p.grad for p in graph.params]
        graph.pointers = [p.data_ptr() for p in graph.params]
        return current

    def _replay(self, graph: _Graph, leaves: list, current: list[torch.Tensor | None]) -> Any:
        sources = [(s, leaf) for s, leaf in zip(graph.static_leaves, leaves) if isinstance(leaf, torch.Tensor)]
        sources = [(s, leaf) for s, leaf in sources if s is not leaf]
        if sources:
            torch._foreach_copy_([s for s, _ in sources], [leaf for _, leaf in sources])
        zeroed = [g_in for g_in, g in zip(graph.grads_in, current) if g is None]
        copied = [(g_in, g) for g_in, g in zip(graph.grads_in, current) if g is not None and g is not g_in]
        if zeroed:
            torch._foreach_zero_(zeroed)
        if copied:
            torch._foreach_copy_([g_in for g_in, _ in copied], [g for _, g in copied])
        self.backend.replay(graph.graph)
        for p, g in zip(graph.params, graph.grads_out):
            p.grad = g
        graph.replays += 1
        return graph.outputs

    def _warn_once(self, kind: str, message: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            warnings.warn(message, stacklevel=3)


def check_step_capture(trainer: Any) -> None:
    """ValueError, naming the way out, for a run the captured step cannot serve."""
    args = trainer.args
    if args.device.type != "cuda":
        raise ValueError(
            f"step_capture='cuda_graph' captures the training step as a CUDA graph and needs a CUDA GPU; this run is "
            f"on {args.device}. Drop --step_capture (or set it to 'none')."
        )
    if args.world_size > 1:
        raise ValueError(
            f"step_capture='cuda_graph' runs on one process; this run has {args.world_size}. Drop --step_capture for "
            "a multi-process launch."
        )
    if args.torch_empty_cache_steps is not None:
        raise ValueError(
            "step_capture='cuda_graph' cannot empty the device cache inside a captured step: drop "
            "--torch_empty_cache_steps or --step_capture."
        )
    if args.torch_compile:
        raise ValueError(
            "step_capture='cuda_graph' and --torch_compile each take over the step's launches; use one (torch.compile "
            "has its own CUDA graphs with --torch_compile_mode reduce-overhead)."
        )
    compute_loss = getattr(type(trainer), "compute_loss", None)
    if compute_loss is not None and compute_loss is not Trainer.compute_loss:
        warnings.warn(
            f"step_capture: {type(trainer).__name__} has its own compute_loss; a replayed step runs its tensor work "
            "only, so anything it does in Python (recording metrics, counting) happens once, at capture. If it "
            "records per-step values that way, set step_capture='none'.",
            stacklevel=3,
        )
