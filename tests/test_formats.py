"""`read_format`: every supported quantization_config is read as what it is, everything else is
refused with one line naming the field and its value (what a user sees from `gemmtune tune`)."""

from __future__ import annotations

import re
from typing import Any

import pytest
from gemmtune.kernels.errors import InvalidProblemError, UnsupportedFormatError
from gemmtune.kernels.formats import QuantFormat, read_format
from gemmtune.runtime import GPTQSpec

AWQ = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm",
       "modules_to_not_convert": None}
GPTQ = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True}


def fields(f: QuantFormat) -> tuple[Any, ...]:
    return (f.method, f.name, f.bits, f.group_size, f.zero_format, f.act_order)


@pytest.mark.parametrize("qc, want", [
    # AutoGPTQ's quantize_config.json has no quant_method: GPTQ v1.
    ({"bits": 4, "group_size": 128, "desc_act": True}, ("gptq", "gptq", 4, 128, "v1", True)),
    ({**GPTQ, "checkpoint_format": "gptq"}, ("gptq", "gptq", 4, 128, "v1", False)),
    # GPTQModel: zeros not offset.
    ({**GPTQ, "checkpoint_format": "gptq_v2", "sym": False}, ("gptq", "gptq_v2", 4, 128, "v2", False)),
    ({**GPTQ, "format": "gptq_v2"}, ("gptq", "gptq_v2", 4, 128, "v2", False)),  # older spelling
    ({**GPTQ, "bits": 8, "group_size": -1}, ("gptq", "gptq", 8, -1, "v1", False)),
    # desc_act + static_groups: g_idx stays k // group_size, so not an act-order problem.
    ({**GPTQ, "desc_act": True, "static_groups": True}, ("gptq", "gptq", 4, 128, "v1", False)),
    ({**GPTQ, "desc_act": True, "static_groups": False}, ("gptq", "gptq", 4, 128, "v1", True)),
    (AWQ, ("awq", "awq", 4, 128, "v2", False)),
    ({**AWQ, "group_size": 64}, ("awq", "awq", 4, 64, "v2", False)),
    # AutoAWQ's own spellings.
    ({"quant_method": "awq", "w_bit": 4, "q_group_size": 32, "zero_point": True, "version": "GEMM"},
     ("awq", "awq", 4, 32, "v2", False)),
    # transformers 5 writes format + version, a kernel `backend` and a meaningless `sym`.
    ({**AWQ, "format": "gemm", "backend": "auto", "sym": True}, ("awq", "awq", 4, 128, "v2", False)),
    ({**AWQ, "backend": "autoawq"}, ("awq", "awq", 4, 128, "v2", False)),
    ({**AWQ, "checkpoint_format": "gemm"}, ("awq", "awq", 4, 128, "v2", False)),  # GPTQModel's AWQ
])
def test_supported_configs(qc: dict[str, Any], want: tuple[Any, ...]) -> None:
    assert fields(read_format(qc)) == want


def test_gptqmodel_dynamic_that_only_excludes_or_repeats_is_accepted() -> None:
    qc = {**GPTQ, "dynamic": {"-:.*lm_head": {}, r"+:.*\.mlp\..*": {"bits": 4, "group_size": 128}}}
    assert read_format(qc).bits == 4


def test_transformers_config_objects_are_read() -> None:
    transformers = pytest.importorskip("transformers")
    awq = read_format(transformers.AwqConfig(bits=4, group_size=64))
    assert fields(awq) == ("awq", "awq", 4, 64, "v2", False)
    gptq = read_format(transformers.GPTQConfig(bits=4, group_size=32, desc_act=True, sym=False))
    assert fields(gptq) == ("gptq", "gptq", 4, 32, "v1", True)


def test_gptqspec_is_the_same_reader_with_the_same_fields() -> None:
    assert GPTQSpec is QuantFormat
    assert GPTQSpec(4, 64, True, False, "v2") == QuantFormat(bits=4, group_size=64, desc_act=True,
                                                             sym=False, zero_format="v2")
    assert GPTQSpec.from_config(AWQ).method == "awq"


REFUSED = [
    ({"quant_method": "exl2", "version": "0.2.0", "bits": 4.125}, "quant_method='exl2'"),
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "quant_method='bitsandbytes'"),
    ({"quant_method": "fp8", "activation_scheme": "dynamic"}, "quant_method='fp8'"),
    ({"quant_method": "compressed-tensors"}, "quant_method='compressed-tensors'"),
    ({**AWQ, "version": "gemv"}, "version='gemv'"),
    ({**AWQ, "version": "gemv_fast"}, "version='gemv_fast'"),
    ({**AWQ, "version": "marlin"}, "version='marlin'"),
    ({**AWQ, "version": "exllama"}, "version='exllama'"),
    ({**AWQ, "checkpoint_format": "marlin"}, "checkpoint_format='marlin'"),
    ({**AWQ, "format": "llm-awq"}, "format='llm-awq'"),
    ({**AWQ, "backend": "llm-awq"}, "backend='llm-awq'"),
    ({**AWQ, "zero_point": False}, "zero_point=False"),
    ({**AWQ, "bits": 8}, "bits=8"),
    ({**AWQ, "group_size": -1}, "group_size=-1"),
    ({**GPTQ, "checkpoint_format": "marlin"}, "checkpoint_format='marlin'"),
    ({**GPTQ, "checkpoint_format": "bitblas"}, "checkpoint_format='bitblas'"),
    ({**GPTQ, "bits": 4.5}, "bits=4.5"),
    ({**GPTQ, "bits": {"q_proj": 4, "down_proj": 8}}, "bits={"),
    ({**GPTQ, "bits": 5}, "bits=5"),
    ({**GPTQ, "group_size": 100}, "group_size=100"),
    ({**GPTQ, "dynamic": {r".*\.down_proj": {"bits": 8}}}, r"dynamic['.*\\.down_proj'].bits=8"),
    ({**GPTQ, "dynamic": {r"+:.*\.o_proj": {"group_size": 32}}}, r"dynamic['+:.*\\.o_proj'].group_size=32"),
]


@pytest.mark.parametrize("qc, field", REFUSED)
def test_unsupported_configs_are_refused_in_one_line(qc: dict[str, Any], field: str) -> None:
    with pytest.raises(UnsupportedFormatError) as info:
        read_format(qc, "ckpt/config.json")
    msg = str(info.value)
    assert msg.startswith(f"ckpt/config.json: quantization_config.{field}"), msg
    assert "\n" not in msg and "not supported" in msg
    assert info.value.exit_code == 2


def test_mixed_bit_widths_are_called_that() -> None:
    for qc in ({**GPTQ, "bits": 4.5}, {**GPTQ, "dynamic": {"x": {"bits": 8}}}):
        with pytest.raises(UnsupportedFormatError, match="mixed"):
            read_format(qc)
    # a hand-edited "4" is a type slip, not a mixed-width model
    for qc in ({**GPTQ, "bits": "4"}, {**GPTQ, "bits": True}):
        with pytest.raises(UnsupportedFormatError, match="bit width is an integer") as info:
            read_format(qc)
        assert "mixed" not in str(info.value)


def test_refusals_are_invalid_problems_too() -> None:
    # Callers that caught InvalidProblemError for a bad quant_method keep working.
    with pytest.raises(InvalidProblemError, match=re.escape("quant_method='exl2'")):
        read_format({"quant_method": "exl2"})


def test_values_of_the_wrong_type_are_named() -> None:
    with pytest.raises(InvalidProblemError, match="desc_act must be true or false"):
        read_format({**GPTQ, "desc_act": "yes"})
    with pytest.raises(InvalidProblemError, match="quantization_config must be an object"):
        read_format(42)
