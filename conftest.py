"""Root of the test run: ``pytest`` collects tests/ and bench/ (pyproject ``testpaths``).

``pytest`` is the test command: the benchmarks in bench/ are skipped there (CI runs each once,
untimed, through tests/test_bench_suite.py). ``pytest --benchmark-only`` runs and times the
benchmarks only. An explicit ``--benchmark-enable`` / ``--benchmark-disable`` /
``--benchmark-skip`` is left as given.
"""

import pytest


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    explicit = ("benchmark_only", "benchmark_enable", "benchmark_disable", "benchmark_skip")
    if not any(config.getoption(o, default=False) for o in explicit):
        config.option.benchmark_skip = True
