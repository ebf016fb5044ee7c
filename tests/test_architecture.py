"""The package's shape: no import circles, no private names across modules, stage names
only where the registry allows them, every direct import declared, files of one sitting.

These read the source (no imports of the package), so they are quick and say which file
and line break a rule."""

import ast
import pathlib
import re
import sys

import pytest

from rlhf_jax.stages import registry

tomllib = pytest.importorskip("tomllib")  # (Python >= 3.11)

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = REPO / "rlhf_jax"
MAX_LINES = 500  # "about 450": a file of one concern, readable in one sitting


def _modules() -> dict[str, pathlib.Path]:
  """Dotted module name -> file, for every module of the package."""
  out = {}
  for path in sorted(PACKAGE.rglob("*.py")):
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
      parts = parts[:-1]
    out[".".join(parts)] = path
  return out


MODULES = _modules()


def _imports(name: str, path: pathlib.Path):
  """(line, imported module, imported names) of every import in the file, lazy ones
  (inside functions) included: a lazy import closes a circle as surely."""
  tree = ast.parse(path.read_text())
  package = name if path.name == "__init__.py" else name.rpartition(".")[0]
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        yield node.lineno, alias.name, ()
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
        base = f"{base}.{node.module}" if node.module else base
      yield node.lineno, base, tuple(a.name for a in node.names)


def _graph() -> dict[str, set[str]]:
  """module -> the package modules it imports (a submodule named in `from pkg import x`
  counts as `pkg.x`; a package's own `__init__` is not an edge of its submodules)."""
  graph: dict[str, set[str]] = {m: set() for m in MODULES}
  for name, path in MODULES.items():
    for _, module, names in _imports(name, path):
      if not module.startswith("rlhf_jax"):
        continue
      targets = {f"{module}.{n}" for n in names if f"{module}.{n}" in MODULES}
      if not targets or len(targets) < len(names):
        targets.add(module)
      graph[name] |= {t for t in targets if t in MODULES and not name.startswith(t + ".")}
  return graph


def test_no_import_circles():
  graph = _graph()
  state: dict[str, int] = {}  # 1 = on the stack, 2 = done
  stack: list[str] = []

  def visit(m: str):
    state[m] = 1
    stack.append(m)
    for n in sorted(graph[m]):
      if state.get(n) == 1:
        raise AssertionError("import circle: " + " -> ".join(stack[stack.index(n) :] + [n]))
      if n not in state:
        visit(n)
    stack.pop()
    state[m] = 2

  for m in sorted(graph):
    if m not in state:
      visit(m)


def test_the_circle_check_finds_a_circle(monkeypatch):
  """The check above can fail: a made-up edge back from `registry` to `cli` closes one."""
  graph = _graph()
  graph["rlhf_jax.stages.registry"].add("rlhf_jax.cli")
  assert "rlhf_jax.stages.registry" in graph["rlhf_jax.cli"]
  monkeypatch.setattr(sys.modules[__name__], "_graph", lambda: graph)
  with pytest.raises(AssertionError, match="import circle"):
    test_no_import_circles()


def _rel(path: pathlib.Path) -> str:
  return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else path.name


def _private_uses(name: str, path: pathlib.Path) -> list[str]:
  """`from rlhf_jax.x import _y` and `x._y` (x an imported package module) in one file."""
  out = []
  tree = ast.parse(path.read_text())
  aliases = {}  # local name -> package module
  for line, module, names in _imports(name, path):
    if not module.startswith("rlhf_jax"):
      continue
    for n in names:
      if n.startswith("_") and not n.startswith("__"):
        out.append(f"{_rel(path)}:{line}: from {module} import {n}")
      if f"{module}.{n}" in MODULES:
        aliases[n] = f"{module}.{n}"
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom):
      for a in node.names:
        if a.asname and (node.module or "").startswith("rlhf_jax"):
          aliases[a.asname] = aliases.get(a.name, node.module)
    if (
      isinstance(node, ast.Attribute)
      and isinstance(node.value, ast.Name)
      and node.value.id in aliases
      and node.attr.startswith("_")
      and not node.attr.startswith("__")
    ):
      out.append(f"{_rel(path)}:{node.lineno}: {node.value.id}.{node.attr}")
  return out


def test_no_private_names_across_modules():
  found = [u for name, path in MODULES.items() for u in _private_uses(name, path)]
  assert not found, "\n".join(found)


def test_the_private_name_check_finds_one(tmp_path):
  path = tmp_path / "probe.py"
  path.write_text("from rlhf_jax import sampling\nfrom rlhf_jax.x import _y\nsampling._z()\n")
  found = _private_uses("rlhf_jax.probe", path)
  assert [f.split(": ", 1)[1] for f in found] == ["from rlhf_jax.x import _y", "sampling._z"]


# --- stage names ------------------------------------------------------------------------------

# Words that are stage names and also something else: the mesh axis and Orbax item "data"
# (the data stage is found by its registry entry), and the world's dataset of web text
# called "pretrain" (rlhf_jax/data/, a dataset, not the stage).
_OTHER_MEANINGS = {"data": ("",), "pretrain": ("rlhf_jax/data/",)}


def _docstrings(tree) -> set[int]:
  out = set()
  for node in ast.walk(tree):
    body = getattr(node, "body", None)
    if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
      if isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
        out.add(id(body[0].value))
  return out


def stage_name_uses(path: pathlib.Path, names) -> list[tuple[int, str]]:
  """(line, text) of every string in code (not a docstring) that is a stage name or a
  metric of one (`<name>/...`; an f-string's literal parts too: f"ppo/{k}")."""
  tree = ast.parse(path.read_text())
  docs = _docstrings(tree)
  out = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
      if any(node.value == n or node.value.startswith(n + "/") for n in names):
        out.append((node.lineno, node.value))
  return out


def _own_files(stage: registry.Stage) -> str:
  """The file or package directory of a stage's module (where its name may appear)."""
  path = MODULES[stage.module].relative_to(REPO).as_posix()
  return path.rsplit("/", 1)[0] + "/" if path.rsplit("/", 2)[-2] != "stages" else path


def test_stage_names_appear_only_in_their_modules_and_the_registry():
  """Each stage's name (alone or as a metric prefix) is spelled only in its own module (or
  package), the registry, configs, tests and docs: everything else asks the registry."""
  found = []
  for stage in registry.stages():
    if "" in _OTHER_MEANINGS.get(stage.name, ()):
      continue
    words = {stage.name}
    # stages that log under this name's prefix may spell it too (PPO-ptx logs ppo/...)
    owners = {_own_files(s) for s in registry.stages() if stage.name in (s.name, s.metric_prefix)}
    for path in MODULES.values():
      rel = path.relative_to(REPO).as_posix()
      if rel == "rlhf_jax/stages/registry.py" or any(rel.startswith(o) for o in owners):
        continue
      for line, text in stage_name_uses(path, words):
        elsewhere = _OTHER_MEANINGS.get(text.split("/")[0], ())
        if not any(rel.startswith(w) for w in elsewhere if w):
          found.append(f"{rel}:{line}: {text!r} ({stage.name})")
  assert not found, "\n".join(found)


def test_the_stage_name_check_finds_a_name(tmp_path):
  path = tmp_path / "probe.py"
  path.write_text('"""About "sft"."""\nx = {"sft": 1, "k": f"ppo/{1}", "y": "sft/loss"}\n')
  assert sorted(stage_name_uses(path, {"sft", "ppo"})) == [(2, "ppo/"), (2, "sft"), (2, "sft/loss")]


# --- dependencies, size -----------------------------------------------------------------------

# import name -> distribution, where they differ
_DISTRIBUTION = {
  "orbax": "orbax-checkpoint",
  "tensorflow_datasets": "tensorflow-datasets",
  "array_record": "array-record",
  "ml_collections": "ml-collections",
  "google": "protobuf",
  "tensorboardX": "tensorboardX",
  "ml_dtypes": "ml_dtypes",
}


def _declared() -> set[str]:
  with open(REPO / "pyproject.toml", "rb") as f:
    deps = tomllib.load(f)["project"]["dependencies"]
  return {re.split(r"[<>=!~\[; ]", d, maxsplit=1)[0].lower().replace("_", "-") for d in deps}


def test_every_direct_import_is_a_declared_dependency():
  declared = _declared()
  stdlib = sys.stdlib_module_names
  missing = []
  for name, path in MODULES.items():
    for line, module, _ in _imports(name, path):
      top = module.split(".")[0]
      if not top or top in stdlib or top in ("rlhf_jax", "__future__"):
        continue
      dist = _DISTRIBUTION.get(top, top).lower().replace("_", "-")
      if dist not in declared:
        missing.append(f"{path.relative_to(REPO)}:{line}: {module} ({dist})")
  assert not missing, "not in pyproject.toml's dependencies:\n" + "\n".join(missing)


def test_files_are_readable_in_one_sitting():
  long = [
    f"{p.relative_to(REPO)}: {n} lines"
    for p in MODULES.values()
    if (n := len(p.read_text().splitlines())) > MAX_LINES
  ]
  assert not long, "\n".join(long)
