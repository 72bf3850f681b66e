"""Data-parallel training over ``mx.distributed`` (ranks started by ``mlx.launch``).

``batch_size`` stays the *global* batch: every rank walks the same batch order and takes its
share of each batch (rows ``rank, rank + N, ...``), so the data order does not depend on the
number of ranks N. After a step's micro-batches each rank adds its summed token losses, loss-token
counts, real-token counts and gradients into one flat buffer, ``mx.distributed.all_sum`` adds
the buffers of all ranks, and every rank divides by the *global* loss-token count: the update is
the single-process one (up to float rounding) and stays identical on every rank.

Rank 0 reads the checkpoint on ``--resume`` and ``broadcast`` sends the adapter, optimizer state
and position to the other ranks (an all_sum where only rank 0 adds non-zeros), so other hosts
need no copy of the output directory; rank 0 alone writes files.

A dead peer: the ring backend raises when a socket closes, which becomes ``PeerLost`` (one
line); a peer that hangs (a host that lost power) is caught by ``Watchdog``, which ends this
process when a reduction waits longer than ``MLX_QLORA_PEER_TIMEOUT`` seconds (default 30) plus
twice this rank's own compute time for the step. ``mlx.launch`` stops the remaining ranks as
soon as one exits with an error.
"""
from __future__ import annotations

import hashlib
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from ..errors import UserError

TIMEOUT_ENV = "MLX_QLORA_PEER_TIMEOUT"
# Set by mlx.launch (ring: MLX_RANK; nccl: MLX_WORLD_SIZE) or mpirun: this process is one rank.
LAUNCH_ENV = ("MLX_RANK", "MLX_WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


class PeerLost(UserError):
    """The connection to another rank broke during a reduction (the CLI exits 3, as the watchdog
    does: the launcher wrapper blames the rank that failed first, not the ones left behind)."""
    exit_code = 3


@dataclass
class World:
    """This process's place in the job; ``size == 1`` (no group) for a plain process."""
    rank: int = 0
    size: int = 1
    group: object = None
    backend: str = ""

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, rows: list[int]) -> list[int]:
        """This rank's rows of one global batch (strided: the batch is sorted by length)."""
        return rows[self.rank::self.size]

    def __str__(self) -> str:
        return f"rank {self.rank} of {self.size}"


def init_world() -> World:
    """The group when launched by mlx.launch / mpirun, else a single-process world."""
    launched = any(os.environ.get(k) for k in LAUNCH_ENV)
    hostfile = os.environ.get("MLX_HOSTFILE", "")
    alone = os.environ.get("MLX_WORLD_SIZE") == "1" or (os.path.isfile(hostfile) and not Path(hostfile).read_text().strip())
    if not launched or alone:   # mlx.launch -n 1 writes an empty ring hostfile
        return World()
    try:
        group = mx.distributed.init(strict=True)
    except RuntimeError as e:
        raise UserError(f"could not join the distributed group ({e}); start every rank with mlx.launch "
                        f"(see README: several machines)") from None
    world = World(group.rank(), group.size(), group)
    if world.size > 1:
        world.backend = "ring" if os.environ.get("MLX_HOSTFILE") else \
            "nccl" if os.environ.get("NCCL_HOST_IP") else "mpi" if os.environ.get("OMPI_COMM_WORLD_SIZE") else "any"
    return world


class Watchdog:
    """Ends the process when a reduction waits on its peers for too long (a hung rank)."""

    def __init__(self, world: World, timeout: float | None = None):
        self.world = world
        self.timeout = float(os.environ.get(TIMEOUT_ENV, 30)) if timeout is None else timeout
        self._since: float | None = None
        self._limit = 0.0
        self._what = ""
        if world.size > 1:
            threading.Thread(target=self._watch, daemon=True, name="mlx_qlora_watchdog").start()

    def waiting(self, what: str, compute_s: float = 0.0):
        self._what, self._limit = what, self.timeout + 2 * compute_s
        return self

    def __enter__(self):
        self._since = time.monotonic()

    def __exit__(self, *exc):
        self._since = None

    def _watch(self):
        while True:
            time.sleep(1.0)
            since = self._since
            if since is not None and time.monotonic() - since > self._limit:
                sys.stderr.write(f"error: {self.world}: no answer from the other ranks for {self._limit:.0f} s "
                                 f"in {self._what} (a rank died or hangs); stopping, continue with --resume "
                                 f"(raise {TIMEOUT_ENV} if the ranks are just slow)\n")
                sys.stderr.flush()
                os._exit(3)


def _reduce(world: World, flat: mx.array, what: str, watchdog: Watchdog | None, compute_s: float) -> mx.array:
    out = mx.distributed.all_sum(flat, group=world.group)
    try:
        if watchdog is None:
            mx.eval(out)
        else:
            with watchdog.waiting(what, compute_s):
                mx.eval(out)
    except RuntimeError as e:
        raise PeerLost(f"{world}: the connection to another rank was lost in {what} ({e}); a rank died or the "
                       f"network dropped: continue with --resume from the last checkpoint") from None
    return out


def sum_step(world: World, grads, numbers: list[float], what: str = "the gradient all_sum",
             watchdog: Watchdog | None = None, compute_s: float = 0.0):
    """(grads summed over ranks, numbers summed over ranks): one all_sum of one flat fp32 buffer."""
    if world.size == 1:
        return grads, list(numbers)
    leaves = tree_flatten(grads)
    parts = [mx.array(numbers, mx.float32)] + [v.astype(mx.float32).reshape(-1) for _, v in leaves]
    flat = _reduce(world, mx.concatenate(parts), what, watchdog, compute_s)
    n = len(numbers)
    summed = [float(x) for x in flat[:n].tolist()]
    out, at = [], n
    for k, v in leaves:
        out.append((k, flat[at:at + v.size].reshape(v.shape).astype(v.dtype)))
        at += v.size
    return tree_unflatten(out), summed


def sum_numbers(world: World, numbers: list[float], what: str, watchdog: Watchdog | None = None) -> list[float]:
    return sum_step(world, {}, numbers, what, watchdog)[1]


def broadcast(world: World, tree, numbers: list[float] = ()):
    """Rank 0's ``tree`` (arrays) and ``numbers`` on every rank (other ranks pass same-shaped values)."""
    if world.size == 1:
        return tree, list(numbers)
    zero = lambda v: v if world.main else mx.zeros_like(v)    # noqa: E731
    leaves = [(k, zero(v)) for k, v in tree_flatten(tree)]
    nums = list(numbers) if world.main else [0.0] * len(numbers)
    return sum_step(world, tree_unflatten(leaves), nums, "the start-up broadcast")


def sync_start(world: World, model, optimizer, state: dict) -> dict:
    """Rank 0's adapter, optimizer state and position (fresh or from its checkpoint) on every rank."""
    if world.size == 1:
        return state
    optimizer.init(model.trainable_parameters())   # keeps values already loaded on rank 0
    keys = ("step", "epoch", "batch_index")
    tree, nums = broadcast(world, {"model": model.trainable_parameters(), "optim": optimizer.state},
                           [state[k] for k in keys])
    model.update(tree["model"])
    optimizer.state = tree["optim"]
    mx.eval(model.trainable_parameters(), optimizer.state)
    return dict(state, **{k: int(v) for k, v in zip(keys, nums)})


def agree(world: World, value: str, what: str) -> None:
    """Stop unless every rank holds the same ``value`` (a recipe, a data set): a mismatch would
    silently train N different models."""
    if world.size == 1:
        return
    h = int.from_bytes(hashlib.sha256(value.encode()).digest()[:3], "little")   # 24 bits: exact in fp32
    lo = mx.distributed.all_min(mx.array([h], mx.float32), group=world.group)
    hi = mx.distributed.all_max(mx.array([h], mx.float32), group=world.group)
    mx.eval(lo, hi)
    if lo.item() != hi.item():
        raise UserError(f"{world}: the ranks disagree on {what}; give every host the same recipe, data and "
                        f"mlx_qlora version")


def gather_numbers(world: World, values: list[float]) -> list[list[float]]:
    """Every rank's ``values`` (in rank order) on every rank."""
    if world.size == 1:
        return [list(values)]
    k = len(values)
    slots = [0.0] * (k * world.size)
    slots[world.rank * k:(world.rank + 1) * k] = values
    flat = sum_numbers(world, slots, "the end-of-run gather")
    return [flat[r * k:(r + 1) * k] for r in range(world.size)]
