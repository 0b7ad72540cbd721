"""Run megatron-core's pipeline schedules, DistributedDataParallel and (distributed) optimizer on a CPU
torch over gloo, as the test suite does. On a machine with CUDA every function here is a no-op.

megatron-core 0.16 assumes CUDA in a few places on these paths (recorded by running them on CPU):
  schedules.py          total_num_tokens = torch.zeros(..., device="cuda")
  p2p_communication.py  receive buffers on torch.cuda.current_device(); torch.cuda.synchronize()
  param_and_grad_buffer grad / param buffers on torch.cuda.current_device()
  optimizer.py, clip_grads.py, utils.py     torch.tensor(..., device="cuda")
  distrib_optimizer.py, clip_grads.py       param.type() == "torch.cuda.FloatTensor" checks
Three narrow remedies, none of which edits megatron or patches torch itself:
  1. `megatron_cpu_mode()`: a TorchFunctionMode (torch's own extension point, active only inside the
     `with`) that maps device="cuda" to CPU and reports CPU tensor types under their CUDA names.
  2. The `torch` global of the megatron modules that look the device up (param_and_grad_buffer, the
     distributed optimizer's checkpoint gather, and for sequence parallelism tensor_parallel.mappings /
     layers and utils' global memory buffer) is replaced by
     a view of torch whose cuda.current_device() is the CPU (a lookup a TorchFunctionMode cannot see);
     megawan.checkpoint does the same for dist_checkpointing's async_utils (its all-reduces and the
     torch.cuda.synchronize() before forking a background checkpoint writer) through redirect_module_cuda.
  3. `CpuP2PCommunicator`: megatron's P2P communicator with CPU receive buffers, passed to the schedule
     as an argument. It sends the two directions unbatched: with PP=2 both neighbours are one rank, and
     batched gloo sends to it with one tag can swap an activation with a gradient.
"""

from __future__ import annotations

import contextlib
import types

import torch
from torch.overrides import TorchFunctionMode

from megawan.capabilities import cuda_available


def _is_cuda(device) -> bool:
    if isinstance(device, int) and not isinstance(device, bool):
        return True  # a device index means a CUDA device
    return isinstance(device, (str, torch.device)) and torch.device(device).type == "cuda"


class _CudaToCpuMode(TorchFunctionMode):
    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:  # staging copies "to the GPU" stay where they are
            return args[0]
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]) and not isinstance(args[1], int):
            args = (args[0], "cpu", *args[2:])
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs = dict(kwargs, device="cpu")
        out = func(*args, **kwargs)
        if func is torch.Tensor.type and len(args) == 1 and not kwargs and isinstance(out, str) \
                and out.startswith("torch.") and not out.startswith("torch.cuda."):
            out = "torch.cuda." + out[len("torch."):]
        return out


class _CpuCuda(types.ModuleType):
    current_device = staticmethod(lambda: torch.device("cpu"))
    synchronize = staticmethod(lambda *args, **kwargs: None)

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


class _TorchWithCpuCuda(types.ModuleType):
    cuda = _CpuCuda("torch.cuda")

    def __getattr__(self, name):
        return getattr(torch, name)


def _redirect_module_cuda(*modules) -> None:
    for module in modules:
        if not isinstance(module.torch, _TorchWithCpuCuda):
            module.torch = _TorchWithCpuCuda("torch")


def redirect_module_cuda(module) -> None:
    """Remedy 2 for one more megatron module (a no-op where CUDA is): its torch.cuda.current_device() is the
    CPU and torch.cuda.synchronize() does nothing."""
    if not cuda_available():
        _redirect_module_cuda(module)


_ACTIVE = {"depth": 0}


def cpu_mode_active() -> bool:
    return _ACTIVE["depth"] > 0


@contextlib.contextmanager
def megatron_cpu_mode():
    """Wrap model wrapping (DDP), optimizer construction, the schedule call and the optimizer step."""
    if cuda_available():
        yield
        return
    from megatron.core import utils as megatron_utils
    from megatron.core.distributed import param_and_grad_buffer
    from megatron.core.optimizer import distrib_optimizer
    from megatron.core.tensor_parallel import layers, mappings

    _redirect_module_cuda(param_and_grad_buffer, mappings, layers, megatron_utils, distrib_optimizer)
    _ACTIVE["depth"] += 1
    try:
        with _CudaToCpuMode():
            yield
    finally:
        _ACTIVE["depth"] -= 1


def p2p_communicator(pp_group, config):
    """The P2P communicator to hand to megatron's pipeline schedules on this machine."""
    from megatron.core.pipeline_parallel import p2p_communication as p2p

    if cuda_available():
        return p2p.P2PCommunicator(pp_group, config)

    class CpuP2PCommunicator(p2p.P2PCommunicator):
        def _communicate(self, *, tensor_send_next, tensor_send_prev, recv_prev, recv_next, tensor_shape,
                         wait_on_reqs=True):
            if self.config.variable_seq_lengths or self.config.use_ring_exchange_p2p:
                raise ValueError("variable sequence lengths / ring-exchange P2P are not supported on CPU")

            def buffer():
                return torch.empty(tensor_shape, requires_grad=True, dtype=self.config.pipeline_dtype)

            recv_prev_t = buffer() if recv_prev else None
            recv_next_t = buffer() if recv_next else None
            reqs = p2p._p2p_ops(
                tensor_send_prev=tensor_send_prev, tensor_recv_prev=recv_prev_t, tensor_send_next=tensor_send_next,
                tensor_recv_next=recv_next_t, group=self.pp_group, prev_pipeline_rank=self.prev_rank,
                next_pipeline_rank=self.next_rank,
            )
            if wait_on_reqs and reqs:
                for req in (reqs.values() if isinstance(reqs, dict) else reqs):
                    req.wait()
                reqs = None
            return recv_prev_t, recv_next_t, reqs

    return CpuP2PCommunicator(pp_group, config)
