"""
Tests for heptapod: python -m pytest -q
Tiny configs on the CPU with fixed seeds; each test checks one property.
"""
import os
import re
import shlex

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import sample
import tokenizers
import train
from heads import Heptapod, sample_prefix_lens
from model import Transformer, make_orders
from sample import generate

G = 8  # model-level tests use an 8x8 grid: every property holds, at a quarter of the steps
N = G * G
TINY = dict(vocab_size=512, num_classes=10, grid_size=G, n_layer=2, n_embd=32, n_head=2)


def tiny_model(head='global', **kw):
    torch.manual_seed(0)
    return Heptapod(**dict(TINY, head=head, head_depth=2, **kw)).eval()


def fixed_batch(B=8, seed=0):
    images, labels = tokenizers.make_shapes(B, size=G, seed=seed)
    return tokenizers.PixelTokenizer().encode(images).flatten(1), labels


def run_train(tmp_path, *flags):
    args = train.get_parser().parse_args(['--size', 'tiny', '--depth', '1', '--head_depth', '1', '--batch_size', '4',
                                          '--log_interval', '1', '--num_samples', '0', '--out_dir', str(tmp_path),
                                          *flags])
    train.main(args)
    return torch.load(os.path.join(tmp_path, 'ckpt.pt'), weights_only=True)


# -----------------------------------------------------------------------------
# the causal Transformer

@pytest.mark.parametrize('target_aware', [False, True])
def test_changing_a_later_token_never_changes_an_earlier_hidden_state(target_aware):
    torch.manual_seed(0)
    model = Transformer(512, 10, G, n_layer=2, n_embd=32, n_head=2, target_aware=target_aware).eval()
    g = torch.Generator().manual_seed(0)
    idx, labels = torch.randint(512, (2, N - 1)), torch.tensor([3, 7])
    orders = make_orders(2, N, 'random', g)
    target = orders if target_aware else None
    h = model(idx, labels, orders[:, :-1], target)  # (2, N, C)
    j = 30
    idx2 = idx.clone()
    idx2[:, j:] = (idx2[:, j:] + 1) % 512  # change the tokens read at steps j, j+1, ...
    h2 = model(idx2, labels, orders[:, :-1], target)
    assert torch.equal(h[:, :j + 1], h2[:, :j + 1])  # h[:, t] has seen t tokens
    assert not torch.allclose(h[:, j + 1], h2[:, j + 1])


@pytest.mark.parametrize('target_aware', [False, True])
def test_only_the_1d_model_is_told_the_next_position(target_aware):
    # RAR Fig. 3: two orders that differ only in their last two positions. The state that has seen N-2
    # tokens must predict different positions, so only a target-aware model may tell them apart.
    torch.manual_seed(0)
    model = Transformer(512, 10, G, n_layer=2, n_embd=32, n_head=2, target_aware=target_aware).eval()
    idx, labels = torch.randint(512, (1, N - 1)), torch.tensor([0])
    orders = make_orders(1, N, 'random', torch.Generator().manual_seed(0))
    swapped = orders.clone()
    swapped[:, -2:] = orders[:, -2:].flip(1)
    h = model(idx, labels, orders[:, :-1], orders if target_aware else None)
    h_swapped = model(idx, labels, swapped[:, :-1], swapped if target_aware else None)
    assert torch.equal(h[:, :N - 2], h_swapped[:, :N - 2])
    assert torch.equal(h[:, N - 2], h_swapped[:, N - 2]) != target_aware


@pytest.mark.parametrize('target_aware', [False, True])
def test_kv_cache_decode_matches_full_forward(target_aware):
    torch.manual_seed(0)
    model = Transformer(512, 10, G, n_layer=2, n_embd=32, n_head=2, target_aware=target_aware).eval()
    orders = make_orders(3, N, 'random', torch.Generator().manual_seed(1))
    idx, labels = torch.randint(512, (3, 20)), torch.tensor([1, 2, 3])
    target = orders if target_aware else None
    h_full = model(idx, labels, orders[:, :20], None if target is None else target[:, :21])  # (3, 21, C)
    model.setup_cache(3, N)
    steps = [model.prefill(labels, None if target is None else target[:, :1])]
    for t in range(20):
        tp = None if target is None else target[:, t + 1:t + 2]
        steps.append(model.decode(idx[:, t:t + 1], orders[:, t:t + 1], torch.tensor([t + 1]), tp))
    model.clear_cache()
    torch.testing.assert_close(torch.cat(steps, 1), h_full, atol=1e-5, rtol=1e-5)


# -----------------------------------------------------------------------------
# the global 2D head

def head_outputs(model, idx, labels, orders, prefix_lens):
    seq = idx.gather(1, orders)
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
    expected = F.cross_entropy(model.classifier(z)[~seen], targets[~seen])
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
    expected = F.cross_entropy(model.classifier(z)[~seen], targets[~seen])
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


def test_raster_order_is_row_major_and_random_orders_are_permutations():
    g = torch.Generator().manual_seed(0)
    assert torch.equal(make_orders(3, N, 'raster', g), torch.arange(N).expand(3, N))
    orders = make_orders(5, N, 'random', g)
    assert torch.equal(orders.sort(1).values, torch.arange(N).expand(5, N))
    assert not torch.equal(orders[0], orders[1])


# -----------------------------------------------------------------------------
# training

@pytest.mark.parametrize('head,order', [('global', 'random'), ('global', 'raster'), ('local', 'random'),
                                        ('linear', 'raster'), ('linear', 'random')])
def test_every_order_and_head_trains_with_falling_loss_on_a_fixed_batch(head, order):
    model = tiny_model(head, window=16 if head == 'local' else None).train()
    idx, labels = fixed_batch(8)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(30):
        orders = make_orders(8, N, order, g)
        loss = model(idx, labels, orders, sample_prefix_lens(8, 4 if head == 'global' else 1, N, g))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5]), losses


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
    resumed = run_train(tmp_path / 'b', *flags, '--resume')
    assert resumed['step'] == straight['step'] == 6
    for key in ('model', 'ema'):
        for name, p in straight[key].items():
            torch.testing.assert_close(resumed[key][name], p, atol=0, rtol=0, msg=f"{key}.{name}")


def test_data_shards_of_ranks_are_disjoint_and_cover_the_epoch():
    tokens, labels, _ = tokenizers.load_dataset('shapes', num_images=40)
    args = train.get_parser().parse_args(['--batch_size', '5'])
    seen = []
    for rank in range(2):
        for step in range(4):  # 40 images / 2 ranks / 5 per batch = 4 steps per epoch
            idx, y = train.get_batch(tokens, labels, step, args, rank, 2)
            seen += [tuple(row.tolist()) for row in idx]
    assert len(set(seen)) == len({tuple(t.flatten().tolist()) for t in torch.from_numpy(tokens.astype(np.int64))})


def test_nan_loss_stops_the_run_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    run_train(tmp_path, '--max_steps', '2')
    before = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    real_forward = Heptapod.forward
    monkeypatch.setattr(Heptapod, 'forward', lambda self, *a: real_forward(self, *a) * float('nan'))
    with pytest.raises(SystemExit, match='loss is nan'):
        run_train(tmp_path, '--max_steps', '4', '--resume')
    after = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    assert after['step'] == before['step'] == 2


# -----------------------------------------------------------------------------
# sampling

@pytest.mark.parametrize('head,order', [('global', 'random'), ('local', 'random'), ('linear', 'raster'),
                                        ('linear', 'random')])
def test_kv_cache_sampling_equals_recomputing_from_scratch(head, order):
    model = tiny_model(head, window=16 if head == 'local' else None)
    labels = torch.tensor([0, 5, 9])
    cached = generate(model, labels, order, torch.Generator().manual_seed(0))
    recomputed = generate(model, labels, order, torch.Generator().manual_seed(0), use_cache=False)
    assert cached.shape == (3, N) and cached.min() >= 0 and cached.max() < 512
    assert torch.equal(cached, recomputed)


def test_top_k_one_samples_the_most_likely_token():
    logits = torch.randn(10, 50)
    tok = sample.sample_token(logits, 1.0, 1, torch.Generator().manual_seed(0))
    assert torch.equal(tok, logits.argmax(-1))


def test_sample_cli_writes_npz_in_the_adm_layout(tmp_path):
    run_train(tmp_path, '--max_steps', '1')
    out = tmp_path / 'samples.npz'
    sample.main(sample.get_parser().parse_args(['--ckpt', str(tmp_path / 'ckpt.pt'), '--num_images', '3',
                                                '--batch_size', '2', '--out', str(out)]))
    data = np.load(out)
    assert data['arr_0'].dtype == np.uint8 and data['arr_0'].shape == (3, 16, 16, 3)  # NHWC
    assert data['arr_1'].tolist() == [0, 1, 2]
    assert (tmp_path / 'samples.png').is_file()


# -----------------------------------------------------------------------------
# tokenizers and data

def test_pixel_tokenizer_round_trip_keeps_the_top_three_bits():
    images = torch.randint(0, 256, (4, 16, 16, 3), dtype=torch.uint8)
    tok = tokenizers.PixelTokenizer()
    tokens = tok.encode(images)
    assert tokens.shape == (4, 16, 16) and tokens.min() >= 0 and tokens.max() < 512
    decoded = tok.decode(tokens)
    assert torch.equal(decoded >> 5, images >> 5)
    assert torch.equal(tok.encode(decoded), tokens)


def test_shapes_dataset_is_deterministic_and_class_structured():
    a, la = tokenizers.make_shapes(100, seed=0)
    b, lb = tokenizers.make_shapes(100, seed=0)
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert sorted(set(la.tolist())) == list(range(10))
    # the shape of a class is visible: mean foreground masks of two classes differ
    fg = (a.int().sum(-1) > a.int().sum(-1).flatten(1).min(1).values[:, None, None])
    assert (fg[la == 7].float().mean(0) - fg[la == 8].float().mean(0)).abs().max() > 0.5


def make_image_folder(root, per_class=3):
    for c in ('cats', 'dogs'):
        os.makedirs(root / c)
        for i in range(per_class):
            arr = np.random.default_rng(i).integers(0, 256, (40, 30, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / c / f'{i}.png')


def test_image_folder_caches_trains_and_samples(tmp_path):
    make_image_folder(tmp_path / 'images')
    (tmp_path / 'images' / 'dogs' / 'notes.txt').write_text('not an image')
    (tmp_path / 'images' / 'dogs' / 'broken.png').write_bytes(b'not a png')
    args = argparse_cache(tmp_path / 'images', tmp_path / 'cache')
    tokenizers.cache(args)
    tokens, labels, meta = tokenizers.load_dataset(str(tmp_path / 'cache'))
    assert tokens.shape == (6, 16, 16) and labels.tolist() == [0, 0, 0, 1, 1, 1]  # 2 bad files skipped
    assert meta['classes'] == ['cats', 'dogs'] and meta['vocab_size'] == 512
    ckpt = run_train(tmp_path / 'run', '--data', str(tmp_path / 'cache'), '--max_steps', '2', '--batch_size', '2')
    assert ckpt['data_meta']['num_classes'] == 2 and ckpt['step'] == 2


def argparse_cache(data, out):
    import argparse
    return argparse.Namespace(tokenizer='pixel', data=str(data), image_size=16, out=str(out))


def test_center_crop_gives_the_target_size_from_any_aspect():
    for size in [(300, 200), (17, 90), (16, 16)]:
        arr = tokenizers.center_crop_arr(Image.new('RGB', size), 16)
        assert arr.shape == (16, 16, 3)


# -----------------------------------------------------------------------------
# bad input: one clear line

def test_missing_data_directory_fails_clearly(tmp_path):
    with pytest.raises(SystemExit, match='no such directory'):
        run_train(tmp_path, '--data', str(tmp_path / 'nope'))


def test_density_larger_than_the_grid_fails_clearly(tmp_path):
    with pytest.raises(SystemExit, match='--density 300 must be in'):
        run_train(tmp_path, '--density', '300')


def test_resume_without_a_checkpoint_fails_clearly(tmp_path):
    with pytest.raises(SystemExit, match='no checkpoint at'):
        run_train(tmp_path, '--resume')


def test_resume_with_other_model_flags_fails_clearly(tmp_path):
    run_train(tmp_path, '--max_steps', '1')
    with pytest.raises(SystemExit, match='holds a model with config'):
        run_train(tmp_path, '--max_steps', '2', '--resume', '--head', 'linear')


def test_wrong_checkpoint_file_fails_clearly(tmp_path):
    bad = tmp_path / 'bad.pt'
    bad.write_bytes(b'garbage')
    with pytest.raises(SystemExit, match='not a readable PyTorch checkpoint'):
        sample.load_checkpoint(str(bad))
    torch.save({'weights': torch.zeros(1)}, tmp_path / 'other.pt')
    with pytest.raises(SystemExit, match='not a heptapod train.py checkpoint'):
        sample.load_checkpoint(str(tmp_path / 'other.pt'))
    with pytest.raises(SystemExit, match='no such file'):
        sample.load_checkpoint(str(tmp_path / 'missing.pt'))


def test_image_folder_errors_name_the_problem(tmp_path):
    with pytest.raises(SystemExit, match='no such directory'):
        tokenizers.list_image_folder(str(tmp_path / 'missing'))
    os.makedirs(tmp_path / 'data' / 'empty_class')
    with pytest.raises(SystemExit, match="class folder 'empty_class' is empty"):
        tokenizers.list_image_folder(str(tmp_path / 'data'))


def test_training_on_a_cache_with_another_tokenizer_flag_fails_clearly(tmp_path, monkeypatch):
    make_image_folder(tmp_path / 'images')
    tokenizers.cache(argparse_cache(tmp_path / 'images', tmp_path / 'cache'))
    meta = tmp_path / 'cache' / 'meta.json'
    meta.write_text(meta.read_text().replace('"pixel"', '"vq"'))  # a cache of other tokens
    with pytest.raises(SystemExit, match="holds 'vq' tokens; pass --tokenizer vq"):
        run_train(tmp_path / 'run', '--data', str(tmp_path / 'cache'))


def readme_ablation_flags():
    text = open(os.path.join(os.path.dirname(__file__), 'README.md')).read()
    table = text[text.index('## Paper ablations as flags'):].split('\n## ')[0]
    return [row.split('|')[3].strip().strip('`') for row in table.splitlines()
            if row.startswith('| ') and '--' in row.split('|')[3]]


@pytest.mark.parametrize('flags', readme_ablation_flags())
def test_every_readme_ablation_command_runs_on_the_tiny_config(flags, tmp_path):
    args = train.get_parser().parse_args(shlex.split(flags) + [
        '--size', 'tiny', '--batch_size', '2', '--max_steps', '2', '--epochs', '0', '--warmup_epochs', '0',
        '--num_samples', '0', '--log_interval', '1', '--out_dir', str(tmp_path)])
    train.main(args)
    ckpt = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    assert ckpt['step'] == 2 and ckpt['args']['head'] == args.head


@pytest.mark.parametrize('flags,message', [
    ('--head local --window 20', 'does not tile'),
    ('--head local --window 16 --order raster', 'use --order random'),
    ('--head global --window 16', 'use --head local'),
    ('--head linear --density 4', 'scores every step already'),
    ('--class_dropout 1.5', 'must be in [0, 1)'),
])
def test_invalid_flag_combinations_fail_at_start_up_in_one_line(flags, message, tmp_path):
    with pytest.raises(SystemExit, match=re.escape(message)) as e:
        run_train(tmp_path, *shlex.split(flags))
    assert '\n' not in str(e.value)


def test_dry_run_prints_parameters_and_flops_and_trains_nothing(tmp_path, capsys):
    args = train.get_parser().parse_args(['--dry_run', '--size', 'B', '--out_dir', str(tmp_path)])
    train.main(args)
    out = capsys.readouterr().out
    assert 'parameters total' in out and 'training FLOPs per image, total' in out
    assert not (tmp_path / 'ckpt.pt').exists()
