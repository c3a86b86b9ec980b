"""Several processes over one output folder, launched by ``accelerate launch`` or ``torchrun``.

The launchers set RANK / WORLD_SIZE / LOCAL_RANK (and the rendezvous address); each
process then takes the images whose id hashes to its rank and writes them into the shared
folder. Only a barrier and a gather of the run summaries cross processes, over gloo, which
works beside any device.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> "Distributed":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as td

        if not td.is_initialized():
            # Ranks can finish hours apart on a big split; the default 30 min would abort.
            td.init_process_group("gloo", timeout=timedelta(days=7))
        return cls(td.get_rank(), td.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def device(self) -> str:
        import torch

        return f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu"

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as td

            td.barrier()

    def gather(self, obj) -> list:
        if self.world == 1:
            return [obj]
        import torch.distributed as td

        out = [None] * self.world
        td.all_gather_object(out, obj)
        return out
