"""Smoke runs of the examples: they complete, and what they claim holds (PEFT reloads what adaptfn trained)."""

from __future__ import annotations

import json
import os
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
