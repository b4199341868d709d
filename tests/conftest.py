import os

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))
settings.register_profile(
    "cslbench", deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("cslbench")


@pytest.fixture
def scoped_registry():
    """Selectors a test registers (or installs as a plugin) are gone after it."""
    from bench.contract import scoped_registry

    with scoped_registry():
        yield


def pytest_addoption(parser):
    parser.addoption(
        "--selector", action="append", default=[], metavar="NAME",
        help="run the per-selector tests (contract, precision, host reads) for this registered selector only (repeatable)",
    )


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "every_selector(argname): parametrise argname over every registered selector at collection "
        "(built in or from a plugin), or over those given with --selector",
    )
    if config.getoption("selector"):
        selectors_under_test(config)  # an unknown name is a usage error before collection


def selectors_under_test(config) -> list[str]:
    """The registry's selectors, or the ones named with --selector (each must be registered)."""
    from bench.contract import available_selectors

    registered = available_selectors()
    chosen = list(dict.fromkeys(config.getoption("selector")))
    unknown = [name for name in chosen if name not in registered]
    if unknown:
        raise pytest.UsageError(f"--selector: {unknown} not registered; registered selectors: {', '.join(registered)}")
    return chosen or registered


def pytest_generate_tests(metafunc):
    for mark in metafunc.definition.iter_markers("every_selector"):
        metafunc.parametrize(mark.args[0], selectors_under_test(metafunc.config))
