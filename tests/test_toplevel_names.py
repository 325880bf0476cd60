"""Inside the checkout, a top-level name means the installed package of that name (DESIGN.md,
"Layout"): our area folders sit at the checkout root, and whenever Python starts there the root
is on sys.path. transformers >= 5.25 imports Hugging Face's `kernels` and got ours (issue 20).

Each check runs a fresh interpreter from the checkout root, the way `python -m pytest`, `python -c`
or a REPL opened there sees it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
AREAS = ("kernels", "db", "runtime", "autotune")


def _python(code: str, *, extra_path: Path | None = None, module: str | None = None,
            ) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    if extra_path is not None:
        env["PYTHONPATH"] = str(extra_path)
    args = [sys.executable, "-m", module] if module else [sys.executable, "-c", code]
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _fake_installed(tmp_path: Path) -> Path:
    """A site dir holding throwaway packages named like our areas, as another distribution would
    install them."""
    site = tmp_path / "site"
    for name in AREAS:
        (site / name).mkdir(parents=True)
        (site / name / "__init__.py").write_text(f"WHOSE = 'installed {name}'\n")
        (site / name / "sub.py").write_text("WHOSE = 'installed sub'\n")
    return site


def test_top_level_names_import_the_installed_packages(tmp_path: Path) -> None:
    site = _fake_installed(tmp_path)
    probe = textwrap.dedent("""
        import importlib, sys
        for name in ("kernels", "db", "runtime", "autotune"):
            mod = importlib.import_module(name)
            sub = importlib.import_module(name + ".sub")
            print(name, mod.WHOSE, sub.WHOSE, mod.__file__)
        import gemmtune.kernels, gemmtune.db, gemmtune.runtime, gemmtune.autotune
        print("ours", gemmtune.kernels.KernelConfig.__module__, gemmtune.runtime.patch.__module__)
    """)
    (site / "probe_names.py").write_text(probe)
    for run in (_python(probe, extra_path=site), _python("", extra_path=site, module="probe_names")):
        assert run.returncode == 0, run.stderr
        lines = dict(line.split(" ", 1) for line in run.stdout.splitlines())
        for name in AREAS:
            assert lines[name] == f"installed {name} installed sub {site / name / '__init__.py'}"
        assert lines["ours"] == "gemmtune.kernels.config gemmtune.runtime.patch"


def test_top_level_names_are_not_gemmtune_when_nothing_is_installed() -> None:
    """With no package of the name installed, the name is what any other folder on sys.path
    without a package would give: an empty namespace package, none of gemmtune's code under it,
    and "not installed" to a caller that probes it the way transformers does (find_spec, no
    metadata, import, no `__file__`). gemmtune's own packages still import afterwards."""
    run = _python(textwrap.dedent("""
        import importlib, importlib.metadata
        for name in ("db", "runtime", "autotune"):  # no distribution of ours installs these names
            mod = importlib.import_module(name)
            try:
                importlib.import_module(name + ".store")
                sub = "imported"
            except ModuleNotFoundError:
                sub = "missing"
            print(name, getattr(mod, "__file__", None), list(mod.__path__), sub)
        try:
            from transformers.utils.import_utils import _is_package_available
        except ImportError:
            pass
        else:
            print("transformers", _is_package_available("runtime", return_version=True)[0])
        import gemmtune.db
        print("ours", gemmtune.db.default_url.__module__)
    """))
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    for name, line in zip(("db", "runtime", "autotune"), lines, strict=False):
        assert line == f"{name} None [] missing", line
    assert lines[-1] == "ours gemmtune.db.paths"
    assert "transformers True" not in lines


def test_transformers_llama_builds_from_the_checkout_root() -> None:
    pytest.importorskip("transformers")
    run = _python(textwrap.dedent("""
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM
        cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                          num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
        model = LlamaForCausalLM(cfg)
        out = model(torch.tensor([[1, 2, 3]])).logits
        print(tuple(out.shape))
    """))
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().splitlines()[-1] == "(1, 3, 128)"


def test_gemmtune_imports_from_the_checkout_root_without_an_editable_install() -> None:
    """Python started in the checkout finds its `gemmtune/` first. Without an editable install
    (a wheel from `pip install .`, or none; `-S` leaves site-packages and the editable finder
    out) the areas must still import as `gemmtune.*`: the bench's tuner child and the GPU tests'
    helpers died on `No module named 'gemmtune.kernels'` on the GPU machine."""
    run = subprocess.run([sys.executable, "-S", "-c",
                          "import gemmtune.kernels.config as c, gemmtune.kernels.workload as w; "
                          "print(c.__file__); print(w.Workload.__module__)"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.splitlines() == [str(ROOT / "kernels" / "config.py"), "gemmtune.kernels.workload"]
