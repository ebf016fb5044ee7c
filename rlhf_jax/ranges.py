"""Where a config number must lie, written as the interval itself: `"> 0"`, `">= 1"`,
`"[0, 1]"`, `"(0, 1]"`, `"[0, 1)"`, `"(0, 1)"`.

A section's table maps its fields to such rules (`{"lam": "[0, 1]", "clip": "> 0"}`);
`check` raises a `UserInputError` naming the first field outside its rule:
`config.ppo.lam: must be in [0, 1], got 1.5`. No JAX here: config validation and every
stage module read it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rlhf_jax.errors import UserInputError


def contains(rule: str, value: float) -> bool:
  """Whether `value` lies in `rule` (NaN lies in none)."""
  if rule[0] in "[(":
    lo, hi = (float(x) for x in rule[1:-1].split(","))
    above = lo <= value if rule[0] == "[" else lo < value
    below = value <= hi if rule[-1] == "]" else value < hi
    return above and below
  op, bound = rule.split()
  if op not in (">", ">="):
    raise ValueError(f"bad range rule {rule!r}")
  return value >= float(bound) if op == ">=" else value > float(bound)


def describe(rule: str) -> str:
  """`"must be > 0"` / `"must be in [0, 1)"`."""
  return f"must be in {rule}" if rule[0] in "[(" else f"must be {rule}"


def is_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def check(section: Mapping[str, Any], key: str, rules: Mapping[str, str]) -> None:
  """Every field of `rules` that `section` has, as a number inside its rule; errors name
  `config.<key>.<field>`. Fields it lacks, or that hold no number (None), are skipped."""
  for field, rule in rules.items():
    value = section[field] if field in section else None
    if is_number(value) and not contains(rule, value):
      raise UserInputError(f"config.{key}.{field}: {describe(rule)}, got {value}")
