"""
Tests for heptapod: python -m pytest -q
Tiny configs on the CPU with fixed seeds; each test checks one property.
"""
import argparse
import errno
import functools
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import zlib

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import fid
import sample
import tokenizers
import train
from heads import Heptapod, sample_prefix_lens, take
from model import SIZES, Transformer, make_orders
from tokenizers import load_weights
from sample import generate

G = 8  # model-level tests use an 8x8 grid: every property holds, at a quarter of the steps
N = G * G
TINY = dict(vocab_size=512, num_classes=10, grid_size=G, n_layer=2, n_embd=32, n_head=2)

cli = pytest.mark.cli  # runs a script's main: python -m pytest -q -m "not cli" runs the method's properties alone


# -----------------------------------------------------------------------------
# the causal Transformer (model.py): Sec. 4.2, the 1D baselines' targets, the KV cache, the orders

def tiny_model(head='global', **kw):
    torch.manual_seed(0)
    return Heptapod(**dict(TINY, head=head, head_depth=2, **kw)).eval()


def live_token_head(model, std=0.2):
    """MAR zero-initialises the diffusion MLP's modulations and output, so an untrained model's tokens depend on the
    noise alone, not on z: random weights there, so that a sampling test compares what the model computes."""
    g, net = torch.Generator().manual_seed(1), model.token_head.net
    with torch.no_grad():
        for m in [b.ada for b in net.blocks] + [net.final_ada, net.final]:
            m.weight.normal_(0, std, generator=g)
            m.bias.normal_(0, std, generator=g)
    return model


def fixed_batch(B=8, seed=0):
    images, labels = tokenizers.make_shapes(B, size=G, seed=seed)
    return tokenizers.PixelTokenizer().encode(images).flatten(1), labels


TARGETS = [None, 'shifted', 'added']  # the 2D model, the paper's 1D baseline (Fig. 4 middle), RAR's


@pytest.mark.parametrize('init', ['mar', 'gpt2'])
def test_initialisation_follows_mar_or_nanogpt(init):
    # mar: xavier-uniform linears (std sqrt(2 / (fan_in + fan_out))), N(0, 0.02) tables and mask token;
    # gpt2: N(0, 0.02) everywhere, residual projections / sqrt(2 n_layer). Both: zero biases, LayerNorms at 1
    torch.manual_seed(0)
    model = Heptapod(**dict(TINY, head='global', head_depth=2, n_embd=256, n_head=4, init=init))
    linears = {f'{n}.weight' for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    for name, p in model.named_parameters():
        if name.endswith('bias'):
            assert not p.any(), name
        elif p.dim() == 1:  # LayerNorm weights
            assert torch.equal(p, torch.ones_like(p)), name
        elif p.numel() > 1000:  # a std estimate good to a few percent
            want = (math.sqrt(2 / sum(p.shape)) if init == 'mar' and name in linears else
                    0.02 / math.sqrt(2 * 2) if init == 'gpt2' and name.endswith('proj.weight') else 0.02)
            assert abs(p.std().item() / want - 1) < 0.1, (name, p.std().item(), want)


@pytest.mark.parametrize('target_position', TARGETS)
def test_changing_a_later_token_never_changes_an_earlier_hidden_state(target_position):
    torch.manual_seed(0)
    model = Transformer(512, 10, G, n_layer=2, n_embd=32, n_head=2, target_position=target_position).eval()
    g = torch.Generator().manual_seed(0)
    idx, labels = torch.randint(512, (2, N - 1)), torch.tensor([3, 7])
    orders = make_orders(2, N, 'random', g)
    target = orders if target_position else None
    h = model(idx, labels, orders[:, :-1], target)  # (2, N, C)
    j = 30
    idx2 = idx.clone()
    idx2[:, j:] = (idx2[:, j:] + 1) % 512  # change the tokens read at steps j, j+1, ...
    h2 = model(idx2, labels, orders[:, :-1], target)
    assert torch.equal(h[:, :j + 1], h2[:, :j + 1])  # h[:, t] has seen t tokens
    assert not torch.allclose(h[:, j + 1], h2[:, j + 1])


@pytest.mark.parametrize('target_position', TARGETS)
def test_only_the_1d_model_is_told_the_next_position(target_position):
    # RAR Fig. 3: two orders that differ only in their last two positions. The state that has seen N-2
    # tokens must predict different positions, so only a model told its target may tell them apart.
    torch.manual_seed(0)
    model = Transformer(512, 10, G, n_layer=2, n_embd=32, n_head=2, target_position=target_position).eval()
    idx, labels = torch.randint(512, (1, N - 1)), torch.tensor([0])
    orders = make_orders(1, N, 'random', torch.Generator().manual_seed(0))
    swapped = orders.clone()
    swapped[:, -2:] = orders[:, -2:].flip(1)
    h = model(idx, labels, orders[:, :-1], orders if target_position else None)
    h_swapped = model(idx, labels, swapped[:, :-1], swapped if target_position else None)
    assert torch.equal(h[:, :N - 2], h_swapped[:, :N - 2])
    assert torch.equal(h[:, N - 2], h_swapped[:, N - 2]) == (target_position is None)


def test_the_shifted_1d_model_gives_each_input_the_position_of_its_target_and_not_its_own():
    # Fig. 4 (middle): the position sequence is shifted left by one, so the input at step t (the class token,
    # then the token read at step t-1) carries the embedding of orders[:, t], the position it must predict
    torch.manual_seed(0)
    model = Transformer(512, 10, G, n_layer=2, n_embd=32, n_head=2, target_position='shifted').eval()
    idx, labels = torch.randint(512, (2, N - 1)), torch.tensor([3, 7])
    orders = make_orders(2, N, 'random', torch.Generator().manual_seed(0))
    inputs = []
    model.blocks[0].register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
    model(idx, labels, orders[:, :-1], orders)
    tokens = torch.cat([model.cls_emb(labels)[:, None], model.tok_emb(idx)], 1)  # (2, N, C)
    torch.testing.assert_close(inputs[0], tokens + model.pos_emb(orders), atol=0, rtol=0)
    assert model.target_pos_emb is None  # one position table, as the model without a target


@pytest.mark.parametrize('target_position', TARGETS)
def test_kv_cache_decode_matches_full_forward(target_position):
    torch.manual_seed(0)
    model = Transformer(512, 10, G, n_layer=2, n_embd=32, n_head=2, target_position=target_position).eval()
    orders = make_orders(3, N, 'random', torch.Generator().manual_seed(1))
    idx, labels = torch.randint(512, (3, 20)), torch.tensor([1, 2, 3])
    target = orders if target_position else None
    h_full = model(idx, labels, orders[:, :20], None if target is None else target[:, :21])  # (3, 21, C)
    model.setup_cache(3, N)
    steps = [model.prefill(labels, None if target is None else target[:, :1])]
    for t in range(20):
        tp = None if target is None else target[:, t + 1:t + 2]
        steps.append(model.decode(idx[:, t:t + 1], orders[:, t:t + 1], torch.tensor([t + 1]), tp))
    model.clear_cache()
    torch.testing.assert_close(torch.cat(steps, 1), h_full, atol=1e-5, rtol=1e-5)


def test_the_kv_cache_stores_keys_in_the_dtype_they_come_in():
    # a CUDA run samples the final grid outside autocast (fp32 keys) and evaluates inside it (bf16 keys)
    model = tiny_model()
    t = model.transformer
    for autocast, dtype in ((False, torch.float32), (True, torch.bfloat16)):
        t.setup_cache(2, N)
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
            t.prefill(torch.tensor([0, 1]))
            t.decode(torch.tensor([[3], [4]]), torch.tensor([[5], [6]]), torch.tensor([1]))
        assert t.blocks[0].attn.cache.k.dtype == dtype
        t.clear_cache()


def test_raster_order_is_row_major_and_random_orders_are_permutations():
    g = torch.Generator().manual_seed(0)
    assert torch.equal(make_orders(3, N, 'raster', g), torch.arange(N).expand(3, N))
    orders = make_orders(5, N, 'random', g)
    assert torch.equal(orders.sort(1).values, torch.arange(N).expand(5, N))
    assert not torch.equal(orders[0], orders[1])


# -----------------------------------------------------------------------------
# the heads and the loss (heads.py): Sec. 4.3, Fig. 5, density, the token heads

def head_outputs(model, idx, labels, orders, prefix_lens):
    seq = take(idx, orders)
    h = model.transformer(seq[:, :-1], labels, orders[:, :-1])
    return model.head(h, orders, prefix_lens)  # z, positions, seen


def test_global_head_scores_exactly_the_positions_not_yet_seen():
    model = tiny_model('global')
    idx, labels = fixed_batch(4)
    g = torch.Generator().manual_seed(0)
    orders = make_orders(4, N, 'random', g)
    prefix_lens = sample_prefix_lens(4, 3, N, g)  # (4, 3)
    z, positions, seen = head_outputs(model, idx, labels, orders, prefix_lens)
    assert z.shape == (12, N, 32) and torch.equal(positions, torch.arange(N).expand(12, N))
    rank = orders.argsort(1).repeat_interleave(3, 0)  # (12, N)
    assert torch.equal(seen, rank < prefix_lens.flatten()[:, None])
    # the model's loss is the mean cross-entropy over exactly the unseen positions
    targets = idx.repeat_interleave(3, 0)
    expected = F.cross_entropy(model.token_head.linear(z)[~seen], targets[~seen])
    torch.testing.assert_close(model(idx, labels, orders, prefix_lens), expected)


@pytest.mark.parametrize('head', ['global', 'local'])
def test_head_prediction_never_sees_tokens_outside_the_prefix(head):
    model = tiny_model(head, window=16 if head == 'local' else None)
    idx, labels = fixed_batch(2)
    orders = make_orders(2, N, 'random', torch.Generator().manual_seed(0))
    t = 20
    prefix_lens = torch.full((2, 1), t)
    z, _, _ = head_outputs(model, idx, labels, orders, prefix_lens)
    future = orders[:, t:]  # positions read at step t and later
    idx2 = idx.clone()
    idx2.scatter_(1, future, (idx.gather(1, future) + 7) % 512)
    z2, _, _ = head_outputs(model, idx2, labels, orders, prefix_lens)
    torch.testing.assert_close(z, z2, atol=0, rtol=0)
    idx3 = idx.clone()
    last = orders[:, t - 1:t]
    idx3.scatter_(1, last, (idx.gather(1, last) + 7) % 512)  # but the last token of the prefix does matter
    z3, _, _ = head_outputs(model, idx3, labels, orders, prefix_lens)
    assert not torch.allclose(z, z3)


@pytest.mark.parametrize('window', [4, 16])
def test_local_head_predicts_the_chunk_of_the_next_position_and_scores_its_unseen_positions(window):
    model = tiny_model('local', window=window)
    idx, labels = fixed_batch(3)
    g = torch.Generator().manual_seed(0)
    orders = make_orders(3, N, 'random', g)
    prefix_lens = sample_prefix_lens(3, 4, N, g)
    z, positions, seen = head_outputs(model, idx, labels, orders, prefix_lens)
    assert z.shape == (12, window, 32)
    s = int(window ** 0.5)
    rank = orders.argsort(1)
    for b in range(3):
        for j in range(4):
            t, row = prefix_lens[b, j].item(), positions[b * 4 + j]
            r, c = divmod(orders[b, t].item(), G)  # the next position: its s x s chunk is predicted
            chunk = [(r // s * s + i) * G + c // s * s + k for i in range(s) for k in range(s)]
            assert row.tolist() == chunk
            assert seen[b * 4 + j].tolist() == [rank[b, p].item() < t for p in chunk]
    targets = idx.repeat_interleave(4, 0).gather(1, positions)
    expected = F.cross_entropy(model.token_head.linear(z)[~seen], targets[~seen])
    torch.testing.assert_close(model(idx, labels, orders, prefix_lens), expected)


def test_local_head_chunks_never_mix_positions_of_other_chunks():
    # a query of one chunk only sees its own chunk's queries: changing another chunk's query embedding
    # (through its position embedding) leaves the prediction unchanged
    model = tiny_model('local', window=16)
    idx, labels = fixed_batch(1)
    orders = make_orders(1, N, 'random', torch.Generator().manual_seed(0))
    prefix_lens = torch.tensor([[30]])
    z, positions, _ = head_outputs(model, idx, labels, orders, prefix_lens)
    outside = torch.ones(N, dtype=torch.bool)
    outside[positions[0]] = False
    outside[orders[0, :30]] = False  # the prefix states carry position embeddings too
    with torch.no_grad():
        model.head.pos_emb[0, outside] += 1.0
    z2, _, _ = head_outputs(model, idx, labels, orders, prefix_lens)
    torch.testing.assert_close(z, z2, atol=0, rtol=0)


def test_whole_grid_window_chunk_is_the_global_heads_grid():
    model = tiny_model('local', window=N)  # w = 256 on the paper's 16x16 grid
    assert model.head.chunk_pos.shape == (1, N) and torch.equal(model.head.chunk_pos[0], torch.arange(N))
    idx, labels = fixed_batch(2)
    orders = make_orders(2, N, 'random', torch.Generator().manual_seed(0))
    _, positions, seen = head_outputs(model, idx, labels, orders, torch.tensor([[10], [50]]))
    _, g_positions, g_seen = head_outputs(tiny_model('global'), idx, labels, orders, torch.tensor([[10], [50]]))
    assert torch.equal(positions, g_positions) and torch.equal(seen, g_seen)


def test_prefix_lengths_are_distinct_and_inside_the_grid():
    p = sample_prefix_lens(64, 8, N, torch.Generator().manual_seed(0))
    assert p.shape == (64, 8) and p.min() >= 0 and p.max() < N
    assert all(len(set(row.tolist())) == 8 for row in p)


@pytest.mark.parametrize('head,order,tokens', [('global', 'random', 'discrete'), ('global', 'raster', 'discrete'),
                                               ('local', 'random', 'discrete'), ('linear', 'raster', 'discrete'),
                                               ('linear', 'random', 'discrete'), ('global', 'random', 'continuous'),
                                               ('linear', 'raster', 'continuous')])
def test_every_order_and_head_trains_with_falling_loss_on_a_fixed_batch(head, order, tokens):
    continuous = dict(token_dim=12, diffusion_width=32, diffusion_depth=2) if tokens == 'continuous' else {}
    model = tiny_model(head, window=16 if head == 'local' else None, **continuous).train()
    idx, labels = fixed_batch(8)
    if continuous:  # the shapes as 2x2 pixel patches
        idx = tokenizers.PixelPatchTokenizer().encode(tokenizers.make_shapes(8, size=2 * G)[0]).flatten(1, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(30):
        orders = make_orders(8, N, order, g)
        loss = model(idx, labels, orders, sample_prefix_lens(8, 4 if head == 'global' else 1, N, g), g)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5]), losses


def test_cosine_schedule_and_respacing_match_their_closed_forms():
    from heads import GaussianDiffusion
    f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    full = GaussianDiffusion(1000)
    k = torch.arange(999, dtype=torch.float64)
    expected = torch.tensor([f((i + 1) / 1000) / f(0) for i in k.tolist()], dtype=torch.float64)
    torch.testing.assert_close(full.alphas_cumprod[:-1], expected)  # only beta_999 is clipped (to 0.999)
    assert abs(full.betas[0].item() - 4.1284e-5) < 1e-8 and abs(full.betas[-1].item() - 0.999) < 1e-12
    spaced = GaussianDiffusion(100)
    assert spaced.timesteps.tolist() == [round(i * 999 / 99) for i in range(100)]
    assert spaced.timesteps[:7].tolist() == [0, 10, 20, 30, 40, 50, 61]  # as IDDPM's space_timesteps
    torch.testing.assert_close(spaced.alphas_cumprod, full.alphas_cumprod[spaced.timesteps])
    torch.testing.assert_close(spaced.betas[1:], 1 - spaced.alphas_cumprod[1:] / spaced.alphas_cumprod[:-1])
    assert abs(spaced.betas[-1].item() - 0.99999) < 1e-5  # respaced betas are not clipped again


def test_diffusion_mlp_learns_a_conditional_two_mode_distribution():
    from heads import DiffusionLoss
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    # bounded toy data, so x0 may be clipped as for pixel tokens (see GaussianDiffusion.sample)
    head = DiffusionLoss(token_dim=2, n_embd=8, width=64, depth=2, clip_denoised=True)
    modes = torch.tensor([[[0.6, 0.6], [-0.6, -0.6]], [[0.6, -0.6], [-0.6, 0.6]]])  # (condition, mode, xy)
    cond_z = torch.randn(2, 8, generator=g)  # one head output z per condition
    opt = torch.optim.AdamW(head.parameters(), lr=2e-3)
    for _ in range(300):
        c, m = torch.randint(2, (256,), generator=g), torch.randint(2, (256,), generator=g)
        x = modes[c, m] + 0.05 * torch.randn(256, 2, generator=g)
        loss = head.loss(cond_z[c], x, g)
        loss.backward()
        opt.step()
        opt.zero_grad()
    for c in range(2):
        x = head.sample(cond_z[c].expand(200, 8), g, diffusion_steps=50)  # (200, 2)
        dist = (x[:, None] - modes[c][None]).norm(dim=-1)  # (200, 2) to the condition's modes
        near = dist.min(1).values < 0.25
        assert near.float().mean() > 0.9, f"condition {c}: {near.float().mean():.2f} near its modes"
        share = (dist.argmin(1) == 0).float().mean()
        assert 0.25 < share < 0.75, f"condition {c}: mode shares {share:.2f}"  # both modes, not one


@pytest.mark.parametrize('steps', [1000, 100])
def test_sampler_given_the_true_noise_returns_the_clean_token(steps):
    # the reverse chain itself, unclipped as MAR: with a perfect noise prediction it ends at x0
    from heads import GaussianDiffusion
    d = GaussianDiffusion(steps)
    x0 = torch.tensor([[0.6, -0.6, 2.5]])

    def oracle(x_t, k):  # eps such that x_t = q_sample(x0, t, eps) at the original timestep t of step k
        ac = GaussianDiffusion(1000).alphas_cumprod[d.timesteps[k]].float()
        return torch.cat([(x_t - ac.sqrt() * x0) / (1 - ac).sqrt(), torch.zeros_like(x_t)], -1)
    x = d.sample(oracle, torch.randn(steps + 1, 1, 3, generator=torch.Generator().manual_seed(0)))
    torch.testing.assert_close(x, x0, atol=1e-4, rtol=0)


def test_packed_diffusion_loss_equals_the_masked_loss_over_every_position_with_the_same_draws():
    # the diffusion MLP runs on the unseen positions only; given the same timestep and noise at each of them, that
    # is the loss of running it on every position of every prefix (4 noised copies each) and masking, as MAR does
    model = tiny_model(token_dim=12, diffusion_width=16, diffusion_depth=1)
    g = torch.Generator().manual_seed(0)
    idx, labels = torch.rand(3, N, 12) * 2 - 1, torch.tensor([1, 2, 3])
    orders, prefix_lens = make_orders(3, N, 'random', g), sample_prefix_lens(3, 2, N, g)
    packed = model(idx, labels, orders, prefix_lens, torch.Generator().manual_seed(1))
    z, positions, seen = head_outputs(model, idx, labels, orders, prefix_lens)  # (6, N, C), (6, N), (6, N)
    scored = (~seen).flatten().repeat(4)  # (4 * 6 * N,) the rows the masked loss keeps
    draws, M = torch.Generator().manual_seed(1), int(scored.sum())
    i, noise = torch.zeros(len(scored), dtype=torch.long), torch.zeros(len(scored), 12)
    i[scored] = torch.randint(1000, (M,), generator=draws)  # the packed path's draws, in its row order
    noise[scored] = torch.randn(M, 12, generator=draws)
    x0 = take(idx.repeat_interleave(2, 0), positions).flatten(0, 1).repeat(4, 1)  # (4 * 6 * N, 12)
    diffusion = model.token_head
    rows = diffusion.train_diffusion.loss(diffusion.net, x0, z.flatten(0, 1).repeat(4, 1), i, noise)
    masked = (rows * scored).sum() / scored.sum()
    torch.testing.assert_close(packed, masked)


def test_continuous_model_passes_exactly_the_unseen_positions_to_the_diffusion_loss(monkeypatch):
    model = tiny_model(token_dim=12, diffusion_width=16, diffusion_depth=1)
    captured = {}
    real_loss = type(model.token_head).loss

    def spy(self, z, targets, generator):
        captured.update(z=z, targets=targets)
        return real_loss(self, z, targets, generator)
    monkeypatch.setattr(type(model.token_head), 'loss', spy)
    g = torch.Generator().manual_seed(0)
    idx, labels = torch.rand(2, N, 12) * 2 - 1, torch.tensor([1, 2])
    orders, prefix_lens = make_orders(2, N, 'random', g), torch.tensor([[5], [40]])
    model(idx, labels, orders, prefix_lens, g)
    unseen = orders.argsort(1) >= prefix_lens  # (2, N) the positions not among the first 5 and 40 read
    assert captured['z'].shape == (N - 5 + N - 40, 32)  # packed: the unseen positions only
    torch.testing.assert_close(captured['targets'], idx[unseen])


# -----------------------------------------------------------------------------
# sampling (sample.generate): the (position, token) loop, parallel decoding, editing, the caches

def per_step_sampler(loss, z, generator, steps, temperature=1.0, cfg=1.0):
    """The diffusion sampler as it was before it was made constant work (c2d4f7c): the whole network, time
    embedding and condition included, at every step, and one noise draw per step."""
    from heads import GaussianDiffusion
    d, net, B = GaussianDiffusion(steps), loss.net, len(z) // 2 if cfg != 1.0 else len(z)
    D = net.final.out_features // 2
    x = torch.randn(B, D, generator=generator)
    for k in reversed(range(steps)):
        i = torch.full((B,), k)
        out = net(x.repeat(len(z) // B, 1), d.timesteps[i].repeat(len(z) // B), z).float()
        eps, v = out[:B].chunk(2, dim=-1)
        if cfg != 1.0:
            eps = out[B:, :D] + cfg * (eps - out[B:, :D])
        mean, logvar = d.p_mean_logvar(eps, v, x, i, loss.clip_denoised)
        x = mean + (k > 0) * torch.exp(0.5 * logvar) * torch.randn(x.shape, generator=generator) * temperature
    return x


@pytest.mark.parametrize('clip,cfg,temperature', [(True, 1.0, 1.0), (True, 1.5, 0.9), (False, 1.0, 1.0)])
def test_the_constant_work_diffusion_sampler_draws_the_samples_of_the_per_step_one(clip, cfg, temperature):
    # the same generator gives the same samples, up to fp32 rounding, when its draws do not depend on how they
    # are grouped (CPU: rows x dim a multiple of 16); unclipped, the first step multiplies rounding by ~630
    from heads import DiffusionLoss
    torch.manual_seed(0)
    loss = DiffusionLoss(token_dim=12, n_embd=32, width=48, depth=2, clip_denoised=clip)
    with torch.no_grad():
        for p in loss.parameters():
            p.normal_(0, 0.2)  # not MAR's zero-initialised outputs: every weight matters
    z = torch.randn(8 if cfg != 1.0 else 4, 32)
    old = per_step_sampler(loss, z, torch.Generator().manual_seed(3), 50, temperature, cfg)
    with torch.no_grad():
        new = loss.sample(z, torch.Generator().manual_seed(3), temperature, cfg, diffusion_steps=50)
    torch.testing.assert_close(new, old, rtol=1e-4, atol=1e-4 * old.abs().max().item())


@pytest.mark.parametrize('head,order', [('global', 'random'), ('local', 'random'), ('linear', 'raster'),
                                        ('linear', 'random')])
def test_kv_cache_sampling_equals_recomputing_from_scratch(head, order):
    model = tiny_model(head, window=16 if head == 'local' else None)
    labels = torch.tensor([0, 5, 9])
    cached = generate(model, labels, order, torch.Generator().manual_seed(0))
    recomputed = generate(model, labels, order, torch.Generator().manual_seed(0), use_cache=False)
    assert cached.shape == (3, N) and cached.min() >= 0 and cached.max() < 512
    assert torch.equal(cached, recomputed)


def test_continuous_kv_cache_sampling_equals_recomputing():
    model = live_token_head(tiny_model(token_dim=12, diffusion_width=16, diffusion_depth=1))
    labels = torch.tensor([0, 5])
    cached = generate(model, labels, 'random', torch.Generator().manual_seed(0), diffusion_steps=10)  # 10: fast
    recomputed = generate(model, labels, 'random', torch.Generator().manual_seed(0), use_cache=False,
                          diffusion_steps=10)
    assert cached.shape == (2, N, 12)
    torch.testing.assert_close(cached, recomputed, atol=1e-4, rtol=1e-4)


def test_the_local_head_projects_each_prefix_state_once_while_sampling():
    model = tiny_model('local', window=16)
    rows = []
    for cross in model.head.cross:
        cross.kv.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[:2]))
    generate(model, torch.tensor([0, 5]), 'random', torch.Generator().manual_seed(0))
    per_layer = sum(b * t for b, t in rows) // len(model.head.cross)
    assert per_layer == 2 * N  # h_0..h_{N-1} of 2 images, each once; recomputing costs N per step


def test_top_k_one_samples_the_most_likely_token():
    head = tiny_model().token_head
    z = torch.randn(10, 32)
    tok = head.sample(z, torch.Generator().manual_seed(0), top_k=1)
    assert torch.equal(tok, head.linear(z).argmax(-1))


@pytest.mark.parametrize('n,steps', [(256, 256), (256, 64), (256, 8), (64, 64), (64, 1), (10, 3)])
def test_step_schedule_places_every_token_once_at_least_one_per_step(n, steps):
    sizes = sample.step_schedule(n, steps)
    assert len(sizes) == steps and sum(sizes) == n and min(sizes) >= 1
    if steps == n:
        assert sizes == [1] * n  # the paper: one (position, token) pair per step
    else:
        assert sizes[0] <= sizes[-1]  # cosine: few tokens first, many at the end (MAR)


def test_one_token_per_step_is_the_sequential_loop_and_cached_blocks_equal_recomputing():
    model = tiny_model('global')
    labels = torch.tensor([1, 4])
    sequential = generate(model, labels, 'random', torch.Generator().manual_seed(0))
    assert torch.equal(generate(model, labels, 'random', torch.Generator().manual_seed(0), num_steps=N), sequential)
    parallel = generate(model, labels, 'random', torch.Generator().manual_seed(0), num_steps=8)
    recomputed = generate(model, labels, 'random', torch.Generator().manual_seed(0), num_steps=8, use_cache=False)
    assert torch.equal(parallel, recomputed)


def test_parallel_decoding_fills_every_position():
    model = tiny_model(token_dim=12, diffusion_width=16, diffusion_depth=1)
    tokens = generate(model, torch.tensor([0, 3]), 'random', torch.Generator().manual_seed(0), num_steps=7,
                      diffusion_steps=5)
    assert tokens.shape == (2, N, 12) and (tokens != 0).any(-1).all()  # no position left at its initial zero


def test_confidence_order_fills_every_position_and_differs_from_random():
    model = tiny_model('global')
    labels = torch.tensor([2, 7])
    conf = generate(model, labels, 'random', torch.Generator().manual_seed(0), num_steps=16,
                    position_order='confidence')
    rand = generate(model, labels, 'random', torch.Generator().manual_seed(0), num_steps=16)
    assert conf.shape == (2, N) and not torch.equal(conf, rand)


@pytest.mark.parametrize('head', ['global', 'local', 'linear'])
def test_inpainting_keeps_the_given_tokens_exactly(head):
    model = tiny_model(head, window=16 if head == 'local' else None)
    given = torch.randint(512, (2, N))
    keep = torch.zeros(2, N, dtype=torch.bool)
    keep[:, [3, 10, 11, 40, 63]] = True  # any positions, for a 2D-random model
    out = generate(model, torch.tensor([0, 1]), 'random', torch.Generator().manual_seed(0), prefix=(given, keep))
    assert torch.equal(out[keep], given[keep]) and not torch.equal(out[~keep], given[~keep])
    again = generate(model, torch.tensor([0, 1]), 'random', torch.Generator().manual_seed(0), prefix=(given, keep),
                     use_cache=False)
    assert torch.equal(out, again)  # the kept block through the cache equals recomputing


def test_raster_models_only_continue_a_raster_prefix():
    model = tiny_model('linear')
    given = torch.randint(512, (1, N))
    top_rows = torch.arange(N)[None] < 2 * G
    out = generate(model, torch.tensor([0]), 'raster', torch.Generator().manual_seed(0), prefix=(given, top_rows))
    assert torch.equal(out[top_rows], given[top_rows])  # outpainting downwards from the top rows
    scattered = torch.zeros(1, N, dtype=torch.bool)
    scattered[0, [5, 30]] = True
    with pytest.raises(ValueError, match='can only continue a raster prefix'):
        generate(model, torch.tensor([0]), 'raster', torch.Generator().manual_seed(0), prefix=(given, scattered))
    with pytest.raises(ValueError, match=re.escape(f'--num_steps {N} must be in [1, {N - 2 * G}]')):  # for callers
        generate(model, torch.tensor([0]), 'raster', torch.Generator().manual_seed(0), num_steps=N,
                 prefix=(given, top_rows))


def test_a_raster_trained_2d_model_samples_in_the_order_asked_for():
    model = tiny_model()
    raster = generate(model, torch.tensor([0]), 'raster', torch.Generator().manual_seed(0))
    randomly = generate(model, torch.tensor([0]), 'raster', torch.Generator().manual_seed(0), position_order='random')
    assert not torch.equal(raster, randomly)  # another order conditions each token on other tokens


@pytest.mark.parametrize('mode', ['sequential', 'parallel', 'confidence', 'inpainting'])
def test_bf16_sampling_with_the_kv_cache_fills_the_grid_in_every_mode(mode):
    model = tiny_model()
    given = torch.randint(512, (2, N))
    keep = (torch.arange(N) % G < 3).expand(2, N)  # the first 3 columns
    kw = dict(sequential={}, parallel=dict(num_steps=16), confidence=dict(num_steps=16, position_order='confidence'),
              inpainting=dict(prefix=(given, keep)))[mode]
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = generate(model, torch.tensor([0, 7]), 'random', torch.Generator().manual_seed(0), **kw)
    assert out.shape == (2, N) and 0 <= out.min() and out.max() < 512
    if mode == 'inpainting':
        assert torch.equal(out[keep], given[keep])


def test_last_layer_attention_covers_exactly_the_tokens_read_before():
    model = tiny_model()
    w = sample.last_layer_attention(model, torch.randint(512, (1, N)), torch.tensor([3]))  # (N - 1, N)
    assert torch.equal(w.triu(1), torch.zeros_like(w))  # after reading position p: positions 0..p only
    assert (w.sum(1) < 1).all() and (w.sum(1) > 0).all()  # the rest goes to the class token


# -----------------------------------------------------------------------------
# the seed baselines: RAR and next-patch prediction

def test_rar_probability_is_one_before_the_anneal_zero_after_and_linear_between():
    args = train.get_parser().parse_args(['--max_steps', '1000'])  # defaults: anneal from 50% to 75%
    assert [train.rar_prob(s, args) for s in (0, 499, 500, 625, 750, 999)] == [1.0, 1.0, 1.0, 0.5, 0.0, 0.0]


def test_rar_batch_with_r_zero_is_the_raster_batch():
    g = torch.Generator().manual_seed(0)
    assert torch.equal(make_orders(4, N, 'rar', g, rar_prob=0.0), make_orders(4, N, 'raster', g))
    mixed = make_orders(64, N, 'rar', g, rar_prob=0.5)
    is_raster = (mixed == torch.arange(N)).all(1)
    assert 10 < is_raster.sum() < 54 and torch.equal(mixed.sort(1).values, torch.arange(N).expand(64, N))
    model = tiny_model('linear')
    idx, labels = fixed_batch(4)
    raster_loss = model(idx, labels, make_orders(4, N, 'raster', g), None)
    assert model(idx, labels, make_orders(4, N, 'rar', g, rar_prob=0.0), None) == raster_loss


def test_target_aware_logits_score_their_own_labels_after_unpermuting():
    model = tiny_model('linear')
    idx, labels = fixed_batch(3)
    orders = make_orders(3, N, 'random', torch.Generator().manual_seed(0))
    seq = take(idx, orders)
    h = model.transformer(seq[:, :-1], labels, orders[:, :-1], target_pos=orders)  # h[:, t] predicts orders[:, t]
    logits = model.token_head.linear(h)  # (3, N, V) in generation order
    grid_logits = logits.gather(1, orders.argsort(1)[..., None].expand_as(logits))  # un-permuted: raster layout
    expected = F.cross_entropy(grid_logits.flatten(0, 1), idx.flatten())  # each logit against its own pixel
    torch.testing.assert_close(model(idx, labels, orders, None), expected)


def test_only_the_target_aware_embedding_lets_a_random_order_model_learn_position_determined_tokens():
    # token = its position: in random order, the next token is knowable only from the target position
    idx = torch.arange(N).expand(16, N)
    labels = torch.zeros(16, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    model = tiny_model('linear').train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss = model(idx, labels, make_orders(16, N, 'random', g), None)
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < 0.3 * math.log(N)  # chance level without the target would stay near log(N - t)


def test_npp_patch_embedding_is_the_mean_of_its_tokens_and_its_loss_scores_every_code_of_the_next_patch():
    model = tiny_model('linear')
    idx, labels = fixed_batch(2)
    p, g = 2, G // 2
    grid = idx.view(2, G, G)
    emb = model.transformer.tok_emb
    inputs, codes, positions = [], [], []
    for r in range(g):  # direct computation, patch by patch in raster order
        for c in range(g):
            patch = grid[:, r * p:(r + 1) * p, c * p:(c + 1) * p].flatten(1)  # (2, 4) codes of the patch
            inputs.append(emb(patch).mean(1))  # Eq. 2
            codes.append(patch)
            positions.append(r * G + c)  # the patch-grid coordinates as a grid position
    t = model.transformer
    pos = torch.tensor(positions)
    x = torch.cat([t.cls_emb(labels)[:, None], torch.stack(inputs[:-1], 1)], 1)
    h = t.run(x + t.pos_emb(pos), is_causal=True)  # each input told the position of the next patch (shifted)
    logp = model.token_head.linear(h).log_softmax(-1)  # (2, g*g, V)
    expected = -torch.stack([logp[:, i].gather(1, codes[i]) for i in range(g * g)]).mean()  # Eq. 3
    torch.testing.assert_close(model(idx, labels, None, None, patch_size=2), expected)


def test_npp_segments_halve_the_patch_and_restart_the_learning_rate():
    args = train.get_parser().parse_args(['--max_steps', '100', '--npp_levels', '3', '--npp_lambda', '0.5',
                                          '--warmup_steps', '5', '--head', 'linear', '--order', 'raster'])
    segments = [train.npp_segment(s, args) for s in (0, 24, 25, 49, 50, 99)]
    assert segments == [(0, 25, 4), (0, 25, 4), (25, 50, 2), (25, 50, 2), (50, 100, 1), (50, 100, 1)]
    lr = [train.get_lr(s, args) for s in range(100)]
    assert lr[25] == lr[0] == args.lr / 5 and lr[50] == args.lr / 5  # warm restart of each segment
    assert lr[10] == args.lr and lr[19] == args.lr  # constant until the segment's last fifth
    assert abs(lr[24] - (args.lr + (1e-5 - args.lr) * 4 / 5)) < 1e-12 and lr[99] < lr[95] < lr[89] == args.lr
    one = train.get_parser().parse_args(['--max_steps', '100'])
    assert train.npp_segment(70, one) == (0, 100, 1)  # without NPP: one 1x1 segment


# -----------------------------------------------------------------------------
# tokenizers (tokenizers.py): the pixel palette, the built-in data, and the paper's tokenizers, built with random
# weights and saved in their official checkpoint formats (nothing can be downloaded); the official state dicts are
# written from the reference constructors' naming rules (LlamaGen tokenizer/tokenizer_image/vq_model.py, MAR
# models/vae.py), not from our modules

def test_pixel_tokenizer_round_trip_keeps_the_top_three_bits():
    images = torch.randint(0, 256, (4, 16, 16, 3), dtype=torch.uint8)
    tok = tokenizers.PixelTokenizer()
    tokens = tok.encode(images)
    assert tokens.shape == (4, 16, 16) and tokens.min() >= 0 and tokens.max() < 512
    decoded = tok.decode(tokens)
    assert torch.equal(decoded >> 5, images >> 5)
    assert torch.equal(tok.encode(decoded), tokens)


def test_the_cube_is_the_nearest_colour_of_its_palette_with_ties_to_the_later_colour():
    images = torch.randint(0, 256, (4, 16, 16, 3), dtype=torch.uint8)
    images[0, 0, :8] = torch.tensor([0, 31, 32, 33, 63, 64, 224, 255], dtype=torch.uint8)[:, None]  # bin edges
    cube = tokenizers.PixelTokenizer()
    assert torch.equal(tokenizers.PixelTokenizer(cube.palette.numpy()).encode(images), cube.encode(images))


def test_a_palette_of_few_colours_is_exact_and_of_many_the_k_means_centres():
    rng = np.random.default_rng(0)
    few = rng.integers(0, 256, (17, 3), dtype=np.uint8)[rng.integers(0, 17, 5000)]  # 17 colours
    assert np.array_equal(tokenizers.fit_palette(few, 512), np.unique(few, axis=0))
    centres = rng.integers(20, 236, (8, 3))
    noisy = np.clip(centres[rng.integers(0, 8, 20000)] + rng.integers(-6, 7, (20000, 3)), 0, 255).astype(np.uint8)
    palette = tokenizers.fit_palette(noisy, 8).astype(int)  # 8 clusters of ~2000 colours each
    assert len(palette) == 8 and np.abs(palette[:, None] - centres[None]).max(-1).min(0).max() <= 2


def test_pixel_patch_tokens_round_trip_exactly():
    images = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    tok = tokenizers.PixelPatchTokenizer(patch_size=2)
    tokens = tok.encode(images)
    assert tokens.shape == (2, 16, 16, 12) and tokens.min() >= -1 and tokens.max() <= 1
    assert torch.equal(tokens[0, 3, 5], images[0, 6:8, 10:12].float().div(127.5).sub(1).flatten())
    assert torch.equal(tok.decode(tokens), images)
    assert torch.equal(tok.decode(tokens.half().float()), images)  # the float16 cache keeps every level


def test_shapes_dataset_is_deterministic_and_class_structured():
    a, la = tokenizers.make_shapes(100, seed=0)
    b, lb = tokenizers.make_shapes(100, seed=0)
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert sorted(set(la.tolist())) == list(range(10))
    # the shape of a class is visible: mean foreground masks of two classes differ
    fg = (a.int().sum(-1) > a.int().sum(-1).flatten(1).min(1).values[:, None, None])
    assert (fg[la == 7].float().mean(0) - fg[la == 8].float().mean(0)).abs().max() > 0.5


@pytest.mark.parametrize('size', [16, 32])  # the pixel and the pixel_patch data
def test_every_shapes_image_is_its_own_mirror(size):
    # training sees each image or its mirror (as MAR): a class whose mirror differed would be two modes
    images, _ = tokenizers.make_shapes(50, size=size, seed=0)
    assert torch.equal(images, images.flip(2))


def test_every_pairs_image_draws_its_class_in_both_halves_in_one_colour():
    images, labels = tokenizers.make_shapes(200, seed=0, pairs=True)
    for image, label in zip(images, labels):
        lit = (image > 0).any(-1)  # (16, 16) the shape's pixels
        assert lit[:, :8].any() and lit[:, 8:].any() and len(torch.unique(image[lit], dim=0)) == 1
        if tokenizers.SHAPE_CLASSES[label] not in ('h_stripes', 'v_stripes'):  # the stripes fill the image
            assert not lit[:, 7:9].all(0).any()  # two shapes, no column lit from top to bottom between them
    again, _ = tokenizers.make_shapes(200, seed=0, pairs=True)
    assert torch.equal(images, again)  # deterministic in the seed


def test_center_crop_gives_the_target_size_from_any_aspect():
    for size in [(300, 200), (17, 90), (16, 16)]:
        arr = tokenizers.center_crop_arr(Image.new('RGB', size), 16)
        assert arr.shape == (16, 16, 3)


def test_16_bit_and_float_images_are_scaled_to_8_bits_not_clipped(tmp_path):
    Image.fromarray(np.full((4, 4), 0x8080, np.uint16)).save(tmp_path / 'grey16.png')  # 32896 / 257 = 128
    Image.fromarray(np.full((4, 4), 128 / 255, np.float32)).save(tmp_path / 'float.tif')
    for name, mode in (('grey16.png', 'I;16'), ('float.tif', 'F')):
        with Image.open(tmp_path / name) as im:
            assert im.mode == mode and np.asarray(tokenizers.to_rgb(im)).tolist() == [[[128] * 3] * 4] * 4
    Image.fromarray(np.full((4, 4), 200.0, np.float32)).save(tmp_path / 'float255.tif')  # not in [0, 1]
    with Image.open(tmp_path / 'float255.tif') as im, pytest.raises(ValueError, match=re.escape('only [0, 1]')):
        tokenizers.to_rgb(im)


def test_load_weights_names_the_file_and_the_first_unfit_or_non_finite_entries():
    good, key = tiny_model().state_dict(), 'transformer.cls_emb.weight'
    for state, message in [({k: v for k, v in good.items() if k != key}, rf"1 missing \({key}\)"),
                           (dict(good, extra=torch.zeros(1)), r"1 unexpected \(extra\)"),
                           (dict(good, **{key: torch.zeros(3, 3)}),
                            rf"1 wrongly shaped \({key}: \(3, 3\) in the file, \(11, 32\) in the model\)"),
                           (dict(good, **{key: good[key] / 0}), rf"NaN or inf in 1 of their tensors \({key}\)")]:
        with pytest.raises(SystemExit, match=rf"^error: x.pt: its 'ema' weights .*{message}") as e:
            load_weights(tiny_model(), state, 'x.pt', "its 'ema' weights")
        assert '\n' not in str(e.value)
    model = load_weights(tiny_model(), {k: v + 1 for k, v in good.items()}, 'x.pt', "its 'ema' weights")
    assert torch.equal(model.state_dict()[key], good[key] + 1)


ENC_LEVELS = [(128, 128), (128, 128), (128, 256), (256, 256), (256, 512)]  # (in, out) per level, highest res first


DEC_LEVELS = [(512, 512), (512, 256), (256, 256), (256, 128), (128, 128)]  # in forward order, lowest res first


def conv(name, c_out, c_in, k):
    return {f'{name}.weight': (c_out, c_in, k, k), f'{name}.bias': (c_out,)}


def norm(name, c):
    return {f'{name}.weight': (c,), f'{name}.bias': (c,)}


def resnet(name, c_in, c_out):
    keys = {**norm(f'{name}.norm1', c_in), **conv(f'{name}.conv1', c_out, c_in, 3),
            **norm(f'{name}.norm2', c_out), **conv(f'{name}.conv2', c_out, c_out, 3)}
    return {**keys, **conv(f'{name}.nin_shortcut', c_out, c_in, 1)} if c_in != c_out else keys


def attn(name, c):
    return {**norm(f'{name}.norm', c), **{k: v for p in 'qkv' for k, v in conv(f'{name}.{p}', c, c, 1).items()},
            **conv(f'{name}.proj_out', c, c, 1)}


def official_keys(model):
    """{name: shape} of the released state dict: model 'vq' (vq_ds16_c2i.pt) or 'vae' (kl16.ckpt)."""
    vq = model == 'vq'
    res, down, up = ('res', 'conv_blocks', 'conv_blocks') if vq else ('block', 'down', 'up')
    mid = ('0', '1', '2') if vq else ('block_1', 'attn_1', 'block_2')
    z_enc, z_dec = (256, 256) if vq else (32, 16)
    keys = {}
    for part, z_in, z_out in (('encoder', 3, z_enc), ('decoder', z_dec, 3)):
        keys.update(conv(f'{part}.conv_in', 512 if part == 'decoder' else 128, z_in, 3))
        keys.update({**resnet(f'{part}.mid.{mid[0]}', 512, 512), **attn(f'{part}.mid.{mid[1]}', 512),
                     **resnet(f'{part}.mid.{mid[2]}', 512, 512)})
        keys.update(norm(f'{part}.norm_out', 512 if part == 'encoder' else 128))
        keys.update(conv(f'{part}.conv_out', z_out, 512 if part == 'encoder' else 128, 3))
    for i, (c_in, c_out) in enumerate(ENC_LEVELS):
        for j in range(2):
            keys.update(resnet(f'encoder.{down}.{i}.{res}.{j}', c_in if j == 0 else c_out, c_out))
            if i == 4:  # LlamaGen: the last level; MAR: attn_resolutions (16,) at resolution 256
                keys.update(attn(f'encoder.{down}.{i}.attn.{j}', c_out))
        if i < 4:
            keys.update(conv(f'encoder.{down}.{i}.downsample.conv', c_out, c_out, 3))
    for k, (c_in, c_out) in enumerate(DEC_LEVELS):
        i = k if vq else 4 - k  # LlamaGen appends (.0 lowest resolution), MAR prepends (.0 highest)
        for j in range(3):
            keys.update(resnet(f'decoder.{up}.{i}.{res}.{j}', c_in if j == 0 else c_out, c_out))
            if vq and k == 0:  # MAR's decoder has attn_resolutions ()
                keys.update(attn(f'decoder.{up}.{i}.attn.{j}', c_out))
        if k < 4:
            keys.update(conv(f'decoder.{up}.{i}.upsample.conv', c_out, c_out, 3))
    if vq:
        keys.update({**conv('quant_conv', 8, 256, 1), **conv('post_quant_conv', 256, 8, 1)})
        keys.update({'quantize.embedding.weight': (16384, 8), 'quantize.codebook_used': (65536,)})
    else:
        keys.update({**conv('quant_conv', 32, 32, 1), **conv('post_quant_conv', 16, 16, 1)})
    return keys


def test_official_key_lists_have_the_reported_sizes():
    # totals from the reference dumps: 343 parameters + 1 buffer for VQ-16, 312 parameters for KL-16
    vq, kl = official_keys('vq'), official_keys('vae')
    assert len(vq) == 344 and len(kl) == 312
    numel = lambda keys: sum(torch.Size(s).numel() for k, s in keys.items() if k != 'quantize.codebook_used')
    assert numel(vq) == 71_883_403 and numel(kl) == 66_456_019  # the parameter counts of the two released models


@pytest.fixture(scope='module')
def vq_file(tmp_path_factory):
    torch.manual_seed(0)
    sd = tokenizers.VQModel().state_dict()
    sd['quantize.codebook_used'] = torch.randint(16384, (65536,)).float()  # as in the released file
    path = tmp_path_factory.mktemp('vq') / 'vq_ds16_c2i.pt'
    torch.save({'model': sd, 'steps': 0}, path)
    return path, sd


@pytest.fixture(scope='module')
def vae_file(tmp_path_factory):
    torch.manual_seed(0)
    sd = tokenizers.AutoencoderKL().state_dict()
    path = tmp_path_factory.mktemp('vae') / 'kl16.ckpt'
    torch.save({'model': sd}, path)
    return path, sd


@pytest.fixture(scope='module')
def vq(vq_file):
    return tokenizers.load_tokenizer('vq', vq_file[0])


@pytest.fixture(scope='module')
def vae(vae_file):
    return tokenizers.load_tokenizer('vae', vae_file[0])


def test_state_dict_names_and_shapes_equal_the_official_ones():
    torch.manual_seed(0)
    for model, name in ((tokenizers.VQModel(), 'vq'), (tokenizers.AutoencoderKL(), 'vae')):
        expected = official_keys(name)
        expected.pop('quantize.codebook_used', None)  # LlamaGen's training-only buffer, which the loader drops
        assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected


def images(B=2, size=32, seed=0):
    return torch.rand(B, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1  # in [-1, 1]


def test_vq_checkpoint_loads_and_encodes_to_indices_and_decodes_to_images(vq_file, vq):
    assert all(torch.equal(v, vq_file[1][k]) for k, v in vq.state_dict().items())
    assert not vq.training and not any(p.requires_grad for p in vq.parameters())
    idx = vq.encode(images())
    assert idx.shape == (2, 2, 2) and idx.dtype == torch.int64
    assert 0 <= idx.min() and idx.max() < vq.vocab_size == 16384
    x = vq.decode(idx)
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float32 and x.isfinite().all()


def test_vae_checkpoint_loads_and_encodes_to_moments_and_decodes_to_images(vae_file, vae):
    assert all(torch.equal(v, vae_file[1][k]) for k, v in vae.state_dict().items())
    assert not vae.training and not any(p.requires_grad for p in vae.parameters())
    moments = vae.encode_moments(images())
    assert moments.shape == (2, 32, 2, 2) and moments.isfinite().all()
    z = tokenizers.sample_latent(moments, torch.Generator().manual_seed(0))
    assert z.shape == (2, vae.token_dim, 2, 2) and vae.token_dim == 16
    x = vae.decode(z)
    assert x.shape == (2, 3, 32, 32) and x.isfinite().all()


def test_checkpoint_with_a_missing_key_is_refused_naming_it(vae_file, tmp_path):
    path, sd = vae_file
    sd = dict(sd)
    del sd['decoder.up.3.upsample.conv.bias']
    torch.save({'model': sd}, tmp_path / 'kl16.ckpt')
    with pytest.raises(SystemExit, match=r"kl16.ckpt: expected a MAR KL-16 .*1 missing \(decoder.up.3.upsample"):
        tokenizers.load_tokenizer('vae', tmp_path / 'kl16.ckpt')


def test_checkpoint_with_a_renamed_key_is_refused_naming_both_names(vq_file, tmp_path):
    path, sd = vq_file
    sd = dict(sd)
    sd['decoder.conv_blocks.0.block.0.conv1.weight'] = sd.pop('decoder.conv_blocks.0.res.0.conv1.weight')  # MAR's
    torch.save({'model': sd}, tmp_path / 'vq.pt')
    with pytest.raises(SystemExit, match=r"expected a LlamaGen VQ-16 .*1 missing \(decoder.conv_blocks.0.res.0.conv1"
                                         r".*1 unexpected \(decoder.conv_blocks.0.block.0.conv1"):
        tokenizers.load_tokenizer('vq', tmp_path / 'vq.pt')


def test_the_other_tokenizers_checkpoint_is_refused(vae_file):
    with pytest.raises(SystemExit, match=r"expected a LlamaGen VQ-16 .* missing .* unexpected"):
        tokenizers.load_tokenizer('vq', vae_file[0])


def test_files_that_are_not_such_checkpoints_are_refused_in_one_line(tmp_path):
    torch.save({'state_dict': {}}, tmp_path / 'other.pt')
    (tmp_path / 'junk.pt').write_bytes(bytes(range(256)) * 4)
    torch.save({'model': {}, 'args': argparse.Namespace(lr=1e-4)}, tmp_path / 'train.pt')  # as vq_train.py saves
    for file, message in (('other.pt', r"'model' state dict, found top-level keys \['state_dict'\]"),
                          ('junk.pt', r"not a readable torch checkpoint"), ('missing.pt', r"no such file"),
                          ('train.pt', r"pickled Python objects .* weights_only=False")):
        with pytest.raises(SystemExit, match=rf"^error: .*{file}: .*{message}") as e:
            tokenizers.load_tokenizer('vq', tmp_path / file)
        assert '\n' not in str(e.value)


def test_nearest_code_has_the_maximum_cosine_similarity():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 8, 4, 5, generator=g)
    codebook = torch.randn(1000, 8, generator=g) * torch.rand(1000, 1, generator=g) * 3  # rows of any norm
    idx = tokenizers.nearest_code(z, codebook)
    assert idx.shape == (3, 4, 5) and idx.dtype == torch.int64
    cos = torch.einsum('bchw,nc->bhwn', F.normalize(z, dim=1), F.normalize(codebook, dim=1))  # (3, 4, 5, 1000)
    assert torch.allclose(cos.gather(-1, idx[..., None])[..., 0], cos.max(-1).values, atol=1e-6)


def test_nearest_code_finds_a_planted_code_at_each_grid_position():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 8, 3, 4, generator=g)
    codebook = torch.randn(500, 8, generator=g)
    planted = torch.randperm(500, generator=g)[:24].view(2, 3, 4)
    codebook[planted] = 5 * z.permute(0, 2, 3, 1)  # same directions as the latents, another norm
    assert torch.equal(tokenizers.nearest_code(z, codebook), planted)


def test_vq_decode_uses_the_normalised_codebook(vq):
    idx = torch.tensor([[[0, 1], [2, 16383]]])
    x = vq.decode(idx)
    table = vq.quantize.embedding.weight
    stored = table.clone()
    table.mul_(3.0)  # LlamaGen normalises the stored table at every use, so its norms do not matter
    try:
        torch.testing.assert_close(vq.decode(idx), x, atol=1e-4, rtol=1e-4)  # fp32 rounding through 30 convs
    finally:
        table.copy_(stored)


def test_sample_latent_is_the_scaled_mean_when_std_is_tiny():
    mean = torch.randn(2, 16, 3, 3, generator=torch.Generator().manual_seed(0))
    moments = torch.cat([mean, torch.full_like(mean, -100.0)], dim=1)  # logvar clamped to -30: std = 3e-7
    z = tokenizers.sample_latent(moments, torch.Generator().manual_seed(1))
    assert torch.allclose(z, 0.2325 * mean, atol=1e-6)  # MAR's latent scale


def test_sample_latent_draws_std_exp_half_logvar_clamped_from_the_generator():
    mean = torch.randn(4, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    for logvar, std in ((0.0, 1.0), (2.0, 2.718281828), (100.0, 22026.4658)):  # 100 is clamped to 20: std e^10
        moments = torch.cat([mean, torch.full_like(mean, logvar)], dim=1)
        z = tokenizers.sample_latent(moments, torch.Generator().manual_seed(1))
        assert abs((z / 0.2325 - mean).std().item() / std - 1) < 0.05
        assert torch.equal(z, tokenizers.sample_latent(moments, torch.Generator().manual_seed(1)))


def test_vae_decode_divides_by_the_latent_scale(vae):
    z = torch.randn(2, 16, 2, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(vae.decode(0.2325 * z), vae.decoder(vae.post_quant_conv(z)), atol=1e-4, rtol=1e-4)


def test_vae_latents_are_sampled_afresh_from_the_cached_moments():
    moments = torch.cat([torch.zeros(2, 3, 3, 16), torch.zeros(2, 3, 3, 16)], dim=-1)  # mean 0, std 1
    a = tokenizers.VAETokenizer.from_cache(moments, torch.Generator().manual_seed(0))
    b = tokenizers.VAETokenizer.from_cache(moments, torch.Generator().manual_seed(1))
    assert a.shape == (2, 3, 3, 16) and not torch.equal(a, b)
    assert abs(a.std().item() / 0.2325 - 1) < 0.2  # scaled by MAR's 0.2325


# -----------------------------------------------------------------------------
# fid.py. The published Inception weights cannot be downloaded here, so the network runs with random weights saved
# under the published key names. The oracle tests against pytorch-fid and torch-fidelity skip when those packages are
# not installed (pip install pytorch-fid torch-fidelity to run them; both matched to 0.0 in pool3).

def random_inception(seed=0):
    """FIDInception with random weights that keep activations O(1) through its 94 convolutions (He init and
    random BatchNorm statistics), in eval mode."""
    torch.manual_seed(seed)
    model = fid.FIDInception()
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity='relu')
        elif isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
    nn.init.normal_(model.fc.weight, std=0.05)
    return model.eval()


@pytest.fixture(scope='module')
def inception_weights(tmp_path_factory):
    """A random FIDInception saved as a plain state dict, as pytorch-fid's file is."""
    path = str(tmp_path_factory.mktemp('inception') / fid.WEIGHTS_FILE)
    torch.save(random_inception().state_dict(), path)
    return path


def random_images(n, size, seed=0):
    """uint8 images (n, size, size, 3): smooth colour blobs plus noise, so that they differ in content."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randint(0, 256, (n, 3, 4, 4), generator=g).float()
    x = F.interpolate(low, size=(size, size), mode='bilinear', align_corners=False)
    x = x + 20 * torch.randn(x.shape, generator=g)
    return x.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # (n, size, size, 3)


def run_fid(*argv):
    fid.main(fid.get_parser().parse_args(list(argv)))


class TinyInception(nn.Module):
    """A stand-in for the FID Inception with its interface, (pool, spatial) and fc, that scores thousands of
    images a second: pooled pixels and a fixed random projection. For tests of reading, streaming and the CLI."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj, self.fc = nn.Linear(48, 32), nn.Linear(32, 10)

    def forward(self, x):
        return self.proj(F.adaptive_avg_pool2d(x, 4).flatten(1)).relu(), F.adaptive_avg_pool2d(x, 2).flatten(1)


def cheap_preprocess(images, resize='tf1'):
    return images.permute(0, 3, 1, 2).float() / 128 - 1  # (B, 3, H, W), no resize to 299: TinyInception's input


@pytest.fixture
def tiny_fid(monkeypatch):
    """fid.py with TinyInception in place of the weights file and the resize to 299."""
    monkeypatch.setattr(fid, 'load_inception', lambda *a, **kw: TinyInception().eval())
    monkeypatch.setattr(fid, 'preprocess', cheap_preprocess)


def test_inception_has_the_published_state_dict_keys_and_shapes():
    sd = fid.FIDInception().state_dict()
    assert len(sd) == 566  # 94 conv+BN units x 6 keys (with num_batches_tracked) + fc.weight, fc.bias
    assert sum(k.endswith('conv.weight') for k in sd) == 94
    assert sum(v.numel() for k, v in sd.items() if 'running' not in k and 'num_batches' not in k) == 23_850_960
    expected = {  # from the published file's layout (torchvision's Inception3 with 1008 classes, no AuxLogits)
        'Conv2d_1a_3x3.conv.weight': (32, 3, 3, 3), 'Conv2d_4a_3x3.bn.running_var': (192,),
        'Mixed_5b.branch_pool.conv.weight': (32, 192, 1, 1), 'Mixed_6a.branch3x3.conv.weight': (384, 288, 3, 3),
        'Mixed_6b.branch7x7_2.conv.weight': (128, 128, 1, 7), 'Mixed_6e.branch7x7dbl_5.conv.weight': (192, 192, 1, 7),
        'Mixed_7a.branch7x7x3_4.conv.weight': (192, 192, 3, 3), 'Mixed_7b.branch3x3dbl_1.conv.weight': (448, 1280, 1, 1),
        'Mixed_7c.branch3x3dbl_3b.conv.weight': (384, 384, 3, 1), 'fc.weight': (1008, 2048), 'fc.bias': (1008,)}
    assert {k: tuple(sd[k].shape) for k in expected} == expected
    assert all(m.eps == 0.001 for m in fid.FIDInception().modules() if isinstance(m, nn.BatchNorm2d))


@pytest.mark.parametrize('num_batches_tracked', [True, False])  # pytorch-fid's file has them, torch-fidelity's not
def test_random_weights_saved_under_the_published_keys_load_back_strictly(tmp_path, num_batches_tracked):
    sd = random_inception(seed=1).state_dict()
    if not num_batches_tracked:
        sd = {k: v for k, v in sd.items() if not k.endswith('num_batches_tracked')}
    torch.save(sd, tmp_path / 'w.pth')
    model = fid.load_inception(str(tmp_path / 'w.pth'))
    assert not model.training
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in sd.items())


def test_missing_weights_file_names_the_file_and_where_it_is_published(tmp_path):
    with pytest.raises(SystemExit) as e:
        fid.load_inception(str(tmp_path / 'nope.pth'))
    msg = str(e.value)
    assert msg.startswith('error: ') and '\n' not in msg
    assert 'nope.pth' in msg and fid.WEIGHTS_FILE in msg and fid.WEIGHTS_URL in msg


def test_weights_with_wrong_keys_are_refused_in_one_line(tmp_path):
    sd = fid.FIDInception().state_dict()
    sd['AuxLogits.fc.weight'] = torch.zeros(1000, 768)  # torchvision's ImageNet Inception, not the FID one
    del sd['fc.bias']
    torch.save(sd, tmp_path / 'w.pth')
    with pytest.raises(SystemExit) as e:
        fid.load_inception(str(tmp_path / 'w.pth'))
    msg = str(e.value)
    assert msg.startswith('error: ') and '\n' not in msg and 'fc.bias' in msg and 'AuxLogits.fc.weight' in msg


def test_spatial_features_are_the_first_7_channels_of_mixed_6d_1x1_branch_in_hwc_order():
    model = random_inception()
    seen = {}
    model.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: seen.setdefault('out', o))
    with torch.no_grad():
        pool, spatial = model(fid.preprocess(torch.from_numpy(random_images(1, 299))))
    assert pool.shape == (1, 2048) and spatial.shape == (1, 2023)
    nhwc = seen['out'].permute(0, 2, 3, 1)  # (1, 17, 17, 192), as TF lays out 'mixed_6/conv:0'
    assert torch.equal(spatial, nhwc[..., :7].reshape(1, -1))
    assert pool.std() > 0.1 and spatial.std() > 0.1  # the random network is not degenerate


def tf1_resize_by_hand(img, out_size):
    """TF 1's ResizeBilinear (align_corners=False) written out per pixel: in = out_index * (in_size / out_size)
    in float32, lo = floor(in), hi = min(lo + 1, in_size - 1), interpolate along x, then y."""
    H, W = img.shape
    out = np.zeros((out_size, out_size), np.float32)
    for i in range(out_size):
        y = np.float32(i) * np.float32(H / out_size)
        y0 = int(y)
        y1, dy = min(y0 + 1, H - 1), y - np.float32(y0)
        for j in range(out_size):
            x = np.float32(j) * np.float32(W / out_size)
            x0 = int(x)
            x1, dx = min(x0 + 1, W - 1), x - np.float32(x0)
            top = img[y0, x0] + (img[y0, x1] - img[y0, x0]) * dx
            bottom = img[y1, x0] + (img[y1, x1] - img[y1, x0]) * dx
            out[i, j] = top + (bottom - top) * dy
    return out


@pytest.mark.parametrize('shape,size', [((5, 7), 11), ((9, 6), 4), ((3, 3), 8)])  # up, down, 3 -> 8
def test_tf1_resize_matches_the_tf1_bilinear_rule_computed_directly(shape, size):
    img = np.random.default_rng(0).integers(0, 256, shape).astype(np.float32)
    ours = fid.resize_tf1(torch.from_numpy(img)[None, None], size)[0, 0].numpy()
    np.testing.assert_allclose(ours, tf1_resize_by_hand(img, size), rtol=0, atol=1e-4)
    half_pixel = F.interpolate(torch.from_numpy(img)[None, None], size=(size, size), mode='bilinear')[0, 0].numpy()
    assert np.abs(ours - half_pixel).max() > 1  # the rule differs from PyTorch's (pytorch-fid's) resize


def test_tf1_preprocessing_of_a_299_image_is_exactly_x_minus_128_over_128():
    images = torch.from_numpy(random_images(1, 299))
    x = fid.preprocess(images, 'tf1')
    assert torch.equal(x, (images.permute(0, 3, 1, 2).float() - 128) / 128)


def test_frechet_distance_equals_the_closed_form_for_diagonal_gaussians():
    g = np.random.default_rng(0)
    mu1, mu2, s1, s2 = g.normal(size=16), g.normal(size=16), g.uniform(0.1, 3, 16), g.uniform(0.1, 3, 16)
    closed_form = ((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum()
    assert fid.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(closed_form, rel=1e-10)


def test_frechet_distance_is_zero_for_identical_statistics():
    a = np.random.default_rng(0).normal(size=(500, 64))
    mu, sigma = a.mean(0), np.cov(a, rowvar=False)
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-9 * np.trace(sigma)


def test_frechet_distance_refuses_a_large_imaginary_part():
    with pytest.raises(ValueError, match='imaginary'):  # a "covariance" with a negative eigenvalue
        fid.frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2))


def test_blockwise_covariance_equals_np_cov_of_the_float64_features():
    x = (np.random.default_rng(0).normal(size=(1000, 16)) * 3 + 5).astype(np.float32)
    mu, sigma = fid.mean_cov(x, block=300)  # blocks of 300, 300, 300, 100 rows
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(mu, x.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-10, atol=1e-12)


def test_inception_score_is_one_for_identical_predictions():
    logits = np.tile(np.random.default_rng(0).normal(size=1008), (50, 1))
    assert fid.inception_score(logits) == pytest.approx(1.0, abs=1e-12)


def test_inception_score_equals_the_number_of_classes_for_uniform_one_hot_predictions():
    logits = 60 * np.eye(1008)[np.arange(2 * 1008) % 1008]  # every class twice, softmax one-hot to 1e-23
    assert fid.inception_score(logits, splits='adm') == pytest.approx(1008, rel=1e-9)  # 2016 images: one split


def test_torch_fidelity_inception_score_shuffles_class_sorted_samples_before_splitting():
    logits = 60 * np.eye(1008)[np.repeat(np.arange(10), 100)]  # sorted by class: each unshuffled split is one class
    assert fid.inception_score(logits, splits='torch_fidelity') > 8  # shuffled: ~10 classes per split, not 1


def test_adm_inception_score_equals_adms_formula_on_class_sorted_samples():
    g = np.random.default_rng(0)
    labels = np.repeat(np.arange(100), 110)  # 11,000 samples sorted by class: ADM splits 5000, 5000, 1000 in order
    logits = 8 * np.eye(100)[labels] + g.normal(size=(len(labels), 100))  # 100 classes keep the test fast
    preds = np.exp(logits - logits.max(1, keepdims=True))
    preds /= preds.sum(1, keepdims=True)  # softmax, (11000, 100)
    scores = []
    for i in range(0, len(preds), 5000):  # evaluator.py compute_inception_score, written out
        part = preds[i:i + 5000]
        kl = part * (np.log(part) - np.log(np.mean(part, 0, keepdims=True)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    assert fid.inception_score(logits, 'adm') == pytest.approx(np.mean(scores), rel=1e-10)
    assert fid.inception_score(logits, 'torch_fidelity') > 1.2 * np.mean(scores)  # its shuffled splits see all classes


@pytest.mark.parametrize('call', [lambda: fid.inception_score(np.zeros((9, 1008)), 'torch_fidelity'),
                                  lambda: fid.inception_score(np.zeros((0, 1008)), 'adm'),
                                  lambda: fid.precision_recall(np.zeros((3, 4)), np.zeros((9, 4)), k=3)])
def test_too_few_images_for_is_or_precision_recall_raise_an_error_that_python_o_keeps(call):
    with pytest.raises(ValueError, match='need'):
        call()


def test_precision_recall_match_a_brute_force_count():
    g = np.random.default_rng(0)
    real, fake = g.normal(size=(40, 5)), g.normal(size=(30, 5)) * 0.7 + 0.8
    d = lambda a, b: ((a[:, None] - b[None]) ** 2).sum(-1)  # noqa: E731
    radius = lambda a: np.sort(d(a, a), axis=1)[:, 3]  # 3rd nearest neighbour, the point itself excluded # noqa
    precision = (d(fake, real) <= radius(real)[None]).any(1).mean()
    recall = (d(real, fake) <= radius(fake)[None]).any(1).mean()
    assert 0 < precision < 1 and 0 < recall < 1
    assert fid.precision_recall(real, fake, k=3, max_block=100) == pytest.approx((precision, recall))  # 2-3 rows


@pytest.mark.parametrize('kind', ['stored', 'deflated', 'folder'])
def test_image_sets_read_in_slices_give_the_whole_array_in_any_order(tmp_path, kind):
    images = random_images(10, 8)
    if kind == 'folder':
        for i, im in enumerate(images):
            Image.fromarray(im).save(tmp_path / f'{i:02d}.png')
        path = str(tmp_path)
    else:
        path = str(tmp_path / 'x.npz')
        (np.savez if kind == 'stored' else np.savez_compressed)(path, arr_0=images)
    loaded = fid.load_images(path)
    assert len(loaded) == 10 and tuple(loaded.shape) == (10, 8, 8, 3)
    parts = [loaded[0:3], loaded[3:7], loaded[7:10], loaded[2:5], loaded[9:20]]  # on, then back, then past the end
    assert all(p.dtype == np.uint8 and p.flags.writeable for p in parts)
    assert np.array_equal(np.concatenate(parts[:3]), images) and np.array_equal(parts[3], images[2:5])
    assert np.array_equal(parts[4], images[9:])


def test_image_folder_is_read_recursively_and_needs_one_size(tmp_path):
    images = random_images(3, 16)
    os.makedirs(tmp_path / 'a' / 'b')
    for i, name in enumerate(['a/0.png', 'a/b/1.png', '2.png']):
        Image.fromarray(images[i]).save(tmp_path / name)
    (tmp_path / 'notes.txt').write_text('not an image')
    loaded = fid.load_images(str(tmp_path))[:]  # read lazily: a slice decodes the files
    assert loaded.dtype == np.uint8 and loaded.shape == (3, 16, 16, 3)
    assert sorted(map(bytes, loaded)) == sorted(map(bytes, images))
    Image.fromarray(random_images(1, 8)[0]).save(tmp_path / 'small.png')
    with pytest.raises(SystemExit, match='sizes'):
        fid.load_images(str(tmp_path))


def test_tf1_features_match_torch_fidelity(inception_weights):
    extractor = pytest.importorskip('torch_fidelity.feature_extractor_inceptionv3')
    theirs = extractor.FeatureExtractorInceptionV3('inception-v3-compat', ['2048', 'logits_unbiased'],
                                                   feature_extractor_weights_path=inception_weights)
    images = random_images(2, 64)
    ours = fid.features(fid.load_inception(inception_weights), images)
    with torch.no_grad():
        pool, logits = theirs(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())
    np.testing.assert_allclose(ours['pool'], pool.double().numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours['logits'], logits.double().numpy(), rtol=1e-5, atol=1e-5)


def test_pytorch_resize_features_match_pytorch_fid(inception_weights, monkeypatch):
    inception = pytest.importorskip('pytorch_fid.inception')
    monkeypatch.setattr(inception, 'load_state_dict_from_url', lambda *a, **kw: torch.load(inception_weights, weights_only=True))
    theirs = inception.InceptionV3([3]).eval()
    images = random_images(2, 64)
    ours = fid.features(fid.load_inception(inception_weights), images, resize='pytorch')
    with torch.no_grad():
        pool = theirs(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255)[0].flatten(1)
    np.testing.assert_allclose(ours['pool'], pool.double().numpy(), rtol=1e-5, atol=1e-5)


def test_resize_and_inception_score_match_torch_fidelity():
    interp = pytest.importorskip('torch_fidelity.interpolate_compat_tensorflow')
    isc = pytest.importorskip('torch_fidelity.metric_isc')
    x = torch.from_numpy(random_images(2, 37)).permute(0, 3, 1, 2).float()
    theirs = interp.interpolate_bilinear_2d_like_tensorflow1x(x, size=(299, 299), align_corners=False)
    assert torch.equal(fid.resize_tf1(x), theirs)
    logits = torch.randn(1000, 1008, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3
    expected = isc.isc_features_to_metric(logits, splits=10, shuffle=True, rng_seed=2020)['inception_score_mean']
    assert fid.inception_score(logits.numpy(), 'torch_fidelity') == pytest.approx(expected, rel=1e-12)


@pytest.fixture(scope='module')
def shapes_metric():
    """The small-image metric of 8x8 shapes, as the pixel tokenizer renders them: fit on 3000, 1000 held out."""
    tok = tokenizers.PixelTokenizer()
    render = lambda n, seed: (tok.decode(tok.encode(tokenizers.make_shapes(n, size=G, seed=seed)[0])),  # noqa: E731
                              tokenizers.make_shapes(n, size=G, seed=seed)[1])
    (train_images, train_labels), (ref_images, ref_labels) = render(3000, 0), render(1000, 1)
    return fid.SmallImageMetric(train_images, train_labels, ref_images, ref_labels, dim=32), train_images, train_labels


def test_small_image_metric_scores_held_out_real_images_near_its_floor_and_noise_far_above(shapes_metric):
    metric, _, _ = shapes_metric
    tok = tokenizers.PixelTokenizer()
    images, labels = tokenizers.make_shapes(500, size=G, seed=2)
    real = metric(tok.decode(tok.encode(images)), labels)  # real images the metric was not fit on
    assert real['fd'] < 1.5 * real['fd_floor']
    assert real['class_acc'] > 0.6 and abs(real['class_acc'] - metric.class_acc_real) < 0.1  # 8x8 shapes: crude
    noise = metric(torch.randint(0, 256, (500, G, G, 3), dtype=torch.uint8), labels)
    assert noise['fd'] > 20 * real['fd_floor'] and noise['class_acc'] < 0.3  # 10 classes: chance is 0.1


def test_small_image_metric_scores_a_trained_model_better_than_an_untrained_one(shapes_metric):
    metric, train_images, train_labels = shapes_metric
    tok = tokenizers.PixelTokenizer()
    idx = tok.encode(train_images[:2000]).flatten(1)  # (2000, 64) the training tokens again
    model = tiny_model('linear').train()
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(200) % 10
    untrained = metric(tok.decode(generate(model.eval(), labels, 'raster', g).view(-1, G, G)), labels)
    opt = torch.optim.AdamW(model.train().parameters(), lr=3e-3)
    for step in range(150):
        rows = torch.randint(2000, (32,), generator=g)
        model(idx[rows], train_labels[:2000][rows], make_orders(32, N, 'raster', g), None).backward()
        opt.step()
        opt.zero_grad()
    trained = metric(tok.decode(generate(model.eval(), labels, 'raster', g).view(-1, G, G)), labels)
    assert trained['fd'] < untrained['fd'] / 3 and trained['class_acc'] > untrained['class_acc']


@cli
def test_stats_round_trip_through_save_stats_and_the_cli_prints_each_metric(tmp_path, inception_weights, capsys, monkeypatch):
    images = random_images(4, 32)  # 4 images: precision/recall with k = 3 need more than 3
    samples, out = str(tmp_path / 'samples.npz'), str(tmp_path / 'stats.npz')
    np.savez(samples, arr_0=images, arr_1=np.arange(4))  # sample.py's layout
    # scipy's sqrtm of a singular 2048x2048 product takes ~30 s on 2 cores and frechet_distance has its own
    # tests: here we record the statistics compared, with a distance that is 0 when they are equal
    compared = []
    monkeypatch.setattr(fid, 'frechet_distance', lambda *s: compared.append(s) or
                        np.abs(s[0] - s[2]).max() + np.abs(s[1] - s[3]).max())
    run_fid(samples, samples, '--save_stats', out, '--inception', inception_weights)  # the samples against themselves
    lines = dict(line.split() for line in capsys.readouterr().out.splitlines() if not line.startswith(('/', 'wrote')))
    assert list(lines) == ['FID', 'sFID', 'IS', 'precision', 'recall']
    assert float(lines['FID']) == float(lines['sFID']) == 0 and float(lines['precision']) == float(lines['recall']) == 1
    with np.load(out) as f:
        saved = dict(f)
    assert {k: v.shape for k, v in saved.items()} == {'arr_0': (4, 32, 32, 3), **fid.STATS_SHAPES}
    assert np.array_equal(saved['arr_0'], images) and saved['sigma'].std() > 0 and saved['sigma_s'].std() > 0
    (mu, sigma, _, _), (mu_s, sigma_s, _, _) = compared  # the samples' statistics in the FID and sFID
    assert all(np.array_equal(saved[k], v) for k, v in dict(mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s).items())
    np.savez(tmp_path / 'stats_only.npz', **{k: saved[k] for k in fid.STATS_SHAPES})
    ref, ref_pool = fid.load_reference(str(tmp_path / 'stats_only.npz'), model=None)  # read back, no images
    assert ref_pool is None and all(np.array_equal(ref[k], saved[k]) for k in fid.STATS_SHAPES)


MEMORY_CHILD = """
import functools, sys
import numpy as np
import fid, test_heptapod as t
fid.load_inception, fid.preprocess = lambda *a, **kw: t.TinyInception().eval(), t.cheap_preprocess
fid.precision_recall = functools.partial(fid.precision_recall, max_block=2 ** 16)  # 256 KB distance blocks
fid.main(fid.get_parser().parse_args([sys.argv[2]] * 2 + sys.argv[3:]))  # first calls allocate pools: not counted
def peak():  # KiB. Not ru_maxrss: a child started by vfork and exec keeps its parent's (pytest's) in it
    return int(next(line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM')))
def reset():  # Linux: the peak RSS starts again from the current RSS
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')
    return peak()
base = reset()
fid.main(fid.get_parser().parse_args(sys.argv[1:]))
print('streamed_kib', peak() - base)
base = reset()
with np.load(sys.argv[1]) as f:
    images = f['arr_0']  # what fid.py did before: the whole array in memory
print('whole_kib', peak() - base)
"""


@cli
def test_npz_larger_than_a_memory_cap_is_streamed_and_scores_as_the_in_memory_array(tmp_path, tiny_fid, monkeypatch):
    if not os.access('/proc/self/clear_refs', os.W_OK):
        pytest.skip('measuring the peak memory of a step needs Linux /proc/self/clear_refs')
    low = np.random.default_rng(1).integers(0, 256, (6000, 8, 8, 3), dtype=np.uint8)
    images, ref_images = low.repeat(8, 1).repeat(8, 2), random_images(300, 64, seed=2)  # (6000, 64, 64, 3): fast
    np.savez(tmp_path / 'samples.npz', arr_0=images)  # 74 MB, stored (not compressed) as sample.py writes it
    np.savez(tmp_path / 'ref.npz', arr_0=ref_images)
    cap_kib = images.nbytes // 4 // 1024  # a quarter of the images; the run grows by 2 to 6 MB
    # batches of 16: the allocator keeps a few freed batches resident, up to 30 MB at 64 (not growing with N)
    argv = [str(tmp_path / 'samples.npz'), str(tmp_path / 'ref.npz'), '--batch_size', '16']
    run = subprocess.run([sys.executable, '-c', MEMORY_CHILD, *argv], cwd=os.path.dirname(os.path.abspath(__file__)),
                         capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert run.returncode == 0, run.stderr
    out = dict(line.split() for line in run.stdout.splitlines() if ':' not in line)
    assert int(out.pop('streamed_kib')) < cap_kib  # fid.py's whole run: features, statistics, metrics
    assert int(out.pop('whole_kib')) > images.nbytes // 1024 * 0.9  # the measurement sees an in-memory read
    monkeypatch.setattr(fid, 'precision_recall', functools.partial(fid.precision_recall, max_block=2 ** 16))
    tiny = TinyInception().eval()
    ref_feats = fid.features(tiny, ref_images, batch_size=16)
    expected = fid.metrics(fid.features(tiny, images, batch_size=16), fid.stats(ref_feats), ref_feats['pool'])
    assert out == {fid.METRIC_NAMES[k]: f'{v:.4f}' for k, v in expected.items()}


@cli
def test_fewer_than_2048_images_are_scored_with_a_one_line_warning(tmp_path, tiny_fid, capsys):
    np.savez(tmp_path / 's.npz', arr_0=random_images(8, 16))
    run_fid(str(tmp_path / 's.npz'), '--save_stats', str(tmp_path / 'ref.npz'))
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith('warning: ') and '8 images' in err[0] and '2048' in err[0]


@cli
def test_bench_reports_images_per_second_with_random_weights_when_the_file_is_missing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fid, 'FIDInception', TinyInception)  # the test checks the report, not the speed
    monkeypatch.setattr(fid, 'BENCH_SECONDS', 0)  # one timed batch
    run_fid('--bench', '4', '--inception', str(tmp_path / 'missing.pth'))
    out = capsys.readouterr().out
    assert re.match(r'bench: [0-9.]+ images/s at batch 4 on cpu .*random weights: no .*missing\.pth', out)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize('arrays,match', [
    ({'images': np.zeros((2, 8, 8, 3), np.uint8)}, "no 'arr_0'"),  # wrong key
    ({'arr_0': np.zeros((2, 8, 8, 3), np.float32)}, 'uint8'),  # wrong dtype
    ({'arr_0': np.zeros((2, 3, 8, 8), np.uint8)}, r'\(N, H, W, 3\)'),  # NCHW
])
def test_bad_sample_npz_is_a_clear_one_line_error(tmp_path, arrays, match):
    np.savez(tmp_path / 's.npz', **arrays)
    with pytest.raises(SystemExit, match=match) as e:
        fid.load_images(str(tmp_path / 's.npz'))
    assert str(e.value).startswith('error: ') and '\n' not in str(e.value)


def test_reference_with_wrongly_shaped_statistics_is_a_clear_error(tmp_path):
    np.savez(tmp_path / 'ref.npz', mu=np.zeros(2048), sigma=np.zeros((2048, 10)))
    with pytest.raises(SystemExit, match="'sigma'"):
        fid.load_reference(str(tmp_path / 'ref.npz'), model=None)


# -----------------------------------------------------------------------------
# the command lines: the cache (tokenizers.py cache)

def make_image_folder(root, per_class=3):
    for c in ('cats', 'dogs'):
        os.makedirs(root / c)
        for i in range(per_class):
            arr = np.random.default_rng(i).integers(0, 256, (40, 30, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / c / f'{i}.png')


def argparse_cache(data, out, *flags):
    return tokenizers.get_parser().parse_args(['cache', '--data', str(data), '--out', str(out), '--workers', '0',
                                               *flags])


def grey_levels_folder(root, levels=17, per_class=3, size=8):
    """An image folder of grey images with `levels` grey levels (as digits or scans): few colours."""
    rng = np.random.default_rng(0)
    for c in ('a', 'b'):
        os.makedirs(root / c)
        for i in range(per_class):
            grey = (rng.integers(0, levels, (size, size)) * (255 // (levels - 1))).astype(np.uint8)
            Image.fromarray(grey).save(root / c / f'{i}.png')


def snapshot_of(root):
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in root.iterdir()}


def png_claiming(path, width, height):
    """A 1x1 PNG whose header is rewritten to claim width x height pixels."""
    Image.new('RGB', (1, 1)).save(path)
    png = bytearray(path.read_bytes())
    png[16:24] = width.to_bytes(4, 'big') + height.to_bytes(4, 'big')  # IHDR data: width, height, ...
    png[29:33] = zlib.crc32(png[12:29]).to_bytes(4, 'big')  # IHDR's CRC, over its type and data
    path.write_bytes(png)


def cache_worker(rank, world_size, port, argv):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR='127.0.0.1',
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    start = tokenizers.start_cache  # rank 0 begins the cache a second late, as on a loaded machine: rank 1 must wait
    tokenizers.start_cache = lambda *a: (time.sleep(1), start(*a))
    tokenizers.cache(tokenizers.get_parser().parse_args(argv))


@cli
def test_image_folder_caches_trains_and_samples(tmp_path):
    make_image_folder(tmp_path / 'images')
    (tmp_path / 'images' / 'dogs' / 'notes.txt').write_text('not an image')
    (tmp_path / 'images' / 'dogs' / 'broken.png').write_bytes(b'not a png')
    args = argparse_cache(tmp_path / 'images', tmp_path / 'cache')
    tokenizers.cache(args)
    tokens, labels, meta = tokenizers.load_dataset(str(tmp_path / 'cache'))
    assert tokens[np.arange(6)].shape == (6, 2, 16, 16) and labels.tolist() == [0, 0, 0, 1, 1, 1]  # 2 bad skipped
    assert meta['classes'] == ['cats', 'dogs'] and meta['vocab_size'] == 512
    ckpt = run_train(tmp_path / 'run', '--data', str(tmp_path / 'cache'), '--max_steps', '2', '--batch_size', '2')
    assert ckpt['data_meta']['num_classes'] == 2 and ckpt['step'] == 2


@cli
def test_image_folder_is_cached_with_mirrors_and_unreadable_files_are_reported(tmp_path, capsys):
    make_image_folder(tmp_path / 'images')
    (tmp_path / 'images' / 'dogs' / 'notes.txt').write_text('not an image')
    (tmp_path / 'images' / 'dogs' / 'broken.png').write_bytes(b'not a png')
    tokenizers.cache(argparse_cache(tmp_path / 'images', tmp_path / 'cache', '--shard_size', '4'))
    err = capsys.readouterr().err
    assert 'skipping' in err and 'notes.txt' in err and 'broken.png' in err
    tokens, labels, meta = tokenizers.load_dataset(str(tmp_path / 'cache'))
    assert meta['num_shards'] == 2 and len(tokens) == 6
    rows = tokens[np.arange(6)]  # (6, 2, 16, 16) across both shards
    assert np.array_equal(rows[:, 1], rows[:, 0, :, ::-1])  # the second entry is the mirrored image


@cli
def test_a_folder_of_few_colours_round_trips_exactly_and_its_samples_are_drawn_in_its_palette(tmp_path):
    grey_levels_folder(tmp_path / 'images')
    tokenizers.cache(argparse_cache(tmp_path / 'images', tmp_path / 'cache', '--image_size', '8'))
    tokens, _, meta = tokenizers.load_dataset(str(tmp_path / 'cache'))
    assert meta['palette'] == 'fit' and meta['vocab_size'] == len(meta['colours']) == 17
    tok = tokenizers.make_tokenizer('pixel', colours=meta['colours'])
    paths, _, _ = tokenizers.list_image_folder(str(tmp_path / 'images'))
    crops = np.stack([tokenizers.ImageFiles(paths, [0] * 6, 8)[i][0] for i in range(6)])  # (6, 8, 8, 3)
    assert np.array_equal(tok.decode(torch.from_numpy(tokens[np.arange(6)][:, 0].astype(np.int64))).numpy(), crops)
    run_train(tmp_path / 'run', '--data', str(tmp_path / 'cache'), '--max_steps', '1', '--batch_size', '2')
    sample_cli('--ckpt', tmp_path / 'run' / 'ckpt.pt', '--num_images', 2, '--out', tmp_path / 's.npz')
    colours = {tuple(c) for c in np.load(tmp_path / 's.npz')['arr_0'].reshape(-1, 3)}
    assert colours <= {tuple(c) for c in meta['colours']}  # decoded with the checkpoint's palette


@cli
def test_killed_cache_run_continues_and_never_rewrites_a_finished_shard(tmp_path, monkeypatch):
    make_image_folder(tmp_path / 'images')
    args = argparse_cache(tmp_path / 'images', tmp_path / 'cache', '--shard_size', '2')  # 3 shards
    real_save = tokenizers.save_array

    def killed_at_shard_1(path, array):
        if 'tokens_00001' in path:
            raise KeyboardInterrupt
        real_save(path, array)
    monkeypatch.setattr(tokenizers, 'save_array', killed_at_shard_1)
    with pytest.raises(KeyboardInterrupt):
        tokenizers.cache(args)
    first = tmp_path / 'cache' / 'tokens_00000.npy'
    assert first.exists() and not (tmp_path / 'cache' / 'labels_00001.npy').exists()
    with pytest.raises(SystemExit, match='not written yet'):  # training refuses an unfinished cache
        tokenizers.load_dataset(str(tmp_path / 'cache'))
    written = first.stat().st_mtime_ns
    monkeypatch.setattr(tokenizers, 'save_array', real_save)
    tokenizers.cache(args)
    assert first.stat().st_mtime_ns == written
    tokens, labels, _ = tokenizers.load_dataset(str(tmp_path / 'cache'))
    assert labels.tolist() == [0, 0, 0, 1, 1, 1]


@cli
@pytest.mark.parametrize('flags,differs', [
    (['--palette', 'cube'], 'palette fit -> cube'),
    (['--palette_size', '64'], 'palette_size 512 -> 64'),
    (['--image_size', '32'], 'image_size 16 -> 32'),
    (['--tokenizer', 'pixel_patch', '--image_size', '32'], 'tokenizer pixel -> pixel_patch'),
    (['--shard_size', '4'], 'shard_size 10000 -> 4'),
])
def test_rerunning_cache_with_other_flags_into_its_out_is_refused_and_changes_nothing(flags, differs, tmp_path):
    make_image_folder(tmp_path / 'images')
    tokenizers.cache(argparse_cache(tmp_path / 'images', tmp_path / 'cache'))
    before = snapshot_of(tmp_path / 'cache')
    with pytest.raises(SystemExit, match=re.escape(differs) + '.*another --out, or add --rebuild') as e:
        tokenizers.cache(argparse_cache(tmp_path / 'images', tmp_path / 'cache', *flags))
    assert '\n' not in str(e.value) and snapshot_of(tmp_path / 'cache') == before


@cli
def test_rerunning_cache_after_a_class_folder_was_added_is_refused_and_rebuild_relabels(tmp_path):
    make_image_folder(tmp_path / 'images')
    tokenizers.cache(argparse_cache(tmp_path / 'images', tmp_path / 'cache'))
    os.makedirs(tmp_path / 'images' / 'birds')  # sorts first: every label moves up by one
    Image.new('RGB', (20, 20), 'blue').save(tmp_path / 'images' / 'birds' / '0.png')
    with pytest.raises(SystemExit, match='num_classes 2 -> 3'):
        tokenizers.cache(argparse_cache(tmp_path / 'images', tmp_path / 'cache'))
    tokenizers.cache(argparse_cache(tmp_path / 'images', tmp_path / 'cache', '--rebuild'))
    _, labels, meta = tokenizers.load_dataset(str(tmp_path / 'cache'))
    assert meta['classes'] == ['birds', 'cats', 'dogs'] and labels.tolist() == [0, 1, 1, 1, 2, 2, 2]


@cli
def test_rerunning_cache_over_changed_image_files_is_refused(tmp_path):
    make_image_folder(tmp_path / 'images')
    tokenizers.cache(argparse_cache(tmp_path / 'images', tmp_path / 'cache'))
    Image.new('RGB', (50, 50), 'red').save(tmp_path / 'images' / 'cats' / '0.png')  # same name, other file
    with pytest.raises(SystemExit, match='files_sha256'):
        tokenizers.cache(argparse_cache(tmp_path / 'images', tmp_path / 'cache'))


@cli
def test_rerunning_cache_with_other_tokenizer_weights_is_refused(vq_file, tmp_path):
    make_image_folder(tmp_path / 'images')
    shutil.copy(vq_file[0], tmp_path / 'other_vq.pt')
    tokenizers.cache(argparse_cache(tmp_path / 'images', tmp_path / 'cache', '--tokenizer', 'vq',
                                    '--ckpt', str(vq_file[0])))
    with pytest.raises(SystemExit, match=re.escape(f"ckpt {vq_file[0]} -> {tmp_path / 'other_vq.pt'}")):
        tokenizers.cache(argparse_cache(tmp_path / 'images', tmp_path / 'cache', '--tokenizer', 'vq',
                                        '--ckpt', str(tmp_path / 'other_vq.pt')))


@cli
@pytest.mark.parametrize('change,match', [
    (dict(image_size=32, grid_size=32), 'tokens_00000.npy holds uint16 tokens (2, 16, 16), not the uint16 32x32'),
    (dict(tokenizer='pixel_patch', vocab_size=None, token_dim=12), 'not the float16 16x16 grids'),
    (dict(classes=['cats', 'dogs', 'zebras'], num_classes=3), 'no image of class zebras'),
    (dict(classes=['cats'], num_classes=1), 'labels beyond the 1 classes'),
])
def test_loading_refuses_a_cache_whose_shards_disagree_with_its_meta(change, match, tmp_path):
    # what the old `cache` left after a rerun with another --image_size, --tokenizer or class folders
    make_image_folder(tmp_path / 'images')
    tokenizers.cache(argparse_cache(tmp_path / 'images', tmp_path / 'cache'))
    meta = json.loads((tmp_path / 'cache' / 'meta.json').read_text())
    meta = {k: v for k, v in dict(meta, **change).items() if v is not None}
    (tmp_path / 'cache' / 'meta.json').write_text(json.dumps(meta))
    with pytest.raises(SystemExit, match=re.escape(match)):
        tokenizers.load_dataset(str(tmp_path / 'cache'))


@cli
def test_a_huge_image_header_and_a_shard_of_unreadable_files_are_skipped_with_the_reason(tmp_path, capsys):
    make_image_folder(tmp_path / 'images', per_class=2)
    png_claiming(tmp_path / 'images' / 'cats' / 'x_huge.png', 20000, 20000)  # over Pillow's decompression-bomb limit
    (tmp_path / 'images' / 'cats' / 'y_broken.png').write_bytes(b'not a png')
    tokenizers.cache(argparse_cache(tmp_path / 'images', tmp_path / 'cache', '--shard_size', '2'))  # shard 1: those two
    err = capsys.readouterr().err
    assert re.search(r'skipping \S*x_huge.png: Image size \(400000000 pixels\) exceeds limit', err)
    tokens, labels, _ = tokenizers.load_dataset(str(tmp_path / 'cache'))
    assert labels.tolist() == [0, 0, 1, 1] and tokens[np.arange(4)].shape == (4, 2, 16, 16)
    assert np.load(tmp_path / 'cache' / 'tokens_00001.npy').shape == (0, 2, 16, 16)


@cli
def test_16_bit_and_float_images_are_cached_as_grey_and_out_of_range_ones_skipped(tmp_path, capsys):
    make_image_folder(tmp_path / 'images', per_class=1)
    Image.fromarray(np.full((20, 20), 0x8080, np.uint16)).save(tmp_path / 'images' / 'cats' / 'grey16.png')
    Image.fromarray(np.full((20, 20), 128 / 255, np.float32)).save(tmp_path / 'images' / 'cats' / 'grey_float.tif')
    Image.fromarray(np.full((20, 20), 128.0, np.float32)).save(tmp_path / 'images' / 'cats' / 'float255.tif')
    tokenizers.cache(argparse_cache(tmp_path / 'images', tmp_path / 'cache', '--palette', 'cube'))
    assert re.search(r'skipping \S*float255.tif: .*only \[0, 1\] is read', capsys.readouterr().err)
    tokens, labels, _ = tokenizers.load_dataset(str(tmp_path / 'cache'))
    assert labels.tolist() == [0, 0, 0, 1]  # cats: 0.png, grey16.png, grey_float.tif
    grey = (4 << 6) | (4 << 3) | 4  # 128 in each channel: the top three bits 100
    assert (tokens[np.arange(1, 3)] == grey).all()


@cli
def test_a_class_whose_every_file_is_unreadable_is_refused_naming_it(tmp_path):
    make_image_folder(tmp_path / 'images')
    for i in range(3):
        (tmp_path / 'images' / 'dogs' / f'{i}.png').write_bytes(b'not a png')
    with pytest.raises(SystemExit, match='no image of class dogs'):
        tokenizers.cache(argparse_cache(tmp_path / 'images', tmp_path / 'cache'))
    with pytest.raises(SystemExit, match='no image of class dogs'):  # training refuses it too
        tokenizers.load_dataset(str(tmp_path / 'cache'))


@cli
@pytest.mark.parametrize('what', ['tokens', 'labels'])
def test_a_truncated_shard_is_named_when_loading_and_re_encoded_by_rerunning_cache(what, tmp_path, capsys):
    make_image_folder(tmp_path / 'images')
    args = argparse_cache(tmp_path / 'images', tmp_path / 'cache', '--shard_size', '4')
    tokenizers.cache(args)
    tokens = np.load(tmp_path / 'cache' / 'tokens_00000.npy')
    shard = tmp_path / 'cache' / f'{what}_00000.npy'
    shard.write_bytes(shard.read_bytes()[:150])  # a copy cut short
    with pytest.raises(SystemExit, match=f'{what}_00000.npy is unreadable') as e:
        tokenizers.load_dataset(str(tmp_path / 'cache'))
    assert '\n' not in str(e.value)
    tokenizers.cache(args)
    assert 're-encoding shard 0' in capsys.readouterr().err
    assert np.array_equal(tokenizers.load_dataset(str(tmp_path / 'cache'))[0][np.arange(4)], tokens)


@cli
@pytest.mark.parametrize('name', ['vq', 'vae'])
def test_reconstruction_tokenizer_cache_trains_and_samples(name, vq_file, vae_file, tmp_path):
    ckpt = str((vq_file if name == 'vq' else vae_file)[0])
    make_image_folder(tmp_path / 'images')  # 40x30 images: centre-cropped to 32x32, a 2x2 token grid
    tokenizers.cache(argparse_cache(tmp_path / 'images', tmp_path / 'cache', '--tokenizer', name,
                                    '--ckpt', ckpt, '--image_size', '32'))
    tokens, labels, meta = tokenizers.load_dataset(str(tmp_path / 'cache'))
    assert meta['grid_size'] == 2 and meta['ckpt'] == ckpt
    assert tokens[np.arange(6)].shape == ((6, 2, 2, 2) if name == 'vq' else (6, 2, 2, 2, 32))  # ids or moments
    out = run_train(tmp_path / 'run', '--data', str(tmp_path / 'cache'), '--tokenizer', name,
                    '--max_steps', '2', '--batch_size', '2', '--num_samples', '2')
    assert out['step'] == 2 and (tmp_path / 'run' / 'samples.png').is_file()  # decoded with the cached weights


@cli
def test_two_process_cache_writes_meta_before_any_shard_and_rebuilds_under_torchrun(tmp_path):
    make_image_folder(tmp_path / 'images', per_class=4)
    argv = ['cache', '--data', str(tmp_path / 'images'), '--out', str(tmp_path / 'cache'), '--workers', '0',
            '--shard_size', '2']  # 4 shards, 2 per rank
    run_two_processes(cache_worker, argv)
    meta, shards = tmp_path / 'cache' / 'meta.json', sorted((tmp_path / 'cache').glob('*_0000*.npy'))
    assert len(shards) == 8 and all(meta.stat().st_mtime_ns <= p.stat().st_mtime_ns for p in shards)
    os.makedirs(tmp_path / 'images' / 'birds')  # sorts first: every label moves up by one
    Image.new('RGB', (20, 20), 'blue').save(tmp_path / 'images' / 'birds' / '0.png')
    run_two_processes(cache_worker, argv + ['--rebuild'])  # rank 0 deletes before any rank writes
    _, labels, meta = tokenizers.load_dataset(str(tmp_path / 'cache'))
    assert meta['classes'] == ['birds', 'cats', 'dogs'] and labels.tolist() == [0] + [1] * 4 + [2] * 4


@cli
@pytest.mark.parametrize('tokenizer', [['--palette', 'fit'], ['--palette', 'cube'],
                                       ['--tokenizer', 'pixel_patch', '--image_size', '16']])
def test_a_full_disk_while_caching_stops_in_one_line_and_the_rerun_continues(tokenizer, tmp_path, monkeypatch):
    make_image_folder(tmp_path / 'images')
    args = argparse_cache(tmp_path / 'images', tmp_path / 'cache', '--shard_size', '2', *tokenizer)
    real_save = np.save

    def disk_full_at_shard_1(f, array):
        if 'tokens_00001' in f.name:
            raise OSError(errno.ENOSPC, 'No space left on device')
        real_save(f, array)
    monkeypatch.setattr(np, 'save', disk_full_at_shard_1)
    with pytest.raises(SystemExit, match=r'^error: writing .*tokens_00001.npy: No space left on device; rerun'):
        tokenizers.cache(args)
    monkeypatch.undo()
    assert not list((tmp_path / 'cache').glob('*.tmp'))
    tokenizers.cache(args)
    assert tokenizers.load_dataset(str(tmp_path / 'cache'))[1].tolist() == [0, 0, 0, 1, 1, 1]


def test_small_image_metric_of_a_class_sorted_cache_sees_every_class(tmp_path):
    # a cache is written class by class: the first 12,000 rows of 15,000 would miss the last two classes
    images, labels = tokenizers.make_shapes(15000, size=G, seed=0)
    labels, rows = labels.sort(stable=True)
    tok = tokenizers.PixelTokenizer()
    tokens = tok.encode(images[rows]).numpy()[:, None].repeat(2, 1)  # (15000, 2, G, G) each image and its mirror
    args = train.get_parser().parse_args(['--data', str(tmp_path)])
    metric = train.small_image_metric(args, tokens, labels.numpy(), dict(tokenizer='pixel', grid_size=G), tok)
    assert set(metric.train_labels) == set(range(10)) and metric.class_acc_real > 0.6


def test_image_folder_errors_name_the_problem(tmp_path):
    with pytest.raises(SystemExit, match='no such directory'):
        tokenizers.list_image_folder(str(tmp_path / 'missing'))
    os.makedirs(tmp_path / 'data' / 'empty_class')
    with pytest.raises(SystemExit, match="class folder 'empty_class' has no image files"):
        tokenizers.list_image_folder(str(tmp_path / 'data'))
    (tmp_path / 'data' / 'empty_class' / '.DS_Store').write_bytes(b'\0')  # a file, but no image
    with pytest.raises(SystemExit, match="class folder 'empty_class' has no image files"):
        tokenizers.list_image_folder(str(tmp_path / 'data'))


def test_tokenizers_help_shows_its_examples_with_their_line_continuations():
    assert 'kl16.ckpt --data IMAGENET/train \\\n        --image_size 256' in tokenizers.get_parser().format_help()


# -----------------------------------------------------------------------------
# the command lines: training (train.py): DDP and accumulation, resume, checkpoints, logs, bench, evaluation

def run_train(tmp_path, *flags):
    args = train.get_parser().parse_args(['--size', 'tiny', '--depth', '1', '--head_depth', '1', '--batch_size', '4',
                                          '--log_interval', '1', '--num_samples', '0', '--out_dir', str(tmp_path),
                                          *flags])
    train.main(args)
    return torch.load(os.path.join(tmp_path, 'ckpt.pt'), weights_only=True)


def ddp_worker(rank, world_size, port, script, argv):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    torch.set_num_threads(1)
    script = {'train': train, 'sample': sample}[script]  # by name: spawn pickles the arguments
    script.main(script.get_parser().parse_args(argv))


def run_two_processes(worker, *args):
    """worker(rank, 2, port, *args) in 2 processes (ddp_worker: a script's main, as torchrun --nproc_per_node=2 runs
    it, with gloo)."""
    import socket
    with socket.socket() as s:  # a free port on this machine for the rendezvous
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(worker, args=(2, port, *args), nprocs=2)


def snapshot(root):
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes()) for p in root.rglob('*') if p.is_file()}


def hold_folder(folder):
    """A process that holds folder's lock, as a run writing there does: (process, kill it with SIGKILL)."""
    os.makedirs(folder, exist_ok=True)
    code = (f"import fcntl, sys, time; f = open({str(folder / '.lock')!r}, 'a'); fcntl.flock(f, fcntl.LOCK_EX); "
            f"print('held', flush=True); time.sleep(60)")
    p = subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == 'held'
    return p


def readme_ablation_flags():
    text = open(os.path.join(os.path.dirname(__file__), 'README.md')).read()
    table = text[text.index('## Paper ablations as flags'):].split('\n## ')[0]
    return [row.split('|')[3].strip().strip('`') for row in table.splitlines()
            if row.startswith('| ') and '--' in row.split('|')[3]]


@cli
@pytest.mark.parametrize('flags', readme_ablation_flags())
def test_every_readme_ablation_command_runs_on_the_tiny_config(flags, tmp_path):
    args = train.get_parser().parse_args(shlex.split(flags) + [
        '--size', 'tiny', '--batch_size', '2', '--max_steps', '2', '--warmup_steps', '1',
        '--num_samples', '0', '--log_interval', '1', '--out_dir', str(tmp_path)])
    args.epochs = args.warmup_epochs = None  # two steps, whatever the row's run length
    train.main(args)
    ckpt = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    assert ckpt['step'] == 2 and ckpt['args']['head'] == args.head


def test_readme_line_references_point_at_the_definitions_they_name():
    here = os.path.dirname(__file__)
    text = open(os.path.join(here, 'README.md')).read()
    refs = re.findall(r"`([\w.]+)(?:\([^`]*\))?` \[(\w+\.py):(\d+)\]", text)  # `Class.method` [file.py:N]
    assert len(refs) >= 10
    for name, path, line in refs:
        source = open(os.path.join(here, path)).read().split('\n')[int(line) - 1]
        assert re.match(rf"\s*(def|class) {name.split('.')[-1]}\b", source), (name, path, line, source)


@cli
def test_dry_run_prints_parameters_and_flops_and_trains_nothing(tmp_path, capsys):
    args = train.get_parser().parse_args(['--dry_run', '--size', 'B', '--out_dir', str(tmp_path)])
    train.main(args)
    out = capsys.readouterr().out
    assert 'parameters total' in out and 'training FLOPs per image, total' in out
    assert not (tmp_path / 'ckpt.pt').exists()


def test_data_shards_of_ranks_are_disjoint_and_cover_the_epoch():
    tokens, labels, _ = tokenizers.load_dataset('shapes', num_images=40)
    args = train.get_parser().parse_args(['--batch_size', '5', '--global_batch_size', '10'])
    seen = []
    for rank in range(2):
        for step in range(4):  # 40 images / 10 per global batch = 4 steps per epoch
            idx, y = train.get_batch(tokens, labels, step, args, rank, 1)
            assert idx.shape == (5, 2, 256)  # each image and its mirror
            seen += [tuple(row[0].tolist()) for row in idx]
    assert len(set(seen)) == len({tuple(t[0].flatten().tolist()) for t in torch.from_numpy(tokens.astype(np.int64))})


@cli
def test_two_process_gloo_run_reaches_the_parameters_of_one_process_with_the_same_global_batch(tmp_path):
    flags = ['--batch_size', '2', '--global_batch_size', '4', '--max_steps', '3']
    one = run_train(tmp_path / 'one', *flags)  # 1 process: 2 accumulation steps of 2 images
    argv = ['--size', 'tiny', '--depth', '1', '--head_depth', '1', '--num_samples', '0', '--log_interval', '1',
            '--out_dir', str(tmp_path / 'two'), *flags]
    run_two_processes(ddp_worker, 'train', argv)  # 2 processes of 2 images
    two = torch.load(tmp_path / 'two' / 'ckpt.pt', weights_only=True)
    assert two['step'] == one['step'] == 3
    for name, p in one['model'].items():
        torch.testing.assert_close(two['model'][name], p, atol=1e-6, rtol=1e-5, msg=name)


@cli
def test_resume_continues_the_same_run(tmp_path, monkeypatch):
    flags = ['--max_steps', '6', '--ckpt_interval', '3']
    straight = run_train(tmp_path / 'a', *flags)
    real_get_batch = train.get_batch

    def crash_after_step_3(tokens, labels, step, *a):
        if step == 4:
            raise KeyboardInterrupt  # killed after the checkpoint of step 3
        return real_get_batch(tokens, labels, step, *a)
    monkeypatch.setattr(train, 'get_batch', crash_after_step_3)
    with pytest.raises(KeyboardInterrupt):
        run_train(tmp_path / 'b', *flags)
    monkeypatch.setattr(train, 'get_batch', real_get_batch)
    assert torch.load(tmp_path / 'b' / 'ckpt.pt', weights_only=True)['step'] == 3
    with open(tmp_path / 'b' / 'log.jsonl', 'a') as f:
        f.write('{"step": 5, "lo')  # a line cut short by the kill
    resumed = run_train(tmp_path / 'b', *flags, '--resume')
    assert resumed['step'] == straight['step'] == 6
    for key in ('model', 'ema'):
        for name, p in straight[key].items():
            torch.testing.assert_close(resumed[key][name], p, atol=0, rtol=0, msg=f"{key}.{name}")
    # step 4 was logged before the kill and again after the resume: the log keeps it once, and no cut line
    assert [json.loads(line)['step'] for line in open(tmp_path / 'b' / 'log.jsonl')] == [1, 2, 3, 4, 5, 6]


@cli
def test_resume_falls_back_to_the_newest_intact_checkpoint_when_ckpt_pt_is_truncated(tmp_path, capsys):
    flags = ['--ckpt_interval', '1', '--keep_last', '2']
    straight = run_train(tmp_path / 'a', '--max_steps', '4', *flags)
    run_train(tmp_path / 'b', '--max_steps', '3', *flags)  # ckpt_0000002.pt, ckpt_0000003.pt = ckpt.pt
    with open(tmp_path / 'b' / 'ckpt.pt', 'r+b') as f:
        f.truncate(1000)  # a hard link: ckpt_0000003.pt is cut short too
    resumed = run_train(tmp_path / 'b', '--max_steps', '4', *flags, '--resume')
    assert 'ckpt.pt is unreadable' in capsys.readouterr().out
    assert resumed['step'] == 4
    for name, p in straight['model'].items():  # from step 2, the same steps 3 and 4 as the uninterrupted run
        torch.testing.assert_close(resumed['model'][name], p, atol=0, rtol=0, msg=name)


@cli
def test_a_checkpoint_of_another_version_of_the_code_is_refused_in_one_line(tmp_path):
    ckpt = run_train(tmp_path, '--max_steps', '1')
    del ckpt['config']['init']  # as the versions before the key existed wrote them
    torch.save(ckpt, tmp_path / 'ckpt.pt')
    for load in (lambda: sample.load_checkpoint(str(tmp_path / 'ckpt.pt')),
                 lambda: run_train(tmp_path, '--max_steps', '2', '--resume')):
        with pytest.raises(SystemExit, match=r"^error: .*ckpt.pt: written by another version of this code .*'init'") \
                as e:
            load()
        assert '\n' not in str(e.value)


@cli
def test_nan_loss_from_scratch_says_that_no_checkpoint_was_written(tmp_path, monkeypatch):
    real_forward = Heptapod.forward
    monkeypatch.setattr(Heptapod, 'forward', lambda self, *a: real_forward(self, *a) * float('nan'))
    with pytest.raises(SystemExit, match='no checkpoint was written yet'):
        run_train(tmp_path, '--max_steps', '2')
    assert not list(tmp_path.glob('*.pt'))


@cli
def test_nan_loss_stops_the_run_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    run_train(tmp_path, '--max_steps', '2')
    before = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    real_forward = Heptapod.forward
    monkeypatch.setattr(Heptapod, 'forward', lambda self, *a: real_forward(self, *a) * float('nan'))
    with pytest.raises(SystemExit, match='loss nan'):
        run_train(tmp_path, '--max_steps', '4', '--resume')
    after = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    assert after['step'] == before['step'] == 2


@cli
def test_checkpoint_write_killed_midway_leaves_the_previous_one_loadable(tmp_path, monkeypatch):
    run_train(tmp_path, '--max_steps', '2')

    def killed_while_writing(obj, f):
        f.write(b'half a checkpoint')
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, 'save', killed_while_writing)
    with pytest.raises(KeyboardInterrupt):
        run_train(tmp_path, '--max_steps', '4', '--resume')
    monkeypatch.undo()
    assert torch.load(tmp_path / 'ckpt.pt', weights_only=True)['step'] == 2
    run_train(tmp_path, '--max_steps', '3', '--resume')  # the next run clears what the killed one left
    assert not list(tmp_path.glob('*.tmp'))


@cli
def test_a_full_disk_keeps_the_previous_checkpoint_and_leaves_no_partial_file(tmp_path, monkeypatch):
    run_train(tmp_path, '--max_steps', '2')

    def disk_full(obj, f):
        f.write(b'the first bytes')
        raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(torch, 'save', disk_full)
    with pytest.raises(SystemExit, match='No space left on device; the previous checkpoints') as e:
        run_train(tmp_path, '--max_steps', '4', '--resume')
    monkeypatch.undo()
    assert '\n' not in str(e.value) and not list(tmp_path.glob('*.tmp'))
    assert torch.load(tmp_path / 'ckpt.pt', weights_only=True)['step'] == 2


@cli
def test_a_full_disk_at_the_log_stops_in_one_line_and_resume_continues(tmp_path, monkeypatch):
    real_open = open

    def disk_full_at_the_log(path, *args, **kwargs):
        if str(path).endswith('log.jsonl') and 'a' in args[:1]:
            raise OSError(errno.ENOSPC, 'No space left on device')
        return real_open(path, *args, **kwargs)
    run_train(tmp_path, '--max_steps', '2', '--ckpt_interval', '1')
    monkeypatch.setattr(train, 'open', disk_full_at_the_log, raising=False)  # train.py's open, not the tests'
    with pytest.raises(SystemExit, match=r'^error: writing .*log.jsonl: No space left on device; free space, '
                                         r'then --resume$'):
        run_train(tmp_path, '--max_steps', '4', '--resume')
    monkeypatch.undo()
    assert run_train(tmp_path, '--max_steps', '4', '--resume')['step'] == 4
    assert [json.loads(line)['step'] for line in open(tmp_path / 'log.jsonl')] == [1, 2, 3, 4]


@cli
def test_an_out_dir_that_cannot_be_written_fails_before_training(tmp_path, monkeypatch):
    def read_only(*a, **kw):
        raise OSError(errno.EROFS, 'Read-only file system')
    monkeypatch.setattr(tempfile, 'TemporaryFile', read_only)
    with pytest.raises(SystemExit, match='cannot write there .Read-only file system'):
        run_train(tmp_path, '--max_steps', '1')
    assert not list(tmp_path.glob('*'))  # no step ran, nothing was written


@cli
def test_a_new_run_into_the_folder_of_another_is_refused_unless_it_resumes_or_overwrites(tmp_path):
    run_train(tmp_path, '--max_steps', '2', '--ckpt_interval', '1')
    before = snapshot(tmp_path)
    with pytest.raises(SystemExit, match=r'^error: --out_dir .* holds another run \(ckpt.pt, ckpt_0000001.pt, '
                                         r'ckpt_0000002.pt, log.jsonl\); add --resume .*--overwrite'):
        run_train(tmp_path, '--max_steps', '3', '--lr', '3e-4')
    assert snapshot(tmp_path) == before
    assert run_train(tmp_path, '--max_steps', '3', '--resume')['step'] == 3
    fresh = run_train(tmp_path, '--max_steps', '1', '--overwrite')
    assert fresh['step'] == 1 and sorted(p.name for p in tmp_path.glob('ckpt*.pt')) == ['ckpt.pt', 'ckpt_0000001.pt']
    assert [json.loads(line)['step'] for line in open(tmp_path / 'log.jsonl')] == [1]


@cli
def test_a_folder_held_by_a_running_process_is_refused_and_a_killed_one_leaves_no_lock(tmp_path):
    make_image_folder(tmp_path / 'images')
    run_train(tmp_path / 'run', '--max_steps', '1')
    commands = [(tmp_path / 'run', lambda: run_train(tmp_path / 'run', '--max_steps', '2', '--resume')),
                (tmp_path / 's', lambda: sample_cli('--ckpt', tmp_path / 'run' / 'ckpt.pt', '--num_images', 1,
                                                    '--out', tmp_path / 's')),
                (tmp_path / 'c', lambda: tokenizers.cache(argparse_cache(tmp_path / 'images', tmp_path / 'c')))]
    for folder, command in commands:
        holder = hold_folder(folder)
        try:
            with pytest.raises(SystemExit, match=rf'^error: {re.escape(str(folder))} is in use by another running '
                                                 rf'train.py, sample.py or cache; wait') as e:
                command()
            assert '\n' not in str(e.value)
        finally:
            holder.kill()  # SIGKILL: no cleanup runs, and the OS releases the lock
            holder.wait()
        (folder / 'tokens_00000.npy.4242.tmp').write_bytes(b'a killed writer')  # write_atomic's partial file
        (folder / 'notes.tmp').write_text('not ours')
        command()  # no stale lock
        assert [p.name for p in folder.glob('*.tmp')] == ['notes.tmp']  # the partial file is gone, the user's kept


@cli
def test_only_the_last_k_checkpoints_are_kept_and_ckpt_pt_is_the_newest(tmp_path):
    run_train(tmp_path, '--max_steps', '4', '--ckpt_interval', '1', '--keep_last', '2')
    assert sorted(p.name for p in tmp_path.glob('ckpt*.pt')) == ['ckpt.pt', 'ckpt_0000003.pt', 'ckpt_0000004.pt']
    assert torch.load(tmp_path / 'ckpt.pt', weights_only=True)['step'] == 4


@cli
def test_log_lines_are_appended_to_a_json_lines_file(tmp_path, capsys):
    run_train(tmp_path, '--max_steps', '3')
    lines = [json.loads(line) for line in (tmp_path / 'log.jsonl').read_text().splitlines()]
    assert [line['step'] for line in lines] == [1, 2, 3]
    assert {'loss', 'lr', 'grad_norm', 'ms_per_step', 'images_per_s', 'mfu'} <= set(lines[0])
    assert 'images/s | MFU -' in capsys.readouterr().out  # no known peak FLOP/s on a CPU


@cli
def test_bench_reports_throughput_and_memory_and_writes_nothing(tmp_path, capsys):
    args = train.get_parser().parse_args(['--size', 'tiny', '--depth', '1', '--head_depth', '1', '--batch_size', '2',
                                          '--bench', '--bench_warmup', '1', '--bench_steps', '2',
                                          '--out_dir', str(tmp_path)])
    train.main(args)
    out = capsys.readouterr().out
    assert re.search(r'bench: [\d.]+ images/s per process, \d+ ms/step, MFU -, peak memory [\d.]+ GiB', out)
    assert not list(tmp_path.glob('*.pt')) and not (tmp_path / 'log.jsonl').exists()


@cli
def test_bf16_training_end_of_run_grid_and_evaluation_run_on_the_cpu(tmp_path):
    # --amp on a CPU: the training step, the samples.png grid and --eval_every in bf16, as on a GPU
    run_train(tmp_path, '--amp', '--max_steps', '2', '--num_samples', '2', '--eval_every', '2', '--eval_images', '4')
    log = [json.loads(line) for line in open(tmp_path / 'log.jsonl')]
    assert all(math.isfinite(r['loss']) for r in log if 'loss' in r) and 'fd' in log[-1]
    assert (tmp_path / 'samples.png').is_file()


@cli
def test_compiled_training_takes_the_steps_of_eager_training(tmp_path):
    # fusion reorders fp32 sums (~1e-7 relative per op), so three steps of a tiny model agree to ~1e-6; a wrong
    # compiled graph (a lost mask, a stale cache) moves the loss by far more than the 1e-4 allowed here
    eager = run_train(tmp_path / 'eager', '--max_steps', '3')
    compiled = run_train(tmp_path / 'compiled', '--max_steps', '3', '--compile')
    losses = [[json.loads(line)['loss'] for line in open(tmp_path / run / 'log.jsonl')]
              for run in ('eager', 'compiled')]
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-4)
    for name, p in eager['model'].items():  # the checkpoint holds the uncompiled module's names
        q = compiled['model'][name]
        if name.endswith('qkv.bias'):  # the key bias adds one constant to a row of scores, which softmax ignores:
            # its gradient is rounding noise that Adam scales up to steps as large as the value, so skip it
            p, q = p.view(3, -1)[0::2], q.view(3, -1)[0::2]
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-6, msg=name)


def stand_in_features(model, images, *args, **kwargs):
    """Features of fid.features' shapes from 8x8 thumbnails and a fixed projection: the plumbing of the online
    evaluation is tested without running the Inception 4 times (the network has tests of its own)."""
    x = torch.as_tensor(np.asarray(images[0:len(images)])).permute(0, 3, 1, 2).float()  # (N, 3, H, W)
    x = F.interpolate(x, size=(8, 8), mode='area').flatten(1) / 255  # (N, 192)
    g = torch.Generator().manual_seed(0)
    return {k: (x @ torch.randn(192, d, generator=g)).numpy() for k, d in (('pool', 2048), ('spatial', 2023),
                                                                            ('logits', 1008))}


@cli
def test_online_evaluation_logs_fid_of_ema_samples_against_the_reference(tmp_path, inception_weights, monkeypatch):
    monkeypatch.setattr(fid, 'features', stand_in_features)
    ref = str(tmp_path / 'ref.npz')  # a reference batch of the training data, written by fid.py --save_stats
    images, _ = tokenizers.make_shapes(12, size=32, seed=0)
    np.savez(tmp_path / 'shapes.npz', arr_0=images)
    run_fid(str(tmp_path / 'shapes.npz'), '--save_stats', ref, '--inception', inception_weights)
    compared = []  # sqrtm of singular 2048x2048 products takes ~30 s here: frechet_distance has its own tests
    monkeypatch.setattr(fid, 'frechet_distance', lambda *s: compared.append(s) or float(np.abs(s[0] - s[2]).sum()))
    run_train(tmp_path / 'run', '--max_steps', '3', '--eval_every', '2', '--fid_ref', ref, '--eval_images', '10',
              '--inception', inception_weights, '--batch_size', '10')  # one sampling batch per evaluation
    evals = [r for r in map(json.loads, open(tmp_path / 'run' / 'log.jsonl')) if 'fid' in r]
    assert [r['step'] for r in evals] == [2, 3]  # every --eval_every steps and at the end
    assert set(evals[0]) == {'step', 'eval_images', 'fid', 'sfid', 'is', 'precision', 'recall'}
    with np.load(ref) as f:
        assert np.array_equal(compared[0][2], f['mu']) and np.array_equal(compared[1][2], f['mu_s'])
    assert evals[0]['fid'] > 0 and evals[0]['fid'] != evals[1]['fid']  # the samples' statistics, not the reference's
    assert 1 <= evals[0]['is'] <= 10


@cli
def test_online_evaluation_without_the_inception_weights_fails_before_training(tmp_path):
    np.savez(tmp_path / 'ref.npz', mu=np.zeros(2048), sigma=np.eye(2048))
    with pytest.raises(SystemExit, match=re.escape(fid.WEIGHTS_URL)) as e:
        run_train(tmp_path, '--max_steps', '1', '--eval_every', '1', '--fid_ref', str(tmp_path / 'ref.npz'),
                  '--inception', str(tmp_path / 'missing.pth'))
    assert '\n' not in str(e.value) and not (tmp_path / 'ckpt.pt').exists()


# -----------------------------------------------------------------------------
# the command lines: sampling (sample.py): the ADM layout, resuming and extending, distribution, bench, figures

def sample_cli(*argv):
    sample.main(sample.get_parser().parse_args([str(a) for a in argv]))


@cli
def test_sample_cli_writes_npz_in_the_adm_layout(tmp_path):
    run_train(tmp_path, '--max_steps', '1')
    out = tmp_path / 'samples.npz'
    sample.main(sample.get_parser().parse_args(['--ckpt', str(tmp_path / 'ckpt.pt'), '--num_images', '3',
                                                '--batch_size', '2', '--out', str(out)]))
    data = np.load(out)
    assert data['arr_0'].dtype == np.uint8 and data['arr_0'].shape == (3, 16, 16, 3)  # NHWC
    assert data['arr_1'].tolist() == [0, 1, 2]
    assert (tmp_path / 'samples.png').is_file()


@cli
def test_an_out_of_another_checkpoint_or_other_flags_is_refused_unchanged_until_overwrite(tmp_path):
    run_train(tmp_path / 'a', '--max_steps', '1')
    run_train(tmp_path / 'b', '--max_steps', '1', '--seed', '1')  # another model
    argv = ['--num_images', '4', '--batch_size', '2', '--num_steps', '16', '--out', tmp_path / 's.npz']
    sample_cli('--ckpt', tmp_path / 'a' / 'ckpt.pt', *argv)
    sample_cli('--ckpt', tmp_path / 'a' / 'ckpt_0000001.pt', *argv)  # the same file under another name continues
    before, first = snapshot(tmp_path), np.load(tmp_path / 's.npz')['arr_0']
    for other in (['--ckpt', tmp_path / 'b' / 'ckpt.pt'], ['--temperature', 0.5], ['--num_steps', 8], ['--top_k', 5],
                  ['--seed', 1], ['--no-ema'], ['--batch_size', 1], ['--labels', 'random'], ['--class_label', 3],
                  ['--position_order', 'raster']):
        with pytest.raises(SystemExit, match=r'^error: .*other settings .*--overwrite') as e:
            sample_cli('--ckpt', tmp_path / 'a' / 'ckpt.pt', *argv, *other)
        assert '\n' not in str(e.value)
    assert snapshot(tmp_path) == before  # nothing written, nothing deleted
    sample_cli('--ckpt', tmp_path / 'b' / 'ckpt.pt', *argv, '--overwrite')
    sample_cli('--ckpt', tmp_path / 'b' / 'ckpt.pt', *argv[:-1], tmp_path / 'fresh.npz')
    overwritten, fresh = np.load(tmp_path / 's.npz')['arr_0'], np.load(tmp_path / 'fresh.npz')['arr_0']
    assert np.array_equal(overwritten, fresh) and not np.array_equal(overwritten, first)


@cli
@pytest.mark.parametrize('labels', ['balanced', 'random'])
def test_more_images_into_the_same_out_continue_the_run_with_the_images_of_a_fresh_one(labels, tmp_path):
    run_train(tmp_path, '--max_steps', '1')
    argv = ['--ckpt', tmp_path / 'ckpt.pt', '--batch_size', 2, '--num_steps', 16, '--labels', labels]
    sample_cli(*argv, '--num_images', 3, '--out', tmp_path / 's.npz')  # batch 1 holds one image
    kept = (tmp_path / 's' / 'batch_00000.npz').stat().st_mtime_ns
    sample_cli(*argv, '--num_images', 5, '--out', tmp_path / 's.npz')
    sample_cli(*argv, '--num_images', 5, '--out', tmp_path / 'fresh.npz')
    assert (tmp_path / 's' / 'batch_00000.npz').stat().st_mtime_ns == kept  # continued, not redone
    grown, fresh = np.load(tmp_path / 's.npz'), np.load(tmp_path / 'fresh.npz')
    assert len(grown['arr_0']) == 5 and np.array_equal(grown['arr_0'], fresh['arr_0'])
    assert np.array_equal(grown['arr_1'], fresh['arr_1'])


@cli
@pytest.mark.parametrize('lost', ['deleted', 'cut short'])
def test_sampling_is_seeded_per_batch_and_resumes_a_run_that_lost_a_batch(lost, tmp_path):
    run_train(tmp_path, '--max_steps', '1')
    argv = ['--ckpt', str(tmp_path / 'ckpt.pt'), '--num_images', '5', '--batch_size', '2', '--num_steps', '16']
    sample.main(sample.get_parser().parse_args(argv + ['--out', str(tmp_path / 'a.npz')]))
    first = np.load(tmp_path / 'a.npz')['arr_0']
    assert sorted(p.name for p in (tmp_path / 'a').glob('batch_*.npz')) == [f'batch_0000{k}.npz' for k in range(3)]
    assert len(list((tmp_path / 'a' / 'images').glob('*.png'))) == 5
    batch = tmp_path / 'a' / 'batch_00001.npz'  # as if killed while sampling batch 1, or its disk failed
    batch.unlink() if lost == 'deleted' else batch.write_bytes(batch.read_bytes()[:100])
    for partial in ('a/batch_00001.npz.4242.tmp', 'a/images/000002.png.4242.tmp', 'a.npz.4242.tmp'):
        (tmp_path / partial).write_bytes(b'left by the killed writer')
    kept = (tmp_path / 'a' / 'batch_00000.npz').stat().st_mtime_ns
    sample.main(sample.get_parser().parse_args(argv + ['--out', str(tmp_path / 'a.npz')]))
    assert not list(tmp_path.rglob('*.tmp'))
    assert (tmp_path / 'a' / 'batch_00000.npz').stat().st_mtime_ns == kept
    assert np.array_equal(np.load(tmp_path / 'a.npz')['arr_0'], first)  # the same images: per-batch seeds


@cli
def test_two_process_sampling_writes_the_images_of_one_process(tmp_path):
    run_train(tmp_path, '--max_steps', '1')
    argv = ['--ckpt', str(tmp_path / 'ckpt.pt'), '--num_images', '6', '--batch_size', '2', '--num_steps', '16']
    sample.main(sample.get_parser().parse_args(argv + ['--out', str(tmp_path / 'one.npz')]))
    run_two_processes(ddp_worker, 'sample', argv + ['--out', str(tmp_path / 'two.npz')])
    one, two = np.load(tmp_path / 'one.npz'), np.load(tmp_path / 'two.npz')
    assert np.array_equal(one['arr_0'], two['arr_0']) and np.array_equal(one['arr_1'], two['arr_1'])


@cli
def test_a_full_disk_keeps_the_finished_samples_and_leaves_no_partial_file(tmp_path, monkeypatch):
    run_train(tmp_path, '--max_steps', '1')
    argv = ['--ckpt', tmp_path / 'ckpt.pt', '--batch_size', 2, '--num_steps', 16, '--out', tmp_path / 's.npz']
    sample_cli(*argv, '--num_images', 3)
    finished = (tmp_path / 's.npz').read_bytes()
    real_savez = np.savez

    def disk_full_at_the_npz(f, **arrays):
        if 'arr_0' in arrays:
            f.write(b'the first bytes')
            raise OSError(errno.ENOSPC, 'No space left on device')
        real_savez(f, **arrays)
    monkeypatch.setattr(np, 'savez', disk_full_at_the_npz)
    with pytest.raises(SystemExit, match=r'^error: writing .*s.npz: No space left on device') as e:
        sample_cli(*argv, '--num_images', 5)  # extends the finished run
    assert '\n' not in str(e.value) and (tmp_path / 's.npz').read_bytes() == finished
    assert not list(tmp_path.rglob('*.tmp'))


@cli
def test_prefix_image_and_mask_files_drive_the_cli(tmp_path):
    run_train(tmp_path, '--max_steps', '1')
    image = tokenizers.make_shapes(1, seed=5)[0][0].numpy()
    Image.fromarray(image).save(tmp_path / 'image.png')
    mask = np.zeros((16, 16), dtype=np.uint8)
    mask[:, :8] = 255  # keep the left half: outpaint the right half
    Image.fromarray(mask).save(tmp_path / 'mask.png')
    sample.main(sample.get_parser().parse_args(['--ckpt', str(tmp_path / 'ckpt.pt'), '--num_images', '2',
                                                '--prefix_image', str(tmp_path / 'image.png'), '--keep_mask',
                                                str(tmp_path / 'mask.png'), '--out', str(tmp_path / 'edit.npz')]))
    out = np.load(tmp_path / 'edit.npz')['arr_0']
    kept = tokenizers.PixelTokenizer().decode(tokenizers.PixelTokenizer().encode(torch.from_numpy(image)[None]))
    assert np.array_equal(out[:, :, :8], kept.numpy()[:, :, :8].repeat(2, 0))


@cli
def test_figures_command_writes_the_similarity_and_attention_pngs(tmp_path):
    run_train(tmp_path, '--max_steps', '1')
    Image.fromarray(tokenizers.make_shapes(1, seed=3)[0][0].numpy()).save(tmp_path / 'image.png')
    sample.main(sample.get_parser().parse_args(['--ckpt', str(tmp_path / 'ckpt.pt'), '--figures',
                                                str(tmp_path / 'image.png'), '--out', str(tmp_path / 'figs')]))
    for name in ('similarity', 'attention'):  # the image, then one map per reference token, 12 px per token
        assert Image.open(tmp_path / 'figs' / f'{name}.png').size == (4 * 16 * 12, 16 * 12)


@cli
def test_sampling_bench_reports_speed_flops_and_mfu(tmp_path, capsys):
    run_train(tmp_path, '--max_steps', '1')
    sample.main(sample.get_parser().parse_args(['--ckpt', str(tmp_path / 'ckpt.pt'), '--bench', '--batch_size', '2',
                                                '--num_steps', '16']))
    assert re.search(r'bench: [\d.]+ images/s at batch 2, 16 steps; [\d.]+ GFLOP per image; MFU -',
                     capsys.readouterr().out)


@cli
def test_sampling_bench_counts_the_operators_and_the_time_of_each_part_per_step(tmp_path, capsys):
    run_train(tmp_path, '--max_steps', '1', '--tokenizer', 'pixel_patch')
    sample_cli('--ckpt', tmp_path / 'ckpt.pt', '--bench', '--batch_size', 2, '--num_steps', 16, '--diffusion_steps', 10)
    line = capsys.readouterr().out.splitlines()[-1]
    ops = int(re.search(r'aten operators per step: (\d+) eager', line).group(1))
    assert 10 * 10 < ops < 10 * 100  # 16 tokens a step, 10 diffusion steps of a few dozen operators each
    ms = dict(re.findall(r'(backbone|head|token head|other) ([\d.]+)', line))
    assert set(ms) == {'backbone', 'head', 'token head', 'other'} and float(ms['token head']) > 0


@cli
def test_sampling_bench_counts_the_steps_of_the_tokens_a_prefix_leaves(tmp_path, capsys):
    run_train(tmp_path, '--max_steps', '1')
    Image.fromarray(tokenizers.make_shapes(1, seed=5)[0][0].numpy()).save(tmp_path / 'image.png')
    mask = np.zeros((16, 16), dtype=np.uint8)
    mask[:12] = 255  # keep 12 of the 16 rows: 64 tokens left, one per step
    Image.fromarray(mask).save(tmp_path / 'mask.png')
    sample_cli('--ckpt', tmp_path / 'ckpt.pt', '--bench', '--batch_size', 2, '--prefix_image', tmp_path / 'image.png',
               '--keep_mask', tmp_path / 'mask.png')
    out = capsys.readouterr().out
    assert re.search(r'bench: [\d.]+ images/s at batch 2, 64 steps', out) and 'aten operators per step' in out


@cli
def test_compiled_sampling_decodes_in_parallel_by_confidence_and_benches(tmp_path, capsys):
    run_train(tmp_path, '--max_steps', '1')
    sample.main(sample.get_parser().parse_args(['--ckpt', str(tmp_path / 'ckpt.pt'), '--compile', '--bench',
                                                '--batch_size', '2', '--num_steps', '16',
                                                '--position_order', 'confidence']))
    assert re.search(r'bench: [\d.]+ images/s at batch 2, 16 steps', capsys.readouterr().out)


# -----------------------------------------------------------------------------
# every bad input a new user hit: one `error:` line, and nothing written before is changed or deleted

COMMANDS = {'train': (train.get_parser, train.main), 'sample': (sample.get_parser, sample.main),
            'tokenizers': (tokenizers.get_parser, tokenizers.cache), 'fid': (fid.get_parser, fid.main)}


@pytest.fixture(scope='module')
def workspace(tmp_path_factory):
    """What a user has on disk before the bad command: an image folder, its cache, a trained run, samples."""
    root = tmp_path_factory.mktemp('workspace')
    make_image_folder(root / 'images')
    tokenizers.cache(argparse_cache(root / 'images', root / 'cache'))
    run_train(root / 'run', '--max_steps', '2')
    sample.main(sample.get_parser().parse_args(['--ckpt', str(root / 'run' / 'ckpt.pt'), '--num_images', '2',
                                                '--batch_size', '2', '--out', str(root / 'samples')]))
    return root


def nan_in_the_run_checkpoint(ws):
    ckpt = torch.load(ws / 'run' / 'ckpt.pt', weights_only=True)
    ckpt['model']['transformer.pos_emb.weight'][0, 0] = float('nan')
    torch.save(ckpt, ws / 'run' / 'ckpt.pt')


def random_bytes_for_every_checkpoint(ws):
    for p in (ws / 'run').glob('ckpt*.pt'):
        p.unlink()
    (ws / 'run' / 'ckpt.pt').write_bytes(os.urandom(2000))


def add_a_class_folder(ws):
    os.makedirs(ws / 'images' / 'birds')
    Image.new('RGB', (20, 20), 'blue').save(ws / 'images' / 'birds' / '0.png')


def replace_an_image(ws):
    Image.new('RGB', (50, 50), 'red').save(ws / 'images' / 'cats' / '0.png')  # same name, other file


def truncate_the_tokens_shard(ws):
    shard = ws / 'cache' / 'tokens_00000.npy'
    shard.write_bytes(shard.read_bytes()[:150])


def truncate_the_labels_shard(ws):
    shard = ws / 'cache' / 'labels_00000.npy'
    shard.write_bytes(shard.read_bytes()[:150])


def edit_cache_meta(ws, **change):
    meta = json.loads((ws / 'cache' / 'meta.json').read_text())
    (ws / 'cache' / 'meta.json').write_text(json.dumps(dict(meta, **change)))


def meta_of_another_image_size(ws):  # what the old `cache` left when rerun with --image_size 32
    edit_cache_meta(ws, image_size=32, grid_size=32)


def meta_with_a_class_added(ws):  # what the old `cache` left when rerun after a class folder was added
    edit_cache_meta(ws, classes=['cats', 'dogs', 'zebras'], num_classes=3)


def labels_of_cats_only(ws):  # a cache in which every file of dogs was unreadable
    np.save(ws / 'cache' / 'labels_00000.npy', np.zeros(6, dtype=np.int64))


def edit_checkpoint(ws, edit):
    """ws/run/edited.pt: the trained checkpoint with edit() applied to its EMA weights."""
    ckpt = torch.load(ws / 'run' / 'ckpt.pt', weights_only=True)
    edit(ckpt['ema'])
    torch.save(ckpt, ws / 'run' / 'edited.pt')


def another_model(ws):
    edit_checkpoint(ws, lambda sd: sd['transformer.cls_emb.weight'].add_(0.01))


def a_missing_weight(ws):
    edit_checkpoint(ws, lambda sd: sd.pop('transformer.cls_emb.weight'))


def an_extra_weight(ws):
    edit_checkpoint(ws, lambda sd: sd.update({'transformer.extra.weight': torch.zeros(2)}))


def a_wrongly_shaped_weight(ws):
    edit_checkpoint(ws, lambda sd: sd.update({'transformer.cls_emb.weight': torch.zeros(3, 3)}))


def a_nan_weight(ws):
    edit_checkpoint(ws, lambda sd: sd['transformer.pos_emb.weight'].view(-1)[5:7].fill_(float('nan')))


def random_bytes_checkpoint(ws):
    (ws / 'run' / 'edited.pt').write_bytes(np.random.default_rng(0).bytes(4096))


def samples_without_settings(ws):  # as an older sample.py left them
    (ws / 'samples' / 'settings.json').unlink()


def continuous_checkpoint(ws):
    run_train(ws / 'continuous', '--max_steps', '1', '--tokenizer', 'pixel_patch')


def prefix_files(ws, keep_columns=8):
    """ws/image.png, a shapes image, and ws/mask.png, white (keep) on its first keep_columns of 16 columns."""
    Image.fromarray(tokenizers.make_shapes(1, seed=5)[0][0].numpy()).save(ws / 'image.png')
    mask = np.zeros((16, 16), dtype=np.uint8)
    mask[:, :keep_columns] = 255
    Image.fromarray(mask).save(ws / 'mask.png')


def a_white_keep_mask(ws):
    prefix_files(ws, keep_columns=16)


def an_unreadable_prefix_image(ws):
    prefix_files(ws)
    (ws / 'image.png').write_bytes(b'not a png')


def a_truncated_keep_mask(ws):
    prefix_files(ws)
    (ws / 'mask.png').write_bytes((ws / 'mask.png').read_bytes()[:40])


SAMPLES = '--ckpt {ws}/run/ckpt.pt --num_images 2 --batch_size 2 --out {ws}/samples'  # how samples/ was made


NEW = '--ckpt {ws}/run/ckpt.pt --out {ws}/new'


EDITED = '--ckpt {ws}/run/edited.pt --out {ws}/new'


PREFIX = NEW + ' --prefix_image {ws}/image.png --keep_mask {ws}/mask.png'


def write_file(name, images=None):
    """A setup of BAD_INPUTS: ws/name holding images as arr_0, or random bytes when images is None."""
    def setup(ws):
        if images is None:
            (ws / name).write_bytes(np.random.default_rng(0).bytes(4096))
        else:
            np.savez(ws / name, arr_0=images)
    return setup


def damage_file(name, flip=None, cut=None):
    """A setup of BAD_INPUTS: ws/name with the byte at `flip` inverted, or cut to its first `cut` bytes."""
    def setup(ws):
        data = bytearray((ws / name).read_bytes())
        if flip is not None:
            data[flip] ^= 0xFF
        (ws / name).write_bytes(data[:cut])
    return setup


# (command, its arguments with {ws} for a fresh copy of the workspace and {inception} for random FID Inception
# weights, what to break there first, what the error names)
BAD_INPUTS = [
    ('train', '--density 300 --out_dir {ws}/run', None, '--density 300'),
    ('train', '--head local --window 20 --out_dir {ws}/new', None, 'does not tile'),
    ('train', '--head local --window 16 --order raster --out_dir {ws}/new', None, 'use --order random'),
    ('train', '--head global --window 16 --out_dir {ws}/new', None, 'use --head local'),
    ('train', '--head linear --density 4 --out_dir {ws}/new', None, 'scores every step already'),
    ('train', '--class_dropout 1.5 --out_dir {ws}/new', None, 'must be in [0, 1)'),
    ('train', '--order rar --head global --out_dir {ws}/new', None, 'use it with --head linear'),
    ('train', '--npp_levels 2 --head linear --order random --out_dir {ws}/new', None,
     'use --head linear --order raster'),
    ('train', '--npp_levels 6 --head linear --order raster --out_dir {ws}/new', None, 'do not tile'),
    ('train', '--global_batch_size 24 --batch_size 16 --out_dir {ws}/new', None, 'not a multiple of --batch_size'),
    ('train', '--data {ws}/nope --out_dir {ws}/new', None, 'no such directory'),
    ('train', '--resume --out_dir {ws}/new', None, 'no checkpoint at'),
    ('train', '--batch_size 0 --out_dir {ws}/new', None, '--batch_size 0 must be at least 1'),
    ('train', '--batch_size -4 --out_dir {ws}/new', None, '--batch_size -4 must be at least 1'),
    ('train', '--ckpt_interval 0 --out_dir {ws}/new', None, '--ckpt_interval 0 must be at least 1'),
    ('train', '--log_interval 0 --out_dir {ws}/new', None, '--log_interval 0 must be at least 1'),
    ('train', '--lr -0.001 --out_dir {ws}/new', None, '--lr -0.001 must be positive'),
    ('train', '--depth 0 --out_dir {ws}/new', None, '--depth 0 must be at least 1'),
    ('train', '--head local --window 0 --out_dir {ws}/new', None, '--window 0 must be at least 1'),
    ('train', '--keep_last 0 --out_dir {ws}/new', None, '--keep_last 0 must be at least 1'),
    ('train', '--max_steps 0 --out_dir {ws}/new', None, '--max_steps 0 must be at least 1'),
    ('train', '--max_steps -5 --out_dir {ws}/new', None, '--max_steps -5 must be at least 1'),
    ('train', '--temperature 0 --out_dir {ws}/new', None, '--temperature 0.0 must be positive'),
    ('train', '--ema 1.5 --out_dir {ws}/new', None, '--ema 1.5 must be in [0, 1)'),
    ('train', '--global_batch_size 0 --out_dir {ws}/new', None, '--global_batch_size 0 must be at least 1'),
    ('train', '--epochs 0.0001 --out_dir {ws}/new', None, 'is less than one step'),
    ('train', '--resume --depth 1 --head_depth 1 --max_steps 1 --out_dir {ws}/run', None,
     'is at step 2, past the 1 steps'),
    ('train', '--resume --depth 1 --head_depth 1 --global_batch_size 32 --epochs 0.0032 --out_dir {ws}/run', None,
     'past the 1 steps'),  # --epochs with a larger batch: fewer steps than the checkpoint's
    ('train', '--resume --depth 1 --head linear --max_steps 3 --out_dir {ws}/run', None,
     'head global (the flags give linear)'),
    ('train', '--resume --max_steps 3 --out_dir {ws}/run', random_bytes_for_every_checkpoint,
     'none of the checkpoints'),
    ('train', '--resume --depth 1 --head_depth 1 --max_steps 3 --out_dir {ws}/run', nan_in_the_run_checkpoint,
     "its 'model' weights hold NaN or inf"),
    ('train', '--out_dir {ws}/run/ckpt.pt', None, 'cannot write there'),
    ('train', '--max_steps 3 --out_dir {ws}/run', None, 'holds another run (ckpt.pt, ckpt_0000002.pt, log.jsonl'),
    ('train', '--resume --overwrite --out_dir {ws}/run', None, '--overwrite deletes it: pick one'),
    ('train', '--out_dir /proc/heptapod_out', None, 'cannot write there'),
    ('train', '--data {ws}/cache --tokenizer pixel_patch --out_dir {ws}/new', None, 'drop --tokenizer pixel_patch'),
    ('train', '--target_position added --out_dir {ws}/new', None, '--target_position applies to the 1D models'),
    ('train', '--data random --tokenizer vq --eval_every 5 --out_dir {ws}/new', None,
     '--eval_every on 256x256 images needs --fid_ref'),
    ('tokenizers', 'cache --data {ws}/images --out {ws}/cache --image_size 32', None, 'image_size 16 -> 32'),
    ('tokenizers', 'cache --data {ws}/images --out {ws}/new --tokenizer vq --image_size 16', None,
     '--tokenizer vq needs its released weights'),
    ('tokenizers', 'cache --data {ws}/images --out {ws}/cache --tokenizer pixel_patch --image_size 32', None,
     'tokenizer pixel -> pixel_patch'),
    ('tokenizers', 'cache --data {ws}/images --out {ws}/cache', add_a_class_folder, 'num_classes 2 -> 3'),
    ('tokenizers', 'cache --data {ws}/images --out {ws}/cache', replace_an_image, 'files_sha256'),
    ('tokenizers', 'cache --data {ws}/images --out {ws}/new --tokenizer pixel_patch --image_size 15', None,
     '--image_size 15 must be positive and a multiple of 2'),
    ('tokenizers', 'cache --data {ws}/images --out {ws}/new --image_size 0', None, '--image_size 0 must be positive'),
    ('tokenizers', 'cache --data {ws}/images --out {ws}/new --shard_size 0', None, '--shard_size must be at least 1'),
    ('tokenizers', 'cache --data {ws}/images --out {ws}/new --ckpt {ws}/run/ckpt.pt', None, '--ckpt is for'),
    ('tokenizers', 'cache --data {ws}/images --out {ws}/run/ckpt.pt', None, 'is a file, not a directory'),
    ('tokenizers', 'cache --data {ws}/images --out {ws}/images/cache', None, 'is inside --data'),
    ('tokenizers', 'cache --data {ws}/images --out /proc/heptapod_cache', None, '/proc/heptapod_cache: cannot write'),
    ('tokenizers', 'cache --data {ws}/images --out {ws}/cache --palette_size 1', None, '--palette_size 1 must be'),
    ('train', '--data {ws}/cache --out_dir {ws}/new', truncate_the_tokens_shard, 'tokens_00000.npy is unreadable'),
    ('train', '--data {ws}/cache --out_dir {ws}/new', truncate_the_labels_shard, 'labels_00000.npy is unreadable'),
    ('train', '--data {ws}/cache --out_dir {ws}/new', meta_of_another_image_size, 'not the uint16 32x32 grids'),
    ('train', '--data {ws}/cache --out_dir {ws}/new', meta_with_a_class_added, 'no image of class zebras'),
    ('train', '--data {ws}/cache --out_dir {ws}/new', labels_of_cats_only, 'no image of class dogs'),
    ('train', '--data {ws}/images --out_dir {ws}/new', None, 'images_cache` and train with --data'),
    # sample.py into an --out of other settings: refused, samples/ untouched
    ('sample', SAMPLES + ' --temperature 0.5', None, 'temperature 1.0 -> 0.5'),
    ('sample', SAMPLES + ' --batch_size 1', None, 'batch_size 2 -> 1'),
    ('sample', SAMPLES.replace('ckpt.pt', 'edited.pt'), another_model, 'ckpt sha256'),
    ('sample', SAMPLES, samples_without_settings, 'no settings.json'),
    # sample.py flags
    ('sample', NEW + ' --cfg 1.5', None, '--class_dropout'),
    ('sample', NEW + ' --diffusion_steps 0', None, '--diffusion_steps 0'),
    ('sample', NEW + ' --diffusion_steps -5', None, '--diffusion_steps -5'),
    ('sample', NEW + ' --temperature 0', None, '--temperature 0'),
    ('sample', NEW + ' --temperature -1', None, '--temperature -1'),
    ('sample', NEW + ' --class_label 10', None, '[0, 9]'),
    ('sample', NEW + ' --class_label -1', None, '--class_label -1'),
    ('sample', NEW + ' --top_k 513', None, '[1, 512]'),
    ('sample', NEW + ' --top_k 0', None, '--top_k 0'),
    ('sample', '--ckpt {ws}/continuous/ckpt.pt --out {ws}/new --top_k 5', continuous_checkpoint, 'continuous'),
    ('sample', NEW + ' --num_images 0', None, '--num_images 0'),
    ('sample', SAMPLES.replace('{ws}/samples', '/proc/heptapod_samples'), None, '/proc/heptapod_samples: cannot write'),
    ('sample', NEW + ' --batch_size 0', None, '--batch_size 0'),
    ('sample', NEW + ' --batch_size -2', None, '--batch_size -2'),
    ('sample', NEW + ' --num_steps 0', None, '--num_steps 0'),
    ('sample', NEW + ' --num_steps 257', None, '[1, 256]'),
    ('sample', PREFIX, a_white_keep_mask, 'white everywhere'),
    ('sample', PREFIX + ' --num_steps 200', prefix_files, '[1, 128] (the positions to generate that --keep_mask'),
    ('sample', PREFIX, an_unreadable_prefix_image, 'image.png'),
    ('sample', PREFIX, a_truncated_keep_mask, 'mask.png'),
    ('sample', PREFIX + ' --position_order raster', prefix_files, 'can only continue a raster prefix'),
    ('sample', NEW + ' --prefix_image {ws}/image.png --keep_mask {ws}/none.png', prefix_files, 'none.png'),
    # sample.py checkpoints
    ('sample', EDITED, a_missing_weight, '1 missing (transformer.cls_emb.weight)'),
    ('sample', EDITED, an_extra_weight, '1 unexpected (transformer.extra.weight)'),
    ('sample', EDITED, a_wrongly_shaped_weight, 'transformer.cls_emb.weight: (3, 3) in the file, (11, 64) in the'),
    ('sample', EDITED, a_nan_weight, 'NaN or inf in 1 of their tensors (transformer.pos_'),
    ('sample', EDITED, random_bytes_checkpoint, 'edited.pt: not a readable PyTorch checkpoint'),
    ('sample', EDITED, lambda ws: torch.save({'weights': torch.zeros(1)}, ws / 'run' / 'edited.pt'),
     'not a heptapod train.py checkpoint'),
    ('sample', '--ckpt {ws}/run/missing.pt --out {ws}/new', None, 'missing.pt: no such file'),
    ('sample', '--ckpt {ws}/run --out {ws}/new', None, 'run is a folder: pass a file in it'),
    # fid.py: files that are not what they claim, too few images, a bad output path
    ('fid', '{ws}/junk.npz {ws}/samples/samples.npz --inception {inception}', write_file('junk.npz'),
     'junk.npz: not a readable .npz'),
    ('fid', '{ws}/four.npz {ws}/junk.npz --inception {inception}',
     lambda ws: (write_file('four.npz', random_images(4, 32))(ws), write_file('junk.npz')(ws)),
     'junk.npz: not a readable .npz'),  # the reference
    ('fid', '{ws}/empty.npz {ws}/samples/samples.npz --inception {inception}',
     write_file('empty.npz', np.zeros((0, 32, 32, 3), np.uint8)), 'holds no images'),
    ('fid', '{ws}/one.npz {ws}/samples/samples.npz --inception {inception}',
     write_file('one.npz', random_images(1, 32)), 'one.npz: 1 image;'),
    ('fid', '{ws}/images --save_stats {ws}/ref.npz --inception {inception}', write_file('images/broken.png'),
     'broken.png: not a readable image'),
    ('fid', '{ws}/images --save_stats {ws}/ref.npz --inception {inception}',
     damage_file('images/dogs/2.png', cut=100), '2.png: not a readable image'),  # header read, pixels not: mid-run
    ('fid', '{ws}/four.npz --save_stats {ws}/ref.npz --inception {inception}',
     lambda ws: (write_file('four.npz', random_images(4, 32))(ws), damage_file('four.npz', flip=1000)(ws)),
     'four.npz: arr_0 unreadable'),  # a CRC error, found at the end of arr_0
    ('fid', '{ws}/images --save_stats {ws}/run --inception {inception}', None, '--save_stats'),
    ('fid', '{ws}/images --save_stats {ws}/samples/samples.npz --inception {inception}', None, 'exists; delete it'),
    ('fid', '{ws}/images --save_stats {ws}/ref.npz --batch_size 0', None, '--batch_size 0'),
]


@cli
@pytest.mark.parametrize('command,argv,setup,match', BAD_INPUTS, ids=[f'{c} {a}' for c, a, _, _ in BAD_INPUTS])
def test_bad_input_fails_in_one_error_line_and_changes_nothing_on_disk(command, argv, setup, match, workspace,
                                                                       tmp_path, request):
    ws = tmp_path / 'ws'
    shutil.copytree(workspace, ws)
    if setup is not None:
        setup(ws)
    before = snapshot(ws)
    get_parser, main = COMMANDS[command]
    inception = request.getfixturevalue('inception_weights') if '{inception}' in argv else None  # written once
    with pytest.raises(SystemExit) as e:  # any other exception would be a traceback for the user
        main(get_parser().parse_args(shlex.split(argv.format(ws=ws, inception=inception))))
    message = str(e.value.code)
    assert message.startswith('error: ') and '\n' not in message and match in message, message
    assert snapshot(ws) == before


@cli
def test_a_refused_command_prints_one_error_line_and_no_traceback(tmp_path):
    run = subprocess.run([sys.executable, 'train.py', '--density', '300', '--out_dir', str(tmp_path)],
                         cwd=os.path.dirname(os.path.abspath(__file__)), capture_output=True, text=True)
    assert run.returncode != 0 and 'Traceback' not in run.stderr
    assert [line for line in run.stderr.splitlines() if line.strip()] == [run.stderr.strip()]
    assert run.stderr.startswith('error: ') and not os.listdir(tmp_path)


# -----------------------------------------------------------------------------
# GPU acceptance: python -m pytest -q -m gpu (skipped without CUDA), about 4 minutes on one H100/H200, the checks
# that never ran on a GPU first. Each test prints what it measured on a line starting 'GPU |' (the README's table).

def gpu(test):
    """Selected by -m gpu (pytest.ini leaves them out of the default run), skipped without CUDA."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')(test))


def report(capsys, line):
    with capsys.disabled():
        print(f"\nGPU | {line}", flush=True)


@gpu
@pytest.mark.parametrize('head', ['global', 'local'])
def test_gpu_attention_takes_a_fused_kernel_in_the_backbone_the_head_and_the_cached_decode_step(head):
    # inside sdpa_kernel(flash, memory-efficient) PyTorch raises 'No available kernel' rather than fall back to
    # the math kernel, so each call below ran fused
    from torch.nn.attention import SDPBackend, sdpa_kernel
    torch.manual_seed(0)
    model = Heptapod(16384, 1000, 16, **{k: SIZES['B'][k] for k in ('n_layer', 'n_embd', 'n_head')}, head=head,
                     window=16 if head == 'local' else None).cuda().eval()
    g = torch.Generator('cuda').manual_seed(0)
    idx, labels = torch.randint(16384, (4, 256), device='cuda'), torch.arange(4, device='cuda')
    orders, prefix_lens = make_orders(4, 256, 'random', g), sample_prefix_lens(4, 2, 256, g)
    with torch.no_grad(), torch.autocast('cuda', dtype=torch.bfloat16), \
            sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        h = model.transformer(take(idx, orders)[:, :-1], labels, orders[:, :-1])  # causal
        model.head(h, orders, prefix_lens)  # bidirectional (global) or cross-attention with a mask (local)
        t = model.transformer
        t.setup_cache(4, 256)
        t.prefill(labels)
        t.decode(idx[:, :1], orders[:, :1], torch.tensor([1], device='cuda'))  # attends through a cache mask
        t.clear_cache()


@gpu
@pytest.mark.parametrize('head,tokens', [('global', 'discrete'), ('local', 'discrete'), ('global', 'continuous'),
                                         ('linear', 'continuous')])
def test_gpu_cuda_graphs_sample_what_the_eager_sampler_samples(head, tokens, capsys):
    continuous = dict(token_dim=16, diffusion_width=64, diffusion_depth=2) if tokens == 'continuous' else {}
    model = tiny_model(head, window=16 if head == 'local' else None, **continuous)
    model = (live_token_head(model) if continuous else model).cuda()
    labels, graphs = torch.arange(4, device='cuda'), sample.CUDAGraphs()
    for amp in (False, True):
        with torch.autocast('cuda', dtype=torch.bfloat16, enabled=amp):
            runs = [generate(model, labels, 'random', torch.Generator('cuda').manual_seed(0), diffusion_steps=20,
                             num_steps=16 if head == 'global' else None, run=g) for g in (None, graphs, graphs)]
        for replayed in runs[1:]:  # captured, then replayed (the token head's graphs; the others are per call)
            if continuous:
                torch.testing.assert_close(replayed, runs[0], atol=1e-3, rtol=1e-3)
            else:
                assert torch.equal(replayed, runs[0])
    report(capsys, f"CUDA graphs = eager, {head} head, {tokens} tokens, fp32 and bf16 ({len(graphs.graphs)} graphs)")


@gpu
def test_gpu_torchrun_with_nccl_trains_and_checkpoints(tmp_path, capsys):
    run = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=1', 'train.py', '--data', 'random',
                          '--tokenizer', 'vq', '--size', 'small', '--batch_size', '8', '--max_steps', '3',
                          '--log_interval', '1', '--num_samples', '0', '--out_dir', str(tmp_path)],
                         cwd=os.path.dirname(os.path.abspath(__file__)), capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert torch.load(tmp_path / 'ckpt.pt', weights_only=True)['step'] == 3
    report(capsys, f"torchrun --nproc_per_node=1 (NCCL) | {run.stdout.strip().splitlines()[-1]}")


@gpu
@pytest.mark.parametrize('steps', [256, 64])
def test_gpu_sampling_throughput_of_B_at_batch_256(steps, tmp_path, capsys, vae_file):
    run = tmp_path / 'run'
    train.main(train.get_parser().parse_args(['--data', 'random', '--tokenizer', 'vae', '--size', 'B', '--batch_size',
                                              '8', '--max_steps', '1', '--num_samples', '0', '--out_dir', str(run)]))
    capsys.readouterr()
    sample_cli('--ckpt', run / 'ckpt.pt', '--tokenizer_ckpt', vae_file[0], '--bench', '--batch_size', 256,
               '--num_steps', steps)
    report(capsys, f"sample --size B --tokenizer vae --batch_size 256 --num_steps {steps} | "
                   f"{' | '.join(capsys.readouterr().out.strip().splitlines()[-2:])}")


@gpu
def test_gpu_compiled_sampling_by_confidence(tmp_path, capsys):
    run_train(tmp_path, '--max_steps', '1', '--size', 'small', '--depth', '6', '--head_depth', '6')
    capsys.readouterr()
    sample_cli('--ckpt', tmp_path / 'ckpt.pt', '--compile', '--bench', '--batch_size', 64, '--num_steps', 16,
               '--position_order', 'confidence')
    report(capsys, f"compiled sampling, small, 16 steps by confidence | {capsys.readouterr().out.strip()}")


@gpu
def test_gpu_compiled_bf16_training_of_B_throughput_and_mfu(tmp_path, capsys):
    capsys.readouterr()
    train.main(train.get_parser().parse_args(['--data', 'random', '--tokenizer', 'vae', '--size', 'B', '--compile',
                                              '--batch_size', '64', '--bench', '--bench_warmup', '3', '--bench_steps',
                                              '10', '--out_dir', str(tmp_path)]))
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith('bench:'))
    report(capsys, f"train --size B --tokenizer vae --compile --batch_size 64 | {line}")
