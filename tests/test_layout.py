"""The layout's promises: the core imports without Flower and nothing of clues_flwr above it,
the public API is whole and light, a moved module names its new place, and a FAB carries the
library and the demo app but not the research harness."""

import ast
import importlib
import importlib.util
import io
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_disk

import clues_flwr

ROOT = Path(__file__).resolve().parents[1]


def test_the_core_imports_with_flwr_unavailable():
    """Every core module, imported in a fresh interpreter where any ``flwr`` import fails."""
    code = (
        "import sys, pkgutil, importlib\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'flwr' or name.startswith('flwr.'):\n"
        "            raise ImportError('flwr is unavailable in this test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import clues_flwr.core as core\n"
        "names = [m.name for m in pkgutil.iter_modules(core.__path__)]\n"
        "for name in names:\n"
        "    importlib.import_module(f'clues_flwr.core.{name}')\n"
        "import clues_flwr.config\n"
        "assert not any(m == 'flwr' or m.startswith('flwr.') for m in sys.modules), 'flwr was imported'\n"
        "print(len(names))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) >= 10


def test_the_core_imports_nothing_of_clues_flwr_above_it():
    """Every import statement under ``core/``, function-level ones included, stays in the core
    (a relative import climbing out of it counts as leaving)."""
    above = []
    for path in sorted((ROOT / "clues_flwr" / "core").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] if node.level == 0 else ["clues_flwr"] if node.level > 1 else []
            else:
                continue
            parts = [name.split(".") for name in names]
            above += [f"{path.name}: {'.'.join(p)}" for p in parts if p[0] == "clues_flwr" and p[1:2] != ["core"]]
    assert not above, above


HEAVY = ("datasets", "flwr_datasets", "pandas", "pyarrow", "matplotlib")


def test_the_public_api_loads_no_data_stack_and_no_plotting():
    """Every public name, loaded in a fresh interpreter, leaves the data stack and matplotlib
    unimported (Flower itself imports none of them)."""
    code = (
        "import sys\n"
        "import clues_flwr\n"
        "for name in clues_flwr.__all__:\n"
        "    getattr(clues_flwr, name)\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", done.stdout


def test_the_public_api_resolves_and_lists_only_what_it_has():
    for name in clues_flwr.__all__:
        assert getattr(clues_flwr, name) is not None
    client = {"CluesClient", "Site", "selected_records", "train_reply", "evaluate_reply"}
    assert client | {"CluesSelection", "CluesTuning", "adapter_arrays"} <= set(clues_flwr.__all__)


def test_a_moved_module_fails_naming_its_new_place():
    for old, new in clues_flwr._MOVED.items():
        assert importlib.util.find_spec(new) is not None, f"{old} is said to be at {new}, which does not exist"
        with pytest.raises(ModuleNotFoundError, match=f"{old} has moved to {new}"):
            importlib.import_module(old)
    with pytest.raises(ModuleNotFoundError, match="moved to clues_flwr.core.scoring"):
        from clues_flwr import scoring  # noqa: F401
    with pytest.raises(ModuleNotFoundError, match="moved to clues_flwr.flower.protocol"):
        from clues_flwr.flower import messages  # noqa: F401
    with pytest.raises(ModuleNotFoundError, match="No module named 'clues_flwr.nowhere'"):
        importlib.import_module("clues_flwr.nowhere")


def test_a_fab_carries_the_app_but_not_the_harness():
    """The FAB as ``flwr build`` makes it from this project."""
    names = zipfile.ZipFile(io.BytesIO(build_fab_from_disk(ROOT))).namelist()
    assert "clues_flwr/demo/server_app.py" in names and "clues_flwr/flower/selection.py" in names
    assert "clues_flwr/core/scoring.py" in names
    assert not [n for n in names if n.startswith(("clues_flwr/harness/", "simulation/", "tests/", "results/"))]
