"""`--model` / `--config` tune what will run. The README's Quick start (`gemmtune tune --model
<checkpoint>`, then `patch(model)`) tunes exactly the problems of the `QuantLinear`s that
`load_quantized` / `patch` put into a transformers Llama, counts included: before the layout was
explicit, `--model` tuned fused qkv / gate_up shapes that a transformers model never runs, so
its k, v, gate and up linears silently got the default config. Now the runtime fuses q/k/v and
gate/up of a Llama by default, and `--model` tunes exactly those fused GEMMs (`fuse=False` and
`--layout separate` agree the same way). And every command that derives problems from a model
takes the layout."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from gemmtune.autotune.models import model_layers, unique_problems
from gemmtune.kernels.problem import Problem
from gemmtune.runtime import launched_problems, load_quantized, patch, quantize_model
from safetensors.torch import save_file

from gemmtune.cli import main
from tests.test_cli_tune import FakeGPU
from tests.tiny_llama import tiny_llama, tiny_llama_config

transformers = pytest.importorskip("transformers")

QC = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False, "sym": False,
      "checkpoint_format": "gptq"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A GPTQ checkpoint folder of the tiny Llama as a user has one: config.json (the model's
    transformers config plus its quantization_config) beside model.safetensors."""
    folder = tmp_path_factory.mktemp("tiny-llama-gptq")
    model = tiny_llama(1)
    quantize_model(model, bits=4, group_size=32, generator=torch.Generator().manual_seed(2))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(folder / "model.safetensors"))
    config = json.loads(tiny_llama_config().to_json_string())
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": QC}))
    return folder


def _patched_problems(model: Any) -> Counter[Problem]:
    """The problems of the GEMMs a forward launches, counted per launch: what runs."""
    return launched_problems(model)


def _loaded(folder: Path, fuse: bool = True) -> Any:
    model = tiny_llama(5)
    load_quantized(model, folder / "model.safetensors", fuse=fuse)  # quantization_config from config.json
    return model


def _patched(folder: Path, fuse: bool = True) -> Any:
    from tests.test_client_llama import _autogptq_model

    model = _autogptq_model(folder / "model.safetensors")  # AutoGPTQ-style modules
    patch(model, QC, fuse=fuse)
    return model


@pytest.mark.parametrize("build", [_loaded, _patched], ids=["load_quantized", "patch"])
def test_tuned_problems_are_the_patched_models_problems(checkpoint: Path, build: Any) -> None:
    running = _patched_problems(build(checkpoint))
    assert sum(running.values()) == 8  # qkv o gate_up down x 2 decoder layers (q/k/v, gate/up fused)
    assert unique_problems(model_layers(checkpoint)) == dict(running)
    assert unique_problems(model_layers(checkpoint / "config.json")) == dict(running)
    # A Llama's fused GEMMs are the engines' fused layout (same columns, same order).
    assert unique_problems(model_layers(checkpoint, layout="fused")) == dict(running)
    # The opt-out runs every projection alone: what the separate layout tunes.
    alone = _patched_problems(build(checkpoint, fuse=False))
    assert sum(alone.values()) == 14  # q k v o gate up down x 2 decoder layers
    assert unique_problems(model_layers(checkpoint, layout="separate")) == dict(alone)
    assert set(alone) != set(running)


@pytest.mark.parametrize("flag, target", [("--model", ""), ("--config", "config.json")])
def test_quick_start_tune_tunes_every_problem_the_model_runs(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, checkpoint: Path, flag: str,
        target: str) -> None:
    gpu = FakeGPU(monkeypatch)
    result = CliRunner().invoke(main, ["tune", flag, str(checkpoint / target), "--workload",
                                       "decode", "--trials", "3", "--db",
                                       f"sqlite:///{tmp_path / 'tuning.db'}"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    tuned = [ev.problem for ev in gpu.evaluators]
    assert len(tuned) == len(set(tuned))  # each shared shape (q/o, k/v, gate/up) tuned once
    assert set(tuned) == set(_patched_problems(_loaded(checkpoint)))


def test_every_command_that_reads_a_model_takes_the_layout() -> None:
    reading = {name: cmd for name, cmd in main.commands.items()
               if any("--model" in p.opts for p in cmd.params)}
    assert set(reading) >= {"tune", "resolve", "bench", "compare"}
    for name, cmd in reading.items():
        layout = next((p for p in cmd.params if "--layout" in p.opts), None)
        assert layout is not None, f"{name} takes --model but not --layout"
        assert layout.default == "transformers"
        out = CliRunner().invoke(main, [name, "--help"], env={"COLUMNS": "200"}).output
        assert "--layout transformers|separate|fused" in out and "[default: transformers]" in out, name
