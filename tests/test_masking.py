import pytest
import torch

from csl.masking import hide_pixels, reliable_block_mask


def test_hidden_pixels_are_reliable_pixels_in_whole_blocks():
    g = torch.Generator().manual_seed(0)
    reliable = torch.rand(4, 70, 100, generator=g) < 0.6
    hidden = reliable_block_mask(reliable, generator=torch.Generator().manual_seed(3))
    assert not (hidden & ~reliable).any()
    # Per 32x32 block (edge blocks cropped): either every reliable pixel is hidden or none.
    n_on = n_blocks = 0
    for b in range(4):
        for y in range(0, 70, 32):
            for x in range(0, 100, 32):
                r = reliable[b, y : y + 32, x : x + 32]
                h = hidden[b, y : y + 32, x : x + 32]
                assert torch.equal(h, r) or not h.any()
                n_on += bool(h.any())
                n_blocks += 1
    assert 0.45 < n_on / n_blocks < 0.95  # ratio 0.7 over 48 blocks


def test_block_ratio_and_seed():
    reliable = torch.ones(64, 64, 64, dtype=torch.bool)
    a = reliable_block_mask(reliable, ratio=0.7, generator=torch.Generator().manual_seed(7))
    b = reliable_block_mask(reliable, ratio=0.7, generator=torch.Generator().manual_seed(7))
    c = reliable_block_mask(reliable, ratio=0.7, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.float().mean().item() == pytest.approx(0.7, abs=0.06)  # 256 blocks
    assert not reliable_block_mask(reliable, ratio=0.0).any()
    assert reliable_block_mask(reliable, ratio=1.0).all()


def test_hide_pixels_sets_mean_colour():
    images = torch.randn(2, 3, 5, 5)
    hidden = torch.zeros(2, 5, 5, dtype=torch.bool)
    hidden[1, 2, 3] = True
    out = hide_pixels(images, hidden)
    assert (out[1, :, 2, 3] == 0).all()
    out[1, :, 2, 3] = images[1, :, 2, 3]
    assert torch.equal(out, images)


def test_bad_mask_input():
    with pytest.raises(ValueError, match="reliable must be a bool"):
        reliable_block_mask(torch.ones(2, 3, 3))
    with pytest.raises(ValueError, match="ratio"):
        reliable_block_mask(torch.ones(2, 3, 3, dtype=torch.bool), ratio=2)
