"""The layers of DESIGN.md, held by reading every import (``ast``, imports inside functions
included): what each subpackage of otmel may import, the Ray entrypoints (jobs) used by the two
faces only, every package shipped, and the paths the READMEs name exist."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

import otmel

ROOT = Path(otmel.__file__).parent.parent
#: installed package -> its directory in the repository (pyproject's package-dir)
PACKAGE_DIRS = {"otmel": ROOT / "otmel", "otmel.jobs": ROOT / "jobs", "otmel.exporters": ROOT / "exporters",
                "otmel.cluster": ROOT / "cluster"}
#: the command layer: the only modules of otmel/ that run the jobs (otmel <command>, otmel demo)
FACES = ("otmel.cli", "otmel.demo")
#: layer -> the otmel packages it must never import (DESIGN.md "Layer rules"); ``model`` and
#: ``io`` are held to an allowlist instead (below)
FORBIDDEN = {
    "otmel.data": ("otmel.linking", "otmel.jobs", "otmel.exporters", "otmel.cluster", "otmel.cli"),
    "otmel.linking": ("otmel.jobs", "otmel.cluster", "otmel.cli"),
}
#: layer -> the only otmel packages it may import
ALLOWED = {"otmel.model": ("otmel.model", "otmel.io"), "otmel.io": ("otmel.io",)}


def module_name(path: Path) -> str:
    for package, directory in PACKAGE_DIRS.items():
        if package != "otmel" and path.is_relative_to(directory):
            rel = path.relative_to(directory)
            break
    else:
        package, rel = "otmel", path.relative_to(PACKAGE_DIRS["otmel"])
    parts = [package, *rel.with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(source: str) -> list[tuple[int, str]]:
    """(line, module) of every import in ``source``, at any depth."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found += [(node.lineno, node.module)]
            # `from otmel.cluster import ops` imports otmel.cluster.ops
            found += [(node.lineno, f"{node.module}.{a.name}") for a in node.names if node.module.startswith("otmel")]
    return found


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def layer_violations(sources: dict[str, str]) -> list[str]:
    """``{module name: source}`` -> every import that breaks a rule, as ``module:line imports name``."""
    out: dict[tuple[str, int], str] = {}  # one finding per import statement
    for module, source in sorted(sources.items()):
        in_library = _within(module, "otmel") and not any(
            _within(module, p) for p in ("otmel.jobs", "otmel.exporters", "otmel.cluster"))
        for line, name in imports_of(source):
            if not _within(name, "otmel") or name in ("otmel", "otmel.__version__"):
                continue
            broken = (in_library and _within(name, "otmel.jobs")
                      and not any(_within(module, face) for face in FACES))
            broken |= any(_within(module, layer) and any(_within(name, b) for b in banned)
                          for layer, banned in FORBIDDEN.items())
            broken |= any(_within(module, layer) and not any(_within(name, a) for a in allowed)
                          for layer, allowed in ALLOWED.items())
            if broken:
                out.setdefault((module, line), name)
    return [f"{module}:{line} imports {name}" for (module, line), name in sorted(out.items())]


def _library_sources() -> dict[str, str]:
    return {module_name(p): p.read_text() for d in PACKAGE_DIRS.values() for p in sorted(d.rglob("*.py"))}


def test_every_import_keeps_the_layer_rules():
    assert not layer_violations(_library_sources())
    # the rules catch what they are for: one planted import per rule, at any depth
    planted = {
        "otmel.model.encoders": "def f():\n    from otmel.linking.linker import merge_topk\n",
        "otmel.model.ot": "import otmel.data.schemas\n",
        "otmel.io.storage": "from otmel.model import otmel\n",
        "otmel.data.synth": "from otmel.cluster import ops\n",
        "otmel.linking.coherence": "def g():\n    import otmel.jobs.common\n",
        "otmel.evaluation": "from otmel.jobs.link import run\n",
        "otmel.cli.link": "from otmel.jobs.link import run\n",  # a face: allowed
        "otmel.model.factory": "from otmel.io.storage import join\nimport torch\n",  # allowed
    }
    assert sorted(v.split(":")[0] for v in layer_violations(planted)) == sorted(
        ["otmel.data.synth", "otmel.evaluation", "otmel.io.storage", "otmel.linking.coherence", "otmel.model.encoders",
         "otmel.model.ot"])


def test_the_model_imports_without_ray_faiss_or_onnxruntime():
    """Every module of otmel.model imports in a fresh process where ray, faiss and onnxruntime
    cannot be imported (a training node or a notebook needs none of them)."""
    modules = sorted(module_name(p) for p in (PACKAGE_DIRS["otmel"] / "model").rglob("*.py"))
    probe = ("import importlib, sys\n"
             "class Refuse:\n"
             "    def find_spec(self, name, path=None, target=None):\n"
             "        if name.split('.')[0] in ('ray', 'faiss', 'onnxruntime'):\n"
             "            raise ImportError(f'{name} is not installed here')\n"
             "sys.meta_path.insert(0, Refuse())\n"
             f"for m in {modules!r}:\n    importlib.import_module(m)\n"
             "print('imported', len(sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "imported" in out.stdout, out.stderr[-3000:]
    assert len(modules) >= 12, modules


def test_each_subpackage_says_what_lives_there_and_every_package_ships():
    """Each package directory opens with its docstring, and pyproject.toml lists every one
    (an editable install finds unlisted subpackages; a wheel would ship without them)."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {module_name(p) for d in PACKAGE_DIRS.values() for p in d.rglob("__init__.py")}
    assert found == listed, (sorted(found - listed), sorted(listed - found))
    for package in found - {"otmel", "otmel.jobs", "otmel.exporters", "otmel.cluster"}:
        init = PACKAGE_DIRS["otmel"].joinpath(*package.split(".")[1:], "__init__.py")
        assert ast.get_docstring(ast.parse(init.read_text())), f"{init} has no opening docstring"
    top = sorted(p.name for p in PACKAGE_DIRS["otmel"].iterdir() if p.name != "__pycache__")
    assert len(top) <= 15, top


#: a backticked repository path in a README: `otmel/model/ot.py`, `jobs/link.py`, `bench/results/*.md`
README_PATH = re.compile(r"`((?:otmel|jobs|exporters|cluster|bench|tests|docs)/[\w./*-]*)`")


@pytest.mark.parametrize("readme", ["README.md", "tests/README.md"])
def test_every_path_a_readme_names_exists(readme):
    text = (ROOT / readme).read_text()
    named = set(README_PATH.findall(text))
    assert len(named) >= 10, named
    missing = [p for p in sorted(named) if not (list(ROOT.glob(p)) if "*" in p else (ROOT / p).exists())]
    assert not missing, missing
    # the paper -> code map: each equation row points at files that exist
    if readme == "README.md":
        table = text[text.index("## The model (paper -> code)"):]
        rows = [line for line in table.splitlines()[:20] if line.startswith("| ") and "`otmel/" in line]
        assert len(rows) >= 10, rows


#: loaders that can run code from the file they read (pickle underneath)
UNSAFE_LOADERS = {"pickle.load", "pickle.loads", "cloudpickle.load", "cloudpickle.loads", "dill.load", "joblib.load",
                  "pd.read_pickle", "pandas.read_pickle", "yaml.load", "yaml.unsafe_load", "marshal.load"}


def _call_name(func: ast.expr) -> str:
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
    return ".".join(reversed(parts))


def _unsafe_loads(source: str, where: str) -> list[str]:
    """Calls that may unpickle what a user loads from elsewhere: pickle-family loaders,
    ``torch.load`` without ``weights_only=True``, ``np.load`` with ``allow_pickle=True``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        name = _call_name(node.func)
        kw = {k.arg: k.value for k in node.keywords}
        const = {k: v.value for k, v in kw.items() if isinstance(v, ast.Constant)}
        if (name in UNSAFE_LOADERS
                or (name.endswith("torch.load") or name == "load" and "weights_only" in kw) and const.get("weights_only") is not True
                or name in ("np.load", "numpy.load") and const.get("allow_pickle", False) is not False):
            found.append(f"{where}:{node.lineno} {name}")
    return found


def test_nothing_a_user_loads_from_elsewhere_is_unpickled():
    """Models, indexes, inputs and checkpoints come from storage a user may not control:
    safetensors, ONNX, JSON, Parquet, FAISS and raw arrays only; ``torch.load`` (optimizer
    state) with ``weights_only=True``."""
    root = Path(otmel.__file__).parent.parent
    offenders = []
    for package in ("otmel", "jobs", "exporters"):
        for path in sorted((root / package).rglob("*.py")):
            offenders += _unsafe_loads(path.read_text(), str(path.relative_to(root)))
    assert not offenders, offenders
    planted = ("import pickle, torch, numpy as np\npickle.loads(b)\ntorch.load(p)\n"
               "torch.load(p, weights_only=False)\nnp.load(p, allow_pickle=True)\ntorch.load(p, weights_only=True)\n")
    assert [f.split(" ")[0] for f in _unsafe_loads(planted, "x")] == ["x:2", "x:3", "x:4", "x:5"]


def test_the_kge_package_runs_without_ray():
    """otmel.kge is single-process by design (DESIGN: no Ray import in the KGE modules)."""
    offenders = []
    for path in sorted((Path(otmel.__file__).parent / "kge").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{path.name}:{node.lineno} imports {n}" for n in names
                          if n == "ray" or n.startswith(("ray.", "otmel.jobs"))]
    assert not offenders, offenders
