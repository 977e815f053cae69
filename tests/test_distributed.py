"""Data-parallel training across processes with torch.distributed (gloo, CPU) gives the single-process result,
with the base model whole on each rank or sharded by FSDP2 (``fully_shard``).

Runs ``examples/distributed_train.py`` under ``torchrun --nproc_per_node=2`` (and, with FSDP, under
``accelerate launch``, what transformers users type): each rank takes
``torch.func.grad`` on its half of the batch, all-reduces (averages) the gradient's trainable leaves and
applies ``af.optim.sgd`` with momentum. Both ranks must end with the same adapter, equal to training on
the whole batch in one process, and with their base model untouched.

SGD, not AdamW, because the comparison is to float tolerance: the two gradients differ by rounding (a sum
of two half-batch means against one full-batch mean), and Adam turns a gradient component that is pure
rounding noise into a full-size step, while SGD keeps the difference at rounding size.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import adaptfn as af

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "distributed_train.py"
STEPS = 4
OPTIMIZER = "sgd"


pytestmark = pytest.mark.usefixtures("one_thread")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(text: str, n: int = 150) -> str:
    return "\n".join(text.strip().splitlines()[-n:])


def _text(out: str | bytes | None) -> str:
    return out.decode(errors="replace") if isinstance(out, bytes) else (out or "")


def _launcher(how: str, port: int) -> list[str]:
    if how == "accelerate":
        return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_ip", "127.0.0.1", "--main_process_port", str(port)]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
            "--master_addr=127.0.0.1", f"--master_port={port}"]


def _run_torchrun(out: Path, how: str = "torchrun", fsdp: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    for attempt in range(2):  # the free port can be taken between our probe and torchrun's bind: retry once
        cmd = [*_launcher(how, _free_port()), str(SCRIPT),
               "--out", str(out), "--steps", str(STEPS), "--optimizer", OPTIMIZER, "--timeout", "60",
               *(["--fsdp"] if fsdp else [])]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=150, env=env, cwd=ROOT)
        except subprocess.TimeoutExpired as e:
            pytest.fail(f"torchrun did not finish in {e.timeout} s\n--- stdout ---\n{_tail(_text(e.stdout))}"
                        f"\n--- stderr ---\n{_tail(_text(e.stderr))}")
        if proc.returncode == 0 or "address already in use" not in (proc.stdout + proc.stderr).lower() or attempt:
            return proc
    return proc


def _load_script():
    spec = importlib.util.spec_from_file_location("distributed_train", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("how,fsdp", [("torchrun", False), ("torchrun", True), ("accelerate", True)],
                         ids=["torchrun", "torchrun-fsdp2", "accelerate-fsdp2"])
def test_two_ranks_match_single_process_training(tmp_path, how, fsdp):
    proc = _run_torchrun(tmp_path, how, fsdp)
    if proc.returncode != 0:
        pytest.fail(f"torchrun exited with {proc.returncode}\n--- stdout ---\n{_tail(proc.stdout)}"
                    f"\n--- stderr ---\n{_tail(proc.stderr)}")
    reports = [json.loads((tmp_path / f"rank{r}" / "report.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in reports] == [2, 2]
    assert all(r["base_unchanged"] for r in reports), reports
    assert all(r["fsdp"] == r["base_sharded"] == fsdp for r in reports), reports
    if fsdp:  # each rank holds about half of the base (FSDP2 pads uneven shards)
        assert all(0.45 <= r["base_share_held"] <= 0.55 for r in reports), reports
        assert abs(sum(r["base_share_held"] for r in reports) - 1) < 0.01, reports
    ranks = [af.optim.trainable(af.load(tmp_path / f"rank{r}")) for r in (0, 1)]

    single, report = _load_script().train(STEPS, rank=0, world=1, optimizer=OPTIMIZER)
    assert report["base_unchanged"]
    want = af.optim.trainable(single)
    assert set(ranks[0]) == set(ranks[1]) == set(want) and len(want) == 6
    moved = 0.0
    for path, leaves in want.items():
        for name, w in leaves.items():
            r0, r1 = ranks[0][path][name], ranks[1][path][name]
            assert torch.equal(r0, r1), f"ranks disagree on {path}.{name}"
            torch.testing.assert_close(r0, w, rtol=1e-4, atol=1e-5, msg=lambda m, k=f"{path}.{name}": f"{k}: {m}")
            if name == "lora_B":
                moved = max(moved, w.abs().max().item())
    assert moved > 1e-3  # lora_B starts at zero: it trained
    # the losses the ranks averaged are the full-batch losses of single-process training
    torch.testing.assert_close(torch.tensor(reports[0]["losses"]), torch.tensor(report["losses"]), rtol=1e-5, atol=1e-6)
    assert reports[0]["losses"][-1] < reports[0]["losses"][0]


def test_adaptfn_on_an_fsdp2_sharded_base_equals_the_whole_model(tmp_path):
    """On a base sharded by FSDP2: fn(params), an injected LoRA, its autograd and torch.func.grad gradients
    equal the unsharded model's (on both ranks); replacements of sharded tensors and merging sharded
    weights are refused with typed errors."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    cmd = [*_launcher("torchrun", _free_port()), str(ROOT / "tests" / "workers" / "fsdp_checks.py"), str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=150, env=env, cwd=ROOT)
    assert proc.returncode == 0, f"--- stdout ---\n{_tail(proc.stdout)}\n--- stderr ---\n{_tail(proc.stderr)}"
    for r in (0, 1):
        rep = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert rep["sharded"]
        assert rep["fn"] == 0.0 and rep["inject"] <= 1e-6, rep
        assert rep["grad_scale"] > 1e-4 and rep["autograd"] <= 1e-6 and rep["func_grad"] <= 1e-6, rep
        assert rep["refused"]["inject"].startswith("IncompatibleAdapterError: adapter replaces 'lm_head.weight', "
                                                   "which FSDP shards"), rep
        assert "is sharded by FSDP (a DTensor)" in rep["refused"]["merge"], rep
