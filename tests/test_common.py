"""Runtime: device autodetection, torchrun initialisation, atomic writes."""

import json
import os
import subprocess
import sys

import pytest
import torch

from nanochat.common import Linear, atomic_write, autodetect_device_type, compute_init

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_compute_init_autodetects_cpu(monkeypatch):
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert autodetect_device_type() == expected
    ddp, rank, local_rank, world_size, device = compute_init()
    assert (ddp, rank, local_rank, world_size, device.type) == (False, 0, 0, 1, expected)
    assert compute_init("cpu")[4] == torch.device("cpu")
    with pytest.raises(ValueError, match="device_type"):
        compute_init("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA device"):
            compute_init("cuda")


def test_compute_init_under_torchrun(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "tests", "_dist_init_worker.py"), str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r, report in enumerate(reports):
        assert report == dict(ddp=True, rank=r, local_rank=r, world_size=2, device="cpu", backend="gloo", total=3.0)


def test_linear_keeps_fp32_master_and_follows_activation_dtype():
    lin = Linear(8, 4)
    assert lin.bias is None and lin.weight.dtype == torch.float32
    x = torch.randn(2, 8, dtype=torch.bfloat16)
    assert lin(x).dtype == torch.bfloat16
    torch.testing.assert_close(lin(x.float()), x.float() @ lin.weight.T)


def test_linear_decode_path_follows_weight_updates():
    """1-2 row inputs without grad on CPU use a cached (in, out) weight copy; it must track in-place
    updates (optimizer steps, loads) and work on weights made under inference_mode."""
    lin = Linear(8, 4)
    x = torch.randn(1, 8)
    with torch.no_grad():
        torch.testing.assert_close(lin(x), x @ lin.weight.T)
        lin.weight.add_(1.0)
        torch.testing.assert_close(lin(x), x @ lin.weight.T)
        lin.load_state_dict({"weight": torch.randn(4, 8)})
        torch.testing.assert_close(lin(x), x @ lin.weight.T)
    with torch.inference_mode():
        made_here = Linear(8, 4)
        torch.testing.assert_close(made_here(x), x @ made_here.weight.T)


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "sub" / "file.bin"
    with atomic_write(path) as f:
        f.write(b"first")
    with pytest.raises(RuntimeError):
        with atomic_write(path) as f:
            f.write(b"half-written")
            raise RuntimeError("crash mid-write")
    assert path.read_bytes() == b"first"
    assert os.listdir(tmp_path / "sub") == ["file.bin"]


def test_a_hanging_test_fails_on_the_timeout(tmp_path):
    """pyproject gives every test a time limit (pytest-timeout), so a hang fails instead of stalling CI."""
    import tomllib
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        assert 60 <= tomllib.load(f)["tool"]["pytest"]["ini_options"]["timeout"] <= 900
    (tmp_path / "test_hang.py").write_text("import time\n\ndef test_hang():\n    time.sleep(60)\n")
    cmd = [sys.executable, "-m", "pytest", "-c", os.path.join(ROOT, "pyproject.toml"), "--rootdir", str(tmp_path),
           "-o", "timeout=2", "-p", "no:cacheprovider", str(tmp_path / "test_hang.py")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=50)
    assert result.returncode == 1 and "Timeout (>2.0s)" in result.stdout, result.stdout[-2000:]
