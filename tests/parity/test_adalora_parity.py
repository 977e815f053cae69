"""AdaLoRA parity with the real ``peft`` package: PEFT's files read and written both ways with the same logits
(max relative error <= 1e-5 in float32), merge against PEFT's merge_and_unload, exact masking, and training:
the same model, data, seed and AdamW run through PEFT (``update_and_allocate`` after each optimiser step,
its orthogonal regulariser in the loss) and through adaptfn (``torch.func.grad`` + ``af.adalora``) end with
the same rank pattern and weights; the pruned adapter each side saves loads on the other side."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import peft
import pytest
import torch
import torch.utils._pytree as torch_pytree
from conftest import assert_close, gen, ids_for, rel_err, shapes, tiny_gpt2, tiny_llama, tiny_opt
from peft.utils import get_peft_model_state_dict

import adaptfn as af
from parity.peft_models import peft_model, peft_reload

TOL = 1e-5

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def peft_from_pretrained(build, folder) -> peft.PeftModel:
    return peft_reload(build(), folder)


def make_peft(build, seed: int = 1234, **kw) -> peft.PeftModel:
    """A PeftModel with random A, E, B (``init_lora_weights=False``: standard normal draws)."""
    return peft_model(build(), peft.AdaLoraConfig, dict(init_lora_weights=False, **kw), seed)


@dataclass(frozen=True)
class Case:
    id: str
    build: Any
    kw: dict[str, Any]


BASE = dict(total_step=50, target_r=2)
CASES = [
    Case("opt", tiny_opt, dict(init_r=5, lora_alpha=7, target_modules=["q_proj", "v_proj", "fc1"], **BASE)),
    Case("llama", tiny_llama, dict(init_r=3, lora_alpha=4, target_modules=["k_proj", "o_proj", "down_proj"],
                                   **BASE)),
    Case("gpt2-conv1d", tiny_gpt2, dict(init_r=4, lora_alpha=9, target_modules=["c_attn", "c_proj"], **BASE)),
    Case("opt-layers", tiny_opt, dict(init_r=3, lora_alpha=2, target_modules=["k_proj", "fc2"],
                                            layers_to_transform=[1], **BASE)),
    Case("opt-bias-all-modules-to-save", tiny_opt, dict(init_r=4, lora_alpha=6, target_modules=["v_proj"], bias="all",
                                                        modules_to_save=["lm_head"], **BASE)),
]
IDS = [c.id for c in CASES]


def _perturb_trainable(pm: peft.PeftModel) -> None:
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if p.requires_grad and "lora_" not in name:
                p.add_(0.5 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_peft_saved_adapter_gives_peft_outputs(case: Case, tmp_path) -> None:
    pm = make_peft(case.build, **case.kw)
    _perturb_trainable(pm)
    ids = ids_for(pm.get_base_model())
    with torch.no_grad():
        ref = pm(input_ids=ids).logits
    pm.save_pretrained(tmp_path)

    a = af.load(tmp_path)
    assert a.method == "adalora"
    fn, params = af.functional(case.build())
    out = af.inject(fn, a)(params, input_ids=ids).logits
    base = fn(params, input_ids=ids).logits
    assert rel_err(base, ref) > 1e-3, "vacuous comparison"
    assert_close(out, ref)
    merged = af.merge(params, a)
    assert_close(fn(merged, input_ids=ids).logits, out, "merge vs inject")
    assert torch.equal(af.inject(fn, af.mask(a, False))(params, input_ids=ids).logits, base)
    with torch.no_grad():
        peft_sd = get_peft_model_state_dict(pm)
    assert shapes(af.state_dict(a)) == shapes(peft_sd)
    for k, v in af.state_dict(a).items():
        assert torch.equal(v, peft_sd[k]), k
    if case.kw.get("bias", "none") == "none":  # PEFT's merge_and_unload, where nothing else is replaced
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            ref_merged = pm.merge_and_unload()(input_ids=ids).logits
        assert_close(fn(merged, input_ids=ids).logits, ref_merged, "merge vs PEFT merge_and_unload")


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_adaptfn_saved_adapter_gives_same_outputs_in_peft(case: Case, tmp_path) -> None:
    model = case.build()
    fn, params = af.functional(model)
    a = af.init(fn, af.AdaLoraConfig(init_lora_weights=False, **case.kw), generator=gen(0))
    a = af.tree.map(lambda t: t + 0.3 if t.dim() == 1 else t, a)  # trained biases off the base
    ids = ids_for(model)
    out = af.inject(fn, a)(params, input_ids=ids).logits
    af.save(a, tmp_path)
    pm = peft_from_pretrained(case.build, tmp_path)
    with torch.no_grad():
        ref = pm(input_ids=ids).logits
    assert rel_err(fn(params, input_ids=ids).logits, ref) > 1e-3, "vacuous comparison"
    assert_close(out, ref)
    assert shapes(af.state_dict(a)) == shapes(get_peft_model_state_dict(make_peft(case.build, **case.kw)))


# -- training ----------------------------------------------------------------------------------------
T = 24
TRAIN_KW = dict(task_type="CAUSAL_LM", init_r=5, target_r=2, lora_alpha=9, total_step=T, tinit=3, tfinal=5,
                deltaT=2, orth_reg_weight=0.3, beta1=0.8, beta2=0.9, target_modules=["q_proj", "v_proj", "fc1"])
LR = 2e-2


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Any]:
    """Train the same AdaLoRA adapter through PEFT and through adaptfn; return both ends."""
    d = tmp_path_factory.mktemp("adalora_train")
    data = [ids_for(tiny_opt(), batch=2, seq=9, seed=100 + i) for i in range(T)]

    # PEFT, as its docs train it
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(tiny_opt(), peft.AdaLoraConfig(**TRAIN_KW))
    pm.save_pretrained(d / "init")
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=LR)
    for step in range(T):
        out = pm(input_ids=data[step], labels=data[step])  # the loss includes PEFT's orth_reg term
        out.loss.backward()
        opt.step()
        pm.base_model.update_and_allocate(step)
        opt.zero_grad()
    pm.eval()
    peft_pattern = {k.replace(".default", ""): v for k, v in pm.peft_config["default"].rank_pattern.items()}
    peft_full = {n.replace(".default", ""): p.detach().clone() for n, p in pm.named_parameters() if "lora_" in n}
    pm.save_pretrained(d / "peft")  # PEFT saves the pruned tensors and the rank_pattern

    # adaptfn: the same initial adapter, torch.func.grad, the allocator, the same AdamW on the leaves
    fn, params = af.functional(tiny_opt())
    a = af.load(d / "init")
    leaves, spec = torch_pytree.tree_flatten(a)
    leaves = [t.clone() for t in leaves]
    trainable = [t for t in leaves if t.dim() > 0]  # not the 0-d gates
    opt2 = torch.optim.AdamW(trainable, lr=LR)
    alloc = af.adalora.rank_allocator(a.config)
    state = alloc.init(a)

    def loss_fn(ad: af.Adapter, x: torch.Tensor) -> torch.Tensor:
        return af.inject(fn, ad)(params, input_ids=x, labels=x).loss + af.adalora.orth_reg(ad)

    grad_fn = torch.func.grad(loss_fn)
    for step in range(T):
        grads = grad_fn(torch_pytree.tree_unflatten(leaves, spec), data[step])
        for t, g in zip(leaves, torch_pytree.tree_leaves(grads)):
            if t.dim() > 0:
                t.grad = g
        opt2.step()
        new, state = alloc.update(torch_pytree.tree_unflatten(leaves, spec), grads, state, step)
        with torch.no_grad():
            for t, n in zip(leaves, torch_pytree.tree_leaves(new)):
                if n is not t:
                    t.copy_(n)
        for t in trainable:
            t.grad = None
    ours = torch_pytree.tree_unflatten(leaves, spec)
    return dict(pm=pm, peft_pattern=peft_pattern, peft_full=peft_full, dir=d, fn=fn, params=params, ours=ours,
                pattern=alloc.rank_pattern(state), ids=ids_for(tiny_opt(), batch=3, seq=6, seed=7))


def test_training_matches_peft(trained) -> None:
    pattern, peft_pattern = trained["pattern"], trained["peft_pattern"]
    assert pattern == peft_pattern
    ranks = [sum(m) for m in pattern.values()]
    assert sum(ranks) == TRAIN_KW["target_r"] * len(ranks)  # the final budget
    assert len(set(ranks)) > 1, "pruning left every module at the same rank: a weak test"
    ours = trained["ours"]
    for p, d in ours.tensors.items():
        for n in ("lora_A", "lora_E", "lora_B"):
            ref = trained["peft_full"][f"base_model.model.{p}.{n}"]
            assert_close(d[n], ref, f"{p}.{n}", tol=1e-4)
        keep = torch.tensor(pattern[f"{p}.lora_E"])
        assert torch.count_nonzero(d["lora_E"].flatten()[~keep]) == 0  # pruned = zero singular values
        assert d["lora_E"].shape == (5, 1)  # shapes never change while training


def test_peft_pruned_adapter_loads_in_adaptfn(trained) -> None:
    pm, fn, params, ids = trained["pm"], trained["fn"], trained["params"], trained["ids"]
    a = af.load(trained["dir"] / "peft")
    assert a.config.rank_pattern == trained["peft_pattern"]
    for p, e in a.entry_items:
        assert e.r == sum(trained["peft_pattern"][f"{p}.lora_E"])
        assert e.scaling == pytest.approx(TRAIN_KW["lora_alpha"] / (TRAIN_KW["init_r"] + 1e-5))
    with torch.no_grad():
        ref_mem = pm(input_ids=ids).logits
        ref_loaded = peft_from_pretrained(tiny_opt, trained["dir"] / "peft")(input_ids=ids).logits
    out = af.inject(fn, a)(params, input_ids=ids).logits
    assert rel_err(fn(params, input_ids=ids).logits, ref_mem) > 1e-3, "vacuous comparison"
    assert_close(out, ref_loaded, "PEFT from_pretrained")
    assert_close(out, ref_mem, "PEFT in memory")
    assert_close(fn(af.merge(params, a), input_ids=ids).logits, out, "merge vs inject")


def test_adaptfn_pruned_adapter_loads_in_peft(trained, tmp_path) -> None:
    fn, params, ids = trained["fn"], trained["params"], trained["ids"]
    ours = trained["ours"]
    pruned = af.adalora.prune(ours, trained["pattern"])
    want = af.inject(fn, ours)(params, input_ids=ids).logits
    assert_close(af.inject(fn, pruned)(params, input_ids=ids).logits, want, "pruned vs training adapter")
    af.save(pruned, tmp_path)
    with torch.no_grad():
        ref = peft_from_pretrained(tiny_opt, tmp_path)(input_ids=ids).logits
    assert_close(want, ref)
    peft_sd = get_peft_model_state_dict(trained["pm"])
    assert shapes(af.state_dict(pruned)) == shapes(peft_sd)
    for k, v in af.state_dict(pruned).items():
        assert_close(v, peft_sd[k], k, tol=1e-4)


def test_rank_pattern_with_a_rank_zero_module_both_ways(tmp_path) -> None:
    """Masks set by hand (one module pruned to rank 0): PEFT's save resizes by them and adaptfn loads the
    result; adaptfn's prune + save loads in PEFT; both give PEFT's outputs."""
    kw = dict(init_r=4, target_r=1, lora_alpha=5, total_step=10, target_modules=["k_proj", "down_proj"])
    pm = make_peft(tiny_llama, **kw)
    paths = sorted(n[len("base_model.model."):-len(".lora_E.default")] for n, _ in pm.named_parameters()
                   if n.endswith("lora_E.default"))
    masks = {f"{p}.lora_E": [(i + k) % 3 == 0 for i in range(4)] for k, p in enumerate(paths)}
    masks[f"{paths[0]}.lora_E"] = [False] * 4
    with torch.no_grad():  # zero the dropped singular values, as the allocator leaves them
        for n, p in pm.named_parameters():
            if n.endswith("lora_E.default"):
                key = n[len("base_model.model."):-len(".default")]
                p.mul_(torch.tensor(masks[key], dtype=p.dtype).view(-1, 1))
    ids = ids_for(pm.get_base_model())
    with torch.no_grad():
        ref = pm(input_ids=ids).logits
    pm.peft_config["default"].rank_pattern = dict(masks)
    pm.save_pretrained(tmp_path / "peft")

    a = af.load(tmp_path / "peft")
    assert a.entries[paths[0]].r == 0 and a.tensors[paths[0]]["lora_A"].shape[0] == 0
    fn, params = af.functional(tiny_llama())
    out = af.inject(fn, a)(params, input_ids=ids).logits
    assert rel_err(fn(params, input_ids=ids).logits, ref) > 1e-3, "vacuous comparison"
    assert_close(out, ref, "PEFT in memory")
    with torch.no_grad():
        assert_close(out, peft_from_pretrained(tiny_llama, tmp_path / "peft")(input_ids=ids).logits, "PEFT loaded")

    # adaptfn: the full adapter PEFT started from, pruned by the same masks, read by PEFT
    full = make_peft(tiny_llama, **kw)
    full.save_pretrained(tmp_path / "full")
    b = af.load(tmp_path / "full")
    keep = {p: torch.tensor(masks[f"{p}.lora_E"]).view(-1, 1) for p in paths}
    b = af.Adapter(b.method, b.config, dict(b.entries),
                   {p: {**d, "lora_E": d["lora_E"] * keep[p]} for p, d in b.tensors.items()})
    pruned = af.adalora.prune(b, masks)
    af.save(pruned, tmp_path / "af")
    with torch.no_grad():
        ref_b = peft_from_pretrained(tiny_llama, tmp_path / "af")(input_ids=ids).logits
    assert_close(af.inject(fn, pruned)(params, input_ids=ids).logits, ref_b, "adaptfn pruned in PEFT")
    assert_close(ref_b, ref, "same adapter both ways")
