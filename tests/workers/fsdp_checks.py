"""Run under ``torchrun --nproc_per_node=2`` by tests/test_distributed.py: adaptfn on an FSDP2-sharded base.

On each rank: a tiny OPT sharded with ``fully_shard`` (every decoder layer, then the root) against the same
model unsharded; writes ``<out>/rank<r>.json`` with the max abs differences of ``fn(params)``, an injected
LoRA, its autograd and ``torch.func.grad`` gradients, and the typed errors for what is refused (replacements
of sharded tensors, merging sharded weights).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import gen, ids_for, tiny_opt  # noqa: E402

import adaptfn as af  # noqa: E402


def _grads(fn: af.FunctionalModel, params: dict, a: af.Adapter, ids: torch.Tensor) -> list[torch.Tensor]:
    leaves = af.tree.map(lambda t: t.detach().requires_grad_(t.is_floating_point() and t.dim() > 0), a)
    loss = af.inject(fn, leaves)(params, input_ids=ids, labels=ids).loss
    return list(torch.autograd.grad(loss, [leaves.leaves(p)[n] for p in a.paths for n in ("lora_A", "lora_B")]))


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    try:
        from torch.distributed.fsdp import fully_shard

        rank = dist.get_rank()
        model, ref = tiny_opt(), tiny_opt()
        model.requires_grad_(False)
        for layer in model.model.decoder.layers:
            fully_shard(layer)
        fully_shard(model)
        fn, params = af.functional(model)
        rfn, rparams = af.functional(ref)
        ids = ids_for(ref, batch=4)
        a = af.init(fn, af.LoraConfig(r=3, target_modules=["q_proj", "v_proj", "fc1"], init_lora_weights=False),
                    generator=gen(0))
        report: dict = {"sharded": all(type(p.data).__name__ == "DTensor" for p in model.parameters())}
        with torch.no_grad():
            report["fn"] = (fn(params, input_ids=ids).logits - ref(input_ids=ids).logits).abs().max().item()
            report["inject"] = (af.inject(fn, a)(params, input_ids=ids).logits
                                - af.inject(rfn, a)(rparams, input_ids=ids).logits).abs().max().item()
        report["autograd"] = max((x - y).abs().max().item()
                                 for x, y in zip(_grads(fn, params, a, ids), _grads(rfn, rparams, a, ids)))
        g = torch.func.grad(lambda ad: af.inject(fn, ad)(params, input_ids=ids, labels=ids).loss)(a)
        gr = torch.func.grad(lambda ad: af.inject(rfn, ad)(rparams, input_ids=ids, labels=ids).loss)(a)
        report["func_grad"] = max((g.leaves(p)[n] - gr.leaves(p)[n]).abs().max().item()
                                  for p in a.paths for n in ("lora_A", "lora_B"))
        report["grad_scale"] = max(gr.leaves(p)["lora_B"].abs().max().item() for p in a.paths)
        mts = af.init(fn, af.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]), generator=gen(1))
        refused = {}
        for what, call in (("inject", lambda: af.inject(fn, mts)), ("merge", lambda: af.merge(params, a))):
            try:
                call()
                refused[what] = None
            except af.AdaptfnError as e:
                refused[what] = f"{type(e).__name__}: {e}"
        report["refused"] = refused
        (out / f"rank{rank}.json").write_text(json.dumps(report))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
