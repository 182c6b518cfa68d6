"""The end-to-end benchmarks run in their smoke mode (tiny model, CPU) so the scripts never rot. Timings are
not asserted; the results files' schema and the headline metric names are."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest


def _load(tmp_path, bench: str) -> dict:
    files = list(tmp_path.glob(f"{bench}-cpu-*.json"))
    assert len(files) == 1, files
    assert files[0].with_suffix(".md").exists() and files[0].with_suffix(".png").exists()
    doc = json.loads(files[0].read_text())
    assert doc["bench"] == bench and doc["device"] == "cpu"
    assert set(doc["versions"]) == {"torch", "triton", "cuda", "driver"}
    assert doc["command"] and doc["date"]
    for r in doc["results"]:
        assert set(r) == {"metric", "value", "unit", "config"}
        assert r["value"] == r["value"] and r["value"] >= 0  # not NaN
    return doc


def _metrics(doc: dict) -> set[str]:
    return {r["metric"] for r in doc["results"]}


def test_decode_bench_smoke(tmp_path):
    from bench.decode import main
    main(["--smoke", "--out", str(tmp_path)])
    doc = _load(tmp_path, "decode")
    assert {"decode_fp8_bs1_tokens_per_s", "decode_fp8_bs1_floor_fraction", "decode_speedup_vs_transformers",
            "branch5_step_cost_ratio", "decode_tokens_per_s", "hf_decode_tokens_per_s", "spec_decode_ms_per_step",
            "spec_tokens_per_step", "spec_accepted_per_verify"} <= _metrics(doc)
    # The decode figures are of plain decoding: one token a step per row. Speculation has its own rows.
    spec = [r for r in doc["results"] if r["metric"].startswith("spec_")]
    assert all(r["config"]["num_draft_tokens"] > 0 for r in spec)
    assert [r for r in doc["results"] if r["metric"] == "spec_tokens_per_step"][0]["value"] >= 1.0
    fractions = [r["value"] for r in doc["results"] if r["metric"] == "decode_floor_fraction"]
    assert fractions and all(0 < f for f in fractions)


def test_selfrag_bench_smoke(tmp_path):
    from bench.selfrag import main
    main(["--smoke", "--out", str(tmp_path)])
    doc = _load(tmp_path, "selfrag")
    assert {"selfrag_query_latency_ms", "selfrag_query_speedup_vs_reference", "selfrag_ttft_ms",
            "selfrag_query_speedup_vs_transformers"} <= _metrics(doc)
    latency = [r for r in doc["results"] if r["metric"] == "selfrag_query_latency_ms"]
    assert {r["config"]["impl"] for r in latency} == {"ours", "reference_style", "transformers"}
    tokens = {(r["config"]["impl"], r["config"]["mode"]): r["config"]["generated_tokens"] for r in latency
              if r["config"].get("speculation", "default") == "default"}
    # The reference's adaptive order of work decodes a whole draft on top of the K branches; always-retrieve
    # decodes the same K branches as ours.
    assert tokens["reference_style", "adaptive"] > tokens["ours", "adaptive"] > 0
    assert tokens["reference_style", "always"] == tokens["ours", "always"]
    for r in latency:
        c = r["config"]
        if c["impl"] != "reference_style":
            continue
        # The script's counts, capped at the tiny vocabulary; a greedy token is among its step's top n, so each
        # step's dict holds exactly n entries.
        assert c["branch_logprobs"] == min(5000, c["vocab"]) and c["draft_logprobs"] in (0, min(32016, c["vocab"]))
        if c["mode"] == "always" or c["draft_logprobs"] == c["branch_logprobs"]:
            assert c["logprobs_returned"] == c["branch_logprobs"] * c["generated_tokens"]
    speedups = {(r["config"]["mode"], r["config"]["speculation"]) for r in doc["results"]
                if r["metric"] == "selfrag_query_speedup_vs_reference"}
    assert {("adaptive", "default"), ("always", "default")} <= speedups


def test_fp8_accuracy_bench_smoke(tmp_path):
    from bench.fp8_accuracy import main
    assert main(["--smoke", "--out", str(tmp_path)]) == 0
    doc = _load(tmp_path, "fp8_accuracy")
    values = {r["metric"]: r["value"] for r in doc["results"]}
    assert set(values) == {"fp8_logits_rel_err", "fp8_greedy_agreement"}
    # e4m3 rounds each weight by up to 2^-4: the logits move by a few percent, never by as much as themselves.
    assert 1e-4 < values["fp8_logits_rel_err"] < 0.3
    assert 0.0 <= values["fp8_greedy_agreement"] <= 1.0


def test_gpu_session_script_packs_results_and_logs(tmp_path):
    """bench/gpu_session.sh, as a lent GPU machine runs it, here in smoke mode on one cheap stage."""
    import os
    import subprocess
    import sys
    import tarfile
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHON=sys.executable, SMOKE="1", OUT=str(tmp_path))
    run = subprocess.run(["bash", "bench/gpu_session.sh", "scheduler", "nonsense"], cwd=root, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 1, run.stdout + run.stderr  # the unknown stage fails the call, the rest still runs
    assert "== scheduler      rc=0" in run.stdout and "unknown stage nonsense" in run.stdout
    with tarfile.open(tmp_path / "gpu-session.tar.gz") as tar:
        names = tar.getnames()
    stems = {n for n in names if n.startswith("bench/results/scheduler-cpu-")}
    assert {Path(n).suffix for n in stems} == {".json", ".md", ".png"}, names
    assert {"logs/scheduler.log", "logs/versions.log"} <= set(names)
    # The archive is the only file under $OUT: the device tool brings back at most 8.
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == ["gpu-session.tar.gz"]
    assert "1 file(s) under $OUT" in run.stdout


# Stands in for the GPU image's python3 in bench/gpu_session.sh: the import check answers as configured, the
# versions and summary snippets exit at once, and every stage hangs in a child that sleeps, as a stuck CUDA call
# would, after writing its own pid and its child's to $PIDS.
_HANGING_PYTHON = """#!/usr/bin/env bash
case "$1" in
  -c) exit "${IMPORT_RC:-0}" ;;
  -) cat >/dev/null; echo "torch stand-in"; exit 0 ;;
  -m) [ "$2" = pip ] && { echo "error: no network"; exit 1; } ;;
esac
sleep 300 &
child=$!
echo "$$ $child" >>"$PIDS"
trap 'echo "$*" >>"$PIDS.int"; kill $child; exit 130' INT
wait
"""


def _stand_in_python(tmp_path, import_rc: int = 0) -> tuple[dict, Path]:
    import os
    import stat

    exe = tmp_path / "python3"
    exe.write_text(_HANGING_PYTHON)
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    pids = tmp_path / "pids"
    env = dict(os.environ, PYTHON=str(exe), OUT=str(tmp_path / "out"), PIDS=str(pids), IMPORT_RC=str(import_rc))
    env.pop("SMOKE", None)
    return env, pids


def _alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie has exited already; only its parent has not collected it.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_gpu_session_stage_timeouts_kill_the_stage_and_go_on(tmp_path):
    """A stage that hangs is killed at its limit, with its children, reported as timed out, and the next stage
    and the archive still happen; the headline keeps every stage inside its budget."""
    import subprocess
    import tarfile
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env, pids = _stand_in_python(tmp_path)
    # timeout: a bound on a hang (a script that waited for its hung children), not a measurement.
    run = subprocess.run(["bash", "bench/gpu_session.sh", "sampler", "scheduler"], cwd=root,
                         env=dict(env, STAGE_TIMEOUT="2"), capture_output=True, text=True, timeout=120)
    assert run.returncode == 1, run.stdout + run.stderr
    lines = [line for line in run.stdout.splitlines() if line.startswith("== ")]
    assert len(lines) == 2 and all("TIMED OUT after 2s (killed)" in line for line in lines), run.stdout
    assert lines[0].startswith("== sampler") and lines[1].startswith("== scheduler")
    hung = [int(p) for line in pids.read_text().split("\n") if line for p in line.split()]
    assert len(hung) == 4
    deadline = time.monotonic() + 30  # SIGKILL was sent; the kernel's reaping is waited for, not timed
    while any(_alive(p) for p in hung) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(p) for p in hung), hung
    with tarfile.open(tmp_path / "out" / "gpu-session.tar.gz") as tar:
        names = tar.getnames()
        sampler_log = tar.extractfile("logs/sampler.log").read().decode()
    assert {"logs/sampler.log", "logs/scheduler.log", "logs/versions.log"} <= set(names)
    assert "killed after its 2s limit" in sampler_log

    # headline1 under a budget of 22 s counted from the script's start: the first stage's limit shrinks to what
    # is left, and once too little is left for a stage to be worth starting, the rest are skipped, not started.
    pids.unlink()
    run = subprocess.run(["bash", "bench/gpu_session.sh", "headline1"], cwd=root,
                         env=dict(env, SESSION_BUDGET="22"), capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    lines = [line for line in run.stdout.splitlines() if line.startswith("== ")]
    assert [line.split()[1] for line in lines] == ["decode", "selfrag", "attention", "summary-headline1"], run.stdout
    limit = int(lines[0].split("(limit ")[1].split("s)")[0])
    assert 18 <= limit <= 22 and f"TIMED OUT after {limit}s (killed)" in lines[0], lines[0]
    assert all(line.endswith("skipped: the session budget is spent") for line in lines[1:]), run.stdout


def test_gpu_session_stops_pytest_with_sigint_and_short_tracebacks(tmp_path):
    """The pytest stages get SIGINT at their limit (pytest then prints what failed so far), not SIGTERM."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env, pids = _stand_in_python(tmp_path)
    run = subprocess.run(["bash", "bench/gpu_session.sh", "tests"], cwd=root,
                         env=dict(env, STAGE_TIMEOUT="2"), capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    assert "== tests" in run.stdout and "TIMED OUT after 2s" in run.stdout, run.stdout
    got = Path(str(pids) + ".int").read_text().split()
    assert got[:2] == ["-m", "pytest"] and "--tb=short" in got and "-m" in got[2:], got


def test_gpu_session_plan_fits_each_call_in_8_minutes():
    """Both prepared calls end by themselves inside 8 minutes cold by the plan's own estimate, from the cold
    compile counts of the image's triton table; headline metrics come first and the tests last."""
    from bench import session_plan as sp

    table = sp.load_table()
    assert table["versions"]["triton"].startswith("3.6")
    assert sp.check(table) == []
    for call in sp.CALLS:
        rows = sp.plan(call, table)
        assert sp.call_estimate_s(call, table) <= 480
        assert sum(est for _, _, est in rows) + sp.BUILD_S <= sp.DEADLINE_S
        assert all(limit >= est for _, limit, est in rows)
    assert sp.CALLS["headline2"][-1] == "fast-path-tests" and "fast-path-tests" not in sp.CALLS["headline1"]
    # Every GPU headline metric's benchmark is in one of the two calls.
    benches = {s for call in sp.CALLS.values() for s in call}
    assert {"decode", "gemm", "sampler", "attention", "selfrag", "fp8_accuracy"} <= benches
    # The counts are read from the table, not written down: decode launches dozens of kernels cold.
    assert 30 <= sp.cold_compiles(sp.STAGES["decode"], table) <= 106
    # What an earlier stage of the call compiled is a cache hit: selfrag after decode compiles less than alone.
    decode = sp.compiled_by(sp.STAGES["decode"], table)
    assert sp.cold_compiles(sp.STAGES["selfrag"], table, decode) < sp.cold_compiles(sp.STAGES["selfrag"], table)
    # A plan over its limit is reported.
    slow = dict(table, kernels=table["kernels"] * 3)
    assert any("over 480 s" in p for p in sp.check(slow))


def test_gpu_session_summary_asks_for_every_gpu_headline_metric_of_developers_md(tmp_path):
    """The headline's summary reads DEVELOPERS.md's table: with one results file it names what is missing, the
    CPU-recorded rows aside."""
    import re
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    script = (root / "bench/gpu_session.sh").read_text()
    summary = re.search(r"^SUMMARY_PY=\$\(cat <<'EOF'\n(.*?)^EOF$", script, re.S | re.M).group(1)
    (tmp_path / "sampler-h200-20260101.json").write_text(json.dumps({"device": "NVIDIA H200", "results": [
        {"metric": "sampler_speedup_b8", "value": 3.5, "unit": "x", "config": {"batch": 8}}]}))
    run = subprocess.run([sys.executable, "-c", summary, str(tmp_path), str(root / "DEVELOPERS.md")],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 1
    assert re.search(r"sampler +sampler_speedup_b8 +3\.5 x +NVIDIA H200 +batch=8", run.stdout), run.stdout
    missing = set(re.findall(r"^\w+ +(\w+) +MISSING$", run.stdout, re.M))
    assert {"decode_fp8_bs1_tokens_per_s", "decode_overlap_speedup", "fp8_7b_weight_gb", "cascade_speedup_k5",
            "selfrag_query_speedup_vs_transformers", "fp8_greedy_agreement"} <= missing
    assert "sampler_speedup_b8" not in missing and not any(m.startswith("spec_") for m in missing)
    assert f"{len(missing)} headline metrics missing" in run.stderr


def test_gpu_session_says_first_when_the_build_fails(tmp_path):
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env, _ = _stand_in_python(tmp_path, import_rc=1)
    run = subprocess.run(["bash", "bench/gpu_session.sh"], cwd=root, env=env, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 1
    first = run.stdout.splitlines()[0]
    assert first.startswith("BUILD FAILED: selfrag_engine") and "no network" in first, run.stdout
    import tarfile
    with tarfile.open(tmp_path / "out" / "gpu-session.tar.gz") as tar:
        assert "installing the working tree" in tar.extractfile("logs/build.log").read().decode()


def test_launches_bench_smoke(tmp_path):
    import os

    import pytest

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("counts the kernels the Triton interpreter runs")
    from bench.launches import main
    assert main(["--smoke", "--out", str(tmp_path)]) == 0
    doc = _load(tmp_path, "launches")
    headline = {r["config"]["weights"]: r["value"] for r in doc["results"]
                if r["metric"] == "decode_launches_per_layer"}
    assert set(headline) == {"fp8", "float32"}
    for weights, total in headline.items():
        parts = [r["value"] for r in doc["results"]
                 if r["metric"] == "decode_layer_launches_by_kernel" and r["config"]["weights"] == weights]
        assert total == sum(parts) and total >= 5


def test_serve_bench_smoke(tmp_path):
    """The served Self-RAG answers equal the sequential ones at every concurrency level (the script raises
    otherwise), and the speedup is the served qps over the sequential qps."""
    from bench.serve import main
    assert main(["--smoke", "--out", str(tmp_path)]) == 0
    doc = _load(tmp_path, "serve")
    values = {r["metric"]: r["value"] for r in doc["results"]}
    assert {"sequential_selfrag_qps", "serve_selfrag_qps_c8", "serve_selfrag_p99_ms_c8",
            "serve_selfrag_concurrency_speedup_c8"} <= set(values)
    assert values["serve_selfrag_mismatched_answers_c8"] == 0
    # Streamed completions were read chunk by chunk: a first token, then gaps between tokens.
    assert {"serve_ttft_p50_ms_c8", "serve_itl_p50_ms_c8", "serve_ttft_p99_ms_c1", "programs_vs_answer_batch_c8",
            "serve_selfrag_concurrency_speedup_c1"} <= set(values)
    assert 0 < values["serve_ttft_p50_ms_c8"] and 0 < values["serve_itl_p50_ms_c8"]
    assert values["programs_vs_answer_batch_c8"] == pytest.approx(
        values["programs_qps_c8"] / values["answer_batch_qps_c8"], rel=1e-9)
    assert values["serve_selfrag_concurrency_speedup_c8"] == pytest.approx(
        values["serve_selfrag_qps_c8"] / values["sequential_selfrag_qps_c8"], rel=1e-9)
    # Long-form streams: the first segment never after the answer, and some segments were streamed.
    for level in (1, 8):
        assert 0 < values[f"serve_selfrag_long_first_segment_p50_ms_c{level}"] <= values[
            f"serve_selfrag_long_answer_p99_ms_c{level}"]
        assert 0 <= values[f"serve_selfrag_long_early_segments_c{level}"] <= 1


@pytest.mark.parametrize("argv, named", [(["--only", "programs"], "--out"),
                                         (["--levels", "8,x", "--out", "/tmp"], "--levels"),
                                         (["--levels", "0", "--out", "/tmp"], "--levels")])
def test_serve_bench_refuses_a_partial_run_without_out_and_bad_levels(argv, named, capsys):
    """A partial run (--only) would replace the recorded results with a part of them: it needs --out."""
    from bench.serve import main
    with pytest.raises(SystemExit):
        main(argv)
    assert named in capsys.readouterr().err


def test_design_ceiling_bench_smoke(tmp_path):
    """The analytic ceiling's rows: every mode, the reference's host entries as the script's counts give them,
    and each ratio the quotient of the two lower bounds it reports."""
    from bench.design_ceiling import main
    main(["--smoke", "--out", str(tmp_path)])
    doc = _load(tmp_path, "design_ceiling")
    rows = [r for r in doc["results"] if r["metric"] == "selfrag_design_ceiling_vs_reference"]
    assert {r["config"]["mode"] for r in rows} == {"adaptive", "always", "long_form"}
    for r in rows:
        c = r["config"]
        assert r["value"] == pytest.approx(c["reference_ms"] / c["ours_ms"], rel=1e-3)
        per_step = {"adaptive": None, "always": c["k"] * 5000, "long_form": c["k"] * 32000}[c["mode"]]
        if per_step is not None:
            assert c["reference_host_entries"] == per_step * c["new_tokens"]
    adaptive = next(r for r in rows if r["config"]["mode"] == "adaptive" and r["config"]["speculation"] == "off")
    # The draft alone costs the reference about as many weight reads as the branches.
    assert adaptive["config"]["reference_forwards"] > 1.9 * adaptive["config"]["ours_forwards"]


def test_spec_bench_smoke(tmp_path):
    from bench.spec import main
    main(["--smoke", "--out", str(tmp_path)])
    doc = _load(tmp_path, "spec")
    assert {"spec_forward_passes_per_token", "spec_acceptance_rate"} <= _metrics(doc)
    by_metric = {r["metric"]: r for r in doc["results"] if "kind" not in r["config"]}
    assert by_metric["spec_forward_passes_per_token_off"]["value"] == 1.0
    assert 0 < by_metric["spec_forward_passes_per_token"]["value"] < 1.0
    assert 0 < by_metric["spec_acceptance_rate"]["value"] <= 1.0
    assert by_metric["spec_forward_passes_per_token"]["config"]["outputs_identical"] is True
    assert {r["config"]["kind"] for r in doc["results"] if "kind" in r["config"]}


@pytest.mark.skipif(importlib.util.find_spec("faiss") is None, reason="needs faiss")
def test_search_bench_smoke(tmp_path):
    """Batched answers equal one-by-one answers (the script raises otherwise); the speedup is the quotient of
    the two qps it reports, at each concurrency."""
    from bench.search import main
    assert main(["--smoke", "--out", str(tmp_path)]) == 0
    doc = _load(tmp_path, "search")
    qps = {(r["config"]["clients"], r["config"]["way"]): r["value"] for r in doc["results"]
           if r["metric"] == "search_qps"}
    assert set(qps) == {(c, w) for c in (1, 8) for w in ("plain", "batched")}
    for c in (1, 8):
        speedup = next(r["value"] for r in doc["results"] if r["metric"] == f"search_batching_speedup_c{c}")
        assert speedup == pytest.approx(qps[(c, "batched")] / qps[(c, "plain")], rel=1e-9)
    batched = [r for r in doc["results"] if r["metric"] == "search_qps" and r["config"]["way"] == "batched"]
    assert all(r["config"]["mean_batch"] >= 1 for r in batched)


def test_kv_fp8_bench_smoke(tmp_path):
    """The FP8 KV cache's accuracy and bytes: every headline metric, agreements as fractions, the bytes ratio
    the quotient of the two counts it reports."""
    from bench.kv_fp8 import main
    main(["--smoke", "--out", str(tmp_path)])
    doc = _load(tmp_path, "kv_fp8")
    values = {r["metric"]: r["value"] for r in doc["results"]}
    assert {"kv_fp8_greedy_agreement", "kv_fp8_selfrag_decision_agreement", "kv_bytes_per_step_ratio"} <= set(values)
    assert 0.5 <= values["kv_fp8_greedy_agreement"] <= 1.0 and 0.0 <= values["kv_fp8_selfrag_decision_agreement"] <= 1.0
    fp16 = {(r["config"]["branches"], r["config"]["context"]): r["value"] for r in doc["results"]
            if r["metric"] == "kv_bytes_per_step_fp16_gb"}
    fp8 = {(r["config"]["branches"], r["config"]["context"]): r["value"] for r in doc["results"]
           if r["metric"] == "kv_bytes_per_step_fp8_gb"}
    assert set(fp16) == {(5, 512), (5, 4096), (10, 512), (10, 4096)} == set(fp8)
    assert values["kv_bytes_per_step_ratio"] == pytest.approx(max(fp8[c] / fp16[c] for c in fp16), rel=1e-6)
    assert 0.5 < values["kv_bytes_per_step_ratio"] <= 0.52


@pytest.mark.skipif(importlib.util.find_spec("ray") is None or importlib.util.find_spec("faiss") is None,
                    reason="needs Ray Serve and faiss: pip install 'selfrag-engine[ray,retrieval]'")
def test_scale_bench_smoke(tmp_path):
    """Replicas and shards, tiny: both headline ratios are the quotients of the qps the script reports (it
    raises if the answers with 2 replicas or the sharded top-k differ)."""
    from bench.scale import main
    from tests.helpers import one_ray_cluster_at_a_time

    with one_ray_cluster_at_a_time():
        assert main(["--smoke", "--out", str(tmp_path), "--queries", "4", "--clients", "2"]) == 0
    doc = _load(tmp_path, "scale")
    rows = doc["results"]
    serve_qps = {r["config"]["replicas"]: r["value"] for r in rows if r["metric"] == "serve_selfrag_qps"}
    search_qps = {r["config"]["shards"]: r["value"] for r in rows if r["metric"] == "search_qps"}
    scaling = next(r for r in rows if r["metric"] == "serve_replicas_scaling_2")
    speedup = next(r for r in rows if r["metric"] == "search_sharded_speedup_2")
    assert scaling["value"] == pytest.approx(serve_qps[2] / serve_qps[1], rel=1e-9)
    assert speedup["value"] == pytest.approx(search_qps[2] / search_qps[1], rel=1e-9)
