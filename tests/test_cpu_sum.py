"""`aten_cpu_sum` adds the slices in the order of torch's CPU sum, so compiled kernels built
on it give the eager float32 bits; `cascade_applies` says for which shapes."""

import pytest
import torch

from bench.contract.cpu_sum import aten_cpu_sum, cascade_applies


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_aten_cpu_sum_is_torch_sum_bit_for_bit(threads):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(threads)
        for n in [*range(1, 40), 255, 256, 257, 300]:
            for shape, dim in (((2, n, 8, 8), 1), ((1, n, 4, 32), 1), ((n, 2, 3, 64), 0)):
                assert cascade_applies(shape[dim + 1] * shape[-1] if dim == 1 else 2 * 3 * 64)
                x = torch.randn(*shape, generator=g) * torch.rand(*shape, generator=g) ** 4  # magnitudes that round
                assert torch.equal(x.sum(dim), aten_cpu_sum(x.unbind(dim))), (n, shape)
                if dim == 0:
                    assert torch.equal(x.mean(0), aten_cpu_sum(x.unbind(0)) / n), (n, shape)
    finally:
        torch.set_num_threads(previous)


def test_other_shapes_are_not_claimed():
    assert not cascade_applies(5 * 7) and not cascade_applies(16 * 17) and cascade_applies(256 * 256)
