"""The README's worked example of a selector in one file runs as written."""

import re
from pathlib import Path

import torch

import bench.contract as contract


def test_readme_selector_example(scoped_registry):
    text = (Path(__file__).parents[1] / "README.md").read_text()
    block = re.search(r"```python\n(# my_selectors\.py\n.*?)```", text, re.S).group(1)
    exec(compile(block, "README.md", "exec"), {})
    sel = contract.get_selector("my_margin", num_classes=3, gap=0.3)
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25]]).T.reshape(1, 3, 1, 2)
    out = sel.select(probs, torch.tensor([[[True, True]]]))
    assert out.reliable.tolist() == [[[True, False]]]
    assert out.weight.tolist() == [[[1.0, 0.0]]]
