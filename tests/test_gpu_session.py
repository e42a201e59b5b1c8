"""bench/gpu_session.sh, the command of a GPU session, run here with a stub interpreter: its
steps, the time limits it gives them and what it leaves in $OUT. A mistake in it costs
device time, of which a session has 15 minutes with the machine's start."""

import json
import os
import re
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Records each call (argv, OUT, time), then acts out the tool it stands for. STUB_SLOW names
# the tools that sleep until a signal stops them (pytest prints its summary on SIGINT).
STUB = r'''#!PYTHON
import json, os, sys, time
argv = sys.argv[1:]
with open(os.environ["STUB_LOG"], "a") as f:
    f.write(json.dumps(dict(argv=argv, out=os.environ.get("OUT"), t=time.time(),
                            interpret=os.environ.get("TRITON_INTERPRET"))) + "\n")
tool = argv[1] if argv[0] == "-m" else os.path.basename(argv[0]) if argv[0] != "-c" else "-c"
slow = tool in os.environ.get("STUB_SLOW", "").split(",")
def out_dir():
    d = argv[argv.index("--out") + 1]
    os.makedirs(d, exist_ok=True)
    return d
if tool == "-c":
    if os.environ.get("STUB_NO_DIFFUSERS"):
        sys.exit("ModuleNotFoundError: No module named 'diffusers'")
    print("torch 2.11.0+cu130 triton 3.6.0 diffusers 0.42.1 cuda True")
elif tool == "pytest":
    try:
        print("tests starting", flush=True)
        time.sleep(300 if slow else 0)
        print("===== 7 passed in 1.00s =====")
    except KeyboardInterrupt:
        print("===== 3 passed, 1 interrupted =====")
        sys.exit(2)
elif tool in ("profile_forward.py", "gpu_check.py"):
    stem = "profile-stub" if tool == "profile_forward.py" else "gpu-check-stub"
    if slow:
        time.sleep(300)
    with open(os.path.join(out_dir(), stem + ".json"), "w") as f:
        json.dump([{"argv": argv}], f)
    with open(os.path.join(out_dir(), stem + ".md"), "w") as f:
        f.write("# " + stem + " table\n")
elif tool == "rotate_probe.py":
    if argv[1] == "--summary":
        print("| probe summary of %d lines |" % len(open(argv[2]).readlines()))
    else:
        print(json.dumps({"setting": 1}), flush=True)
        time.sleep(300 if slow else 0)
'''


def run_session(tmp_path, step=None, **env):
    stub = tmp_path / "python"
    stub.write_text(STUB.replace("PYTHON", sys.executable, 1))
    stub.chmod(0o755)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    smi = bindir / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'name, memory.total'\necho 'NVIDIA H200, 143771 MiB'\n")
    smi.chmod(0o755)
    out = tmp_path / "out"
    base = {k: v for k, v in os.environ.items()  # the session's own settings: unset
            if k not in ("SMOKE", "AUTOTUNE", "SESSION_S", "CHECK_SECTIONS", "TRITON_INTERPRET",
                         "MIN_PROFILE", "MIN_CHECK", "JOBS", "TEST_JOBS")}
    env = dict(base, PYTHON=str(stub), OUT=str(out), STAGE=str(tmp_path / "stage"),
               STUB_LOG=str(tmp_path / "calls.jsonl"), PATH=f"{bindir}:{os.environ['PATH']}",
               **env)
    t0 = time.time()
    proc = subprocess.run(["bash", "bench/gpu_session.sh"] + ([step] if step else []),
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    calls = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    return proc, calls, out, time.time() - t0


def tool(call):
    argv = call["argv"]
    return argv[1] if argv[0] == "-m" else argv[0]


def test_the_default_step_runs_everything_in_order_and_returns_at_most_8_files(tmp_path):
    proc, calls, out, _ = run_session(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    tools = [tool(c) for c in calls]
    timed = [t for t in tools if t not in ("-c",)]
    # phase 1: pytest beside the warm-up jobs (10 profile modes, 3 + 28 + 4 gpu_check jobs)
    assert tools.count("bench/profile_forward.py") == 11
    assert tools.count("bench/gpu_check.py") == 36
    # then, each alone: the profile, gpu_check, the probe and its summary
    alone = [c for c in calls if "--budget" in c["argv"] and "1000" not in c["argv"]]
    assert [tool(c) for c in alone] == ["bench/profile_forward.py", "bench/gpu_check.py"]
    assert timed[-2:] == ["bench/rotate_probe.py"] * 2
    assert calls.index(alone[0]) > max(i for i, c in enumerate(calls)
                                       if "1000" in c["argv"])  # after every warm-up job
    # the tests: the files that use a device, not the CPU-only ones (CI runs those)
    (pytest_call,) = [c for c in calls if tool(c) == "pytest"]
    files = {a for a in pytest_call["argv"] if a.startswith("tests/")}
    assert {"tests/test_quantize.py", "tests/test_gemm.py", "tests/test_torch_ops.py",
            "tests/test_calibration.py"} <= files
    assert not files & {"tests/test_compile.py", "tests/test_docs.py", "tests/test_fold.py",
                         "tests/test_gpu_session.py"}
    # nothing but the script writes to $OUT (the device tool returns 8 files at most)
    assert all(c["out"] is None for c in calls if tool(c) != "-c")
    assert all(c["interpret"] is None and "--smoke" not in c["argv"] for c in calls)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["gpu-check-stub.json", "profile-stub.json", "pytest.log",
                     "rotate-probe-bf16.jsonl", "session.tgz", "summary.md"]
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", n) for n in names)
    summary = (out / "summary.md").read_text()
    for text in ("NVIDIA H200", "diffusers 0.42.1", "7 passed", "# profile-stub table",
                 "# gpu-check-stub table", "| probe summary of 1 lines |", "== done"):
        assert text in summary, text


@pytest.mark.parametrize("step", ["1", "2"])
def test_the_two_steps_split_the_work(tmp_path, step):
    proc, calls, out, _ = run_session(tmp_path, step)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    tools = {tool(c) for c in calls}
    if step == "1":
        assert {"pytest", "bench/profile_forward.py"} <= tools
        assert not tools & {"bench/gpu_check.py", "bench/rotate_probe.py"}
    else:
        assert {"bench/gpu_check.py", "bench/rotate_probe.py"} <= tools
        assert not tools & {"pytest", "bench/profile_forward.py"}
    assert len(list(out.iterdir())) <= 8


def test_phases_that_run_long_are_stopped_and_their_results_still_returned(tmp_path):
    """SESSION_S = 16 s, each later phase keeping 4: the tests and the probe sleep until they
    are stopped; pytest gets SIGINT (and prints its summary), the others run, and $OUT holds
    what every phase wrote."""
    proc, calls, out, wall = run_session(tmp_path, SESSION_S="16", MIN_PROFILE="4",
                                         MIN_CHECK="4", STUB_SLOW="pytest,rotate_probe.py")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "failed or stopped at their limit: pytest (124) rotate_probe.py (124)" in proc.stdout
    assert wall < 16 + 15, wall  # the phases' limits add up to SESSION_S (+ kill margins)
    summary = (out / "summary.md").read_text()
    assert "3 passed, 1 interrupted" in summary  # SIGINT reached pytest in the background
    assert "# profile-stub table" in summary and "# gpu-check-stub table" in summary
    assert (out / "rotate-probe-bf16.jsonl").read_text().count("setting") == 1
    budgets = [float(c["argv"][c["argv"].index("--budget") + 1]) for c in calls
               if "--budget" in c["argv"] and "1000" not in c["argv"]]
    assert len(budgets) == 2 and all(0 < b <= 16 for b in budgets), budgets


def test_a_machine_without_diffusers_stops_at_once(tmp_path):
    proc, calls, out, wall = run_session(tmp_path, STUB_NO_DIFFUSERS="1")
    assert proc.returncode == 1 and wall < 10
    assert [tool(c) for c in calls if tool(c) != "pip"] == ["-c"]  # pip: .whl/, if any
    assert "no diffusers" in (out / "summary.md").read_text()
