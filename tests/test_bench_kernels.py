"""bench/kernels.py on the CPU: its candidates are configs every family can build, the columns
name the right family, and the same-run peer figures land in the right cells (or are refused
when they were taken on another card)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
from gemmtune.kernels.config import STREAM, TILED, WGMMA, wgmma_violation

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def kb() -> ModuleType:
    sys.path.insert(0, str(BENCH))  # the script imports its sibling report.py
    try:
        spec = importlib.util.spec_from_file_location("bench_kernels", BENCH / "kernels.py")
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(BENCH))


def test_every_family_has_candidates_and_each_key_names_its_family(kb: ModuleType) -> None:
    sets = {"decode": kb.candidates(), "tiled": kb.tiled_candidates(),
            "wgmma": kb.wgmma_candidates(), "stream": kb.stream_candidates()}
    kinds = {"tiled": TILED, "wgmma": WGMMA, "stream": STREAM}
    for family, cands in sets.items():
        assert cands, family
        assert len({c.variant_key() for c in cands}) == len(cands), f"{family}: repeated variants"
        for c in cands:
            assert kb.family_of(c.variant_key()) == family
            if family in kinds:
                assert c.kernel == kinds[family]
    for c in sets["wgmma"]:
        assert wgmma_violation(4, c.wgmma_m, c.wgmma_n, c.wgmma_k, c.wgmma_stages) is None
    assert {c.wgmma_k for c in sets["wgmma"]} == {64, 128}


def test_peers_fill_their_cells_and_another_card_is_refused(kb: ModuleType) -> None:
    rows = [{"K": 4096, "N": 4096, "M": m, "fp16_us": 9.0, "dispatch_us": 8.0} for m in (1, 16)]
    peers = [{"K": 4096, "N": 4096, "M": 16, "marlin_us": 11.234, "exl_default_us": 12.0, "fp16_us": 9.5},
             {"K": 8192, "N": 8192, "M": 1, "marlin_us": 1.0}]
    kb.merge_peers(rows, peers, "NVIDIA H100 80GB HBM3", "NVIDIA H100 80GB HBM3")
    assert rows[1] == {"K": 4096, "N": 4096, "M": 16, "fp16_us": 9.0, "dispatch_us": 8.0,
                            "marlin_us": 11.23, "exl_us": 12.0, "peer_fp16_us": 9.5}
    assert (rows[0]["marlin_us"], rows[0]["exl_us"], rows[0]["peer_fp16_us"]) == (None, None, None)
    with pytest.raises(ValueError, match="H200"):
        kb.merge_peers(rows, peers, "NVIDIA H200", "NVIDIA H100 80GB HBM3")


def test_merge_puts_later_peers_into_a_written_table(kb: ModuleType, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    table = {"device": {"name": "NVIDIA H100 80GB HBM3"}, "command": "python bench/kernels.py",
             "rows": [{"K": 4096, "N": 4096, "M": 16, "dispatch_us": 8.0}]}
    (tmp_path / "kernels.json").write_text(json.dumps(table))
    (tmp_path / "peer.json").write_text(json.dumps([{"K": 4096, "N": 4096, "M": 16, "marlin_us": 7.5}]))
    (tmp_path / "peer_meta.json").write_text(json.dumps({"device": "NVIDIA H100 80GB HBM3"}))
    out = tmp_path / "merged.json"
    argv = ["kernels.py", "--merge", str(tmp_path / "kernels.json"), "--peers", str(tmp_path / "peer.json"),
            "-o", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    assert kb.main() == 0
    assert json.loads(out.read_text())["rows"][0]["marlin_us"] == 7.5
    (tmp_path / "peer_meta.json").write_text(json.dumps({"device": "NVIDIA H200"}))
    monkeypatch.setattr(sys, "argv", argv[:-1] + [str(tmp_path / "other.json")])
    assert kb.main() == 2
    assert not (tmp_path / "other.json").exists()


def _run(card: str, cells: list[tuple[int, int, int]], build: str = "abc", complete: bool = True) -> dict:
    return {"device": {"name": card}, "kernel_hash": build, "command": f"python bench/kernels.py {len(cells)}",
            "ceilings": {"read_bandwidth_TBps": 3.0}, "seconds": 10.0, "complete": complete,
            "rows": [{"K": k, "N": n, "M": m, "dispatch_us": 1.0} for k, n, m in cells],
            "fused_by_variant": {f"{k}x{n}": {"v": {}} for k, n, _ in cells},
            "recon_by_chunk": {}, "plans": {f"{k}x{n}": [] for k, n, _ in cells}}


def test_a_table_measured_in_pieces_joins_into_one(kb: ModuleType, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    h100 = "NVIDIA H100 80GB HBM3"
    (tmp_path / "a.json").write_text(json.dumps(_run(h100, [(4096, 4096, 1), (4096, 4096, 16)])))
    (tmp_path / "b.json").write_text(json.dumps(_run(h100, [(8192, 57344, 16)], complete=False)))
    (tmp_path / "peer.json").write_text(json.dumps([{"K": 8192, "N": 57344, "M": 16, "marlin_us": 97.4}]))
    (tmp_path / "peer_meta.json").write_text(json.dumps({"device": h100}))
    out = tmp_path / "joined.json"
    monkeypatch.setattr(sys, "argv", ["kernels.py", "--merge", str(tmp_path / "a.json"), str(tmp_path / "b.json"),
                                      "--peers", str(tmp_path / "peer.json"), "-o", str(out)])
    assert kb.main() == 0
    joined = json.loads(out.read_text())
    assert [(r["K"], r["M"]) for r in joined["rows"]] == [(4096, 1), (4096, 16), (8192, 16)]
    assert joined["rows"][2]["marlin_us"] == 97.4 and joined["rows"][0]["marlin_us"] is None
    assert set(joined["plans"]) == {"4096x4096", "8192x57344"}
    assert len(joined["ceilings_by_run"]) == 2 and joined["seconds"] == 20.0
    assert joined["complete"] is False  # one piece was cut short


@pytest.mark.parametrize("other, why", [
    (_run("NVIDIA H200", [(8192, 8192, 1)]), "two cards"),
    (_run("NVIDIA H100 80GB HBM3", [(8192, 8192, 1)], build="def"), "two kernel builds"),
    (_run("NVIDIA H100 80GB HBM3", [(4096, 4096, 16)]), "in two runs"),
])
def test_pieces_from_another_card_build_or_twice_the_same_cell_are_refused(
        kb: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        other: dict, why: str) -> None:
    import json

    (tmp_path / "a.json").write_text(json.dumps(_run("NVIDIA H100 80GB HBM3", [(4096, 4096, 16)])))
    (tmp_path / "b.json").write_text(json.dumps(other))
    out = tmp_path / "joined.json"
    monkeypatch.setattr(sys, "argv", ["kernels.py", "--merge", str(tmp_path / "a.json"), str(tmp_path / "b.json"),
                                      "-o", str(out)])
    assert kb.main() == 2
    assert why in capsys.readouterr().err
    assert not out.exists()
