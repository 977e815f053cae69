"""The method protocol (adaptfn.methods): the typed registry, declared capabilities and their refusal, the
shared LoRA-family config base (type and range checks of every field), and the package layout rules the
protocol relies on (adapter.py is a data module; no module reads another's private state)."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import math
import pathlib
import pkgutil
import re

import pytest
import torch
from conftest import gen, ids_for, tiny_opt

import adaptfn as af
from adaptfn import methods
from adaptfn.methods import base
from adaptfn.methods.common import LoraFamilyConfig
from adaptfn.methods.lora import Lora

ROOT = pathlib.Path(af.__file__).parent


# -- the registry -----------------------------------------------------------------------------------------
def test_registered_methods_satisfy_the_protocol() -> None:
    for name in ("lora", "ia3", "adalora"):
        m = methods.get_method(name)
        assert isinstance(m, base.Method)
        assert m.name == name and issubclass(m.config_cls, base.PeftConfigBase)
        assert isinstance(m.capabilities, frozenset) and m.capabilities <= base.CAPABILITIES
        assert base.ROUTE in m.capabilities  # all three route (AdaLoRA since the protocol clean-up)
        assert methods.method_for_config(m.config_cls(total_step=5) if name == "adalora" else m.config_cls()) is m


def test_register_refuses_what_is_not_a_method(monkeypatch) -> None:
    monkeypatch.setattr(methods, "_METHODS", dict(methods._METHODS))
    with pytest.raises(af.ConfigError, match="not an adaptfn Method.*missing"):
        methods.register(object())  # type: ignore[arg-type]

    class Twice(Lora):
        pass

    with pytest.raises(af.ConfigError, match="clashes with the registered 'lora'"):
        methods.register(Twice())

    class Flying(Lora):
        name, peft_type, capabilities = "flying", "FLYING", frozenset({"fly"})

    with pytest.raises(af.ConfigError, match="unknown capabilities \\['fly'\\]"):
        methods.register(Flying())


@dataclasses.dataclass(frozen=True)
class _NoRouteConfig(af.LoraConfig):
    peft_type = "LORA_NO_ROUTE"


class _NoRoute(Lora):
    """LoRA without the route capability: what a method that cannot route looks like to the callers."""

    name, peft_type, config_cls, capabilities = "lora-no-route", "LORA_NO_ROUTE", _NoRouteConfig, frozenset()


def test_a_missing_capability_is_refused_naming_the_method(monkeypatch) -> None:
    monkeypatch.setattr(methods, "_METHODS", dict(methods._METHODS))
    methods.register(_NoRoute())
    model = tiny_opt()
    fn, params = af.functional(model)
    a = af.init(fn, _NoRouteConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), generator=gen(0))
    assert a.method == "lora-no-route"
    stacked = af.stack([a, a])
    with pytest.raises(af.ConfigError, match="route= is not supported for lora-no-route adapters"):
        af.inject(fn, stacked, route=torch.tensor([0, 1]))
    with pytest.raises(af.ConfigError, match="lora-no-route"):
        af.inject(fn, stacked, route="all")
    ids = ids_for(model)  # everything else works as for LoRA
    out = torch.func.vmap(lambda ad: af.inject(fn, ad)(params, input_ids=ids).logits)(stacked)
    torch.testing.assert_close(out[1], af.inject(fn, a)(params, input_ids=ids).logits)
    # nor "scale" nor "combine": af.scale, the weighted select and af.combine refuse it, naming the method
    with pytest.raises(af.ConfigError, match="af.scale is not supported for lora-no-route adapters"):
        af.scale(a, 0.5)
    with pytest.raises(af.ConfigError, match="af.scale is not supported for lora-no-route"):
        af.select({"a": a}, {"a": 0.5})
    with pytest.raises(af.ConfigError, match="af.combine is not supported for lora-no-route adapters"):
        af.combine([a, a], [0.5, 0.5])


def test_register_refuses_combine_without_a_combine_function(monkeypatch) -> None:
    monkeypatch.setattr(methods, "_METHODS", dict(methods._METHODS))

    class NoCombine(_NoRoute):
        name, peft_type, capabilities, combine = "lora-nc", "LORA_NC", frozenset({base.COMBINE}), None

    with pytest.raises(af.ConfigError, match="declares 'combine' but has no combine"):
        methods.register(NoCombine())


def test_subclassed_configs_keep_their_method(tmp_path) -> None:
    @dataclasses.dataclass(frozen=True)
    class MyLora(af.LoraConfig):
        r: int = 2

    model = tiny_opt()
    fn, params = af.functional(model)
    a = af.init(fn, MyLora(target_modules=["q_proj"], init_lora_weights=False), generator=gen(0))
    assert a.method == "lora" and a.entries[a.paths[0]].r == 2
    af.save(a, tmp_path / "a")
    assert af.load(tmp_path / "a").entries == a.entries
    b = af.from_state_dict(af.state_dict(a), MyLora(target_modules=["q_proj"]))
    assert b.paths == a.paths


def test_a_config_class_is_refused_clearly() -> None:
    import peft

    sd = {"base_model.model.x.lora_A.weight": torch.zeros(2, 3), "base_model.model.x.lora_B.weight": torch.zeros(3, 2)}
    for cls in (af.LoraConfig, peft.LoraConfig):
        with pytest.raises(af.ConfigError, match="config is the class LoraConfig; pass an instance"):
            af.from_state_dict(sd, cls)


def test_adapters_pickle_and_deepcopy() -> None:
    import copy
    import pickle

    model = tiny_opt()
    fn, params = af.functional(model)
    a = af.init(fn, af.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), generator=gen(0))
    ia3 = af.init(fn, af.IA3Config(target_modules=["fc2"], feedforward_modules=["fc2"]))
    for x in (a, af.stack([a, a]), af.select({"a": a, "i": ia3}, ["a", "i"])):
        for y in (pickle.loads(pickle.dumps(x)), copy.deepcopy(x)):
            assert type(y) is type(x)
            flat_x, spec_x = af.tree.flatten(x)
            flat_y, spec_y = af.tree.flatten(y)
            assert spec_x == spec_y and all(torch.equal(u, v) for u, v in zip(flat_x, flat_y))
    ids = ids_for(model)
    torch.testing.assert_close(af.inject(fn, copy.deepcopy(a))(params, input_ids=ids).logits,
                               af.inject(fn, a)(params, input_ids=ids).logits, rtol=0, atol=0)


def test_stacked_called_directly_names_the_module() -> None:
    model = tiny_opt()
    fn, params = af.functional(model)
    a = af.init(fn, af.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]), generator=gen(0))
    ia3 = af.init(fn, af.IA3Config(target_modules=["fc2"], feedforward_modules=[]))
    ids = ids_for(model)
    with pytest.raises(af.IncompatibleAdapterError, match="^lm_head.weight: a stacked adapter was called directly"):
        af.inject(fn, af.stack([a, a]))(params, input_ids=ids)
    with pytest.raises(af.IncompatibleAdapterError,
                       match="^model.decoder.layers.0.self_attn.q_proj: a stacked adapter was called"):
        af.inject(fn, af.select(af.stack([a, a]), [p for p in a.paths if "q_proj" in p]))(params, input_ids=ids)
    with pytest.raises(af.IncompatibleAdapterError, match="^model.decoder.layers.0.fc2: a stacked adapter"):
        af.inject(fn, af.stack([ia3, ia3]))(params, input_ids=ids)


# -- the shared LoRA-family config ----------------------------------------------------------------------------
BAD_FIELDS = [
    ("r", 0), ("r", 2.0), ("r", True), ("r", "8"),
    ("lora_alpha", math.nan), ("lora_alpha", math.inf), ("lora_alpha", "16"), ("lora_alpha", True),
    ("lora_dropout", -0.1), ("lora_dropout", 1.0), ("lora_dropout", math.nan), ("lora_dropout", "0.1"),
    ("fan_in_fan_out", "false"), ("use_rslora", 1), ("use_dora", "False"), ("lora_bias", None),
    ("inference_mode", "true"), ("task_type", 3), ("revision", ["main"]), ("base_model_name_or_path", 1),
    ("bias", "some"), ("bias", None),
    ("init_lora_weights", "mica"), ("init_lora_weights", 1), ("init_lora_weights", None),
    ("target_modules", ["q_proj", 3]), ("target_modules", "(unclosed"), ("target_modules", 5),
    ("exclude_modules", [None]), ("modules_to_save", "lm_head"), ("modules_to_save", [1]),
    ("layers_to_transform", -1), ("layers_to_transform", [0, "1"]), ("layers_to_transform", 1.5),
    ("layers_pattern", 3),
    ("alpha_pattern", {"q_proj": math.nan}), ("alpha_pattern", ["q_proj"]), ("alpha_pattern", {"q_proj": "2"}),
]


@pytest.mark.parametrize("cls", [af.LoraConfig, af.AdaLoraConfig])
@pytest.mark.parametrize("field,value", BAD_FIELDS, ids=[f"{f}={v!r}" for f, v in BAD_FIELDS])
def test_every_lora_family_field_is_checked(cls, field, value) -> None:
    kw = {"total_step": 10} if cls is af.AdaLoraConfig else {}
    if field == "layers_pattern":
        kw["layers_to_transform"] = [0]
    with pytest.raises(af.ConfigError, match=rf"{cls.__name__}\.{field}") as e:
        cls(**kw, **{field: value})
    assert isinstance(e.value, ValueError)
    raw = {**cls(**kw).to_dict(), field: value}  # the same value read from an adapter_config.json
    with pytest.raises(af.ConfigError, match=rf"adapter_config.json: {cls.__name__}\.{field}"):
        cls.from_dict(raw)


@pytest.mark.parametrize("field,value", [("rank_pattern", {"q_proj": 0}), ("rank_pattern", {"q_proj": 2.0}),
                                         ("rank_pattern", ["q_proj"])])
def test_lora_rank_pattern_is_checked(field, value) -> None:
    with pytest.raises(af.ConfigError, match=f"LoraConfig.{field}"):
        af.LoraConfig(**{field: value})


def test_adalora_rank_pattern_masks_are_checked() -> None:
    with pytest.raises(af.ConfigError, match="has 2 entries.*init_r=4"):
        af.AdaLoraConfig(total_step=5, init_r=4, rank_pattern={"q_proj.lora_E": [True, False]})
    ok = af.AdaLoraConfig(total_step=5, init_r=2, target_r=1, rank_pattern={"q_proj.lora_E": [True, False]})
    assert ok.rank_for("q_proj") == 1


def test_lora_and_adalora_share_one_base() -> None:
    assert issubclass(af.LoraConfig, LoraFamilyConfig) and issubclass(af.AdaLoraConfig, LoraFamilyConfig)
    assert not issubclass(af.AdaLoraConfig, af.LoraConfig)  # each config maps to exactly one method
    shared = {f.name for f in dataclasses.fields(LoraFamilyConfig)}
    own = {f.name for f in dataclasses.fields(af.AdaLoraConfig)} - shared
    assert own == {"target_r", "init_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight",
                   "total_step"}
    for name in ("validate", "rank_and_alpha", "scaling"):
        assert name not in vars(af.AdaLoraConfig) or name == "validate"
    # LoRA's own fields (AdaLoRA refuses them): checked by LoraConfig.validate on top of the shared checks
    assert {f.name for f in dataclasses.fields(af.LoraConfig)} - shared == {
        "target_parameters", "trainable_token_indices", "ensure_weight_tying"}


@pytest.mark.parametrize("field,value", [("target_modules", [3]), ("feedforward_modules", 4), ("fan_in_fan_out", "no"),
                                         ("init_ia3_weights", 0), ("modules_to_save", "lm_head"),
                                         ("inference_mode", 1)])
def test_ia3_fields_are_checked(field, value) -> None:
    with pytest.raises(af.ConfigError, match=f"IA3Config.{field}"):
        af.IA3Config(**{field: value})


# -- layout rules ---------------------------------------------------------------------------------------------
def _imports(path: pathlib.Path) -> list[tuple[str, int, bool]]:
    """(module imported, line, inside a function) for every import of a source file."""
    tree = ast.parse(path.read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            inner = node.col_offset > 0
            if isinstance(node, ast.ImportFrom):
                out.append(("." * node.level + (node.module or ""), node.lineno, inner))
            else:
                out += [(a.name, node.lineno, inner) for a in node.names]
    return out


def test_adapter_module_is_data_only() -> None:
    mods = [m for m, _, _ in _imports(ROOT / "adapter.py")]
    assert not [m for m in mods if "methods" in m or m.startswith(".") and m not in (".errors",)], mods


def test_lazy_imports_only_for_optional_dependencies() -> None:
    """An import inside a function is allowed for optional packages (transformers, bitsandbytes) and for
    heavy ones imported only on a path that needs them; never for adaptfn's own modules."""
    for path in ROOT.rglob("*.py"):
        for mod, line, inner in _imports(path):
            if inner:
                assert not mod.startswith(".") and not mod.startswith("adaptfn"), f"{path.name}:{line}: {mod}"


def test_no_module_reads_anothers_private_state() -> None:
    for path in ROOT.rglob("*.py"):
        src = path.read_text()
        if path.name != "adapter.py":
            assert not re.search(r"\._tensors\b", src), f"{path}: reads Adapter._tensors"
        if path.name != "functional.py":
            assert not re.search(r"\bfn\._base\b|\._base\.(params|model|checkpointing|tensors)", src), path


def test_every_module_declares_its_public_names() -> None:
    for info in pkgutil.walk_packages(af.__path__, "adaptfn."):
        if info.name == "adaptfn.tree":
            continue
        mod = importlib.import_module(info.name)
        names = getattr(mod, "__all__", None)
        assert names is not None, f"{info.name} has no __all__"
        missing = [n for n in names if not hasattr(mod, n)]
        assert not missing, f"{info.name}.__all__ names missing objects: {missing}"
