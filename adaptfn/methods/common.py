"""Helpers shared by the methods: the LoRA-family config base, module kinds, dtypes, ``all-linear``,
replacements planning, LoRA dropout."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from .. import _layout
from .._where import is_target, pattern_key
from ..adapter import Entry
from ..errors import IncompatibleAdapterError, shape_str
from .base import (
    FLOAT32_MAX,
    INT64_MAX,
    PeftConfigBase,
    check_bool,
    check_int,
    check_names,
    check_regex,
    is_int,
    is_real,
    need,
)

PATTERN_KEY = r"(.*\.)?({})$"  # how PEFT matches rank_pattern / alpha_pattern keys

__all__ = ["LoraFamilyConfig", "require_targets", "targeted", "PEFT_UNSUPPORTED", "SEQ_CLS_HEAD_NAMES",
           "EMBEDDING_LAYER_NAMES", "TASK_MODULES_TO_SAVE", "TASK_AUTO_CLASS", "with_task_defaults", "is_conv1d",
           "linear_dims", "adapter_dtype", "weight_needs_transpose", "expand_all_linear",
           "plan_embedding_saves", "plan_replacements", "dropout_options", "dropout", "MODULE_PATH",
           "module_path", "check_targeting", "check_patterns", "LycorisFamilyConfig", "module_kept", "rank_keep",
           "not_conv1d"]

SEQ_CLS_HEAD_NAMES = ("score", "classifier")


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 style ``Conv1D`` (weight stored [in, out]), recognised without importing it."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def linear_dims(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear or Conv1D."""
    if is_conv1d(module):
        w = module.weight
        return int(w.shape[0]), int(w.shape[1])
    return int(module.in_features), int(module.out_features)  # type: ignore[arg-type]


def adapter_dtype(weight: torch.Tensor) -> torch.dtype:
    """PEFT's adapter dtype for a base weight: fp16/bf16 and quantized bases get float32 adapters."""
    if weight.is_floating_point() and weight.dtype not in (torch.float16, torch.bfloat16):
        return weight.dtype
    return torch.float32


def weight_needs_transpose(weight: torch.Tensor | Sequence[int], delta_shape: Sequence[int],
                           fan_in_fan_out: bool | None) -> bool:
    """Whether a [out, in] delta must be transposed to add to ``weight`` (a tensor, or just its shape).

    The layout is decided per module from the model: a weight recorded by :func:`adaptfn.functional`
    (:mod:`adaptfn._layout`) is transposed exactly when it is a GPT-2 ``Conv1D`` weight, whatever
    ``fan_in_fan_out`` (the file's single flag) says. Otherwise a non-square weight's shape decides, and only a
    square weight of unknown origin falls back to ``fan_in_fan_out``."""
    known = _layout.transposed(weight) if isinstance(weight, torch.Tensor) else None
    w, d = tuple(weight.shape if isinstance(weight, torch.Tensor) else weight), tuple(delta_shape)
    if known is not None and w == (d[::-1] if known else d):
        return known
    if d[0] != d[1]:
        if w == d:
            return False
        if w == d[::-1]:
            return True
        raise IncompatibleAdapterError(f"delta {shape_str(d)} does not fit weight {shape_str(w)}")
    if w != d:
        raise IncompatibleAdapterError(f"delta {shape_str(d)} does not fit weight {shape_str(w)}")
    return bool(fan_in_fan_out)


def require_targets(config: Any) -> None:
    """Refuse ``target_modules=None`` with a :class:`ConfigError` naming the config class: PEFT guesses the targets
    per architecture, adaptfn asks for them."""
    if config.target_modules is None:
        need(False, type(config), "target_modules",
             "is None; name the modules to adapt (PEFT guesses them per architecture, adaptfn does not)")


def targeted(config: Any, model: nn.Module) -> tuple[Any, list[tuple[str, nn.Module]]]:
    """The config with ``"all-linear"`` expanded, and the ``(path, module)`` pairs it targets in ``model``, in
    module order (:func:`require_targets` first)."""
    require_targets(config)
    config = expand_all_linear(config, model)
    return config, [(path, mod) for path, mod in model.named_modules() if path and is_target(config, path)]


def expand_all_linear(config: Any, model: nn.Module) -> Any:
    """PEFT's ``target_modules="all-linear"``: every Linear/Conv1D except the output layer (or the
    classification head for SEQ_CLS), as full module names."""
    tm = getattr(config, "target_modules", None)
    if not (isinstance(tm, str) and tm.lower() == "all-linear"):
        return config
    names = {n for n, m in model.named_modules() if n and (isinstance(m, nn.Linear) or is_conv1d(m))}
    exclude: set[str] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out_emb = get_out() if callable(get_out) else None
    if out_emb is not None:
        exclude |= {n for n, m in model.named_modules() if m is out_emb}
    elif getattr(config, "task_type", None) == "SEQ_CLS":
        for head in SEQ_CLS_HEAD_NAMES:
            h = getattr(model, head, None)
            if h is not None:
                exclude |= {n for n, m in model.named_modules() if m is h}
                break
    return dataclasses.replace(config, target_modules=sorted(names - exclude))


# PEFT fields (LoRA family) that adaptfn does not implement: name -> the value meaning "off"
PEFT_UNSUPPORTED = {
    "layer_replication": None,
    "trainable_token_indices": None,
    "target_parameters": None,
    "loftq_config": {},
    "eva_config": None,
    "corda_config": None,
    "lora_ga_config": None,
    "megatron_config": None,
    "use_qalora": False,
    "alora_invocation_tokens": None,
    "arrow_config": None,
    "velora_config": None,
    "monteclora_config": None,
    "kasa_config": None,
    "use_bdlora": None,
    "ensure_weight_tying": False,
}


@dataclasses.dataclass(frozen=True)
class LoraFamilyConfig(PeftConfigBase):
    """The fields LoRA and its relatives share, with PEFT's names and defaults (PEFT's ``AdaLoraConfig``
    inherits ``LoraConfig``; here both inherit this base, which holds the shared fields, their checks and
    the per-module rank / alpha rules).

    Arguments:
        r: rank. lora_alpha: scale numerator (a finite number). lora_dropout: dropout on the delta's input,
            in [0, 1) (only with an explicit generator, see :func:`adaptfn.inject`). target_modules: list of
            names/suffixes, a regex (``re.fullmatch``) or ``"all-linear"``. exclude_modules: same rules,
            wins over targets. fan_in_fan_out: base weight stored [in, out] (GPT-2 Conv1D; set from the
            module type by :func:`adaptfn.init`). bias: "none", "all" (every ``*.bias`` is trained) or
            "lora_only" (biases of targeted modules). use_rslora: scale by ``lora_alpha / sqrt(r)``.
            modules_to_save: modules trained in full (replacements). init_lora_weights: True, False or
            "gaussian" (each method documents its draws). layers_to_transform / layers_pattern: restrict
            list targets to these block indices. rank_pattern / alpha_pattern: per-module overrides, keys
            matched as ``(.*\\.)?(key)$``. use_dora: DoRA (LoRA only, see :mod:`adaptfn.methods.dora`).
            lora_bias: a trained bias on ``lora_B`` (LoRA only; not with DoRA, and only with
            ``init_lora_weights`` True or False, as PEFT requires).
    """

    unsupported: ClassVar[dict[str, Any]] = PEFT_UNSUPPORTED
    peft_only: ClassVar[frozenset[str]] = PeftConfigBase.peft_only | {"megatron_core", "qalora_group_size"}

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    modules_to_save: list[str] | None = None
    init_lora_weights: bool | str = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: Any = dataclasses.field(default_factory=dict)
    alpha_pattern: dict[str, float] = dataclasses.field(default_factory=dict)
    use_dora: bool = False
    lora_bias: bool = False

    def validate(self) -> None:
        """Type and range checks of the shared fields; subclasses add theirs (and ``rank_pattern``'s)."""
        cls = type(self)
        for name in ("use_dora", "lora_bias", "fan_in_fan_out", "use_rslora"):
            check_bool(cls, name, getattr(self, name))
        need(not (self.lora_bias and self.use_dora), cls, "lora_bias",
             "True is not supported together with use_dora=True (PEFT refuses it too)")
        need(not self.lora_bias or self.init_lora_weights in (True, False), cls, "lora_bias",
             f"True needs init_lora_weights True or False (as PEFT requires), got {self.init_lora_weights!r}")
        check_int(cls, "r", self.r, 1)
        need(is_real(self.lora_alpha) and abs(self.lora_alpha) <= FLOAT32_MAX, cls, "lora_alpha",
             f"must be a finite number (within float32's range), got {self.lora_alpha!r}")
        need(is_real(self.lora_dropout) and 0 <= self.lora_dropout < 1, cls, "lora_dropout",
             f"must be a number in [0, 1), got {self.lora_dropout!r}")
        need(self.bias in ("none", "all", "lora_only"), cls, "bias",
             f"must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        self.validate_init_mode()
        check_targeting(self)
        need(isinstance(self.alpha_pattern, Mapping), cls, "alpha_pattern",
             f"must be a dict module name -> alpha, got {type(self.alpha_pattern).__name__}")
        for k, v in self.alpha_pattern.items():
            need(isinstance(k, str) and is_real(v) and abs(v) <= FLOAT32_MAX, cls, "alpha_pattern",
                 f"alpha for {k!r} must be a finite number (within float32's range), got {v!r}")
            check_regex(cls, "alpha_pattern", k, PATTERN_KEY)
        self.validate_rank_pattern()

    def validate_init_mode(self) -> None:
        """``init_lora_weights``: True, False or "gaussian" (LoRA overrides it with PEFT's other inits)."""
        mode = self.init_lora_weights
        cls = type(self)
        if isinstance(mode, str):
            need(mode.lower() == "gaussian", cls, "init_lora_weights",
                 f"{mode!r} is not supported by adaptfn yet; use True, False or 'gaussian'")
        else:
            need(isinstance(mode, bool), cls, "init_lora_weights", f"must be True, False or 'gaussian', got {mode!r}")

    def validate_rank_pattern(self) -> None:
        """``rank_pattern``: a dict module name -> positive int rank (LoRA's meaning; AdaLoRA overrides)."""
        cls = type(self)
        need(isinstance(self.rank_pattern, Mapping), cls, "rank_pattern",
             f"must be a dict module name -> rank, got {type(self.rank_pattern).__name__}")
        for k, v in self.rank_pattern.items():
            need(isinstance(k, str) and is_int(v) and 0 < v <= INT64_MAX, cls, "rank_pattern",
                 f"rank for {k!r} must be a positive int, got {v!r}")
            check_regex(cls, "rank_pattern", k, PATTERN_KEY)

    def rank_and_alpha(self, path: str) -> tuple[int, float]:
        """The module's ``(r, lora_alpha)``: ``rank_pattern`` / ``alpha_pattern`` where a key matches."""
        rk = pattern_key(list(self.rank_pattern), path) if self.rank_pattern else None
        ak = pattern_key(list(self.alpha_pattern), path) if self.alpha_pattern else None
        r = self.rank_pattern[rk] if rk is not None else self.r
        alpha = self.alpha_pattern[ak] if ak is not None else self.lora_alpha
        return r, alpha

    def scaling(self, r: int, alpha: float) -> float:
        """``alpha / r`` (rsLoRA: ``alpha / sqrt(r)``)."""
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


MODULE_PATH = "_adaptfn_path"
"""The attribute under which the structural copy records each adapted module's path (for messages)."""


def module_path(module: nn.Module) -> str:
    """The path of a module of the structural copy (its class name elsewhere), for error messages."""
    return module.__dict__.get(MODULE_PATH) or type(module).__name__


def dropout_options(config: LoraFamilyConfig) -> tuple[tuple[str, Any], ...]:
    """The static ``Entry.options`` of a LoRA-family entry: its dropout rate when there is one."""
    return (("dropout", float(config.lora_dropout)),) if config.lora_dropout else ()


def dropout(entry: Entry, generator: torch.Generator | None, h: torch.Tensor) -> torch.Tensor:
    """LoRA-family dropout on the delta's input ``h``: drawn from ``generator`` when one is given (training),
    else none (the deterministic forward). The rate is the entry's ``"dropout"`` option."""
    p = entry.option("dropout", 0.0) if generator is not None else 0.0
    if p <= 0:
        return h
    keep = torch.rand(h.shape, generator=generator, device=h.device, dtype=h.dtype) >= p
    return h * keep / (1 - p)


EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")


def plan_embedding_saves(config: Any, model: nn.Module, entries: dict[str, Entry]) -> dict[str, Entry]:
    """PEFT's ``save_embedding_layers="auto"``: when ``embed_tokens``/``lm_head`` are named targets, the
    targeted input/output embeddings' base tensors go in the file too (``<path>.base_layer.weight``).
    adaptfn carries them as tied, frozen replacements that share the base tensor (no copy)."""
    tm = getattr(config, "target_modules", None)
    if isinstance(tm, str):
        named = any(re.fullmatch(tm, p) for p, _ in model.named_modules()
                    if any(re.match(rf"(.*\.)?{e}$", p) for e in EMBEDDING_LAYER_NAMES))
    else:
        named = bool(tm) and any(e in tm for e in EMBEDDING_LAYER_NAMES)
    if not named:
        return entries
    layers = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        f = getattr(model, getter, None)
        layer = f() if callable(f) else None
        if layer is not None:
            layers.append(layer)
    out = dict(entries)
    for path, mod in model.named_modules():
        if path in entries and entries[path].kind and any(mod is layer for layer in layers):
            e = out[path]
            names = tuple(n for n, t in mod.named_parameters(recurse=False) if t is not None and n not in e.replaced)
            out[path] = dataclasses.replace(e, replaced=e.replaced + names, tied=e.tied + names,
                                            frozen=e.frozen + names)
    return out


#: PEFT's task_type -> the transformers Auto class that loads its base model (model cards, the CLI, from_pretrained)
TASK_AUTO_CLASS = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}

# PEFT's task models add their heads to ``modules_to_save`` (peft_model.PeftModelForSequenceClassification,
# ...ForTokenClassification: "classifier", "score"; ...ForQuestionAnswering: "qa_outputs"); the other task types
# add nothing. A name a model lacks is skipped, as PEFT skips it.
TASK_MODULES_TO_SAVE: dict[str, tuple[str, ...]] = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}


def with_task_defaults(config: Any) -> Any:
    """``config`` with its ``task_type``'s head modules added to ``modules_to_save``, as PEFT's task model does
    when it wraps a model (so a file PEFT loads as that task finds the head's weights). Names already there are
    not repeated; a config without ``modules_to_save`` comes back as it is."""
    names = TASK_MODULES_TO_SAVE.get(getattr(config, "task_type", None) or "", ())
    if not names or not hasattr(config, "modules_to_save"):
        return config
    have = list(config.modules_to_save or [])
    add = [n for n in names if n not in have]
    return dataclasses.replace(config, modules_to_save=have + add) if add else config


def _saved_modules(config: Any, model: nn.Module) -> list[str]:
    names = getattr(config, "modules_to_save", None) or []
    found: list[str] = []
    for path, _ in model.named_modules(remove_duplicate=False):
        if path and any(path.endswith(m) for m in names) and not any(path.startswith(f + ".") for f in found):
            found.append(path)
    optional = TASK_MODULES_TO_SAVE.get(getattr(config, "task_type", None) or "", ())
    if any(m not in optional for m in names) and not found:
        raise IncompatibleAdapterError(
            f"modules_to_save={list(names)!r} matches no module of {type(model).__name__}")
    return found


def _module_tensors(module: nn.Module) -> list[str]:
    return list(module.state_dict(keep_vars=True).keys())


def plan_replacements(config: Any, model: nn.Module, entries: dict[str, Entry]) -> dict[str, Entry]:
    """Add the replacement part of a plan: ``modules_to_save`` copies (untied) and trained biases
    (``bias="lora_only"`` or another ``"<method>_only"``: the targeted modules' biases, ``"all"``: every
    ``*.bias``)."""
    out = dict(entries)
    saved = _saved_modules(config, model)
    modules = dict(model.named_modules(remove_duplicate=False))
    for path in saved:
        names = tuple(_module_tensors(modules[path]))
        out[path] = Entry(replaced=names)
    bias = getattr(config, "bias", "none")
    if bias == "none":
        return out

    def add_bias(path: str, tied: bool) -> None:
        if any(path == s or path.startswith(s + ".") for s in saved):
            return
        e = out.get(path, Entry())
        if "bias" in e.replaced:
            return
        out[path] = dataclasses.replace(e, replaced=e.replaced + ("bias",), tied=e.tied + (("bias",) if tied else ()))

    if bias.endswith("_only"):  # "lora_only", "oft_only", "vera_only" (PEFT reads any "*_only" alike)
        for path in entries:
            if getattr(modules[path], "bias", None) is not None:
                add_bias(path, True)
    else:  # "all"
        for name, _ in model.state_dict(keep_vars=True).items():
            if name == "bias" or name.endswith(".bias"):
                path = name[: -len(".bias")] if "." in name else ""
                add_bias(path, path in entries)
    return out


# -- shared by the methods beyond the LoRA family (LoHa, LoKr, OFT, VeRA) ---------------------------------------
def check_targeting(cfg: Any) -> None:
    """PEFT's targeting fields (every config class checks them here): ``target_modules`` /
    ``exclude_modules`` (a list of names or a regex str), ``modules_to_save`` (a list), ``layers_to_transform``
    (an int >= 0 or a list of them, only with list targets) and ``layers_pattern`` (only with it)."""
    cls = type(cfg)
    check_names(cls, "target_modules", cfg.target_modules)
    check_names(cls, "exclude_modules", cfg.exclude_modules)
    check_names(cls, "modules_to_save", cfg.modules_to_save, regex=False)
    check_names(cls, "layers_pattern", cfg.layers_pattern)
    for m in cfg.modules_to_save or ():
        check_regex(cls, "modules_to_save", m, r"(^|.*\.){}($|\..*)")
    lp = cfg.layers_pattern
    for m in ([lp] if isinstance(lp, str) else lp or ()):
        check_regex(cls, "layers_pattern", m, r"(?:^|.*?\.){}\.(?P<idx>\d+)\.")
    layers = cfg.layers_to_transform
    need(layers is None or (is_int(layers) and layers >= 0) or (
        isinstance(layers, (list, tuple)) and all(is_int(i) and i >= 0 for i in layers)),
        cls, "layers_to_transform", f"must be an int >= 0, a list of them or None, got {layers!r}")
    need(not (isinstance(cfg.target_modules, str) and layers is not None), cls, "layers_to_transform",
         "cannot be used when target_modules is a regex str")
    need(not (cfg.layers_pattern and layers is None), cls, "layers_pattern",
         "is only used together with layers_to_transform")


def check_patterns(cfg: Any) -> None:
    """``rank_pattern`` (module name -> positive int) and ``alpha_pattern`` (module name -> finite number), keys
    valid as PEFT uses them (``(.*\\.)?(key)$``)."""
    cls = type(cfg)
    for field, ok, what in (("rank_pattern", lambda v: is_int(v) and 0 < v <= INT64_MAX, "a positive int"),
                            ("alpha_pattern", lambda v: is_real(v) and abs(v) <= FLOAT32_MAX, "a finite number")):
        pat = getattr(cfg, field)
        need(isinstance(pat, Mapping), cls, field, f"must be a dict module name -> value, got {type(pat).__name__}")
        for k, v in pat.items():
            need(isinstance(k, str) and ok(v), cls, field, f"the value for {k!r} must be {what}, got {v!r}")
            check_regex(cls, field, k, PATTERN_KEY)


def not_conv1d(method: str, path: str, module: nn.Module) -> None:
    """Raise for a transformers ``Conv1D`` target: PEFT 0.21 cannot put this method on one, so a file adaptfn
    wrote for it would not load in PEFT."""
    if is_conv1d(module):
        raise IncompatibleAdapterError(
            f"target module {path!r} is a transformers Conv1D (GPT-2 style); PEFT's {method} supports nn.Linear "
            "(and convolutions) only, so adaptfn does not put it there either (its file would not load in PEFT)")


@dataclasses.dataclass(frozen=True)
class LycorisFamilyConfig(PeftConfigBase):
    """The fields LoHa and LoKr share (PEFT's ``LycorisConfig`` plus the common LyCORIS options), with PEFT's
    names and defaults.

    Arguments:
        r: rank of each low-rank factor pair. alpha: scale numerator: the delta is multiplied by ``alpha / r``
            (per module from ``rank_pattern`` / ``alpha_pattern``, keys matched as ``(.*\\.)?(key)$``).
        rank_dropout: in training (an explicit generator, see :func:`adaptfn.inject`), each output row of the
            delta weight is kept with probability ``1 - rank_dropout``. module_dropout: in training, the whole
            delta is skipped with this probability. use_effective_conv2d: the CP decomposition for convolutions
            with kernels larger than 1 (PEFT's; for convolution targets). target_modules, exclude_modules,
            layers_to_transform, layers_pattern, modules_to_save: PEFT's targeting rules. init_weights: True
            (the adapted model starts equal to the base) or False (every factor random: for tests).
    """

    r: int = 8
    alpha: float = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    init_weights: bool | str = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: dict[str, float] = dataclasses.field(default_factory=dict)
    modules_to_save: list[str] | None = None

    def validate(self) -> None:
        cls = type(self)
        check_int(cls, "r", self.r, 1)
        need(is_real(self.alpha) and abs(self.alpha) <= FLOAT32_MAX, cls, "alpha",
             f"must be a finite number (within float32's range), got {self.alpha!r}")
        for name in ("rank_dropout", "module_dropout"):
            v = getattr(self, name)
            need(is_real(v) and 0 <= v < 1, cls, name, f"must be a number in [0, 1), got {v!r}")
        check_bool(cls, "use_effective_conv2d", self.use_effective_conv2d)
        if not isinstance(self.init_weights, str):
            check_bool(cls, "init_weights", self.init_weights)
        check_targeting(self)
        check_patterns(self)

    def rank_and_alpha(self, path: str) -> tuple[int, float]:
        """The module's ``(r, alpha)``: ``rank_pattern`` / ``alpha_pattern`` where a key matches."""
        rk = pattern_key(list(self.rank_pattern), path)
        ak = pattern_key(list(self.alpha_pattern), path)
        return (self.rank_pattern[rk] if rk is not None else self.r,
                self.alpha_pattern[ak] if ak is not None else self.alpha)

    def dropout_options(self) -> tuple[tuple[str, Any], ...]:
        """The static ``Entry.options`` for the dropouts (only the non-zero ones)."""
        return tuple((n, float(getattr(self, n))) for n in ("module_dropout", "rank_dropout") if getattr(self, n))


def _concrete(t: torch.Tensor) -> bool:
    return not (torch.compiler.is_compiling() or torch._C._functorch.is_functorch_wrapped_tensor(t))


def module_kept(entry: Entry, generator: torch.Generator | None) -> bool | torch.Tensor:
    """LyCORIS module dropout, PEFT's draw: in training (a generator given) and when the entry has a module or
    rank dropout, one ``rand(1)`` from ``generator``; the delta is kept when it exceeds ``module_dropout``.
    ``True`` / ``False`` for a concrete draw (a dropped module then draws nothing more, as in PEFT), else a
    0-d bool tensor to multiply by."""
    if generator is None:
        return True
    p = entry.option("module_dropout", 0.0)
    if not p and not entry.option("rank_dropout", 0.0):
        return True
    u = torch.rand(1, generator=generator, device=generator.device)
    kept = (u > p).reshape(())
    return bool(kept) if _concrete(u) else kept


def rank_keep(entry: Entry, generator: torch.Generator | None, n: int, dtype: torch.dtype, device: Any,
              normalize: bool) -> torch.Tensor | None:
    """LyCORIS rank dropout, PEFT's draw: a [n, 1] multiplier of the delta weight's output rows, 1 where
    ``rand(n) > rank_dropout``, divided by its mean when ``normalize``; None outside training or without it."""
    p = entry.option("rank_dropout", 0.0)
    if generator is None or not p:
        return None
    drop = (torch.rand(n, generator=generator, device=generator.device) > p).to(dtype)
    if normalize:
        drop = drop / drop.mean()
    return drop.to(device).reshape(n, 1)
