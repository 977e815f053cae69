"""Data-parallel LoRA training with torch.distributed and adaptfn's functional pieces.

Each process computes ``torch.func.grad`` of the adapter on its shard of the batch, the gradient's
trainable leaves are averaged over processes with ``torch.distributed.all_reduce``, and every process
applies the same ``af.optim`` update, so all of them hold the same adapter (what DDP does, with the
adapter as an explicit tree instead of module parameters). The model is a small OPT built from a config
and a fixed seed, so the example runs anywhere, offline, in seconds.

With ``--fsdp`` the base model is sharded first with PyTorch's FSDP2 (``fully_shard`` on every decoder
layer, then on the whole model), as users whose base does not fit in one process do: each rank then holds
about half of the base's parameters (DTensor shards), FSDP all-gathers each layer's full weights around
its forward and backward, and the adapter stays replicated, its gradients averaged as above.

Run (two processes on CPU, gloo backend), with torchrun or with accelerate's launcher:

    python -m torch.distributed.run --nproc_per_node=2 examples/distributed_train.py --out /tmp/dist [--fsdp]
    accelerate launch --multi_gpu --num_processes 2 examples/distributed_train.py --out /tmp/dist --fsdp

(``--multi_gpu`` is accelerate's name for its torchrun launcher; on a machine without GPUs the processes use
gloo on the CPU. accelerate's ``--cpu`` would start one process.)

Each rank writes its adapter to ``<out>/rank<r>`` (PEFT's format, ``af.save``) and a ``report.json``
there (losses, and whether the base model is unchanged). ``train(..., world=1, rank=0)`` in one process
on the whole batch gives the same adapter (``tests/test_distributed.py`` checks it).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time
from pathlib import Path

import torch

import adaptfn as af

BATCH, SEQ = 8, 12


def build_model(seed: int = 0) -> torch.nn.Module:
    """A small OPT language model, the same on every process (seeded)."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    cfg = OPTConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, ffn_dim=48, num_attention_heads=4,
                    max_position_embeddings=64, word_embed_proj_dim=32, pad_token_id=1, bos_token_id=2,
                    eos_token_id=2, attn_implementation="eager")
    return OPTForCausalLM(cfg).eval()


def full_batch() -> torch.Tensor:
    """The global batch of token ids [BATCH, SEQ]; each rank trains on a contiguous shard of it."""
    g = torch.Generator().manual_seed(1234)
    return torch.randint(3, 97, (BATCH, SEQ), generator=g)


def make_optimizer(name: str) -> af.optim.Optimizer:
    if name == "adamw":
        return af.optim.adamw(lr=af.optim.cosine(2e-2, total_steps=20), weight_decay=0.01)
    if name == "sgd":
        return af.optim.sgd(0.5, momentum=0.9)
    raise ValueError(f"unknown optimizer {name!r}")


def _mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    out = t.detach().clone()  # all_reduce works in place: never on a tensor someone else holds
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()


def _from_rank0(t: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    out = t.detach().clone()
    dist.broadcast(out, src=0)
    return out


def shard_base(model: torch.nn.Module) -> torch.nn.Module:
    """FSDP2: shard every decoder layer, then the rest (embeddings, final norm) at the root. The base is
    frozen first, so FSDP reduces no gradient of it."""
    from torch.distributed.fsdp import fully_shard

    model.requires_grad_(False)
    for layer in model.model.decoder.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor (a DTensor's shard, or the tensor itself)."""
    return t.to_local() if hasattr(t, "to_local") else t


def train(steps: int, rank: int = 0, world: int = 1, optimizer: str = "adamw",
          fsdp: bool = False) -> tuple[af.Adapter, dict]:
    """Train a LoRA adapter of :func:`build_model` for ``steps`` steps on this rank's shard.

    Arguments:
        steps: number of optimiser updates.
        rank, world: this process's rank and the number of processes (``world=1``: the whole batch, no
            communication).
        optimizer: "adamw" or "sgd".
        fsdp: shard the base model with FSDP2 first (:func:`shard_base`; needs a process group).

    Returns:
        ``(adapter, report)``: the trained adapter and a dict with the losses, the base-model checks and
        the share of the base's parameters this rank holds.
    """
    model = build_model()
    full = sum(p.numel() for p in model.parameters())
    if fsdp:
        model = shard_base(model)
    held = sum(_local(p).numel() for p in model.parameters())
    before = {k: (_local(v)._version, _local(v).detach().clone()) for k, v in model.state_dict(keep_vars=True).items()}
    fn, params = af.functional(model)
    cfg = af.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "fc1"])
    adapter = af.init(fn, cfg, generator=torch.Generator().manual_seed(0))
    if world > 1:  # identical already (same seed); broadcasting makes rank 0 the source of truth anyway
        adapter = af.optim.map_trainable(_from_rank0, adapter)
    shard = full_batch().chunk(world)[rank]

    def loss_fn(a: af.Adapter, ids: torch.Tensor) -> torch.Tensor:
        return af.inject(fn, a)(params, input_ids=ids, labels=ids).loss

    opt = make_optimizer(optimizer)
    state = opt.init(adapter)
    losses = []
    for _ in range(steps):
        grads, loss = torch.func.grad_and_value(loss_fn)(adapter, shard)
        if world > 1:  # equal shards: the mean of the shard means is the full-batch mean
            grads = af.optim.map_trainable(_mean_over_ranks, grads)
            loss = _mean_over_ranks(loss)
        adapter, state = opt.update(grads, state, adapter)
        losses.append(float(loss))
    after = model.state_dict(keep_vars=True)
    unchanged = all(_local(after[k])._version == v and torch.equal(_local(after[k]), t) for k, (v, t) in before.items())
    sharded = all(type(p.data).__name__ == "DTensor" for p in model.parameters())
    return adapter, {"rank": rank, "world": world, "losses": losses, "base_unchanged": unchanged,
                     "fsdp": fsdp, "base_sharded": sharded, "base_share_held": held / full}


def main() -> None:
    import torch.distributed as dist

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for rank<r>/ adapters and reports")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds for the process group to form / a collective")
    ap.add_argument("--fsdp", action="store_true", help="shard the base model with FSDP2 (fully_shard)")
    args = ap.parse_args()

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=args.timeout))
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        t0 = time.perf_counter()
        adapter, report = train(args.steps, rank, world, args.optimizer, fsdp=args.fsdp)
        out = Path(args.out) / f"rank{rank}"
        af.save(adapter, out)
        report["seconds"] = round(time.perf_counter() - t0, 2)
        (out / "report.json").write_text(json.dumps(report, indent=1))
        print(f"[rank {rank}/{world}] losses {[round(x, 4) for x in report['losses']]} -> {out}", flush=True)
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
