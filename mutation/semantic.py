"""`make mutate-semantic`: plant the bugs mutmut cannot (a value scaled, a threshold moved, a mask
inverted, ...) in PPO and count how many the fast tests catch.

mutmut (`make mutate`) nudges numbers by one, flips `<` to `<=`, drops arguments and changes
strings. A learner's PPO bugs are other kinds; this pass generates them from the script's syntax
tree (Python's `ast`), in the same scope as mutation/score.py, one mutant per site and kind:

    scale        a tensor expression times 0, times 10, times -1
    coefficient  a threshold or coefficient (a float constant, a float parameter, a float setting,
                 a constant a comparison tests against) times 10 or 0.1
    index        an index or slice bound shifted by one (a step in time, for [T, N] buffers)
    swap         two arguments of the same type swapped (for the script's own functions: the same
                 annotation), or the operands of `-` and `/`
    drop         a term dropped from a sum or a difference
    mask         a mask inverted (`torch.where`'s condition, a mask by name, `~`/`not` removed)
    minmax       min and max swapped (also argmin/argmax, clamp's min=/max=)
    grad         `detach()` removed, `no_grad`/`inference_mode` removed, or added: `.detach()` on a
                 value of the loss's computation, `@torch.no_grad()` on a function gradients pass through

Each mutant runs in a child forked from this process, which has imported torch and the rest once
(as mutmut does), with only the fast tests that ran its lines (line coverage from one traced run of
the suite, cached until the script or tests change), quickest first, stopping at the first failure.

A surviving mutant must be killed by a new test or listed in mutation/semantic-explained.md with
its one-line reason. Sites equivalent by rule are skipped before running and counted apart (RULES).

    python mutation/semantic.py                  # generate, run, report
    python mutation/semantic.py --list           # print the mutants, run nothing
    python mutation/semantic.py --only compute_gae --kind scale   # a subset
    python mutation/semantic.py --count          # report the last run again
"""

from __future__ import annotations

import argparse
import ast
import collections
import dataclasses
import hashlib
import importlib.util
import json
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "ppo_cartpole.py"
EXPLAINED = Path(__file__).resolve().parent / "semantic-explained.md"
WORK = ROOT / "mutants-semantic"
TESTS = ["test_ppo_cartpole.py", "bench/test_ablations.py", "bench/test_long_run.py", "bench/test_failures.py"]
PYTEST_ARGS = ["-m", "not slow and not shell and not cuda", "-p", "no:cacheprovider", "-q", "--no-header"]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from score import CLASSES, FUNCTIONS  # noqa: E402  the scope of `make mutate`

# Sites equivalent by rule: skipped before running, counted apart.
RULES = {
    "sign inside an even function": "x -> -x (or a - b -> b - a) inside abs, a square, cos or a variance changes nothing",
    "positive scale inside argmax or a sign test": "argmax(10 x) = argmax(x); 10 x > 0 iff x > 0",
    "gradient off already": "detach or no_grad added inside no_grad or inference_mode: no graph to cut",
    "commutative": "the two arguments of min, max, minimum or maximum swapped: the same value",
    "0 and inf stay themselves": "0 or an infinity times a positive factor is itself",
}
MASK_NAMES = {"valid", "not_done", "done", "dones", "truncated_only", "prev_done", "terminated", "truncated"}
NOT_VALUES = {"print", "len", "range", "reversed", "zip", "enumerate", "isinstance", "hasattr", "getattr", "setattr",
              "type", "str", "repr", "int", "bool", "list", "tuple", "dict", "set", "sorted", "iter", "next", "super",
              "Path", "ValueError", "TypeError", "RuntimeError", "option", "deque", "dataclass", "tqdm"}
EVEN = {"abs", "cos", "square", "var", "std"}
ALLOCATIONS = {"zeros", "zeros_like", "empty", "empty_like", "device", "Generator", "randperm", "ones", "full", "tensor",
               "as_tensor", "manual_seed", "isfinite", "clip_grad_norm_"}  # made, not computed (or not a value)
TENSOR_METHODS = {"sum", "mean", "exp", "log", "sqrt", "abs", "clamp", "float", "squeeze", "unsqueeze", "gather",
                  "flatten", "view", "item", "pow", "std", "var", "min", "max", "masked_fill", "softmax",
                  "log_softmax", "clone", "detach", "cos", "sin", "square", "sign", "amax", "amin", "reshape",
                  "log_prob", "entropy"}  # (the last two: a Categorical's)
COMMUTATIVE = {"min", "max", "minimum", "maximum"}
GRAD_CONTEXTS = {"no_grad", "inference_mode"}
ARITHMETIC = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.Pow, ast.MatMult)


@dataclasses.dataclass
class Mutant:
    function: str  # qualified: compute_gae, Collector.step
    kind: str  # e.g. "scale x0", "mask"
    lineno: int  # the first line the change touches (the script's numbering: mutants keep it)
    line: str = ""  # that line as mutated, stripped
    source: str = ""  # the whole mutated script
    skip: str | None = None  # a RULES key: equivalent by rule, not run
    status: str = ""  # killed, survived, timeout, no tests, skipped
    seconds: float = 0.0
    lines: tuple[int, int] = (0, 0)  # the lines of the change, for test selection

    @property
    def name(self) -> str:
        return f"{self.function}:{self.lineno} {self.kind}"


# ==== Generating the mutants ======================================================================

class Source:
    """The script's text with byte-exact edits by ast positions (col offsets are UTF-8 bytes)."""

    def __init__(self, text: str):
        self.text, self.data = text, text.encode()
        self.starts = [0]
        for line in self.data.splitlines(keepends=True):
            self.starts.append(self.starts[-1] + len(line))

    def offset(self, lineno: int, col: int) -> int:
        return self.starts[lineno - 1] + col

    def segment(self, node: ast.AST) -> str:
        return self.data[self.offset(node.lineno, node.col_offset):self.offset(node.end_lineno, node.end_col_offset)].decode()

    def replace(self, node: ast.AST, text: str) -> str:
        """The script with `node` replaced by `text`, newlines added inside its brackets so that every
        line keeps its number (text must then end in a closing bracket)."""
        old = self.segment(node)
        missing = old.count("\n") - text.count("\n")
        if missing > 0:
            assert text[-1] in ")]", text
            text = text[:-1] + "\n" * missing + text[-1]
        start, end = self.offset(node.lineno, node.col_offset), self.offset(node.end_lineno, node.end_col_offset)
        return (self.data[:start] + text.encode() + self.data[end:]).decode()

    def replace_line(self, lineno: int, text: str) -> str:
        lines = self.text.splitlines(keepends=True)
        lines[lineno - 1] = text
        return "".join(lines)


def call_name(node: ast.AST) -> str | None:
    """`f` for f(...), `attr` for x.attr(...)."""
    if isinstance(node, ast.Call):
        if isinstance(node.func, ast.Name):
            return node.func.id
        if isinstance(node.func, ast.Attribute):
            return node.func.attr
    return None


def base_name(node: ast.AST) -> str | None:
    """The identifier a Name, Attribute or Subscript chain ends in: dones[t] -> dones, self.valid -> valid."""
    while isinstance(node, ast.Subscript):
        node = node.value
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def float_annotated(annotation: ast.AST | None) -> bool:
    return annotation is not None and "float" in ast.unparse(annotation)


class Sites(ast.NodeVisitor):
    """Walks one function and yields (kind, node, replacement text, skip rule or None)."""

    def __init__(self, source: Source, function: ast.FunctionDef, signatures: dict, returns: dict,
                 float_fields: dict[str, set], float_attrs: set, grad_path: bool):
        self.src, self.function, self.signatures = source, function, signatures
        self.float_fields, self.float_attrs, self.grad_path = float_fields, float_attrs, grad_path
        self.returns = returns  # the script's functions (and methods) -> whether they return a Tensor or float
        self.float_params = {a.arg for a in function.args.args + function.args.kwonlyargs if float_annotated(a.annotation)}
        self.parents: dict[ast.AST, ast.AST] = {}
        for parent in ast.walk(function):
            for child in ast.iter_child_nodes(parent):
                self.parents[child] = parent
        self.found: list[tuple[str, ast.AST, str, str | None]] = []

    # -- context
    def ancestors(self, node):
        while node in self.parents:
            node = self.parents[node]
            yield node

    def excluded(self, node) -> bool:
        """Not a value of the computation: messages, raises, asserts, annotations, docstrings."""
        for a in self.ancestors(node):
            if isinstance(a, (ast.JoinedStr, ast.Raise, ast.Assert)):
                return True
            if isinstance(a, ast.Call) and call_name(a) in ("print", "ValueError", "RuntimeError", "TypeError"):
                return True
        if any(isinstance(a, ast.AnnAssign) and (node is a.annotation or a.annotation in self.ancestors(node))
               for a in self.ancestors(node)):
            return True  # an annotation
        parent = self.parents.get(node)
        return isinstance(parent, ast.arg) or (isinstance(parent, ast.Expr) and isinstance(node, ast.Constant))

    def grad_off(self, node) -> bool:
        for a in self.ancestors(node):
            if isinstance(a, ast.With) and any(call_name(i.context_expr) in GRAD_CONTEXTS for i in a.items):
                return True
        return False

    def assigned_without_grad(self) -> set[str]:
        """Names every assignment of which is under no_grad or inference_mode."""
        inside, outside = set(), set()
        for n in ast.walk(self.function):
            if isinstance(n, ast.Assign):
                names = {t.id for t in ast.walk(n.targets[0]) if isinstance(t, ast.Name)}
                (inside if self.grad_off(n) else outside).update(names)
        return inside - outside

    def in_slice(self, node) -> bool:
        child = node
        for a in self.ancestors(node):
            if isinstance(a, ast.Subscript) and child is a.slice:
                return True
            child = a
        return False

    def even_parent(self, node) -> bool:
        parent = self.parents.get(node)
        if isinstance(parent, ast.BinOp) and isinstance(parent.op, ast.Pow) and node is parent.left \
                and isinstance(parent.right, ast.Constant) and parent.right.value == 2:
            return True
        if isinstance(parent, ast.Call) and call_name(parent) in EVEN and node in parent.args:
            return True
        if isinstance(parent, ast.Attribute) and parent.attr in EVEN:  # (x).abs()
            return True
        return False

    def sign_only(self, node) -> bool:
        """node's scale cannot matter: argmax's argument, or one side of a comparison with 0."""
        parent = self.parents.get(node)
        if isinstance(parent, ast.Call) and call_name(parent) in ("argmax", "argmin") and node in parent.args:
            return True
        if isinstance(parent, ast.Compare) and len(parent.ops) == 1:
            other = parent.comparators[0] if node is parent.left else parent.left
            return isinstance(other, ast.Constant) and other.value == 0
        return False

    def add(self, kind, node, text, skip=None):
        self.found.append((kind, node, text, skip))

    # -- the kinds
    def is_value(self, node) -> bool:
        """A tensor- or float-valued expression worth scaling, as far as the syntax tells: arithmetic,
        torch's functions and tensor methods, the script's functions annotated to return a Tensor or
        float, and a name written into a buffer or returned as such."""
        if self.excluded(node) or self.in_slice(node):
            return False
        parent = self.parents.get(node)
        if isinstance(parent, ast.Attribute) and node is parent.value:
            return False  # the receiver of a method: the method's result is the value
        if isinstance(parent, (ast.With, ast.withitem, ast.For, ast.comprehension)):
            return False
        if isinstance(node, ast.BinOp):
            operands = (node.left, node.right)
            return isinstance(node.op, ARITHMETIC) and not any(
                isinstance(x, (ast.Tuple, ast.JoinedStr)) or (isinstance(x, ast.Constant) and isinstance(x.value, str))
                or "shape" in ast.unparse(x) for x in operands)
        if isinstance(node, ast.UnaryOp):
            return isinstance(node.op, ast.USub) and not isinstance(node.operand, ast.Constant)
        if isinstance(node, ast.Call):
            if isinstance(parent, ast.Expr) or (isinstance(parent, ast.Assign) and isinstance(parent.targets[0], ast.Tuple)):
                return False  # a statement, or a tuple unpacked
            func = node.func
            root = func
            while isinstance(root, ast.Attribute):
                root = root.value
            name = call_name(node)
            if isinstance(func, ast.Attribute) and isinstance(root, ast.Name) and root.id in ("torch", "F", "nn"):
                return name not in ALLOCATIONS and not name[0].isupper()  # a class: an object made
            if isinstance(func, ast.Attribute):
                return name in TENSOR_METHODS
            return isinstance(func, ast.Name) and self.returns.get(name, False)
        if isinstance(node, (ast.Name, ast.Attribute, ast.Subscript)) and isinstance(node.ctx, ast.Load):
            statement = parent
            if isinstance(parent, ast.Tuple):
                statement = self.parents.get(statement)
            if isinstance(statement, ast.Assign) and (node is statement.value or statement.value is parent):
                return isinstance(statement.targets[0], ast.Subscript)  # written into a buffer
            if isinstance(statement, ast.Return):
                return self.returns.get(self.function.name, False)
        return False

    def generic_visit(self, node):
        seg = self.src.segment if hasattr(node, "lineno") else None
        if seg and self.is_value(node):
            s = seg(node)
            self.add("scale x0", node, f"(({s}) * 0)")
            self.add("scale x10", node, f"(({s}) * 10)", "positive scale inside argmax or a sign test"
                     if self.sign_only(node) else "0 and inf stay themselves" if s.lstrip("-") == "math.inf" else None)
            self.add("scale x-1", node, f"(-({s}))", "sign inside an even function" if self.even_parent(node) else None)
        if seg and not self.excluded(node):
            self.coefficient(node)
            self.index(node)
            self.swap(node)
            self.drop(node)
            self.mask(node)
            self.minmax(node)
            self.grad(node)
        super().generic_visit(node)

    def coefficient(self, node):
        parent = self.parents.get(node)
        is_site = False
        if isinstance(node, ast.Constant) and type(node.value) is float and not self.in_slice(node):
            call = self.parents.get(parent) if isinstance(parent, ast.keyword) else parent
            is_site = call_name(call) not in NOT_VALUES
        elif isinstance(node, ast.Constant) and type(node.value) is int and isinstance(parent, ast.Compare):
            is_site = True
        elif isinstance(parent, (ast.BinOp, ast.Compare, ast.UnaryOp)) or (
                isinstance(parent, ast.Call) and node in parent.args and call_name(parent) not in self.signatures):
            if isinstance(node, ast.Name) and node.id in self.float_params:
                is_site = True
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                is_site = node.attr in self.float_fields.get(node.value.id, ()) or \
                          (node.value.id == "self" and node.attr in self.float_attrs)
        if is_site:
            s = self.src.segment(node)
            zero = isinstance(node, ast.Constant) and node.value == 0
            for factor in ("10", "0.1"):
                skip = "0 and inf stay themselves" if zero else (
                    "positive scale inside argmax or a sign test" if self.sign_only(node) else None)
                self.add(f"coefficient x{factor}", node, f"(({s}) * {factor})", skip)

    def index(self, node):
        if not isinstance(node, ast.Subscript):
            return
        parts = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        for part in parts:
            bounds = [part.lower, part.upper] if isinstance(part, ast.Slice) else [part]
            for bound in bounds:
                if bound is None or (isinstance(bound, ast.Constant) and not isinstance(bound.value, int)):
                    continue
                s = self.src.segment(bound)
                for shift in ("+ 1", "- 1"):
                    self.add(f"index {shift[0]}1", bound, f"(({s}) {shift})")

    def swap(self, node):
        src = self.src
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Sub, ast.Div)):
            if not (isinstance(node.left, ast.Constant) and isinstance(node.right, ast.Constant)):
                op = "-" if isinstance(node.op, ast.Sub) else "/"
                skip = "sign inside an even function" if op == "-" and self.even_parent(node) else None
                self.add("swap operands", node, f"(({src.segment(node.right)}) {op} ({src.segment(node.left)}))", skip)
        if not isinstance(node, ast.Call):
            return
        name = call_name(node)
        if name in NOT_VALUES:
            return
        params = self.signatures.get(name)
        args = [a for a in node.args if not isinstance(a, ast.Starred)]
        if len(args) != len(node.args):
            return
        for i in range(len(args) - 1):
            a, b = args[i], args[i + 1]
            if params is not None:
                same = i + 1 < len(params) and params[i][1] == params[i + 1][1] and params[i][1] is not None
            else:  # not the script's: two computed values
                same = not isinstance(a, ast.Constant) and not isinstance(b, ast.Constant)
            texts = [src.segment(x) for x in node.args]
            if same and texts[i] != texts[i + 1]:
                texts[i], texts[i + 1] = texts[i + 1], texts[i]
                self.add("swap arguments", node, self.call_text(node, texts),
                         "commutative" if name in COMMUTATIVE and len(args) == 2 else None)
        if params is not None:  # keywords of the same annotation
            annotation = dict(params)
            keywords = [k for k in node.keywords if k.arg in annotation and annotation[k.arg] is not None]
            for i, j in ((i, j) for i in range(len(keywords)) for j in range(i + 1, len(keywords))):
                if annotation[keywords[i].arg] == annotation[keywords[j].arg]:
                    values = {k.arg: src.segment(k.value) for k in node.keywords if k.arg}
                    ki, kj = keywords[i].arg, keywords[j].arg
                    values[ki], values[kj] = values[kj], values[ki]
                    self.add("swap arguments", node, self.call_text(node, [src.segment(x) for x in node.args], values))

    def call_text(self, node: ast.Call, args: list[str], keywords: dict | None = None) -> str:
        keywords = keywords if keywords is not None else {k.arg: self.src.segment(k.value) for k in node.keywords if k.arg}
        parts = args + [f"{k}={v}" for k, v in keywords.items()] + \
            [f"**{self.src.segment(k.value)}" for k in node.keywords if k.arg is None]
        return f"({self.src.segment(node.func)}({', '.join(parts)}))"

    def drop(self, node):
        src = self.src
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub)) and not self.in_slice(node):
            if isinstance(node.left, ast.Constant) and isinstance(node.right, ast.Constant):
                return
            self.add("drop right term", node, f"({src.segment(node.left)})")
            right = src.segment(node.right)
            self.add("drop left term", node, f"({right})" if isinstance(node.op, ast.Add) else f"(-({right}))")
        if isinstance(node, ast.AugAssign) and isinstance(node.op, (ast.Add, ast.Sub)):
            self.add("drop the update", node.value, "(0)")

    def mask(self, node):
        src = self.src

        def invert(s):
            return f"((~({s})) if ({s}).dtype == torch.bool else (1 - ({s})))"

        parent = self.parents.get(node)
        if isinstance(node, ast.Call) and call_name(node) == "where" and node.args:
            cond = node.args[0]
            self.add("mask", cond, invert(src.segment(cond)))
        elif isinstance(node, (ast.Name, ast.Attribute, ast.Subscript)) and isinstance(node.ctx, ast.Load) \
                and base_name(node) in MASK_NAMES and not self.in_slice(node):
            if isinstance(parent, ast.Subscript) and node is parent.value:
                return  # the subscript is the site: dones[t], not dones
            if isinstance(parent, ast.Call) and call_name(parent) == "where" and node is parent.args[0]:
                return  # done above
            if isinstance(parent, ast.UnaryOp) and isinstance(parent.op, ast.Invert):
                return  # removing the ~ is the inversion
            if isinstance(parent, ast.Attribute) and parent.attr in ("device", "dtype", "shape", "numel", "size"):
                return  # only its shape or place is read
            self.add("mask", node, invert(src.segment(node)))
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Invert, ast.Not)):
            self.add("mask", node, f"({src.segment(node.operand)})")
        elif isinstance(node, ast.Compare) and isinstance(parent, ast.Assign) and \
                base_name(parent.targets[0]) in MASK_NAMES:
            self.add("mask", node, f"(~({src.segment(node)}))")

    def minmax(self, node):
        swaps = {"min": "max", "max": "min", "minimum": "maximum", "maximum": "minimum", "amin": "amax",
                 "amax": "amin", "argmin": "argmax", "argmax": "argmin"}
        name = call_name(node)
        if name in swaps:
            func = node.func
            text = swaps[name] if isinstance(func, ast.Name) else f"{self.src.segment(func.value)}.{swaps[name]}"
            self.add("min<->max", node, self.call_text(node, [self.src.segment(a) for a in node.args])
                     .replace(self.src.segment(func) + "(", text + "(", 1))
        if isinstance(node, ast.Call):
            for k in node.keywords:
                if k.arg in ("min", "max"):
                    values = {kw.arg: self.src.segment(kw.value) for kw in node.keywords if kw.arg}
                    renamed = {("max" if a == "min" else "min") if a == k.arg else a: v for a, v in values.items()}
                    self.add("min<->max", node, self.call_text(node, [self.src.segment(a) for a in node.args], renamed))

    def grad(self, node):
        src = self.src
        if isinstance(node, ast.Call) and call_name(node) == "detach" and isinstance(node.func, ast.Attribute):
            self.add("grad: detach removed", node, f"({src.segment(node.func.value)})")
        if isinstance(node, ast.withitem) and call_name(node.context_expr) in GRAD_CONTEXTS:
            self.add(f"grad: {call_name(node.context_expr)} removed", node.context_expr, "(contextlib.nullcontext())")
        if self.grad_path and isinstance(node, (ast.Assign, ast.Return)) and node.value is not None:
            skip = "gradient off already" if self.grad_off(node) or (
                isinstance(node.value, ast.Name) and node.value.id in self.assigned_without_grad()) else None
            value = node.value
            if isinstance(value, ast.Tuple) and isinstance(node, ast.Return):
                for element in value.elts:
                    off = isinstance(element, ast.Name) and element.id in self.assigned_without_grad()
                    self.add("grad: detach added", element, f"(({src.segment(element)}).detach())",
                             skip or ("gradient off already" if off else None))
            elif isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Tuple):
                s = src.segment(value)
                self.add("grad: detach added", value,
                         f"(tuple(x.detach() if isinstance(x, torch.Tensor) else x for x in ({s})))", skip)
            elif not isinstance(value, ast.Constant):
                self.add("grad: detach added", value, f"(({src.segment(value)}).detach())", skip)


def scope(tree: ast.Module):
    """(qualified name, FunctionDef) of every function in make mutate's scope."""
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name in FUNCTIONS:
            yield node.name, node
        elif isinstance(node, ast.ClassDef) and node.name in CLASSES:
            for item in node.body:
                if isinstance(item, ast.FunctionDef):
                    yield f"{node.name}.{item.name}", item


def called(function: ast.FunctionDef) -> set[str]:
    return {call_name(n) for n in ast.walk(function) if isinstance(n, ast.Call)} - {None}


def generate(text: str) -> list[Mutant]:
    tree, src = ast.parse(text), Source(text)
    functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    signatures = {name: [(a.arg, ast.unparse(a.annotation) if a.annotation else None)
                         for a in f.args.args + f.args.kwonlyargs] for name, f in functions.items()}
    methods = collections.defaultdict(list)
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        for f in (f for f in cls.body if isinstance(f, ast.FunctionDef)):
            methods[f.name].append([(a.arg, ast.unparse(a.annotation) if a.annotation else None)
                                    for a in f.args.args[1:] + f.args.kwonlyargs])
    signatures.update({name: found[0] for name, found in methods.items() if len(found) == 1 and name not in signatures})
    returns = {}
    for f in [*functions.values(), *(f for cls in tree.body if isinstance(cls, ast.ClassDef)
                                     for f in cls.body if isinstance(f, ast.FunctionDef))]:
        returns.setdefault(f.name, bool(f.returns and re.search(r"Tensor|float", ast.unparse(f.returns))))
    # The float settings, by the name the scope reads them through: config.lr (Config), run.target_return (RunConfig).
    float_fields = {}
    for receiver, class_name in (("config", "Config"), ("run", "RunConfig")):
        settings = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name)
        float_fields[receiver] = {n.target.id for n in settings.body
                                  if isinstance(n, ast.AnnAssign) and float_annotated(n.annotation)}
    # The loss's computation: minibatch_loss and what it calls, the network's forward, the update.
    grad_path, todo = set(), ["minibatch_loss"]
    while todo:
        name = todo.pop()
        if name in functions and name not in grad_path:
            grad_path.add(name)
            todo += called(functions[name])
    grad_path |= {"ActorCritic.forward"}
    mutants = []
    for qualname, function in scope(tree):
        float_attrs = set()
        if "." in qualname:  # self.x set from a float parameter or a float constant in __init__
            cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == qualname.split(".")[0])
            init = next((f for f in cls.body if isinstance(f, ast.FunctionDef) and f.name == "__init__"), None)
            if init is not None:
                floats = {a.arg for a in init.args.args if float_annotated(a.annotation)}
                for n in ast.walk(init):
                    if isinstance(n, ast.Assign):
                        targets = n.targets[0].elts if isinstance(n.targets[0], ast.Tuple) else [n.targets[0]]
                        values = n.value.elts if isinstance(n.value, ast.Tuple) else [n.value]
                        for target, value in zip(targets, values):
                            if isinstance(target, ast.Attribute) and (
                                    (isinstance(value, ast.Name) and value.id in floats) or
                                    (isinstance(value, ast.Constant) and type(value.value) is float)):
                                float_attrs.add(target.attr)
        on_path = qualname in grad_path
        sites = Sites(src, function, signatures, returns, float_fields, float_attrs, on_path)
        for statement in function.body[1 if ast.get_docstring(function) else 0:]:
            sites.visit(statement)
        body = (function.body[0].lineno, function.end_lineno)
        for kind, node, replacement, skip in sites.found:
            mutants.append(Mutant(qualname, kind, node.lineno, source=src.replace(node, replacement), skip=skip,
                                  lines=(node.lineno, node.end_lineno)))
        if on_path or qualname == "ppo_update":
            first = function.decorator_list[0].lineno if function.decorator_list else function.lineno
            if text.splitlines()[first - 2].strip() == "":  # the blank line above takes the decorator
                indent = " " * function.col_offset
                mutants.append(Mutant(qualname, "grad: no_grad added", first - 1,
                                      source=src.replace_line(first - 1, f"{indent}@torch.no_grad()\n"), lines=body))
    original = text.splitlines()
    for m in mutants:
        mutated = m.source.splitlines()
        assert len(mutated) == len(original), m.name
        changed = [i for i, (a, b) in enumerate(zip(original, mutated)) if a != b]
        m.line = mutated[changed[0]].strip() if changed else ""
        if changed:
            m.lineno = changed[0] + 1
    return [m for m in mutants if m.line]


# ==== Running them ================================================================================

def fingerprint() -> str:
    digest = hashlib.sha256()
    for path in [SCRIPT, *(ROOT / t for t in TESTS), ROOT / "pytest.ini"]:
        digest.update(path.read_bytes())
    return digest.hexdigest()


class Recorder:
    """A pytest plugin: the script's lines each test runs, its time, and whether it passed."""

    def __init__(self):
        self.script, self.current = str(SCRIPT), set()
        self.lines, self.seconds, self.failed = {}, {}, []

    def trace(self, frame, event, arg):
        if frame.f_code.co_filename != self.script:
            return None
        self.current.add(frame.f_lineno)
        return self.local

    def local(self, frame, event, arg):
        self.current.add(frame.f_lineno)
        return self.local

    def pytest_runtest_protocol(self, item, nextitem):
        self.current = set()
        sys.settrace(self.trace)
        threading.settrace(self.trace)
        self.start = time.perf_counter()

    def pytest_runtest_logfinish(self, nodeid, location):
        sys.settrace(None)
        threading.settrace(None)
        self.lines[nodeid] = sorted(self.current)
        self.seconds[nodeid] = time.perf_counter() - self.start

    def pytest_runtest_logreport(self, report):
        if report.failed:
            self.failed.append(report.nodeid)


def coverage() -> dict:
    """{"lines": {test: [line, ...]}, "seconds": {test: s}}, from one traced run of the fast tests in a
    child (so this process imports neither the script nor the tests); cached by fingerprint."""
    cache = WORK / "coverage.json"
    key = fingerprint()
    if cache.exists():
        data = json.loads(cache.read_text())
        if data.get("fingerprint") == key:
            return data
    print("tracing the fast tests once, for the lines each one runs ...", flush=True)
    path = WORK / "coverage.tmp.json"
    pid = os.fork()
    if pid == 0:
        import pytest
        recorder = Recorder()
        code = pytest.main([*TESTS, *PYTEST_ARGS, f"--basetemp={WORK / 'tmp-coverage'}"], plugins=[recorder])
        path.write_text(json.dumps({"lines": recorder.lines, "seconds": recorder.seconds, "failed": recorder.failed,
                                    "code": int(code)}))
        os._exit(0)
    os.waitpid(pid, 0)
    data = json.loads(path.read_text())
    if data["failed"] or data["code"] != 0:
        sys.exit(f"the fast tests do not pass unmutated (exit {data['code']}): {data['failed'][:5]}")
    data["fingerprint"] = key
    cache.write_text(json.dumps(data))
    return data


def run_child(mutant: Mutant, tests: list[str], worker: int) -> int:
    """In the forked child: import the mutated script as ppo_cartpole, run `tests`, exit with pytest's code."""
    folder = WORK / f"worker{worker}"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "ppo_cartpole.py"
    path.write_text(mutant.source)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    try:
        spec = importlib.util.spec_from_file_location("ppo_cartpole", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules["ppo_cartpole"] = module
        spec.loader.exec_module(module)
    except BaseException:
        os._exit(3)  # the mutant does not even import
    import pytest
    code = pytest.main([*tests, *PYTEST_ARGS, "-x", "-p", "no:warnings", f"--basetemp={folder / 'tmp'}"])
    os._exit(int(code))


def run(mutants: list[Mutant], data: dict, jobs: int) -> None:
    lines, seconds = data["lines"], data["seconds"]
    by_line = collections.defaultdict(set)
    for test, covered in lines.items():
        for line in covered:
            by_line[line].add(test)
    queue = []
    for m in mutants:
        if m.skip:
            m.status = "skipped"
            continue
        tests = set().union(*(by_line[line] for line in range(m.lines[0], m.lines[1] + 1)))
        if not tests:
            m.status = "no tests"
            continue
        queue.append((m, sorted(tests, key=lambda t: seconds[t])))
    running: dict[int, tuple[Mutant, float, float, int]] = {}
    free, done, total = list(range(jobs)), 0, len(queue)
    t0 = time.perf_counter()
    while queue or running:
        while queue and free:
            m, tests = queue.pop(0)
            worker = free.pop()
            limit = 20 + 3 * sum(seconds[t] for t in tests)
            pid = os.fork()
            if pid == 0:
                run_child(m, tests, worker)
            running[pid] = (m, time.perf_counter(), limit, worker)
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            now = time.perf_counter()
            for p, (m, start, limit, worker) in list(running.items()):
                if now - start > limit:
                    os.kill(p, signal.SIGKILL)
            time.sleep(0.02)
            continue
        m, start, limit, worker = running.pop(pid)
        free.append(worker)
        m.seconds = time.perf_counter() - start
        code = os.waitstatus_to_exitcode(status)
        m.status = {0: "survived", 5: "no tests"}.get(code, "timeout" if code == -signal.SIGKILL else "killed")
        done += 1
        if done % 50 == 0 or m.status == "survived":
            rate = (time.perf_counter() - t0) / done
            print(f"  [{done}/{total}, ~{rate * (total - done) / 60:.0f} min left] {m.status}: {m.name}: {m.line}",
                  flush=True)


# ==== Reporting ===================================================================================

def explained() -> dict[tuple[str, str, str], tuple[str, str]]:
    """semantic-explained.md's entries: (function, kind, mutated line) -> (class, reason). Each entry:
    - `function` kind (equivalent): reason   then, indented, the mutated line in backticks."""
    entries = re.findall(r"^- `(\S+)` (.+?) \((equivalent|CUDA-only)\): (.+)\n\s+`(.+)`$",
                         EXPLAINED.read_text() if EXPLAINED.exists() else "", re.MULTILINE)
    return {(function, kind, line): (cls, reason) for function, kind, cls, reason, line in entries}


def report(mutants: list[Mutant], seconds: float | None, subset: bool = False) -> int:
    notes = explained()
    counts = collections.Counter(m.status for m in mutants)
    survivors = [m for m in mutants if m.status in ("survived", "no tests")]
    listed = [m for m in survivors if (m.function, m.kind, m.line) in notes]
    unexplained = [m for m in survivors if (m.function, m.kind, m.line) not in notes]
    seen = {(m.function, m.kind, m.line) for m in survivors}
    ran_kinds = {(m.function, m.kind) for m in mutants}  # a subset (--only, --kind) judges only its own entries
    stale = [key for key in notes if key not in seen and (not subset or key[:2] in ran_kinds)]
    by_class = collections.Counter(notes[(m.function, m.kind, m.line)][0] for m in listed)
    ran = len(mutants) - counts["skipped"]
    print(f"\nsemantic mutants: {len(mutants)} generated, {counts['skipped']} skipped as equivalent by rule, {ran} run")
    for rule, n in sorted(collections.Counter(m.skip for m in mutants if m.skip).items()):
        print(f"  skipped, {rule}: {n}  ({RULES[rule]})")
    for status in ("killed", "timeout", "survived", "no tests"):
        print(f"  {status}: {counts[status]}")
    print(f"  of the survivors, explained in {EXPLAINED.name}: {by_class['equivalent']} equivalent "
          f"({100 * by_class['equivalent'] / max(ran, 1):.1f}% of those run), {by_class['CUDA-only']} CUDA-only")
    scored = ran - len(listed)
    caught = counts["killed"] + counts["timeout"]
    print(f"score: {caught}/{scored} caught ({100 * caught / max(scored, 1):.1f}%) of the mutants not explained")
    kinds = collections.defaultdict(collections.Counter)
    for m in mutants:
        if m.status != "skipped":
            kinds[m.kind.split(" ")[0].rstrip(":")]["run"] += 1
            kinds[m.kind.split(" ")[0].rstrip(":")][m.status] += 1
    print("  by kind: " + ", ".join(f"{k} {c['killed'] + c['timeout']}/{c['run']}" for k, c in sorted(kinds.items())))
    for m in unexplained:
        print(f"  unexplained survivor ({m.status}): {m.name}\n      {m.line}")
    for key in stale:
        print(f"  stale entry in {EXPLAINED.name} (killed now, or gone): {key}")
    if seconds is not None:
        print(f"took {seconds:.0f} s")
    return 0 if not unexplained and not stale else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="print the mutants, run nothing")
    parser.add_argument("--count", action="store_true", help="report the last run again, run nothing")
    parser.add_argument("--only", nargs="+", metavar="FUNCTION", help="only these functions (Class.method)")
    parser.add_argument("--kind", help="only kinds starting with this (scale, coefficient, index, ...)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="mutants run at once")
    args = parser.parse_args(argv)
    WORK.mkdir(exist_ok=True)
    results = WORK / "results.json"
    if args.count:
        mutants = [Mutant(**m) for m in json.loads(results.read_text())]
        return report(mutants, None, subset=json.loads((WORK / "subset.json").read_text()))
    text = SCRIPT.read_text()
    mutants = generate(text)
    if args.only:
        mutants = [m for m in mutants if m.function in args.only]
    if args.kind:
        mutants = [m for m in mutants if m.kind.startswith(args.kind)]
    if args.list:
        for m in mutants:
            print(f"{m.name}{f'  [skip: {m.skip}]' if m.skip else ''}\n    {m.line}")
        print(f"{len(mutants)} mutants, {sum(bool(m.skip) for m in mutants)} skipped by rule")
        return 0
    t0 = time.perf_counter()
    # A control first: the script unmutated, through the same machinery, on every test the mutants
    # will use, must pass; else every mutant would look killed.
    control = Mutant("(unmutated)", "control", 1, line="-", source=text, lines=(1, len(text.splitlines())))
    import gymnasium  # noqa: F401  imported once here, not once per mutant
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401
    import numpy  # noqa: F401
    import pytest  # noqa: F401
    import torch
    import tqdm  # noqa: F401
    torch.set_num_threads(1)
    data = coverage()
    run([control], data, 1)
    if control.status != "survived":
        sys.exit(f"the unmutated script fails the tests in the child ({control.status}): fix that first")
    run(mutants, data, args.jobs)
    seconds = time.perf_counter() - t0
    results.write_text(json.dumps([dict(dataclasses.asdict(m), source="") for m in mutants]))
    subset = bool(args.only or args.kind)
    (WORK / "subset.json").write_text(json.dumps(subset))
    return report(mutants, seconds, subset)


if __name__ == "__main__":
    sys.exit(main())
