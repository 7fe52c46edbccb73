"""The big_vision mask rule and positions, as tabulated in ../shared/spec/pi0_math.md."""

import torch

from pi0.model.functional import make_attn_mask, positions_from_mask


def test_prefix_suffix_mask_table():
    # prefix: 1 camera of 2 tokens + 3 language tokens (last one padding); suffix: state + 3 actions
    input_mask = torch.tensor([[1, 1, 1, 1, 0, 1, 1, 1, 1]], dtype=torch.bool)
    ar_mask = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 0, 0]], dtype=torch.bool)
    m = make_attn_mask(input_mask, ar_mask)[0].int()
    expected = torch.tensor([
        # img img  l0  l1 pad  st  a0  a1  a2
        [1, 1, 1, 1, 0, 0, 0, 0, 0],  # image token: the valid prefix, never the suffix
        [1, 1, 1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0, 0],  # language: bidirectional over the prefix
        [1, 1, 1, 1, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0, 0],  # padding query: sees nothing
        [1, 1, 1, 1, 0, 1, 0, 0, 0],  # state: prefix + itself
        [1, 1, 1, 1, 0, 1, 1, 1, 1],  # actions: prefix, state and all actions
        [1, 1, 1, 1, 0, 1, 1, 1, 1],
        [1, 1, 1, 1, 0, 1, 1, 1, 1],
    ])
    assert torch.equal(m, expected)
    # padding does not advance the position; the suffix continues after the valid prefix
    assert positions_from_mask(input_mask)[0].tolist() == [0, 1, 2, 3, 3, 4, 5, 6, 7]


def test_masked_camera_positions_and_visibility():
    cam0 = [1, 1]
    cam1 = [0, 0]  # masked camera
    lang = [1, 1, 0]
    input_mask = torch.tensor([cam0 + cam1 + lang], dtype=torch.bool)
    ar_mask = torch.zeros_like(input_mask)
    m = make_attn_mask(input_mask, ar_mask)[0]
    assert not m[:, 2:4].any(), "nobody attends to a masked camera"
    assert positions_from_mask(input_mask)[0].tolist() == [0, 1, 1, 1, 2, 3, 3]
