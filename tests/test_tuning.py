"""The GEMM's opt-in autotuner cache (no GPU needed: the benchmark is a stand-in)."""

import json
import warnings

import pytest
import torch

from clq_triton.kernels import tuning
from clq_triton.kernels.tuning import GemmConfig


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(tuning, "_tuned", {})
    return str(tmp_path / "gemm-test.json")


def test_autotune_key_buckets_m_to_powers_of_two():
    key = tuning.autotune_key(90, 4, 4, None, 3000, 4608, 1152)
    assert key == "sm90-w4a4-g0-m4096-n4608-k1152"
    assert tuning.autotune_key(90, 4, 8, 64, 1, 8, 64) == "sm90-w4a8-g64-m1-n8-k64"
    assert tuning.autotune_key(90, 8, 8, 128, 10**6, 8, 128).startswith("sm90-w8a8-g128-m16384")


def test_tuned_config_picks_the_fastest_runnable_candidate_and_caches_it(fresh_cache):
    a, b, c = GemmConfig(64, 128, 128, 4, 3), GemmConfig(128, 128, 128, 8, 3), \
        GemmConfig(256, 128, 128, 8, 4)
    times = {a: 2.0, b: 1.0}
    calls = []

    def bench(cfg):
        calls.append(cfg)
        if cfg not in times:
            raise RuntimeError("out of resources")  # a candidate that cannot run
        return times[cfg]

    assert tuning.tuned_config(fresh_cache, "k1", [a, b, c], bench) == b
    assert len(calls) == 3
    assert tuning.tuned_config(fresh_cache, "k1", [a, b, c], bench) == b  # from memory
    assert len(calls) == 3
    tuning._tuned.clear()  # a new process reads the file instead of tuning again
    assert tuning.tuned_config(fresh_cache, "k1", [a, b, c], bench) == b
    assert len(calls) == 3
    assert json.load(open(fresh_cache))["k1"]["BM"] == 128


def test_tuned_config_errors(fresh_cache):
    def never(cfg):
        raise RuntimeError("no")

    with pytest.raises(RuntimeError, match="no GEMM config could run"):
        tuning.tuned_config(fresh_cache, "k2", [GemmConfig(64, 64, 64, 4, 2)], never)
    with open(fresh_cache, "w") as f:
        f.write("{not json")
    tuning._tuned.clear()
    with pytest.raises(RuntimeError, match="delete the file"):
        tuning.tuned_config(fresh_cache, "k3", [], never)


def test_group_modes_keep_both_accumulators_within_128_registers():
    """Per group the GEMM holds an int32 and a float32 BM×BN accumulator; at 128×256 with 8
    warps ptxas spilled 500-2152 B per thread on sm_90 (128×128 on sm_80/89: 96-184 B).
    fitted() narrows BN for group modes only: per channel (one int32 accumulator) the wide
    tile stays."""
    from clq_triton.kernels.formats import GROUP_SIZES
    from clq_triton.kernels.tuning import ARCHS, autotune_space, table_config, table_configs

    for arch in ARCHS:
        for base in table_configs(arch) + autotune_space(arch):
            for group in GROUP_SIZES:
                for a_bits, w_bits in ((4, 4), (8, 4), (8, 8)):
                    cfg = base.fitted(4096, group, a_bits, w_bits, arch)
                    if group is not None:
                        # wgmma / tcgen05 vs mma.sync operands (sm_120 has mma.sync only)
                        budget = 128 if arch in (90, 100) else 64
                        assert (2 * cfg.BM * cfg.BN <= budget * 32 * cfg.num_warps
                                or cfg.BN == 64), (arch, base)  # BN stops at 64
                        assert cfg.BK == group
    wide = table_config(90, 4096)
    assert (wide.BM, wide.BN) == (128, 256)
    assert wide.fitted(4096, None, 4, 4, 90).BN == 256
    assert wide.fitted(4096, 128, 4, 4, 90).BN == 128
    assert wide.fitted(4096, 128, 4, 4).BN == 256  # no arch: the interpreter's config path
    assert table_config(80, 4096).fitted(4096, 128, 4, 4, 80).BN == 64


def test_blackwell_parts_use_their_own_limits():
    """sm_100 (B200) is in the Hopper family; sm_120 (RTX 50-series) has no wgmma and 101376 B
    of shared memory per block: it takes the sm_89 rows, and every fitted config's estimate
    fits its limit (the Hopper rows' 128×256 tile needed 147456 B by that estimate)."""
    from clq_triton.kernels.formats import GROUP_SIZES
    from clq_triton.kernels.tuning import (ARCHS, shared_limit, table_config, table_configs,
                                           table_family)

    assert {100, 120} <= set(ARCHS)
    assert table_family(100) == 90 and table_family(120) == 89 and table_family(121) == 89
    assert shared_limit(120) == shared_limit(121) == 101376 and shared_limit(100) == 232448
    assert shared_limit(130) == min(tuning.SHARED_LIMIT.values())  # unknown newer: smallest
    assert table_config(120, 4096).smem_estimate(8, 8) <= 101376
    for arch in ARCHS:  # W8A8, where the estimate is exact (4-bit: tests/test_compile.py)
        for base in table_configs(arch):
            for group in GROUP_SIZES:
                cfg = base.fitted(4096, group, 8, 8, arch)
                assert cfg.smem_estimate(8, 8) <= shared_limit(arch), (arch, cfg)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_shared_limit_is_the_devices():
    props = torch.cuda.get_device_properties(0)
    optin = getattr(props, "shared_memory_per_block_optin", None)
    if optin is None:
        pytest.skip("this torch does not report shared_memory_per_block_optin")
    assert tuning.shared_limit(props.major * 10 + props.minor) == optin


_CHILD = """
import os, sys, time
from clq_triton.kernels import tuning
from clq_triton.kernels.tuning import GemmConfig
cfgs = [GemmConfig(64, 64, 64, 4, 2), GemmConfig(128, 64, 64, 4, 2)]
open(sys.argv[1] + "." + sys.argv[2] + ".ready", "w").close()
while not os.path.exists(sys.argv[1] + ".go"):  # start together
    time.sleep(0.01)
for i in range(40):
    tuning.tuned_config(sys.argv[1], f"{sys.argv[2]}-{i}", cfgs, lambda c: float(c.BM))
"""


def test_processes_tuning_different_shapes_keep_each_others_entries(fresh_cache):
    import os
    import subprocess
    import sys
    import time

    tags = ("a", "b", "c")
    procs = [subprocess.Popen([sys.executable, "-c", _CHILD, fresh_cache, t]) for t in tags]
    deadline = time.time() + 120
    while not all(os.path.exists(f"{fresh_cache}.{t}.ready") for t in tags):
        assert time.time() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.01)
    open(fresh_cache + ".go", "w").close()
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    keys = set(json.load(open(fresh_cache)))
    assert keys == {f"{t}-{i}" for t in tags for i in range(40)}


def test_threads_tuning_at_once_neither_fail_nor_lose_entries(fresh_cache):
    from concurrent.futures import ThreadPoolExecutor

    cfgs = [GemmConfig(64, 64, 64, 4, 2), GemmConfig(128, 64, 64, 4, 2)]
    keys = [f"k{i % 60}" for i in range(240)]
    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(lambda k: tuning.tuned_config(fresh_cache, k, cfgs,
                                                          lambda c: float(c.BM)), keys))
    assert got == [cfgs[0]] * 240
    assert set(json.load(open(fresh_cache))) == set(keys)


def test_an_unwritable_cache_is_a_warning_not_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(tuning, "_tuned", {})
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    path = str(blocker / "gemm.json")  # its folder cannot be created
    cfg = GemmConfig(64, 64, 64, 4, 2)
    with pytest.warns(UserWarning, match="could not save the tuned GEMM config"):
        assert tuning.tuned_config(path, "k", [cfg], lambda c: 1.0) == cfg
    assert tuning.tuned_config(path, "k", [cfg], lambda c: 1 / 0) == cfg  # kept in memory


def test_blackwell_is_compile_checked_from_triton_3_9_and_warns_below(monkeypatch):
    """sm_100 is compile-checked under triton 3.9 only (3.6 lowers its int8 dots to mma.sync):
    the oldest triton's CI run leaves it out, and a B200 / B300 under an older triton is told
    once per arch, at its first GEMM; the other archs are checked under both."""
    assert tuning.checked_archs((3, 9)) == tuning.ARCHS
    assert tuning.checked_archs((3, 6)) == tuple(a for a in tuning.ARCHS if a != 100)
    assert tuning.unchecked_reason(100, (3, 6)) and tuning.unchecked_reason(103, (3, 6))
    assert "triton >= 3.9" in tuning.unchecked_reason(100, (3, 6))
    assert not any(tuning.unchecked_reason(a, (3, 6)) for a in (80, 89, 90, 120, 121))
    assert not tuning.unchecked_reason(100, (3, 9))
    tuning.warn_if_unchecked.cache_clear()
    monkeypatch.setattr(tuning, "_triton_version", lambda: (3, 6))
    with pytest.warns(UserWarning, match="sm_100 under triton >= 3.9"):
        tuning.warn_if_unchecked(100)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tuning.warn_if_unchecked(100)  # once per arch
        tuning.warn_if_unchecked(90)
    tuning.warn_if_unchecked.cache_clear()
