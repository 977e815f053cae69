"""Module-path predicates (``where``) and PEFT's target-matching rules.

``where`` is, everywhere in adaptfn, one of:

* a ``bool`` -- every path (``True``) or none (``False``);
* a ``str`` -- a regular expression, ``re.fullmatch`` against the module path;
* a sequence of ``str`` -- a path matches when it equals an entry or ends with ``"." + entry``
  (PEFT's ``target_modules`` list rule);
* a callable ``path -> bool``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from .errors import ConfigError

__all__ = ["Where", "matcher", "suffix_match", "layer_index", "in_modules_to_save", "is_target", "pattern_key"]

Where = bool | str | Sequence[str] | Callable[[str], bool]


def matcher(where: Where) -> Callable[[str], bool]:
    """Turn a ``where`` into a predicate ``path -> bool`` (raises :class:`ConfigError` on bad input)."""
    if isinstance(where, bool):
        return (lambda _p: True) if where else (lambda _p: False)
    if isinstance(where, str):
        try:
            pattern = re.compile(where)
        except re.error as e:
            raise ConfigError(f"where: {where!r} is not a valid regular expression ({e})") from None
        return lambda p: pattern.fullmatch(p) is not None
    if callable(where):
        return lambda p: bool(where(p))  # type: ignore[operator]
    if isinstance(where, (list, tuple, set, frozenset)):
        entries = [str(e) for e in where]
        exact = set(entries)
        suffixes = tuple("." + e for e in entries)
        return lambda p: p in exact or p.endswith(suffixes)
    raise ConfigError(
        f"where: expected a bool, a regex string, a list of module paths/suffixes or a callable, "
        f"got {type(where).__name__}"
    )


def suffix_match(names: Sequence[str] | str | None, path: str) -> bool:
    """PEFT's rule for ``target_modules``/``exclude_modules``: a string is ``re.fullmatch``; a list
    matches a path equal to an entry or ending with ``"." + entry``."""
    if not names:
        return False
    if isinstance(names, str):
        return re.fullmatch(names, path) is not None
    return path in names or any(path.endswith("." + n) for n in names)


def layer_index(path: str, layers_pattern: Sequence[str] | str | None) -> int | None:
    """The transformer-block index of ``path`` as PEFT reads it for ``layers_to_transform``."""
    if not layers_pattern:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", path)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern)
        m = None
        for pat in patterns:
            m = re.match(rf"(?:^|.*?\.){pat}\.(?P<idx>\d+)\.", path)
            if m is not None:
                break
    return int(m.group("idx")) if m else None


def in_modules_to_save(modules_to_save: Sequence[str] | None, path: str) -> bool:
    """True when ``path`` is (inside) a ``modules_to_save`` module: those are never adapter targets."""
    if not modules_to_save:
        return False
    return any(re.match(rf"(^|.*\.){m}($|\..*)", path) for m in modules_to_save)


def is_target(config: object, path: str) -> bool:
    """PEFT's ``check_target_module_exists``: does ``config`` target the module at ``path``?"""
    exclude = getattr(config, "exclude_modules", None)
    if exclude and suffix_match(exclude, path):
        return False
    if in_modules_to_save(getattr(config, "modules_to_save", None), path):
        return False
    targets = getattr(config, "target_modules", None)
    if targets is None:
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, path) is not None
    if path in targets:
        return True
    found = path.rpartition(".")[2] in targets or any(path.endswith("." + t) for t in targets)
    layers = getattr(config, "layers_to_transform", None)
    using_layers = layers is not None and (len(layers) != 0 if isinstance(layers, (list, tuple)) else True)
    if found and using_layers:
        idx = layer_index(path, getattr(config, "layers_pattern", None))
        if idx is None:
            return False
        return idx == layers if isinstance(layers, int) else idx in layers
    return found


def pattern_key(pattern_keys: Sequence[str], path: str) -> str | None:
    """The ``rank_pattern``/``alpha_pattern`` key that applies to ``path`` (PEFT: ``(.*\\.)?(key)$``)."""
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", path):
            return key
    return None
