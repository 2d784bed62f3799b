"""The analysis condition language: values, precedence, NaN, and every refusal."""

from __future__ import annotations

import ast
import doctest
import math
from pathlib import Path

import pytest

import rollout.gates.analysis
import rollout.gates.expr
from rollout.gates.expr import And, Compare, ExprError, Not, Number, Or, Result, parse

NAN, INF = math.nan, math.inf


def test_docstring_examples() -> None:
    for module in (rollout.gates.expr, rollout.gates.analysis):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize(
    ("source", "value", "expected"),
    [
        ("result < 0.01", 0.001, True),
        ("result < 0.01", 0.01, False),
        ("result <= 0.01", 0.01, True),
        ("result > 5", 6, True),
        ("result >= 5", 5, True),
        ("result == 1", 1, True),
        ("result != 1", 1, False),
        ("0.95 <= result", 0.97, True),
        ("result > -1e3", -999, True),
        ("result < .5", 0.4, True),
        ("result < 1E2", 99, True),
        ("-result > 1", -2, True),
        ("result >= 0.95 and result <= 1", 0.97, True),
        ("result < 1 or result > 10", 5, False),
        ("not result > 1", 0, True),
        ("not not result > 1", 2, True),
        # and binds tighter than or; not tighter than and
        ("result > 10 or result > 1 and result < 3", 2, True),
        ("result > 10 or result > 1 and result < 3", 5, False),
        ("(result > 10 or result > 1) and result < 3", 5, False),
        ("not result > 1 and result > 0", 0.5, True),
        ("((result)) > 1", 2, True),
        ("  result\t>\n1  ", 2, True),
        # NaN: every comparison is false but !=; isNaN tests for it
        ("result < 1", NAN, False),
        ("result >= 1", NAN, False),
        ("result == result", NAN, False),
        ("result != 1", NAN, True),
        ("isNaN(result)", NAN, True),
        ("isNaN(result)", 1, False),
        ("not isNaN(result) and result < 1", NAN, False),
        ("isNaN(result) or result < 0.01", NAN, True),
        ("result > 1e308", INF, True),
    ],
)
def test_values(source: str, value: float, expected: bool) -> None:
    assert parse(source).holds(value) is expected


def test_ast_is_frozen_dataclasses() -> None:
    c = parse("result > 1 and not (result == 2 or result == 3)")
    assert c.tree == And(
        Compare(">", Result(), Number(1.0)),
        Not(Or(Compare("==", Result(), Number(2.0)), Compare("==", Result(), Number(3.0)))),
    )
    assert isinstance(c.tree, And)
    with pytest.raises(AttributeError):
        c.tree.left = c.tree.right  # type: ignore[misc]  # frozen: the point of the test
    assert str(c) == "result > 1 and not (result == 2 or result == 3)"


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (
            "__import__('os')",
            'column 1: unknown name "__import__" (known: result, isNaN, and, or, not)',
        ),
        (
            "result > 1 and __import__('os').system('rm -rf /')",
            'column 16: unknown name "__import__"',
        ),
        ("result.__class__", 'column 7: unexpected character "."'),
        ("open('/etc/passwd')", 'column 1: unknown name "open"'),
        ("lambda: 1", 'column 1: unknown name "lambda"'),
        ("result > 1; import os", 'column 11: unexpected character ";"'),
        ("'a' == 'a'", "column 1: strings are not supported"),
        ("result", "column 7: expected a comparison (< <= > >= == !=), got the end"),
        ("result and result > 1", 'column 8: expected a comparison (< <= > >= == !=) before "and"'),
        ("result > 1 or 2", "column 16: expected a comparison (< <= > >= == !=), got the end"),
        ("not result", "column 11: expected a comparison"),
        ("result > 1 > 2", 'column 12: comparisons do not chain; use "and" before ">"'),
        ("(result > 1) > 2", 'column 1: ">" compares numbers, not conditions'),
        ("result > (1 < 2)", 'column 10: ">" compares numbers, not conditions'),
        ("isNaN(result > 1)", "column 7: isNaN takes a number, not a condition"),
        ("isNaN result", 'column 7: expected "(" after isNaN, got "result"'),
        (
            "isnan(result)",
            'unknown name "isnan" (known: result, isNaN, and, or, not) (did you mean "isNaN"?)',
        ),
        ("result(1) > 0", 'column 7: "result" is a value, not a function'),
        ("result[0] >= 0.95", "column 7: indexing is not supported"),
        ("result > 1 && result < 2", 'column 12: write "and" instead of "&&"'),
        ("result > 1 || result < 2", 'column 12: write "or" instead of "||"'),
        ("!isNaN(result)", 'column 1: write "not" instead of "!"'),
        ("result = 1", 'column 8: write "==" to compare'),
        ("(result > 1", 'column 12: expected ")" to close the "(" at column 1, got the end'),
        ("result > 1)", 'column 11: expected "and", "or" or the end, got ")"'),
        ("result >", 'column 9: expected a number, "result" or "(", got the end'),
        ("result > and", 'column 10: expected a number, "result" or "(", got "and"'),
        ("1.2.3 > result", 'column 4: unexpected "." after the number 1.2'),
        ("0x10 > result", 'column 2: unexpected "x" after the number 0'),
        ("result ** 2 > 1", 'column 8: unexpected character "*"'),
        ("", 'column 1: empty condition (write e.g. "result < 0.01")'),
        ("   ", "column 1: empty condition"),
        ("\x00", 'column 1: unexpected character "\\x00"'),
        ("(" * 60 + "result > 1" + ")" * 60, "nested more than 50 levels deep"),
        ("not " * 60 + "result > 1", "nested more than 50 levels deep"),
        ("result > " + "1" * 2000, "longer than 1000 characters"),
    ],
)
def test_errors(source: str, message: str) -> None:
    with pytest.raises(ExprError) as err:
        parse(source)
    assert message in str(err.value)
    assert isinstance(err.value, ValueError)
    assert str(err.value).startswith(f"column {err.value.column}: ")
    assert "\n" not in str(err.value)


def test_no_eval_anywhere() -> None:
    """The module never calls eval/exec/compile and never imports ast."""
    tree = ast.parse(Path(rollout.gates.expr.__file__).read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            assert node.func.id not in ("eval", "exec", "compile", "__import__")
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
            assert "ast" not in names
