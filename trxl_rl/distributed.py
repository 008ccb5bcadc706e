"""Data-parallel training with ``torch.distributed``: one process (rank) per core or GPU.

    torchrun --standalone --nproc-per-node 4 -m trxl_rl.train --env MiniGrid-Memory
    python -m trxl_rl.train --env MiniGrid-Memory --ranks 4      # the same, on one machine

``torchrun`` (or ``python -m torch.distributed.run``) starts the ranks and sets ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK``; so does :func:`start_local_ranks`, which the trainer's CLI
calls when the config's ``ranks`` is more than 1 (``--ranks K``). Without them
:class:`Ranks` is a single process and every method below does nothing (no process group, the
same computation as before). Each rank owns its vector of environments, their
memory and its rollout, and runs the same update loop; the ranks meet in three places:

- every minibatch, :meth:`Ranks.average_gradients`: the mean of the ranks' gradients (and of
  their ``approx_kl``, so a ``target_kl`` early stop is decided the same way on every rank);
- every update, :meth:`Ranks.reduce_scalars`: the logged statistics, plus the stop request of
  a signal, so that every rank stops after the same update;
- at a checkpoint, :meth:`Ranks.gather_object`: each rank's training state, for rank 0 to write.

Why an explicit all-reduce rather than ``DistributedDataParallel``: DDP hooks into
``module.forward``, while PPO's update runs ``agent.evaluate`` (and the reconstruction loss
runs the encoder a second time outside it), so DDP would need a wrapper module and
``find_unused_parameters`` for the heads a loss does not reach. What DDP buys, overlapping
bucketed all-reduces with the backward pass, is worth nothing for models of ~10^5 to 10^7
parameters whose backward takes milliseconds. One all-reduce of the flattened gradients after
``backward`` and before gradient clipping is exact (clipping then sees the averaged gradient,
identical on every rank), works for any loss, and costs one collective per minibatch, into
which the KL estimate rides along.

Backends: ``gloo`` for everything on CPU (the default group: statistics, checkpoints, error
messages) and, when the run trains on CUDA, an ``nccl`` group for the gradients, with one GPU
per rank (``cuda:LOCAL_RANK``). A rank that dies closes its sockets and the others' next
collective fails at once (:class:`RankLost`); a rank that hangs makes the others fail after
:data:`TIMEOUT` (or ``TRXL_RL_COLLECTIVE_TIMEOUT`` seconds).

This module imports torch, numpy and the standard library only.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

# How long a collective waits for a rank that stopped answering (but did not die: a dead
# rank's closed connection fails the collective at once). Long enough for rank 0 to write a
# checkpoint while the others wait for it. The environment variable TIMEOUT_VARIABLE (seconds)
# sets another.
TIMEOUT = timedelta(minutes=10)
TIMEOUT_VARIABLE = "TRXL_RL_COLLECTIVE_TIMEOUT"
FINISH_TIMEOUT = timedelta(days=7)  # Ranks.finish: no limit that a run would meet

REDUCTIONS = ("mean", "sum", "max", "min")
LINUX = sys.platform.startswith("linux")


class RankLost(RuntimeError):
    """A collective failed: another rank died, was killed or stopped answering."""


def launched_by_torchrun(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the environment holds the variables ``torchrun`` sets for its ranks."""
    environ = os.environ if environ is None else environ
    return all(key in environ for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def launch_command(world_size: int) -> str:
    """The command that runs the trainer on ``world_size`` ranks of one machine."""
    if world_size == 1:
        return "python -m trxl_rl.train"
    return f"torchrun --standalone --nproc-per-node {world_size} -m trxl_rl.train"


def start_local_ranks(world_size: int, argv: list[str]) -> int:
    """Run ``python -m trxl_rl.train argv`` as ``world_size`` ranks of one machine, as ``torchrun
    --standalone --nproc-per-node world_size`` would start them (the variables it sets, a
    free local port for the gloo group), and wait for them; returns the exit code: rank 0's
    if it failed, else the first other rank's that did, else 0.

    How ``python -m trxl_rl.train`` uses both cores when the config says ``ranks: 2``. The
    ranks run in their own session, so a terminal's Ctrl+C reaches them once, through this
    process: SIGINT and SIGTERM are passed on to every rank (the first asks each to save a
    checkpoint after its update and stop, a second stops them at once, as for one process).
    """
    with socket.socket() as probe:  # a free port for the ranks' rendezvous on this machine
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    base = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "WORLD_SIZE": str(world_size), "LOCAL_WORLD_SIZE": str(world_size)}
    procs = [subprocess.Popen([sys.executable, "-m", "trxl_rl.train", *argv],
                              start_new_session=True,
                              env={**base, "RANK": str(r), "LOCAL_RANK": str(r)},
                              preexec_fn=_end_with_parent if LINUX else None)
             for r in range(world_size)]

    def pass_on(signum, _frame):
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    previous = {s: signal.signal(s, pass_on) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        codes = [proc.wait() for proc in procs]
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    codes = [code if code >= 0 else 128 - code for code in codes]  # -N: killed by signal N
    return next((code for code in codes if code), 0)


def _end_with_parent() -> None:
    """In a rank about to start (Linux only): SIGTERM when the process that started it ends,
    so a launcher killed outright leaves no ranks training on (they save and stop, as on a
    SIGTERM of their own)."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def reduce_rows(rows: np.ndarray, ops: list[str]) -> np.ndarray:
    """Reduce ``rows`` ``[K ranks, n]`` column by column with ``ops`` (n names of
    :data:`REDUCTIONS`); returns ``[n]`` float64."""
    rows = np.asarray(rows, dtype=np.float64)
    if rows.ndim != 2 or rows.shape[1] != len(ops):
        raise ValueError(f"rows must have shape [K, {len(ops)}], got {rows.shape}")
    unknown = sorted(set(ops) - set(REDUCTIONS))
    if unknown:
        raise ValueError(f"unknown reductions {unknown}; known: {', '.join(REDUCTIONS)}")
    out = np.empty(rows.shape[1])
    for name in REDUCTIONS:
        columns = [i for i, op in enumerate(ops) if op == name]
        if columns:
            out[columns] = getattr(np, name)(rows[:, columns], axis=0)
    return out


def weights_digest(module: torch.nn.Module) -> str:
    """A hash of ``module``'s parameters and buffers, bit for bit (equal on every rank of a
    data-parallel run)."""
    digest = hashlib.sha1()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class Ranks:
    """This process's place among the ranks of a data-parallel run, and their collectives.

    :param rank: global rank, 0 .. world_size - 1 (rank 0 writes logs and checkpoints).
    :param world_size: number of ranks.
    :param local_rank: rank on this machine (selects the GPU).

    ``Ranks()`` is a single process: its collectives return their inputs.
    """

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self._gradient_group: Any = None  # nccl group for CUDA gradients; None: the default

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> Ranks:
        """The ranks ``torchrun`` describes in the environment; a single process without it."""
        environ = os.environ if environ is None else environ
        if not launched_by_torchrun(environ):
            return cls()
        return cls(int(environ["RANK"]), int(environ["WORLD_SIZE"]), int(environ["LOCAL_RANK"]))

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes logs, checkpoints and the summary."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def __repr__(self) -> str:
        return f"Ranks(rank={self.rank}, world_size={self.world_size})"

    # --- set-up ---------------------------------------------------------------------------

    def start(self) -> Ranks:
        """Join the other ranks (the default ``gloo`` group); a single process does nothing."""
        if self.distributed and not dist.is_initialized():
            dist.init_process_group("gloo", timeout=self.timeout())
        return self

    @staticmethod
    def timeout() -> timedelta:
        """:data:`TIMEOUT`, or ``TRXL_RL_COLLECTIVE_TIMEOUT`` seconds where that is set."""
        seconds = os.environ.get(TIMEOUT_VARIABLE)
        return TIMEOUT if seconds is None else timedelta(seconds=float(seconds))

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()
        self._gradient_group = None

    def check_device(self, device: torch.device) -> None:
        """:raises ValueError: a CUDA run with more ranks on this machine than GPUs."""
        if not self.distributed or device.type != "cuda":
            return
        count = torch.cuda.device_count()
        if self.local_rank >= count:
            raise ValueError(
                f"local rank {self.local_rank} has no GPU of its own ({count} visible): start "
                f"at most {count} ranks per machine (--ranks, or torchrun's --nproc-per-node) "
                "or train with --device cpu")

    def device(self, device: torch.device) -> torch.device:
        """The device this rank trains on: ``cuda:LOCAL_RANK`` for a CUDA run of several ranks
        (whose gradients then go through an ``nccl`` group), else ``device`` itself.

        Every rank must call this (it creates the nccl group collectively).

        :raises ValueError: see :meth:`check_device`.
        """
        if not self.distributed or device.type != "cuda":
            return device
        self.check_device(device)
        torch.cuda.set_device(self.local_rank)
        if self._gradient_group is None:
            self._gradient_group = dist.new_group(backend="nccl", timeout=self.timeout())
        return torch.device("cuda", self.local_rank)

    def _group(self, tensor: Tensor) -> Any:
        return self._gradient_group if tensor.is_cuda else None

    @contextmanager
    def _collective(self, what: str) -> Iterator[None]:
        """Turn the failure of a collective into :class:`RankLost` with a one-line reason."""
        try:
            yield
        except RuntimeError as err:
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
            reason = reason.split("] ", 1)[-1] if reason.startswith("[") else reason
            reason = reason.split(". This is typically caused by", 1)[0]  # gloo's advice
            raise RankLost(
                f"rank {self.rank} of {self.world_size}: {what} failed, another rank died or "
                f"stopped answering ({reason[:200]})") from None

    # --- collectives ----------------------------------------------------------------------

    def average_gradients(self, parameters: Iterable[Tensor], *extra: Tensor) -> list[Tensor]:
        """Replace every parameter's gradient with its mean over the ranks, in one all-reduce
        of the flattened gradients; returns the ranks' means of the ``extra`` tensors (e.g.
        the minibatch's approx_kl), which ride along in the same buffer.

        A parameter without a gradient counts as zero where another rank has one, and keeps
        no gradient where no rank has one, so that every rank's optimizer does the same.
        A single process returns ``extra`` unchanged and touches nothing.
        """
        if not self.distributed:
            return list(extra)
        params = list(parameters)
        if not params:
            return list(extra)
        like = params[0]
        has_grad = torch.tensor([float(p.grad is not None) for p in params], device=like.device,
                                dtype=like.dtype)
        parts = [(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                 for p in params]
        parts += [has_grad] + [e.detach().to(like.dtype).flatten() for e in extra]
        flat = torch.cat(parts)
        with self._collective("averaging the gradients"):
            dist.all_reduce(flat, group=self._group(flat))
        flat /= self.world_size
        views, offset = [], 0
        for p in params:
            views.append(flat[offset: offset + p.numel()].view_as(p))
            offset += p.numel()
        # Which parameters some rank had a gradient for is read (a host sync on a GPU) only
        # where this rank had none.
        missing = {i for i, p in enumerate(params) if p.grad is None}
        if missing:
            had = flat[offset: offset + len(params)].tolist()
            missing = {i for i in missing if had[i] > 0}
        for i, (p, view) in enumerate(zip(params, views, strict=True)):
            if p.grad is not None:
                p.grad.copy_(view)
            elif i in missing:
                p.grad = view.to(p.dtype).clone()
        offset += len(params)
        out = []
        for e in extra:
            out.append(flat[offset: offset + e.numel()].view_as(e).to(e.dtype))
            offset += e.numel()
        return out

    def sum(self, tensor: Tensor) -> Tensor:
        """The sum of ``tensor`` over the ranks (a single process: ``tensor`` itself)."""
        if not self.distributed:
            return tensor
        out = tensor.clone()
        with self._collective("summing statistics"):
            dist.all_reduce(out, group=self._group(out))
        return out

    def broadcast_parameters(self, module: torch.nn.Module) -> None:
        """Give every rank rank 0's parameters and buffers."""
        if not self.distributed:
            return
        with self._collective("sharing the initial weights"), torch.no_grad():
            for tensor in [*module.parameters(), *module.buffers()]:
                dist.broadcast(tensor, src=0, group=self._group(tensor))

    def reduce_scalars(self, values: Mapping[str, float], ops: Mapping[str, str]
                       ) -> dict[str, float]:
        """Reduce named scalars over the ranks: ``ops[name]`` is one of :data:`REDUCTIONS`
        (missing names: ``mean``). Every rank must pass the same names; all get the result.
        A single process gets ``values`` back unchanged."""
        if not self.distributed:
            return dict(values)
        names = sorted(values)
        rows = self.all_gather(torch.tensor([[float(values[k]) for k in names]],
                                            dtype=torch.float64))
        reduced = reduce_rows(rows.numpy(), [ops.get(k, "mean") for k in names])
        return dict(zip(names, reduced.tolist(), strict=True))

    def all_gather(self, tensor: Tensor) -> Tensor:
        """Every rank's ``tensor`` (same shape on every rank), concatenated along dim 0 in
        rank order."""
        if not self.distributed:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        with self._collective("gathering statistics"):
            dist.all_gather(parts, tensor.contiguous(), group=self._group(tensor))
        return torch.cat(parts)

    def gather_object(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` (picklable) on rank 0, in rank order; None on the others."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size if self.main else None
        with self._collective("gathering the ranks' training state"):
            dist.gather_object(obj, out, dst=0)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        with self._collective("sharing the run's settings"):
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        """Wait until every rank has come here."""
        if self.distributed:
            with self._collective("waiting for the other ranks"):
                dist.barrier()

    def finish(self) -> None:
        """Wait, without the collectives' timeout, until every rank has finished the run (rank
        0 evaluates after training, for as long as that takes), so that no rank tears its
        process group down while another still uses its own: a rank that did was seen to abort
        in gloo's teardown (SIGABRT, "terminate called without an active exception"). A rank
        lost meanwhile is torchrun's to stop."""
        if self.distributed:
            with self._collective("waiting for the other ranks to finish"):
                dist.monitored_barrier(timeout=FINISH_TIMEOUT)

    def first_error(self, message: str | None) -> tuple[int, str] | None:
        """Agree on failure before anything is written: each rank passes its error message or
        None; all get ``(rank, message)`` of the lowest rank that failed, or None."""
        if not self.distributed:
            return None if message is None else (self.rank, message)
        messages = [None] * self.world_size
        with self._collective("checking the configuration on every rank"):
            dist.all_gather_object(messages, message)
        return next(((rank, m) for rank, m in enumerate(messages) if m is not None), None)


__all__ = ["FINISH_TIMEOUT", "REDUCTIONS", "TIMEOUT", "TIMEOUT_VARIABLE", "RankLost", "Ranks",
           "launched_by_torchrun", "reduce_rows", "weights_digest"]
