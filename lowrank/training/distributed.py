"""Data-parallel training over MPI (mpi4py): every rank holds the whole model (the frozen base
too), takes its shard of each global minibatch, and ONE Allreduce per step sums the gradients
of the trainable parameters, so every rank steps the same optimizer to the same parameters.

Why the weighting is exact. A mean-reduced loss over rank k's n_k rows gives the gradient
g_k = (1/n_k) Σ_{i∈k} ∇ℓ_i. The single-process gradient of the global batch of n = Σ_k n_k rows is

    g = (1/n) Σ_i ∇ℓ_i = Σ_k (n_k / n) · g_k,

so each rank scales its gradient by n_k / n before the sum. Uneven shards (n not divisible by
the ranks, or a rank with no rows at all in a short last batch) come out right; only the
summation order differs from one process, so parameters agree to float64 rounding.

The buffer of one step, in the trainable parameters' dtype, summed in one Allreduce:

    [ n_errors | Σ_k loss_k·n_k | has_grad_1 … has_grad_P | g_1 (flattened) | … | g_P ]
      └──────────────── HEADER = 2 + P numbers ───────────────┘

Bytes per step: (2 + P + Σ_p size_p) × itemsize. The header rides along for free: the error
count tells every rank in the same call that some rank failed (one allgather of the messages
follows, then every rank raises DistributedError naming the failed ranks: no rank hangs);
the loss sum is the global training loss; has_grad_p > 0 says some rank produced a gradient
for p (a parameter nobody used keeps ``grad = None``, as in single-process ``fit``).
LoRA sends r·(D_in + D_out) numbers per adapted layer where full fine-tuning sends
D_in·D_out + D_out.

mpi4py is imported only when a communicator is needed (``world()``), so ``import lowrank``
works without MPI; install it with ``pip install 'lowrank[mpi]'`` (mpi4py + mpich).
"""
from __future__ import annotations

import hashlib
import sys
import time
import traceback
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import numpy as np

from ..nn.device import device_of, to_device
from ..tuners.lora.layer import LoraLinear
from ..nn.losses import Loss
from .loop import History, fit, targets_for

FIXED_HEADER = 2          # n_errors, Σ loss·n_k; then one has-gradient count per trainable parameter


def _mpi():
    """The mpi4py.MPI module, imported on first use (importing it starts MPI)."""
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise ImportError("lowrank.training.distributed needs mpi4py and an MPI library: "
                          "pip install 'lowrank[mpi]' (mpi4py + mpich)") from e
    return MPI


def world():
    """MPI.COMM_WORLD: every process started by ``mpiexec -n K``."""
    return _mpi().COMM_WORLD


def shard_bounds(n: int, rank: int, size: int) -> tuple[int, int]:
    """Rows [lo, hi) of an n-row global batch that ``rank`` of ``size`` takes (the first n % size ranks take one more)."""
    q, extra = divmod(n, size)
    lo = rank * q + min(rank, extra)
    return lo, lo + q + (rank < extra)


def allreduce_nbytes(params, dtype=None) -> int:
    """Closed form of one step's Allreduce: (2 + P + Σ sizes) × itemsize of the trainable ``params``."""
    dtype = np.result_type(*[p.dtype for p in params]) if dtype is None else np.dtype(dtype)
    return (FIXED_HEADER + len(params) + sum(p.size for p in params)) * dtype.itemsize


class DistributedError(RuntimeError):
    """Raised on every rank, in the same step, when any rank failed; names each failed rank."""


@dataclass
class CommStats:
    """What the communication cost; the tests and the benchmark read these."""

    allreduce_calls: int = 0      # one per training step
    allreduce_bytes: int = 0      # summed over calls
    other_calls: int = 0          # setup broadcasts, sync checks, error gathers (not per step)
    steps: int = 0
    comm_seconds: float = 0.0     # inside Allreduce, waiting for slower ranks included
    compute_seconds: float = 0.0  # forward + backward + packing + unpacking + optimizer step

    def to_dict(self) -> dict:
        return asdict(self)


class DataParallel:
    """Synchronous data-parallel training of ``model`` over the ranks of ``comm``.

    Parameters
    ----------
    model      a Module with forward/backward (a LoraModel, an MLP, ...); the same on every rank
    optimizer  over ``model``'s trainable parameters (SGD, Adam, AdamW)
    loss_fn    a mean-reduced Loss (BCEWithLogitsLoss, CrossEntropyLoss, MSELoss)
    comm       an mpi4py communicator; ``world()`` when None
    """

    def __init__(self, model, optimizer, loss_fn: Loss, comm=None):
        self.params = [p for _, p in model.named_parameters() if p.trainable]
        if not self.params:
            raise ValueError(f"DataParallel: {model.label} has no trainable parameters, nothing to all-reduce")
        self._MPI = _mpi()
        self.comm = world() if comm is None else comm
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.dtype = np.result_type(*[p.dtype for p in self.params])
        head = FIXED_HEADER + len(self.params)
        self.bounds = np.cumsum([head] + [p.size for p in self.params])       # g_p lives in [bounds[p], bounds[p+1])
        self.buffer = np.zeros(int(self.bounds[-1]), self.dtype)               # (2 + P + Σ sizes,) host memory
        self.stats = CommStats()
        self._split_dropout_streams()

    @property
    def is_root(self) -> bool:
        """Rank 0: the one rank that writes files and prints reports."""
        return self.rank == 0

    def _split_dropout_streams(self):
        """Give each rank its own LoRA dropout stream (same seed everywhere would repeat one mask on every shard)."""
        for _, m in self.model.named_modules():
            if isinstance(m, LoraLinear):
                m._rng = np.random.default_rng([int(m._rng.integers(2**62)), self.rank])

    # -- setup and checks (collectives outside the training step) -----------------------
    def broadcast_parameters(self):
        """Copy rank 0's parameters (frozen base included) to every rank: identical starts even
        where ranks pretrained on their own or their BLAS rounds differently."""
        for _, p in self.model.named_parameters():
            host = np.ascontiguousarray(to_device(p.data, "cpu"))
            self.comm.Bcast(host, root=0)
            p.data = to_device(host, device_of(p.data))
            self.stats.other_calls += 1

    def in_sync(self) -> bool:
        """True when every rank holds bit-identical parameters (one allgather of a SHA-256)."""
        digest = hashlib.sha256()
        for _, p in self.model.named_parameters():
            digest.update(np.ascontiguousarray(to_device(p.data, "cpu")).tobytes())
        self.stats.other_calls += 1
        return len(set(self.comm.allgather(digest.hexdigest()))) == 1

    # -- one step ---------------------------------------------------------------------------
    def step(self, X, y, n_global: int) -> float:
        """One synchronous step on this rank's shard of a global batch; returns the global mean loss.

        X, y      this rank's rows (n_k, D_in), (n_k,) (n_k may be 0)
        n_global  rows of the whole global batch, n = Σ_k n_k
        """
        t0 = time.perf_counter()
        self.buffer[:] = 0
        error = None
        try:
            self._local_gradients(X, y, n_global)
        except Exception as e:                               # told to every rank in the Allreduce below
            self.buffer[0] = 1
            error = f"{type(e).__name__}: {e}"
        t1 = time.perf_counter()
        self.comm.Allreduce(self._MPI.IN_PLACE, self.buffer, op=self._MPI.SUM)
        t2 = time.perf_counter()
        self.stats.allreduce_calls += 1
        self.stats.allreduce_bytes += self.buffer.nbytes
        self.stats.comm_seconds += t2 - t1
        if self.buffer[0] > 0:
            self._raise_everywhere(error)
        self._unpack()
        self.optimizer.step()
        self.stats.steps += 1
        self.stats.compute_seconds += (t1 - t0) + (time.perf_counter() - t2)
        return float(self.buffer[1]) / n_global

    def _local_gradients(self, X, y, n_global: int):
        """Forward and backward on this shard; write n_k·loss, has-grad flags and (n_k/n)·g_k into the buffer."""
        self.model.zero_grad()
        n_local = X.shape[0]
        if n_local == 0:
            return
        z = self.model.forward(X)
        loss = self.loss_fn.forward(z, targets_for(self.loss_fn, y, z))
        self.model.backward(self.loss_fn.backward())
        weight = n_local / n_global                                      # n_k / n
        self.buffer[1] = loss * n_local
        for j, p in enumerate(self.params):
            if p.grad is not None:
                self.buffer[FIXED_HEADER + j] = 1
                self.buffer[self.bounds[j]:self.bounds[j + 1]] = to_device(p.grad, "cpu").reshape(-1) * weight

    def _unpack(self):
        """Each parameter's summed gradient out of the buffer (None where no rank produced one)."""
        for j, p in enumerate(self.params):
            g = self.buffer[self.bounds[j]:self.bounds[j + 1]].reshape(p.shape).astype(p.dtype)    # a copy
            p.grad = to_device(g, device_of(p.data)) if self.buffer[FIXED_HEADER + j] > 0 else None

    def _raise_everywhere(self, error: str | None):
        """Every rank learns every failed rank's message (one allgather), then raises the same error."""
        messages = self.comm.allgather(error)
        self.stats.other_calls += 1
        failed = "; ".join(f"rank {r}: {m}" for r, m in enumerate(messages) if m is not None)
        raise DistributedError(f"data-parallel step failed on {failed}")

    # -- the loop -----------------------------------------------------------------------------
    def fit(self, X, y, *, X_val=None, y_val=None, epochs: int = 10, batch_size: int = 64, seed: int = 0,
            target_acc: float | None = None) -> History:
        """``lowrank.training.loop.fit`` over the ranks: the same shuffles (by ``seed``) and global batches of
        ``batch_size`` rows, each split by ``shard_bounds``; every rank returns the same History.

        X, y  the whole training set (N, D_in), (N,), the same on every rank
        """
        def batch_step(rows):                                   # the global batch -> this rank's shard
            lo, hi = shard_bounds(len(rows), self.rank, self.size)
            return self.step(X[rows[lo:hi]], y[rows[lo:hi]], len(rows))

        return fit(self.model, None, self.loss_fn, X, y, X_val=X_val, y_val=y_val, epochs=epochs,
                   batch_size=batch_size, seed=seed, target_acc=target_acc, progress=False, batch_step=batch_step)


@contextmanager
def abort_on_error(comm):
    """Around a rank's whole run. A DistributedError passes (every rank raised it together); any
    other exception is printed with the rank and ends every rank with ``comm.Abort(1)`` rather
    than leaving the others waiting forever in a collective. ``comm`` None (one process): nothing
    to abort, exceptions pass."""
    if comm is None:
        yield
        return
    try:
        yield
    except DistributedError:
        raise
    except Exception as e:
        sys.stderr.write(f"lowrank rank {comm.Get_rank()}/{comm.Get_size()}: {type(e).__name__}: {e}; "
                         f"aborting every rank\n{traceback.format_exc()}")
        sys.stderr.flush()
        time.sleep(0.2)            # MPICH's hydra forwards stderr through its proxy and Abort tears the job down at
        comm.Abort(1)              # once: the message was lost in 2 of 90 runs without this pause, 0 of 90 with it
