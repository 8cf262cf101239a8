"""The layers of DESIGN.md: the otmel library never imports the Ray entrypoints (jobs)."""

from __future__ import annotations

import ast
from pathlib import Path

import otmel

#: the command layer: it runs the jobs (otmel <command>, otmel demo)
COMMANDS = {"cli.py", "demo.py"}


def test_the_library_does_not_import_the_jobs_package():
    offenders = []
    for path in sorted(Path(otmel.__file__).parent.glob("*.py")):
        if path.name in COMMANDS:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{path.name}:{node.lineno} imports {n}" for n in names if n.startswith("otmel.jobs")]
    assert not offenders, offenders


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
