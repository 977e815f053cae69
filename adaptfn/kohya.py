"""Community LoRA files (kohya-ss sd-scripts, A1111, LyCORIS): one ``.safetensors`` per network, read into adaptfn
adapters, which :func:`adaptfn.save` then writes in PEFT's layout.

The file's keys are ``<prefix>_<module path with "." as "_">.<tensor>``, the prefix naming the model: ``lora_unet``
(the UNet), ``lora_te`` / ``lora_te1`` (the first text encoder), ``lora_te2`` (SDXL's second). Flattening the
dots loses where the module names break (``down_blocks_0`` vs ``to_out_0``), so the names are resolved against
the model's own modules: the model is an argument. Leading name parts the model does not have are dropped
(``text_model_`` for transformers 5's CLIP text model, which no longer nests one), the same number for every key.

Per module (the tensors after the name):

* LoRA: ``lora_down.weight`` [r, in] and ``lora_up.weight`` [out, r] (PEFT's ``lora_A`` / ``lora_B``), ``alpha``
  (scale ``alpha / r``; absent: ``r``, scale 1). The config gets the most common rank and alpha as ``r`` /
  ``lora_alpha`` and the others as ``rank_pattern`` / ``alpha_pattern`` (full module paths), as diffusers does.
* LoHa (LyCORIS): ``hada_w1_a`` [out, r], ``hada_w1_b`` [r, in], ``hada_w2_a``, ``hada_w2_b``, ``alpha``: PEFT's
  LoHa tensors as they are (scale ``alpha / r``).
* LoKr (LyCORIS): ``lokr_w1`` or ``lokr_w1_a`` / ``lokr_w1_b``, ``lokr_w2`` or ``lokr_w2_a`` / ``lokr_w2_b``,
  ``alpha``: taken where PEFT would build the same factors (one ``decompose_factor`` splits every module's
  dimensions as the file does, and ``r`` gives each module the file's full / low-rank choice); a module with
  both factors full has scale 1 in LyCORIS (``alpha`` is written as ``r``). Files that do not map so are refused.

Convolutions (kohya's LoCon / ``conv_dim``, and the UNet's 1x1 ``proj_in`` / ``proj_out`` of SD 1.x files): LoRA's
``lora_down`` [r, in, *k] and ``lora_up`` [out, r, 1, ...] are PEFT's conv ``lora_A`` / ``lora_B`` as they are (a 3x3
down and a 1x1 up); a 2-d pair on a 1x1 convolution (or a 4-d 1x1 pair on a Linear) is reshaped to the module, as
diffusers does. LoHa and LoKr on ``nn.Conv1d`` / ``nn.Conv2d``: flat factors, or the CP form (``hada_t1`` /
``hada_t2``, ``lokr_t2``), which maps to ``use_effective_conv2d=True`` when every convolution with a kernel larger
than 1 has it (PEFT's flag is one for the whole adapter).

DoRA (``dora_scale`` [out, 1], LyCORIS' ``wd_on_out``) on LoRA modules of nn.Linear layers becomes a LoRA with
``use_dora=True``, the scale as PEFT's ``lora_magnitude_vector`` (what diffusers' converter does); a ``dora_scale``
[1, in] (normalised over outputs) or on a convolution has no PEFT equivalent and is refused.

SDXL UNet files from kohya with SGM / LDM block names (``input_blocks``, ``middle_block``, ``output_blocks``) are
renamed by diffusers' own ``_maybe_map_sgm_blocks_to_diffusers`` (the model's ``config`` gives the layout), then read
as any other. SDXL's two text encoders are the networks ``lora_te1`` and ``lora_te2`` (pass the model each is for).

Not read (typed errors say which key and why): LoCon's CP ``lora_mid``, other LyCORIS kinds (IA3, GLoRA, full
``diff`` weights), and files mixing kinds. The adapter's leaves get the dtype PEFT gives
an adapter of that module (the base weight's; float32 for float16 / bfloat16 bases) unless ``dtype`` is given.
"""

from __future__ import annotations

import collections
import math
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .adapter import Adapter
from .errors import AdapterFileError, ConfigError, IncompatibleAdapterError, shape_str
from .io import from_state_dict, read_tensors
from .methods import LoHaConfig, LoKrConfig, LoraConfig, get_method
from .methods.common import adapter_dtype
from .methods.lokr import factorization

__all__ = ["load_kohya", "from_kohya", "PREFIXES"]

PREFIXES = ("lora_unet", "lora_te1", "lora_te2", "lora_te3", "lora_te")
"""The model prefixes of kohya-ss / A1111 keys (longest first, as matched)."""

_LORA = {"lora_down.weight", "lora_up.weight", "alpha"}
_LOHA = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"}
_LOKR = {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "alpha"}
_LOHA_CP = {"hada_t1", "hada_t2"}
_CONV_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_SGM = ("input_blocks", "middle_block", "output_blocks")


def _model(model: Any, where: str) -> nn.Module:
    if isinstance(model, nn.Module):
        return model
    inner = getattr(model, "model", None)
    if isinstance(inner, nn.Module):
        return inner
    raise ConfigError(f"{where}: model must be the nn.Module the file is for (or the fn of af.functional), got "
                      f"{type(model).__name__}")


def load_kohya(source: str | os.PathLike[str], model: Any, *, prefix: str | None = None,
               device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Adapter:
    """Read a kohya-ss / A1111 / LyCORIS LoRA file (one ``.safetensors``) as an adapter of ``model``.

    Arguments:
        source: the local ``.safetensors`` file.
        model: the model the adapter is for (an ``nn.Module`` or the ``fn`` of :func:`adaptfn.functional`): a
            diffusers ``UNet2DConditionModel`` for ``lora_unet`` keys, a CLIP text model for ``lora_te`` keys.
            Only its module names and types are read.
        prefix: which of the file's networks to read (``"lora_unet"``, ``"lora_te"``, ``"lora_te1"``,
            ``"lora_te2"``); None: the one whose keys all name modules of ``model`` (a file for a UNet and a
            text encoder gives one adapter per call).
        device, dtype: where and in which floating dtype to put the tensors (default dtype: PEFT's for the
            module, see the module docstring).

    Returns:
        A LoRA, LoHa or LoKr :class:`Adapter` with PEFT's config (full module paths as ``target_modules``,
        per-module ranks and alphas as ``rank_pattern`` / ``alpha_pattern``); :func:`adaptfn.save` writes the
        folder PEFT and diffusers load.

    Raises:
        AdapterFileError: not a readable safetensors file. ConfigError: keys that are not a kohya network, no
            or several matching prefixes, features adaptfn does not read (see the module docstring).
        IncompatibleAdapterError: keys naming modules ``model`` lacks, or convolutions.

    Example:
        >>> import safetensors.torch
        >>> q = "model.decoder.layers.0.self_attn.q_proj"
        >>> kohya = {"lora_te_" + q.replace(".", "_") + ".lora_down.weight": torch.randn(4, 22),
        ...          "lora_te_" + q.replace(".", "_") + ".lora_up.weight": torch.randn(22, 4),
        ...          "lora_te_" + q.replace(".", "_") + ".alpha": torch.tensor(2.0)}
        >>> safetensors.torch.save_file(kohya, "style.safetensors")
        >>> a = af.load_kohya("style.safetensors", model)
        >>> a.method, a.paths, a.config.r, a.config.lora_alpha, a.entries[q].scaling
        ('lora', ('model.decoder.layers.0.self_attn.q_proj',), 4, 2.0, 0.5)
    """
    where = "load_kohya"
    if not isinstance(source, (str, os.PathLike)):
        raise ConfigError(f"{where}: source must be a path to a .safetensors file, got {type(source).__name__}")
    path = os.fspath(source)
    if not isinstance(path, str):
        raise ConfigError(f"{where}: source must name a str path")
    if os.path.isdir(path):
        raise AdapterFileError(f"{path}: is a folder; a kohya / A1111 LoRA is one .safetensors file (a PEFT folder "
                               "loads with af.load)")
    if not os.path.isfile(path):
        raise AdapterFileError(f"{path}: not found")
    if not path.endswith(".safetensors"):
        raise AdapterFileError(f"{path}: only .safetensors files are read (a pickle .ckpt / .pt can run code)")
    return from_kohya(read_tensors(path, device), model, prefix=prefix, dtype=dtype, source=path)


def _resolve(names: list[str], flat: Mapping[str, str]) -> tuple[dict[str, str], list[str], set[int]]:
    """name -> module path, the names that resolve to nothing, and how many leading parts were dropped."""
    found: dict[str, str] = {}
    missing: list[str] = []
    drops: set[int] = set()
    for name in names:
        parts = name.split("_")
        for k in range(len(parts)):
            hit = flat.get("_".join(parts[k:]))
            if hit is not None:
                found[name] = hit
                drops.add(k)
                break
        else:
            missing.append(name)
    return found, missing, drops


def from_kohya(state_dict: Mapping[str, torch.Tensor], model: Any, *, prefix: str | None = None,
               dtype: torch.dtype | None = None, source: str = "from_kohya") -> Adapter:
    """:func:`load_kohya` for tensors held in memory (the file's keys)."""
    where = source
    module = _model(model, "from_kohya")
    if not isinstance(state_dict, Mapping) or not state_dict:
        raise ConfigError(f"{where}: expected a non-empty mapping of kohya keys to tensors")
    if prefix is not None and prefix not in PREFIXES:
        raise ConfigError(f"{where}: prefix={prefix!r}; use one of {list(PREFIXES)} or None")
    state_dict = _sgm_to_diffusers(state_dict, module, where)
    groups: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    for key, t in state_dict.items():
        name, _, rest = key.partition(".")
        p = next((q for q in PREFIXES if name.startswith(q + "_")), None)
        if p is None or not rest:
            raise ConfigError(
                f"{where}: key {key!r} is not a kohya-ss / A1111 network key "
                f"('<{'|'.join(PREFIXES)}>_<module>.<tensor>'); a PEFT folder loads with af.load")
        groups.setdefault(p, {}).setdefault(name[len(p) + 1:], {})[rest] = t
    modules = dict(module.named_modules())
    flat: dict[str, str] = {}
    clash: set[str] = set()
    for path in modules:
        if path:
            f = path.replace(".", "_")
            if f in flat:
                clash.add(f)
            flat[f] = path
    for f in clash:
        del flat[f]
    resolved = {p: _resolve(sorted(g), flat) for p, g in groups.items()}
    if prefix is None:
        fits = [p for p, (found, missing, drops) in resolved.items() if found and not missing and len(drops) == 1]
        if not fits:
            shown = {p: f"{p}_{(resolved[p][1] or sorted(g))[0]}" for p, g in groups.items()}
            raise IncompatibleAdapterError(
                f"{where}: no network of the file names only modules of {type(module).__name__} (networks: "
                f"{sorted(groups)}; e.g. {shown}){_sgm_hint(groups)}")
        if len(fits) > 1:
            raise ConfigError(f"{where}: the networks {fits} all fit {type(module).__name__}; pass prefix= to choose")
        prefix = fits[0]
    if prefix not in groups:
        raise ConfigError(f"{where}: prefix={prefix!r} has no keys in the file (it has {sorted(groups)})")
    found, missing, drops = resolved[prefix]
    if missing:
        raise IncompatibleAdapterError(
            f"{where}: {len(missing)} {prefix} key(s) name no module of {type(module).__name__}, e.g. "
            f"{prefix}_{missing[0]}{_sgm_hint({prefix: dict.fromkeys(missing)})}")
    if len(drops) > 1:
        raise IncompatibleAdapterError(
            f"{where}: the {prefix} keys resolve to {type(module).__name__}'s modules inconsistently (dropping "
            f"{sorted(drops)} leading name parts); the file is not for this model")
    per_path = {found[n]: g for n, g in groups[prefix].items()}
    return _build(per_path, modules, dtype, where, prefix)


def _sgm_to_diffusers(state_dict: Mapping[str, torch.Tensor], module: nn.Module,
                      where: str) -> Mapping[str, torch.Tensor]:
    """kohya's SGM / LDM UNet names (SDXL) renamed to diffusers' by diffusers' own function, which reads the UNet's
    ``config`` (the layout of its blocks); other files come back as they are."""
    unet = [k for k in state_dict if k.startswith("lora_unet_")]
    if not any(s in k for k in unet for s in _SGM):
        return state_dict
    config = getattr(module, "config", None)
    if config is None or not hasattr(config, "layers_per_block"):
        return state_dict  # not a diffusers UNet: the keys stay unresolved and the error names them
    try:
        from diffusers.loaders.lora_conversion_utils import _maybe_map_sgm_blocks_to_diffusers
    except ImportError as e:  # pragma: no cover - diffusers is a test dependency
        raise ConfigError(f"{where}: SGM / LDM UNet names (input_blocks, ...) are renamed by diffusers' converter, "
                          f"which could not be imported ({e})") from None
    renamed = _maybe_map_sgm_blocks_to_diffusers(dict(state_dict), config)  # new indices, SGM block words
    words = (("_input_blocks_", "_down_blocks_"), ("_middle_block_", "_mid_block_"), ("_output_blocks_", "_up_blocks_"))
    out: dict[str, torch.Tensor] = {}
    for k, t in renamed.items():
        if k.startswith("lora_unet_"):  # the block words as diffusers' _convert_unet_lora_key renames them
            for old, new in words:
                k = k.replace(old, new)
        out[k] = t
    return out


def _sgm_hint(groups: Mapping[str, Any]) -> str:
    if any(s in n for g in groups.values() for n in g for s in _SGM):
        return ("; input_blocks / middle_block / output_blocks are SGM / LDM UNet names (kohya's SDXL files), which "
                "adaptfn maps for a diffusers UNet2DConditionModel (its config) only")
    return ""


def _build(per_path: dict[str, dict[str, torch.Tensor]], modules: Mapping[str, nn.Module],
           dtype: torch.dtype | None, where: str, prefix: str) -> Adapter:
    kinds: dict[str, str] = {}
    for path, g in per_path.items():
        keys = set(g)
        mod = modules[path]
        lora_keys = keys - {"dora_scale"}
        if "lora_mid.weight" in keys:
            raise IncompatibleAdapterError(
                f"{where}: {prefix} module {path!r} has lora_mid.weight: LoCon's CP-decomposed convolution LoRA, "
                "which PEFT's LoRA has no form for")
        if {"lora_down.weight", "lora_up.weight"} <= lora_keys <= _LORA:
            kinds[path] = "lora"
        elif "dora_scale" in keys:
            raise ConfigError(f"{where}: {prefix} module {path!r} has dora_scale with {sorted(keys)}: DoRA is read for "
                              "LoRA modules only (PEFT has DoRA for LoRA only)")
        elif {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} <= keys <= _LOHA | _LOHA_CP:
            kinds[path] = "loha"
        elif keys <= _LOKR and keys & {"lokr_w1", "lokr_w1_a"} and keys & {"lokr_w2", "lokr_w2_a"}:
            kinds[path] = "lokr"
        else:
            raise ConfigError(f"{where}: {prefix} module {path!r} has {sorted(keys)}: not a LoRA, LoHa or LoKr module "
                              "adaptfn reads (other LyCORIS kinds, such as IA3, GLoRA or full diff weights, are not)")
        conv = isinstance(mod, _CONV_LAYERS)
        if not (isinstance(mod, nn.Linear) or conv):
            raise IncompatibleAdapterError(f"{where}: {prefix} module {path!r} is a {type(mod).__name__}; adaptfn "
                                           "reads kohya networks on nn.Linear and convolution modules")
        if kinds[path] != "lora" and isinstance(mod, nn.Conv3d):
            raise IncompatibleAdapterError(f"{where}: {prefix} module {path!r} is an nn.Conv3d; PEFT's "
                                           f"{kinds[path]} has no Conv3d form")
    methods = set(kinds.values())
    if len(methods) > 1:
        raise ConfigError(f"{where}: the {prefix} network mixes {sorted(methods)} modules; an adaptfn adapter holds "
                          "one method")
    method = methods.pop()
    cast = {p: dtype or adapter_dtype(modules[p].weight) for p in per_path}
    build = {"lora": _lora, "loha": _loha, "lokr": _lokr}[method]
    sd, config = build(per_path, where, modules)
    sd = {k: t.to(cast[path]) for path, d in sd.items() for k, t in d.items()}
    adapter = from_state_dict(sd, config)
    m = get_method(adapter.method)
    for path, e in adapter.entry_items:
        m.check(path, e, adapter.leaves(path), modules[path])
    return adapter


def _effective(per_path: dict[str, dict[str, torch.Tensor]], modules: Mapping[str, nn.Module], cp: set[str],
               where: str) -> bool:
    """PEFT's one ``use_effective_conv2d`` for the file: True when the CP form is used, and then on every
    convolution with a kernel larger than 1 (else the file does not map)."""
    big = {p for p in per_path if any(k != 1 for k in getattr(modules[p], "kernel_size", (1,)))
           and isinstance(modules[p], _CONV_LAYERS)}
    if not cp:
        return False
    if big - cp:
        raise ConfigError(f"{where}: the CP form (hada_t / lokr_t2) is on {sorted(cp)[:2]} but not on the convolutions "
                          f"{sorted(big - cp)[:2]}; PEFT's use_effective_conv2d is one flag for the whole adapter")
    return True


def _alpha(g: Mapping[str, torch.Tensor], r: int) -> float:
    a = g.get("alpha")
    if a is None:
        return float(r)
    v = float(a.reshape(-1)[0].item()) if a.numel() == 1 else math.nan
    if not math.isfinite(v):
        raise ConfigError(f"alpha {a!r} is not one finite number")
    return v if v != 0 else float(r)  # kohya / LyCORIS: alpha 0 (or none) means alpha = r


def _patterns(values: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The most common value and ``{path: value}`` for the others (diffusers' rank / alpha patterns)."""
    common = collections.Counter(values.values()).most_common(1)[0][0]
    return common, {p: v for p, v in sorted(values.items()) if v != common}


def _lora(per_path: dict[str, dict[str, torch.Tensor]], where: str,
          modules: Mapping[str, nn.Module]) -> tuple[dict[str, Any], Any]:
    sd: dict[str, Any] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    dora = {p for p, g in per_path.items() if "dora_scale" in g}
    if dora and len(dora) != len(per_path):
        raise ConfigError(f"{where}: dora_scale is on {len(dora)} of {len(per_path)} modules (e.g. not on "
                          f"{sorted(set(per_path) - dora)[0]!r}); PEFT's use_dora is one flag for the whole adapter")
    for path, g in per_path.items():
        down, up = g["lora_down.weight"], g["lora_up.weight"]
        mod = modules[path]
        nd = len(getattr(mod, "kernel_size", ())) if isinstance(mod, _CONV_LAYERS) else 0
        if nd and down.dim() == 2 and up.dim() == 2 and all(k == 1 for k in mod.kernel_size):  # type: ignore[union-attr]
            down, up = down.reshape(*down.shape, *[1] * nd), up.reshape(*up.shape, *[1] * nd)
        elif not nd and down.dim() > 2 and all(s == 1 for s in down.shape[2:]) and all(s == 1 for s in up.shape[2:]):
            down, up = down.flatten(1), up.flatten(1)
        if down.dim() != 2 + nd or up.dim() != 2 + nd or down.shape[0] != up.shape[1] or any(
                s != 1 for s in up.shape[2:]):
            want = "([r, in], [out, r])" if not nd else f"([r, in, *k], [out, r{', 1' * nd}])"
            raise AdapterFileError(f"{where}: module {path!r}: lora_down {shape_str(down.shape)} and lora_up "
                                   f"{shape_str(up.shape)} are not a rank-r pair for a {type(mod).__name__} {want}")
        ranks[path] = int(down.shape[0])
        alphas[path] = _alpha(g, ranks[path])
        sd[path] = {f"base_model.model.{path}.lora_A.weight": down, f"base_model.model.{path}.lora_B.weight": up}
        if path in dora:
            scale = g["dora_scale"]
            if nd or scale.dim() != 2 or tuple(scale.shape) != (up.shape[0], 1):
                raise AdapterFileError(
                    f"{where}: module {path!r}: dora_scale {shape_str(scale.shape)} on a {type(mod).__name__}; PEFT's "
                    f"DoRA has one magnitude per output ([{up.shape[0]}, 1], LyCORIS' wd_on_out) on nn.Linear layers")
            sd[path][f"base_model.model.{path}.lora_magnitude_vector"] = scale.reshape(-1)
    r, rank_pattern = _patterns(ranks)
    alpha, alpha_pattern = _patterns(alphas)
    return sd, LoraConfig(r=r, lora_alpha=alpha, target_modules=sorted(per_path), rank_pattern=rank_pattern,
                          alpha_pattern=alpha_pattern, use_dora=bool(dora))


def _loha(per_path: dict[str, dict[str, torch.Tensor]], where: str,
          modules: Mapping[str, nn.Module]) -> tuple[dict[str, Any], Any]:
    sd: dict[str, Any] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    cp = {p for p, g in per_path.items() if set(g) & _LOHA_CP}
    effective = _effective(per_path, modules, cp, where)
    for path, g in per_path.items():
        ranks[path] = int(g["hada_t1"].shape[0] if path in cp else g["hada_w1_b"].shape[0])
        alphas[path] = _alpha(g, ranks[path])
        sd[path] = {f"base_model.model.{path}.{n}": t for n, t in g.items() if n != "alpha"}
    r, rank_pattern = _patterns(ranks)
    alpha, alpha_pattern = _patterns(alphas)
    return sd, LoHaConfig(r=r, alpha=alpha, target_modules=sorted(per_path), rank_pattern=rank_pattern,
                          alpha_pattern=alpha_pattern, use_effective_conv2d=effective)


def _lokr(per_path: dict[str, dict[str, torch.Tensor]], where: str,
          modules: Mapping[str, nn.Module]) -> tuple[dict[str, Any], Any]:
    """LyCORIS LoKr modules as PEFT's: one decompose_factor and decompose_both for all, a rank per module that
    makes PEFT choose the file's full / low-rank factors."""
    info = {}
    for path, g in per_path.items():
        w1 = g.get("lokr_w1")
        a, c = (w1.shape if w1 is not None else (g["lokr_w1_a"].shape[0], g["lokr_w1_b"].shape[1]))
        w2 = g.get("lokr_w2")
        ksize = math.prod(getattr(modules[path], "kernel_size", (1,))) if isinstance(modules[path], _CONV_LAYERS) else 1
        if w2 is not None:
            b, d = w2.shape[:2]
        elif "lokr_t2" in g:
            b, d = g["lokr_w2_a"].shape[1], g["lokr_w2_b"].shape[1]
        else:
            b, d = g["lokr_w2_a"].shape[0], g["lokr_w2_b"].shape[1] // ksize
        rs = {int(g[f"lokr_w{i}_a"].shape[1]) for i in (1, 2) if f"lokr_w{i}_a" in g and f"lokr_t{i}" not in g}
        rs |= {int(g["lokr_t2"].shape[0])} if "lokr_t2" in g else set()
        if len(rs) > 1:
            raise ConfigError(f"{where}: LoKr module {path!r} has two ranks {sorted(rs)}; PEFT's LoKr has one")
        info[path] = (int(a), int(b), int(c), int(d), rs.pop() if rs else None, w1 is None)
    both = any(v[5] for v in info.values())
    effective = _effective(per_path, modules, {p for p, g in per_path.items() if "lokr_t2" in g}, where)
    factors = [-1] + sorted({v[0] for v in info.values()} | {v[2] for v in info.values()})
    factor = None
    for f in factors:
        if all(factorization(a * b, f) == (a, b) and factorization(c * d, f) == (c, d)
               for a, b, c, d, _r, _s in info.values()):
            factor = f
            break
    if factor is None:
        raise ConfigError(f"{where}: the LoKr modules' factor shapes match no single decompose_factor of PEFT's "
                          "factorization; the file does not map to a PEFT LoKr adapter")
    sd: dict[str, Any] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for path, (a, b, c, d, r, split1) in info.items():
        g = per_path[path]
        need1 = math.ceil(max(a, c) / 2) if both and not split1 else 0  # r >= max/2 keeps a factor full
        if r is None:  # both factors full: LyCORIS scales by 1
            r = max(math.ceil(max(b, d) / 2), need1, 1)
            alpha = float(r)
        else:
            alpha = _alpha(g, r)
        ok = ((r < max(b, d) / 2) == ("lokr_w2_a" in g)) and ((both and r < max(a, c) / 2) == split1) and (
            ("lokr_t2" in g) == (effective and "lokr_w2_a" in g and ksize > 1))
        if not ok:
            raise ConfigError(f"{where}: LoKr module {path!r}: rank {r} with factors [{a}, {c}] / [{b}, {d}] is not "
                              "what PEFT builds for them (its full / low-rank choice differs); the file does not map")
        ranks[path], alphas[path] = r, alpha
        sd[path] = {f"base_model.model.{path}.{n}": t for n, t in g.items() if n != "alpha"}
    r0, rank_pattern = _patterns(ranks)
    alpha0, alpha_pattern = _patterns(alphas)
    return sd, LoKrConfig(r=r0, alpha=alpha0, target_modules=sorted(per_path), rank_pattern=rank_pattern,
                          alpha_pattern=alpha_pattern, decompose_both=both, decompose_factor=factor,
                          use_effective_conv2d=effective)
