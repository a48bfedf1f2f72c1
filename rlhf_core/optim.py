"""Optimizer steps that never apply a NaN/Inf update, alone or data-parallel across processes.

Used by the reward model, supervised, RL and DPO updates. `GradSync` makes the same step over a
torch.distributed process group (gloo on CPU, NCCL on GPU) that the callers set up; it knows
nothing about Ray.
"""
from __future__ import annotations

import torch


class GradSync:
    """Data parallelism over the default torch.distributed group: every rank computes the gradient of
    its share of the batch (scaled so that the shares add up to the whole batch's loss), the
    gradients are summed, and every rank takes the identical step, so the replicas stay equal."""

    def __init__(self):
        import torch.distributed as dist
        self.dist = dist
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    def all_finite(self, ok: bool) -> bool:
        """Do all ranks have a finite loss? All skip together, or the collectives would hang."""
        flag = torch.tensor([1 if ok else 0], dtype=torch.int32)
        self.dist.all_reduce(flag, op=self.dist.ReduceOp.MIN)
        return bool(flag.item())

    def sum_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """One all-reduce of every gradient, flattened into one buffer (one message, not one per tensor)."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        self.dist.all_reduce(flat)
        offset = 0
        for p, g in zip(params, grads):
            p.grad = flat[offset: offset + g.numel()].view_as(g)
            offset += g.numel()

    def broadcast_parameters(self, params: list[torch.nn.Parameter]) -> None:
        """Every rank starts from rank 0's weights (a freshly initialised head differs per process)."""
        with torch.no_grad():
            flat = torch.cat([p.detach().reshape(-1) for p in params])
            self.dist.broadcast(flat, src=0)
            offset = 0
            for p in params:
                p.copy_(flat[offset: offset + p.numel()].view_as(p))
                offset += p.numel()

    def sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64)
        self.dist.all_reduce(t)
        return t.tolist()

    def gather_rows(self, local: torch.Tensor, total: int) -> torch.Tensor:
        """The whole batch from every rank's rows: rank r holds rows r, r + world, r + 2·world, …
        (`shard_rows`) of a batch of `total` rows. local (n_r, …) -> (total, …), the same on every rank.

        gloo gathers equal shapes only: shards are padded to the longest, then the padding dropped."""
        per = -(-total // self.world)
        pad = torch.zeros((per - local.shape[0], *local.shape[1:]), dtype=local.dtype, device=local.device)
        parts = [torch.empty((per, *local.shape[1:]), dtype=local.dtype, device=local.device)
                 for _ in range(self.world)]
        self.dist.all_gather(parts, torch.cat([local, pad]))
        out = torch.empty((total, *local.shape[1:]), dtype=local.dtype, device=local.device)
        for r, part in enumerate(parts):
            rows = shard_rows(total, r, self.world)
            out[rows] = part[: len(rows)]
        return out


def shard_rows(n: int, rank: int, world: int) -> list[int]:
    """This rank's rows of an n-row batch: every world-th row, starting at its rank (as `_fit` does)."""
    return list(range(rank, n, world))


class GuardedStep:
    """Optimizer steps that skip a non-finite update instead of applying it.

    A NaN/Inf loss or gradient norm skips the update (gradients dropped, weights untouched) with an
    alert; `limit` skipped updates in a row mean the run has diverged and raise, naming `what`.
    With `sync` (data parallel), the ranks agree on skipping and sum their gradients before clipping.
    """

    def __init__(self, limit: int):
        self.limit, self.streak, self.skipped = limit, 0, 0

    def __call__(self, optimizer: torch.optim.Optimizer, loss: torch.Tensor, params, max_grad_norm: float,
                 what: str, sync: GradSync | None = None) -> bool:
        params = [p for p in params if p.requires_grad]
        optimizer.zero_grad(set_to_none=True)
        finite = bool(torch.isfinite(loss))
        if sync is not None:
            finite = sync.all_finite(finite)
        if finite:
            loss.backward()
            if sync is not None:
                sync.sum_gradients(params)
            norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            finite = bool(torch.isfinite(norm))     # the same on every rank: the gradients are
        if finite:
            optimizer.step()
            self.streak = 0
            return True
        optimizer.zero_grad(set_to_none=True)    # a NaN gradient must not reach the next step
        self.streak += 1
        self.skipped += 1
        print(f"ALERT: {what} is not finite (loss {loss.item()}): update skipped "
              f"({self.streak} in a row, stop after {self.limit})")
        if self.streak >= self.limit:
            raise FloatingPointError(f"{what}: {self.streak} non-finite updates in a row; the run has diverged "
                                     f"(lower the learning rate, or check the rewards)")
        return False
