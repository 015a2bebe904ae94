"""
Group-parallel EPTS: one optimisation computed by K processes under torchrun (as gpt-fast keeps tp.py apart).

The G groups of a training step are independent passes over the same batch, so group g goes to process
g % K; group 0's output is broadcast (the other groups' second target) and the adapter gradients are summed
before the step, so every process takes the step one process would take. Passes without gradients (the dense
target, the low-group check, the mixer) split the windows, whole batches per process, and exchange results.

SOLO (one process, no torchrun) makes every exchange a no-op and never initialises torch.distributed.
"""

import math
import os
import sys

import torch
import torch.distributed as dist

import prune


class Procs:
    """The processes that compute one EPTS optimisation together; this one is number `index` of `size`."""

    def __init__(self, index=0, size=1, device="cpu"):
        self.index, self.size = index, size
        self.comm = torch.device(device)  # NCCL exchanges CUDA tensors, gloo CPU ones

    @classmethod
    def from_env(cls, device):
        """The torchrun processes (WORLD_SIZE, RANK, LOCAL_RANK in the environment), else SOLO. On CUDA each
        process takes the GPU of its LOCAL_RANK."""
        if int(os.environ.get("WORLD_SIZE", "1")) == 1:
            return cls()
        if str(device).startswith("cuda"):
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), device)

    def owns(self, g):
        return g % self.size == self.index

    def windows(self, n, batch_size, index=None):
        """The windows [lo, hi) of n that a process passes through a block: a contiguous run of whole batches, so
        every batch is the one a single process would form."""
        index = self.index if index is None else index
        n_batches = math.ceil(n / batch_size)
        return tuple(min(n, n_batches * i // self.size * batch_size) for i in (index, index + 1))

    def exchange(self, t, op):
        """op(buffer) on a copy of t on the backend's device (NCCL: CUDA, gloo: CPU), the result back in t."""
        if self.size > 1 and t.numel():
            buf = t.to(self.comm)
            op(buf)
            t.copy_(buf)
        return t

    def broadcast(self, t, src):
        """t from process `src` to every process, in place, wherever t lives."""
        return self.exchange(t, lambda buf: dist.broadcast(buf, src))

    def sum(self, t):
        """The sum of t over the processes, in place, wherever t lives."""
        return self.exchange(t, dist.all_reduce)

    def share(self, obj):
        """Process 0's (picklable) object, on every process."""
        if self.size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self.comm)
        return box[0]

    def share_group0(self, out0, like):
        """Group 0's output (detached), from the process that computed it to every process."""
        if self.size == 1:
            return out0
        return self.broadcast(out0 if self.owns(0) else torch.empty_like(like), src=0)

    def share_windows(self, X, batch_size):
        """Each process's windows of X (N, T, C), as it computed them, to every process."""
        for index in range(self.size if self.size > 1 else 0):
            lo, hi = self.windows(X.shape[0], batch_size, index)
            self.broadcast(X[lo:hi], index)
        return X

    def map_batches(self, fn, X, batch_size):
        """fn(i, X[i:i + batch_size]) for this process's batches of X (N, T, C); every process ends with all N
        outputs, in X's dtype and place."""
        out = torch.empty_like(X)
        lo, hi = self.windows(X.shape[0], batch_size)
        for i in range(lo, hi, batch_size):
            out[i:i + batch_size] = fn(i, X[i:i + batch_size]).to(out.device, out.dtype)
        return self.share_windows(out, batch_size)

    def run_block(self, block, X, device, batch_size, stats=None):
        """prune.run_block over this process's windows, the outputs exchanged and the input statistics summed."""
        lo, hi = self.windows(X.shape[0], batch_size)
        Y = torch.empty_like(X)
        Y[lo:hi] = prune.run_block(block, X[lo:hi], device, batch_size, stats)
        for s in (stats or {}).values():
            self.sum(s.sq)
        return self.share_windows(Y, batch_size)

    def sum_gradients(self, params, loss):
        """One all-reduce per step: every adapter gradient flattened into one buffer (G r (in + out) floats per
        layer), the step's loss at its end. Returns the summed loss, a 0-d tensor where the loss was."""
        if self.size == 1:
            return loss
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = self.sum(torch.cat([g.reshape(-1) for g in grads] + [loss.reshape(1).to(grads[0].device)]))
        for p, g in zip(params, flat[:-1].split([p.numel() for p in params])):
            p.grad = g.view_as(p)
        return flat[-1].to(loss.device)

    def check_same(self, params):
        """The adapters are bit-identical on every process (the same summed gradients, the same Adam): checked
        once per block, as cheap insurance against a silent divergence."""
        if self.size > 1:
            flat = torch.cat([p.detach().reshape(-1) for p in params])
            if not torch.equal(self.broadcast(flat.clone(), 0), flat):
                raise RuntimeError(f"process {self.index}: adapters differ from process 0's after the same steps")


SOLO = Procs()


def exit_process(code):
    """Exit with `code`. Under torchrun the interpreter's teardown is skipped: a gloo worker thread may still be
    dropping the last collective's tensors, and its taking the GIL during finalisation aborts the process
    (pytorch/pytorch#179291). Every file has been written and closed by then."""
    if dist.is_available() and dist.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
