"""benchmarks/gpu.py in its smoke mode: the tiny model on the CPU, every method, the JSON the GPU run writes."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import gpu


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu") / "gpu_smoke.json"
    assert gpu.main(["--smoke", "--repeats", "2", "--out", str(out)]) == 0
    return out, json.loads(out.read_text())


def test_smoke_run_measures_every_method_at_every_group(smoke):
    _, result = smoke
    assert result["finished"] and result["smoke"] and result["config"]["num_hidden_layers"] == 2
    methods = gpu.SMOKE_METHODS.split(",")
    assert result["settings"]["methods"] == methods
    cells = {(c["batch"], c["context"], c["method"]): c for c in result["cells"]}
    assert set(cells) == {(b, n, m) for b, n in gpu.parse_groups(gpu.SMOKE_GROUPS) for m in methods}
    for cell in cells.values():
        assert cell["status"] == "ok", cell
        assert cell["prefill_s"] > 0 and cell["decode_s_per_token"] > 0 and cell["held_bytes"] > 0
        assert len(cell["samples"][0]["decode_steps_s"]) == 1 + 4  # warm-up and timed steps
        # the best of the repeats' decoding times beside their median
        assert cell["decode_best_s_per_token"] == min(s["decode_s_per_token"] for s in cell["samples"])
        assert cell["decode_best_s_per_token"] <= cell["decode_s_per_token"]
        if cell["method"] != "unpatched":
            assert set(cell["vs_unpatched"]) >= {"prefill_s", "decode_s_per_token", "decode_best_s_per_token"}
            assert "held_bytes" in cell["vs_unpatched"]
    # the first group is measured twice (interleaved), the others once; the figures are medians
    assert cells[1, 96, "think-0.5"]["repeats"] == 2 and cells[1, 160, "think-0.5"]["repeats"] == 1
    for n in (96, 160):
        unpatched, dynamic = cells[1, n, "unpatched"], cells[1, n, "dynamic"]
        assert unpatched["held_bytes"] == dynamic["held_bytes"] and dynamic["vs_unpatched"]["held_bytes"] == 1
        assert cells[1, n, "think-0.5"]["held_bytes"] < dynamic["held_bytes"]
        # half the key channels, plus the other half of the question's 32 tokens, kept aside for a later prompt
        assert cells[1, n, "think-0.5"]["held_vs_dense"] == pytest.approx(0.75 + 32 * 0.25 / n, abs=0.02)
        assert cells[1, n, "think-0.5+int4"]["held_bytes"] < cells[1, n, "think-0.5"]["held_bytes"]
    assert cells[1, 160, "snapkv-64+think-0.5"]["held_bytes"] < cells[1, 160, "think-0.5"]["held_bytes"]
    assert cells[2, 96, "dynamic"]["held_bytes"] == 2 * cells[1, 96, "dynamic"]["held_bytes"]


def test_smoke_table_and_plot(smoke, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path, result = smoke
    copy = tmp_path / "gpu_copy.json"
    copy.write_text(path.read_text())
    assert gpu.main(["--plot-only", str(copy)]) == 0
    assert (tmp_path / "gpu_copy.png").stat().st_size > 10_000
    printed = capsys.readouterr().out
    think = {(c["context"], c["method"]): c for c in result["cells"]}[96, "think-0.5"]
    row = next(line for line in printed.splitlines() if line.startswith("| 1 | 96 | think-0.5 |"))
    assert f"({think['vs_unpatched']['held_bytes']:.2f}x)" in row


def test_a_spent_budget_skips_cells_and_still_writes_the_json(tmp_path):
    out = tmp_path / "spent.json"
    assert gpu.main(["--smoke", "--budget-s", "0", "--groups", "1x96", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["finished"] and {c["status"] for c in result["cells"]} == {"skipped"}


def test_failures_are_recorded_not_raised():
    def oom():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 16.00 GiB")

    assert gpu.run_one(oom) == {"status": "oom", "error": "CUDA out of memory. Tried to allocate 16.00 GiB"}
    assert gpu.run_one(lambda: 1 / 0)["error"].startswith("ZeroDivisionError")
    cell = {"samples": [{"status": "oom", "error": "out"}]}
    gpu.merge(cell)
    assert cell["status"] == "oom" and cell["repeats"] == 0
    cells = [cell | {"batch": 1, "context": 8, "method": "unpatched"}]
    gpu.add_ratios(cells)  # no baseline: no ratios, no error
    assert "vs_unpatched" not in cells[0]


def test_groups_schedule_and_estimates():
    assert gpu.parse_groups("1x8k, 8x8k,1x128k,2x96") == [(1, 8192), (8, 8192), (1, 131072), (2, 96)]
    plan = gpu.schedule([(1, 8), (8, 8)], ["unpatched", "think-0.5", "dynamic"], 2, ["static-compiled"])
    assert plan == [
        (0, 1, 8, "unpatched"),
        (0, 1, 8, "think-0.5"),
        (0, 1, 8, "dynamic"),
        (0, 8, 8, "unpatched"),
        (0, 8, 8, "think-0.5"),
        (0, 8, 8, "dynamic"),
        (0, 1, 8, "static-compiled"),
        (1, 1, 8, "think-0.5"),
        (1, 1, 8, "dynamic"),
        (1, 1, 8, "unpatched"),
    ]
    history = [
        {"method": "unpatched", "batch": 1, "context": 8192, "prefill_s": 0.3, "cell_s": 1.5},
        {"method": "h2o-2048+think-0.5", "batch": 1, "context": 8192, "prefill_s": 2.3, "cell_s": 3.5},
    ]
    assert gpu.estimate_s([], "dynamic", 1, 8192) is None
    assert gpu.estimate_s(history, "unpatched", 1, 8192) == pytest.approx(1.15 * 1.5 + 1)
    h2o = gpu.estimate_s(history, "h2o-2048+think-0.5", 1, 32768)
    assert h2o > 1.15 * 2.3 * 16  # quadratic prefill
    # a method not yet run is guessed from the baseline, with room to spare
    assert gpu.estimate_s(history, "think-0.5", 1, 32768) > gpu.estimate_s(history, "unpatched", 1, 32768)


def test_compiled_methods_name_their_cache():
    assert gpu.is_compiled("think-0.5+static-compiled") and gpu.is_compiled("static-compiled")
    assert not gpu.is_compiled("think-0.5+static") and not gpu.is_compiled("think-0.5")
    assert gpu.cache_name("snapkv-64+think-0.5+static-compiled") == "snapkv-64+think-0.5+static"
    args = gpu.parse_args(
        ["--smoke", "--compile", "--methods", "unpatched,think-0.5,snapkv-64+think-0.5+static-compiled"]
    )
    plan = gpu.schedule([(1, 8)], ["unpatched", "think-0.5"], 1, ["snapkv-64+think-0.5+static-compiled"])
    assert plan[-1] == (0, 1, 8, "snapkv-64+think-0.5+static-compiled") and args.methods[-1].endswith("-compiled")


@pytest.mark.slow
def test_compiled_static_think_cell():
    """A compiled static ThinK cache decodes in a child process (about 40 s of compiling on this CPU), with its
    bytes below transformers' StaticCache."""
    args = gpu.parse_args(["--smoke"])
    row = gpu.measure_in_child(args, "think-0.5+static-compiled", 1, 96, timeout_s=300)
    assert row["status"] == "ok", row
    assert row["compile_s"] > row["decode_s_per_token"] > 0
    assert len(row["decode_steps_s"]) == 3 + 4  # a compiled cell warms up three steps at least
    static = gpu.measure_in_child(args, "static", 1, 96, timeout_s=120)
    assert row["held_bytes"] < static["held_bytes"]


def test_profile_step_counts_ops():
    model, _ = gpu.build_model(smoke=True, device="cpu")
    row = gpu.measure(model, "think-0.5", 1, 64, 2, 1, profile=True)
    assert row["kernels_per_step"] == 0 and row["aten_ops_per_step"] > 10  # no CUDA here: no kernels
    functions = {r["function"].rsplit("(", 1)[-1]: r for r in row["host_profile"]}
    assert functions["think_attention)"]["calls"] == 2  # per step: once per layer
    assert functions["think_attention)"]["cumulative_us"] >= functions["think_attention)"]["own_us"] > 0


def test_child_process_cell_and_its_timeout():
    args = gpu.parse_args(["--smoke"])
    row = gpu.measure_in_child(args, "static", 1, 64, timeout_s=120)
    assert row["status"] == "ok" and row["decode_s_per_token"] > 0 and row["child_s"] > 0
    assert gpu.measure_in_child(args, "static", 1, 64, timeout_s=0.5)["status"] == "timeout"


def test_a_method_failing_in_the_warm_up_does_not_stop_the_run(monkeypatch):
    # on the H100 a quantized method once raised inside the warm-up, which then ended the whole run
    real = gpu.measure

    def measure(model, method, *args, **kwargs):
        if method.endswith("+int4"):
            raise NotImplementedError("\"bitwise_and_cuda\" not implemented for 'Float'")
        return real(model, method, *args, **kwargs)

    monkeypatch.setattr(gpu, "measure", measure)
    model, _ = gpu.build_model(smoke=True, device="cpu")
    assert gpu.warm_up(model, smoke=True) > 0
