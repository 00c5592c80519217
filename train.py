r"""
Train Heptapod (heads.Heptapod): next 2D distribution prediction, or a 1D baseline of Table 1, on cached tokens.

    python train.py                                   # tiny model, built-in shapes, about 3 minutes on 2 CPU cores
    python train.py --tokenizer pixel_patch --max_steps 2600   # continuous tokens and the diffusion MLP
    torchrun --nproc_per_node=8 train.py --data CACHE --tokenizer vae --size H --head global --density 1 \
        --global_batch_size 2048 --epochs 800 --warmup_epochs 100   # the paper's Heptapod-H
    python train.py --data random --tokenizer vae --size L --batch_size 64 --bench   # throughput and MFU
    ... --eval_every 50000 --fid_ref VIRTUAL_imagenet256_labeled.npz   # FID/IS of 5000 EMA samples, as MAR
    python train.py --eval_every 650 --eval_images 500   # small data: Frechet distance in a PCA space, class accuracy

Writes out_dir/ckpt.pt (every --ckpt_interval steps and at the end), out_dir/log.jsonl and out_dir/samples.png;
an out_dir holds one run (--resume continues it, --overwrite replaces it). Every random draw of step s (orders,
prefixes, mirrors, diffusion noise) comes from a generator seeded by (seed, s, micro-batch): a run is the same on
any number of GPUs and resumes exactly.
"""
import argparse
import contextlib
import functools
import glob
import json
import math
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import fid
from heads import Heptapod, sample_prefix_lens
from model import SIZES, make_orders
from sample import CUDAGraphs, check_checkpoint, decode, generate, save_grid
from tokenizers import (BUILT_IN, DOWNSAMPLING, PEAK_TFLOPS, TOKENIZERS, HelpFormatter, hold_lock, load_dataset,
                        load_weights, make_folder, make_tokenizer, mfu, peak_memory, percent, read_torch, temporary,
                        write_atomic)


def print0(*a, **kw):
    if int(os.environ.get('RANK', 0)) == 0:
        print(*a, **kw, flush=True)


def get_lr(step, args):
    """Linear warmup, then constant (MAR's) or cosine decay to 0; with NPP it restarts in every patch-size segment
    and decays linearly to 1e-5 over the segment's last fifth (NPP Sec. 4.1)."""
    start, end, _ = npp_segment(step, args)
    s, length = step - start, end - start
    if s < args.warmup_steps:
        return args.lr * (s + 1) / args.warmup_steps
    if args.npp_levels > 1:
        tail = length / 5
        return args.lr if s < length - tail else args.lr + (1e-5 - args.lr) * (s - (length - tail)) / tail
    if args.lr_schedule == 'constant':
        return args.lr
    return args.lr * 0.5 * (1 + math.cos(math.pi * (s - args.warmup_steps) / max(1, length - args.warmup_steps)))


def npp_segment(step, args):
    """(first step, end step, patch size) of the NPP segment holding `step` (NPP Sec. 3.2): patches of 2^l x 2^l
    while step < lambda^l T, l = levels-1 down to 1, then 1x1; without NPP, one 1x1 segment."""
    ends = [round(args.npp_lambda ** v * args.max_steps) for v in range(args.npp_levels - 1, 0, -1)] + [args.max_steps]
    start = 0
    for k, end in enumerate(ends):
        if step < end or k == len(ends) - 1:
            return start, end, 2 ** (args.npp_levels - 1 - k)
        start = end


def rar_prob(step, args):
    """RAR Eq. 5: the probability of a random order, 1 before --anneal_start, 0 after --anneal_end, linear between."""
    return min(1.0, max(0.0, (args.anneal_end - step / args.max_steps) / (args.anneal_end - args.anneal_start)))


@torch.no_grad()
def update_ema(ema, model, step, decay):
    # the decay ramps up as (1+step)/(10+step) (TF's ExponentialMovingAverage with num_updates), so that short runs
    # average too; it reaches 0.9999 after ~90k steps
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - min(decay, (1 + step) / (10 + step)))


@functools.lru_cache(maxsize=1)
def epoch_permutation(num_images, seed, epoch):
    return torch.randperm(num_images, generator=torch.Generator().manual_seed(seed + epoch)).numpy()


def get_batch(tokens, labels, step, args, rank, accum):
    """This rank's part of step's global batch: rows [s G, (s+1) G) of the epoch's permutation, in micro-batches of
    --batch_size, rank r taking r*accum .. (r+1)*accum - 1. Returns what the cache keeps of each image and of its
    mirror, (accum*B, 2, H*W) ids or (accum*B, 2, H*W, D) vectors, and the labels (accum*B,)."""
    G = args.global_batch_size
    epoch, i = divmod(step, len(labels) // G)
    rows = epoch_permutation(len(labels), args.seed, epoch)[i * G:(i + 1) * G][
        rank * accum * args.batch_size:(rank + 1) * accum * args.batch_size]
    return read_rows(tokens, rows).flatten(2, 3), torch.from_numpy(labels[rows].astype(np.int64))


def read_rows(tokens, rows):
    """The cache's rows (read in memory-map order) as a tensor: ids int64, vectors float32."""
    order = np.argsort(rows)
    x = np.asarray(tokens[rows[order]])[np.argsort(order)]
    return torch.from_numpy(x.astype(np.int64 if np.issubdtype(x.dtype, np.integer) else np.float32))


def micro_batch(x, y, args, step, micro, N, num_classes):
    """Micro-batch `micro` (counted over all ranks) of step: its generator and inputs, every draw from the generator:
    each image or its mirror (MAR), the 'no class' label of --class_dropout, orders (B, N), prefix lengths (B, n)."""
    gen, B = torch.Generator(x.device).manual_seed(hash((args.seed, step, micro)) % 2 ** 62), len(y)
    flip = torch.randint(2, (B,), generator=gen, device=x.device) * args.flip
    idx = TOKENIZERS[args.tokenizer].from_cache(x[torch.arange(B, device=x.device), flip], gen)
    if args.class_dropout > 0:  # train the 'no class' token for CFG (our comparison run; off in the paper)
        y = torch.where(torch.rand(B, generator=gen, device=x.device) < args.class_dropout, num_classes, y)
    orders = make_orders(B, N, args.order, gen, rar_prob(step, args))
    return gen, (idx, y, orders, sample_prefix_lens(B, args.density, N, gen))


def build(args, meta, device):
    """The model (config from the data and the flags), its fp32 EMA, and AdamW without weight decay on vectors and
    on the diffusion MLP (MAR's add_weight_decay)."""
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    config = dict(SIZES[args.size], vocab_size=meta.get('vocab_size', 0), token_dim=meta.get('token_dim', 0),
                  clip_denoised=meta.get('clip_denoised', False), num_classes=meta['num_classes'],
                  grid_size=meta['grid_size'], head=args.head, head_depth=args.head_depth, init=args.init,
                  window=args.window if args.head == 'local' else None, target_position=args.target_position)
    config['n_layer'] = args.depth or config['n_layer']
    if not config['token_dim']:  # discrete tokens: no diffusion MLP
        config.update(diffusion_width=None, diffusion_depth=None)
    model = Heptapod(**config).to(device)
    ema = Heptapod(**model.config).to(device).requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    params = [[p for n, p in model.named_parameters() if (p.dim() < 2 or n.startswith('token_head.net')) == no_decay]
              for no_decay in (False, True)]
    optimizer = torch.optim.AdamW([{'params': params[0], 'weight_decay': args.weight_decay},
                                   {'params': params[1], 'weight_decay': 0.0}], lr=args.lr,
                                  betas=(args.beta1, args.beta2), fused=device.startswith('cuda'))
    for m in model.modules() if args.grad_checkpointing else ():
        m.grad_checkpointing = True  # read by model.run_block for every block
    return model, ema, optimizer


def dry_run(model, args):
    """Print the resolved configuration, the parameters of each part and the training FLOPs per image."""
    print0('configuration: ' + ' '.join(f'--{k} {v}' for k, v in vars(args).items()))
    for name, part in {'backbone': model.transformer, 'head': model.head, 'token head': model.token_head}.items():
        print0(f"parameters {name:<10} {0 if part is None else sum(p.numel() for p in part.parameters()):>14,}")
    print0(f"parameters {'total':<10} {sum(p.numel() for p in model.parameters()):>14,}")
    flops = model.flops_per_image(args.density)
    for name, f in dict(flops, total=sum(flops.values())).items():
        print0(f"training FLOPs per image, {name:<10} {f / 1e9:10.2f} GFLOP")


# -----------------------------------------------------------------------------
# The run's folder: one run's checkpoints and log, written by one process


@contextlib.contextmanager
def claim_out_dir(args):
    """While the block runs, out_dir is this run's: checked writable now (not after minutes of training), locked
    against a second process, holding no other run's checkpoints or log unless --resume or --overwrite."""
    if args.resume:
        checkpoints(args.out_dir)  # refused before anything is made
    make_folder(args.out_dir, '--out_dir')
    try:
        with tempfile.TemporaryFile(dir=args.out_dir):
            pass
    except OSError as e:
        raise SystemExit(f"error: --out_dir {args.out_dir}: cannot write there ({e.strerror or e}); choose another")
    with hold_lock(args.out_dir):
        theirs = sorted(glob.glob(os.path.join(args.out_dir, 'ckpt*.pt')) + [
            p for p in (os.path.join(args.out_dir, f) for f in ('log.jsonl', 'samples.png')) if os.path.isfile(p)])
        if theirs and not args.resume and not args.overwrite:
            names = ', '.join(os.path.basename(p) for p in theirs[:4])
            raise SystemExit(f"error: --out_dir {args.out_dir} holds another run ({names}); add --resume to continue "
                             f"it, --overwrite to delete it and start afresh, or choose another --out_dir")
        for p in theirs if args.overwrite else ():
            os.remove(p)
        yield


def save_checkpoint(ckpt, out_dir, keep_last):
    """out_dir/ckpt_STEP.pt, whole or not at all; ckpt.pt a hard link to it (replaced atomically); the newest
    keep_last kept. Returns the path."""
    path, latest = os.path.join(out_dir, f"ckpt_{ckpt['step']:07d}.pt"), os.path.join(out_dir, 'ckpt.pt')
    advice = f"the previous checkpoints in {out_dir} are kept (free space, then --resume)"
    write_atomic(path, lambda f: torch.save(ckpt, f), advice)
    try:
        os.link(path, temporary(latest))  # write_atomic's temporary name: hold_lock removes a stale one
        os.replace(temporary(latest), latest)
    except OSError:  # a file system without hard links: a copy, streamed
        def copy(f):
            with open(path, 'rb') as src:
                shutil.copyfileobj(src, f)
        write_atomic(latest, copy, advice)
    for old in sorted(glob.glob(os.path.join(out_dir, 'ckpt_*.pt')))[:-keep_last]:
        os.remove(old)
    return path


def resume(args, model, ema, optimizer, master):
    """Continue from the newest readable checkpoint of out_dir (ckpt.pt, or when a crash or a full disk left it
    unreadable, the newest intact ckpt_STEP.pt), and its log up to its step. Returns (step, path)."""
    paths = checkpoints(args.out_dir)
    for path in paths:
        try:
            ckpt = read_torch(path, 'PyTorch checkpoint', device=next(model.parameters()).device)
            break
        except SystemExit as e:  # truncated, or not a torch file
            print0(f"--resume: {path} is unreadable ({e.code}), trying an older checkpoint")
    else:
        raise SystemExit(f"error: --resume: none of the checkpoints in {args.out_dir} is readable ({', '.join(paths)})")
    old = check_checkpoint(ckpt, path)['config']
    if old != model.config:
        raise SystemExit(f"error: --resume: {path} holds another model: " + ", ".join(
            f"{k} {old[k]} (the flags give {model.config[k]})" for k in sorted(old) if old[k] != model.config[k]))
    if ckpt['step'] > args.max_steps:
        raise SystemExit(f"error: --resume: {path} is at step {ckpt['step']}, past the {args.max_steps} "
                         f"steps of --max_steps/--epochs; give a longer run (or another --out_dir)")
    load_weights(model, ckpt['model'], path, "its 'model' weights")
    load_weights(ema, ckpt['ema'], path, "its 'ema' weights")
    optimizer.load_state_dict(ckpt['optimizer'])
    log = os.path.join(args.out_dir, 'log.jsonl')
    if master and os.path.isfile(log):  # the steps after the checkpoint are logged again; a line cut short goes
        with open(log) as f:
            lines = [line for line in f if logged_step(line) <= ckpt['step']]
        write_atomic(log, lambda f: f.writelines(line.encode() for line in lines))
    print0(f"resumed from {path} at step {ckpt['step']}")
    return ckpt['step'], path


def checkpoints(out_dir):
    """out_dir's checkpoints, the newest first: ckpt.pt, then ckpt_STEP.pt; one error line when there is none."""
    paths = [os.path.join(out_dir, 'ckpt.pt')] + sorted(glob.glob(os.path.join(out_dir, 'ckpt_*.pt')), reverse=True)
    if not (paths := [p for p in paths if os.path.isfile(p)]):
        raise SystemExit(f"error: --resume: no checkpoint at {os.path.join(out_dir, 'ckpt.pt')} (train.py writes it "
                         f"there)")
    return paths


def logged_step(line):
    try:
        return json.loads(line)['step']
    except ValueError:  # a line cut short when the run was killed or the disk filled up
        return math.inf


def append_log(args, record):
    path = os.path.join(args.out_dir, 'log.jsonl')
    try:
        with open(path, 'a') as f:
            f.write(json.dumps(record) + '\n')
    except OSError as e:  # the checkpoints are kept; --resume drops a line cut short
        raise SystemExit(f"error: writing {path}: {e.strerror or e}; free space, then --resume")


class Bench:
    """--bench: times --bench_steps steps after --bench_warmup untimed ones, then prints images/s, MFU, memory."""

    def __init__(self, args, step, device):
        self.args, self.start, self.device = args, step + args.bench_warmup, device
        self.cuda = device.startswith('cuda')

    def done(self, step, flops_per_image, world_size):
        if self.cuda and step in (self.start, self.start + self.args.bench_steps):
            torch.cuda.synchronize()
        if step == self.start:
            if self.cuda:
                torch.cuda.reset_peak_memory_stats(self.device)
            self.t0 = time.time()
        if step < self.start + self.args.bench_steps:
            return False
        dt = (time.time() - self.t0) / self.args.bench_steps
        images = self.args.global_batch_size / world_size / dt
        print0(f"bench: {images:.1f} images/s per {'GPU' if self.cuda else 'process'}, {1000 * dt:.0f} ms/step, MFU "
               f"{percent(mfu(flops_per_image * images, self.device, self.args.peak_tflops))}, peak memory "
               f"{peak_memory(self.device)}")
        return True


# -----------------------------------------------------------------------------
# Evaluation: samples of the EMA weights, scored during training


def small_image_metric(args, tokens, labels, meta, tokenizer):
    """fid.SmallImageMetric of the data as the tokenizer decodes it: fit on up to 10,000 of its images, compared with
    fresh shapes of another seed or every 10th of 12,000 random images of a cache (held out of the fit only)."""
    from_cache = TOKENIZERS[meta['tokenizer']].from_cache

    def images(tok, rows):  # the decoded images of cache rows, not their mirrors, a batch at a time
        parts = np.array_split(rows, math.ceil(len(rows) / (args.eval_batch_size or args.batch_size)))
        return torch.cat([tokenizer.decode(from_cache(read_rows(tok, part)[:, 0], torch.Generator().manual_seed(0)))
                          for part in parts])
    if args.data in BUILT_IN:
        ref_tokens, ref_labels, _ = load_dataset(args.data, args.tokenizer, num_images=2000, seed=args.seed + 1)
        train_rows, ref_rows = np.arange(min(len(labels), 10000)), np.arange(2000)
    else:
        rows = np.sort(torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))[:12000].numpy())
        i = np.arange(len(rows))
        train_rows, ref_rows, ref_tokens, ref_labels = rows[i % 10 > 0], rows[i % 10 == 0], tokens, labels
    return fid.SmallImageMetric(images(tokens, train_rows), labels[train_rows], images(ref_tokens, ref_rows),
                                ref_labels[ref_rows])


def evaluator(args, tokens, labels, meta, tokenizer, device, master):
    """(featurize, score) for --eval_every: Inception features against --fid_ref as MAR's online FID, or the
    small-image metric; what they compare with is prepared once, on rank 0."""
    if args.fid_ref:
        inception = fid.load_inception(args.inception, device)
        ref = fid.load_reference(args.fid_ref, inception, device=device, resize=args.fid_resize) if master else None
        return (functools.partial(fid.features, inception, device=device, resize=args.fid_resize),
                lambda feats: fid.metrics(feats, *ref, device=device, is_splits='torch_fidelity'))  # as MAR's
    metric = small_image_metric(args, tokens, labels, meta, tokenizer) if master else None
    return lambda images: {'images': images.cpu().numpy()}, lambda feats: metric(feats['images'], feats['labels'])


@torch.no_grad()
def evaluate(ema, args, meta, tokenizer, featurize, score, device, rank, world_size, autocast):
    """--eval_images EMA samples (classes balanced, split over the ranks, the same seeds every time), their features
    gathered and scored on rank 0."""
    labels = (torch.arange(args.eval_images, device=device) % meta['num_classes'])[rank::world_size]
    g, feats = torch.Generator(device).manual_seed(args.seed * 1_000_003 + rank), []
    run, batch_size = CUDAGraphs() if device.startswith('cuda') else None, args.eval_batch_size or args.batch_size
    for b in range(0, len(labels), batch_size):
        with autocast:
            tokens = generate(ema.eval(), labels[b:b + batch_size], args.order, g, args.temperature, run=run)
        feats.append(featurize(decode(tokenizer, tokens, meta['grid_size'])))
    feats = {k: np.concatenate([f[k] for f in feats]) for k in feats[0]} | {'labels': labels.cpu().numpy()}
    if world_size > 1:
        parts = [None] * world_size
        dist.all_gather_object(parts, feats)
        feats = {k: np.concatenate([p[k] for p in parts]) for k in feats}
    return score(feats) if rank == 0 else None


def tokenizer_of(args, meta, device, master):
    """What turns samples into images (samples.png, --eval_every), or None when unneeded or its vq/vae weights are
    gone (then --eval_every is refused and samples.png skipped)."""
    if args.bench or not (args.eval_every or (master and args.num_samples > 0)):
        return None
    if meta.get('ckpt') and not os.path.isfile(meta['ckpt']):  # vq/vae weights the cache was made with
        if args.eval_every:
            raise SystemExit(f"error: --eval_every: the {meta['tokenizer']} weights {meta['ckpt']} that decode "
                             f"the tokens are gone; restore them or drop --eval_every")
        return print0(f"no samples.png: the {meta['tokenizer']} weights {meta['ckpt']} that decode the tokens are gone")
    return make_tokenizer(meta['tokenizer'], meta.get('ckpt'), device, meta.get('colours'))


def sample_grid(ema, args, meta, tokenizer, device, autocast, ckpt_path):
    """out_dir/samples.png: --num_samples images from the EMA weights, one column per class."""
    y, t0 = torch.arange(args.num_samples, device=device) % meta['num_classes'], time.time()
    with autocast:
        out = generate(ema.eval(), y, args.order, torch.Generator(device).manual_seed(args.seed), args.temperature,
                       run=CUDAGraphs() if device.startswith('cuda') else None)
    dt = time.time() - t0
    save_grid(decode(tokenizer, out, meta['grid_size']).cpu().numpy(), os.path.join(args.out_dir, 'samples.png'),
              ncol=min(meta['num_classes'], 10))
    print0(f"sampled {len(y)} images in {dt:.1f}s ({len(y) / dt:.2f} images/s), wrote {args.out_dir}/samples.png "
           f"and {args.out_dir}/ckpt.pt (= {os.path.basename(ckpt_path)})")


def setup_distributed(device=None):
    """(ddp, rank, world_size, device): under torchrun one process per GPU with NCCL (per CPU process with gloo);
    otherwise one process on `device` (default: cuda if any)."""
    ddp = 'RANK' in os.environ
    if ddp:
        dist.init_process_group(backend='nccl' if torch.cuda.is_available() else 'gloo')
        device = f"cuda:{os.environ['LOCAL_RANK']}" if torch.cuda.is_available() else 'cpu'
    device = device or ('cuda' if torch.cuda.is_available() else 'cpu')
    if device.startswith('cuda'):
        torch.cuda.set_device(device)  # also for --device cuda:N: streams and CUDA graphs are the current device's
    return ddp, dist.get_rank() if ddp else 0, dist.get_world_size() if ddp else 1, device


def main(args):
    # --- DDP or a single process; bf16 autocast on GPUs (--amp on a CPU runs the same bf16 code, as the tests do) ---
    ddp, rank, world_size, device = setup_distributed(args.device)
    master, device_type = rank == 0, 'cuda' if device.startswith('cuda') else 'cpu'
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # for what runs outside autocast
    args.amp = device_type == 'cuda' if args.amp is None else args.amp
    autocast = torch.autocast(device_type, dtype=torch.bfloat16, enabled=args.amp)

    # --- data, then every value that follows from it and the flags ---
    if args.dry_run and args.data == 'shapes' and args.tokenizer in ('vq', 'vae'):
        args.data = 'random'  # the paper's data shapes, unread
    tokens, labels, meta = load_dataset(args.data, args.tokenizer or 'pixel', seed=args.seed)
    meta['num_images'] = len(labels)
    accum, N = resolve_args(args, meta, world_size), meta['grid_size'] ** 2
    kind = f"vocabulary {meta['vocab_size']}" if meta.get('vocab_size') else f"{meta['token_dim']}-d continuous"
    print0(f"data: {args.data}, {len(labels)} images, {meta['grid_size']}x{meta['grid_size']} tokens, {kind}, "
           f"{meta['num_classes']} classes")

    # --- model, EMA, optimizer ---
    model, ema, optimizer = build(args, meta, device)
    if args.dry_run:
        return dry_run(model, args)
    flops_per_image, c = sum(model.flops_per_image(args.density).values()), model.config
    head = '' if args.head == 'linear' else f" ({c['head_depth']} layers, window {args.window})"
    print0(f"model: {args.size} ({c['n_layer']} layers, width {c['n_embd']}), head {args.head}{head}, order "
           f"{args.order}, density {args.density}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
           f"{flops_per_image / 1e9:.1f} GFLOP per training image")
    print0(f"batch: {args.global_batch_size} = {args.batch_size} x {world_size} processes x {accum} accumulation steps;"
           f" {args.max_steps} steps ({args.max_steps * args.global_batch_size / len(labels):.1f} epochs), lr "
           f"{args.lr}")

    with claim_out_dir(args) if master and not args.bench else contextlib.nullcontext():
        # --- resume; what turns samples into images and scores them; compile; DDP ---
        step, ckpt_path = resume(args, model, ema, optimizer, master) if args.resume else (0, None)
        tokenizer = tokenizer_of(args, meta, device, master)
        featurize, score = evaluator(args, tokens, labels, meta, tokenizer, device, master) if args.eval_every and \
            not args.bench else (None, None)
        raw_model = model  # checkpoints hold the unwrapped, uncompiled module
        model = torch.compile(model) if args.compile else model
        if ddp:
            model = DDP(model, device_ids=[torch.cuda.current_device()] if device_type == 'cuda' else None)

        # --- the training loop; a thread reads the next batch (pinned for the copy to a GPU) while a step runs ---
        def load_batch(s):
            x, y = get_batch(tokens, labels, s, args, rank, accum)
            return (x.pin_memory(), y.pin_memory()) if device_type == 'cuda' else (x, y)
        pool = ThreadPoolExecutor(1)
        next_batch, first_step, bench = pool.submit(load_batch, step), step, Bench(args, step, device)
        t0, last_log, loss_sum, grad_norm = time.time(), step, torch.zeros((), device=device), torch.zeros(())
        while True:
            log_due, ckpt_due = step % args.log_interval == 0, step % args.ckpt_interval == 0 or step == args.max_steps
            if step > first_step and (log_due or ckpt_due):  # the only host syncs: on these steps
                if ddp:
                    dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)  # the mean over ranks
                loss_val, norm_val = loss_sum.item(), grad_norm.item()
                if not (math.isfinite(loss_val) and math.isfinite(norm_val)):
                    last = f"the last good checkpoint is {ckpt_path}" if ckpt_path else "no checkpoint was written yet"
                    raise SystemExit(f"error: loss {loss_val}, grad norm {norm_val} at step {step}; stopped without "
                                     f"saving: {last} (lower --lr?)")
                if log_due or step == args.max_steps:
                    dt = (time.time() - t0) / (step - last_log)
                    images = args.global_batch_size / dt
                    stats = dict(step=step, loss=loss_val, lr=get_lr(step - 1, args), grad_norm=norm_val,
                                 ms_per_step=1000 * dt, images_per_s=images,
                                 mfu=mfu(flops_per_image * images / world_size, device, args.peak_tflops))
                    print0(f"step {step}/{args.max_steps} | loss {loss_val:.4f} | lr {stats['lr']:.2e} | grad norm "
                           f"{norm_val:.2f} | {1000 * dt:.0f} ms/step | {stats['images_per_s']:.1f} images/s | MFU "
                           f"{percent(stats['mfu'])}")
                    if master and not args.bench:
                        append_log(args, stats)
                    t0, last_log = time.time(), step
                if master and not args.bench and ckpt_due:
                    ckpt_path = save_checkpoint(dict(model=raw_model.state_dict(), ema=ema.state_dict(), step=step,
                                                     optimizer=optimizer.state_dict(), args=vars(args), data_meta=meta,
                                                     config=raw_model.config), args.out_dir, args.keep_last)
            if featurize and step > first_step and (step % args.eval_every == 0 or step == args.max_steps):
                t_e = time.time()
                metrics = evaluate(ema, args, meta, tokenizer, featurize, score, device, rank, world_size, autocast)
                if master:
                    print0(f"eval step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()) +
                           f" ({args.eval_images} EMA samples vs {args.fid_ref or 'held-out images'}, "
                           f"{time.time() - t_e:.0f}s)")
                    append_log(args, dict(step=step, eval_images=args.eval_images, **metrics))
                t0 += time.time() - t_e  # the next log line times training steps only
            if (args.bench and bench.done(step, flops_per_image, world_size)) or step == args.max_steps:
                break

            # the step: accum micro-batches, gradients averaged over all of them and all ranks
            x, y = next_batch.result()
            next_batch = pool.submit(load_batch, step + 1)
            for group in optimizer.param_groups:
                group['lr'] = get_lr(step, args)
            loss_sum = torch.zeros((), device=device)
            for a in range(accum):
                rows = slice(a * args.batch_size, (a + 1) * args.batch_size)
                gen, batch = micro_batch(x[rows].to(device, non_blocking=True), y[rows].to(device, non_blocking=True),
                                         args, step, rank * accum + a, N, meta['num_classes'])
                if ddp:
                    model.require_backward_grad_sync = a == accum - 1  # all-reduce once, after the last micro-batch
                with autocast:
                    loss = model(*batch, gen, npp_segment(step, args)[2]) / accum
                loss.backward()
                loss_sum += loss.detach()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            update_ema(ema, raw_model, step, args.ema)
            step += 1
        pool.shutdown(wait=False, cancel_futures=True)
        if master and not args.bench and args.num_samples > 0 and tokenizer is not None:
            sample_grid(ema, args, meta, tokenizer, device, autocast, ckpt_path)
    if ddp:
        dist.destroy_process_group()


# -----------------------------------------------------------------------------
# Arguments: what follows from the flags and the data, and the combinations that cannot work

# flags whose value must be at least a bound (0 where 0 means 'none' or 'off'), checked before anything is built
AT_LEAST = dict(batch_size=1, global_batch_size=1, max_steps=1, epochs=1e-9, warmup_steps=0, warmup_epochs=0,
                lr=1e-12, weight_decay=0, grad_clip=1e-12, depth=1, head_depth=1, window=1, num_samples=0,
                temperature=1e-12, eval_every=0, eval_images=1, eval_batch_size=1, log_interval=1, ckpt_interval=1,
                keep_last=1, bench_warmup=0, bench_steps=1, npp_levels=1, npp_lambda=1e-12)


def resolve_args(args, meta, world_size):
    """Fill in what follows from the data and the flags (saved in every checkpoint), after checking them; returns the
    gradient accumulation steps."""
    args.tokenizer = args.tokenizer or meta['tokenizer']  # a cache's own; the built-in data's: pixel by default
    args.window = meta['grid_size'] ** 2 if args.window is None else args.window  # the global head's: the whole grid
    if args.global_batch_size is None:  # the paper's 2048 = micro-batch x processes x accumulation; lr is for it
        args.global_batch_size = args.batch_size * world_size
    check_args(args, meta, world_size)
    # how a 1D model is told its target: the paper's shifted positions (Fig. 4 middle), RAR's own for --order rar
    args.target_position = args.target_position or ('added' if args.order == 'rar' else 'shifted')
    steps_per_epoch = meta['num_images'] // args.global_batch_size
    if args.epochs:  # the paper counts epochs (Sec. 5.1: 800)
        args.max_steps = round(args.epochs * steps_per_epoch)
    if args.warmup_epochs is not None:
        args.warmup_steps = round(args.warmup_epochs * steps_per_epoch)
    if args.max_steps < 1:
        raise SystemExit(f"error: --epochs {args.epochs} is less than one step of {args.global_batch_size} of the "
                         f"{meta['num_images']} images")
    return args.global_batch_size // (args.batch_size * world_size)


def check_args(args, meta, world_size):
    """Flag combinations that cannot work fail here, in one line, before anything is built."""
    N, g = meta['grid_size'] ** 2, meta['grid_size']
    errors = [f"--{k} {getattr(args, k)} must be {'positive' if lo and lo < 1 else f'at least {lo}'}"
              for k, lo in AT_LEAST.items() if getattr(args, k) is not None and getattr(args, k) < lo]
    if errors:  # the checks below assume sane values
        raise SystemExit("error: " + "; ".join(errors))
    s, size, one_d = math.isqrt(args.window), g * DOWNSAMPLING[meta['tokenizer']], args.head == 'linear'
    checks = [  # (what is wrong, the message)
        (not 1 <= args.density <= N, f"--density {args.density} must be in [1, {N}] (the number of grid positions)"),
        (one_d and args.density != 1, "--density applies to the 2D heads; --head linear scores every step already"),
        (s * s != args.window or g % s, f"--window {args.window} does not tile the {g}x{g} grid (use s*s with s "
                                        f"dividing {g}, e.g. 16, 64, {N})"),
        (args.head == 'global' and args.window != N,
         f"--head global predicts the whole grid (window {N}); use --head local for --window {args.window}"),
        (one_d and args.window != N, "--window applies to the 2D heads; --head linear predicts one token"),
        (not one_d and args.target_position, "--target_position applies to the 1D models (--head linear); the 2D "
                                             "ones are never told their next position"),
        (args.order == 'rar' and not one_d, "--order rar trains a 1D model (RAR): use it with --head linear"),
        (args.npp_levels > 1 and (not one_d or args.order != 'raster' or bool(meta.get('token_dim'))),
         "--npp_levels > 1 (next-patch prediction) is for the 1D raster model of discrete tokens: use --head linear "
         "--order raster with a discrete tokenizer"),
        (args.npp_levels > 1 and g % 2 ** (args.npp_levels - 1),
         f"--npp_levels {args.npp_levels}: patches of {2 ** (args.npp_levels - 1)} do not tile the {g}x{g} grid"),
        (not 0 <= args.anneal_start < args.anneal_end <= 1,
         "--anneal_start and --anneal_end must satisfy 0 <= start < end <= 1"),
        (args.head == 'local' and args.order != 'random', "--head local predicts the chunk of a randomly drawn next "
         "position: use --order random (or --head linear --order raster for the 1D-raster baseline)"),
        *[(not 0 <= getattr(args, k) < 1, f"--{k} {getattr(args, k)} must be in [0, 1)")
          for k in ('class_dropout', 'ema', 'beta1', 'beta2')],
        (meta['tokenizer'] != args.tokenizer, f"--data {args.data} holds '{meta['tokenizer']}' tokens; drop "
         f"--tokenizer {args.tokenizer}, it only chooses how the built-in data is tokenized"),
        (args.global_batch_size % (args.batch_size * world_size), f"--global_batch_size {args.global_batch_size} is "
         f"not a multiple of --batch_size {args.batch_size} x {world_size} processes"),
        (args.global_batch_size > meta['num_images'],
         f"--global_batch_size {args.global_batch_size} is more than the {meta['num_images']} images of --data"),
        (args.eval_every and not args.fid_ref and size > 64, f"--eval_every on {size}x{size} images needs --fid_ref: "
         f"the small-image metric works on the pixels of images up to 64x64"),
        (args.eval_every and args.eval_images < max(10 if args.fid_ref else 2, world_size),
         f"--eval_images {args.eval_images}: at least {10 if args.fid_ref else 2} (the IS splits, a covariance) and "
         f"one per process"),
        (args.resume and args.overwrite, "--resume continues the run in --out_dir, --overwrite deletes it: pick one")]
    errors = [message for wrong, message in checks if wrong]
    if errors:
        raise SystemExit("error: " + "; ".join(errors))


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add = parser.add_argument
    # model
    add('--size', default='tiny', choices=list(SIZES), help='Table 3: B, L, H; tiny and small for CPUs')
    add('--depth', type=int, default=None, help="causal layers (default: the size's; Table 4)")
    add('--head', default='global', choices=['global', 'local', 'linear'],
        help='global / local: 2D heads (Sec. 4.3); linear: one next token (the 1D baselines, Table 1)')
    add('--window', type=int, default=None, help='positions per chunk of the local head: 16 = 4x4, 64 = 8x8 (Fig. 7)')
    add('--head_depth', type=int, default=None, help='head layers (default: the backbone depth)')
    add('--order', default='random', choices=['random', 'raster', 'rar'],
        help='generation order; rar: random annealed to raster (RAR, with --head linear)')
    add('--density', type=int, default=1, help='supervision density n: prefixes per sequence')
    add('--init', default='mar', choices=['mar', 'gpt2'], help="MAR's (xavier linears) or nanoGPT's (small on CPUs)")
    add('--target_position', default=None, choices=['shifted', 'added'],
        help="how a 1D model is told its target: shifted, Fig. 4 middle (default), or added, RAR's (with --order rar)")
    # the seed baselines: RAR (--order rar) and next-patch prediction (--npp_levels)
    add('--anneal_start', type=float, default=0.5, help='RAR: fraction of training where r leaves 1')
    add('--anneal_end', type=float, default=0.75, help='RAR: fraction of training where r reaches 0')
    add('--npp_levels', type=int, default=1, help='NPP: patch levels #L (2: 2x2 then 1x1); 1: next-token prediction')
    add('--npp_lambda', type=float, default=0.5, help='NPP: segment scheduling factor lambda')
    # data
    add('--data', default='shapes', help="built-in 'shapes' or 'pairs' (harder: two shapes that must agree), a cache "
                                         "dir (tokenizers.py), or 'random': ImageNet's shapes, for --bench, --dry_run")
    add('--tokenizer', default=None, choices=list(TOKENIZERS), help="for the built-in data (default: pixel)")
    add('--flip', action=argparse.BooleanOptionalAction, default=True,
        help="train on each image or its mirror (MAR); --no-flip where the mirror is another class (digits, text)")
    # optimization
    add('--batch_size', type=int, default=16, help='images per process and micro-step')
    add('--global_batch_size', type=int, default=None, help='images per step (Sec. 5.1: 2048); default: all processes')
    add('--max_steps', type=int, default=1300, help='optimizer steps (the CPU quick start)')
    add('--epochs', type=float, default=None, help='run length in epochs, sets --max_steps (the paper: 800)')
    add('--warmup_epochs', type=float, default=None, help='sets --warmup_steps (MAR: 100)')
    add('--lr', type=float, default=8e-4, help='for the global batch (Sec. 5.1: 8e-4 at 2048)')
    add('--lr_schedule', default='cosine', choices=['constant', 'cosine'], help='after warmup (MAR: constant)')
    add('--warmup_steps', type=int, default=50, help='linear warmup of the learning rate')
    add('--weight_decay', type=float, default=0.02, help='MAR: 0.02')
    add('--beta1', type=float, default=0.9, help='Sec. 5.1: AdamW (0.9, 0.95)')
    add('--beta2', type=float, default=0.95, help='Sec. 5.1')
    add('--grad_clip', type=float, default=3.0, help='MAR: 3.0')
    add('--ema', type=float, default=0.9999, help='EMA decay (MAR: 0.9999)')
    add('--class_dropout', type=float, default=0.0, help="'no class' label probability, for CFG (the paper: none)")
    # sampling at the end of training, and online evaluation every --eval_every steps and at the end: FID/IS against
    # --fid_ref (MAR's), or the small-image metric (fid.SmallImageMetric)
    add('--num_samples', type=int, default=40, help='images in out_dir/samples.png (0: none)')
    add('--temperature', type=float, default=1.0, help='of the tokens sampled (the paper: 1)')
    add('--eval_every', type=int, default=0, help='steps between evaluations (0: none)')
    add('--fid_ref', default=None, help="reference batch .npz or image set; none: the small-image metric")
    add('--eval_images', type=int, default=5000, help='samples per evaluation (the paper: 50000)')
    add('--eval_batch_size', type=int, default=None, help='images per sampling batch (default: --batch_size)')
    add('--inception', default=fid.DEFAULT_WEIGHTS, help=f'FID Inception weights ({fid.WEIGHTS_FILE})')
    add('--fid_resize', default='tf1', choices=['tf1', 'pytorch'], help="see fid.py's --resize")
    # system
    add('--out_dir', default='out', help='the checkpoints, log.jsonl and samples.png of one run')
    add('--resume', action='store_true', help='continue the run in out_dir (from out_dir/ckpt.pt)')
    add('--overwrite', action='store_true', help='delete the run in out_dir, then train afresh')
    add('--log_interval', type=int, default=100, help='steps between log lines')
    add('--ckpt_interval', type=int, default=500, help='steps between checkpoints (and at the end)')
    add('--keep_last', type=int, default=2, help='checkpoints kept (ckpt.pt is the newest)')
    add('--seed', type=int, default=0, help='of the weights, the data order and every draw')
    add('--device', default=None, help='default: cuda if available, else cpu')
    add('--amp', action=argparse.BooleanOptionalAction, default=None, help='bf16 autocast (default: on for CUDA)')
    add('--compile', action=argparse.BooleanOptionalAction, default=False, help='torch.compile')
    add('--grad_checkpointing', action=argparse.BooleanOptionalAction, default=False,
        help='recompute block activations in backward: less memory, about 1/3 more compute')
    add('--dry_run', action='store_true', help='print the configuration, sizes and FLOPs, then exit')
    add('--bench', action='store_true', help='time --bench_steps steps after --bench_warmup, then exit')
    add('--bench_warmup', type=int, default=5, help='untimed steps before --bench times')
    add('--bench_steps', type=int, default=20, help='steps --bench times')
    add('--peak_tflops', type=float, default=None, help=f'peak bf16 TFLOP/s for MFU, if not one of {list(PEAK_TFLOPS)}')
    return parser


if __name__ == '__main__':
    main(get_parser().parse_args())
