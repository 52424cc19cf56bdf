#!/usr/bin/env python3
"""Checks the layering rules of `src/` (run by `.ci/run`; exits non-zero on a violation).

1. No import cycle between files, nor between top-level modules, and every top-level module uses
   only modules of lower layers (LAYERS below, the README's module table). A path to a re-exported item
   counts as a dependency on the file that defines the item, not on the file that re-exports it,
   and `pub use` lines themselves are plumbing, not dependencies.
2. `src/ops/` uses nothing else of the crate but `crate::{Error, Result}` (the error module).
3. No Rust function in `src/` is longer than MAX_FN_LINES lines (signature to closing brace).

The parser is a deliberately small approximation of Rust's name resolution: it strips comments,
strings and character literals, then follows `crate::`, `super::` and `self::` paths (in `use`
declarations and in code) to the file that defines the named item. It knows nothing about macros
that build paths, so a path spelled inside a macro's string input is not seen.

4. Each public item of the crate is reachable by exactly one public path.

Usage: scripts/check_layout.py [--graph] [--api]
  --graph  prints the top-level module graph
  --api    prints every public path of the crate's own items
"""
import os
import re
import sys

MAX_FN_LINES = 80
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
OPS_MAY_USE = {"error"}  # top-level modules src/ops may depend on
# The layers of the README's module table: a module may use only modules of lower layers.
LAYERS = {
    "error": 0,
    "fs": 1, "progress": 1, "ops": 1,
    "device": 2, "hub": 2, "tokenize": 2, "dist": 2,
    "encoder": 3,
    "pooling": 4, "projection": 4,
    "sentence_transformers": 5,
    "pretrained": 6,
    "encode": 7, "model": 7, "align": 7,
    "data": 8,
    "loss": 9,
    "train": 10,
    "eval": 11, "nli": 11,
    "pretrain": 12,
}


def strip(text):
    """Blanks out comments, strings and char literals, keeping newlines (so line numbers hold)."""
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            out.append(" " * (j - i))
            i = j
        elif text.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if text.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif text.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            out.append(re.sub(r"[^\n]", " ", text[i:j]))
            i = j
        elif (m := re.match(r'b?r(#*)"', text[i:])) and (i == 0 or not text[i - 1].isalnum()):
            end = '"' + m.group(1)
            j = text.find(end, i + m.end())
            j = n if j < 0 else j + len(end)
            out.append('"' + re.sub(r"[^\n]", " ", text[i + 1 : j - 1]) + '"')
            i = j
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append('"' + re.sub(r"[^\n]", " ", text[i + 1 : j]) + '"')
            i = j + 1
        elif c == "'" and (m := re.match(r"'(\\.[^']*|[^\\'])'", text[i:])):
            out.append("' '")
            i += m.end()
        else:
            out.append(c)
            i += 1
    return "".join(out)


class Crate:
    def __init__(self, root):
        self.files = {}  # module path tuple -> (file path, stripped text)
        for dirpath, _, names in os.walk(root):
            for name in names:
                if name.endswith(".rs"):
                    path = os.path.join(dirpath, name)
                    rel = os.path.relpath(path, root)[:-3].split(os.sep)
                    if rel[-1] in ("mod", "lib"):
                        rel = rel[:-1]
                    with open(path, encoding="utf-8") as f:
                        self.files[tuple(rel)] = (path, strip(f.read()))
        self.defs = {m: self._definitions(t) for m, (_, t) in self.files.items()}
        self.reexports = {m: self._reexports(m, t) for m, (_, t) in self.files.items()}

    @staticmethod
    def _definitions(text):
        kinds = r"fn|struct|enum|trait|type|const|static|union|mod|macro_rules!"
        pat = rf"^\s*(?:pub(?:\([^)]*\))?\s+)?(?:unsafe\s+|async\s+|extern\s+\"C\"\s+)*(?:{kinds})\s+(\w+)"
        return set(re.findall(pat, text, re.M))

    def _reexports(self, module, text):
        found = {}
        for body in re.findall(r"\bpub(?:\([^)]*\))?\s+use\s+([^;]+);", text):
            for path, alias in expand_use(body):
                found[alias] = (self.absolute(module, path), path[-1])
        return found

    def is_local(self, module, path):
        """Whether `path`, written in `module`, names something of this crate (`crate::`,
        `super::`, `self::`, or a child module of `module`), not an external crate."""
        return path[0] in ("crate", "super", "self") or tuple(module) + (path[0],) in self.files

    def absolute(self, module, path):
        """A path as written in `module`, made absolute (a tuple starting at the crate root)."""
        if path[0] == "crate":
            return tuple(path[1:])
        base = list(module)
        while path and path[0] in ("super", "self"):
            if path[0] == "super":
                base = base[:-1]
            path = path[1:]
        return tuple(base) + tuple(path)

    def defining_file(self, path, depth=0):
        """The module (file) that defines the item at absolute `path`, following re-exports."""
        for cut in range(len(path), -1, -1):
            module = path[:cut]
            if module not in self.files:
                continue
            rest = path[cut:]
            if not rest or depth > 20:
                return module
            name = rest[0]
            if name in self.defs[module] and (module + (name,)) not in self.files:
                return module
            if name in self.reexports[module]:
                target, _ = self.reexports[module][name]
                return self.defining_file(target + tuple(rest[1:]), depth + 1)
            return module
        return None


def expand_use(body):
    """`a::{b, c::d as e, f::*}` -> [(path list, bound name)]."""
    body = re.sub(r"\s+as\s+", "@", body)
    body = re.sub(r"\s+", "", body)
    results = []

    def walk(prefix, tree):
        parts = split_top(tree)
        for part in parts:
            if "{" in part:
                head, inner = part.split("{", 1)
                head = [p for p in head.split("::") if p]
                walk(prefix + head, inner[:-1])
            else:
                name, _, alias = part.partition("@")
                segs = [p for p in name.split("::") if p]
                if segs == ["self"]:
                    segs = []
                full = prefix + segs
                if full:
                    results.append((full, alias or full[-1]))

    walk([], body)
    return results


def split_top(tree):
    parts, depth, cur = [], 0, ""
    for ch in tree:
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
            continue
        depth += ch == "{"
        depth -= ch == "}"
        cur += ch
    if cur:
        parts.append(cur)
    return parts


def dependencies(crate):
    """file module -> set of file modules it uses (re-export lines excluded)."""
    edges = {m: set() for m in crate.files}
    for module, (_, text) in crate.files.items():
        code = re.sub(r"\bpub(?:\([^)]*\))?\s+use\s+[^;]+;", "", text)
        paths = []
        for body in re.findall(r"\buse\s+([^;]+);", code):
            paths += [p for p, _ in expand_use(body) if crate.is_local(module, p)]
        code = re.sub(r"\buse\s+[^;]+;", "", code)
        paths += [p.split("::") for p in re.findall(r"\b(?:crate|super|self)(?:::\w+)+", code)]
        for path in paths:
            if path[-1] == "*":
                path = path[:-1]
            target = crate.defining_file(crate.absolute(module, path))
            if target is not None and target != module and target != ():
                edges[module].add(target)
    return edges


def cycles(edges):
    """Strongly connected components of more than one node (Tarjan, iterative)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    for start in edges:
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = counter[0]
        counter[0] += 1
        stack.append(start)
        on.add(start)
        while work:
            node, it = work[-1]
            nxt = next(it, None)
            if nxt is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.append(w)
                        if w == node:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
            elif nxt not in index:
                index[nxt] = low[nxt] = counter[0]
                counter[0] += 1
                stack.append(nxt)
                on.add(nxt)
                work.append((nxt, iter(sorted(edges.get(nxt, ())))))
            elif nxt in on:
                low[node] = min(low[node], index[nxt])
    return out


def long_functions(crate):
    found = []
    for module, (path, text) in crate.files.items():
        lines = text.split("\n")
        for m in re.finditer(r"\bfn\s+(\w+)", text):
            start = text.count("\n", 0, m.start())
            j = m.end()
            depth_paren = 0
            while j < len(text):  # the body's `{`, or `;` for a declaration without body
                ch = text[j]
                depth_paren += ch in "(<[" and 1 or 0
                depth_paren -= ch in ")>]" and 1 or 0
                if ch == ";" or ch == "{":
                    break
                j += 1
            if j >= len(text) or text[j] == ";":
                continue
            depth, k = 0, j
            while k < len(text):
                depth += text[k] == "{"
                depth -= text[k] == "}"
                if depth == 0:
                    break
                k += 1
            end = text.count("\n", 0, k)
            if end - start + 1 > MAX_FN_LINES:
                found.append((os.path.relpath(path, os.path.dirname(ROOT)), start + 1, m.group(1), end - start + 1))
    del lines
    return sorted(found)


def public_paths(crate):
    """Every public path to an item the crate defines, with the item's (file, name)."""
    top = r"^pub\s+(?:unsafe\s+)?(?:fn|struct|enum|trait|type|const|static|union)\s+(\w+)"
    paths = {}
    def visit(module):
        if module not in crate.files:
            return
        text = crate.files[module][1]
        for item in re.findall(top, text, re.M):
            paths[module + (item,)] = (module, item)
        for sub in re.findall(r"^pub\s+mod\s+(\w+)\s*;", text, re.M):
            visit(module + (sub,))
        for body in re.findall(r"^pub\s+use\s+([^;]+);", text, re.M):
            for path, alias in expand_use(body):
                if not crate.is_local(module, path) or path[-1] == "*":
                    continue
                target = crate.absolute(module, path)
                if target in crate.files:
                    continue  # a module re-exported under another name
                owner = crate.defining_file(target)
                if owner is not None:
                    item = target[-1]
                    # follow a chain of re-exports to the defining name
                    while item in crate.reexports.get(owner, {}) and item not in crate.defs[owner]:
                        nxt, item = crate.reexports[owner][item]
                        owner = crate.defining_file(nxt) or owner
                    paths[module + (alias,)] = (owner, item)
    visit(())
    return paths


def name(module):
    return "::".join(module) or "lib"


def main():
    crate = Crate(ROOT)
    edges = dependencies(crate)
    problems = []
    for comp in cycles(edges):
        problems.append("file cycle: " + " <-> ".join(name(m) for m in comp))
    top = {}
    for src, targets in edges.items():
        if not src:
            continue
        for t in targets:
            if t and t[0] != src[0]:
                top.setdefault(src[0], set()).add(t[0])
    for comp in cycles({k: top.get(k, set()) for k in {m[0] for m in crate.files if m}}):
        problems.append("module cycle: " + " <-> ".join(comp))
    for src, targets in sorted(top.items()):
        for t in sorted(targets):
            if src not in LAYERS or t not in LAYERS:
                problems.append(f"module without a layer in LAYERS: {src if src not in LAYERS else t}")
            elif LAYERS[t] >= LAYERS[src]:
                problems.append(f"layer violation: {src} (layer {LAYERS[src]}) uses {t} (layer {LAYERS[t]})")
    for top_module in sorted({m[0] for m in crate.files if m} - set(LAYERS)):
        problems.append(f"module without a layer in LAYERS: {top_module}")
    for src, targets in sorted(edges.items()):
        if src[:1] == ("ops",):
            for t in sorted(targets):
                if t[:1] != ("ops",) and t[:1] and t[0] not in OPS_MAY_USE:
                    problems.append(f"ops uses more than Error/Result: {name(src)} -> {name(t)}")
    for path, line, fn, n in long_functions(crate):
        problems.append(f"function longer than {MAX_FN_LINES} lines: {path}:{line} {fn} ({n} lines)")
    paths = public_paths(crate)
    by_item = {}
    for path, item in paths.items():
        by_item.setdefault(item, []).append(path)
    for item, ps in sorted(by_item.items()):
        if len(ps) > 1:
            problems.append("public item with several paths: " + ", ".join(sorted(name(p) for p in ps)))
    if "--api" in sys.argv:
        for path in sorted(paths):
            print("mlctl::" + name(path))
        print(f"{len(paths)} public paths to {len(by_item)} items")
    if "--graph" in sys.argv:
        for k in sorted(top):
            print(f"{k} -> {', '.join(sorted(top[k]))}")
    for p in problems:
        print(p)
    print(f"check_layout: {len(crate.files)} files, {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
