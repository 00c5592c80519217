"""
Train Heptapod: next 2D distribution prediction (or a 1D baseline of Table 1) on cached tokens.

    python train.py                                  # tiny model, built-in shapes, a few minutes on a CPU
    python train.py --data CACHE --size B --head global --density 4 --order random
    torchrun --nproc_per_node=8 train.py --data CACHE --size H --head global --density 1

Writes out_dir/ckpt.pt (every --ckpt_interval steps and at the end) and out_dir/samples.png.
"""
import argparse
import functools
import math
import os
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from heads import Heptapod, sample_prefix_lens
from model import SIZES, make_orders
from sample import generate, save_grid
from tokenizers import TOKENIZERS, load_dataset, make_tokenizer, token_meta


def print0(*a, **kw):
    if int(os.environ.get('RANK', 0)) == 0:
        print(*a, **kw, flush=True)


def get_lr(step, args):
    """Linear warmup, then constant (MAR's schedule) or cosine decay to 0."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    if args.lr_schedule == 'constant':
        return args.lr
    progress = (step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps)
    return args.lr * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def update_ema(ema, model, step, decay):
    # the decay ramps up as (1+step)/(10+step) (TF's ExponentialMovingAverage with num_updates), so
    # that short runs get a useful average too; it reaches 0.9999 after ~90k steps
    d = min(decay, (1 + step) / (10 + step))
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - d)


@functools.lru_cache(maxsize=1)
def epoch_permutation(num_images, seed, epoch):
    return torch.randperm(num_images, generator=torch.Generator().manual_seed(seed + epoch)).numpy()


def get_batch(tokens, labels, step, args, rank, world_size):
    """Batch `step` of a per-epoch permutation (seeded by seed and epoch, so a resumed run reads the same
    batches), sharded across ranks. Returns what the cache keeps of each image and of its mirror,
    (B, 2, H*W) ids or (B, 2, H*W, D) vectors, and the labels (B,)."""
    per_rank = len(labels) // world_size
    steps_per_epoch = per_rank // args.batch_size
    epoch, i = divmod(step, steps_per_epoch)
    perm = epoch_permutation(len(labels), args.seed, epoch)
    rows = np.sort(perm[rank * per_rank:(rank + 1) * per_rank][i * args.batch_size:(i + 1) * args.batch_size])
    x = np.asarray(tokens[rows])  # (B, 2, H, W) ids or (B, 2, H, W, D) vectors
    x = x.astype(np.int64 if np.issubdtype(x.dtype, np.integer) else np.float32)
    idx = torch.from_numpy(x).flatten(2, 3)  # (B, 2, N) or (B, 2, N, D)
    return idx, torch.from_numpy(labels[rows].astype(np.int64))


def check_args(args, meta, world_size):
    """Flag combinations that cannot work fail here, in one line, before anything is built."""
    N = meta['grid_size'] ** 2
    errors = []
    if not 1 <= args.density <= N:
        errors.append(f"--density {args.density} must be in [1, {N}] (the number of grid positions)")
    if args.head == 'linear' and args.density != 1:
        errors.append("--density applies to the 2D heads; --head linear scores every step already")
    s = math.isqrt(args.window)
    if s * s != args.window or meta['grid_size'] % s:
        errors.append(f"--window {args.window} does not tile the {meta['grid_size']}x{meta['grid_size']} grid "
                      f"(use s*s with s dividing {meta['grid_size']}, e.g. 16, 64, {N})")
    if args.head == 'global' and args.window != N:
        errors.append(f"--head global predicts the whole grid (window {N}); use --head local for --window {args.window}")
    if args.head == 'linear' and args.window != N:
        errors.append("--window applies to the 2D heads; --head linear predicts one token")
    if args.head == 'local' and args.order != 'random':
        errors.append("--head local predicts the chunk of a randomly drawn next position: use --order random "
                      "(or --head linear --order raster for the 1D-raster baseline)")
    if not 0 <= args.class_dropout < 1:
        errors.append("--class_dropout must be in [0, 1)")
    if args.head_depth is not None and args.head_depth < 1:
        errors.append("--head_depth must be >= 1")
    if meta['tokenizer'] != args.tokenizer:
        errors.append(f"--data {args.data} holds '{meta['tokenizer']}' tokens; pass --tokenizer {meta['tokenizer']}")
    if args.batch_size * world_size > meta['num_images']:
        errors.append(f"--batch_size {args.batch_size} x {world_size} processes is more than the "
                      f"{meta['num_images']} images of --data")
    if errors:
        raise SystemExit("error: " + "; ".join(errors))


def dry_run(model, args, world_size):
    """Print the resolved configuration, the parameters of each part and the training FLOPs per image."""
    print0('configuration: ' + ' '.join(f'--{k} {v}' for k, v in vars(args).items()))
    parts = {'backbone': model.transformer, 'head': model.head, 'token head': model.token_head}
    for name, part in parts.items():
        print0(f"parameters {name:<10} {0 if part is None else sum(p.numel() for p in part.parameters()):>14,}")
    print0(f"parameters {'total':<10} {sum(p.numel() for p in model.parameters()):>14,}")
    flops = model.flops_per_image(args.density)
    for name, f in flops.items():
        print0(f"training FLOPs per image, {name:<10} {f / 1e9:10.2f} GFLOP")
    print0(f"training FLOPs per image, {'total':<10} {sum(flops.values()) / 1e9:10.2f} GFLOP")


def main(args):
    # --- DDP or single process (torchrun sets RANK, LOCAL_RANK, WORLD_SIZE) ---
    ddp = 'RANK' in os.environ
    if ddp:
        dist.init_process_group(backend='nccl' if torch.cuda.is_available() else 'gloo')
        rank, local_rank, world_size = dist.get_rank(), int(os.environ['LOCAL_RANK']), dist.get_world_size()
        device = f'cuda:{local_rank}' if torch.cuda.is_available() else 'cpu'
        if device.startswith('cuda'):
            torch.cuda.set_device(device)
    else:
        rank, world_size = 0, 1
        device = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    master = rank == 0
    device_type = 'cuda' if device.startswith('cuda') else 'cpu'
    autocast = torch.autocast('cuda', dtype=torch.bfloat16) if device_type == 'cuda' else nullcontext()

    # --- data ---
    if args.dry_run and args.data == 'shapes' and args.tokenizer in ('vq', 'vae'):  # the paper's data, unread
        tokens, labels = None, np.zeros(1281167)  # ImageNet-1k train
        meta = dict(tokenizer=args.tokenizer, grid_size=16, num_classes=1000, **token_meta(TOKENIZERS[args.tokenizer]))
    else:
        tokens, labels, meta = load_dataset(args.data, args.tokenizer, seed=args.seed)
    meta['num_images'] = len(labels)
    N = meta['grid_size'] ** 2
    args.window = args.window or N  # the global head's window is the whole grid
    check_args(args, meta, world_size)
    steps_per_epoch = len(labels) // world_size // args.batch_size
    if args.epochs:  # the paper counts epochs (Sec. 5.1: 800); steps follow from the data and batch size
        args.max_steps = round(args.epochs * steps_per_epoch)
    if args.warmup_epochs is not None:
        args.warmup_steps = round(args.warmup_epochs * steps_per_epoch)
    kind = f"vocabulary {meta['vocab_size']}" if meta.get('vocab_size') else f"{meta['token_dim']}-d continuous"
    print0(f"data: {args.data}, {len(labels)} images, {meta['grid_size']}x{meta['grid_size']} tokens, "
           f"{kind}, {meta['num_classes']} classes")

    # --- model, EMA, optimizer ---
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    size = dict(SIZES[args.size], **({'n_layer': args.depth} if args.depth else {}))
    config = dict(vocab_size=meta.get('vocab_size', 0), token_dim=meta.get('token_dim', 0),
                  clip_denoised=meta.get('clip_denoised', False),
                  num_classes=meta['num_classes'], grid_size=meta['grid_size'], head=args.head,
                  head_depth=args.head_depth, window=args.window if args.head == 'local' else None, **size)
    if not config['token_dim']:  # discrete tokens: no diffusion MLP
        config.update(diffusion_width=None, diffusion_depth=None)
    model = Heptapod(**config).to(device)
    if args.dry_run:
        dry_run(model, args, world_size)
        return
    ema = Heptapod(**config).to(device).requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    decay = [p for p in model.parameters() if p.dim() >= 2]  # weight decay on matrices and embeddings only
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{'params': decay, 'weight_decay': args.weight_decay},
                                   {'params': no_decay, 'weight_decay': 0.0}],
                                  lr=args.lr, betas=(args.beta1, args.beta2), fused=device_type == 'cuda')
    print0(f"model: {args.size} ({size['n_layer']} layers, width {size['n_embd']}), head {args.head}"
           f"{'' if model.head is None else f' ({len(model.head.blocks)} layers, window {args.window})'}, "
           f"order {args.order}, density {args.density}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
           f"parameters; {args.max_steps} steps of {args.batch_size * world_size} images")

    # --- randomness of the method: generation orders and supervised prefix lengths, one stream per rank ---
    gen = torch.Generator(device).manual_seed(args.seed + rank)

    # --- resume ---
    step = 0
    ckpt_path = os.path.join(args.out_dir, 'ckpt.pt')
    if args.resume:
        if not os.path.isfile(ckpt_path):
            raise SystemExit(f"error: --resume: no checkpoint at {ckpt_path}")
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=True)
        if ckpt['config'] != config:
            raise SystemExit(f"error: --resume: {ckpt_path} holds a model with config {ckpt['config']}, "
                             f"but the flags give {config}")
        model.load_state_dict(ckpt['model'])
        ema.load_state_dict(ckpt['ema'])
        optimizer.load_state_dict(ckpt['optimizer'])
        step = ckpt['step']
        if len(ckpt['rng']) == world_size:
            gen.set_state(ckpt['rng'][rank].to('cpu'))
        else:  # another number of processes: the order/prefix streams cannot continue exactly
            gen.manual_seed(args.seed + rank + 1000 * step)
            print0(f"note: {ckpt_path} was written by {len(ckpt['rng'])} processes, not {world_size}; "
                   f"orders and prefixes are re-seeded, so the run is not bit-identical to an uninterrupted one")
        print0(f"resumed from {ckpt_path} at step {step}")
    if master:
        os.makedirs(args.out_dir, exist_ok=True)
    raw_model = model
    if ddp:
        model = DDP(model, device_ids=[local_rank] if device_type == 'cuda' else None)

    def save_checkpoint():
        states = [gen.get_state()]
        if ddp:  # every rank's order/prefix stream, so a resumed run draws the same ones
            states = [None] * world_size
            dist.all_gather_object(states, gen.get_state())
        if master:
            ckpt = dict(model=raw_model.state_dict(), ema=ema.state_dict(), optimizer=optimizer.state_dict(),
                        step=step, args=vars(args), config=config, data_meta=meta, rng=states)
            torch.save(ckpt, ckpt_path + '.tmp')
            os.replace(ckpt_path + '.tmp', ckpt_path)  # atomic: a crash never leaves a half-written ckpt.pt

    # --- training loop ---
    t0, last_log = time.time(), step
    loss = torch.zeros((), device=device)
    while True:
        if step > 0 and (step % args.ckpt_interval == 0 or step == args.max_steps):
            if not torch.isfinite(loss):
                raise SystemExit(f"error: loss is {loss.item()} at step {step}; stopping without saving, "
                                 f"the last good checkpoint is {ckpt_path} (lower --lr?)")
            save_checkpoint()
        if step == args.max_steps:
            break

        cached, y = get_batch(tokens, labels, step, args, rank, world_size)
        cached, y = cached.to(device, non_blocking=True), y.to(device, non_blocking=True)
        flip = torch.randint(2, (len(y),), generator=gen, device=device)  # the image or its mirror, as MAR
        idx = TOKENIZERS[args.tokenizer].from_cache(cached[torch.arange(len(y), device=device), flip], gen)
        if args.class_dropout > 0:  # train the 'no class' token for CFG (Fig. 1 comparison; off in the paper)
            drop = torch.rand(len(y), generator=gen, device=gen.device) < args.class_dropout
            y = torch.where(drop, raw_model.num_classes, y)
        orders = make_orders(len(y), N, args.order, gen)  # (B, N)
        prefix_lens = sample_prefix_lens(len(y), args.density, N, gen)  # (B, n)
        lr = get_lr(step, args)
        for group in optimizer.param_groups:
            group['lr'] = lr
        with autocast:
            loss = model(idx, y, orders, prefix_lens, gen)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        update_ema(ema, raw_model, step, args.ema)
        step += 1

        if step % args.log_interval == 0 or step == args.max_steps:
            loss_val = loss.item()  # the only host sync, on logging steps
            if not math.isfinite(loss_val):
                raise SystemExit(f"error: loss is {loss_val} at step {step}; stopping, the last good checkpoint "
                                 f"is {ckpt_path} (lower --lr?)")
            dt = (time.time() - t0) / (step - last_log)
            print0(f"step {step}/{args.max_steps} | loss {loss_val:.4f} | lr {lr:.2e} | grad norm "
                   f"{grad_norm.item():.2f} | {dt * 1000:.0f} ms/step | {len(y) * world_size / dt:.1f} images/s")
            t0, last_log = time.time(), step

    # --- a grid of samples from the EMA weights, one column per class ---
    if master and args.num_samples > 0 and meta.get('ckpt') and not os.path.isfile(meta['ckpt']):
        print0(f"no samples.png: the {meta['tokenizer']} weights {meta['ckpt']} that decode the tokens are gone")
    elif master and args.num_samples > 0:
        g = torch.Generator(device).manual_seed(args.seed)
        num_classes = meta['num_classes']
        y = torch.arange(args.num_samples, device=device) % num_classes
        t_s = time.time()
        out = generate(ema.eval(), y, args.order, g, temperature=args.temperature)
        dt = time.time() - t_s
        tokenizer = make_tokenizer(meta['tokenizer'], meta.get('ckpt'), device)
        images = tokenizer.decode(out.view(-1, meta['grid_size'], meta['grid_size'], *out.shape[2:]))
        save_grid(images.cpu().numpy(), os.path.join(args.out_dir, 'samples.png'), ncol=min(num_classes, 10))
        print0(f"sampled {len(y)} images in {dt:.1f}s ({len(y) / dt:.2f} images/s), "
               f"wrote {args.out_dir}/samples.png and {ckpt_path}")
    if ddp:
        dist.destroy_process_group()


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # model
    parser.add_argument('--size', default='tiny', choices=list(SIZES), help='Table 3: B, L, H; tiny/small for CPU')
    parser.add_argument('--depth', type=int, default=None, help='causal layers (default: the size\'s; Table 4)')
    parser.add_argument('--head', default='global', choices=['global', 'local', 'linear'],
                        help='global / local: 2D heads (Sec. 4.3); linear: one next token (1D baselines, Table 1)')
    parser.add_argument('--window', type=int, default=None,
                        help='positions per chunk of the local head, 16 = 4x4, 64 = 8x8 (Fig. 7); default: whole grid')
    parser.add_argument('--head_depth', type=int, default=None, help='head layers (default: = backbone depth)')
    parser.add_argument('--order', default='random', choices=['random', 'raster'], help='generation order')
    parser.add_argument('--density', type=int, default=1, help='supervision density n: prefixes per sequence')
    # data
    parser.add_argument('--data', default='shapes', help="'shapes' (built-in) or a cache dir from tokenizers.py")
    parser.add_argument('--tokenizer', default='pixel', choices=list(TOKENIZERS),
                        help='how the built-in images are tokenized; must match the tokens of a cache')
    # optimization
    parser.add_argument('--batch_size', type=int, default=16, help='per process; the paper uses 2048 in total')
    parser.add_argument('--max_steps', type=int, default=1300)
    parser.add_argument('--epochs', type=float, default=None, help='run length in epochs, sets --max_steps (paper: 800)')
    parser.add_argument('--warmup_epochs', type=float, default=None, help='sets --warmup_steps (MAR: 100)')
    parser.add_argument('--lr', type=float, default=8e-4, help='Sec. 5.1: 8e-4')
    parser.add_argument('--lr_schedule', default='cosine', choices=['constant', 'cosine'],
                        help='after warmup (not in the paper; MAR: constant)')
    parser.add_argument('--warmup_steps', type=int, default=50)
    parser.add_argument('--weight_decay', type=float, default=0.02, help='MAR: 0.02')
    parser.add_argument('--beta1', type=float, default=0.9, help='Sec. 5.1: AdamW (0.9, 0.95)')
    parser.add_argument('--beta2', type=float, default=0.95)
    parser.add_argument('--grad_clip', type=float, default=3.0, help='MAR: 3.0')
    parser.add_argument('--ema', type=float, default=0.9999, help='EMA decay (MAR: 0.9999)')
    parser.add_argument('--class_dropout', type=float, default=0.0,
                        help="probability of the 'no class' label, for CFG at sampling (the paper uses none)")
    # sampling at the end of training
    parser.add_argument('--num_samples', type=int, default=40, help='images in out_dir/samples.png (0: none)')
    parser.add_argument('--temperature', type=float, default=1.0)
    # system
    parser.add_argument('--out_dir', default='out')
    parser.add_argument('--resume', action='store_true', help='continue from out_dir/ckpt.pt')
    parser.add_argument('--log_interval', type=int, default=100)
    parser.add_argument('--ckpt_interval', type=int, default=500)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--device', default=None, help='default: cuda if available, else cpu')
    parser.add_argument('--dry_run', action='store_true', help='print the configuration, sizes and FLOPs, then exit')
    return parser


if __name__ == '__main__':
    main(get_parser().parse_args())
