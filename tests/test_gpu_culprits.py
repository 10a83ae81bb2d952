"""Callers past the driver: pinned host memory is mapped inside libcuda, under libcudart and a
framework's caching host allocator. The known-culprit patterns must recognise the stacks a tracer
takes there, whatever depth the unwinder reached.

No GPU here, so the stacks are built from the real names: torch's CUDACachingHostAllocatorImpl
(aten/src/ATen/cuda/CachingHostAllocator.cpp, both allocation paths: cudaHostAlloc and
malloc + cudaHostRegister), libcudart's and libcuda's exported entry points, the sonames of the
CUDA 13 wheels torch 2.11 loads, and a driver installed under its full version.
"""

from __future__ import annotations

import pytest

from leakhunt.analysis.culprits import match
from leakhunt.proc.classes import RegionClass
from leakhunt.trace.events import Frame

LIBC = "/usr/lib/x86_64-linux-gnu/libc.so.6"
LIBCUDA = "/usr/lib/x86_64-linux-gnu/libcuda.so.1"
LIBCUDART = "/opt/venv/lib/python3.12/site-packages/nvidia/cu13/lib/libcudart.so.13"
TORCH_CUDA = "/opt/venv/lib/python3.12/site-packages/torch/lib/libtorch_cuda.so"
TORCH_CPU = "/opt/venv/lib/python3.12/site-packages/torch/lib/libtorch_cpu.so"

# torch's host allocator, mangled as the dynamic symbol table has them and demangled as gdb shows them.
SLOWPATH = "_ZN2at4cuda12_GLOBAL__N_128CUDACachingHostAllocatorImpl29allocate_host_memory_slowpathEmPPv"
SLOWPATH_DEMANGLED = (
    "at::cuda::(anonymous namespace)::CUDACachingHostAllocatorImpl::"
    "allocate_host_memory_slowpath(unsigned long, void**)"
)
REGISTER = "_ZN2at4cuda12_GLOBAL__N_128CUDACachingHostAllocatorImpl25allocWithCudaHostRegisterEPPvm"
ALLOCATE = (
    "at::CachingHostAllocatorImpl<c10::cuda::CUDAStream, std::unique_ptr<at::cuda::CUDAEvent, "
    "std::function<void (at::cuda::CUDAEvent*)> > >::allocate(unsigned long)"
)
PIN_MEMORY = "at::native::_pin_memory(at::Tensor const&, std::optional<c10::Device>)"


def _id(klass: RegionClass, caller: Frame | None, *stack: Frame) -> str | None:
    known = match(klass, caller, tuple(stack))
    return known.id if known else None


def test_pinned_mapping_named_by_libcuda_caller_alone():
    """A BPF stack without frame pointers stops in the driver: the caller's module is enough."""
    caller = Frame(0x7F3A1C2B4D10, LIBCUDA, None, 0x2B4D10)  # stripped driver internals
    assert _id(RegionClass.PINNED, caller) == "cuda-pinned-host"


@pytest.mark.parametrize("soname", ["libcuda.so.1", "libcuda.so.580.159.04", "libcuda.so"])
def test_driver_under_any_soname(soname):
    caller = Frame(0x7F0000001000, f"/usr/local/nvidia/lib64/{soname}", "cuGetProcAddress_v2", 0x8F21C)
    assert _id(RegionClass.PINNED, caller) == "cuda-pinned-host"


@pytest.mark.parametrize("slowpath", [SLOWPATH, SLOWPATH_DEMANGLED])
def test_torch_cudahostalloc_path_full_stack(slowpath):
    """gdb's full stack of torch.empty(n, pin_memory=True): mmap in libcuda, under cudaHostAlloc."""
    stack = (
        Frame(0x7F3A20A1C6E0, LIBC, "mmap64", 0x30),
        Frame(0x7F3A1C2B4D10, LIBCUDA, None, 0x2B4D10),
        Frame(0x7F3A1C1A0F00, LIBCUDA, "cuMemHostAlloc", 0x1F0),
        Frame(0x7F3A1E04C2A0, LIBCUDART, "cudaHostAlloc", 0xB0),
        Frame(0x7F3A0B9C8E10, TORCH_CUDA, slowpath, 0x1A2),
        Frame(0x7F3A0B9C9F00, TORCH_CUDA, ALLOCATE, 0x3C4),
        Frame(0x7F3A0D112000, TORCH_CPU, PIN_MEMORY, 0x98),
    )
    assert _id(RegionClass.PINNED, stack[1], *stack) == "cuda-pinned-host"


def test_statically_linked_cudart_inside_libtorch_cuda():
    """Builds that link cudart statically: the runtime's frames are libtorch_cuda.so's."""
    caller = Frame(0x7F3A0B000100, TORCH_CUDA, "cudaMallocHost", 0x40)
    assert _id(RegionClass.PINNED, caller) == "cuda-pinned-host"


def test_cumemallochost_driver_entry_point():
    """cudaMallocHost goes through the driver's cuMemAllocHost_v2."""
    stack = (
        Frame(0x7F3A1C2B4D10, LIBCUDA, None, 0x2B4D10),
        Frame(0x7F3A1C1A1000, LIBCUDA, "cuMemAllocHost_v2", 0x88),
    )
    assert _id(RegionClass.PINNED, None, *stack) == "cuda-pinned-host"


def test_cuda_host_register_path_named_by_the_host_allocator():
    """PYTORCH_CUDA_ALLOC_CONF=pinned_use_cuda_host_register:True mallocs, touches and then
    page-locks: the mapping is ordinary anonymous memory mapped by malloc, and the allocator that
    keeps it is further up the stack."""
    stack = (
        Frame(0x7F3A20A1C6E0, LIBC, "mmap64", 0x30),
        Frame(0x7F3A20A90A10, LIBC, "sysmalloc", 0x3A0),
        Frame(0x7F3A20A91C20, LIBC, "malloc", 0x1E0),
        Frame(0x7F3A0B9C7A30, TORCH_CUDA, REGISTER, 0x5C),
        Frame(0x7F3A0B9C8E10, TORCH_CUDA, SLOWPATH, 0x1A2),
    )
    assert _id(RegionClass.ANON, stack[1], *stack) == "cuda-host-register"


def test_plain_malloc_is_still_glibc():
    """The register entry needs the host allocator's frames: an mmap from malloc alone is glibc's."""
    stack = (Frame(0x7F3A20A90A10, LIBC, "sysmalloc", 0x3A0), Frame(0x7F3A20A91C20, LIBC, "malloc", 0x1E0))
    assert _id(RegionClass.ANON, stack[0], *stack) == "glibc-malloc"


def test_driver_frames_do_not_claim_shared_memory_elsewhere():
    """A /dev/zero mapping in a process without GPU mappings is shm, not pinned."""
    caller = Frame(0x7F3A1C2B4D10, LIBCUDA, None, 0x2B4D10)
    assert _id(RegionClass.SHM, caller) != "cuda-pinned-host"
