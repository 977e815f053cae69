"""A griffe extension (mkdocs.yml, mkdocstrings ``extensions:``): two rewrites of adaptfn's docstrings before
griffe parses them. An ``Example:`` section is read as ``Examples:`` (so its ``>>>`` lines render as code).
Sphinx roles (``:func:`adaptfn.inject```, ``:class:`Adapter```, ``:meth:`save_pretrained```), which
mkdocstrings does not know, become autorefs cross-references to the objects they name, resolved as Sphinx
does (the object's class, its module, then the ``adaptfn`` package) and shown as code; one whose target
the site does not render stays plain code (``optional``), so the reference pages carry no dead link."""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)  # griffe: "Examples:" parses >>> lines as code
_ROLE = re.compile(r":(?:func|class|meth|mod|data|attr|exc|obj):`(~?)([A-Za-z_][\w.]*)`")
_ALIASES = {"adaptfn.adalora.": "adaptfn.methods.adalora_alloc.", "af.": "adaptfn."}


def _walk(obj: Any, out: dict[str, Any]) -> None:
    out[obj.path] = obj
    if obj.is_alias:
        return
    for member in obj.members.values():
        if member.is_alias:
            out[member.path] = member
        elif member.path not in out:
            _walk(member, out)


class SphinxRolesToAutorefs(griffe.Extension):
    def on_package(self, *, pkg: Any, **kwargs: Any) -> None:
        known: dict[str, Any] = {}
        _walk(pkg, known)
        for obj in list(known.values()):
            if obj.is_alias or obj.docstring is None:
                continue
            text = _EXAMPLE.sub(r"\1Examples:", obj.docstring.value)
            obj.docstring.value = _ROLE.sub(lambda m, o=obj: self._ref(m, o, known, pkg.path), text)

    @staticmethod
    def _ref(m: re.Match, obj: Any, known: dict[str, Any], root: str) -> str:
        short, name = m.group(1) == "~", m.group(2)
        for old, new in _ALIASES.items():
            if name.startswith(old):
                name = new + name[len(old):]
        scopes = [obj] + [p for p in (obj.parent, getattr(obj, "module", None)) if p is not None]
        candidates = [name] if name.startswith(root + ".") else [f"{s.path}.{name}" for s in scopes]
        candidates.append(f"{root}.{name}")
        target = next((c for c in candidates if c in known), None)
        shown = name.rsplit(".", 1)[-1] if short else name
        if target is None:
            return f"`{shown}`"
        return f'<autoref identifier="{target}" optional><code>{shown}</code></autoref>'
