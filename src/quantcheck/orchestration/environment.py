"""What the numbers were measured on: recorded in every results file and shown in the report."""

from __future__ import annotations

import importlib.metadata
import platform

from quantcheck.schema.results import QUANTCHECK_VERSION

_LIBRARIES = (
    "torch",
    "transformers",
    "accelerate",
    "bitsandbytes",
    "torchao",
    "optimum-quanto",
    "hqq",
    "safetensors",
    "numpy",
)


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in _LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def describe_environment(device: str, threads: int) -> dict[str, object]:
    import torch

    info: dict[str, object] = {
        "quantcheck": QUANTCHECK_VERSION,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": threads,
        "device": device,
        "libraries": library_versions(),
    }
    if device == "cuda":
        properties = torch.cuda.get_device_properties(0)
        info.update(
            gpu_name=properties.name,
            gpu_memory_bytes=properties.total_memory,
            cuda_runtime=torch.version.cuda,
            gpu_driver=_nvidia_driver(),
        )
    return info


def _nvidia_driver() -> str | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else version
    except Exception:  # NVML missing or unusable: the driver is then unknown, not an error
        return None


def free_memory(device: str) -> int | None:
    """Bytes free for a model's weights now: the GPU's free memory, or the machine's available memory on CPU."""
    if device == "cuda":
        import torch

        return torch.cuda.mem_get_info()[0]
    import psutil

    return psutil.virtual_memory().available
