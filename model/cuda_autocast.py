"""CUDA autocast's typing rules, applied to CPU tensors: see on CPU the dtypes a GPU run gets.

CPU and CUDA autocast cast different ops: `rms_norm`, `softmax`, `exp` and the losses run in
float32 under CUDA autocast but not under CPU autocast, and CPU autocast casts a few ops
(`cat`, `stack`, the linear algebra) that CUDA leaves alone. A model tested only under CPU
autocast can therefore feed a GPU kernel a dtype mix that no CPU run ever produces.

Inside `cuda_autocast_policy()`, `torch.autocast("cpu", dtype)` follows CUDA's rules:
- every op with a CUDA autocast kernel gets a CPU autocast kernel that casts its floating
  point inputs the way CUDA's does. Which cast that is, is read off CUDA's own kernel: the op
  runs once per input-dtype signature on fake CUDA tensors (FakeTensorMode: shapes and
  dtypes, no data, no GPU) with CUDA autocast on, and the dtype it returns is the dtype the
  inputs are cast to (lower precision, float32, or the widest input);
- ops that only CPU autocast casts fall through uncast, as on CUDA.
The real computation then runs on CPU with those casts, so values, gradients and optimizer
steps are real and typed as on CUDA.
"""
import contextlib
import threading
import warnings

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._pytree import tree_flatten, tree_map


class UnsupportedOp(RuntimeError):
    """CUDA's autocast rule for this op could not be read on a fake CUDA tensor."""


def ops_with_autocast_kernel(dispatch_key):
    """Names ('aten::mm', 'aten::sum.dim_IntList') of the ops that `dispatch_key` casts."""
    return {name for name in torch._C._dispatch_get_all_op_names()
            if torch._C._dispatch_has_kernel_for_dispatch_key(name, dispatch_key)}


def _overload(name):
    namespace, _, rest = name.partition("::")
    base, _, overload = rest.partition(".")
    return getattr(getattr(getattr(torch.ops, namespace), base), overload or "default")


def _signature(args, kwargs):
    """What CUDA's cast depends on: the dtype of each tensor, and any dtype argument."""
    leaves, _ = tree_flatten((args, kwargs))
    return tuple(x.dtype if isinstance(x, torch.Tensor) else x if isinstance(x, torch.dtype) else None
                 for x in leaves)


def _fake_cuda(x):
    return torch.empty(x.shape, dtype=x.dtype, device="cuda") if isinstance(x, torch.Tensor) else x


def cuda_output_dtype(op, args, kwargs, dtype):
    """The dtype of `op`'s first floating output under CUDA autocast to `dtype`, on fake CUDA tensors."""
    was_enabled, was_dtype = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    try:
        with FakeTensorMode():
            fake_args, fake_kwargs = tree_map(_fake_cuda, (args, kwargs))
            torch.set_autocast_enabled("cuda", True)
            torch.set_autocast_dtype("cuda", dtype)
            out = op(*fake_args, **fake_kwargs)
    except Exception as e:  # noqa: BLE001 - any failure means the rule is unknown for this call
        raise UnsupportedOp(f"cannot read CUDA autocast's rule for {op} on fake CUDA tensors: "
                            f"{type(e).__name__}: {e}") from e
    finally:
        torch.set_autocast_enabled("cuda", was_enabled)
        torch.set_autocast_dtype("cuda", was_dtype)
    outputs, _ = tree_flatten(out)
    floating = [o.dtype for o in outputs if isinstance(o, torch.Tensor) and o.is_floating_point()]
    return floating[0] if floating else None


_lock = threading.Lock()
_NO_CPU_AUTOCAST = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)


def _cuda_rule_kernel(name, cache):
    op = _overload(name)

    def kernel(*args, **kwargs):
        dtype = torch.get_autocast_dtype("cpu")
        key = (dtype, _signature(args, kwargs))
        if key not in cache:
            cache[key] = cuda_output_dtype(op, args, kwargs, dtype)
        target = cache[key]

        def cast(x):
            if target is not None and isinstance(x, torch.Tensor) and x.is_floating_point():
                return x.to(target)
            return x

        # As CUDA's kernel does: ops called inside this one are not cast again.
        with torch._C._ExcludeDispatchKeyGuard(_NO_CPU_AUTOCAST):
            cast_args, cast_kwargs = tree_map(cast, (args, kwargs))
            return op(*cast_args, **cast_kwargs)

    return kernel


@contextlib.contextmanager
def cuda_autocast_policy():
    """Within this context, CPU autocast casts exactly as CUDA autocast does (see the module doc)."""
    with _lock:
        library = torch.library.Library("aten", "IMPL")
        cuda_ops = ops_with_autocast_kernel("AutocastCUDA")
        cpu_ops = ops_with_autocast_kernel("AutocastCPU")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "overriding a previously registered kernel": the point here
            for name in sorted(cuda_ops):
                library.impl(name.split("::", 1)[1], _cuda_rule_kernel(name, {}), "AutocastCPU")
            for name in sorted(cpu_ops - cuda_ops):
                library.impl(name.split("::", 1)[1], torch.library.fallthrough_kernel, "AutocastCPU")
    try:
        yield
    finally:
        with _lock:
            library._destroy()  # CPU autocast's own kernels are back
