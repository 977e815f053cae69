"""Generate a corpus of bad adapter folders, each with the error adaptfn must raise (no binary files are
committed: every case is made here from a good adapter of a tiny model).

    python tests/corpus/make_corpus.py OUT_DIR      # writes OUT_DIR/<case>/ and OUT_DIR/cases.json

Each case is a folder (or a path) plus:

* ``error``: the class ``af.load`` must raise (``ConfigError``, ``AdapterFileError``,
  ``IncompatibleAdapterError``) and ``fragment``: a piece of its message (a regex, searched);
* ``kwargs``: extra arguments of ``af.load`` (JSON-able, with ``"dtype"`` / ``"device"`` given by name);
* ``state_dict``: whether ``af.from_state_dict`` applies (the config parses as JSON and the weights file
  reads): it must then raise ``ConfigError`` with ``sd_fragment`` (default: ``fragment``).

Classes: config bytes (encoding, syntax, nesting, size, number limits), config fields of every config
class (types, ranges, NaN / infinities, regexes, unsupported PEFT features), weights files (damage, keys,
shapes, dtypes), layout (missing files, folders in the way, pickles) and arguments (types, devices,
dtypes, paths that do not exist or escape).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from typing import Any

import torch
from safetensors.torch import load_file, save_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # tests/, for conftest's tiny models

import adaptfn as af  # noqa: E402

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
BIN = "adapter_model.bin"
PREFIX = "base_model.model."
Q0 = "model.decoder.layers.0.self_attn.q_proj"
K0 = "model.decoder.layers.0.self_attn.k_proj"
FC2 = "model.decoder.layers.0.fc2"

CFG_ERR, FILE_ERR, FIT_ERR = "ConfigError", "AdapterFileError", "IncompatibleAdapterError"


def _adapters() -> dict[str, Any]:
    from conftest import gen, tiny_opt

    fn, _ = af.functional(tiny_opt())
    lora = af.init(fn, af.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
                   generator=gen(0))
    ia3 = af.init(fn, af.IA3Config(target_modules=["k_proj", "fc2"], feedforward_modules=["fc2"],
                                   init_ia3_weights=False), generator=gen(1))
    ada = af.init(fn, af.AdaLoraConfig(init_r=4, target_r=2, target_modules=["q_proj"], total_step=100, tinit=10,
                                       tfinal=10, init_lora_weights=False), generator=gen(2))
    return {"lora": lora, "ia3": ia3, "adalora": ada}


class Corpus:
    def __init__(self, out: str) -> None:
        self.out = out
        self.cases: list[dict[str, Any]] = []
        self.good: dict[str, str] = {}
        os.makedirs(out, exist_ok=True)

    # -- building blocks ---------------------------------------------------------------------------------
    def folder(self, name: str, base: str = "lora") -> str:
        """A fresh copy of a good adapter folder, as ``<out>/<name>``."""
        path = os.path.join(self.out, name)
        if os.path.exists(path):
            shutil.rmtree(path)
        shutil.copytree(self.good[base], path)
        return path

    def add(self, name: str, error: str, fragment: str, *, path: str | None = None, kwargs: dict | None = None,
            state_dict: bool = False, sd_fragment: str | None = None) -> None:
        assert all(c["name"] != name for c in self.cases), name
        self.cases.append({"name": name, "path": os.path.relpath(path or os.path.join(self.out, name), self.out),
                           "error": error, "fragment": fragment, "kwargs": kwargs or {}, "state_dict": state_dict,
                           "sd_fragment": sd_fragment or fragment})

    def config_text(self, name: str, data: bytes, error: str, fragment: str, base: str = "lora") -> None:
        d = self.folder(name, base)
        with open(os.path.join(d, CONFIG), "wb") as f:
            f.write(data)
        self.add(name, error, fragment)

    def field(self, name: str, base: str, changes: dict[str, Any], fragment: str, error: str = CFG_ERR,
              drop: tuple[str, ...] = ()) -> None:
        d = self.folder(name, base)
        path = os.path.join(d, CONFIG)
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
        cfg.update(changes)
        for k in drop:
            cfg.pop(k, None)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(cfg, f)  # (allow_nan: NaN / Infinity are written as Python's json does)
        self.add(name, error, fragment, state_dict=True)

    def weights(self, name: str, base: str, error: str, fragment: str, add: dict | None = None,
                drop: tuple[str, ...] = (), edit: Any = None, config: dict | None = None, state_dict: bool = True,
                sd_fragment: str | None = None) -> None:
        d = self.folder(name, base)
        path = os.path.join(d, WEIGHTS)
        sd = load_file(path)
        for k in drop:
            sd.pop(k)
        sd.update(add or {})
        if edit is not None:
            sd = edit(sd)
        save_file(sd, path, metadata={"format": "pt"})  # (no config hash: as PEFT writes it)
        if config:
            with open(os.path.join(d, CONFIG), encoding="utf-8") as f:
                cfg = json.load(f)
            cfg.update(config)
            with open(os.path.join(d, CONFIG), "w", encoding="utf-8") as f:
                json.dump(cfg, f)
        self.add(name, error, fragment, state_dict=state_dict, sd_fragment=sd_fragment)

    def raw_weights(self, name: str, data: bytes, fragment: str = "corrupt|truncated") -> None:
        d = self.folder(name)
        with open(os.path.join(d, WEIGHTS), "wb") as f:
            f.write(data)
        self.add(name, FILE_ERR, fragment)

    # -- the cases -----------------------------------------------------------------------------------------
    def build(self) -> list[dict[str, Any]]:
        good_root = os.path.join(self.out, "_good")
        for kind, a in _adapters().items():
            self.good[kind] = af.save(a, os.path.join(good_root, kind))
        self.config_bytes()
        self.config_fields()
        self.weights_files()
        self.layout()
        self.arguments()
        with open(os.path.join(self.out, "cases.json"), "w", encoding="utf-8") as f:
            json.dump(self.cases, f, indent=1)
        return self.cases

    def config_bytes(self) -> None:
        t = self.config_text
        t("utf8_invalid_byte", b'{"peft_type": "LORA", "r": 4\xff}', FILE_ERR, "not UTF-8")
        t("utf8_truncated_sequence", b'{"peft_type": "LORA", "x": "\xe2\x82"}', FILE_ERR, "not UTF-8")
        t("utf8_latin1_text", '{"peft_type": "LORA", "x": "caf\u00e9"}'.encode("latin-1"), FILE_ERR, "not UTF-8")
        t("utf16_text", '{"peft_type": "LORA"}'.encode("utf-16"), FILE_ERR, "not UTF-8")
        t("binary_garbage", bytes(range(256)) * 4, FILE_ERR, "not UTF-8|not valid JSON")
        t("nul_bytes", b"\x00" * 64, FILE_ERR, "not valid JSON")
        t("empty", b"", FILE_ERR, "not valid JSON")
        t("whitespace_only", b"  \n\t ", FILE_ERR, "not valid JSON")
        t("json_null", b"null", FILE_ERR, "expected a JSON object, got NoneType")
        t("json_list", b"[1, 2]", FILE_ERR, "expected a JSON object, got list")
        t("json_number", b"42", FILE_ERR, "expected a JSON object, got int")
        t("json_string", b'"LORA"', FILE_ERR, "expected a JSON object, got str")
        t("json_truncated", b'{"peft_type": "LORA", "r": 4,', FILE_ERR, "not valid JSON")
        t("json_trailing_garbage", b'{"peft_type": "LORA"} xyz', FILE_ERR, "not valid JSON")
        t("json_utf8_bom", b'\xef\xbb\xbf{"peft_type": "LORA"}', FILE_ERR, "not valid JSON")
        t("json_single_quotes", b"{'peft_type': 'LORA'}", FILE_ERR, "not valid JSON")
        t("nesting_100k_lists", b'{"peft_type": "LORA", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
          FILE_ERR, "nested")
        t("nesting_100k_dicts", b'{"x": ' + b'{"a": ' * 100_000 + b"1" + b"}" * 100_000 + b"}", FILE_ERR, "nested")
        t("nesting_100k_unclosed", b"[" * 100_000, FILE_ERR, "nested|not valid JSON")
        t("nesting_80_levels", b'{"peft_type": "LORA", "x": ' + b"[" * 80 + b"]" * 80 + b"}", FILE_ERR,
          "nested deeper than")
        t("int_5000_digits_r", b'{"peft_type": "LORA", "r": ' + b"7" * 5000 + b"}", FILE_ERR, "digits")
        t("int_5000_digits_extra", b'{"peft_type": "LORA", "x": -' + b"1" * 5000 + b"}", FILE_ERR, "digits")
        t("huge_file", b'{"peft_type": "LORA", "x": "' + b"a" * (17 << 20) + b'"}', FILE_ERR, "over 16 MiB")
        t("huge_whitespace", b" " * (17 << 20) + b'{"peft_type": "LORA"}', FILE_ERR, "over 16 MiB")
        t("no_peft_type", b'{"r": 4}', CFG_ERR, "no 'peft_type'")

    def config_fields(self) -> None:
        f = self.field
        lora_fields: list[tuple[str, dict[str, Any], str]] = [
            ("r_zero", {"r": 0}, "LoraConfig.r"),
            ("r_negative", {"r": -4}, "LoraConfig.r"),
            ("r_string", {"r": "4"}, "LoraConfig.r"),
            ("r_float", {"r": 4.0}, "LoraConfig.r"),
            ("r_bool", {"r": True}, "LoraConfig.r"),
            ("r_null", {"r": None}, "LoraConfig.r"),
            ("r_beyond_int64", {"r": 2**70}, "LoraConfig.r"),
            ("r_4000_digits", {"r": int("9" * 4000)}, "LoraConfig.r"),
            ("alpha_nan", {"lora_alpha": float("nan")}, "LoraConfig.lora_alpha.*nan"),
            ("alpha_inf", {"lora_alpha": float("inf")}, "LoraConfig.lora_alpha.*inf"),
            ("alpha_minus_inf", {"lora_alpha": float("-inf")}, "LoraConfig.lora_alpha"),
            ("alpha_1e308", {"lora_alpha": 1e308}, "LoraConfig.lora_alpha.*float32"),
            ("alpha_1e39", {"lora_alpha": 1e39}, "LoraConfig.lora_alpha"),
            ("alpha_huge_int", {"lora_alpha": 10**400}, "LoraConfig.lora_alpha"),
            ("alpha_string", {"lora_alpha": "16"}, "LoraConfig.lora_alpha"),
            ("alpha_bool", {"lora_alpha": True}, "LoraConfig.lora_alpha"),
            ("alpha_list", {"lora_alpha": [16]}, "LoraConfig.lora_alpha"),
            ("dropout_one", {"lora_dropout": 1.0}, "LoraConfig.lora_dropout"),
            ("dropout_negative", {"lora_dropout": -0.1}, "LoraConfig.lora_dropout"),
            ("dropout_nan", {"lora_dropout": float("nan")}, "LoraConfig.lora_dropout"),
            ("dropout_string", {"lora_dropout": "0.1"}, "LoraConfig.lora_dropout"),
            ("rslora_string_false", {"use_rslora": "false"}, "LoraConfig.use_rslora"),
            ("rslora_int", {"use_rslora": 0}, "LoraConfig.use_rslora"),
            ("rslora_null", {"use_rslora": None}, "LoraConfig.use_rslora"),
            ("fan_in_fan_out_no", {"fan_in_fan_out": "no"}, "LoraConfig.fan_in_fan_out"),
            ("fan_in_fan_out_int", {"fan_in_fan_out": 1}, "LoraConfig.fan_in_fan_out"),
            ("bias_yes", {"bias": "yes"}, "LoraConfig.bias"),
            ("bias_null", {"bias": None}, "LoraConfig.bias"),
            ("target_modules_int", {"target_modules": 5}, "LoraConfig.target_modules.*got 5"),
            ("target_modules_bad_regex", {"target_modules": "q_proj("}, "LoraConfig.target_modules.*regular"),
            ("target_modules_int_list", {"target_modules": [1, 2]}, "LoraConfig.target_modules"),
            ("target_modules_dict", {"target_modules": {"q_proj": 1}}, "LoraConfig.target_modules"),
            ("target_modules_bool", {"target_modules": True}, "LoraConfig.target_modules"),
            ("exclude_modules_int", {"exclude_modules": 5}, "LoraConfig.exclude_modules"),
            ("exclude_modules_bad_regex", {"exclude_modules": "[k"}, "LoraConfig.exclude_modules.*regular"),
            ("modules_to_save_int", {"modules_to_save": 5}, "LoraConfig.modules_to_save"),
            ("modules_to_save_str", {"modules_to_save": "fc2"}, "LoraConfig.modules_to_save"),
            ("modules_to_save_bad_regex", {"modules_to_save": ["fc2("]}, "LoraConfig.modules_to_save.*regular"),
            ("modules_to_save_int_list", {"modules_to_save": [1]}, "LoraConfig.modules_to_save"),
            ("layers_to_transform_str", {"layers_to_transform": "0"}, "LoraConfig.layers_to_transform"),
            ("layers_to_transform_negative", {"layers_to_transform": -1}, "LoraConfig.layers_to_transform"),
            ("layers_to_transform_mixed", {"layers_to_transform": [0, "1"]}, "LoraConfig.layers_to_transform"),
            ("layers_to_transform_float", {"layers_to_transform": 1.5}, "LoraConfig.layers_to_transform"),
            ("layers_pattern_int", {"layers_pattern": 5, "layers_to_transform": [0]}, "LoraConfig.layers_pattern"),
            ("layers_pattern_bad_regex", {"layers_pattern": "layers(", "layers_to_transform": [0]},
             "LoraConfig.layers_pattern.*regular"),
            ("layers_pattern_group_clash", {"layers_pattern": "(?P<idx>x)", "layers_to_transform": [0]},
             "LoraConfig.layers_pattern.*regular"),
            ("layers_pattern_alone", {"layers_pattern": "layers"}, "LoraConfig.layers_pattern"),
            ("rank_pattern_list", {"rank_pattern": [["q_proj", 4]]}, "LoraConfig.rank_pattern.*dict"),
            ("rank_pattern_string", {"rank_pattern": "q_proj=4"}, "LoraConfig.rank_pattern.*dict"),
            ("rank_pattern_zero", {"rank_pattern": {"q_proj": 0}}, "LoraConfig.rank_pattern"),
            ("rank_pattern_string_rank", {"rank_pattern": {"q_proj": "4"}}, "LoraConfig.rank_pattern"),
            ("rank_pattern_bad_regex", {"rank_pattern": {"q_proj(": 4}}, "LoraConfig.rank_pattern.*regular"),
            ("rank_pattern_beyond_int64", {"rank_pattern": {"q_proj": 2**64}}, "LoraConfig.rank_pattern"),
            ("alpha_pattern_string", {"alpha_pattern": "q_proj=8"}, "LoraConfig.alpha_pattern.*dict"),
            ("alpha_pattern_list", {"alpha_pattern": [8]}, "LoraConfig.alpha_pattern.*dict"),
            ("alpha_pattern_nan", {"alpha_pattern": {"q_proj": float("nan")}}, "LoraConfig.alpha_pattern"),
            ("alpha_pattern_1e300", {"alpha_pattern": {"q_proj": 1e300}}, "LoraConfig.alpha_pattern"),
            ("alpha_pattern_string_alpha", {"alpha_pattern": {"q_proj": "8"}}, "LoraConfig.alpha_pattern"),
            ("alpha_pattern_bad_regex", {"alpha_pattern": {"[q": 8}}, "LoraConfig.alpha_pattern.*regular"),
            ("init_pissa_niter_bad", {"init_lora_weights": "pissa_niter_x"}, "LoraConfig.init_lora_weights"),
            ("init_mica", {"init_lora_weights": "mica"}, "LoraConfig.init_lora_weights"),
            ("init_int", {"init_lora_weights": 5}, "LoraConfig.init_lora_weights"),
            ("init_null", {"init_lora_weights": None}, "LoraConfig.init_lora_weights"),
            ("use_dora_string", {"use_dora": "false"}, "LoraConfig.use_dora"),
            ("lora_bias_with_dora", {"lora_bias": True, "use_dora": True}, "LoraConfig.lora_bias"),
            ("lora_bias_gaussian", {"lora_bias": True, "init_lora_weights": "gaussian"}, "LoraConfig.lora_bias"),
            ("kasa_config", {"kasa_config": {"k": 2}}, "kasa_config"),
            ("inference_mode_string", {"inference_mode": "true"}, "LoraConfig.inference_mode"),
            ("inference_mode_int", {"inference_mode": 1}, "LoraConfig.inference_mode"),
            ("task_type_int", {"task_type": 5}, "LoraConfig.task_type"),
            ("task_type_unknown", {"task_type": "IMAGE_GEN"}, "LoraConfig.task_type"),
            ("base_model_int", {"base_model_name_or_path": 5}, "LoraConfig.base_model_name_or_path"),
            ("revision_int", {"revision": 7}, "LoraConfig.revision"),
            ("peft_type_unknown", {"peft_type": "LORAX"}, "peft_type='LORAX'"),
            ("peft_type_null", {"peft_type": None}, "peft_type=None"),
            ("peft_type_int", {"peft_type": 5}, "peft_type=5"),
            ("peft_type_list", {"peft_type": ["LORA"]}, r"peft_type=\['LORA'\]"),
            ("layer_replication", {"layer_replication": [[0, 1]]}, "layer_replication.*not supported"),
            ("use_qalora", {"use_qalora": True}, "use_qalora.*not supported"),
            ("use_qalora_string", {"use_qalora": "false"}, "use_qalora.*not supported"),
            ("loftq_config", {"loftq_config": {"loftq_bits": 4}}, "loftq_config.*only used with"),
            ("eva_config", {"eva_config": {"rho": 0.5}}, "eva_config.*rho"),
            ("corda_config", {"corda_config": {"corda_method": "x"}}, "corda_config.*corda_method"),
            ("init_loftq_no_config", {"init_lora_weights": "loftq"}, "loftq_config.*must be given"),
            ("trainable_token_indices", {"trainable_token_indices": [1, 1]}, "trainable_token_indices"),
            ("target_parameters", {"target_parameters": "fc1.weight"}, "target_parameters"),
            ("ensure_weight_tying", {"ensure_weight_tying": "yes"}, "ensure_weight_tying"),
            ("alora_invocation_tokens", {"alora_invocation_tokens": [5]}, "alora_invocation_tokens"),
            ("megatron_config", {"megatron_config": {"x": 1}}, "megatron_config"),
        ]
        for name, changes, frag in lora_fields:
            f("lora_" + name, "lora", changes, frag)
        f("lora_no_peft_type", "lora", {}, "no 'peft_type'", drop=("peft_type",))
        ia3 = [
            ("target_modules_int", {"target_modules": 5}, "IA3Config.target_modules"),
            ("feedforward_int", {"feedforward_modules": 5}, "IA3Config.feedforward_modules"),
            ("feedforward_bad_regex", {"feedforward_modules": "fc2(", "target_modules": ".*fc2"},
             "IA3Config.feedforward_modules.*regular"),
            ("feedforward_not_subset", {"feedforward_modules": ["fc1"]}, "IA3Config.feedforward_modules.*subset"),
            ("init_string", {"init_ia3_weights": "true"}, "IA3Config.init_ia3_weights"),
            ("fan_in_fan_out_string", {"fan_in_fan_out": "no"}, "IA3Config.fan_in_fan_out"),
            ("modules_to_save_int", {"modules_to_save": 3}, "IA3Config.modules_to_save"),
            ("inference_mode_string", {"inference_mode": "false"}, "IA3Config.inference_mode"),
        ]
        for name, changes, frag in ia3:
            f("ia3_" + name, "ia3", changes, frag)
        ada = [
            ("total_step_null", {"total_step": None}, "AdaLoraConfig.total_step"),
            ("total_step_string", {"total_step": "100"}, "AdaLoraConfig.total_step"),
            ("init_r_zero", {"init_r": 0}, "AdaLoraConfig.init_r"),
            ("init_r_huge", {"init_r": 10**30}, "AdaLoraConfig.init_r"),
            ("target_r_above_init_r", {"target_r": 9}, "AdaLoraConfig.init_r"),
            ("no_pruning_phase", {"tinit": 50, "tfinal": 60}, "AdaLoraConfig.tinit"),
            ("beta1_one", {"beta1": 1.0}, "AdaLoraConfig.beta1"),
            ("beta2_nan", {"beta2": float("nan")}, "AdaLoraConfig.beta2"),
            ("orth_reg_negative", {"orth_reg_weight": -1}, "AdaLoraConfig.orth_reg_weight"),
            ("deltaT_zero", {"deltaT": 0}, "AdaLoraConfig.deltaT"),
            ("rank_pattern_short_mask", {"rank_pattern": {f"{Q0}.lora_E": [True]}}, "AdaLoraConfig.rank_pattern"),
            ("rank_pattern_string", {"rank_pattern": {f"{Q0}.lora_E": "1111"}}, "AdaLoraConfig.rank_pattern"),
            ("rank_pattern_list", {"rank_pattern": [True, False]}, "AdaLoraConfig.rank_pattern"),
            ("alpha_inf", {"lora_alpha": float("inf")}, "AdaLoraConfig.lora_alpha"),
            ("rslora_string", {"use_rslora": "no"}, "AdaLoraConfig.use_rslora"),
            ("use_dora", {"use_dora": True}, "AdaLoraConfig.use_dora"),
        ]
        for name, changes, frag in ada:
            f("adalora_" + name, "adalora", changes, frag)

    def weights_files(self) -> None:
        w = self.weights
        qa, qb = f"{PREFIX}{Q0}.lora_A.weight", f"{PREFIX}{Q0}.lora_B.weight"
        r = self.raw_weights
        r("weights_empty", b"", "truncated")
        r("weights_7_bytes", b"\x00" * 7, "truncated")
        r("weights_header_too_long", (10**12).to_bytes(8, "little") + b"{}", "not plausible")
        r("weights_header_cut", (10**6).to_bytes(8, "little") + b'{"x": 1}', "truncated")
        r("weights_header_not_json", (8).to_bytes(8, "little") + b"{garbage", "not valid JSON")
        r("weights_random_bytes", bytes((i * 37 + 11) % 256 for i in range(4096)))
        with open(os.path.join(self.good["lora"], WEIGHTS), "rb") as fh:
            data = fh.read()
        r("weights_truncated_half", data[: len(data) // 2])
        r("weights_truncated_last_byte", data[:-1])
        r("weights_header_only", data[: 8 + int.from_bytes(data[:8], "little")])
        w("weights_wrong_prefix", "lora", FILE_ERR, "does not start with",  # (from_state_dict takes both forms)
          edit=lambda sd: {k[len(PREFIX):]: v for k, v in sd.items()}, state_dict=False)
        w("weights_untargeted_module", "lora", FILE_ERR, "does not target",
          add={f"{PREFIX}{K0}.lora_A.weight": torch.zeros(4, 22), f"{PREFIX}{K0}.lora_B.weight": torch.zeros(22, 4)})
        w("weights_stray_key", "lora", FILE_ERR, "matches no target",
          add={f"{PREFIX}model.mystery.weight": torch.zeros(3)})
        w("weights_lora_C", "lora", FILE_ERR, "matches no target", add={f"{PREFIX}{Q0}.lora_C.weight": torch.zeros(3)})
        w("weights_half_pair", "lora", FILE_ERR, "no 'lora_B.weight'", drop=(qb,))
        w("weights_pair_shapes", "lora", FILE_ERR, r"\[4, 22\].*\[22, 3\]", add={qb: torch.zeros(22, 3)})
        w("weights_rank_vs_r", "lora", FILE_ERR, "rank 4", config={"r": 2})
        w("weights_rank_vs_rank_pattern", "lora", FILE_ERR, "r=3", config={"rank_pattern": {"v_proj": 3}})
        # a 3-d lora_A is a Conv1d's: the message names the layer kind the file's layout would be
        w("weights_3d", "lora", FILE_ERR, r"nn\.Conv1d LoRA's but lora_B \[22, 4\]", add={qa: torch.zeros(1, 4, 22)})
        w("weights_1d", "lora", FILE_ERR, "not a LoRA pair of a layer kind", add={qa: torch.zeros(88)})
        w("weights_0d", "lora", FILE_ERR, "not a LoRA pair of a layer kind", add={qa: torch.zeros(())})
        w("weights_mixed_kinds", "lora", FILE_ERR, "mixes LoRA kinds|no 'lora_embedding_B'",
          add={f"{PREFIX}{Q0}.lora_embedding_A": torch.zeros(4, 22)})
        w("weights_no_tensors", "lora", FILE_ERR, "no adapter tensors", edit=lambda sd: {}, sd_fragment="is empty")
        # DoRA / lora_bias: the config and the tensors must agree, and the magnitude fit the module
        w("dora_without_magnitude", "lora", FILE_ERR, "no 'lora_magnitude_vector'", config={"use_dora": True})
        w("lora_bias_without_bias", "lora", FILE_ERR, "no 'lora_B.bias'", config={"lora_bias": True})
        w("magnitude_without_dora", "lora", FILE_ERR, "use_dora=False",
          edit=lambda sd: {**sd, **{k.replace("lora_B.weight", "lora_magnitude_vector"): torch.ones(v.shape[0])
                                    for k, v in sd.items() if k.endswith("lora_B.weight")}})
        w("dora_magnitude_shape", "lora", FILE_ERR, r"lora_magnitude \[23\]", config={"use_dora": True},
          edit=lambda sd: {**sd, **{k.replace("lora_B.weight", "lora_magnitude_vector"): torch.ones(v.shape[0] + 1)
                                    for k, v in sd.items() if k.endswith("lora_B.weight")}})
        w("lora_bias_shape", "lora", FILE_ERR, r"lora_bias \[21\]", config={"lora_bias": True},
          edit=lambda sd: {**sd, **{k.replace(".weight", ".bias"): torch.zeros(v.shape[0] - 1)
                                    for k, v in sd.items() if k.endswith("lora_B.weight")}})
        for dt in ("int8", "int64", "bool", "uint8", "float8_e4m3fn", "float8_e5m2"):
            w(f"weights_{dt}_leaves", "lora", FIT_ERR, f"leaf 'lora_A' is {dt}",
              edit=lambda sd, dt=dt: {k: v.to(getattr(torch, dt)) for k, v in sd.items()})
        w("weights_int8_lora_B_only", "lora", FIT_ERR, "leaf 'lora_B' is int8",
          add={qb: torch.zeros(22, 4, dtype=torch.int8)})
        w("weights_mixed_dtypes", "lora", FIT_ERR, "different dtypes",
          add={qb: torch.zeros(22, 4, dtype=torch.float16)})
        w("weights_complex", "lora", FIT_ERR, "complex64", add={qa: torch.zeros(4, 22, dtype=torch.complex64)})
        ia3 = f"{PREFIX}{K0}.ia3_l"
        w("ia3_vector_3d", "ia3", FILE_ERR, K0, add={ia3: torch.ones(1, 22, 1)})
        w("ia3_vector_int", "ia3", FIT_ERR, "leaf 'ia3_l' is int64", add={ia3: torch.ones(22, 1, dtype=torch.int64)})
        w("ia3_stray_lora", "ia3", FILE_ERR, "matches no target", add={qa: torch.zeros(4, 22)})
        e = f"{PREFIX}{Q0}.lora_E"
        w("adalora_missing_E", "adalora", FILE_ERR, "lora_E", drop=(e,))
        w("adalora_E_shape", "adalora", FILE_ERR, "lora_E", add={e: torch.zeros(3, 1)})
        w("adalora_bool_E", "adalora", FIT_ERR, "leaf 'lora_E' is bool", add={e: torch.zeros(4, 1, dtype=torch.bool)})

    def layout(self) -> None:
        d = self.folder("missing_config")
        os.remove(os.path.join(d, CONFIG))
        self.add("missing_config", FILE_ERR, f"{CONFIG}: not found")
        d = self.folder("missing_weights")
        os.remove(os.path.join(d, WEIGHTS))
        self.add("missing_weights", FILE_ERR, f"no {WEIGHTS}")
        d = self.folder("config_is_a_folder")
        os.remove(os.path.join(d, CONFIG))
        os.makedirs(os.path.join(d, CONFIG))
        self.add("config_is_a_folder", FILE_ERR, "folder, not a file")
        d = self.folder("weights_is_a_folder")
        os.remove(os.path.join(d, WEIGHTS))
        os.makedirs(os.path.join(d, WEIGHTS))
        self.add("weights_is_a_folder", FILE_ERR, "folder, not a file")
        d = self.folder("config_symlink_loop")
        os.remove(os.path.join(d, CONFIG))
        os.symlink(CONFIG, os.path.join(d, CONFIG))
        self.add("config_symlink_loop", FILE_ERR, "symbolic links")
        os.makedirs(os.path.join(self.out, "empty_folder"), exist_ok=True)
        self.add("empty_folder", FILE_ERR, f"{CONFIG}: not found")
        d = self.folder("pickle_only")
        sd = load_file(os.path.join(d, WEIGHTS))
        os.remove(os.path.join(d, WEIGHTS))
        torch.save(sd, os.path.join(d, BIN))
        self.add("pickle_only", FILE_ERR, "allow_pickle")
        d = self.folder("pickle_unsafe")
        os.remove(os.path.join(d, WEIGHTS))
        torch.save({"x": torch.zeros(2), "f": shutil.rmtree}, os.path.join(d, BIN))  # a global: refused
        self.add("pickle_unsafe", FILE_ERR, "weights-only", kwargs={"allow_pickle": True})
        d = self.folder("pickle_not_tensors")
        os.remove(os.path.join(d, WEIGHTS))
        torch.save({"x": 3}, os.path.join(d, BIN))
        self.add("pickle_not_tensors", FILE_ERR, "dict of tensors", kwargs={"allow_pickle": True})
        d = self.folder("pickle_truncated")
        os.remove(os.path.join(d, WEIGHTS))
        torch.save(sd, os.path.join(d, BIN))
        with open(os.path.join(d, BIN), "r+b") as fh:
            fh.truncate(100)
        self.add("pickle_truncated", FILE_ERR, "weights-only torch file", kwargs={"allow_pickle": True})
        with open(os.path.join(self.out, "a_plain_file"), "w") as fh:
            fh.write("hello")
        self.add("source_is_a_file", FILE_ERR, "is a file, not an adapter folder", path=os.path.join(self.out,
                                                                                                    "a_plain_file"))
        self.add("missing_absolute", FILE_ERR, "no such local folder", path=os.path.join(self.out, "no", "such", "dir"))
        self.add("subfolder_missing", FILE_ERR, "not found", path=self.good["lora"], kwargs={"subfolder": "nope"})

    def arguments(self) -> None:
        g = os.path.relpath(self.good["lora"], self.out)
        cases: list[tuple[str, dict[str, Any], str, str]] = [
            ("arg_dtype_string", {"dtype": "float16"}, CFG_ERR, "dtype must be a torch.dtype"),
            ("arg_dtype_int8", {"dtype": "torch.int8"}, CFG_ERR, "dtype=torch.int8 is not a compute dtype"),
            ("arg_dtype_int64", {"dtype": "torch.int64"}, CFG_ERR, "not a compute dtype"),
            ("arg_dtype_bool", {"dtype": "torch.bool"}, CFG_ERR, "not a compute dtype"),
            ("arg_dtype_float8", {"dtype": "torch.float8_e4m3fn"}, CFG_ERR, "not a compute dtype"),
            ("arg_device_bogus", {"device": "bogus-device"}, CFG_ERR, "device='bogus-device' is not a device"),
            ("arg_device_type", {"device": 1.5}, CFG_ERR, "device must be"),
            ("arg_revision_int", {"revision": 5}, CFG_ERR, "revision must be a str"),
            ("arg_subfolder_int", {"subfolder": 5}, CFG_ERR, "subfolder must be a str"),
            ("arg_subfolder_escape", {"subfolder": "../.."}, CFG_ERR, "escape"),
            ("arg_subfolder_absolute", {"subfolder": "/etc"}, CFG_ERR, "escape"),
            ("arg_adapter_name_escape", {"adapter_name": "../x"}, CFG_ERR, "plain folder name"),
            ("arg_adapter_name_int", {"adapter_name": 5}, CFG_ERR, "plain folder name"),
            ("arg_local_files_only_string", {"local_files_only": "yes"}, CFG_ERR, "local_files_only must be"),
            ("arg_allow_pickle_int", {"allow_pickle": 1}, CFG_ERR, "allow_pickle must be"),
            ("arg_token_int", {"token": 5}, CFG_ERR, "token must be"),
            ("arg_cache_dir_int", {"cache_dir": 5}, CFG_ERR, "cache_dir must be"),
        ]
        for name, kw, err, frag in cases:
            self.add(name, err, frag, path=os.path.join(self.out, g), kwargs=kw)


def decode_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The case's ``af.load`` keyword arguments, with ``"torch.<dtype>"`` strings turned into dtypes."""
    out = dict(kwargs)
    if isinstance(out.get("dtype"), str) and out["dtype"].startswith("torch."):
        out["dtype"] = getattr(torch, out["dtype"][len("torch."):])
    return out


def build(out: str) -> list[dict[str, Any]]:
    """Make the corpus under ``out``; returns its cases (also written to ``out/cases.json``)."""
    return Corpus(out).build()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    cases = build(sys.argv[1])
    print(f"{len(cases)} cases in {sys.argv[1]}")
