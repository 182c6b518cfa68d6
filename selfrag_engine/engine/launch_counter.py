"""Counting the device kernels a model step launches, per decoder layer, on any device (the CPU included).

What counts as one launch:
- a Triton kernel launch (`kernel[grid](...)`, through autotuners and heuristics: counted once, at the JIT
  function's `run`), compiled or run by the interpreter. The torch ops the interpreter itself runs to move
  arguments are not counted.
- a torch operator that would run a device kernel or copy: every aten op reaching the dispatcher except views
  (`view`, `split`, `t`, ...), allocations (`empty*`) and metadata queries. `nn.Linear` on a 2-D input is one
  `aten.mm` (one cuBLAS GEMM on CUDA); `torch.cat` is one launch; a host read (`.item()`) is recorded under
  its own kind, not as a kernel.

With the engine's `use_kernels=True` under `TRITON_INTERPRET=1` this counts, on a CPU, the launches the same
step makes on a GPU without CUDA graphs (a graph replays the same kernels in one launch of its own, which the
hooks here do not see: count with graphs off). Launches are attributed to the decoder layer whose forward is
running; a model forward whose attention metadata says decode is a decode step.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch.utils._python_dispatch import TorchDispatchMode
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

from selfrag_engine.layers.attention import AttentionMetadata
from selfrag_engine.models.llama import Llama

# Aten ops that allocate, alias or describe a tensor without a device kernel.
_NO_KERNEL = {
    "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "detach", "alias", "lift_fresh",
    "set_", "resize_", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "is_pinned",
    "_has_same_storage_numel",
}
_HOST_READS = {"item", "_local_scalar_dense"}


@dataclass
class Launch:
    name: str           # the Triton kernel's function name, or the aten op ("aten.mm")
    kind: str           # "triton" | "torch" | "host_read"
    layer: int | None   # decoder layer index, None outside the layers (embedding, final norm)
    step: int           # index of the model forward within the counting window
    decode: bool


@dataclass
class _State:
    step: int = -1
    decode: bool = False
    layer: int | None = None
    in_model: bool = False
    in_triton: int = 0  # >0 while a Triton launch runs (the interpreter's own torch ops are not launches)
    launches: list[Launch] = field(default_factory=list)


class _CountTorchOps(TorchDispatchMode):
    def __init__(self, record: Callable[[str, str], None], state: _State):
        super().__init__()
        self._record = record
        self._state = state

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self._state.in_triton:
            name = func.overloadpacket.__name__
            if name in _HOST_READS:
                self._record(f"aten.{name}", "host_read")
            elif not func.is_view and name not in _NO_KERNEL:
                self._record(f"aten.{name}", "torch")
        return func(*args, **(kwargs or {}))


class LaunchCounter:
    """Context manager counting the launches of `model`'s forwards made inside it.

        with LaunchCounter(engine.model) as counter:
            engine.generate(...)
        counter.decode_launches_per_layer()
    """

    def __init__(self, model: Llama):
        self.model = model
        self.num_layers = len(model.model.layers)
        self._state = _State()
        self._handles: list[Any] = []
        self._saved_runs: list[tuple[type, Callable]] = []
        self._mode: _CountTorchOps | None = None

    @property
    def launches(self) -> list[Launch]:
        return list(self._state.launches)

    def _record(self, name: str, kind: str) -> None:
        s = self._state
        if s.in_model:
            s.launches.append(Launch(name, kind, s.layer, s.step, s.decode))

    def __enter__(self) -> LaunchCounter:
        state = self._state

        def model_start(module, args, kwargs):
            state.step += 1
            state.in_model = True
            meta = next((a for a in (*args, *kwargs.values()) if isinstance(a, AttentionMetadata)), None)
            state.decode = meta is not None and meta.is_decode

        def model_end(module, args, kwargs, output):
            state.in_model = False

        def layer_start(index):
            def hook(module, args):
                state.layer = index
            return hook

        def layer_end(module, args, output):
            state.layer = None

        self._handles.append(self.model.register_forward_pre_hook(model_start, with_kwargs=True))
        self._handles.append(self.model.register_forward_hook(model_end, with_kwargs=True))
        for i, layer in enumerate(self.model.model.layers):
            self._handles.append(layer.register_forward_pre_hook(layer_start(i)))
            self._handles.append(layer.register_forward_hook(layer_end))

        for cls in (JITFunction, InterpretedFunction):
            original = cls.run
            self._saved_runs.append((cls, original))

            def run(fn_self, *args, _original=original, **kwargs):
                if not kwargs.get("warmup", False) and not state.in_triton:
                    self._record(getattr(fn_self.fn, "__name__", repr(fn_self.fn)), "triton")
                state.in_triton += 1
                try:
                    return _original(fn_self, *args, **kwargs)
                finally:
                    state.in_triton -= 1

            cls.run = run
        self._mode = _CountTorchOps(self._record, state)
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._mode is not None:
            self._mode.__exit__(*exc)
            self._mode = None
        for cls, original in reversed(self._saved_runs):
            cls.run = original
        self._saved_runs.clear()
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # -- summaries ------------------------------------------------------------------------------------------

    def decode_steps(self) -> int:
        steps = {l.step for l in self._state.launches if l.decode}
        return len(steps)

    def per_layer(self, decode: bool = True) -> Counter:
        """Kernel launches (Triton and torch, not host reads) per decoder layer per step, by kernel name,
        averaged over the counted steps of that kind (decode or prefill)."""
        chosen = [l for l in self._state.launches if l.decode == decode]
        steps = len({l.step for l in chosen})
        counts = Counter(l.name for l in chosen if l.layer is not None and l.kind != "host_read")
        if steps == 0:
            return Counter()
        return Counter({name: n / (steps * self.num_layers) for name, n in counts.items()})

    def decode_launches_per_layer(self) -> float:
        return sum(self.per_layer(decode=True).values())

    def host_reads(self, decode: bool = True) -> int:
        return sum(1 for l in self._state.launches if l.decode == decode and l.kind == "host_read")
