"""Run ``lmexpand`` under accelerate's FSDP in CPU processes (gloo), for tests only.

accelerate 1.15 turns FSDP on only for accelerator devices: ``AcceleratorState`` upgrades
the distributed type to FSDP only when it is MULTI_GPU/NPU/XPU/... (accelerate/state.py, the
``elif self.distributed_type in [...]`` branch after DeepSpeed), so CPU processes get plain
data parallel (MULTI_CPU) and the FSDP config is ignored. torch's FSDP itself runs on CPU
with gloo. This launcher lets the state come up as MULTI_CPU, then sets FSDP with the plugin
accelerate built from the ``FSDP_*`` variables (the same ones ``accelerate launch`` sets from
recipes/accelerate/fsdp.yaml), so lmexpand's own code runs exactly as under FSDP on GPUs.

    torchrun --nproc_per_node 2 tests/fsdp_cpu.py train --model ... (lmexpand's arguments)
"""

from __future__ import annotations

import sys

import accelerate.state as state
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

_init = state.AcceleratorState.__init__


def _init_with_fsdp(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    if self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = kwargs.get("fsdp_plugin") or FullyShardedDataParallelPlugin()


state.AcceleratorState.__init__ = _init_with_fsdp

if __name__ == "__main__":
    from lmexpand.cli import main

    sys.exit(main(sys.argv[1:]))
