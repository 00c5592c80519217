"""
Sample images from a trained Heptapod: the (position, token) loop of Sec. 4.2.

At each step the head predicts the tokens at all positions not yet generated, one position is chosen
uniformly at random among them, its token is sampled, and the pair is fed back to the causal
Transformer through its KV cache, until the grid is full. No classifier-free guidance.

    python sample.py --ckpt out/ckpt.pt --num_images 100 --out samples.npz

writes samples.npz (arr_0: uint8 NHWC images, arr_1: class labels, the ADM evaluator's layout)
and samples.png, a grid of the first images.
"""
import argparse
import math
import os
import time

import numpy as np
import torch
from PIL import Image

from heads import Heptapod, take
from model import make_orders
from tokenizers import make_tokenizer


@torch.no_grad()
def generate(model, labels, order, generator, temperature=1.0, top_k=None, cfg=1.0, use_cache=True):
    """Tokens (B, N) in raster order for class labels (B,). `order` is the training order: 'random' draws
    each next position uniformly among those not yet generated, 'raster' goes row by row.
    cfg > 1 guides with a 'no class' copy (classifier-free guidance, off by default): logit mixing for
    discrete tokens, the noise prediction with MAR's linear schedule for continuous ones.
    use_cache=False recomputes the causal Transformer over the whole prefix at every step (reference)."""
    B, N, C, D = len(labels), model.grid_size ** 2, model.config['n_embd'], model.config['token_dim']
    one_d = model.head is None  # the 1D baselines predict the single next token (Table 1)
    # Picking a uniformly random position among those left at every step draws a uniformly random
    # permutation, so we draw it up front; the 1D models are told it as their target positions.
    orders = make_orders(B, N, order, generator)  # (B, N) the position generated at each step
    if cfg != 1.0:  # the unconditional copies read the same positions and receive the same tokens
        labels, orders = torch.cat([labels, torch.full_like(labels, model.num_classes)]), orders.repeat(2, 1)
    target = (lambda a, b: orders[:, a:b]) if one_d else (lambda a, b: None)
    rows = torch.arange(len(labels), device=labels.device)
    tokens = torch.zeros(len(labels), N, *([D] if D else []), dtype=torch.float if D else torch.long,
                         device=labels.device)  # (B, N) ids or (B, N, D) vectors, raster layout
    h_steps = torch.zeros(len(labels), N, C, device=labels.device)  # (B, N, C) h_steps[:, t] has seen t tokens
    t_model = model.transformer
    try:
        if use_cache:
            t_model.setup_cache(len(labels), N)  # the class and N-1 tokens; the last token is never fed back
            h = t_model.prefill(labels, target(0, 1))  # (B, 1, C)
        else:
            h = t_model(tokens[:, :0], labels, orders[:, :0], target(0, 1))
        for t in range(N):
            h_steps[:, t] = h[:, -1]
            pos = orders[:, t]  # (B,)
            if one_d:
                z = h_steps[:, t]
            else:  # the head predicts the positions left (global: all, local: the chunk of pos); read pos
                z, positions, _ = model.head(h_steps, orders, torch.full((len(labels), 1), t, device=pos.device))
                z = z[rows, (positions == pos[:, None]).int().argmax(1)]  # (B, C)
            # MAR's linear CFG schedule for the diffusion head: 1 at the first token, cfg at the last
            step_cfg = 1 + (cfg - 1) * (t + 1) / N if D else cfg
            tok = model.token_head.sample(z, generator, temperature, step_cfg, top_k)  # (B,) or (B, D)
            if cfg != 1.0:
                tok = tok.repeat(2, *([1] * (tok.dim() - 1)))
            tokens[rows, pos] = tok
            if t == N - 1:
                break
            if use_cache:  # feed the (position, token) pair back as step t+1
                step = torch.full((1,), t + 1, device=labels.device)
                h = t_model.decode(tok[:, None], pos[:, None], step, target(t + 1, t + 2))  # (B, 1, C)
            else:
                h = t_model(take(tokens, orders[:, :t + 1]), labels, orders[:, :t + 1], target(0, t + 2))
    finally:
        t_model.clear_cache()
    return tokens[:B]


def save_grid(images, path, ncol):
    """Save uint8 images (B, H, W, 3) as one PNG grid, upscaled (nearest) to at least 64 px per image."""
    B, H, W, _ = images.shape
    nrow = math.ceil(B / ncol)
    grid = np.zeros((nrow * H, ncol * W, 3), dtype=np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, ncol)
        grid[r * H:(r + 1) * H, c * W:(c + 1) * W] = im
    scale = max(1, math.ceil(64 / H))
    Image.fromarray(grid).resize((ncol * W * scale, nrow * H * scale), Image.NEAREST).save(path)


def load_checkpoint(path, device='cpu'):
    """A train.py checkpoint, read without unpickling arbitrary objects."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: --ckpt {path}: no such file (train.py writes out_dir/ckpt.pt)")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise SystemExit(f"error: --ckpt {path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})")
    missing = {'config', 'model', 'ema', 'args', 'data_meta'} - set(ckpt if isinstance(ckpt, dict) else ())
    if missing:
        raise SystemExit(f"error: --ckpt {path}: not a heptapod train.py checkpoint (missing {sorted(missing)})")
    return ckpt


def main(args):
    device = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    ckpt = load_checkpoint(args.ckpt, device)
    model = Heptapod(**ckpt['config']).to(device).eval()
    model.load_state_dict(ckpt['ema' if args.ema else 'model'])
    meta, order = ckpt['data_meta'], ckpt['args']['order']
    tokenizer = make_tokenizer(meta['tokenizer'], args.tokenizer_ckpt or meta.get('ckpt'), device)
    g = torch.Generator(device).manual_seed(args.seed)
    labels = torch.arange(args.num_images, device=device) % meta['num_classes']  # balanced classes
    if args.class_label is not None:
        labels.fill_(args.class_label)
    images, t0 = [], time.time()
    for i in range(0, args.num_images, args.batch_size):
        tokens = generate(model, labels[i:i + args.batch_size], order, g, args.temperature, args.top_k, args.cfg)
        images.append(tokenizer.decode(tokens.view(-1, model.grid_size, model.grid_size, *tokens.shape[2:])).cpu())
        done = i + len(tokens)
        print(f"sampled {done}/{args.num_images} images, {done / (time.time() - t0):.2f} images/s")
    images = torch.cat(images).numpy()  # (num_images, H, W, 3) uint8
    np.savez(args.out, arr_0=images, arr_1=labels.cpu().numpy())
    png = os.path.splitext(args.out)[0] + '.png'
    save_grid(images[:100], png, ncol=meta['num_classes'] if meta['num_classes'] <= 20 else 10)
    print(f"wrote {args.out} and {png}")


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--ckpt', default='out/ckpt.pt', help='checkpoint written by train.py')
    parser.add_argument('--num_images', type=int, default=100)
    parser.add_argument('--out', default='samples.npz', help='.npz to write; a .png grid is written beside it')
    parser.add_argument('--batch_size', type=int, default=100)
    parser.add_argument('--temperature', type=float, default=1.0)
    parser.add_argument('--top_k', type=int, default=None, help='sample among the k most likely tokens only')
    parser.add_argument('--cfg', type=float, default=1.0, help='classifier-free guidance scale; 1 = off (the paper)')
    parser.add_argument('--class_label', type=int, default=None, help='one class for all images (default: balanced)')
    parser.add_argument('--ema', action=argparse.BooleanOptionalAction, default=True, help='use the EMA weights')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--tokenizer_ckpt', default=None,
                        help='vq/vae weights to decode with (default: the file the cache was made with)')
    parser.add_argument('--device', default=None, help='default: cuda if available, else cpu')
    return parser


if __name__ == '__main__':
    main(get_parser().parse_args())
