"""The ``adaptfn`` command line: ``inspect``, ``diff``, ``merge``, ``combine``, ``convert``, ``verify``.

Every subcommand takes adapters as a local folder or a Hub repo id (``--revision``, ``--subfolder``,
``--token``, ``--adapter-name``) and prints a readable summary, or JSON with ``--json`` where a script
reads it. Exit status: 0 ok; 1 usage (bad or missing arguments); 2 bad input (a typed
:class:`adaptfn.AdaptfnError`, an unloadable base model, an unsupported format: one message on stderr,
no traceback); 3 ``verify`` found errors above its tolerance.

Run it as ``adaptfn ...`` (the installed script) or ``python -m adaptfn ...``; in Python,
``adaptfn.cli.main(["inspect", "folder"])`` returns the exit status.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any, NoReturn

import torch

from .adapter import GATE, SCALING, Adapter
from .errors import AdaptfnError
from .functional import functional
from .io import _resolve, load, save
from .io import state_dict as adapter_state_dict
from .methods import get_method
from .methods.common import TASK_AUTO_CLASS
from .transforms import inject, merge, select

__all__ = ["main", "EXIT_OK", "EXIT_USAGE", "EXIT_BAD_INPUT", "EXIT_MISMATCH"]

EXIT_OK, EXIT_USAGE, EXIT_BAD_INPUT, EXIT_MISMATCH = 0, 1, 2, 3
_METHOD_NAMES = {"lora": "LoRA", "ia3": "IA3", "adalora": "AdaLoRA"}


def _package() -> Any:
    """The ``adaptfn`` package (read at call time: ``af.combine`` may be added, or patched, after import)."""
    return sys.modules[__package__]


class BadInput(Exception):
    """Bad input found by the CLI itself (an unsupported format, an unloadable base model): exit 2."""


class _Usage(Exception):
    """A usage error: exit 1."""


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors raised (exit status 1) instead of exiting with 2."""

    def error(self, message: str) -> NoReturn:
        raise _Usage(f"{self.prog}: error: {message}\n{self.format_usage().strip()}")


# -- output -------------------------------------------------------------------------------------------
def _console(stderr: bool = False) -> Any:
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=False)


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def _table(title: str | None, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> Any:
    from rich.table import Table

    t = Table(title=title, title_justify="left", show_lines=False, header_style="bold")
    for c in columns:
        t.add_column(c, overflow="fold")
    for r in rows:
        t.add_row(*[str(x) for x in r])
    return t


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


def _proc_status(field: str) -> int | None:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in bytes; None off Linux."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> int | None:
    """Reset this process's peak RSS (Linux: ``/proc/self/clear_refs``) and return the current RSS, so that
    :func:`_proc_status` ("VmHWM") then reports the peak of what follows; None where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        return None
    return _proc_status("VmRSS")


def _peak_rss() -> int | None:
    """This process's peak resident set size in bytes (None where the OS does not say)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) * (1 if sys.platform == "darwin" else 1024)


# -- loading adapters ----------------------------------------------------------------------------------
class _Loaded:
    """An adapter with where it came from: the files, their sizes, the raw config."""

    def __init__(self, source: str, args: argparse.Namespace) -> None:
        self.source = source
        # one consistent version of the folder (af.load checks the pair, even during a save) ...
        self.adapter: Adapter = load(source, adapter_name=args.adapter_name, revision=args.revision,
                                     subfolder=args.subfolder, token=args.token, allow_pickle=args.allow_pickle)
        # ... and where it came from (the same files, from the cache or the folder: sizes, the raw config)
        self.config_path, self.weights_path, _ = _resolve(
            source, args.adapter_name, args.revision, args.subfolder, args.token, None, False, args.allow_pickle)
        self.method, self.config = get_method(self.adapter.method), self.adapter.config
        self.raw_config = self.config.to_dict()
        self.state_dict = adapter_state_dict(self.adapter)
        self.folder = os.path.dirname(self.config_path)

    def files(self) -> dict[str, int]:
        return {os.path.basename(p): os.path.getsize(p) for p in (self.config_path, self.weights_path)}


def _load(source: str, args: argparse.Namespace) -> _Loaded:
    if not os.path.exists(source) and ("/" not in source.strip("/") or source.startswith((".", "/", "~"))):
        raise BadInput(f"{source}: no such folder (and not a Hub repo id: namespace/name)")
    return _Loaded(source, args)


def _source_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("where adapters are read from (a folder or a Hub repo id)")
    g.add_argument("--revision", default=None, help="Hub branch, tag or commit")
    g.add_argument("--subfolder", default=None, help="folder inside the repo or directory")
    g.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the stored login)")
    g.add_argument("--adapter-name", default=None,
                   help="a non-default adapter, read from the sub-folder PEFT saves it in")
    g.add_argument("--allow-pickle", action="store_true",
                   help="read adapter_model.bin (pickle) when there is no safetensors file")


# -- inspect -------------------------------------------------------------------------------------------
def _entry_info(a: Adapter, path: str) -> dict[str, Any]:
    e = a.entries[path]
    leaves = a.leaves(path)
    shapes = {n: list(t.shape) for n, t in leaves.items() if n not in (GATE, SCALING)}
    info: dict[str, Any] = {"path": path, "kind": e.kind or "replacement", "shapes": shapes}
    if e.kind:
        info["r"] = e.r
        info["scaling"] = e.scaling
        if a.method == "lora":  # per-module rank / alpha from rank_pattern / alpha_pattern
            info["alpha"] = a.config.rank_and_alpha(path)[1]
        elif getattr(a.config, "lora_alpha", None) is not None:  # AdaLoRA: one alpha
            info["alpha"] = a.config.lora_alpha
        A, B = leaves.get("lora_A"), leaves.get("lora_B")
        if A is not None and B is not None:
            dims = (A.shape[-1], B.shape[0])
            info["in"], info["out"] = (int(dims[0]), int(dims[1]))
    if e.replaced:
        info["replaced"] = list(e.replaced)
    return info


def _inspect_data(ld: _Loaded) -> dict[str, Any]:
    a, cfg = ld.adapter, ld.config
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    for path in a.paths:
        info = _entry_info(a, path)
        e = a.entries[path]
        if e.kind:
            key = (e.kind, path.rsplit(".", 1)[-1])
            g = groups.setdefault(key, {"kind": e.kind, "name": key[1], "count": 0, "ranks": set(), "alphas": set(),
                                        "dims": set(), "paths": []})
            g["count"] += 1
            g["ranks"].add(e.r)
            if "alpha" in info:
                g["alphas"].add(info["alpha"])
            if "in" in info:
                g["dims"].add(f"{info['in']}->{info['out']}")
            g["paths"].append(path)
        for name in e.replaced:
            full = f"{path}.{name}" if path else name
            key = ("replacement", full)
            groups[key] = {"kind": "replacement", "name": full, "count": 1, "ranks": set(), "alphas": set(),
                           "dims": {"x".join(str(s) for s in a.leaves(path)[name].shape)}, "paths": [path],
                           "frozen": name in e.frozen}
    dtypes: dict[str, int] = {}
    for t in ld.state_dict.values():
        k = str(t.dtype).replace("torch.", "")
        dtypes[k] = dtypes.get(k, 0) + t.numel()
    frozen = sum(t.numel() for p, e in a.entry_items for n, t in a.leaves(p).items() if n in e.frozen)
    others = []
    if os.path.isdir(ld.source):
        others = sorted(d for d in os.listdir(ld.folder)
                        if os.path.isfile(os.path.join(ld.folder, d, "adapter_config.json")))
    files = ld.files()
    return {
        "source": ld.source,
        "folder": ld.folder,
        "method": a.method,
        "peft_type": ld.raw_config.get("peft_type"),
        "task_type": cfg.task_type,
        "base_model": cfg.base_model_name_or_path,
        "base_model_revision": cfg.revision,
        "targets": [
            {"kind": g["kind"], "module": g["name"], "count": g["count"], "ranks": sorted(g["ranks"]),
             "alphas": sorted(g["alphas"]), "in_out": sorted(g["dims"]),
             **({"frozen": g["frozen"]} if "frozen" in g else {})}
            for _, g in sorted(groups.items(), key=lambda kv: (kv[0][0] == "replacement", kv[0]))],
        "modules": len([p for p, e in a.entry_items if e.kind]),
        "parameters": a.num_parameters(),
        "frozen_parameters": frozen,
        "dtypes": dtypes,
        "files": files,
        "size_on_disk": sum(files.values()),
        "unknown_config_fields": dict(getattr(cfg, "extra", {}) or {}),
        "other_adapters_in_folder": others,
    }


def _cmd_inspect(args: argparse.Namespace) -> int:
    d = _inspect_data(_load(args.source, args))
    if args.json:
        _print_json(d)
        return EXIT_OK
    con = _console()
    con.print(f"[bold]{d['source']}[/bold]: {_METHOD_NAMES.get(d['method'], d['method'])} adapter "
              f"(peft_type {d['peft_type']}), {d['modules']} adapted modules")
    con.print(f"  base model: {d['base_model'] or 'not recorded'}"
              + (f" (revision {d['base_model_revision']})" if d["base_model_revision"] else "")
              + (f"; task_type {d['task_type']}" if d["task_type"] else ""))
    rows = []
    for t in d["targets"]:
        fmt = lambda xs: ", ".join(f"{x:g}" if isinstance(x, float) else str(x) for x in xs) or "-"  # noqa: E731
        rows.append((t["kind"] + (" (frozen)" if t.get("frozen") else ""), t["module"], t["count"], fmt(t["ranks"]),
                     fmt(t["alphas"]), ", ".join(t["in_out"]) or "-"))
    con.print(_table("targets", ["kind", "module", "count", "r", "alpha", "in->out / shape"], rows))
    dtypes = ", ".join(f"{k} ({v:,})" for k, v in d["dtypes"].items())
    con.print(f"  parameters: {d['parameters']:,} trainable"
              + (f" + {d['frozen_parameters']:,} frozen (saved embedding matrices)" if d["frozen_parameters"] else "")
              + f"; dtype: {dtypes}")
    con.print("  on disk: " + ", ".join(f"{k} {_size(v)}" for k, v in d["files"].items())
              + f" (total {_size(d['size_on_disk'])})")
    unknown = d["unknown_config_fields"]
    con.print("  unknown config fields (kept, written back): "
              + (", ".join(f"{k}={json.dumps(v)}" for k, v in unknown.items()) if unknown else "none"))
    if d["other_adapters_in_folder"]:
        con.print("  other adapters in this folder (--adapter-name): " + ", ".join(d["other_adapters_in_folder"]))
    return EXIT_OK


# -- diff ----------------------------------------------------------------------------------------------
def _dense_delta(a: Adapter, path: str) -> torch.Tensor | None:
    """The module's delta as one dense tensor: ``scaling * B @ A`` ([out, in]) for the LoRA family, the
    scaling vector minus 1 for IA3; None for entries without a delta."""
    e = a.entries[path]
    if not e.kind:
        return None
    leaves = {n: (t.float() if t.is_floating_point() else t) for n, t in a.leaves(path).items()}
    if "lora_A" in leaves and "lora_B" in leaves:
        A, B = leaves["lora_A"], leaves["lora_B"]
        shape = (A.shape[-1], B.shape[0]) if e.kind == "embedding" else (B.shape[0], A.shape[-1])
        with torch.no_grad():
            return get_method(a.method).merge(e, leaves, True, {"weight": torch.zeros(shape)})["weight"]
    vectors = [t for n, t in leaves.items() if n not in (GATE, SCALING)]
    if len(vectors) == 1:
        return vectors[0].flatten() - 1.0
    return None


def _diff_data(la: _Loaded, lb: _Loaded) -> dict[str, Any]:
    a, b = la.adapter, lb.adapter
    ca, cb = la.config.to_dict(), lb.config.to_dict()
    config = {k: {"a": ca.get(k), "b": cb.get(k)} for k in sorted(set(ca) | set(cb)) if ca.get(k) != cb.get(k)}
    only_a = [p for p in a.paths if p not in b.entries]
    only_b = [p for p in b.paths if p not in a.entries]
    modules: dict[str, Any] = {}
    for p in a.paths:
        if p not in b.entries:
            continue
        ea, eb = a.entries[p], b.entries[p]
        sa = {n: list(t.shape) for n, t in a.leaves(p).items() if n not in (GATE, SCALING)}
        sb = {n: list(t.shape) for n, t in b.leaves(p).items() if n not in (GATE, SCALING)}
        m: dict[str, Any] = {}
        if sa != sb:
            m["shapes"] = {"a": sa, "b": sb}
        if ea.kind != eb.kind or ea.r != eb.r or not math.isclose(ea.scaling, eb.scaling, rel_tol=1e-9):
            m["entry"] = {"a": {"kind": ea.kind, "r": ea.r, "scaling": ea.scaling},
                          "b": {"kind": eb.kind, "r": eb.r, "scaling": eb.scaling}}
        da, db = _dense_delta(a, p), _dense_delta(b, p)
        if da is not None and db is not None:
            if da.shape == db.shape:
                diff = float((da - db).norm())
                na, nb = float(da.norm()), float(db.norm())
                m.update(delta_norm_a=na, delta_norm_b=nb, delta_diff_norm=diff,
                         delta_rel_diff=diff / max(na, nb) if max(na, nb) > 0 else 0.0)
            else:
                m["delta_shapes"] = {"a": list(da.shape), "b": list(db.shape)}
        for name in sorted(set(ea.replaced) | set(eb.replaced)):
            ta, tb = a.leaves(p).get(name), b.leaves(p).get(name)
            if ta is None or tb is None:
                m.setdefault("replaced_only_in", {})[name] = "a" if tb is None else "b"
            elif ta.shape == tb.shape:
                diff = float((ta.float() - tb.float()).norm())
                if diff:
                    m.setdefault("replacement_diff_norm", {})[name] = diff
        if m and (set(m) - {"delta_norm_a", "delta_norm_b", "delta_diff_norm", "delta_rel_diff"}
                  or m.get("delta_diff_norm")):
            modules[p] = m
    same = not config and not only_a and not only_b and not modules
    return {"a": la.source, "b": lb.source, "identical": same, "config": config, "only_in_a": only_a,
            "only_in_b": only_b, "modules": modules,
            "modules_compared": len([p for p in a.paths if p in b.entries])}


def _cmd_diff(args: argparse.Namespace) -> int:
    d = _diff_data(_load(args.a, args), _load(args.b, args))
    if args.json:
        _print_json(d)
        return EXIT_OK
    con = _console()
    if d["identical"]:
        con.print(f"{d['a']} and {d['b']}: identical config and tensors ({d['modules_compared']} modules)")
        return EXIT_OK
    con.print(f"[bold]A[/bold] = {d['a']}\n[bold]B[/bold] = {d['b']}")
    if d["config"]:
        con.print(_table("config fields that differ", ["field", "A", "B"],
                         [(k, json.dumps(v["a"]), json.dumps(v["b"])) for k, v in d["config"].items()]))
    else:
        con.print("config: the same")
    for side in ("a", "b"):
        only = d[f"only_in_{side}"]
        if only:
            con.print(f"modules only in {side.upper()} ({len(only)}): " + ", ".join(only[:8])
                      + (f", +{len(only) - 8} more" if len(only) > 8 else ""))
    rows = []
    for p, m in d["modules"].items():
        shapes = ""
        if "shapes" in m:
            shapes = "; ".join(f"{n}: {m['shapes']['a'].get(n)} vs {m['shapes']['b'].get(n)}"
                               for n in sorted(set(m["shapes"]["a"]) | set(m["shapes"]["b"]))
                               if m["shapes"]["a"].get(n) != m["shapes"]["b"].get(n))
        if "delta_diff_norm" in m:
            delta = f"{m['delta_diff_norm']:.4g} ({m['delta_rel_diff']:.2%})"
        elif "delta_shapes" in m:
            delta = f"shapes differ: {m['delta_shapes']['a']} vs {m['delta_shapes']['b']}"
        else:
            delta = "-"
        repl = ", ".join(f"{k}: {v:.4g}" for k, v in m.get("replacement_diff_norm", {}).items())
        rows.append((p, shapes or "same", delta, repl or "-"))
    if rows:
        con.print(_table(f"modules that differ ({len(rows)} of {d['modules_compared']} in both)",
                         ["module", "shapes", "|ΔA - ΔB| (rel.)", "replacements |A - B|"], rows))
    return EXIT_OK


# -- base models (merge, verify) ----------------------------------------------------------------------
_TASK_AUTO = TASK_AUTO_CLASS
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _base_name(args: argparse.Namespace, ld: _Loaded) -> str:
    base = args.base or ld.config.base_model_name_or_path
    if not base:
        raise _Usage(f"adaptfn {args.command}: error: --base is required ({ld.source} does not name its base model "
                     "in base_model_name_or_path)")
    return base


def _load_base(args: argparse.Namespace, ld: _Loaded, base: str) -> torch.nn.Module:
    """The base model with transformers (the Auto class of the adapter's task_type); failures -> BadInput."""
    try:
        import transformers
    except ImportError:  # pragma: no cover - transformers is an optional dependency
        raise BadInput("loading a base model needs transformers (pip install 'adaptfn[hf]')") from None
    auto = getattr(transformers, _TASK_AUTO.get(ld.config.task_type or "", "AutoModelForCausalLM"))
    kwargs: dict[str, Any] = {}
    if getattr(args, "base_revision", None):
        kwargs["revision"] = args.base_revision
    if getattr(args, "dtype", None) not in (None, "auto"):
        kwargs["dtype"] = _DTYPES[args.dtype]
    try:
        with _quiet_transformers():
            model = auto.from_pretrained(base, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BadInput(f"cannot load the base model {base!r} with transformers.{auto.__name__}: {first}") from None
    return model.eval()


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    import warnings

    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover
        yield
        return
    import logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    bnb = logging.getLogger("bitsandbytes")
    bnb_level = bnb.level
    bnb.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)
        bnb.setLevel(bnb_level)
        if bars:
            hf_logging.enable_progress_bar()


# -- merge ---------------------------------------------------------------------------------------------
_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")


def _has_tokenizer(base: str, revision: str | None) -> bool:
    """Whether the base model's folder or repo has tokenizer files (then the merge copies them)."""
    if os.path.isdir(base):
        return any(os.path.isfile(os.path.join(base, f)) for f in _TOKENIZER_FILES)
    from huggingface_hub import HfApi, try_to_load_from_cache

    for f in _TOKENIZER_FILES:
        if isinstance(try_to_load_from_cache(base, f, revision=revision), str):
            return True
    api = HfApi()  # (a fresh client: the module-level one keeps the endpoint of its import)
    try:
        return any(api.file_exists(base, f, revision=revision) for f in _TOKENIZER_FILES)
    except Exception:  # noqa: BLE001 - offline, unreachable, no access: the tokenizer is optional
        return False

def _progress(enabled: bool) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=_console(stderr=True), disable=not enabled, transient=False)


def merge_into(model: torch.nn.Module, adapter: Adapter, progress: Any = None) -> dict[str, int]:
    """Fold ``adapter`` into ``model``'s tensors in place, one module at a time, so that memory stays
    about one copy of the model plus one module's merged tensors (not a second model).

    Tied tensors (OPT's ``lm_head`` / ``embed_tokens``) stay tied when the merge changes every alias
    the same way, and are untied (``config.tie_word_embeddings = False``) when only one side changes.

    Arguments:
        model: a module with plain (not quantized) tensors.
        adapter: a single adapter that fits ``model`` (checked first with :func:`adaptfn.inject`).
        progress: a ``rich.progress.Progress`` to advance per module, or None.

    Returns:
        ``{"modules": merged modules, "tensors": tensors written, "untied": tensors untied}``.
    """
    from torch import nn

    fn, params = functional(model)
    inject(fn, adapter)  # checks the adapter against the model (IncompatibleAdapterError) before any write
    aliases: dict[int, list[str]] = {}
    for k, v in params.items():
        aliases.setdefault(id(v), []).append(k)
    written = untied = 0
    task = progress.add_task("merging", total=len(adapter.paths)) if progress is not None else None
    for path in adapter.paths:
        new = merge(params, select(adapter, lambda p, q=path: p == q))
        changed = {k: v for k, v in new.items() if v is not params[k]}
        groups: dict[int, list[str]] = {}
        for k in changed:
            groups.setdefault(id(params[k]), []).append(k)
        with torch.no_grad():
            for gid, names in groups.items():
                every = aliases[gid]
                values = [new[k] for k in every]
                if all(v is values[0] for v in values):  # every alias changes the same way: write in place
                    params[every[0]].copy_(values[0])
                    written += 1
                    continue
                for k in names:  # only some aliases change: they get their own tensor (untied)
                    mod_path, _, attr = k.rpartition(".")
                    mod = model.get_submodule(mod_path)
                    t = new[k].detach().clone()
                    if attr in mod._parameters:
                        mod._parameters[attr] = nn.Parameter(t, requires_grad=False)
                    else:
                        mod._buffers[attr] = t
                    params[k] = t
                    written += 1
                    untied += 1
        del new, changed
        if task is not None:
            progress.advance(task)
    if untied:
        cfg = getattr(model, "config", None)
        if cfg is not None and getattr(cfg, "tie_word_embeddings", False):
            cfg.tie_word_embeddings = False
    return {"modules": len(adapter.paths), "tensors": written, "untied": untied}


def _cmd_merge(args: argparse.Namespace) -> int:
    ld = _load(args.source, args)
    base = _base_name(args, ld)
    if os.path.isfile(args.out):
        raise BadInput(f"--out {args.out!r} is a file; it must be a folder")
    model = _load_base(args, ld, base)
    inject(functional(model)[0], ld.adapter)  # the adapter fits the model (IncompatibleAdapterError) or nothing runs
    with torch.no_grad():  # page the weights in (a fresh checkpoint may be memory-mapped, untouched), then measure
        for t in model.state_dict().values():
            t.sum()
    rss_before = _reset_peak_rss()
    show = not args.json and not args.no_progress
    with _progress(show) as progress:
        stats = merge_into(model, ld.adapter, progress)
    with _quiet_transformers():
        model.save_pretrained(args.out, max_shard_size=args.max_shard_size)
    peak_merge = _proc_status("VmHWM") if rss_before is not None else None
    tokenizer = False
    if not args.no_tokenizer and _has_tokenizer(base, args.base_revision):
        from transformers import AutoTokenizer

        with _quiet_transformers():
            AutoTokenizer.from_pretrained(base, revision=args.base_revision).save_pretrained(args.out)
        tokenizer = True
    files = sorted(f for f in os.listdir(args.out) if f.endswith(".safetensors"))
    out = {"source": args.source, "base_model": base, "out": args.out, **stats, "safetensors_files": files,
           "tokenizer_saved": tokenizer, "peak_rss_bytes": _peak_rss(), "rss_before_merge_bytes": rss_before,
           "peak_rss_merge_and_save_bytes": peak_merge}
    if args.json:
        _print_json(out)
        return EXIT_OK
    con = _console()
    con.print(f"merged {stats['modules']} modules of {args.source} into {base} -> {args.out} "
              f"({len(files)} safetensors file{'s' if len(files) != 1 else ''}"
              + (", tokenizer copied" if tokenizer else "") + ")")
    if stats["untied"]:
        con.print(f"  untied {stats['untied']} tensor(s) that the adapter changes on one side only "
                  "(tie_word_embeddings = false)")
    if peak_merge is not None and rss_before is not None:
        con.print(f"  memory (RSS): {_size(rss_before)} with the model loaded, peak {_size(peak_merge)} while merging "
                  "and saving")
    return EXIT_OK


# -- combine -------------------------------------------------------------------------------------------
def _cmd_combine(args: argparse.Namespace) -> int:
    af = _package()
    combine = getattr(af, "combine", None)
    if combine is None:
        raise BadInput("combine needs af.combine (adaptfn's adapter algebra: PEFT's add_weighted_adapter as a pure "
                       f"function), which this adaptfn ({af.__version__}) does not have yet; nothing was written")
    if len(args.weights) != len(args.sources):
        raise _Usage(f"adaptfn combine: error: {len(args.sources)} adapters but {len(args.weights)} --weights; give "
                     "one weight per adapter")
    adapters = [_load(s, args).adapter for s in args.sources]
    kwargs: dict[str, Any] = {"how": args.how, "density": args.density,
                              "majority_sign_method": args.majority_sign_method, "svd_rank": args.svd_rank,
                              "svd_clamp": args.svd_clamp, "svd_full_matrices": not args.svd_economic,
                              "svd_driver": args.svd_driver}
    if args.seed is not None:
        kwargs["generator"] = torch.Generator().manual_seed(args.seed)
    combined = combine(adapters, list(args.weights), **kwargs)
    save(combined, args.out)
    out = {"sources": args.sources, "weights": args.weights, "how": args.how, "out": args.out,
           "modules": len(combined.paths), "parameters": combined.num_parameters()}
    if args.json:
        _print_json(out)
    else:
        _console().print(f"combined {len(adapters)} adapters ({args.how}, weights {args.weights}) -> {args.out}: "
                         f"{out['modules']} modules, {out['parameters']:,} parameters")
    return EXIT_OK


# -- convert -------------------------------------------------------------------------------------------
_FORMATS_TO = ("peft",)
_FORMATS_FROM = ("auto", "peft")


def _looks_community(path: str) -> str | None:
    """'kohya / A1111' when a single weights file has kohya-style keys (lora_unet_*, lora_te_*, lora_down)."""
    if not os.path.isfile(path):
        return None
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        try:
            with safe_open(path, "pt") as f:
                keys = list(f.keys())
        except Exception:  # noqa: BLE001 - unreadable: reported as a bad file below
            return None
        if any(k.startswith(("lora_unet_", "lora_te", "lora_transformer_")) or ".lora_down." in k for k in keys):
            return "kohya / A1111"
    return None


def _cmd_convert(args: argparse.Namespace) -> int:
    supported = "supported: --from peft (or auto) --to peft (a canonical re-save of a PEFT adapter)"
    if args.to.lower() not in _FORMATS_TO:
        raise BadInput(f"convert --to {args.to}: this format is not supported; {supported}")
    if args.from_.lower() not in _FORMATS_FROM:
        raise BadInput(f"convert --from {args.from_}: this format is not supported yet; {supported}")
    kind = _looks_community(args.source)
    if kind is not None:
        raise BadInput(f"{args.source}: a {kind} LoRA file; community formats are not supported yet; {supported}")
    if os.path.isfile(args.source):
        raise BadInput(f"{args.source}: a single file; a PEFT adapter is a folder (or Hub repo) with "
                       f"adapter_config.json; {supported}")
    ld = _load(args.source, args)
    if os.path.realpath(args.out) == os.path.realpath(ld.folder):
        raise BadInput(f"--out {args.out!r} is the source folder; write the converted adapter elsewhere")
    save(ld.adapter, args.out)
    out = {"source": args.source, "from": "peft", "to": "peft", "out": args.out,
           "files": sorted(os.listdir(args.out)), "modules": len(ld.adapter.paths)}
    if args.json:
        _print_json(out)
    else:
        _console().print(f"converted {args.source} (peft) -> {args.out} (peft): {out['modules']} modules, "
                         f"files {', '.join(out['files'])}")
    return EXIT_OK


# -- verify --------------------------------------------------------------------------------------------
def _main_output(out: Any) -> torch.Tensor:
    for name in ("logits", "last_hidden_state"):
        t = getattr(out, name, None)
        if isinstance(t, torch.Tensor):
            return t
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise BadInput(f"the base model's output ({type(out).__name__}) has no logits / last_hidden_state to compare")


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-12))


def _cmd_verify(args: argparse.Namespace) -> int:
    import copy

    ld = _load(args.source, args)
    base = _base_name(args, ld)
    model = _load_base(args, ld, base)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if not isinstance(vocab, int) or vocab < 1:
        raise BadInput(f"{base}: the model config has no vocab_size; verify feeds random token ids")
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, vocab, (args.samples, args.seq_len), generator=g)
    peft_model = None
    peft_note = None
    if not args.no_peft:
        try:
            with _quiet_transformers():
                import peft
        except ImportError:
            peft_note = "peft is not installed: compared adaptfn's unmerged and merged forwards only"
        else:
            base_copy = copy.deepcopy(model)
            with _quiet_transformers():
                try:
                    peft_model = peft.PeftModel.from_pretrained(base_copy, ld.folder).eval()
                except Exception as e:  # noqa: BLE001 - PEFT's own refusal, reported as such
                    raise BadInput(f"PEFT could not load {ld.source} onto {base}: {type(e).__name__}: {e}") from None
    fn, params = functional(model)
    g_fn = inject(fn, ld.adapter)
    checks = []
    with torch.no_grad(), _quiet_transformers():
        base_out = _main_output(fn(params, input_ids=ids))
        ours = _main_output(g_fn(params, input_ids=ids))
        merged = _main_output(fn(merge(params, ld.adapter), input_ids=ids))
        checks.append({"check": "adaptfn merged vs unmerged", "max_rel_err": _rel_err(merged, ours)})
        if peft_model is not None:
            ref = _main_output(peft_model(input_ids=ids))
            checks.append({"check": "adaptfn vs PEFT", "max_rel_err": _rel_err(ours, ref)})
    effect = _rel_err(ours, base_out)
    for c in checks:
        c["ok"] = c["max_rel_err"] <= args.tol
    ok = all(c["ok"] for c in checks)
    out = {"source": args.source, "base_model": base, "inputs": [args.samples, args.seq_len], "tolerance": args.tol,
           "checks": checks, "adapter_effect_rel": effect, "ok": ok, **({"note": peft_note} if peft_note else {})}
    if args.json:
        _print_json(out)
    else:
        con = _console()
        con.print(f"verify {args.source} on {base}: {args.samples} random inputs of {args.seq_len} tokens "
                  f"(seed {args.seed})")
        con.print(_table(None, ["check", "max rel. error", "tolerance", "ok"],
                         [(c["check"], f"{c['max_rel_err']:.3e}", f"{args.tol:g}", "yes" if c["ok"] else "NO")
                          for c in checks]))
        con.print(f"  the adapter changes the output by {effect:.3e} (rel.) from the base model's")
        if peft_note:
            con.print(f"  note: {peft_note}")
        if not ok:
            _console(stderr=True).print(f"adaptfn verify: errors above the tolerance {args.tol:g}")
    return EXIT_OK if ok else EXIT_MISMATCH


# -- the parser ------------------------------------------------------------------------------------------
def _positive_int(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _nonneg_float(s: str) -> float:
    v = float(s)
    if not math.isfinite(v) or v < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {s}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="adaptfn", description="Inspect, compare, merge, combine, convert and verify PEFT-format "
                "adapters (a folder or a Hub repo id).",
                epilog="exit status: 0 ok, 1 usage, 2 bad input, 3 verify: errors above the tolerance")
    p.add_argument("--version", action="version", version=f"adaptfn {_package().__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    c = sub.add_parser("inspect", help="method, base model, targets, ranks, parameters, files of an adapter")
    c.add_argument("source", help="adapter folder or Hub repo id")
    c.add_argument("--json", action="store_true", help="print JSON")
    _source_options(c)

    c = sub.add_parser("diff", help="config and per-module differences of two adapters")
    c.add_argument("a", help="adapter A (folder or Hub repo id)")
    c.add_argument("b", help="adapter B (folder or Hub repo id)")
    c.add_argument("--json", action="store_true", help="print JSON")
    _source_options(c)

    c = sub.add_parser("merge", help="fold an adapter into its base model and save a transformers checkpoint")
    c.add_argument("source", help="adapter folder or Hub repo id")
    c.add_argument("--base", default=None, help="base model folder or Hub id (default: the adapter config's "
                   "base_model_name_or_path)")
    c.add_argument("--base-revision", default=None, help="revision of the base model on the Hub")
    c.add_argument("--out", required=True, help="folder for the merged checkpoint (safetensors)")
    c.add_argument("--dtype", default="auto", choices=["auto", *_DTYPES], help="dtype to load the base model in")
    c.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard (default 2GB); the merge "
                   "holds about one copy of the model plus one shard")
    c.add_argument("--no-tokenizer", action="store_true", help="do not copy the base model's tokenizer")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    c.add_argument("--json", action="store_true", help="print JSON")
    _source_options(c)

    c = sub.add_parser("combine", help="a weighted combination of adapters (af.combine), saved as one adapter")
    c.add_argument("sources", nargs="+", help="adapter folders or Hub repo ids")
    c.add_argument("--weights", nargs="+", type=float, required=True, help="one weight per adapter")
    c.add_argument("--how", default="cat", help="combination: cat, linear, svd, ties, dare_linear, ... "
                   "(af.combine's how=)")
    c.add_argument("--density", type=float, default=None, help="ties / dare density")
    c.add_argument("--majority-sign-method", default="total", choices=["total", "frequency"])
    c.add_argument("--svd-rank", type=_positive_int, default=None)
    c.add_argument("--svd-clamp", type=float, default=None)
    c.add_argument("--svd-economic", action="store_true", help="svd_full_matrices=False")
    c.add_argument("--svd-driver", default=None)
    c.add_argument("--seed", type=int, default=None, help="seed of the generator for random methods (dare)")
    c.add_argument("--out", required=True, help="folder for the combined adapter")
    c.add_argument("--json", action="store_true", help="print JSON")
    _source_options(c)

    c = sub.add_parser("convert", help="convert between adapter formats (today: a canonical PEFT re-save)")
    c.add_argument("source", help="adapter folder, Hub repo id or weights file")
    c.add_argument("--to", required=True, help="target format (supported: peft)")
    c.add_argument("--from", dest="from_", default="auto", help="source format (auto, peft)")
    c.add_argument("--out", required=True, help="output folder")
    c.add_argument("--json", action="store_true", help="print JSON")
    _source_options(c)

    c = sub.add_parser("verify", help="run adaptfn (and PEFT, when installed) on random inputs and compare")
    c.add_argument("source", help="adapter folder or Hub repo id")
    c.add_argument("--base", default=None, help="base model folder or Hub id (default: from the adapter config)")
    c.add_argument("--base-revision", default=None, help="revision of the base model on the Hub")
    c.add_argument("--tol", type=_nonneg_float, default=1e-4, help="largest max-relative error accepted (1e-4)")
    c.add_argument("--samples", type=_positive_int, default=4, help="random inputs (rows)")
    c.add_argument("--seq-len", type=_positive_int, default=16, help="tokens per input")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--dtype", default="auto", choices=["auto", *_DTYPES], help="dtype to load the base model in")
    c.add_argument("--no-peft", action="store_true", help="do not compare with PEFT")
    c.add_argument("--json", action="store_true", help="print JSON")
    _source_options(c)
    return p


_COMMANDS = {"inspect": _cmd_inspect, "diff": _cmd_diff, "merge": _cmd_merge, "combine": _cmd_combine,
             "convert": _cmd_convert, "verify": _cmd_verify}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 usage, 2 bad input, 3 verify mismatch).

    Arguments:
        argv: the arguments after the program name (default: ``sys.argv[1:]``).

    Returns:
        The exit status; messages go to stdout (results) and stderr (errors).

    Example:
        >>> _ = af.save(adapter, "my-lora")
        >>> af.cli.main(["inspect", "my-lora", "--json"])       # doctest: +ELLIPSIS
        {
          "source": "my-lora",
        ...
        0
    """
    parser = build_parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
        if args.command is None:
            raise _Usage(parser.format_help().rstrip())
        return _COMMANDS[args.command](args)
    except _Usage as e:
        sys.stderr.write(f"{e}\n")
        return EXIT_USAGE
    except SystemExit as e:  # --help / --version
        return int(e.code or 0) if isinstance(e.code, int) else EXIT_OK
    except (AdaptfnError, BadInput) as e:
        prog = "adaptfn" + (f" {getattr(args, 'command', '')}" if "args" in locals() and args.command else "")
        msg = str(e)
        kind = "" if isinstance(e, BadInput) else f" ({type(e).__name__})"
        sys.stderr.write(f"{prog}: error{kind}: {msg}\n")
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:  # pragma: no cover
        sys.stderr.write("adaptfn: interrupted\n")
        return 130

