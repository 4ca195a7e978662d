"""Wrap code lines longer than the book's limit in notebook code cells, without changing what the code does.

    python scripts/wrap_code_lines.py book/mlpnet.ipynb ...     wrap, in place (cell sources only)
    python scripts/wrap_code_lines.py --check book/*.ipynb      list the lines over the limit; exit 1 if any

The rendered book shows about 80-90 characters of a code line before it has to be scrolled sideways; lines over
``--limit`` (110) are wrapped, aiming at ``--target`` (88) characters per line, by moving a trailing comment onto
its own line above, wrapping long comments, splitting ``a; b`` statements, breaking after a comma or before a
``+`` inside brackets, or splitting a string literal inside brackets into two adjacent literals. Every wrapped
cell must parse to the same AST as before (the comments' words are kept too), otherwise it is left as it was and
reported; outputs are never touched. Notebooks are written back as ``json.dumps(nb, indent=1,
ensure_ascii=False)``.
"""

from __future__ import annotations

import argparse
import ast
import io
import json
import re
import sys
import textwrap
import tokenize
from pathlib import Path

OPEN, CLOSE = "([{", ")]}"


def _tokens(src: str):
    return list(tokenize.generate_tokens(io.StringIO(src).readline))


def _comment_words(src: str) -> list[str]:
    return " ".join(t.string.lstrip("#") for t in _tokens(src) if t.type == tokenize.COMMENT).split()


def same_program(a: str, b: str) -> bool:
    try:
        return ast.dump(ast.parse(a)) == ast.dump(ast.parse(b)) and _comment_words(a) == _comment_words(b)
    except (SyntaxError, tokenize.TokenError, IndentationError):
        return False


def _split_string(tok: str, room: int) -> tuple[str, str] | None:
    """Split a one-line string literal ``tok`` at a space so that the first part is at most ``room`` chars."""
    m = re.match(r"(?i)([rbuf]{0,2})('|\")", tok)
    if not m or tok[len(m.group(1)):].startswith(('"""', "'''")):
        return None
    prefix, quote = m.group(1), m.group(2)
    body = tok[len(prefix) + 1:-1]
    is_f = "f" in prefix.lower()
    depth, best = 0, None
    for i, ch in enumerate(body):
        if is_f and ch in "{}":
            if body[i:i + 2] in ("{{", "}}") and depth == 0:
                continue
            depth += 1 if ch == "{" else -1
        # split after a space or an f-string field, not after a backslash, the first part within room
        at_space = ch == " " and depth == 0 and i > 0 and body[i - 1] != "\\"
        after_field = is_f and ch == "}" and depth == 0
        if (at_space or after_field) and len(prefix) + 1 + i + 2 <= room and 0 < i + 1 < len(body):
            best = i + 1
    if best is None:
        return None
    first, second = body[:best], body[best:]

    def lit(part: str) -> str:
        p = prefix
        if is_f and "{" not in part and "}" not in part:
            p = prefix.replace("f", "").replace("F", "")
        return f"{p}{quote}{part}{quote}"

    return lit(first), lit(second)


def _wrap_line(src: str, lineno: int, limit: int, target: int) -> str | None:
    """One wrapping step for line ``lineno`` (1-based) of a cell; the new cell source, or None."""
    lines = src.split("\n")
    line = lines[lineno - 1]
    indent = line[: len(line) - len(line.lstrip())]
    toks = _tokens(src)
    # bracket stack (with the column of each open bracket) at every token
    stack, info = [], []
    for t in toks:
        if t.type == tokenize.OP and t.string in CLOSE and stack:
            stack.pop()
        info.append((t, list(stack)))
        if t.type == tokenize.OP and t.string in OPEN:
            stack.append(t.start)
    on_line = [(t, st) for t, st in info if t.start[0] == lineno and t.end[0] == lineno]
    if any(t.start[0] < lineno < t.end[0] or (t.start[0] < lineno == t.end[0] and t.type == tokenize.STRING)
           for t, _ in info):
        return None  # inside a multi-line string
    comment = next((t for t, _ in on_line if t.type == tokenize.COMMENT), None)
    code = line[: comment.start[1]].rstrip() if comment else line

    def replace(new_lines: list[str]) -> str:
        return "\n".join(lines[: lineno - 1] + new_lines + lines[lineno:])

    def comment_lines(text: str, ind: str) -> list[str]:
        body = text.lstrip("#").strip()
        width = max(target - len(ind) - 2, 30)
        return [f"{ind}# {chunk}" for chunk in textwrap.wrap(body, width, break_long_words=False)] or [ind + "#"]

    # a comment on its own line: reflow the block of comment lines it belongs to (same indentation)
    if comment and not code.strip():
        def is_comment(j):
            return 0 <= j < len(lines) and lines[j].strip().startswith("#") and \
                lines[j][: len(lines[j]) - len(lines[j].lstrip())] == indent and \
                not re.match(r"#\s*(hide-|remove-|noqa|type:|pragma)", lines[j].strip())
        first = last = lineno - 1
        while is_comment(first - 1):
            first -= 1
        while is_comment(last + 1):
            last += 1
        text = " ".join(lines[j].strip().lstrip("#").strip() for j in range(first, last + 1))
        new_block = comment_lines(text, indent)
        if new_block == lines[first:last + 1]:
            return None
        return "\n".join(lines[:first] + new_block + lines[last + 1:])
    # a trailing comment: move it onto its own line(s) above
    if comment:
        return replace(comment_lines(comment.string, indent) + [code])
    # a; b at statement level
    semis = [t for t, st in on_line if t.type == tokenize.OP and t.string == ";" and not st]
    if semis:
        parts, start = [], 0
        for t in semis:
            parts.append(line[start:t.start[1]].strip())
            start = t.end[1]
        parts.append(line[start:].strip())
        return replace([indent + p for p in parts if p])

    # break after a comma / before a '+' inside brackets, or split a string literal inside brackets
    def cont_indent(stack_at) -> str:
        # align with the innermost open bracket (visual indent), or keep a hanging indent as it is
        row, col = stack_at[-1]
        if row < lineno:
            return indent  # this line already continues that bracket: keep its indentation
        after = lines[row - 1][col + 1:].strip()
        if after and not after.startswith("#"):
            return " " * (col + 1)
        return " " * (len(lines[row - 1]) - len(lines[row - 1].lstrip()) + 4)

    # where each bracket opened on this line closes (to leave short ones like "(acc, 2)" whole), and the commas of
    # comprehension targets ("for a, b in"), which are no place for a break either
    closes, open_at, in_target = {}, [], set()
    for k, (t, st) in enumerate(on_line):
        if t.type == tokenize.OP and t.string in OPEN:
            open_at.append(t.start)
        elif t.type == tokenize.OP and t.string in CLOSE and open_at:
            closes[open_at.pop()] = t.end[1]
    target_depth = None
    for k, (t, st) in enumerate(on_line):
        if t.type == tokenize.NAME and t.string == "for":
            target_depth = len(st)
        elif t.type == tokenize.NAME and t.string == "in" and target_depth == len(st):
            target_depth = None
        elif target_depth == len(st) and t.string == ",":
            in_target.add(k)

    def short_bracket(st) -> bool:
        row, col = st[-1]
        return row == lineno and (row, col) in closes and closes[(row, col)] - col < 25

    candidates = []  # (depth, not a comma, cut column, first line, continuation line)
    for k, (t, st) in enumerate(on_line):
        if not st or k == 0 or short_bracket(st) or k in in_target:
            continue
        if t.type == tokenize.OP and t.string == "," and k + 1 < len(on_line):
            cut = t.end[1]
        elif (t.type == tokenize.OP and t.string == "+") or \
                (t.type == tokenize.NAME and t.string in ("for", "if", "else", "and", "or")):
            cut = t.start[1]
        else:
            continue
        first, rest = line[:cut].rstrip(), cont_indent(st) + line[cut:].lstrip()
        if first.strip() and first.rstrip()[-1:] not in OPEN and rest.strip() and rest.strip()[0] not in CLOSE:
            candidates.append((len(st), t.string != ",", cut, first, rest))
    # a statement whose right-hand side splits at its top level (a, b = x, y; x if c else y): parenthesise it first
    top_level = [t for t, st in on_line if not st and (t.string == "," or t.string in ("if", "else", "for"))]
    statement_start = on_line and not on_line[0][1] and not lines[lineno - 2].rstrip().endswith("\\")
    if not (statement_start and top_level):
        for pref in (target, limit):
            fitting = [c for c in candidates if len(c[3]) <= pref and len(c[4]) < len(line)]
            if fitting:  # the outermost bracket first, commas before operators, then as late as fits
                *_, first, rest = min(fitting, key=lambda c: (c[0], c[1], -c[2]))
                return replace([first, rest])
    if on_line and not on_line[0][1] and not lines[lineno - 2].rstrip().endswith("\\"):
        eq = next((t for t, st in on_line if t.type == tokenize.OP and t.string in ("=", "+=", "-=") and not st), None)
        if eq is not None and not any(t.start[1] > eq.start[1] for t in top_level) and \
                any(len(c[3]) <= limit for c in candidates):
            eq = None  # nothing to split at the top level of the right-hand side: break inside its brackets
        ret = on_line[0][0] if on_line[0][0].string in ("return", "yield") else None
        start = eq.end[1] if eq else (ret.end[1] if ret else None)
        ends_statement = any(t.type == tokenize.NEWLINE and t.start[0] == lineno for t in toks)
        if start is not None and ends_statement and not line[start:].strip().startswith("("):
            return replace([line[:start] + " (" + line[start:].strip() + ")"])
    for pref in (target, limit):
        fitting = [c for c in candidates if len(c[3]) <= pref and len(c[4]) < len(line)]
        if fitting:
            *_, first, rest = min(fitting, key=lambda c: (c[0], c[1], -c[2]))
            return replace([first, rest])
    strings = [(t, st) for t, st in on_line if t.type == tokenize.STRING and st and t.start[1] < limit]
    for t, st in reversed(strings):
        for pref in (target, limit):
            split = _split_string(t.string, pref - t.start[1])
            if split:
                first = line[: t.start[1]] + split[0]
                rest = cont_indent(st) + split[1] + line[t.end[1]:]
                if len(first) <= limit and len(rest) < len(line):
                    return replace([first, rest])
    return None


def wrap_cell(src: str, limit: int, target: int) -> tuple[str, list[str]]:
    """Wrap every line over ``limit``; return the new source and the lines that could not be wrapped."""
    try:
        ast.parse(src)
    except SyntaxError:
        return src, [ln for ln in src.split("\n") if len(ln) > limit]  # magics etc.: left alone
    for _ in range(200):
        lines = src.split("\n")
        for i, ln in enumerate(lines, 1):
            if len(ln) <= limit:
                continue
            new = _wrap_line(src, i, limit, target)
            if new is not None and same_program(src, new):
                src = new
                break
        else:
            break  # no line over the limit could be wrapped further
    return src, [ln for ln in src.split("\n") if len(ln) > limit]


def long_lines(nb: dict, limit: int) -> list[tuple[int, str]]:
    out = []
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "code":
            src = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
            out += [(i, ln) for ln in src.split("\n") if len(ln) > limit]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("notebooks", nargs="+", type=Path)
    ap.add_argument("--limit", type=int, default=110)
    ap.add_argument("--target", type=int, default=88)
    ap.add_argument("--check", action="store_true", help="only list the lines over the limit")
    args = ap.parse_args(argv)
    status = 0
    for path in args.notebooks:
        nb = json.loads(path.read_text(encoding="utf-8"))
        if args.check:
            for i, ln in long_lines(nb, args.limit):
                print(f"{path} cell {i}: {len(ln)} characters: {ln.strip()[:70]}…")
                status = 1
            continue
        changed, left = 0, []
        for i, cell in enumerate(nb["cells"]):
            if cell["cell_type"] != "code":
                continue
            src = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
            new, rest = wrap_cell(src, args.limit, args.target)
            left += [(i, ln) for ln in rest]
            if new != src:
                cell["source"] = new.splitlines(keepends=True) if isinstance(cell["source"], list) else new
                changed += 1
        if changed:
            path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"{path}: {changed} cells wrapped; {len(left)} lines still over {args.limit}")
        for i, ln in left:
            print(f"    cell {i}: {len(ln)}: {ln.strip()[:90]}")
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
