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
    """With no package of the name installed, the import fails as it would outside the checkout,
    and gemmtune's own packages still import afterwards."""
    run = _python(textwrap.dedent("""
        import importlib
        for name in ("kernels", "db", "runtime", "autotune"):
            try:
                importlib.import_module(name)
            except ModuleNotFoundError as exc:
                print(name, "missing", exc.name)
            else:
                print(name, "found", importlib.import_module(name).__file__)
        import gemmtune.db
        print("ours", "module", gemmtune.db.default_url.__module__)
    """))
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert len(lines) == len(AREAS) + 1, run.stdout
    for line in lines:
        name, verdict, what = line.split(" ", 2)
        if name == "ours":
            assert what == "gemmtune.db.paths"
        elif verdict == "found":
            # A real distribution of that name may be installed (Hugging Face's `kernels` is,
            # wherever transformers >= 5.25 is): then it must be that one, not our folder.
            assert not what.startswith(str(ROOT / name)), line
        else:
            assert what == name, line


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
