"""Run under torchrun by tests/test_common.py: join the group and prove it works with an all_reduce."""
import json
import os
import sys

import torch
import torch.distributed as dist

from nanochat.common import compute_cleanup, compute_init

ddp, rank, local_rank, world_size, device = compute_init("cpu")
value = torch.tensor([float(rank + 1)])
dist.all_reduce(value)
with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
    json.dump(dict(ddp=ddp, rank=rank, local_rank=local_rank, world_size=world_size, device=str(device),
                   backend=dist.get_backend(), total=value.item()), f)
compute_cleanup()
