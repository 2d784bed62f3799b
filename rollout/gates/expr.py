"""The condition language of analysis gates: small, typed, and safe.

A condition is a boolean expression about ``result``, the value of one Prometheus sample::

    result < 0.01
    result >= 0.95 and not isNaN(result)
    (result > 100 or result < 1) and result != 50

Grammar (``not`` binds tighter than ``and``, which binds tighter than ``or``; comparisons
do not chain)::

    condition := or
    or        := and ("or" and)*
    and       := not ("and" not)*
    not       := "not" not | compare
    compare   := boolean-atom | number (op number)      op: < <= > >= == !=
    number    := "-" number | NUMBER | "result" | "(" number ")"
    boolean-atom := "isNaN" "(" number ")" | "(" condition ")"

Design and invariants:

- A hand-written tokenizer and recursive-descent parser build an AST of frozen
  dataclasses. Nothing is ever handed to ``eval``/``exec``/``ast``: the only names are
  ``result``, ``isNaN``, ``and``, ``or``, ``not``, so ``__import__('os')`` is refused at
  its first character that is not part of the language.
- Expressions are typed when parsed: a condition must be boolean, ``and``/``or``/``not``
  take booleans, comparisons take numbers. ``result and 1`` is a parse error, never a
  surprise when the gate runs.
- Every error is a `ExprError` (a ValueError) whose message starts with the 1-based
  column: ``column 8: expected a number, "result" or "(", got ")"``.
- Evaluation follows IEEE 754: every comparison with NaN is false except ``!=``; test
  for NaN with ``isNaN(result)``.

Worked example:

>>> c = parse("result >= 0.95 and not isNaN(result)")
>>> c.holds(0.97), c.holds(0.5), c.holds(float("nan"))
(True, False, False)
>>> try:
...     parse("__import__('os')")
... except ExprError as exc:
...     print(exc)
column 1: unknown name "__import__" (known: result, isNaN, and, or, not)
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "And",
    "BoolNode",
    "Compare",
    "Condition",
    "ExprError",
    "IsNaN",
    "Neg",
    "Not",
    "NumNode",
    "Number",
    "Or",
    "Result",
    "parse",
]

MAX_LENGTH = 1000
MAX_DEPTH = 50

CompareOp = Literal["<", "<=", ">", ">=", "==", "!="]


class ExprError(ValueError):
    """A condition that does not parse; the message starts with ``column N:``."""

    def __init__(self, column: int, problem: str) -> None:
        super().__init__(f"column {column}: {problem}")
        self.column = column
        self.problem = problem


# ----- AST -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Number:
    value: float


@dataclass(frozen=True)
class Result:
    """The sample value being judged."""


@dataclass(frozen=True)
class Neg:
    arg: NumNode


@dataclass(frozen=True)
class IsNaN:
    arg: NumNode


@dataclass(frozen=True)
class Compare:
    op: CompareOp
    left: NumNode
    right: NumNode


@dataclass(frozen=True)
class Not:
    arg: BoolNode


@dataclass(frozen=True)
class And:
    left: BoolNode
    right: BoolNode


@dataclass(frozen=True)
class Or:
    left: BoolNode
    right: BoolNode


NumNode = Number | Result | Neg
BoolNode = IsNaN | Compare | Not | And | Or


def _num(node: NumNode, result: float) -> float:
    if isinstance(node, Number):
        return node.value
    if isinstance(node, Result):
        return result
    return -_num(node.arg, result)


def _bool(node: BoolNode, result: float) -> bool:
    if isinstance(node, Compare):
        a, b = _num(node.left, result), _num(node.right, result)
        if node.op == "<":
            return a < b
        if node.op == "<=":
            return a <= b
        if node.op == ">":
            return a > b
        if node.op == ">=":
            return a >= b
        if node.op == "==":
            return a == b
        return a != b
    if isinstance(node, IsNaN):
        return math.isnan(_num(node.arg, result))
    if isinstance(node, Not):
        return not _bool(node.arg, result)
    if isinstance(node, And):
        return _bool(node.left, result) and _bool(node.right, result)
    return _bool(node.left, result) or _bool(node.right, result)


@dataclass(frozen=True)
class Condition:
    """A parsed condition: its source text and its typed AST."""

    source: str
    tree: BoolNode

    def holds(self, result: float) -> bool:
        """Whether the condition is true for one sample value.

        >>> parse("result < 1").holds(0.5), parse("result != 1").holds(float("nan"))
        (True, True)
        """
        return _bool(self.tree, result)

    def __str__(self) -> str:
        return self.source


# ----- tokens --------------------------------------------------------------------------

TokKind = Literal["num", "name", "op", "-", "(", ")", "end"]


@dataclass(frozen=True)
class Token:
    kind: TokKind
    text: str
    column: int  # 1-based


_NUMBER_RE = re.compile(r"(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_OPS = ("<=", ">=", "==", "!=", "<", ">")
_HINTS = {
    "&&": 'write "and" instead of "&&"',
    "||": 'write "or" instead of "||"',
    "!": 'write "not" instead of "!"',
    "=": 'write "==" to compare',
    "[": 'indexing is not supported: a condition applies to every sample, write "result"',
    '"': "strings are not supported",
    "'": "strings are not supported",
    ",": 'unexpected "," (isNaN takes one argument)',
}
KEYWORDS = ("and", "or", "not")
NAMES = ("result", "isNaN")


def _describe(tok: Token) -> str:
    return "the end" if tok.kind == "end" else f'"{tok.text}"'


def tokenize(source: str) -> list[Token]:
    """Split a condition into tokens; an ExprError names the first bad character.

    >>> [t.text for t in tokenize("result>=.5")]
    ['result', '>=', '.5', '']
    """
    tokens: list[Token] = []
    i, n = 0, len(source)
    while i < n:
        ch = source[i]
        col = i + 1
        if ch in " \t\r\n":
            i += 1
            continue
        m = _NUMBER_RE.match(source, i)
        if m:
            end = m.end()
            if end < n and (source[end].isalnum() or source[end] in "_."):
                raise ExprError(end + 1, f'unexpected "{source[end]}" after the number {m.group()}')
            tokens.append(Token("num", m.group(), col))
            i = end
            continue
        m = _NAME_RE.match(source, i)
        if m:
            if m.group() not in NAMES + KEYWORDS:
                hint = ' (did you mean "isNaN"?)' if m.group().lower() == "isnan" else ""
                known = ", ".join(NAMES + KEYWORDS)
                raise ExprError(col, f'unknown name "{m.group()}" (known: {known}){hint}')
            tokens.append(Token("name", m.group(), col))
            i = m.end()
            continue
        two = source[i : i + 2]
        if two in ("&&", "||"):
            raise ExprError(col, _HINTS[two])
        op = next((o for o in _OPS if source.startswith(o, i)), None)
        if op is not None:
            tokens.append(Token("op", op, col))
            i += len(op)
            continue
        if ch in "()-":
            kind: TokKind = "(" if ch == "(" else ")" if ch == ")" else "-"
            tokens.append(Token(kind, ch, col))
            i += 1
            continue
        if ch in _HINTS:
            raise ExprError(col, _HINTS[ch])
        shown = ch if ch.isprintable() else f"\\x{ord(ch):02x}"
        raise ExprError(col, f'unexpected character "{shown}"')
    tokens.append(Token("end", "", n + 1))
    return tokens


# ----- parser --------------------------------------------------------------------------

Node = NumNode | BoolNode
_NUM_TYPES = (Number, Result, Neg)
_CMP_HINT = "a comparison (< <= > >= == !=)"


def _is_num(node: Node) -> bool:
    return isinstance(node, _NUM_TYPES)


class _Parser:
    """Recursive descent without backtracking; types are checked where values are used."""

    def __init__(self, source: str) -> None:
        self.tokens = tokenize(source)
        self.pos = 0
        self.depth = 0

    @property
    def tok(self) -> Token:
        return self.tokens[self.pos]

    def take(self) -> Token:
        tok = self.tokens[self.pos]
        if tok.kind != "end":
            self.pos += 1
        return tok

    def is_word(self, word: str) -> bool:
        return self.tok.kind == "name" and self.tok.text == word

    def need_bool(self, node: Node, before: str | None = None) -> BoolNode:
        if _is_num(node):
            if before is not None:
                raise ExprError(self.tok.column, f"expected {_CMP_HINT} before {before}")
            raise ExprError(self.tok.column, f"expected {_CMP_HINT}, got {_describe(self.tok)}")
        return node  # type: ignore[return-value]

    def need_num(self, node: Node, column: int, problem: str) -> NumNode:
        if not _is_num(node):
            raise ExprError(column, problem)
        return node  # type: ignore[return-value]

    def condition(self) -> BoolNode:
        node = self.or_()
        tok = self.tok
        if tok.kind == "op":
            raise ExprError(tok.column, f'comparisons do not chain; use "and" before "{tok.text}"')
        if tok.kind != "end":
            expected = '"and", "or" or the end' if not _is_num(node) else _CMP_HINT
            raise ExprError(tok.column, f"expected {expected}, got {_describe(tok)}")
        return self.need_bool(node)

    def or_(self) -> Node:
        node = self.and_()
        while self.is_word("or"):
            left = self.need_bool(node, '"or"')
            self.take()
            node = Or(left, self.need_bool(self.and_()))
        return node

    def and_(self) -> Node:
        node = self.not_()
        while self.is_word("and"):
            left = self.need_bool(node, '"and"')
            self.take()
            node = And(left, self.need_bool(self.not_()))
        return node

    def not_(self) -> Node:
        if self.is_word("not"):
            self.take()
            self.enter()
            node = Not(self.need_bool(self.not_()))
            self.depth -= 1
            return node
        return self.compare()

    def compare(self) -> Node:
        start = self.tok.column
        left = self.unary()
        if self.tok.kind != "op":
            return left
        op_tok = self.take()
        problem = f'"{op_tok.text}" compares numbers, not conditions'
        left_num = self.need_num(left, start, problem)
        right_start = self.tok.column
        right = self.need_num(self.unary(), right_start, problem)
        op: CompareOp = op_tok.text  # type: ignore[assignment]
        return Compare(op, left_num, right)

    def unary(self) -> Node:
        tok = self.tok
        if tok.kind == "-":
            self.take()
            self.enter()
            column = self.tok.column
            node = Neg(self.need_num(self.unary(), column, '"-" takes a number, not a condition'))
            self.depth -= 1
            return node
        return self.primary()

    def primary(self) -> Node:
        tok = self.tok
        if tok.kind == "num":
            self.take()
            return Number(float(tok.text))
        if tok.kind == "name":
            return self.name()
        if tok.kind == "(":
            self.take()
            self.enter()
            inner = self.or_()
            self.depth -= 1
            self.expect_close(tok)
            return inner
        raise ExprError(tok.column, f'expected a number, "result" or "(", got {_describe(tok)}')

    def name(self) -> Node:
        tok = self.take()
        if tok.text == "result":
            if self.tok.kind == "(":
                raise ExprError(self.tok.column, '"result" is a value, not a function')
            return Result()
        if tok.text == "isNaN":
            if self.tok.kind != "(":
                raise ExprError(
                    self.tok.column, f'expected "(" after isNaN, got {_describe(self.tok)}'
                )
            opener = self.take()
            self.enter()
            arg_start = self.tok.column
            arg = self.need_num(self.or_(), arg_start, "isNaN takes a number, not a condition")
            self.depth -= 1
            self.expect_close(opener)
            return IsNaN(arg)
        raise ExprError(tok.column, f'expected a number, "result" or "(", got "{tok.text}"')

    def enter(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise ExprError(self.tok.column, f"nested more than {MAX_DEPTH} levels deep")

    def expect_close(self, opener: Token) -> None:
        if self.tok.kind != ")":
            raise ExprError(
                self.tok.column,
                f'expected ")" to close the "(" at column {opener.column}, '
                f"got {_describe(self.tok)}",
            )
        self.take()


def parse(source: str) -> Condition:
    """Parse a condition; raise ExprError (a ValueError) with the column of the problem.

    >>> parse("not (result > 1 or result < -1)").holds(0.5)
    True
    >>> try:
    ...     parse("result and 1")
    ... except ExprError as exc:
    ...     print(exc)
    column 8: expected a comparison (< <= > >= == !=) before "and"
    """
    if not isinstance(source, str):
        raise ExprError(1, f"expected a condition as text, got {type(source).__name__}")
    if len(source) > MAX_LENGTH:
        raise ExprError(MAX_LENGTH + 1, f"longer than {MAX_LENGTH} characters")
    if not source.strip():
        raise ExprError(1, 'empty condition (write e.g. "result < 0.01")')
    return Condition(source, _Parser(source).condition())
