"""Every ``>>>`` example in adaptfn's docstrings runs (doctest), on tiny models built here.

Each module's examples run in a fresh namespace that holds what the examples name: ``af``, ``torch``, a tiny
OPT ``model`` with ``fn, params = af.functional(model)``, token ``ids``, a LoRA ``adapter`` (and ``a1``..``a3``),
a ``loss_fn`` and ``batches``; the AdaLoRA, quantization and distributed examples get the objects they need
(an AdaLoRA adapter, a 4-bit Llama, a one-process gloo group, a loopback Hub that takes uploads). Examples that
write files run in a temp folder.
Output lines in the examples are compared as doctest does.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil
import warnings
from typing import Any

import pytest
import torch
from conftest import gen, ids_for, tiny_opt

import adaptfn as af

MODULES = sorted(m.name for m in pkgutil.walk_packages(af.__path__, "adaptfn.") if m.name != "adaptfn.tree")


def _examples() -> list[tuple[str, doctest.DocTest]]:
    finder = doctest.DocTestFinder(exclude_empty=True)
    out = []
    for name in MODULES:
        mod = importlib.import_module(name)
        # the finder keeps the docstrings of objects defined in the module (re-exports run where they live)
        out += [(name, t) for t in finder.find(mod, name) if t.examples]
    return out


EXAMPLES = _examples()


def _base_globs() -> dict[str, Any]:
    model = tiny_opt()
    fn, params = af.functional(model)
    ids = ids_for(model)
    targets = ["q_proj", "v_proj"]
    a1, a2, a3 = (af.init(fn, af.LoraConfig(r=2 + i, target_modules=targets, init_lora_weights=False),
                          generator=gen(i)) for i in range(3))

    def loss_fn(adapter: af.Adapter, batch: torch.Tensor) -> torch.Tensor:
        return af.inject(fn, adapter)(params, input_ids=batch, labels=batch).loss

    return dict(af=af, torch=torch, model=model, fn=fn, params=params, ids=ids, adapter=a1, a1=a1, a2=a2, a3=a3,
                adapters={"a1": a1, "a2": a2, "a3": a3}, loss_fn=loss_fn, batch=ids, batches=[ids, ids.flip(0)])


def _adalora_globs(g: dict[str, Any]) -> None:
    fn, params = g["fn"], g["params"]
    cfg = af.AdaLoraConfig(init_r=4, target_r=2, target_modules=["q_proj", "v_proj"], total_step=4, tinit=1,
                           tfinal=1, deltaT=1)
    adapter = af.init(fn, cfg, generator=gen(5))

    def loss_fn(a: af.Adapter, batch: torch.Tensor) -> torch.Tensor:
        return af.inject(fn, a)(params, input_ids=batch, labels=batch).loss + af.adalora.orth_reg(a)

    def sgd(a: af.Adapter, grads: af.Adapter) -> af.Adapter:
        return af.tree.map(lambda t, d: t - 0.1 * d if d.is_floating_point() else t, a, grads)

    g.update(cfg=cfg, adapter=adapter, loss_fn=loss_fn, sgd=sgd)


def _quant_globs(g: dict[str, Any], tmp_path: Any) -> None:
    from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=67, hidden_size=128, num_hidden_layers=1, intermediate_size=256,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                      tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
        model = LlamaForCausalLM.from_pretrained(tmp_path / "llama", quantization_config=q).eval()
    fn, params = af.functional(model)
    w = params["model.layers.0.self_attn.q_proj.weight"]
    delta = 0.01 * torch.randn(128, 128, generator=gen(3))
    g.update(model=model, fn=fn, params=params, w=w, delta=delta)


def _hub_globs(g: dict[str, Any], tmp_path: Any, monkeypatch: Any, request: Any) -> None:
    """A loopback Hub (tests/test_hub.py) that takes uploads with ``token`` into the namespace ``user``."""
    from huggingface_hub import close_session, constants
    from test_hub import FakeHub, _online

    hub = FakeHub()
    hub.start()
    request.addfinalizer(hub.stop)
    request.addfinalizer(close_session)
    _online(monkeypatch, hub.endpoint)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    hub.writers["hf_doc_token"] = "user"
    g["token"] = "hf_doc_token"


@pytest.fixture
def one_process_group(tmp_path):
    import torch.distributed as dist

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_every_module_has_examples_collected() -> None:
    names = {t.name for _, t in EXAMPLES}
    for must in ("adaptfn.transforms.inject", "adaptfn.io.save", "adaptfn.stacking.stack", "adaptfn.optim.adamw",
                 "adaptfn.functional.functional", "adaptfn.quant.dequantize"):
        assert must in names, must


@pytest.mark.parametrize("module,test", EXAMPLES, ids=[t.name for _, t in EXAMPLES])
def test_docstring_example_runs(module: str, test: doctest.DocTest, tmp_path, monkeypatch, request) -> None:
    g = _base_globs()
    if module == "adaptfn.methods.adalora_alloc":
        _adalora_globs(g)
    if module == "adaptfn.quant":
        _quant_globs(g, tmp_path)
    if "push_to_hub" in "".join(e.source for e in test.examples):
        _hub_globs(g, tmp_path, monkeypatch, request)
    if "torch.distributed" in "".join(e.source for e in test.examples):
        request.getfixturevalue("one_process_group")
        g["grads"] = torch.func.grad(g["loss_fn"])(g["adapter"], g["ids"])
    monkeypatch.chdir(tmp_path)
    test.globs = {**test.globs, **g}
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = runner.run(test, out=report.append, clear_globs=True)
    assert result.failed == 0, f"{test.name} ({test.filename}:{test.lineno}):\n" + "".join(report)
