"""The reference DiT and sampler against upstream F5-TTS on the same random weights."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_l2
from upstream import f5tts_base_kwargs, load

from indicf5.config import ModelConfig
from indicf5.model import DiT, TextEmbedding
from indicf5.sampler import EPSS_GRIDS, lengths_to_mask, sample
from indicf5.synthetic import random_transformer

SIZES = [
    ModelConfig(dim=64, depth=2, heads=4, dim_head=16, text_dim=32, conv_layers=1, text_num_embeds=40),
    ModelConfig(dim=128, depth=3, heads=2, dim_head=64, text_dim=64, conv_layers=2, ff_mult=4, text_num_embeds=90),
]


def pair(config: ModelConfig, seed: int = 0):
    """(ours, upstream's DiT) holding the same random weights."""
    upstream_dit, _ = load()
    state = random_transformer(config, seed)
    ours = DiT(config).eval()
    ours.load_state_dict(state)
    theirs = upstream_dit(**f5tts_base_kwargs(config)).eval()
    theirs.load_state_dict(state)
    return ours, theirs


@pytest.mark.parametrize("config", SIZES, ids=["small", "wider"])
@pytest.mark.parametrize("n", [17, 150])
@torch.no_grad()
def test_forward_matches_upstream(config, n):
    ours, theirs = pair(config)
    torch.manual_seed(1)
    x, cond = torch.randn(2, n, 100), torch.randn(2, n, 100)
    text = torch.randint(0, config.text_num_embeds, (2, n // 2))
    t = torch.rand(2)
    for drop in (False, True):  # conditional, and the dropped (unconditional) branch of CFG
        expected = theirs(x, cond, text, t, drop_audio_cond=drop, drop_text=drop)
        text_in = torch.full_like(text, -1) if drop else text
        got = ours(x, torch.zeros_like(cond) if drop else cond, ours.embed_text(text_in, n), t)
        assert rel_l2(got, expected) <= 1e-5


def test_forward_detects_a_wrong_weight():
    """The comparison above is sensitive: one perturbed block weight breaks it."""
    ours, theirs = pair(SIZES[0])
    with torch.no_grad():
        ours.transformer_blocks[1].attn.to_k.weight[0, 0] += 0.5
        x = torch.randn(1, 40, 100)
        text = torch.randint(0, 40, (1, 20))
        t = torch.tensor([0.3])
        assert (
            rel_l2(
                ours(x, x, ours.embed_text(text, 40), t), theirs(x, x, text, t, drop_audio_cond=False, drop_text=False)
            )
            > 1e-5
        )


@pytest.mark.parametrize("nfe,frames,cfg", [(8, 130, 2.0), (32, 260, 2.0), (16, 90, 0.0)])
def test_sampler_matches_upstream_cfm(nfe, frames, cfg):
    _, upstream_cfm = load()
    config = SIZES[0]
    ours, theirs = pair(config, seed=3)
    cfm = upstream_cfm(transformer=theirs).eval()
    torch.manual_seed(2)
    cond = torch.randn(1, 50, 100)
    text = torch.randint(0, config.text_num_embeds, (1, 30))
    with torch.no_grad():
        expected, _ = cfm.sample(
            cond, text, frames, steps=nfe, cfg_strength=cfg, sway_sampling_coef=-1.0, seed=7, use_epss=False
        )
    got = sample(ours, cond, text, [frames], nfe=nfe, cfg_strength=cfg, sway_coef=-1.0, seed=7)
    assert got.shape == expected.shape == (1, frames, 100)
    assert rel_l2(got, expected) <= 1e-4
    assert torch.equal(got[:, :50], cond)  # the reference frames are kept as they were


@pytest.mark.parametrize("nfe", [16, 7, 8])
def test_epss_schedule_matches_upstream_cfm(nfe):
    """schedule epss is f5-tts 1.1's default sampling (use_epss): its pruned grid at 16 and 7 steps,
    the uniform grid at a count it has none for (8); sway on top in both."""
    _, upstream_cfm = load()
    config = SIZES[0]
    ours, theirs = pair(config, seed=5)
    cfm = upstream_cfm(transformer=theirs).eval()
    torch.manual_seed(6)
    cond, text = torch.randn(1, 40, 100), torch.randint(0, config.text_num_embeds, (1, 25))
    with torch.no_grad():
        expected, _ = cfm.sample(
            cond, text, 120, steps=nfe, cfg_strength=2.0, sway_sampling_coef=-1.0, seed=3, use_epss=True
        )
    got = sample(ours, cond, text, [120], nfe=nfe, sway_coef=-1.0, schedule="epss", seed=3)
    assert rel_l2(got, expected) <= 1e-4
    uniform = sample(ours, cond, text, [120], nfe=nfe, sway_coef=-1.0, seed=3)
    if nfe in EPSS_GRIDS:  # a different grid, a measurably different mel
        assert rel_l2(uniform, expected) > 1e-3
    else:
        assert torch.equal(uniform, got)


def test_text_embedding_with_a_mask_embeds_each_row_as_alone():
    """With a frame mask, a batch's text features are each row's own at its length (the depthwise
    convolutions and GRN's norm over time see none of the padding), and zero past it."""
    torch.manual_seed(0)
    embed = TextEmbedding(50, 32, conv_layers=2).eval()
    with torch.no_grad():
        for weight in embed.parameters():  # GRN's gamma starts at 0, which would hide its norm
            weight.normal_(0, 0.5)
    text = torch.randint(0, 50, (2, 20))
    text[1, 12:] = -1
    lengths = [60, 35]
    with torch.no_grad():
        got = embed(text, 60, lengths_to_mask(torch.tensor(lengths), 60))
        for row, n in enumerate(lengths):
            assert rel_l2(got[row : row + 1, :n], embed(text[row : row + 1], n)) <= 1e-6, row
            assert not got[row, n:].any(), row
        assert rel_l2(embed(text, 60)[1, :35], got[1, :35]) > 1e-3  # unmasked, the padding does leak in


def test_batch_rows_equal_single_rows():
    """Rows of different lengths batched together give what each gives alone (padding is masked)."""
    config = SIZES[0]
    model, _ = pair(config)
    torch.manual_seed(4)
    conds = [torch.randn(1, 40, 100), torch.randn(1, 25, 100)]
    texts = [torch.randint(0, 40, (1, 30)), torch.randint(0, 40, (1, 12))]
    frames = [120, 70]
    alone = [sample(model, c, t, [f], nfe=6, seed=5) for c, t, f in zip(conds, texts, frames)]
    cond = torch.nn.functional.pad(conds[1], (0, 0, 0, 15))
    text = torch.nn.functional.pad(texts[1], (0, 18), value=-1)
    batched = sample(
        model, torch.cat((conds[0], cond)), torch.cat((texts[0], text)), frames, ref_lens=[40, 25], nfe=6, seed=5
    )
    assert rel_l2(batched[:1], alone[0]) <= 1e-5
    assert rel_l2(batched[1:, :70], alone[1]) <= 1e-5


def test_duration_is_at_least_reference_and_text_plus_one():
    model, _ = pair(SIZES[0])
    out = sample(model, torch.randn(1, 50, 100), torch.randint(0, 40, (1, 60)), [10], nfe=2, seed=0)
    assert out.shape[1] == 61
