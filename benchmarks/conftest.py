import os

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from bench.harness.runtime import keep_freed_memory  # noqa: E402

keep_freed_memory()  # the same allocator setting as the CLI, for both sides of every ratio
torch.set_num_threads(int(os.environ.get("CSLBENCH_THREADS", "2")))


RATIO_LINES = pytest.StashKey[list]()


@pytest.fixture
def ratio_log(request):
    """Lines of 'selector shape device ms ratio' printed after the benchmark tables."""
    return request.config.stash.setdefault(RATIO_LINES, [])


def pytest_terminal_summary(terminalreporter, config):
    lines = config.stash.get(RATIO_LINES, [])
    if lines:
        terminalreporter.write_line("")
        terminalreporter.write_line("ratios measured in this run (same process, same inputs):")
        for line in lines:
            terminalreporter.write_line("  " + line)
