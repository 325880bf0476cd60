"""Give a top-level name back to the package installed under it.

The area folders `kernels/`, `db/`, `runtime/` and `autotune/` sit at the checkout root and
install as `gemmtune.kernels`, … (setuptools `package-dir`). Whenever the checkout root is on
`sys.path` — `python -m pytest`, `python -c`, a REPL or notebook opened there — Python would also
find them as the top-level packages `kernels`, `db`, … and serve them to anyone importing those
names: transformers (≥ 5.25) imports Hugging Face's `kernels`, and got ours.

The rule (DESIGN.md, "Layout"): inside the checkout a top-level name always means the installed
package of that name, and gemmtune's code is only `gemmtune.*`. Each area's `__init__.py` starts
with a guard that calls `hand_over` when it runs under any other name than its `gemmtune.` one.
`hand_over` imports the name again with the checkout root left out of `sys.path`, so the import
statement that reached our folder returns the installed package. With none installed it returns
what Python makes of any other folder of that name on `sys.path` that holds no package: an empty
namespace package (no `__file__`, no submodules). Raising `ModuleNotFoundError` instead would
break callers that saw the folder with `importlib.util.find_spec` and then import it to learn
whether it is real: transformers does exactly that for `kernels` when no distribution of that
name is installed, and takes a module without `__file__` as "not installed".

Why this and not the alternatives (tried): a folder without `__init__.py` is a namespace portion,
which every regular package on `sys.path` outranks — but setuptools' editable finder then no longer
imports the mapped `gemmtune.kernels`, the areas lose their package API, and with nothing
installed under the name the folder still imports as top-level `kernels`. pytest's import modes
do not change the `sys.path[0]` that `python -m` adds. Renaming or moving the folders breaks the
layout the design fixes. The guard works the same under an editable install, a wheel (where the
folders are never top level and the guard never fires) and any import path.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import os
import sys
from types import ModuleType


def hand_over(name: str, init_file: str) -> ModuleType:
    """Put the package installed under `name` in place of the module being imported as `name`
    (our folder, whose `__init__.py` is `init_file`), or an empty namespace package if none is.
    The caller's `__init__.py` must define nothing else when this runs."""
    root = os.path.realpath(os.path.dirname(os.path.dirname(init_file)))
    saved = list(sys.path)
    sys.modules.pop(name, None)  # ours, half-made: the import machinery returns what is there now
    sys.path[:] = [e for e in saved if os.path.realpath(e or os.getcwd()) != root]
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name != name:
            raise  # the installed package is broken: its own error is the useful one
        spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
        module = sys.modules[name] = importlib.util.module_from_spec(spec)
        return module
    finally:
        sys.path[:] = saved
