"""Block-shuffled seed order: random runs of consecutive seeds instead of single seeds."""

from __future__ import annotations

import torch


def block_shuffle(seeds: torch.Tensor, block_size: int, generator: torch.Generator) -> torch.Tensor:
    """``seeds`` cut into runs of ``block_size`` consecutive entries, the runs in random order.

    The cut points start at a random offset, so the runs differ from epoch to epoch;
    entries keep their order inside a run. Every seed appears exactly once.
    """
    n = seeds.numel()
    if n == 0:
        return seeds
    offset = int(torch.randint(block_size, (1,), generator=generator))
    block = torch.div(torch.arange(n) + (block_size - offset) % block_size, block_size,
                      rounding_mode="floor")
    n_blocks = int(block[-1]) + 1
    rank = torch.empty(n_blocks, dtype=torch.long)
    rank[torch.randperm(n_blocks, generator=generator)] = torch.arange(n_blocks)
    return seeds[torch.sort(rank[block], stable=True).indices]
