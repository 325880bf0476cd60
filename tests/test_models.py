"""Model presets and config.json parsing produce the GEMM shapes that will run: by default what
gemmtune's `patch` runs on a transformers model (its linears, q/k/v and gate/up merged where the
architecture shares their input), with `layout="separate"` every linear alone, with
`layout="fused"` the fused qkv / gate_up GEMMs engines run. Expected shapes are derived here from the published
config values (hidden, intermediate, heads, kv heads, head_dim), never from the code under test."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from gemmtune.autotune.models import (
    DEFAULT_LAYOUT,
    LAYOUTS,
    MODEL_PRESETS,
    Layer,
    model_layers,
    parse_shape,
    shape_layers,
    unique_problems,
)
from gemmtune.kernels import InvalidProblemError, Problem
from gemmtune.kernels.errors import UnsupportedFormatError

# Published Hugging Face config.json values: hidden, intermediate, heads, kv heads, layers.
PUBLISHED = {
    "llama-2-7b": (4096, 11008, 32, 32, 32),
    "llama-2-13b": (5120, 13824, 40, 40, 40),
    "llama-2-70b": (8192, 28672, 64, 8, 80),
    "llama-3-8b": (4096, 14336, 32, 8, 32),
    "llama-3-70b": (8192, 28672, 64, 8, 80),
    "mistral-7b": (4096, 14336, 32, 8, 32),
    "qwen2.5-7b": (3584, 18944, 28, 4, 28),
    "qwen2.5-14b": (5120, 13824, 40, 8, 48),
    "qwen2.5-32b": (5120, 27648, 40, 8, 64),
    "qwen2.5-72b": (8192, 29568, 64, 8, 80),
}


def shapes(layers: list[Layer]) -> dict[str, tuple[int, int]]:
    return {layer.name: (layer.problem.k, layer.problem.n) for layer in layers}


def test_every_published_model_is_a_preset() -> None:
    assert set(MODEL_PRESETS) == set(PUBLISHED)


def transformers_shapes(hidden: int, inter: int, heads: int, kv: int,
                        head_dim: int) -> dict[str, tuple[int, int]]:
    """A transformers Llama's nn.Linear (in_features, out_features) per projection."""
    return {"q_proj": (hidden, heads * head_dim), "k_proj": (hidden, kv * head_dim),
            "v_proj": (hidden, kv * head_dim), "o_proj": (heads * head_dim, hidden),
            "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}


def fused_shapes(hidden: int, inter: int, heads: int, kv: int,
                 head_dim: int) -> dict[str, tuple[int, int]]:
    """What an engine that fuses q/k/v and gate/up multiplies."""
    return {"qkv": (hidden, (heads + 2 * kv) * head_dim), "o": (heads * head_dim, hidden),
            "gate_up": (hidden, 2 * inter), "down": (inter, hidden)}


def patched_shapes(hidden: int, inter: int, heads: int, kv: int,
                   head_dim: int) -> dict[str, tuple[int, int]]:
    """What gemmtune's runtime runs for a Llama / Mistral / Qwen2: q/k/v and gate/up fused."""
    return {"q_proj+k_proj+v_proj": (hidden, (heads + 2 * kv) * head_dim),
            "o_proj": (heads * head_dim, hidden), "gate_proj+up_proj": (hidden, 2 * inter),
            "down_proj": (inter, hidden)}


def test_the_default_layout_is_what_patch_runs() -> None:
    assert DEFAULT_LAYOUT == "transformers" and set(LAYOUTS) == {"transformers", "separate", "fused"}
    assert model_layers("llama-3-8b") == model_layers("llama-3-8b", layout="transformers")


def test_llama_3_8b_and_llama_2_70b_shapes() -> None:
    # Llama-3-8B: hidden 4096, intermediate 14336, 32 heads, 8 kv heads, head_dim 128.
    assert shapes(model_layers("llama-3-8b")) == {
        "q_proj+k_proj+v_proj": (4096, 6144), "o_proj": (4096, 4096),
        "gate_proj+up_proj": (4096, 28672), "down_proj": (14336, 4096),
    }
    assert shapes(model_layers("llama-3-8b", layout="separate")) == {
        "q_proj": (4096, 4096), "k_proj": (4096, 1024), "v_proj": (4096, 1024),
        "o_proj": (4096, 4096), "gate_proj": (4096, 14336), "up_proj": (4096, 14336),
        "down_proj": (14336, 4096),
    }
    # Llama-2-70B: hidden 8192, intermediate 28672, 64 heads, 8 kv heads, head_dim 128.
    assert shapes(model_layers("llama-2-70b", layout="separate")) == {
        "q_proj": (8192, 8192), "k_proj": (8192, 1024), "v_proj": (8192, 1024),
        "o_proj": (8192, 8192), "gate_proj": (8192, 28672), "up_proj": (8192, 28672),
        "down_proj": (28672, 8192),
    }
    assert shapes(model_layers("llama-3-8b", layout="fused")) == {
        "qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096),
    }
    assert shapes(model_layers("llama-2-70b", layout="fused")) == {
        "qkv": (8192, 10240), "o": (8192, 8192), "gate_up": (8192, 57344), "down": (28672, 8192),
    }


def test_counts_per_forward_and_shared_shapes_are_tuned_once() -> None:
    # Llama-3-8B, 32 decoder layers: q and o share 4096x4096, k and v 4096x1024, gate and up
    # 4096x14336; each distinct shape is one problem weighted by every linear that runs it.
    assert unique_problems(model_layers("llama-3-8b", layout="separate")) == {
        Problem(4096, 4096): 64, Problem(4096, 1024): 64, Problem(4096, 14336): 64,
        Problem(14336, 4096): 32}
    assert unique_problems(model_layers("llama-2-70b", layout="separate")) == {
        Problem(8192, 8192): 160, Problem(8192, 1024): 160, Problem(8192, 28672): 160,
        Problem(28672, 8192): 80}
    # What the runtime runs for a Llama is the fused layout's problems, counts included.
    assert unique_problems(model_layers("llama-3-8b")) == unique_problems(
        model_layers("llama-3-8b", layout="fused"))
    assert unique_problems(model_layers("llama-3-8b", layout="fused")) == {
        Problem(4096, 6144): 32, Problem(4096, 4096): 32, Problem(4096, 28672): 32,
        Problem(14336, 4096): 32}
    # Llama-2-7B has no GQA: q, k, v and o are one 4096x4096 problem run 4 times a layer.
    assert unique_problems(model_layers("llama-2-7b", layout="separate"))[Problem(4096, 4096)] == 4 * 32


@pytest.mark.parametrize("layout, expected", [("separate", transformers_shapes),
                                              ("transformers", patched_shapes),
                                              ("fused", fused_shapes)])
@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_shapes_follow_the_projection_rules(name: str, layout: str, expected: Any) -> None:
    hidden, inter, heads, kv, n_layers = PUBLISHED[name]
    layers = model_layers(name, bits=4, group_size=128, act_order=True, layout=layout)
    assert shapes(layers) == expected(hidden, inter, heads, kv, hidden // heads)
    for layer in layers:
        assert layer.count == n_layers
        assert (layer.problem.bits, layer.problem.group_size, layer.problem.act_order) == (4, 128, True)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 32, 64, 128])
def test_every_preset_fits_the_problem_rules(name: str, bits: int, group_size: int) -> None:
    # Includes the Qwen2.5 intermediate sizes 18944, 13824, 27648, 29568 as K of `down` and
    # Qwen2.5-7B's 512-wide k/v (4 kv heads of 128).
    assert len(model_layers(name, bits=bits, group_size=group_size, layout="separate")) == 7
    assert len(model_layers(name, bits=bits, group_size=group_size, layout="fused")) == 4
    # The runtime fuses only what its kernels run: 3-bit layers stay separate.
    assert len(model_layers(name, bits=bits, group_size=group_size)) == (7 if bits == 3 else 4)


def test_a_bad_layout_is_one_clear_error() -> None:
    assert model_layers("llama-3-8b", layout=" Fused ") == model_layers("llama-3-8b", layout="fused")
    for bad in ("vllm", "", "fuse"):
        with pytest.raises(InvalidProblemError, match="unknown layout .*transformers, separate, fused") as info:
            model_layers("llama-3-8b", layout=bad)
        assert "\n" not in str(info.value)


def test_defaults_and_lenient_preset_names() -> None:
    layers = model_layers("Llama_3_8B")
    assert layers == model_layers("llama-3-8b")
    assert {(lay.problem.bits, lay.problem.group_size, lay.problem.act_order) for lay in layers} == {
        (4, 128, False)
    }


def test_unknown_model_lists_the_presets() -> None:
    with pytest.raises(InvalidProblemError, match="llama-3-8b") as info:
        model_layers("llama-9-1b")
    assert "qwen2.5-72b" in str(info.value) and "config.json" in str(info.value)


def write_config(tmp_path: Path, **fields: object) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(fields))
    return path


def test_config_json_matches_the_preset_and_reads_quantization(tmp_path: Path) -> None:
    hidden, inter, heads, kv, n_layers = PUBLISHED["llama-3-8b"]
    path = write_config(
        tmp_path, hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads,
        num_key_value_heads=kv, num_hidden_layers=n_layers, model_type="llama",
        quantization_config={"quant_method": "gptq", "bits": 8, "group_size": 32, "desc_act": True},
    )
    layers = model_layers(path)
    assert shapes(layers) == patched_shapes(hidden, inter, heads, kv, hidden // heads)
    assert shapes(model_layers(path, layout="separate")) == transformers_shapes(hidden, inter, heads, kv,
                                                                                hidden // heads)
    assert shapes(model_layers(path, layout="fused")) == fused_shapes(hidden, inter, heads, kv,
                                                                      hidden // heads)
    assert all(lay.problem == Problem(lay.problem.k, lay.problem.n, 8, 32, True) for lay in layers)
    assert all(lay.count == n_layers for lay in layers)
    assert model_layers(tmp_path) == layers  # a model directory works too
    explicit = model_layers(str(path), bits=4, group_size=128, act_order=False)
    assert {(lay.problem.bits, lay.problem.group_size, lay.problem.act_order) for lay in explicit} == {
        (4, 128, False)
    }


def test_config_defaults_kv_heads_and_honours_explicit_head_dim(tmp_path: Path) -> None:
    path = write_config(tmp_path, hidden_size=2048, intermediate_size=5632,
                        num_attention_heads=16, num_hidden_layers=4)
    # kv heads default to heads
    assert shapes(model_layers(path)) == transformers_shapes(2048, 5632, 16, 16, 128)
    assert shapes(model_layers(path, layout="fused"))["qkv"] == (2048, 3 * 2048)
    # Mistral-NeMo style: head_dim given and heads * head_dim != hidden.
    path = write_config(tmp_path, hidden_size=5120, intermediate_size=14336, num_attention_heads=32,
                        num_key_value_heads=8, head_dim=128, num_hidden_layers=40)
    got = shapes(model_layers(path))
    assert got["q_proj"] == (5120, 32 * 128) and got["o_proj"] == (32 * 128, 5120)
    assert got["k_proj"] == got["v_proj"] == (5120, 8 * 128)
    got = shapes(model_layers(path, layout="fused"))
    assert got["o"] == (32 * 128, 5120) and got["qkv"] == (5120, 48 * 128)


LLAMA_2_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32,
              "num_hidden_layers": 32, "model_type": "llama"}


def test_config_reads_awq_quantization(tmp_path: Path) -> None:
    # Before, "awq" was ignored and the layers tuned as GPTQ g128: the group size must be AWQ's.
    path = write_config(tmp_path, **LLAMA_2_7B, quantization_config={
        "quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": True, "version": "gemm"})
    layers = model_layers(path)
    assert {(lay.problem.bits, lay.problem.group_size, lay.problem.act_order) for lay in layers} == {
        (4, 64, False)}
    assert shapes(layers) == shapes(model_layers("llama-2-7b"))


def test_config_desc_act_with_static_groups_is_not_act_order(tmp_path: Path) -> None:
    # static_groups stores g_idx = k // group_size: no row permutation, so a plain problem.
    qc = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": True,
          "static_groups": True, "sym": False, "checkpoint_format": "gptq_v2"}
    path = write_config(tmp_path, **LLAMA_2_7B, quantization_config=qc)
    assert {lay.problem.act_order for lay in model_layers(path)} == {False}
    path = write_config(tmp_path, **LLAMA_2_7B, quantization_config={**qc, "static_groups": False})
    assert {lay.problem.act_order for lay in model_layers(path)} == {True}


@pytest.mark.parametrize("qc, field", [
    ({"quant_method": "exl2", "bits": 4.65}, "quant_method='exl2'"),
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "quant_method='bitsandbytes'"),
    ({"quant_method": "fp8", "activation_scheme": "dynamic"}, "quant_method='fp8'"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"}, "version='gemv'"),
    ({"quant_method": "awq", "bits": 8, "group_size": 128}, "bits=8"),
])
def test_config_refuses_unsupported_quantization(tmp_path: Path, qc: dict, field: str) -> None:
    path = write_config(tmp_path, **LLAMA_2_7B, quantization_config=qc)
    with pytest.raises(UnsupportedFormatError, match=re.escape(f"quantization_config.{field}")) as info:
        model_layers(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_config_errors_are_clear(tmp_path: Path) -> None:
    path = write_config(tmp_path, hidden_size=4096, num_attention_heads=32, num_hidden_layers=32)
    with pytest.raises(InvalidProblemError, match="intermediate_size"):
        model_layers(path)
    path = write_config(tmp_path, hidden_size="4096", intermediate_size=11008,
                        num_attention_heads=32, num_hidden_layers=32)
    with pytest.raises(InvalidProblemError, match="hidden_size"):
        model_layers(path)
    path.write_text("{not json")
    with pytest.raises(InvalidProblemError, match="JSON"):
        model_layers(path)
    with pytest.raises(InvalidProblemError, match="cannot read"):
        model_layers(tmp_path / "missing" / "config.json")
    bad_group = write_config(tmp_path, hidden_size=4096, intermediate_size=11008,
                             num_attention_heads=32, num_hidden_layers=32,
                             quantization_config={"bits": 4, "group_size": 100})
    with pytest.raises(InvalidProblemError, match="group_size"):
        model_layers(bad_group)


def test_parse_shape() -> None:
    assert parse_shape("4096x11008") == (4096, 11008)
    assert parse_shape(" 14336X4096 ") == (14336, 4096)
    for bad in ("4096", "4096x", "x4096", "-1x4096", "4096x0", "4096 by 4096", "1.5x2"):
        with pytest.raises(InvalidProblemError, match="4096x4096|positive"):
            parse_shape(bad)


def test_shape_layers_and_unique_problems() -> None:
    layers = shape_layers(["4096x4096", "4096x4096", "14336x4096"], bits=8, group_size=64)
    assert [lay.count for lay in layers] == [1, 1, 1]
    assert unique_problems(layers) == {Problem(4096, 4096, 8, 64): 2, Problem(14336, 4096, 8, 64): 1}
    with pytest.raises(InvalidProblemError, match="multiple of 32"):
        shape_layers(["4100x4096"])
    both = model_layers("llama-3-8b", layout="fused") + model_layers("mistral-7b", layout="fused")
    assert all(count == 64 for count in unique_problems(both).values())  # same shapes: summed


def test_an_unknown_model_says_whether_it_was_taken_for_a_path_or_a_name() -> None:
    from gemmtune.autotune.models import model_spec
    from gemmtune.kernels.errors import InvalidProblemError

    for path in ("/no/such/dir", "./missing", "~/nope", "models/llama"):
        with pytest.raises(InvalidProblemError, match="no such file or folder"):
            model_spec(path)
    with pytest.raises(InvalidProblemError, match="known presets are"):
        model_spec("llama-9-1b")
