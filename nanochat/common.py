"""Runtime shared by every module: device and distributed setup, the compute dtype policy,
the master-weight Linear, the base directory, logging and atomic file writes."""

import functools
import logging
import os
import sys
import tempfile
import warnings
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

logger = logging.getLogger("nanochat")


def setup_logging(level=logging.INFO):
    """One plain log format for every entry point; quiet on non-zero ranks."""
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(
        level=level if rank == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def print0(*args, **kwargs):
    """print() on rank 0 only, so a torchrun job prints each line once."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs)


def run_cli(main, argv=None):
    """Run an entry point's main(argv) and return its exit status: bad input (OSError, ValueError:
    a missing or damaged file, an impossible setting) prints one line `error: ...` and returns 1
    instead of a traceback. NANOCHAT_DEBUG=1 keeps the traceback."""
    try:
        main(argv)
    except (OSError, ValueError) as exc:
        if os.environ.get("NANOCHAT_DEBUG"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------------------
# Compute dtype policy


_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def _dtype_from_env():
    """(dtype, reason) from NANOCHAT_DTYPE, or None when it is unset. Read at import, so a bad value
    fails at once, before any work."""
    env = os.environ.get("NANOCHAT_DTYPE")
    if not env:
        return None
    if env not in _DTYPES:
        raise ValueError(f"NANOCHAT_DTYPE={env!r}: expected one of {sorted(_DTYPES)}")
    if env == "float16":
        warnings.warn("NANOCHAT_DTYPE=float16: fp16 overflows without a grad scaler, which "
                      "nanochat does not use; prefer bfloat16 or float32")
    return _DTYPES[env], f"NANOCHAT_DTYPE={env}"


_ENV_DTYPE = _dtype_from_env()


@functools.cache
def compute_dtype_and_reason():
    """(the activation dtype of every model, why): NANOCHAT_DTYPE if set, else bf16 on CUDA with
    compute capability >= 8.0, else fp32. Decided on first call, not at import: asking a CUDA
    device for its capability initialises CUDA, which a process that forks workers must not do
    before forking."""
    if _ENV_DTYPE is not None:
        return _ENV_DTYPE
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        if major >= 8:
            return torch.bfloat16, f"CUDA compute capability {major}.{minor} has bf16 tensor cores"
        return torch.float32, f"CUDA compute capability {major}.{minor} < 8.0 has no fast bf16"
    return torch.float32, "no CUDA device: fp32 on CPU/MPS (set NANOCHAT_DTYPE to override)"


def compute_dtype():
    """The activation dtype of every model (see compute_dtype_and_reason)."""
    return compute_dtype_and_reason()[0]


def __getattr__(name):
    # `from nanochat.common import COMPUTE_DTYPE` still works; the probe runs when it is first read.
    if name == "COMPUTE_DTYPE":
        return compute_dtype()
    if name == "COMPUTE_DTYPE_REASON":
        return compute_dtype_and_reason()[1]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# Decoding multiplies 1-2 rows by each weight. On CPU, x @ W_t with W_t an (in, out) contiguous copy
# ran at twice the speed of F.linear's (out, in) kernel for one row (vocab 32768 x 384 lm_head:
# 1.6 vs 3.1 ms, 1 thread) and was slower from 4 rows up (benchmarks/inference_bench.py measures it).
CPU_GEMV_ROWS = 2


class Linear(nn.Linear):
    """Bias-free linear with fp32 master weights, cast to the activation dtype in forward.

    This replaces autocast: with fp32 activations nothing is cast, with bf16 activations the
    matmul runs in bf16 while the optimizer keeps updating the fp32 weight."""

    def __init__(self, in_features, out_features, device=None):
        super().__init__(in_features, out_features, bias=False, device=device, dtype=torch.float32)

    def forward(self, x):
        if x.device.type == "cpu" and x.numel() <= CPU_GEMV_ROWS * self.in_features and not torch.is_grad_enabled():
            return x @ self._weight_in_out(x.dtype)
        return F.linear(x, self.weight.to(dtype=x.dtype))

    def _weight_in_out(self, dtype):
        """The weight as a contiguous (in, out) copy for CPU decoding, rebuilt whenever the weight
        changes (an optimizer step or a load bumps its version). It costs the weight's memory again.
        A weight created under inference_mode has no version counter: it can only change inside
        inference_mode, which nothing here does once the model is built."""
        version = None if self.weight.is_inference() else self.weight._version
        key = (version, self.weight.data_ptr(), dtype)
        if getattr(self, "_in_out_key", None) != key:
            with torch.inference_mode(False):
                self._in_out = self.weight.detach().to(dtype).t().contiguous()
            self._in_out_key = key
        return self._in_out


# ---------------------------------------------------------------------------
# Devices and torch.distributed


def autodetect_device_type():
    """The best device present: cuda > mps > cpu."""
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def get_dist_info():
    """(ddp, rank, local_rank, world_size) from the torchrun environment variables."""
    if all(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")):
        return True, int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    return False, 0, 0, 1


def compute_init(device_type=None, seed=42):
    """Pick the device, seed the RNGs and, under torchrun, join the process group.

    Returns (ddp, rank, local_rank, world_size, device)."""
    device_type = device_type or autodetect_device_type()
    if device_type not in ("cuda", "mps", "cpu"):
        raise ValueError(f"device_type must be cuda, mps or cpu, got {device_type!r}")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device_type='cuda' was asked for but torch sees no CUDA device")
    if device_type == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError("device_type='mps' was asked for but torch sees no MPS device")

    torch.manual_seed(seed)
    if device_type == "cuda":
        torch.cuda.manual_seed(seed)
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"

    ddp, rank, local_rank, world_size = get_dist_info()
    if ddp and device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl", device_id=device)
        dist.barrier()
    elif ddp:
        device = torch.device(device_type)
        dist.init_process_group(backend="gloo")
        dist.barrier()
    else:
        device = torch.device(device_type)
    if rank == 0:
        logger.info("device %s, world size %d, compute dtype %s (%s)", device, world_size, *compute_dtype_and_reason())
    return ddp, rank, local_rank, world_size, device


def compute_cleanup():
    """Leave the process group if compute_init joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------
# Files


def get_base_dir():
    """Where tokenizers, data, checkpoints and caches live: $NANOCHAT_BASE_DIR or ~/.cache/nanochat."""
    base = os.environ.get("NANOCHAT_BASE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nanochat")
    os.makedirs(base, exist_ok=True)
    return base


@contextmanager
def atomic_write(path, mode="wb"):
    """Open a temporary file beside `path` and rename it into place only if the block succeeds,
    so a crash never leaves a half-written file under the real name."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".", suffix=".tmp")
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; data and checkpoints are meant to be shared
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
