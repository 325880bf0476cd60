"""Projections that read one input run as one GEMM (issue 23, runtime/fusion.py), without a GPU.

What a user relies on: a loaded Llama / Qwen2 computes q/k/v and gate/up with one GEMM each
and still gives the unfused model's logits; its module tree and state dict are the checkpoint's;
`fuse=False` opts out; a member called on its own is right; nothing is left holding outputs
after a forward; members that cannot share a GEMM (act-order permutations that differ, mixed
bits) stay separate and the report says why; `torch.compile(fullgraph=True)` traces one op per
group; and `gemmtune tune --model` / `resolve` name the very GEMMs the runtime launches.

The CPU reference path runs the same group code as the GPU (stash, compile memo, one dense
GEMM over the concatenated columns). Where the GPU's single copy of the weight matters, the
group's layout is built on the host (`QuantizedWeight(..., allow_cpu=True)`, as
tests/test_weight_residency.py does); tests/test_fusion_gpu.py runs it all on the GPU.
"""

from __future__ import annotations

import copy
import gc
import inspect
import io
import json
import pickle
import re
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from gemmtune.autotune.models import model_layers, unique_problems
from gemmtune.kernels.fusion import (
    FUSED_PROJECTIONS,
    fused_problem,
    projection_groups,
    why_not_fused,
)
from gemmtune.kernels.gptq import quantize
from gemmtune.kernels.problem import Problem
from gemmtune.kernels.weights import QuantizedWeight
from gemmtune.runtime import (
    QuantLinear,
    describe,
    fuse_projections,
    fusion,
    launched_problems,
    load_quantized,
    patch,
    quantize_model,
)
from gemmtune.runtime.quant_linear import GPTQ_BUFFERS
from safetensors.torch import save_file
from torch import nn

from gemmtune.cli import main
from tests.test_client_llama import _awq_model
from tests.test_client_llama import awq_checkpoint as awq_checkpoint  # a fixture, used by name
from tests.tiny_llama import tiny_llama, tiny_llama_config

transformers = pytest.importorskip("transformers")

OP = torch.ops.gemmtune.quant_linear.default
QC = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False, "sym": False,
      "checkpoint_format": "gptq"}
ATTN = ("q_proj", "k_proj", "v_proj")
MLP = ("gate_proj", "up_proj")


# -- models -----------------------------------------------------------------------------------------

def tiny_qwen2(seed: int) -> Any:
    """A tiny transformers Qwen2 (q/k/v with biases, GQA), like tiny_llama."""
    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                   max_position_embeddings=64, tie_word_embeddings=False)
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # transformers initialises biases to zero: make them matter
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    return model


def quantize_like_gptq(model: nn.Module, act_order: bool, seed: int = 2) -> None:
    """Every linear but the head replaced by a QuantLinear (RTN, 4-bit, group 32), unfused. With
    `act_order`, linears that read the same input share one row permutation, as GPTQ gives them
    (one Hessian per input): the permutation is drawn from a seed per (parent, input size)."""
    for name, lin in [(n, m) for n, m in model.named_modules()
                      if isinstance(m, nn.Linear) and not n.endswith("lm_head")]:
        parent, _, child = name.rpartition(".")
        shared = child in ATTN or child in MLP
        key = f"{parent}/{lin.in_features}" if shared else name
        gen = torch.Generator().manual_seed(seed + zlib.crc32(key.encode()))
        t = quantize(lin.weight.detach().t().contiguous().float(), 4, 32, act_order, generator=gen)
        setattr(model.get_submodule(parent), child, QuantLinear.from_gptq_tensors(t, lin.bias))


def pair(build: Any, act_order: bool = False) -> tuple[Any, Any]:
    """(fused, unfused) copies of one quantized model."""
    unfused = build(1)
    quantize_like_gptq(unfused, act_order)
    fused = copy.deepcopy(unfused)
    made = fuse_projections(fused)
    assert len(made.groups) == 4 and not made.separate  # 2 decoder layers x (attention, MLP)
    return fused, unfused


def _ids(seed: int, shape: tuple[int, int] = (2, 12)) -> torch.Tensor:
    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed))


def _gemms(model: nn.Module) -> int:
    return sum(launched_problems(model).values())


# -- the rule ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("model_type", sorted(FUSED_PROJECTIONS))
def test_each_listed_architecture_calls_each_group_on_one_tensor(model_type: str) -> None:
    """The rule's claim, read from the installed transformers source: for every group of the
    architecture some class's forward calls all its members, each on the same variable."""
    import importlib

    mod = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    sources = [inspect.getsource(c.forward) for _, c in inspect.getmembers(mod, inspect.isclass)
               if c.__module__ == mod.__name__ and issubclass(c, nn.Module) and "forward" in c.__dict__]
    for group in projection_groups(model_type):
        callers = []
        for src in sources:
            args = {name: re.findall(rf"self\.{name}\(([^()]*)\)", src) for name in group}
            if all(args.values()):
                callers.append({a.strip() for found in args.values() for a in found})
        assert callers, f"{model_type}: no class calls {group}"
        assert all(len(inputs) == 1 for inputs in callers), f"{model_type}: {group} read {callers}"


def test_the_architecture_comes_from_the_module_class() -> None:
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP

    class MyAttention(LlamaAttention):  # a user's subclass is still a Llama attention
        pass

    llama, qwen = tiny_llama(0), tiny_qwen2(0)
    assert fusion.model_type_of(llama.model.layers[0].self_attn) == "llama"
    assert fusion.model_type_of(llama.model.layers[0].mlp) == "llama"
    assert fusion.model_type_of(qwen.model.layers[0].self_attn) == "qwen2"
    assert fusion.model_type_of(MyAttention(tiny_llama_config(), 0)) == "llama"
    assert issubclass(LlamaMLP, nn.Module)
    assert fusion.model_type_of(nn.Linear(4, 4)) is None
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=64, n_head=2))
    assert all(fusion.model_type_of(m) is None for m in gpt2.modules())  # not a listed architecture


def test_quantization_decides_whether_problems_can_share_a_gemm() -> None:
    q, kv = Problem(4096, 4096), Problem(4096, 1024)
    assert why_not_fused([q, kv, kv]) is None
    assert fused_problem([q, kv, kv]) == Problem(4096, 6144)
    assert "fewer than two" in why_not_fused([q])
    assert "quantization differs" in why_not_fused([q, Problem(4096, 1024, 8)])
    assert "quantization differs" in why_not_fused([q, Problem(4096, 1024, 4, 64)])
    assert "act-order" in why_not_fused([q, Problem(4096, 1024, act_order=True)])
    assert "in_features" in why_not_fused([q, Problem(2048, 1024)])
    assert "no CUDA kernel" in why_not_fused([Problem(4096, 4096, 3), Problem(4096, 1024, 3)])
    # 8-bit N must be a multiple of 4 only; an offset that is not a whole column tile is refused
    assert "multiple of 32" in why_not_fused([Problem(4096, 1028, 8), Problem(4096, 1024, 8)])
    assert why_not_fused([Problem(4096, 1024, 8), Problem(4096, 1028, 8)]) is None  # last may be odd


# -- a fused model computes what the unfused one does ---------------------------------------------

@pytest.mark.parametrize("build, act_order", [(tiny_llama, False), (tiny_llama, True), (tiny_qwen2, False)],
                         ids=["llama", "llama-act-order", "qwen2-biases"])
def test_fused_and_unfused_models_give_the_same_logits(build: Any, act_order: bool) -> None:
    fused, unfused = pair(build, act_order)
    assert _gemms(unfused) == 14 and _gemms(fused) == 8  # q k v o gate up down -> qkv o gate_up down
    with torch.no_grad():
        for ids in (_ids(0), _ids(1, (1, 1))):
            torch.testing.assert_close(fused(ids).logits, unfused(ids).logits, rtol=1e-5, atol=1e-5)
    assert getattr(fusion._local, "entry", None) is None  # every stashed output was taken


def test_the_module_tree_and_state_dict_are_the_unfused_models() -> None:
    fused, unfused = pair(tiny_qwen2)
    assert [(n, type(m)) for n, m in fused.named_modules()] == \
        [(n, type(m)) for n, m in unfused.named_modules()]
    k = fused.model.layers[0].self_attn.k_proj
    assert isinstance(k, QuantLinear) and k.fused_group is not None and k.out_features == 64
    got, want = fused.state_dict(), unfused.state_dict()
    assert list(got) == list(want)
    assert all(torch.equal(got[key], want[key]) and got[key].dtype == want[key].dtype for key in want)
    # and the checkpoint it saves loads into an unfused model
    fresh = tiny_qwen2(9)
    quantize_like_gptq(fresh, False, seed=99)
    fresh.load_state_dict(got)
    with torch.no_grad():
        torch.testing.assert_close(fresh(_ids(2)).logits, unfused(_ids(2)).logits, rtol=0, atol=0)


def test_members_called_on_their_own_or_in_any_order_are_right() -> None:
    fused, unfused = pair(tiny_qwen2)
    f, u = fused.model.layers[1].self_attn, unfused.model.layers[1].self_attn
    x = torch.randn(3, 5, 128)
    with torch.no_grad():
        want = {n: getattr(u, n)(x) for n in ATTN}
        assert torch.equal(f.k_proj(x), want["k_proj"])  # alone
        for order in (("v_proj", "q_proj", "k_proj"), ("k_proj", "k_proj", "v_proj")):
            for n in order:
                assert torch.equal(getattr(f, n)(x), want[n]), (order, n)
        fusion.clear_stash()
        assert torch.equal(f.q_proj(x), want["q_proj"])
        y = torch.randn(3, 5, 128)  # another tensor: k must not be served q's input's columns
        assert torch.equal(f.k_proj(y), u.k_proj(y))
        f.q_proj(x)
        x.mul_(2)  # an in-place edit after q ran: k must see the new values
        assert torch.equal(f.k_proj(x), u.k_proj(x))
        for dtype in (torch.float16, torch.bfloat16):
            xh = x.to(dtype)
            for n in ATTN:
                got = getattr(f, n)(xh)
                assert got.dtype == dtype
                assert torch.equal(got, getattr(u, n)(xh))


def test_no_output_outlives_its_input() -> None:
    fused, _ = pair(tiny_llama)
    attn, mlp = fused.model.layers[0].self_attn, fused.model.layers[0].mlp
    with torch.no_grad():
        x = torch.randn(2, 128)
        attn.q_proj(x)  # k and v wait for their call
        assert fusion._local.entry is not None and fusion._local.entry[0] is attn.q_proj.fused_group
        mlp.gate_proj(x)  # another group computes: one stash at a time
        assert fusion._local.entry[0] is mlp.gate_proj.fused_group
        del x
        gc.collect()
        assert fusion._local.entry is None  # the input is gone: so are the outputs kept for it
        fused(_ids(3))
    assert fusion._local.entry is None


def test_fuse_false_runs_every_projection_alone(tmp_path: Path) -> None:
    model = tiny_llama(1)
    quantize_model(model, bits=4, group_size=32, generator=torch.Generator().manual_seed(2), fuse=False)
    assert _gemms(model) == 14 and all(m.fused_group is None for m in model.modules()
                                       if isinstance(m, QuantLinear))
    path = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    for fuse, gemms in ((True, 8), (False, 14)):
        loaded = tiny_llama(4)
        rep = load_quantized(loaded, path, QC, fuse=fuse)
        assert _gemms(loaded) == gemms and len(rep) == 14
        with torch.no_grad():
            torch.testing.assert_close(loaded(_ids(5)).logits, model(_ids(5)).logits, rtol=1e-5, atol=1e-5)


def test_patch_fuses_foreign_gptq_modules_and_reports_it(tmp_path: Path) -> None:
    from tests.test_client_llama import _autogptq_model

    model = tiny_llama(1)
    quantize_model(model, bits=4, group_size=32, generator=torch.Generator().manual_seed(2))
    path = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    client = _autogptq_model(path)
    rep = patch(client, QC)
    assert _gemms(client) == 8 and not rep.separate
    k = next(r for r in rep if r.name == "model.layers.0.self_attn.k_proj")
    assert k.problem_key == "128x64-b4-g32" and k.fused == "128x256-b4-g32"
    assert {r.fused for r in rep if r.name.endswith(("gate_proj", "up_proj"))} == {"128x512-b4-g32"}
    assert all(r.fused == "" for r in rep if r.name.endswith(("o_proj", "down_proj")))
    assert [(r.name, r.fused) for r in describe(client)] == [(r.name, r.fused) for r in rep]
    with torch.no_grad():
        torch.testing.assert_close(client(_ids(6)).logits, model(_ids(6)).logits, rtol=1e-5, atol=1e-5)


def test_members_that_cannot_share_a_gemm_stay_separate_with_the_reason() -> None:
    # quantize_model's RTN act-order draws one permutation per layer: q, k, v all differ
    model = tiny_llama(1)
    quantize_model(model, bits=4, group_size=32, act_order=True, generator=torch.Generator().manual_seed(2),
                   fuse=False)
    made = fuse_projections(model)
    assert not made.groups and len(made.separate) == 4
    assert all("g_idx" in why for _, why in made.separate)
    # mixed bits: an 8-bit k_proj
    model = tiny_llama(1)
    quantize_like_gptq(model, False)
    attn = model.model.layers[0].self_attn
    w = torch.randn(128, 64)
    attn.k_proj = QuantLinear.from_gptq_tensors(quantize(w, 8, 32))
    made = fuse_projections(model)
    assert len(made.groups) == 3
    names, why = made.separate[0]
    assert names[1] == "model.layers.0.self_attn.k_proj" and "quantization differs" in why
    assert attn.q_proj.fused_group is None and model.model.layers[0].mlp.up_proj.fused_group is not None


@pytest.mark.usefixtures("awq_checkpoint")
def test_awq_checkpoints_fuse_and_match_their_oracle(request: pytest.FixtureRequest) -> None:
    path, oracle = request.getfixturevalue("awq_checkpoint")
    client = _awq_model(path, "w_bit")
    rep = patch(client)
    assert _gemms(client) == 8 and not rep.separate
    with torch.no_grad():
        torch.testing.assert_close(client(_ids(7)).logits, oracle(_ids(7)).logits, rtol=1e-4, atol=1e-4)


# -- one copy of the weight (the group's layout built on the host) ---------------------------------

def hold_on_host(group: fusion.FusedGroup) -> QuantizedWeight:
    """What a CUDA build does, minus the kernels: one layout of the concatenated columns, each
    member holding its columns as a view of it."""
    members = group.members()
    assert members is not None
    qw = QuantizedWeight(fusion.concat_columns([m.gptq_tensors() for m in members]), "cpu", allow_cpu=True)
    for m, (a, b) in zip(members, group.spans, strict=True):
        m._adopt(qw.columns(a, b))
    return qw


def _held_pair(act_order: bool = False) -> tuple[Any, Any, list[QuantizedWeight]]:
    fused, unfused = pair(tiny_qwen2, act_order)
    groups = list(dict.fromkeys(m.fused_group for m in fused.modules()
                                if isinstance(m, QuantLinear) and m.fused_group is not None))
    return fused, unfused, [hold_on_host(g) for g in groups]


@pytest.mark.parametrize("act_order", [False, True])
def test_members_hold_only_views_of_one_layout_and_save_their_own_tensors(act_order: bool) -> None:
    fused, unfused, layouts = _held_pair(act_order)
    members = [m for m in fused.modules() if isinstance(m, QuantLinear) and m.fused_group is not None]
    assert len(members) == 10
    for m in members:
        assert all(getattr(m, b) is None for b in GPTQ_BUFFERS)
        assert m._qw.view_of is not None and any(m._qw.view_of is qw for qw in layouts)
        assert m._qw.qweight.untyped_storage().data_ptr() == m._qw.view_of.qweight.untyped_storage().data_ptr()
    # resident bytes: the members' views partition their layout exactly (tests/test_fusion_gpu.py
    # checks the whole against the packed size on real shapes)
    assert sum(m.resident_bytes() for m in members) == sum(qw.nbytes() for qw in layouts)
    got, want = fused.state_dict(), unfused.state_dict()
    assert list(got) == list(want)
    assert all(torch.equal(got[k], want[k]) for k in want)  # each member's own GPTQ tensors, bit for bit
    with torch.no_grad():
        torch.testing.assert_close(fused(_ids(8)).logits, unfused(_ids(8)).logits, rtol=1e-5, atol=1e-5)


def test_copies_and_pickles_of_a_fused_model_are_fused_models_of_their_own() -> None:
    fused, unfused, _ = _held_pair()
    buf = io.BytesIO()
    torch.save(fused, buf)
    buf.seek(0)
    for other in (copy.deepcopy(fused), pickle.loads(pickle.dumps(fused)),
                  torch.load(buf, weights_only=False)):
        k, ok = other.model.layers[0].self_attn.k_proj, fused.model.layers[0].self_attn.k_proj
        g = k.fused_group
        assert g is not None and g is not ok.fused_group
        assert g.members() == [getattr(other.model.layers[0].self_attn, n) for n in ATTN]
        assert _gemms(other) == 8
        with torch.no_grad():
            torch.testing.assert_close(other(_ids(9)).logits, unfused(_ids(9)).logits, rtol=1e-5, atol=1e-5)
    # a member copied alone runs alone
    lone = copy.deepcopy(fused.model.layers[0].self_attn.v_proj)
    x = torch.randn(2, 128)
    with torch.no_grad():
        assert torch.equal(lone(x), unfused.model.layers[0].self_attn.v_proj(x))


def test_loading_a_state_dict_into_a_fused_model_changes_what_it_computes() -> None:
    fused, unfused, _ = _held_pair()
    other = tiny_qwen2(3)
    quantize_like_gptq(other, False, seed=33)
    sd = other.state_dict()
    fused.load_state_dict(sd)
    unfused.load_state_dict(sd)
    assert all(torch.equal(v, sd[k]) for k, v in fused.state_dict().items())
    with torch.no_grad():
        torch.testing.assert_close(fused(_ids(10)).logits, other(_ids(10)).logits, rtol=1e-5, atol=1e-5)
    assert _gemms(fused) == 8


def test_a_deleted_member_dissolves_its_group() -> None:
    fused, unfused = pair(tiny_llama)
    attn = fused.model.layers[0].self_attn
    group = attn.q_proj.fused_group
    attn.v_proj = copy.deepcopy(unfused.model.layers[0].self_attn.v_proj)  # the old v is freed
    gc.collect()
    x = torch.randn(2, 128)
    with torch.no_grad():
        assert torch.equal(attn.q_proj(x), unfused.model.layers[0].self_attn.q_proj(x))
    assert attn.q_proj.fused_group is None and group.reason is not None


# -- torch.compile ----------------------------------------------------------------------------------

@pytest.fixture
def fresh_dynamo() -> Any:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _outputs(explanation: Any) -> int:
    return sum(len(n.args[0]) for g in explanation.graphs for n in g.graph.nodes if n.op == "output")


@pytest.mark.usefixtures("fresh_dynamo")
def test_a_fused_llama_is_one_graph_with_one_op_per_gemm() -> None:
    fused, unfused = pair(tiny_llama)
    with torch.no_grad():
        ex = torch._dynamo.explain(fused)(_ids(0))
        base = torch._dynamo.explain(unfused)(_ids(0))
    assert ex.graph_break_count == 0 and ex.graph_count == 1, ex.break_reasons
    assert sum(1 for g in ex.graphs for n in g.graph.nodes if n.target is OP) == 8
    assert _outputs(ex) == _outputs(base)  # no fused output kept as an extra graph output
    assert fusion._TRACED.group is None


@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize("build", [tiny_llama, tiny_qwen2], ids=["llama", "qwen2"])
def test_fullgraph_compiled_fused_model_gives_eager_logits_without_recompiling(build: Any) -> None:
    fused, unfused = pair(build)
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(_ids(1)).logits, fused(_ids(1)).logits, rtol=0, atol=0)
        with torch._dynamo.config.patch(error_on_recompile=True):
            again = compiled(_ids(2)).logits
        torch.testing.assert_close(again, unfused(_ids(2)).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.usefixtures("fresh_dynamo")
def test_inductor_handles_column_views_written_in_place() -> None:
    """Inductor may compute the MLP's `act(gate) * up` into a dead input's buffer: with the
    members' outputs slices of one op output, it must know they share it."""
    fused, unfused = pair(tiny_llama)
    f, u = fused.model.layers[0].mlp, unfused.model.layers[0].mlp
    compiled = torch.compile(f, fullgraph=True)
    with torch.no_grad():
        for x in (torch.randn(3, 7, 128), torch.randn(1, 128)):
            torch.testing.assert_close(compiled(x), u(x), rtol=1e-5, atol=1e-5)


# -- the tuner and resolve name the GEMMs the runtime launches ----------------------------------

@pytest.fixture(scope="module")
def qwen_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-qwen2-gptq")
    model = tiny_qwen2(1)
    quantize_model(model, bits=4, group_size=32, generator=torch.Generator().manual_seed(2))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    config = json.loads(model.config.to_json_string())
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": QC}))
    return folder


@pytest.mark.parametrize("fuse, layout", [(True, "transformers"), (False, "separate")])
def test_tune_and_resolve_name_what_load_quantized_runs(qwen_checkpoint: Path, tmp_path: Path,
                                                        fuse: bool, layout: str) -> None:
    model = tiny_qwen2(4)
    load_quantized(model, qwen_checkpoint / "model.safetensors", fuse=fuse)
    running = launched_problems(model)
    assert sum(running.values()) == (8 if fuse else 14)
    assert unique_problems(model_layers(qwen_checkpoint, layout=layout)) == dict(running)
    out = CliRunner().invoke(main, ["resolve", "--config", str(qwen_checkpoint / "config.json"),
                                    "--layout", layout, "--json", "--fingerprint", "0123456789abcdef",
                                    "--db", f"sqlite:///{tmp_path / 'tuning.db'}"])
    assert out.exit_code == 0, out.output
    assert {la["problem_key"] for la in json.loads(out.stdout)["layers"]} == {p.key() for p in running}


def test_an_architecture_the_rule_does_not_know_is_tuned_and_run_separately(tmp_path: Path) -> None:
    cfg = {"model_type": "some_new_arch", "hidden_size": 128, "intermediate_size": 256,
           "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert {la.name for la in model_layers(tmp_path)} == {*ATTN, "o_proj", *MLP, "down_proj"}
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "mistral"}))
    assert {la.name for la in model_layers(tmp_path)} == {"q_proj+k_proj+v_proj", "o_proj",
                                                         "gate_proj+up_proj", "down_proj"}


# -- the build itself (what a CUDA device runs), with the layout on the host ----------------------

def _host_engine_prepare(monkeypatch: pytest.MonkeyPatch, fail: bool = False) -> list[int]:
    """`QuantLinear.prepare` of a group's engine builds its layout on the host (no kernels):
    `FusedGroup._build` then runs exactly as on a GPU. Returns the columns of each build."""
    builds: list[int] = []
    real = QuantLinear.prepare

    def prepare(self: QuantLinear, device: Any = None) -> Any:
        if self.fused_group is not None or self.device.type != "cpu":
            return real(self, device)
        if fail:
            raise RuntimeError("no memory for the fused layout")
        builds.append(self.out_features)
        self._hold(QuantizedWeight(self.gptq_tensors(), "cpu", allow_cpu=True))
        return None

    monkeypatch.setattr(QuantLinear, "prepare", prepare)
    return builds


def test_a_build_replaces_the_members_copies_by_views_of_one_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    builds = _host_engine_prepare(monkeypatch)
    fused, unfused = pair(tiny_qwen2)
    want = {k: v.clone() for k, v in fused.state_dict().items()}
    attn = fused.model.layers[0].self_attn
    g = attn.q_proj.fused_group
    assert g._build(g.members(), torch.device("cpu"), attn.q_proj)
    assert builds == [256] and g.engine is not None and all(g.serves(m) for m in g.members())
    assert all(getattr(m, b) is None for m in g.members() for b in GPTQ_BUFFERS)
    assert g.engine.bias is not None and torch.equal(g.engine.bias, torch.cat([m.bias for m in g.members()]))
    x = torch.randn(2, 3, 128)
    with torch.no_grad():
        for n in ATTN:  # through the engine now
            torch.testing.assert_close(getattr(attn, n)(x), getattr(unfused.model.layers[0].self_attn, n)(x),
                                       rtol=1e-5, atol=1e-5)
    got = fused.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    # a member reloaded: the engine goes, the siblings keep their views, the next build takes all
    attn.k_proj.load_state_dict(attn.k_proj.state_dict())
    assert g.engine is None and attn.q_proj._qw is not None and attn.k_proj.qweight is not None
    assert g._build(g.members(), torch.device("cpu"), attn.q_proj) and builds == [256, 256]
    assert all(torch.equal(v, want[k]) for k, v in fused.state_dict().items())


def test_a_failed_build_gives_the_members_their_tensors_back(monkeypatch: pytest.MonkeyPatch) -> None:
    _host_engine_prepare(monkeypatch, fail=True)
    fused, _ = pair(tiny_llama)
    want = {k: v.clone() for k, v in fused.state_dict().items()}
    mlp = fused.model.layers[1].mlp
    g = mlp.up_proj.fused_group
    with pytest.raises(RuntimeError, match="no memory"):
        g._build(g.members(), torch.device("cpu"), mlp.up_proj)
    assert g.engine is None and all(m.qweight is not None for m in g.members())
    assert all(torch.equal(v, want[k]) for k, v in fused.state_dict().items())


def test_the_group_op_passes_torch_opcheck() -> None:
    """The op over a group's handle: schema, fake against real (the group's full width), AOT."""
    fused, _ = pair(tiny_qwen2)
    g = fused.model.layers[0].self_attn.q_proj.fused_group
    for x in (torch.randn(2, 3, 128), torch.randn(5, 128).half()):
        torch.library.opcheck(OP, (x, g._op_handle, g.out_features))
