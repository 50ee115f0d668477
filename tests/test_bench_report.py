"""bench-report: the table, the prediction check and regression comparison."""

import json
import subprocess
import sys

import pytest

from capibara_export.bench_report import compare, load, prediction_check, rank_noise, rows


def _bench(name, group, median, **info):
    return {"fullname": f"bench/test_x.py::{name}", "group": group, "stats": {"median": median},
            "extra_info": {"timed": True, **info}}


def _write(path, medians):
    plans = {"replicated": 0.004, "dp": 0.001, "fsdp": 0.002, "hidden": 0.003}
    benchmarks = [_bench(f"test_plan[{p}]", "plans cpu-4x8 tiny", medians.get(p, predicted * 2),
                         unit={"entry": "encode_image", "plan": p, "precision": "fp32", "batch": 32},
                         predicted_s=predicted, binding="memory")
                  for p, predicted in plans.items()]
    benchmarks.append(_bench("test_runtime[tiny-caption-fp32-1]", "runtime tiny", 0.002,
                             unit={"entry": "caption", "plan": "single-device", "precision": "fp32", "batch": 1},
                             p90_s=0.0025, p99_s=0.003, mfu=0.05, items_per_s=10000, item="tokens",
                             achieved_flops_per_s=1e10, peer_ratio=12.5, predicted_s=0.004))
    path.write_text(json.dumps({"benchmarks": benchmarks}))
    return path


def test_table_and_rank_correlation(tmp_path):
    benches = load(_write(tmp_path / "a.json", {}))
    table = rows(benches)
    caption = next(r for r in table if r[1] == "caption")
    assert caption[4] == "1" and caption[5] == "2" and caption[-1] == "12.5x" and caption[9] == "5%"
    (check,) = prediction_check(benches)
    assert check["rho"] == pytest.approx(1.0) and [p[0] for p in check["plans"]][0] == "dp"
    # measured = 2 x predicted everywhere: every prediction is 50% under
    assert check["median_rel_error"] == pytest.approx(0.5) and check["overestimates"] == 0
    assert check["whole_program_rho"] is None   # recorded only by bench/test_plans.py
    shuffled = load(_write(tmp_path / "b.json", {"dp": 0.009, "replicated": 0.001}))
    assert prediction_check(shuffled)[0]["rho"] < 0.5


def test_whole_program_prediction_is_checked_beside_the_per_kernel_one(tmp_path):
    path = _write(tmp_path / "a.json", {})
    data = json.loads(path.read_text())
    for b in data["benchmarks"]:   # the whole-program figure: right order, every one 4x under
        if b["group"].startswith("plans"):
            b["extra_info"]["predicted_whole_program_s"] = b["stats"]["median"] / 4
    path.write_text(json.dumps(data))
    (check,) = prediction_check(load(path))
    assert check["whole_program_rho"] == pytest.approx(1.0)
    assert check["whole_program_median_rel_error"] == pytest.approx(0.75)
    assert check["median_rel_error"] == pytest.approx(0.5)


def test_rank_correlation_is_reported_with_the_timing_noise(tmp_path):
    """tiny bf16 score of 2026-11-28 in miniature: two plans whose timed rounds overlap, ranked
    the other way round by the model. The noise interval reaches both below and to 1, and the
    measurement against itself falls short of 1; plans far apart leave the figures at 1."""
    path = _write(tmp_path / "a.json", {})
    data = json.loads(path.read_text())
    rounds = {"dp": [0.036, 0.041, 0.043, 0.040, 0.039], "fsdp": [0.156, 0.168, 0.186, 0.160, 0.175],
              "replicated": [0.162, 0.183, 0.187, 0.180, 0.170], "hidden": [0.69, 0.70, 0.74, 0.70, 0.69]}
    predicted = {"dp": 0.044, "fsdp": 0.168, "replicated": 0.153, "hidden": 0.54}
    for b in data["benchmarks"]:
        plan = b["extra_info"]["unit"]["plan"]
        if plan in rounds:
            b["stats"]["median"] = sorted(rounds[plan])[2]
            b["extra_info"].update(rounds_s=rounds[plan], predicted_s=predicted[plan])
    path.write_text(json.dumps(data))
    (check,) = prediction_check(load(path))
    assert check["rho"] == pytest.approx(0.8)           # one swapped pair of four
    low, high = check["rho_interval"]
    assert low == pytest.approx(0.8) and high == pytest.approx(1.0)
    # a repeat swaps fsdp and replicated in some resamples (0.8), never anything else
    assert 0.85 < check["measurement_rho"] < 0.99
    shown = subprocess.run([sys.executable, "-m", "capibara_export", "bench-report", str(path)],
                           capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    assert "0.80 to 1.00 under the timing noise" in " ".join(shown.stdout.split())

    apart = rank_noise([1.0, 2.0, 3.0], [[1.0, 1.1, 0.9], [2.0, 2.1, 1.9], [3.0, 3.1, 2.9]])
    assert apart["interval"] == pytest.approx((1.0, 1.0)) and apart["self"] == pytest.approx(1.0)
    against = rank_noise([3.0, 2.0, 1.0], [[1.0, 1.1, 0.9], [2.0, 2.1, 1.9], [3.0, 3.1, 2.9]])
    assert against["interval"] == pytest.approx((-1.0, -1.0)) and against["self"] == pytest.approx(1.0)
    # two plans with the same rounds: a repeat orders them either way, and their medians tie
    tied = rank_noise([1.0, 2.0], [[1.0, 2.0, 3.0, 4.0, 5.0], [1.0, 2.0, 3.0, 4.0, 5.0]])
    assert tied["interval"] == pytest.approx((-1.0, 1.0)) and tied["self"] is None


def test_plans_timed_in_turns_rank_the_plans_where_the_run_has_them(tmp_path):
    """bench/test_plans.py's in-turns record for an entry is what the check ranks; the plans
    timed each alone (here swapped by a slow spell of the host) are reported beside it."""
    path = _write(tmp_path / "a.json", {"fsdp": 0.009})   # alone: fsdp measured after a slowdown
    data = json.loads(path.read_text())
    in_turns = {p: {"rounds_s": [m * 2, m * 2.1, m * 1.9], "predicted_s": m, "binding": "memory"}
                for p, m in {"replicated": 0.004, "dp": 0.001, "fsdp": 0.002, "hidden": 0.003}.items()}
    data["benchmarks"].append(_bench("test_plans_in_turns[tiny-fp32-encode_image]", "plans cpu-4x8 tiny", 0.02,
                                     unit={"entry": "encode_image", "plan": "in turns", "precision": "fp32"},
                                     in_turns=in_turns))
    path.write_text(json.dumps(data))
    benches = load(path)
    (check,) = prediction_check(benches)
    assert check["measured_in"] == "turns" and check["rho"] == pytest.approx(1.0)
    assert check["median_rel_error"] == pytest.approx(0.5)
    assert check["alone_rho"] == pytest.approx(0.4)          # fsdp from second to last
    assert [p[0] for p in check["plans"]] == ["dp", "fsdp", "hidden", "replicated"]
    assert check["rho_interval"] == pytest.approx((1.0, 1.0))
    assert any(r[2] == "in turns" for r in rows(benches))   # the turn itself is a row of the table
    shown = subprocess.run([sys.executable, "-m", "capibara_export", "bench-report", str(path)],
                           capture_output=True, text=True)
    text = " ".join(shown.stdout.split())
    assert shown.returncode == 0 and "(in turns)" in text and "each plan timed alone: rank correlation 0.40" in text
    data["benchmarks"].pop()                                   # an older file: plans timed alone only
    path.write_text(json.dumps(data))
    (alone,) = prediction_check(load(path))
    assert alone["measured_in"] == "alone" and alone["rho"] == pytest.approx(0.4) and alone["alone_rho"] is None


def test_rank_noise_is_absent_without_the_rounds(tmp_path):
    """Files from before the rounds were recorded: the check stands, without the interval."""
    (check,) = prediction_check(load(_write(tmp_path / "a.json", {})))
    assert check["rho_interval"] is None and check["measurement_rho"] is None


def test_compare_finds_regressions_beyond_the_threshold(tmp_path):
    old = load(_write(tmp_path / "old.json", {}))
    new = load(_write(tmp_path / "new.json", {"dp": 0.0021 * 1.2, "fsdp": 0.0041}))
    slower = compare(new, old, 0.10)
    assert [name.split("::")[-1] for name, _, _ in slower] == ["test_plan[dp]"]


def test_cli_exit_codes(tmp_path):
    old, new = _write(tmp_path / "old.json", {}), _write(tmp_path / "new.json", {"dp": 0.01})
    cmd = [sys.executable, "-m", "capibara_export", "bench-report"]
    ok = subprocess.run(cmd + [str(old), "--compare", str(old)], capture_output=True, text=True)
    assert ok.returncode == 0 and "Spearman rank correlation 1.00" in ok.stdout
    bad = subprocess.run(cmd + [str(new), "--compare", str(old)], capture_output=True, text=True)
    assert bad.returncode == 1 and "1 benchmark(s) slower" in bad.stderr
    missing = subprocess.run(cmd + [str(tmp_path / "nope.json")], capture_output=True, text=True)
    assert missing.returncode == 2 and "not found" in missing.stderr


def test_several_json_files_make_one_table(tmp_path):
    """`make bench` writes the runtime benchmarks (one CPU device) and the rest (32 simulated
    devices) to two files; one report shows both."""
    runtime = tmp_path / "runtime.json"
    runtime.write_text(json.dumps({"benchmarks": [_bench(
        "test_runtime[small-encode_image-fp32-1]", "runtime small", 0.04,
        unit={"entry": "encode_image", "plan": "single-device", "precision": "fp32", "batch": 1},
        peer_ratio=1.07, devices_in_process=1)]}))
    plans = _write(tmp_path / "out.json", {})
    result = subprocess.run([sys.executable, "-m", "capibara_export", "bench-report", str(runtime), str(plans)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "small" in result.stdout and "encode_image" in result.stdout and "1.07" in result.stdout
    assert "Spearman rank correlation 1.00" in result.stdout


def test_runtime_benchmarks_alone_run_on_one_cpu_device():
    """bench/conftest.py: only a run of bench/test_runtime.py alone gets one device."""
    from bench.conftest import _runtime_only

    assert _runtime_only(["bench/test_runtime.py"])
    assert _runtime_only(["bench/test_runtime.py::test_runtime"])
    assert not _runtime_only(["bench"])
    assert not _runtime_only(["tests", "bench"])
    assert not _runtime_only(["bench/test_runtime.py", "bench/test_plans.py"])
    assert not _runtime_only([])


def test_each_ranking_in_turns_runs_right_after_its_entrys_plans():
    """bench/conftest.py: the in-turns test takes over the plans its entry's tests compiled, so
    it must come right after the last of them (and never hold another entry's)."""
    from types import SimpleNamespace

    from bench.conftest import _turns_after_their_plans

    def item(name, entry, plan=None):
        params = {"model": "tiny", "precision": "fp32", "entry": entry, **({"plan": plan} if plan else {})}
        return SimpleNamespace(originalname=name, callspec=SimpleNamespace(params=params),
                               label=f"{name}[{entry}{'-' + plan if plan else ''}]")

    items = [item("test_plan_on_cpu_mesh", e, p) for e in ("encode_image", "score") for p in ("dp", "fsdp")]
    items += [item("test_plans_in_turns", e) for e in ("encode_image", "score", "caption")]
    items.insert(0, SimpleNamespace(originalname="test_compile_cold", callspec=None, label="compile"))
    _turns_after_their_plans(items)
    assert [i.label for i in items] == [
        "compile", "test_plan_on_cpu_mesh[encode_image-dp]", "test_plan_on_cpu_mesh[encode_image-fsdp]",
        "test_plans_in_turns[encode_image]", "test_plan_on_cpu_mesh[score-dp]", "test_plan_on_cpu_mesh[score-fsdp]",
        "test_plans_in_turns[score]", "test_plans_in_turns[caption]"]
