"""The examples of README.md and docs/*.md as data: which blocks they are, how each is
marked, and what a console block's shown output accepts.

Pure (text in, blocks and patterns out), so the rules are unit-tested without a metro;
tests/test_docs_examples.py is the one I/O edge that runs the blocks against a live
metro, and its docstring is the convention's description for authors.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

# Fence languages that are examples (run unless marked skip), and those that are
# not (diagrams, layouts, config excerpts). Any other language fails the check,
# so a new ```bash or ```pycon block cannot slip through unrun.
SHELL_LANGS = frozenset({"sh", "bash", "shell"})
RUN_LANGS = SHELL_LANGS | {"console", "python"}
NOT_EXAMPLE_LANGS = frozenset({"", "text", "toml", "yaml", "json", "ini", "diff", "mermaid"})
MARKERS = frozenset({"skip", "shape", "background"})
# The local metro's cloudlets (configs/local-metro.toml): in shape mode one stands for any.
METRO_NODES = ("downtown", "harbor", "campus")

_FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w+-]*)[ \t]*$")
_MARKER = re.compile(r"^\s*<!--\s*example:\s*(?P<kind>[\w-]+)\s*(?:[—:-]+\s*)?"
                     r"(?P<reason>.*?)\s*-->\s*$")
_OUTPUT_COMMENT = re.compile(r"\s{2,}#\s.*$")
_ELLIPSIS_LINE = frozenset({"...", "…"})
_SHAPE_TOKEN = re.compile(r"(…|\b[0-9a-f]{8,}\b|\d+(?:[.,]\d+)*|"
                          + "|".join(rf"\b{n}\b" for n in METRO_NODES) + ")")


@dataclass(frozen=True)
class Block:
    """One fenced block: where it is, its language, its text and its marker."""
    path: str          # relative to the repository, e.g. "docs/sdk.md"
    line: int          # the opening fence's line number (1-based)
    lang: str
    text: str          # dedented by the fence's indentation
    marker: str | None
    reason: str

    @property
    def id(self) -> str:
        return f"{self.path}:L{self.line}"

    @property
    def is_example(self) -> bool:
        return self.lang not in NOT_EXAMPLE_LANGS

    def problem(self) -> str | None:
        """Why this block is neither run nor properly skipped, or None if it is fine."""
        if not self.is_example:
            return None
        if self.marker is not None and self.marker not in MARKERS:
            return f"unknown marker 'example: {self.marker}' (known: {', '.join(sorted(MARKERS))})"
        if self.marker == "skip":
            return None if self.reason else "'example: skip' needs a reason"
        if self.lang not in RUN_LANGS:
            return (f"a ```{self.lang} block is not run: use sh, console or python, or mark it "
                    "<!-- example: skip — REASON -->")
        if self.marker == "shape" and self.lang != "console":
            return "'example: shape' applies to console blocks only"
        return None


def blocks(root: Path, path: str) -> list[Block]:
    """Every fenced block of one markdown file, with the marker on the line before it."""
    lines = (root / path).read_text().splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, start = m.group("indent"), i
        body: list[str] = []
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i])
            i += 1
        marker = _MARKER.match(lines[start - 1]) if start else None
        found.append(Block(path, start + 1, m.group("lang"), "\n".join(body) + "\n",
                           marker.group("kind") if marker else None,
                           marker.group("reason") if marker else ""))
        i += 1
    return found


def doc_paths(root: Path) -> list[str]:
    """README.md, then docs/*.md in name order (files other engineers add are picked up)."""
    return ["README.md", *sorted(str(p.relative_to(root)) for p in (root / "docs").glob("*.md"))]


def shell_commands(block: Block) -> list[tuple[str, list[str]]]:
    """(command, shown output lines) pairs. A sh block's every line is a command (a
    trailing backslash continues it, comment lines are prose); a console block's are
    its `$ ` lines, each followed by the output it shows."""
    out: list[tuple[str, list[str]]] = []
    pending = ""
    for raw in block.text.splitlines():
        if block.lang == "console" and not pending and not raw.startswith("$ "):
            if out:
                out[-1][1].append(raw)
            continue
        line = raw.strip() if pending else raw[2:] if block.lang == "console" else raw
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1].rstrip() + " "
            continue
        out.append((pending + line, []))
        pending = ""
    return out


def output_pattern(shown: list[str], *, shape: bool) -> re.Pattern[str]:
    """A pattern for a command's whole output from the lines a console block shows.

    A line of only `...`/`…` stands for any lines; `…` in a line for any text; a
    trailing `  # comment` is the doc's aside, not output. With `shape`, numbers, hex
    ids and the metro's cloudlet names each match any of their kind.
    """
    parts: list[str] = []
    for line in shown:
        line = _OUTPUT_COMMENT.sub("", line).rstrip()
        if line.strip() in _ELLIPSIS_LINE:
            parts.append(r"(?:[^\n]*\n)*?")
            continue
        pattern = ""
        for piece in _SHAPE_TOKEN.split(line):
            if piece == "…":
                pattern += r"[^\n]*?"
            elif shape and piece and _SHAPE_TOKEN.fullmatch(piece):
                if piece in METRO_NODES:
                    pattern += "(?:" + "|".join(METRO_NODES) + ")"
                elif re.fullmatch(r"[0-9a-f]{8,}", piece):
                    pattern += r"[0-9a-f]+"
                else:
                    pattern += r"\d+(?:[.,]\d+)*"
            else:
                pattern += r"[ \t]+".join(re.escape(w) for w in re.split(r"[ \t]+", piece))
        parts.append(pattern + r"[ \t]*\n")
    return re.compile("".join(parts))


def output_matches(shown: list[str], actual: str, *, shape: bool) -> bool:
    """Whether a command's actual output is what the block shows (see output_pattern)."""
    text = "".join(line.rstrip() + "\n" for line in actual.splitlines())
    return output_pattern(shown, shape=shape).fullmatch(text) is not None
