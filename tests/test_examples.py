"""Smoke runs of the examples: they complete, and what they claim holds (PEFT reloads what adaptfn trained);
the quickstart (./scripts/demo) prints adaptfn's own output and nothing else."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import torch

import adaptfn as af

ROOT = Path(__file__).resolve().parents[1]


def test_train_minilm_short_run_reloads_in_peft(tmp_path):
    out = tmp_path / "adapter"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, str(ROOT / "examples" / "train_minilm.py"), "--steps", "5", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, proc.stdout[-3000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["steps"] == 5
    assert result["peft_same_predictions"] is True
    assert result["peft_max_logit_diff"] <= 1e-5
    assert 0.0 <= result["before"] <= 1.0 and 0.0 <= result["after"] <= 1.0
    # the saved adapter: LoRA on query/value of the 6 layers, and the trained head as modules_to_save
    adapter = af.load(out)
    assert sorted({p.rsplit(".", 1)[-1] for p in adapter.paths}) == ["classifier", "query", "value"]
    head = adapter.tensors["classifier"]
    assert head["weight"].shape == (4, 384) and torch.isfinite(head["weight"]).all()
    assert json.loads((out / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"


def test_learn_mixture_short_run_reloads_in_peft(tmp_path):
    """examples/learn_mixture.py, 2 adapters and 2 steps of each phase: it runs end to end, and PEFT reloads the
    learned mix (one LoRA adapter, the weights folded in) with the same predictions."""
    out = tmp_path / "mix"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, str(ROOT / "examples" / "learn_mixture.py"), "--k", "2", "--steps", "2", "--mix-steps", "2",
           "--per-module", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, proc.stdout[-3000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["peft_same_predictions"] is True and result["peft_max_logit_diff"] <= 1e-4
    assert len(result["singles"]) == 2 and all(0 <= x <= 1 for x in [*result["singles"], result["uniform"],
                                                                     result["learned"]])
    assert torch.tensor(result["weights"]).shape == (2, 7)  # per adapter: 6 layers and the head
    mixed = af.load(out)  # one LoRA adapter: the two of rank 4 concatenated
    assert mixed.config.r == 8 and sorted({p.rsplit(".", 1)[-1] for p in mixed.paths}) == ["classifier", "query",
                                                                                          "value"]


def _demo_env() -> dict[str, str]:
    """The variables scripts/demo exports (read from the script, so the test follows it)."""
    script = (ROOT / "scripts" / "demo").read_text()
    exports = [ln for ln in script.splitlines() if ln.startswith("export ")]
    assert len(exports) == 1, exports
    pairs = dict(item.split("=", 1) for item in shlex.split(exports[0])[1:])
    assert "HF_HUB_OFFLINE" in pairs, pairs
    return pairs


def test_quickstart_first_run_is_clean():
    """scripts/demo's run of examples/quickstart.py: the same variables, cwd and script, this interpreter, this
    checkout's adaptfn. Nothing but the walkthrough: no warning, log record or progress bar of a dependency
    (bitsandbytes' kernels notice via ``import peft``, transformers' FutureWarning via PEFT, torch's vmap
    fallback warning for SDPA attention, transformers' loading bar) -- stderr stays empty."""
    script = (ROOT / "scripts" / "demo").read_text()
    assert "examples/quickstart.py" in script
    env = {**os.environ, **_demo_env(), "PYTHONPATH": os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    proc = subprocess.run([sys.executable, "examples/quickstart.py"], capture_output=True, text=True,
                          timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert proc.stderr == "", proc.stderr
    assert not re.search(r"warn", proc.stdout, re.IGNORECASE), proc.stdout
    steps = [ln.split(".", 1)[0] for ln in proc.stdout.splitlines() if re.match(r"\d+\. ", ln)]
    assert steps == [str(i) for i in range(1, 8)], proc.stdout
    assert "bit-identical to base: True" in proc.stdout and "adaptfn reload == original: True" in proc.stdout
    assert proc.stdout.splitlines()[-1].startswith("done in ")
