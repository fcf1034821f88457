"""A griffe extension for the docs site (mkdocs.yml): the package's docstrings are Google-style with a few reST
habits that Markdown would show literally. Before mkdocstrings parses a docstring this rewrites

- Sphinx roles (``:class:`~pkg.mod.Name```, ``:func:``, ``:meth:``, ...) as code, linked into the API reference
  when the target is one of its ``:::`` entries (``[`Name`][pkg.mod.Name]``);
- ``Example::`` / ``text::`` followed by an indented block as a fenced code block (``pycon`` for doctest lines);
- reST simple tables (``====  ====`` borders) as Markdown tables.

Only the rendered text changes; the source docstrings stay as they are (the doctests read them).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|data|exc|obj|const|type):`(?P<body>[^`]+)`")
BORDER = re.compile(r"^(\s*)(=+)(\s+=+)+\s*$")
REFERENCE = Path(__file__).resolve().parents[1] / "docs" / "reference"


def _documented() -> set[str]:
    out: set[str] = set()
    for page in REFERENCE.glob("*.md"):
        out |= set(re.findall(r"^::: (\S+)", page.read_text(), re.M))
    return out


def _role(m: re.Match[str], documented: set[str]) -> str:
    body = m.group("body").strip()
    explicit = re.fullmatch(r"(?P<title>.+?)\s*<(?P<target>[^>]+)>", body)
    if explicit:
        title, target = explicit.group("title"), explicit.group("target")
    else:
        target = body.lstrip("~").rstrip("()")
        title = target.rsplit(".", 1)[-1] if body.startswith("~") else target
        if body.endswith("()"):
            title += "()"
    if target in documented:
        return f"[`{title}`][{target}]"
    return f"`{title}`"


def _table(lines: list[str]) -> list[str]:
    """A reST simple table (border, header, border, rows, border) as a Markdown table."""
    border = lines[0]
    spans = [(m.start(), m.end()) for m in re.finditer(r"=+", border)]

    def cells(line: str) -> list[str]:
        out = []
        for i, (a, _) in enumerate(spans):
            end = spans[i + 1][0] if i + 1 < len(spans) else len(line)
            out.append(line[a:end].strip().replace("|", "\\|"))
        return out

    rows = [cells(line) for line in lines if not BORDER.match(line) and line.strip()]
    header, body = rows[0], rows[1:]
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(r) + " |" for r in body]
    return md


def convert(text: str, documented: set[str]) -> str:
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if BORDER.match(line):  # a simple table: up to the third border
            j, borders = i, 0
            while j < len(lines) and borders < 3:
                borders += bool(BORDER.match(lines[j]))
                j += 1
            if borders == 3:
                out += _table(lines[i:j])
                i = j
                continue
        stripped = line.rstrip()
        if stripped.endswith("::") and not stripped.strip().startswith((">>>", "#")):
            indent = len(line) - len(line.lstrip())
            j = i + 1
            block: list[str] = []
            while j < len(lines) and (not lines[j].strip() or len(lines[j]) - len(lines[j].lstrip()) > indent):
                block.append(lines[j])
                j += 1
            while block and not block[-1].strip():
                block.pop()
                j -= 1
            code = [b for b in block if b.strip()]
            if code:
                lead = stripped[:-2].rstrip()
                pad = " " * indent
                if lead.strip() in ("Example", "Examples"):
                    out.append(f"{pad}**{lead.strip()}**")
                elif lead.strip():
                    out.append(f"{lead}:")
                cut = min(len(b) - len(b.lstrip()) for b in code)
                lang = "pycon" if code[0].lstrip().startswith(">>>") else "python"
                out += ["", f"{pad}```{lang}"]
                out += [pad + b[cut:] if b.strip() else "" for b in block]
                out += [f"{pad}```"]
                i = j
                continue
        out.append(ROLE.sub(lambda m: _role(m, documented), line))
        i += 1
    return "\n".join(out)


class RestHabits(griffe.Extension):
    """Rewrites each docstring once, when griffe loads the object."""

    def __init__(self) -> None:
        super().__init__()
        self.documented = _documented()

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = convert(obj.docstring.value, self.documented)
