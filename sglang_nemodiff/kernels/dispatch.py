"""Where a kernel runs: the Triton kernel on CUDA tensors, or on CPU under the Triton interpreter
(TRITON_INTERPRET=1); its PyTorch reference otherwise (Triton has no CPU backend outside the
interpreter). The variable is read here when called, but Triton itself fixes interpreter mode
when it is imported and when a `@triton.jit` function is defined, so it only works if set before
the process imports triton: tests set it in the environment of the server or worker process they
start, never in their own."""

from __future__ import annotations

import os

import torch


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(tensor: torch.Tensor) -> bool:
    return tensor.is_cuda or triton_interpreting()


def select(kernel, reference, tensor: torch.Tensor):
    """`kernel` if it can run on `tensor`'s device, else `reference`."""
    return kernel if use_triton(tensor) else reference
