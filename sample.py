"""
Sample images from a trained Heptapod (heads.Heptapod): the (position, token) loop of Sec. 4.2 (`generate`), then
the command line that writes, resumes and distributes it, --bench, and the figures of Fig. 3.

At each step the head predicts the tokens at the positions not yet generated, a position is chosen (uniformly at
random among them, as the paper), its token is sampled, and the pair is fed back to the causal Transformer through
its KV cache, until the grid is full. No classifier-free guidance by default.

    python sample.py --ckpt out/ckpt.pt --num_images 100 --out samples.npz
    torchrun --nproc_per_node=8 sample.py --ckpt CKPT --num_images 50000 --out DIR   # the paper's protocol
    python sample.py --ckpt out/ckpt.pt --num_steps 64          # parallel decoding: 64 steps, not 256
    python sample.py --ckpt out/ckpt.pt --prefix_image IMG --keep_mask MASK   # zero-shot in/outpainting
    python sample.py --ckpt out/ckpt.pt --bench                 # images/s, FLOPs, MFU, operators and time per step
    python sample.py --ckpt out/ckpt.pt --figures IMG --out figs  # Fig. 3: token similarity, last-layer attention

writes the .npz (arr_0: uint8 NHWC images, arr_1: labels, the ADM evaluator's layout), a .png grid of the first
images and one PNG per image. Finished batches are kept and skipped when run again with the same checkpoint and
flags (--num_images may change); an --out of other samples is refused (--overwrite).
"""
import argparse
import collections
import contextlib
import glob
import hashlib
import inspect
import json
import math
import os
import time
import zipfile

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

from heads import Heptapod, linear_flops, take
from model import make_orders
from tokenizers import (HelpFormatter, VQTokenizer, center_crop_arr, hold_lock, load_weights, make_folder,
                        make_tokenizer, mfu, percent, read_torch, remove_partial_files, to_rgb, write_atomic)


def step_schedule(n, num_steps):
    """Tokens placed at each of num_steps steps, summing to n: MAR's cosine schedule, floor(n cos(pi/2 (s+1)/S)) left
    after step s, at least one per step."""
    sizes, left = [], n
    for s in range(num_steps):
        after = math.floor(n * math.cos(math.pi / 2 * (s + 1) / num_steps))
        after = max(num_steps - s - 1, min(left - 1, after))  # >= 1 token now and for every later step
        sizes.append(left - after)
        left = after
    return sizes


def start_orders(B, N, position_order, keep, generator):
    """(B, N) positions in generation order: the kept ones first (in random order), then the others in the chosen
    order (random: the paper's; raster; confidence: filled in as generated)."""
    if position_order == 'raster':
        return make_orders(B, N, 'raster', generator)  # a kept prefix is the first rows (sampling_errors)
    orders = make_orders(B, N, 'random', generator)
    if keep is not None:  # kept positions first, each group in the random order drawn above
        orders = orders.gather(1, (~keep).gather(1, orders).long().argsort(dim=1, stable=True))
    return orders


def by_confidence(token_head, z, seen, rest, k, cfg):
    """Not the paper's: `rest` (M, n), the positions left, with the k whose best token is most likely (logits of z
    (M, N, C), guided with CFG) moved to the front."""
    B = len(z) // 2 if cfg != 1.0 else len(z)
    conf = token_head.logits(z, cfg).log_softmax(-1).amax(-1).masked_fill(seen[:B], -math.inf)  # (B, N)
    chosen = conf.topk(k, dim=1).indices.repeat(len(z) // B, 1)  # (M, k)
    first = (rest[:, :, None] == chosen[:, None, :]).any(-1)  # (M, n)
    return rest.gather(1, (~first).long().argsort(dim=1, stable=True))


def with_unconditional(labels, orders, num_classes, cfg):
    """Not the paper's: for CFG, a 'no class' copy of every row, which reads the same positions and receives the
    same tokens; the token head mixes the two."""
    if cfg == 1.0:
        return labels, orders
    return torch.cat([labels, torch.full_like(labels, num_classes)]), orders.repeat(2, 1)


@contextlib.contextmanager
def caches(model, M, N, local, run):
    """The KV caches of one generate(): the causal Transformer's and the local head's; the CUDA graphs of the steps
    that read them go with them."""
    model.transformer.setup_cache(M, N)
    if local:
        model.head.setup_cache(M, N)
    try:
        yield
    finally:
        model.transformer.clear_cache()
        if local:
            model.head.clear_cache()
        if run is not None:
            run.forget('backbone', 'head')


@torch.no_grad()
def generate(model, labels, order, generator, temperature=1.0, top_k=None, cfg=1.0, num_steps=None,
             position_order=None, prefix=None, use_cache=True, diffusion_steps=100, run=None):
    """Tokens (B, N[, D]) in raster layout for labels (B,). `order`: the training order (1D models sample in it, 2D
    ones in any position_order, None following it). num_steps < N places several tokens per step (MAR's cosine
    schedule). prefix = (tokens, keep (B, N)): kept tokens are read first and returned unchanged (in/outpainting).
    use_cache=False recomputes every prefix (the reference). run(name, fn, *args): how the backbone, the head and the
    diffusion chain are called (CUDAGraphs, Compiled, Timed; None: plainly)."""
    keep = None if prefix is None else prefix[1].to(labels.device)
    if errors := sampling_errors(model.config, order, num_steps, position_order, keep):
        raise ValueError('; '.join(errors))
    config, B, N, dev, t_model = model.config, len(labels), model.grid_size ** 2, labels.device, model.transformer
    C, D, one_d = config['n_embd'], config['token_dim'], config['head'] == 'linear'
    local, position_order = config['head'] == 'local' and use_cache, position_order or (
        'raster' if order in ('raster', 'rar') else 'random')
    K, orders = 0 if keep is None else int(keep[0].sum()), start_orders(B, N, position_order, keep, generator)
    labels, orders = with_unconditional(labels, orders, model.num_classes, cfg)  # (M,), (M, N): M = B or 2B
    M, call = len(labels), run or (lambda name, fn, *args: fn(*args))
    tokens = torch.zeros(M, N, *[D] * bool(D), dtype=torch.float if D else torch.long, device=dev)
    if keep is not None:
        tokens[:] = prefix[0].to(tokens).repeat(M // B, *[1] * (tokens.dim() - 1))
    h, rows = torch.zeros(M, N, C, device=dev), torch.arange(M, device=dev)[:, None]  # h[:, t]: after t tokens
    target = (lambda a, b: orders[:, a:b]) if one_d else (lambda a, b: None)  # the 1D models' next positions

    def feed(t0, t1):  # the tokens of steps t0..t1-1 into the causal Transformer -> h[:, t0+1..t1]
        pos, steps = orders[:, t0:t1], torch.arange(t0 + 1, t1 + 1, device=dev)  # sequence index 0 is the class
        if use_cache:
            h[:, t0 + 1:t1 + 1] = call('backbone', t_model.decode, take(tokens, pos), pos, steps,
                                       target(t0 + 1, t1 + 1))
        else:  # the reference: the whole prefix again
            h[:, t0:t1 + 1] = t_model(take(tokens, orders[:, :t1]), labels, orders[:, :t1], target(0, t1 + 1))[:, t0:]
        if local:  # the local head's cross-attention keys and values of the new states, once
            call('head', model.head.extend, h[:, t0 + 1:t1 + 1], pos, steps)
    with caches(model, M, N, local, run) if use_cache else contextlib.nullcontext():
        h[:, :1] = t_model.prefill(labels, target(0, 1)) if use_cache else \
            t_model(tokens[:, :0], labels, orders[:, :0], target(0, 1))  # the class token
        if local:  # the class state's
            model.head.extend(h[:, :1], orders[:, :0], torch.zeros(1, dtype=torch.long, device=dev))
        if K:  # the kept tokens, in one causal block
            feed(0, K)
        t = K
        for k in step_schedule(N - K, num_steps or N - K):
            if one_d:  # the 1D baselines: h_t predicts the token at orders[:, t]
                z = h[:, t:t + 1]  # (M, 1, C)
            else:  # the head predicts the positions left (global: all of them, local: the chunk of the next)
                z, positions, seen = call('head', model.head, h, orders, torch.full((M, 1), t, device=dev))
                if position_order == 'confidence':
                    orders[:, t:] = by_confidence(model.token_head, z, seen, orders[:, t:], k, cfg)
                slot = (positions[:, :, None] == orders[:, None, t:t + k]).int().argmax(1)  # (M, k) where in z
                z = z.gather(1, slot[..., None].expand(M, k, C))  # (M, k, C)
            step_cfg = 1 + (cfg - 1) * (t + k) / N if D else cfg  # MAR's linear CFG schedule for continuous tokens
            tok = model.token_head.sample(z.flatten(0, 1), generator, temperature, step_cfg, top_k, diffusion_steps,
                                          run).view(B, k, *[D] * bool(D))  # the guided rows only, with CFG
            tokens[rows, orders[:, t:t + k]] = tok.repeat(M // B, *[1] * (tok.dim() - 1))
            if t + k < N:
                feed(t, t + k)
            t += k
    return tokens[:B]


def sampling_errors(config, order, num_steps=None, position_order=None, keep=None):
    """What a model (its config, trained in `order`) cannot do of these settings, one message each: sample.py checks
    them before it writes anything, generate() before it starts."""
    N, head, training_order = config['grid_size'] ** 2, config['head'], 'raster' if order in ('raster', 'rar') else \
        'random'
    position_order, left = position_order or training_order, N - (0 if keep is None else int(keep[0].sum()))
    errors = []
    if num_steps is not None and not 1 <= num_steps <= left:
        errors.append(f"--num_steps {num_steps} must be in [1, {left}] (the positions to generate"
                      f"{'' if keep is None else ' that --keep_mask leaves'})")
    elif head != 'global' and (num_steps or left) < left:
        errors.append(f"the {'1D' if head == 'linear' else 'local-head'} model predicts one next position per "
                      f"step: use --num_steps {left} (the default)")
    if position_order == 'confidence' and (head != 'global' or config['token_dim']):
        errors.append("--position_order confidence needs the global head and discrete tokens")
    if head == 'linear' and position_order != training_order:
        errors.append(f"a 1D model samples in its training order ({order}): drop --position_order {position_order}")
    if keep is not None and keep.sum(1).ne(N - left).any():
        errors.append("every image must keep the same number of tokens")
    raster = torch.arange(N, device=None if keep is None else keep.device) < N - left  # (N,) a raster prefix
    if position_order == 'raster' and keep is not None and not torch.equal(keep, raster.expand_as(keep)):
        errors.append("sampling in raster order can only continue a raster prefix: --keep_mask must keep the "
                      "first rows (and columns) of the grid")
    return errors


class CUDAGraphs:
    """The sampler's step functions (decoding, head, diffusion chain) replayed as captured CUDA graphs, one per name
    and input shapes: inputs are copied into the graph's tensors, the replay runs the eager call's kernels, outputs are
    cloned out. A function graphed here touches only its tensors, the weights and the caches (no host sync, no
    random draw); the graphs of 'backbone' and 'head' go with their caches, after every generate(). A key is
    captured at its second call: what comes once (a prefix's block, most steps of parallel decoding) runs as is.
    One instance per model: the key names the step, not the weights."""

    def __init__(self):
        self.graphs, self.seen = {}, set()

    def __call__(self, name, fn, *args):
        amp = torch.is_autocast_enabled('cuda'), torch.get_autocast_dtype('cuda')  # part of what the graph runs
        key = (name, amp) + tuple(None if a is None else (a.shape, a.dtype) for a in args)
        if key not in self.seen:
            self.seen.add(key)
            return fn(*args)
        if key not in self.graphs:
            static = [None if a is None else a.clone() for a in args]
            # autocast's cache of cast weights would outlive the graph: cast inside it instead
            with torch.autocast('cuda', amp[1], amp[0], cache_enabled=False):
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    fn(*static)  # warm-up, outside the graph: cuBLAS workspaces and lazy initialisation
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, capture_error_mode='thread_local'):  # train.py's loader may run
                    out = fn(*static)
            self.graphs[key] = graph, static, out
        graph, static, out = self.graphs[key]
        for s, a in zip(static, args):
            if a is not None:
                s.copy_(a)
        graph.replay()
        if isinstance(out, tuple):
            return tuple(o.clone() for o in out)
        return None if out is None else out.clone()  # None: the local head's extend, which only fills its cache

    def forget(self, *names):
        self.graphs = {k: v for k, v in self.graphs.items() if k[0] not in names}
        self.seen = {k for k in self.seen if k[0] not in names}


class Compiled:
    """--compile: the decoding step and the head compiled (torch.compile, once each), then called through `run`."""

    def __init__(self, run=None):
        self.run, self.fns = run, {}

    def __call__(self, name, fn, *args):
        if name != 'token head':  # the diffusion chain is a new closure at every call: not compiled
            if fn not in self.fns:
                self.fns[fn] = torch.compile(fn)
            fn = self.fns[fn]
        return fn(*args) if self.run is None else self.run(name, fn, *args)

    def forget(self, *names):
        return self.run and self.run.forget(*names)


def decode(tokenizer, tokens, grid_size):
    """uint8 images (B, H, W, 3) of generated tokens (B, N[, D]) in raster layout, 64 at a time (the VAE's decoder
    holds 8 GiB per activation of 256 images at 256x256, at the limit of 32-bit indexing)."""
    grids = tokens.view(len(tokens), grid_size, grid_size, *tokens.shape[2:])
    return torch.cat([tokenizer.decode(part) for part in grids.split(64)])


def save_grid(images, path, ncol):
    """uint8 images (B, H, W, 3) as one PNG grid, upscaled (nearest) to at least 64 px per image."""
    B, H, W, _ = images.shape
    nrow, scale = math.ceil(B / ncol), max(1, math.ceil(64 / H))
    grid = np.zeros((nrow * H, ncol * W, 3), dtype=np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, ncol)
        grid[r * H:(r + 1) * H, c * W:(c + 1) * W] = im
    save_png(Image.fromarray(grid).resize((ncol * W * scale, nrow * H * scale), Image.NEAREST), path)


def save_png(image, path):
    write_atomic(path, lambda f: image.save(f, format='PNG'))


# -----------------------------------------------------------------------------
# The command line: a distributed, resumable run of many batches


def load_checkpoint(path, device='cpu'):
    """A train.py checkpoint, read without unpickling arbitrary objects and checked (check_checkpoint)."""
    return check_checkpoint(read_torch(path, 'PyTorch checkpoint', '; expected a train.py checkpoint (out_dir/ckpt.pt '
                                                                   'or out_dir/ckpt_STEP.pt)', device), path)


def check_checkpoint(ckpt, path):
    """ckpt if it is a train.py checkpoint of this version of the code, else one error line."""
    missing = {'config', 'model', 'ema', 'optimizer', 'step', 'args', 'data_meta'} - set(
        ckpt if isinstance(ckpt, dict) else ())
    if missing:
        raise SystemExit(f"error: {path}: not a heptapod train.py checkpoint (missing {sorted(missing)})")
    own = set(inspect.signature(Heptapod).parameters)  # the model's config keys
    if set(ckpt['config']) != own:
        raise SystemExit(f"error: {path}: written by another version of this code (its model config differs in "
                         f"{sorted(set(ckpt['config']) ^ own)}); train the model again with this one")
    return ckpt


def file_hash(path):
    """The first 16 hex digits of the file's sha256: what identifies a checkpoint, whatever its name or date."""
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        while chunk := f.read(1 << 24):  # 16 MB at a time: a checkpoint of H is gigabytes
            h.update(chunk)
    return h.hexdigest()[:16]


def class_labels(args, num_classes):
    """(num_images,) labels: balanced (MAR's 50 per class), random (one seed for all ranks) or --class_label. The first
    n never depend on --num_images (CPU randint draws in order): a longer run extends a shorter one."""
    if args.class_label is not None:
        return torch.full((args.num_images,), args.class_label)
    if args.labels == 'balanced':
        return torch.arange(args.num_images) % num_classes
    return torch.randint(num_classes, (args.num_images,), generator=torch.Generator().manual_seed(args.seed))


def prepare_out(args, root, npz, meta, device_type, rank):
    """Let --out continue only samples of the same weights and flags (root/settings.json: the flags that change
    images, the hashes of the files read), else refuse in one line, or with --overwrite delete the other samples.
    Every rank checks; rank 0 writes."""
    # not --num_images: seeds and labels follow the batch index; not --compile, CUDA graphs or the number of processes
    flags = ('ema', 'batch_size', 'labels', 'class_label', 'seed', 'temperature', 'top_k', 'cfg', 'num_steps',
             'position_order', 'diffusion_steps', 'amp')
    files = dict(ckpt=args.ckpt, tokenizer_ckpt=args.tokenizer_ckpt or meta.get('ckpt'),
                 prefix_image=args.prefix_image, keep_mask=args.keep_mask)
    settings = {k: getattr(args, k) for k in flags} | {f'{k} sha256': p and file_hash(p) for k, p in files.items()}
    settings['device'] = device_type  # the device's random streams change the images
    record, old = os.path.join(root, 'settings.json'), None
    if os.path.isfile(record):
        with open(record) as f:
            old = json.load(f)
    made = glob.glob(os.path.join(root, 'batch_*.npz')) + glob.glob(os.path.join(root, 'images', '[0-9]*.png'))
    made += [f for f in (npz, os.path.splitext(npz)[0] + '.png') if os.path.isfile(f)]
    if made and old != settings and not args.overwrite:
        diff = 'no settings.json' if old is None else ', '.join(
            f"{k} {old.get(k)} -> {v}" for k, v in settings.items() if old.get(k) != v)
        raise SystemExit(f"error: --out {args.out} holds samples of other settings ({diff}); use another --out, or "
                         f"add --overwrite to delete them and start afresh")
    if rank == 0:
        for f in made if old != settings else ():  # --overwrite
            os.remove(f)
        make_folder(os.path.join(root, 'images'), '--out')
        remove_partial_files(os.path.join(root, 'images'))  # hold_lock has removed root's; the .npz may lie beside it
        remove_partial_files(os.path.dirname(os.path.abspath(npz)), os.path.basename(npz) + '.')
        write_atomic(record, lambda f: f.write(json.dumps(settings, indent=1).encode()))


def sample_run(args, sample_batch, meta, root, npz, rank, world_size, ddp):
    """Every batch of --num_images, rank r taking batches r, r + world, ..., each written whole as root/batch_K.npz
    and PNGs (skipped when an earlier run of these settings wrote it); then rank 0 joins them into the .npz."""
    labels, batches = class_labels(args, meta['num_classes']), range(math.ceil(args.num_images / args.batch_size))
    t0, done = time.time(), 0
    for k in batches[rank::world_size]:
        part, y = os.path.join(root, f'batch_{k:05d}.npz'), labels[k * args.batch_size:(k + 1) * args.batch_size]
        try:  # finished by an earlier run of these settings (its last batch may have been shorter)?
            with np.load(part) as done_part:
                if np.array_equal(done_part['labels'], y.numpy()):
                    continue
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):  # missing, cut short: sampled again
            pass
        images = sample_batch(k, y)
        for i, im in enumerate(images):
            save_png(Image.fromarray(im), os.path.join(root, 'images', f'{k * args.batch_size + i:06d}.png'))
        write_atomic(part, lambda f: np.savez(f, images=images, labels=y.numpy()))
        done += len(images)
        print(f"rank {rank}: sampled {done} images, {done / (time.time() - t0):.2f} images/s", flush=True)
    if ddp:
        dist.barrier()
    if rank == 0:
        parts = [np.load(os.path.join(root, f'batch_{k:05d}.npz')) for k in batches]
        images = np.concatenate([p['images'] for p in parts])  # (num_images, H, W, 3) uint8
        write_atomic(npz, lambda f: np.savez(f, arr_0=images, arr_1=np.concatenate([p['labels'] for p in parts])))
        png = os.path.splitext(npz)[0] + '.png'
        save_grid(images[:100], png, ncol=meta['num_classes'] if meta['num_classes'] <= 20 else 10)
        print(f"wrote {npz}, {png} and {len(images)} images in {root}/images")


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
    ddp, rank, world_size, device = setup_distributed(args.device)
    device_type = 'cuda' if device.startswith('cuda') else 'cpu'
    args.amp = device_type == 'cuda' if args.amp is None else args.amp
    autocast = torch.autocast(device_type, dtype=torch.bfloat16, enabled=args.amp)
    ckpt = load_checkpoint(args.ckpt, device)
    check_args(args, ckpt)
    what = 'ema' if args.ema else 'model'
    model = load_weights(Heptapod(**ckpt['config']).to(device).eval(), ckpt[what], args.ckpt, f"its '{what}' weights")
    run = CUDAGraphs() if device_type == 'cuda' and args.cuda_graphs is not False else None
    run = Compiled(run) if args.compile else run  # the per-step work: the head and the cached decoding step
    meta, order = ckpt['data_meta'], ckpt['args']['order']
    tokenizer = make_tokenizer(meta['tokenizer'], args.tokenizer_ckpt or meta.get('ckpt'), device, meta.get('colours'))
    root = args.out[:-len('.npz')] if args.out.endswith('.npz') else args.out
    if args.figures:
        return write_figures(args, root, model, meta, tokenizer, device)
    prefix = load_prefix(args, meta, tokenizer, model.grid_size, device) if args.prefix_image or args.keep_mask \
        else None
    errors = sampling_errors(model.config, order, args.num_steps, args.position_order, prefix and prefix[1])
    if errors:
        raise SystemExit("error: " + "; ".join(errors))

    def sample_batch(k, labels, run=run, num_steps=args.num_steps):  # batch k, with its own seed: the same
        g = torch.Generator(device).manual_seed(args.seed * 1_000_003 + k)  # images on any number of GPUs
        p = prefix and (prefix[0].expand(len(labels), *prefix[0].shape[1:]), prefix[1].expand(len(labels), -1))
        with autocast:
            tokens = generate(model, labels.to(device), order, g, args.temperature, args.top_k, args.cfg, num_steps,
                              args.position_order, p, diffusion_steps=args.diffusion_steps, run=run)
        return decode(tokenizer, tokens, model.grid_size).cpu().numpy()

    if args.bench:
        left = model.grid_size ** 2 - (0 if prefix is None else int(prefix[1][0].sum()))
        return bench(args, sample_batch, model, meta['num_classes'], device, run, left)
    npz = args.out if args.out.endswith('.npz') else os.path.join(root, 'samples.npz')
    if rank == 0:
        make_folder(root, '--out')
    with hold_lock(root) if rank == 0 else contextlib.nullcontext():
        prepare_out(args, root, npz, meta, device_type, rank)
        if ddp:
            dist.barrier()  # rank 0 has emptied (--overwrite) and made the directory
        sample_run(args, sample_batch, meta, root, npz, rank, world_size, ddp)
    if ddp:
        dist.destroy_process_group()


# -----------------------------------------------------------------------------
# --bench: images/s, FLOPs and MFU, and per step the operators dispatched and the time of each part


class CountOps(TorchDispatchMode):
    """Counts the aten operators dispatched: each is at least one kernel launch on a GPU."""

    count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


class Timed:
    """Calls each part through `run` (or plainly) and adds up its seconds."""

    def __init__(self, run, device):
        self.run, self.device, self.seconds = run, device, collections.Counter()

    def __call__(self, name, fn, *args):
        sync(self.device)
        t0 = time.perf_counter()
        out = fn(*args) if self.run is None else self.run(name, fn, *args)
        sync(self.device)
        self.seconds[name] += time.perf_counter() - t0
        return out

    def forget(self, *names):
        return self.run and self.run.forget(*names)


def sync(device):
    if str(device).startswith('cuda'):
        torch.cuda.synchronize()


def sampling_flops(model, num_steps, diffusion_steps, cfg):
    """FLOPs to sample one image (2 per multiply-add): the causal Transformer once over the N tokens, the head once per
    step (global: the grid; local: a chunk), the token head once per token (diffusion_steps times); x2 with CFG."""
    train = model.flops_per_image(1)  # forward + backward for one prefix: a third of it is the forward
    per_token = linear_flops(model.token_head) * (diffusion_steps if model.config['token_dim'] else 1)
    flops = train['backbone'] / 3 + num_steps * train['head'] / 3 + model.grid_size ** 2 * per_token
    return flops * (2 if cfg != 1.0 else 1)


def bench(args, sample_batch, model, num_classes, device, run, left):
    """One batch to warm up (compile, capture), one timed: images/s, FLOPs per image, MFU; then the aten operators of
    a step and, in one more batch with a synchronisation around each part, where the time goes. left: the tokens
    to sample (N less a prefix's)."""
    labels = torch.arange(args.batch_size) % num_classes
    steps = len(step_schedule(left, args.num_steps or left))
    for k in range(2):
        sync(device)
        t0 = time.time()
        sample_batch(k, labels)
    sync(device)
    dt, flops = time.time() - t0, sampling_flops(model, steps, args.diffusion_steps, args.cfg)
    print(f"bench: {args.batch_size / dt:.2f} images/s at batch {args.batch_size}, {steps} steps; {flops / 1e9:.1f} "
          f"GFLOP per image; MFU {percent(mfu(flops * args.batch_size / dt, device, args.peak_tflops))}")
    counts, few = [], 8 if model.config['head'] == 'global' and not args.prefix_image else None
    for r, n in [(None, few or args.num_steps)] + [(run, args.num_steps)] * isinstance(run, CUDAGraphs):
        for count in (False, True) if r is not None else (True,):  # with `run`, a first call compiles or captures
            with CountOps() if count else contextlib.nullcontext() as ops:  # per step the same for any batch (and
                sample_batch(0, labels[:2], run=r, num_steps=n)  # the global head's for any number of steps)
        counts.append(f"{ops.count / len(step_schedule(left, n or left)):.0f} "
                      f"{'eager' if r is None else 'with CUDA graphs'}")
    timed, t0 = Timed(run, device), time.time()
    sample_batch(0, labels, run=timed)
    parts = dict(timed.seconds, other=time.time() - t0 - sum(timed.seconds.values()))
    print(f"bench: aten operators per step: {', '.join(counts)}; ms per step: " +
          ", ".join(f"{name} {1000 * s / steps:.1f}" for name, s in parts.items()))


# -----------------------------------------------------------------------------
# Images in: the prefix of in/outpainting, and Fig. 3 (Appendix B): how an image's tokens correlate, where the causal
# Transformer looks


def read_image(flag, path):
    """The Pillow image at path, read whole (a truncated file fails here, not later), or one error line."""
    try:
        with Image.open(path) as im:
            im.load()
            return im
    except Exception as e:  # missing, not an image, truncated, over PIL's size limit
        raise SystemExit(f"error: {flag} {path}: not a readable image ({type(e).__name__})")


def image_tokens(path, flag, meta, tokenizer, seed, device):
    """The model's tokens (1, N[, D]) of the image at path, centre-cropped to the training size as the cache was."""
    image = torch.from_numpy(center_crop_arr(to_rgb(read_image(flag, path)), meta['image_size']))[None]  # (1, H, W, 3)
    tokens = tokenizer.from_cache(tokenizer.encode(image), torch.Generator(device).manual_seed(seed))
    return tokens.flatten(1, 2).to(device)  # (1, h, w[, D]) -> (1, N[, D])


def load_prefix(args, meta, tokenizer, grid_size, device):
    """(tokens (1, N[, D]), keep (1, N) bool) from --prefix_image and --keep_mask (white: keep)."""
    if args.prefix_image is None or args.keep_mask is None:
        raise SystemExit("error: --prefix_image and --keep_mask go together: give both image files")
    mask = read_image('--keep_mask', args.keep_mask).convert('L').resize((grid_size, grid_size), Image.NEAREST)
    mask = np.array(mask) > 127  # (h, w)
    if mask.all():
        raise SystemExit(f"error: --keep_mask {args.keep_mask} is white everywhere, so it keeps every token and "
                         f"leaves none to generate (black marks the positions to generate)")
    tokens = image_tokens(args.prefix_image, '--prefix_image', meta, tokenizer, args.seed, device)
    return tokens, torch.from_numpy(mask).flatten()[None].to(device)


def token_vectors(tokenizer, tokens, grid_size):
    """(N, D) vectors of an image's tokens (1, N[, D]): continuous ones as they are, a VQ index's (normalised) code
    vector, a pixel token's colour in [-1, 1]."""
    if tokens.dim() == 3:
        return tokens[0].float()
    if isinstance(tokenizer, VQTokenizer):
        return F.normalize(tokenizer.model.quantize.embedding.weight, dim=-1)[tokens[0]]
    return tokenizer.decode(tokens.view(1, grid_size, grid_size)).float().view(-1, 3) / 127.5 - 1  # (N, 3)


@torch.no_grad()
def last_layer_attention(model, tokens, label):
    """(N, N) attention of the causal Transformer's last layer, mean over heads, tokens read in raster order: row p is
    what the state after reading position p attends to, at the keys' positions (the class token: 1 - the row's sum)."""
    t, N = model.transformer, model.grid_size ** 2
    orders, inputs = torch.arange(N, device=tokens.device)[None], []  # (1, N)
    hook = t.blocks[-1].attn.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
    t(take(tokens, orders)[:, :-1], label, orders[:, :-1], orders if model.config['head'] == 'linear' else None)
    hook.remove()
    attn, x = t.blocks[-1].attn, inputs[0]  # (1, N, C): the class and N - 1 tokens, layer-normed
    q, k, _ = attn.qkv(x).view(1, N, 3, attn.n_head, -1).permute(2, 0, 3, 1, 4)  # 3 x (1, nh, N, hd)
    w = (q @ k.transpose(-1, -2) / math.sqrt(q.size(-1))).float()  # (1, nh, N, N)
    w = w.masked_fill(torch.ones(N, N, dtype=torch.bool, device=x.device).triu(1), -math.inf).softmax(-1).mean(1)[0]
    return F.pad(w[1:, 1:], (0, 1))  # query step s has read s tokens, key step s' is position s' - 1: (N - 1, N)


def heatmap(values, grid_size, marked, cell=12):
    """An RGB image (g*cell, g*cell, 3) of values (N,) in [0, 1], dark blue to yellow, the cell `marked` framed red."""
    v = values.clamp(0, 1).view(grid_size, grid_size, 1).cpu().numpy()
    rgb = ((1 - v) * np.array([20, 20, 80]) + v * np.array([255, 230, 40])).astype(np.uint8)  # (g, g, 3)
    rgb = rgb.repeat(cell, 0).repeat(cell, 1)
    r, c = divmod(marked, grid_size)
    frame = rgb[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell]  # a view: its border is drawn into rgb
    frame[[0, -1]] = frame[:, [0, -1]] = (255, 0, 0)
    return rgb


def write_figures(args, out, model, meta, tokenizer, device):
    """Fig. 3 for --figures IMAGE: OUT/similarity.png, the cosine similarity of three reference tokens (the paper's
    87th, 138th and 203rd of 16x16, from 0; the same places on other grids) to every token, and OUT/attention.png,
    the last-layer attention from each to the tokens read before it."""
    g = model.grid_size
    refs = [(p // 16 * g // 16) * g + p % 16 * g // 16 for p in (87, 138, 203)]  # (row, column) scaled to the grid
    tokens = image_tokens(args.figures, '--figures', meta, tokenizer, args.seed, device)
    vectors = F.normalize(token_vectors(tokenizer, tokens, g), dim=-1)  # (N, D)
    attention = last_layer_attention(model, tokens, torch.tensor([args.class_label or 0], device=device))
    image = decode(tokenizer, tokens, g)[0].cpu().numpy()  # (H, W, 3) what the model reads
    image = np.asarray(Image.fromarray(image).resize((12 * g, 12 * g), Image.NEAREST))
    make_folder(out, '--out')
    for name, maps in (('similarity', [(vectors @ vectors[p] + 1) / 2 for p in refs]),  # cosine -> [0, 1]
                       ('attention', [attention[p] / attention[p].max() for p in refs])):
        row = np.concatenate([image] + [heatmap(m, g, p) for m, p in zip(maps, refs)], axis=1)  # image, then 3 maps
        save_png(Image.fromarray(row), os.path.join(out, f'{name}.png'))
    print(f"wrote {out}/similarity.png and {out}/attention.png (reference tokens {refs})")


# -----------------------------------------------------------------------------
# Arguments


def check_args(args, ckpt):
    """Flags that cannot work with this checkpoint fail here, in one line, before anything is built or written."""
    V, classes = ckpt['config']['vocab_size'], ckpt['config']['num_classes']
    checks = [  # (what is wrong, the message)
        (args.num_images < 1, f"--num_images {args.num_images} must be >= 1"),
        (args.batch_size < 1, f"--batch_size {args.batch_size} must be >= 1"),
        (args.temperature <= 0, f"--temperature {args.temperature} must be > 0 (1: the model's distribution)"),
        (args.class_label is not None and not 0 <= args.class_label < classes,
         f"--class_label {args.class_label} must be in [0, {classes - 1}] (the model's classes)"),
        (args.top_k is not None and not 1 <= args.top_k <= V, f"--top_k {args.top_k} must be in [1, {V}] (the "
         f"vocabulary)" if V else "--top_k applies to discrete tokens; this model's tokens are continuous"),
        (not 1 <= args.diffusion_steps <= 1000,  # respaced from the 1000 trained steps (heads.GaussianDiffusion)
         f"--diffusion_steps {args.diffusion_steps} must be in [1, 1000] (MAR: 100)"),
        (args.cfg != 1.0 and not ckpt['args'].get('class_dropout'),
         f"--cfg {args.cfg} needs a model trained with --class_dropout > 0: this one never saw the 'no class' "
         f"label, so its embedding is untrained (sample with --cfg 1, the paper's setting)")]
    errors = [message for wrong, message in checks if wrong]
    if errors:
        raise SystemExit("error: " + "; ".join(errors))


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add = parser.add_argument
    add('--ckpt', default='out/ckpt.pt', help='checkpoint written by train.py')
    add('--num_images', type=int, default=100, help='the paper: 50000')
    add('--out', default='samples.npz', help='the .npz to write, or a directory for samples.npz')
    add('--overwrite', action='store_true', help='delete samples of another checkpoint or flags in --out first')
    add('--batch_size', type=int, default=100, help='images per batch and process')
    add('--labels', default='balanced', choices=['balanced', 'random'], help='balanced: MAR, 50 per class; random')
    add('--class_label', type=int, default=None, help='one class for all images')
    # sampling
    add('--temperature', type=float, default=1.0, help='> 0; 1 samples the model distribution')
    add('--top_k', type=int, default=None, help='sample among the k most likely tokens only')
    add('--cfg', type=float, default=1.0, help='classifier-free guidance scale; 1 = off (the paper)')
    add('--num_steps', type=int, default=None, help='decoding steps (default: one per token)')
    add('--position_order', default=None, choices=['random', 'raster', 'confidence'],
        help="which positions each step fills (default: the training order; random is the paper's)")
    add('--diffusion_steps', type=int, default=100, help='respaced diffusion steps (MAR: 100)')
    add('--prefix_image', default=None, help='an image whose kept tokens are the prefix')
    add('--keep_mask', default=None, help='an image, white where --prefix_image is kept')
    add('--figures', default=None, metavar='IMAGE', help="Fig. 3 of IMAGE to OUT/similarity.png, OUT/attention.png")
    add('--ema', action=argparse.BooleanOptionalAction, default=True, help='use the EMA weights')
    add('--tokenizer_ckpt', default=None, help='vq/vae weights to decode with (default: the cache\'s)')
    # system
    add('--seed', type=int, default=0)
    add('--device', default=None, help='default: cuda if available, else cpu')
    add('--amp', action=argparse.BooleanOptionalAction, default=None, help='bf16 autocast (default: on for CUDA)')
    add('--compile', action=argparse.BooleanOptionalAction, default=False, help='torch.compile the head and decoding')
    add('--cuda_graphs', action=argparse.BooleanOptionalAction, default=None,
        help='replay decoding, head and diffusion chain as captured CUDA graphs (default: on CUDA; the same numbers)')
    add('--bench', action='store_true', help='time one batch after a warm-up one, then exit')
    add('--peak_tflops', type=float, default=None, help='peak TFLOP/s for MFU on other devices')
    return parser


if __name__ == '__main__':
    main(get_parser().parse_args())
