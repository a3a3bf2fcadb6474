"""The line that matters most in the package: everything outside ``flystage.training`` runs
without torch (the serve image has none, and `flystage predict` must not need it)."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import flystage

BLOCK_TORCH = """
import importlib.abc, sys
class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("torch", "torchvision", "timm"):
            raise ImportError(f"{name} is made unimportable for this test")
        return None
sys.meta_path.insert(0, NoTorch())
"""


def core_modules() -> list[str]:
    """Every module of the package but the training side."""
    names = [m.name for m in pkgutil.walk_packages(flystage.__path__, "flystage.")]
    return sorted(
        n for n in names if not n.startswith("flystage.training") and n != "flystage.__main__"
    )


def test_the_core_imports_with_torch_made_unimportable():
    modules = core_modules()
    assert "flystage.predict" in modules and "flystage.serving.entrypoint" in modules
    # The predictor, its outputs, renaming and the file helpers run in the serve image too.
    assert {"flystage.predictor", "flystage.outputs", "flystage.rename", "flystage.files"} <= set(
        modules
    )
    code = (
        BLOCK_TORCH
        + "import importlib\n"
        + "".join(f"importlib.import_module({m!r})\n" for m in modules)
    )
    code += (
        "assert not [m for m in sys.modules "
        "if m.split('.')[0] in ('torch', 'torchvision', 'timm')]\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_the_training_side_really_needs_torch():
    # The block is real: the training modules fail under it, so the test above could fail too.
    code = BLOCK_TORCH + "import flystage.training.train\n"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
    )
    assert result.returncode != 0 and "made unimportable" in result.stderr
