"""Weight bytes counted tensor by tensor, and peak memory tracked phase by phase.

`model.get_memory_footprint()` multiplies each parameter's logical numel by its logical element size:
it reports fp32 sizes for torchao/quanto tensor subclasses and misses quantization state that lives
outside parameters (bitsandbytes `quant_state`, HQQ `meta`). Here every real tensor is visited once.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import psutil
import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from quantcheck.schema.results import WeightMemory

if TYPE_CHECKING:
    from torch import nn

FOOTPRINT_TOLERANCE = 0.02
RSS_INTERVAL_S = 0.005


def count_weight_bytes(model: nn.Module) -> WeightMemory:
    """Count the real bytes of every tensor the model holds, and compare with get_memory_footprint."""
    has_subclass = False
    has_side_state = False
    tensors: list[torch.Tensor] = []
    for tensor in _held_tensors(model):
        has_subclass |= is_traceable_wrapper_subclass(tensor)
        tensors.extend(_storage_tensors(tensor))
    for side in _side_state_tensors(model):
        has_side_state = True
        tensors.extend(_storage_tensors(side))
    counted = _unique_bytes(tensors)
    parameters = logical_parameter_count(model)
    footprint, footprint_error = _footprint(model)
    agrees = footprint is not None and abs(footprint - counted) <= FOOTPRINT_TOLERANCE * counted
    return WeightMemory(
        counted_bytes=counted,
        footprint_bytes=footprint,
        parameters=parameters,
        bits_per_parameter=8 * counted / parameters if parameters else 0.0,
        footprint_agrees=agrees,
        note=None if agrees else _disagreement_note(counted, footprint, footprint_error, has_subclass, has_side_state),
    )


def logical_parameter_count(model: nn.Module) -> int:
    """Parameters of the float model: packed storage is converted back to the shape it encodes."""
    hqq_shapes = {id(module.W_q): module.meta["shape"] for module in model.modules() if _is_hqq(module)}
    total = 0
    for parameter in model.parameters():
        quant_state = getattr(parameter, "quant_state", None)
        if quant_state is not None and getattr(quant_state, "shape", None) is not None:  # bnb Params4bit
            total += torch.Size(quant_state.shape).numel()
        elif id(parameter) in hqq_shapes:
            total += torch.Size(hqq_shapes[id(parameter)]).numel()
        else:  # plain tensors and subclasses: numel() is the logical element count
            total += parameter.numel()
    return total


def _held_tensors(model: nn.Module) -> Iterator[torch.Tensor]:
    yield from model.parameters()
    yield from model.buffers()


def _side_state_tensors(model: nn.Module) -> Iterator[torch.Tensor]:
    """Quantization state that lives outside parameters and buffers."""
    for parameter in model.parameters():
        quant_state = getattr(parameter, "quant_state", None)  # bnb 4-bit: absmax, code, offset, state2
        if quant_state is not None:
            yield from _tensors_in(vars(quant_state))
        for name in ("CB", "SCB"):  # bnb int8: CB usually shares the weight's storage
            value = getattr(parameter, name, None)
            if isinstance(value, torch.Tensor):
                yield value
    for module in model.modules():
        state = getattr(module, "state", None)  # bnb Linear8bitLt: its first forward moves SCB off the weight to here
        if type(state).__name__ == "MatmulLtState":
            yield from (value for value in (state.CB, state.SCB) if isinstance(value, torch.Tensor))
        if _is_hqq(module):  # HQQLinear: scales/zeros (possibly quantized themselves) and a plain bias
            yield from _tensors_in(module.meta)
            if isinstance(module.__dict__.get("bias"), torch.Tensor):
                yield module.__dict__["bias"]


def _is_hqq(module: nn.Module) -> bool:
    return hasattr(module, "W_q") and isinstance(getattr(module, "meta", None), dict)


def _tensors_in(value: Any) -> Iterator[torch.Tensor]:
    """Tensors inside nested dicts, lists and state objects (bnb QuantState nests its state2)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors_in(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors_in(item)
    elif type(value).__name__ == "QuantState":
        yield from _tensors_in(vars(value))


def _storage_tensors(tensor: torch.Tensor) -> Iterator[torch.Tensor]:
    """The plain tensors that really hold memory, flattening tensor subclasses recursively."""
    if is_traceable_wrapper_subclass(tensor):
        names, _ = tensor.__tensor_flatten__()
        for name in names:
            inner = getattr(tensor, name)
            if inner is not None:
                yield from _storage_tensors(inner)
    else:
        yield tensor


def _unique_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes covered by the tensors, each storage byte once (tied embeddings, views, CB aliases)."""
    spans: dict[tuple[str, int], list[tuple[int, int]]] = {}
    for tensor in tensors:
        if tensor.device.type == "meta" or tensor.numel() == 0:
            continue
        storage = tensor.untyped_storage()
        size = tensor.element_size()
        extent = 1 + sum((dim - 1) * abs(stride) for dim, stride in zip(tensor.shape, tensor.stride()))
        start = tensor.storage_offset() * size
        spans.setdefault((str(tensor.device), storage.data_ptr()), []).append((start, start + extent * size))
    total = 0
    for intervals in spans.values():
        end = -1
        for low, high in sorted(intervals):
            if high > end:
                total += high - max(low, end)
                end = high
    return total


def _footprint(model: nn.Module) -> tuple[int | None, str | None]:
    try:
        return int(model.get_memory_footprint()), None
    except Exception as error:  # any failure just means there is no second opinion
        return None, f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


def _disagreement_note(
    counted: int, footprint: int | None, error: str | None, has_subclass: bool, has_side_state: bool
) -> str:
    if footprint is None:
        return f"get_memory_footprint failed ({error}); counted bytes are the only figure"
    if has_subclass and footprint > counted:
        return (
            "get_memory_footprint ignores tensor-subclass payloads (it sizes torchao/quanto weights by their "
            "logical float dtype); counted bytes are right"
        )
    if has_side_state and footprint < counted:
        return (
            "get_memory_footprint misses quantization state held outside parameters (bitsandbytes quant_state, "
            "HQQ meta scales/zeros); counted bytes are right"
        )
    return (
        "get_memory_footprint sums logical numel x element size of parameters and buffers; counted bytes flatten "
        "tensor subclasses, add quantization state and deduplicate shared storage, so counted bytes are right"
    )


@dataclass
class PhasePeak:
    """Peak memory of one phase, filled in when the phase ends (reserved only on CUDA)."""

    name: str
    peak_bytes: int | None = None
    reserved_bytes: int | None = None


class PeakMemoryTracker:
    """Peak memory per phase: CUDA allocator peaks, or process RSS sampled in a background thread.

    On CPU the peak is the whole process's resident memory (weights, activations, the Python runtime),
    sampled every 5 ms and reset at each phase start; `ru_maxrss` cannot be reset, so it is not used.
    Each phase starts by collecting garbage and, on CPU, handing freed heap memory back to the OS
    (glibc keeps it otherwise), so that leftovers of an earlier phase, such as the float weights freed after quantizing,
    are not counted again. Use as a context manager so the sampling thread stops.
    """

    def __init__(
        self, device: str | torch.device, interval_s: float = RSS_INTERVAL_S, process_tree: bool = False
    ) -> None:
        self.device = torch.device(device)
        self.process_tree = process_tree  # engines that start worker processes (vLLM): count their RSS too
        self.interval_s = interval_s
        self._cuda = self.device.type == "cuda"
        self._process = psutil.Process()
        self._lock = threading.Lock()
        self._peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def method(self) -> str:
        """How memory is measured, for `ModelCost.memory_method`."""
        if self._cuda:
            return "cuda-max-allocated"
        return f"rss-{'process-tree-' if self.process_tree else ''}sampled-{round(self.interval_s * 1000)}ms"

    def __enter__(self) -> PeakMemoryTracker:
        if not self._cuda:
            self._peak = self._sample()
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    @contextmanager
    def phase(self, name: str) -> Iterator[PhasePeak]:
        """Reset the peak, run the block, and record the block's peak even if it raised."""
        result = PhasePeak(name)
        self._reset()
        try:
            yield result
        finally:
            result.peak_bytes = self.peak_so_far()
            if self._cuda:
                result.reserved_bytes = int(torch.cuda.max_memory_reserved(self.device))

    def peak_so_far(self) -> int:
        """The current phase's peak up to now (CPU: including a fresh sample)."""
        if self._cuda:
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device))
        if self._thread is None:
            raise RuntimeError("PeakMemoryTracker must be entered (`with tracker:`) before measuring on CPU")
        return self._record(self._sample())

    def _reset(self) -> None:
        release_freed_memory()
        if self._cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            with self._lock:
                self._peak = self._sample()

    def _sample(self) -> int:
        rss = self._process.memory_info().rss
        if self.process_tree:
            for child in self._process.children(recursive=True):
                try:
                    rss += child.memory_info().rss
                except psutil.Error:  # a child that just exited
                    pass
        return int(rss)

    def _record(self, rss: int) -> int:
        with self._lock:
            self._peak = max(self._peak, rss)
            return self._peak

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._record(self._sample())


def _find_malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim
    except (OSError, AttributeError, TypeError):  # not glibc (macOS, musl): nothing to trim
        return None


_MALLOC_TRIM = _find_malloc_trim()


def release_freed_memory() -> None:
    """Collect garbage and return freed heap pages to the OS, so RSS shows live memory again."""
    gc.collect()
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


@contextmanager
def tracking(device: str | torch.device, tracker: PeakMemoryTracker | None) -> Iterator[PeakMemoryTracker]:
    """The caller's running tracker, or a fresh one for the duration of the block."""
    if tracker is not None:
        yield tracker
        return
    with PeakMemoryTracker(device) as own:
        yield own
