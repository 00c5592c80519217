"""
Sample images from a trained Heptapod: the (position, token) loop of Sec. 4.2.

At each step the head predicts the tokens at the positions not yet generated, a position is chosen
(uniformly at random among them, as the paper), its token is sampled, and the pair is fed back to the
causal Transformer through its KV cache, until the grid is full. No classifier-free guidance by default.

    python sample.py --ckpt out/ckpt.pt --num_images 100 --out samples.npz
    torchrun --nproc_per_node=8 sample.py --ckpt CKPT --num_images 50000 --out DIR   # the paper's protocol
    python sample.py --ckpt out/ckpt.pt --num_steps 64          # parallel decoding: 64 steps, not 256
    python sample.py --ckpt out/ckpt.pt --prefix_image IMG --keep_mask MASK   # zero-shot in/outpainting
    python sample.py --ckpt out/ckpt.pt --bench                 # images/s, FLOPs per image, MFU
    python sample.py --ckpt out/ckpt.pt --figures IMG --out figs  # Fig. 3: token similarity, last-layer attention

writes the .npz (arr_0: uint8 NHWC images, arr_1: class labels, the ADM evaluator's layout), a .png
grid of the first images, and one PNG per image. Finished batches are kept and skipped when run again with
the same checkpoint and flags (--num_images may change); an --out of other samples is refused (--overwrite).
"""
import argparse
import glob
import hashlib
import json
import math
import os
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image

from heads import GaussianDiffusion, Heptapod, linear_flops, saved_config, take
from model import load_weights, make_orders
from tokenizers import HelpFormatter, VQTokenizer, center_crop_arr, make_tokenizer, to_rgb

# dense bf16 peak of one GPU in TFLOP/s, from the vendors' data sheets; the first name found in the device's wins
PEAK_TFLOPS = {'H100 PCIe': 756, 'H100': 989, 'H200': 989, 'A100': 312}


def peak_flops(device, default_tflops=None):
    """Peak bf16 FLOP/s of the device for MFU, or None when unknown (CPUs)."""
    name = torch.cuda.get_device_name(device) if str(device).startswith('cuda') else ''
    tflops = next((t for n, t in PEAK_TFLOPS.items() if n in name), default_tflops)
    return tflops and tflops * 1e12


def step_schedule(n, num_steps):
    """Tokens placed at each of num_steps steps, summing to n: MAR's cosine schedule, which leaves
    floor(n cos(pi/2 (s+1)/S)) tokens after step s, with at least one token per step (1 <= num_steps <= n)."""
    sizes, left = [], n
    for s in range(num_steps):
        after = math.floor(n * math.cos(math.pi / 2 * (s + 1) / num_steps))
        after = max(num_steps - s - 1, min(left - 1, after))  # >= 1 token now and for every later step
        sizes.append(left - after)
        left = after
    return sizes


def sampling_errors(config, order, num_steps=None, position_order=None, keep=None):
    """What a model (its config, trained in `order`) cannot do of these sampling settings, one message each:
    sample.py checks them before it writes anything, generate() before it starts."""
    N, head = config['grid_size'] ** 2, config['head']
    training_order = 'raster' if order in ('raster', 'rar') else 'random'
    position_order = position_order or training_order
    left = N - (0 if keep is None else int(keep[0].sum()))  # the positions to generate
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


def start_orders(B, N, position_order, keep, generator):
    """(B, N) the positions in generation order: the kept positions first (in random order), then the others
    in the chosen order (random: uniformly random, the paper; raster; confidence: filled in as generated)."""
    if position_order == 'raster':
        return make_orders(B, N, 'raster', generator)  # a kept prefix is the first rows (sampling_errors)
    orders = make_orders(B, N, 'random', generator)
    if keep is not None:  # kept positions first, each group in the random order drawn above
        orders = orders.gather(1, (~keep).gather(1, orders).long().argsort(dim=1, stable=True))
    return orders


@torch.no_grad()
def generate(model, labels, order, generator, temperature=1.0, top_k=None, cfg=1.0, num_steps=None,
             position_order=None, prefix=None, use_cache=True):
    """Tokens (B, N) or (B, N, D) in raster layout for class labels (B,). `order` is the training order (1D models
    must sample in it; a 2D model predicts every position, so it may sample in any); position_order None follows
    it, random being the paper's, and 'confidence' fills the most likely positions first. num_steps < N places
    several tokens per step (MAR's cosine schedule), which go through the causal Transformer together. cfg > 1
    guides with a 'no class' copy (off by default): logit mixing for discrete tokens, the noise prediction with
    MAR's linear schedule for continuous ones. prefix = (tokens, keep (B, N) bool): the kept tokens are read first and
    returned unchanged (zero-shot inpainting / outpainting). use_cache=False recomputes the causal
    Transformer over the whole prefix at every step (the reference path)."""
    B, N, C, D = len(labels), model.grid_size ** 2, model.config['n_embd'], model.config['token_dim']
    dev = labels.device
    one_d = model.config['head'] == 'linear'  # the 1D baselines predict the single next token (Table 1)
    keep = None if prefix is None else prefix[1].to(dev)
    errors = sampling_errors(model.config, order, num_steps, position_order, keep)
    if errors:
        raise ValueError('; '.join(errors))
    K = 0 if keep is None else int(keep.sum(1)[0])
    sizes = step_schedule(N - K, num_steps or N - K)
    position_order = position_order or ('raster' if order in ('raster', 'rar') else 'random')
    orders = start_orders(B, N, position_order, keep, generator)
    if cfg != 1.0:  # the unconditional copies read the same positions and receive the same tokens
        labels, orders = torch.cat([labels, torch.full_like(labels, model.num_classes)]), orders.repeat(2, 1)
    M = len(labels)
    target = (lambda a, b: orders[:, a:b]) if one_d else (lambda a, b: None)  # the 1D models' next positions
    rows = torch.arange(M, device=dev)
    tokens = torch.zeros(M, N, *([D] if D else []), dtype=torch.float if D else torch.long, device=dev)
    if keep is not None:
        tokens[:] = prefix[0].to(tokens).repeat(M // B, *([1] * (tokens.dim() - 1)))
    h_steps = torch.zeros(M, N, C, device=dev)  # h_steps[:, t] has seen t tokens
    t_model = model.transformer

    def feed(t0, t1):  # the tokens of steps t0..t1-1 into the causal Transformer -> their states (M, t1-t0, C)
        if use_cache:
            step_idx = torch.arange(t0 + 1, t1 + 1, device=dev)  # sequence indices: the class is 0
            return t_model.decode(take(tokens, orders[:, t0:t1]), orders[:, t0:t1], step_idx, target(t0 + 1, t1 + 1))
        return t_model(take(tokens, orders[:, :t1]), labels, orders[:, :t1], target(0, t1 + 1))[:, t0 + 1:]

    try:
        if use_cache:
            t_model.setup_cache(M, N)
            h_steps[:, :1] = t_model.prefill(labels, target(0, 1))
        else:
            h_steps[:, :1] = t_model(tokens[:, :0], labels, orders[:, :0], target(0, 1))
        if K:  # the kept tokens, in one causal block
            h_steps[:, 1:K + 1] = feed(0, K)
        t = K
        for s, k in enumerate(sizes):
            if one_d:
                z = h_steps[:, t:t + 1]  # (M, 1, C): h_t predicts the token at orders[:, t]
            else:  # the head predicts the positions left (global: all of them, local: the chunk of the next)
                z, positions, seen = model.head(h_steps, orders, torch.full((M, 1), t, device=dev))
                if position_order == 'confidence':  # the k positions whose best token is most likely
                    logits = model.token_head.logits(z, cfg)  # (B, N, V)
                    conf = logits.log_softmax(-1).amax(-1).masked_fill(seen[:B], -math.inf)  # (B, N)
                    chosen = conf.topk(k, dim=1).indices.repeat(M // B, 1)  # (M, k)
                    rest = orders[:, t:]  # the positions left, the chosen ones moved to the front
                    first = (rest[:, :, None] == chosen[:, None, :]).any(-1)
                    orders[:, t:] = rest.gather(1, (~first).long().argsort(dim=1, stable=True))
                slot = (positions[:, :, None] == orders[:, None, t:t + k]).int().argmax(1)  # (M, k) where in z
                z = z.gather(1, slot[..., None].expand(M, k, C))  # (M, k, C)
            # MAR's linear CFG schedule for the diffusion head: from 1 towards cfg as the image fills up
            step_cfg = 1 + (cfg - 1) * (t + k) / N if D else cfg
            tok = model.token_head.sample(z.flatten(0, 1), generator, temperature, step_cfg, top_k)  # (B*k[, D])
            tok = tok.view(B, k, *tok.shape[1:])  # (B, k[, D]), the guided rows only with CFG
            if cfg != 1.0:
                tok = tok.repeat(2, *([1] * (tok.dim() - 1)))
            tokens[rows[:, None], orders[:, t:t + k]] = tok
            if t + k < N:
                h_steps[:, t + 1:t + k + 1] = feed(t, t + k)
            t += k
    finally:
        t_model.clear_cache()
    return tokens[:B]


def decode(tokenizer, tokens, grid_size):
    """uint8 images (B, H, W, 3) of generated tokens (B, N[, D]) in raster layout."""
    return tokenizer.decode(tokens.view(len(tokens), grid_size, grid_size, *tokens.shape[2:]))


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
        raise SystemExit(f"error: {path}: no such file (train.py writes out_dir/ckpt.pt)")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # torch's own message spans lines and suggests weights_only=False: name the type only
        raise SystemExit(f"error: {path}: not a readable PyTorch checkpoint ({type(e).__name__}): damaged, or not "
                         f"written by train.py (out_dir/ckpt.pt, or an earlier out_dir/ckpt_STEP.pt)")
    missing = {'config', 'model', 'ema', 'args', 'data_meta'} - set(ckpt if isinstance(ckpt, dict) else ())
    if missing:
        raise SystemExit(f"error: {path}: not a heptapod train.py checkpoint (missing {sorted(missing)})")
    ckpt['config'] = saved_config(ckpt['config'])
    return ckpt


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


def load_prefix(args, meta, tokenizer, grid_size, device):
    """(tokens (1, N[, D]), keep (1, N) bool) from --prefix_image and --keep_mask (white: keep)."""
    if args.prefix_image is None or args.keep_mask is None:
        raise SystemExit("error: --prefix_image and --keep_mask go together: give both image files")
    mask = read_image('--keep_mask', args.keep_mask).convert('L').resize((grid_size, grid_size), Image.NEAREST)
    mask = np.array(mask) > 127  # (h, w)
    left = grid_size ** 2 - int(mask.sum())  # the positions to generate
    if left == 0:
        raise SystemExit(f"error: --keep_mask {args.keep_mask} is white everywhere, so it keeps every token and "
                         f"leaves none to generate (black marks the positions to generate)")
    tokens = image_tokens(args.prefix_image, '--prefix_image', meta, tokenizer, args.seed, device)
    return tokens, torch.from_numpy(mask).flatten()[None].to(device)


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


# -----------------------------------------------------------------------------
# Fig. 3 and Appendix B: how an image's tokens correlate, and where the causal Transformer looks

def token_vectors(tokenizer, tokens, grid_size):
    """(N, D) vectors of an image's tokens (1, N[, D]): continuous tokens as they are (VAE latents, pixel patches),
    the code vector of each VQ index (normalised, as the decoder reads it), a pixel token's colour in [-1, 1]."""
    if tokens.dim() == 3:
        return tokens[0].float()
    if isinstance(tokenizer, VQTokenizer):
        return F.normalize(tokenizer.model.quantize.embedding.weight, dim=-1)[tokens[0]]
    return tokenizer.decode(tokens.view(1, grid_size, grid_size)).float().view(-1, 3) / 127.5 - 1  # (N, 3)


@torch.no_grad()
def last_layer_attention(model, tokens, label):
    """(N, N) attention weights of the causal Transformer's last layer, averaged over heads, with the tokens read
    in raster order: row p is what the state after reading grid position p attends to, at the keys' grid positions
    (the class token's share is 1 minus the row's sum)."""
    t, N = model.transformer, model.grid_size ** 2
    orders = torch.arange(N, device=tokens.device)[None]  # (1, N)
    inputs = []
    hook = t.blocks[-1].attn.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
    t(take(tokens, orders)[:, :-1], label, orders[:, :-1], orders if model.config['head'] == 'linear' else None)
    hook.remove()
    attn, x = t.blocks[-1].attn, inputs[0]  # (1, N, C): the class and N - 1 tokens, layer-normed
    q, k, _ = attn.qkv(x).view(1, N, 3, attn.n_head, -1).permute(2, 0, 3, 1, 4)  # 3 x (1, nh, N, hd)
    w = (q @ k.transpose(-1, -2) / math.sqrt(q.size(-1))).float()  # (1, nh, N, N)
    w = w.masked_fill(torch.ones(N, N, dtype=torch.bool, device=x.device).triu(1), -math.inf).softmax(-1)
    w = w.mean(1)[0]  # (N, N): query step s has read s tokens; key step s' >= 1 is grid position s' - 1
    return F.pad(w[1:, 1:], (0, 1))  # (N - 1, N) -> row p: after reading position p; the last position is never read


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
    87th, 138th and 203rd of 16x16, as indices from 0, at the same places on other grids) to every token of the
    image, and OUT/attention.png, the last-layer attention from each reference token to the tokens read before it."""
    g = model.grid_size
    refs = [(p // 16 * g // 16) * g + p % 16 * g // 16 for p in (87, 138, 203)]  # (row, column) scaled to the grid
    tokens = image_tokens(args.figures, '--figures', meta, tokenizer, args.seed, device)
    vectors = F.normalize(token_vectors(tokenizer, tokens, g), dim=-1)  # (N, D)
    similarity = [(vectors @ vectors[p] + 1) / 2 for p in refs]  # cosine in [-1, 1] -> [0, 1]
    attention = last_layer_attention(model, tokens, torch.tensor([args.class_label or 0], device=device))
    image = decode(tokenizer, tokens, g)[0].cpu().numpy()  # (H, W, 3) what the model reads
    image = np.asarray(Image.fromarray(image).resize((12 * g, 12 * g), Image.NEAREST))
    os.makedirs(out, exist_ok=True)
    for name, maps in (('similarity', similarity), ('attention', [attention[p] / attention[p].max() for p in refs])):
        row = np.concatenate([image] + [heatmap(m, g, p) for m, p in zip(maps, refs)], axis=1)  # image, then 3 maps
        Image.fromarray(row).save(os.path.join(out, f'{name}.png'))
    print(f"wrote {out}/similarity.png and {out}/attention.png (reference tokens {refs})")


def file_hash(path):
    """The first 16 hex digits of the file's sha256: what identifies a checkpoint, whatever its name or date."""
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        while chunk := f.read(1 << 24):  # 16 MB at a time: a checkpoint of H is gigabytes
            h.update(chunk)
    return h.hexdigest()[:16]


def class_labels(args, num_classes):
    """(num_images,) labels: balanced (num_images / classes of each, as MAR's 50 per class), random (one seed for
    all ranks) or --class_label. The first n never depend on --num_images (torch's CPU randint draws in order),
    so that a longer run extends a shorter one."""
    if args.class_label is not None:
        return torch.full((args.num_images,), args.class_label)
    if args.labels == 'balanced':
        return torch.arange(args.num_images) % num_classes
    return torch.randint(num_classes, (args.num_images,), generator=torch.Generator().manual_seed(args.seed))


def prepare_out(args, root, npz, meta, device_type, rank):
    """Let --out continue only samples of the same weights and flags: root/settings.json (the flags that change
    images, hashes of the files read) must equal this run's, else refuse in one line, or with --overwrite delete
    the other run's batches, images and .npz. Every rank checks; rank 0 writes."""
    # not --num_images: seeds and labels follow the batch index (a shorter last batch is sampled again when the
    # run grows); not --compile or the number of processes; but bf16 and the device's random streams do change them
    flags = ('ema', 'batch_size', 'labels', 'class_label', 'seed', 'temperature', 'top_k', 'cfg', 'num_steps',
             'position_order', 'diffusion_steps', 'amp')
    files = dict(ckpt=args.ckpt, tokenizer_ckpt=args.tokenizer_ckpt or meta.get('ckpt'),
                 prefix_image=args.prefix_image, keep_mask=args.keep_mask)
    settings = {k: getattr(args, k) for k in flags} | {f'{k} sha256': p and file_hash(p) for k, p in files.items()}
    settings['device'] = device_type
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
        os.makedirs(os.path.join(root, 'images'), exist_ok=True)
        with open(record + '.tmp', 'w') as f:  # whole or not at all
            json.dump(settings, f, indent=1)
        os.replace(record + '.tmp', record)


def sampling_flops(model, num_steps, diffusion_steps, cfg):
    """FLOPs to sample one image (2 per multiply-add): the causal Transformer once over the N tokens, the
    head once per step over the whole grid (global) or the next chunk (local), the token head once per
    token (the diffusion MLP: diffusion_steps times); doubled with CFG."""
    train = model.flops_per_image(1)  # forward + backward for one prefix: a third of it is the forward
    flops = train['backbone'] / 3 + num_steps * train['head'] / 3
    per_token = linear_flops(model.token_head) * (diffusion_steps if model.config['token_dim'] else 1)
    flops += model.grid_size ** 2 * per_token
    return flops * (2 if cfg != 1.0 else 1)


def init_distributed(device=None):
    """(ddp, rank, world_size, device): under torchrun (RANK, LOCAL_RANK, WORLD_SIZE set) one process per GPU
    with NCCL, or per CPU process with gloo; otherwise a single process on `device` (default: cuda if any)."""
    if 'RANK' not in os.environ:
        return False, 0, 1, device or ('cuda' if torch.cuda.is_available() else 'cpu')
    dist.init_process_group(backend='nccl' if torch.cuda.is_available() else 'gloo')
    device = f"cuda:{os.environ['LOCAL_RANK']}" if torch.cuda.is_available() else 'cpu'
    if device.startswith('cuda'):
        torch.cuda.set_device(device)
    return True, dist.get_rank(), dist.get_world_size(), device


def bench(args, sample_batch, model, num_classes, device):
    """--bench: one batch to warm up (and compile), one timed; images/s, FLOPs per image and MFU."""
    labels = torch.arange(args.batch_size, device=device) % num_classes
    for k in range(2):
        if device.startswith('cuda'):
            torch.cuda.synchronize()
        t0 = time.time()
        sample_batch(k, labels)
    if device.startswith('cuda'):
        torch.cuda.synchronize()
    ips, N = args.batch_size / (time.time() - t0), model.grid_size ** 2
    flops = sampling_flops(model, len(step_schedule(N, args.num_steps or N)), args.diffusion_steps, args.cfg)
    peak = peak_flops(device, args.peak_tflops)
    print(f"bench: {ips:.2f} images/s at batch {args.batch_size}, {args.num_steps or N} steps; "
          f"{flops / 1e9:.1f} GFLOP per image; MFU {'-' if peak is None else f'{100 * flops * ips / peak:.1f}%'}")


def main(args):
    ddp, rank, world_size, device = init_distributed(args.device)
    device_type = 'cuda' if device.startswith('cuda') else 'cpu'
    args.amp = device_type == 'cuda' if args.amp is None else args.amp
    autocast = torch.autocast(device_type, dtype=torch.bfloat16, enabled=args.amp)
    ckpt = load_checkpoint(args.ckpt, device)
    check_args(args, ckpt)
    what = 'ema' if args.ema else 'model'
    model = Heptapod(**ckpt['config']).to(device).eval()
    load_weights(model, ckpt[what], args.ckpt, f"its '{what}' weights")
    if model.config['token_dim']:
        model.token_head.sample_diffusion = GaussianDiffusion(args.diffusion_steps).to(device)
    if args.compile:  # the per-step work: the head over the grid and the cached decoding step
        model.head = torch.compile(model.head) if model.head is not None else None
        model.transformer.decode = torch.compile(model.transformer.decode)
    meta, order = ckpt['data_meta'], ckpt['args']['order']
    tokenizer = make_tokenizer(meta['tokenizer'], args.tokenizer_ckpt or meta.get('ckpt'), device)
    root = args.out[:-len('.npz')] if args.out.endswith('.npz') else args.out
    if args.figures:
        return write_figures(args, root, model, meta, tokenizer, device)
    prefix = load_prefix(args, meta, tokenizer, model.grid_size, device) if args.prefix_image or args.keep_mask \
        else None
    errors = sampling_errors(model.config, order, args.num_steps, args.position_order, prefix and prefix[1])
    if errors:
        raise SystemExit("error: " + "; ".join(errors))

    def sample_batch(k, labels):  # batch k, with its own seed: the same images on any number of GPUs
        g = torch.Generator(device).manual_seed(args.seed * 1_000_003 + k)
        p = None if prefix is None else (prefix[0].expand(len(labels), *prefix[0].shape[1:]),
                                         prefix[1].expand(len(labels), -1))
        with autocast:
            tokens = generate(model, labels, order, g, args.temperature, args.top_k, args.cfg,
                              args.num_steps, args.position_order, p)
        return decode(tokenizer, tokens, model.grid_size).cpu().numpy()

    if args.bench:
        return bench(args, sample_batch, model, meta['num_classes'], device)

    labels = class_labels(args, meta['num_classes'])
    npz = args.out if args.out.endswith('.npz') else os.path.join(root, 'samples.npz')
    prepare_out(args, root, npz, meta, device_type, rank)
    if ddp:
        dist.barrier()  # rank 0 has emptied (--overwrite) and made the directory
    batches = range(math.ceil(args.num_images / args.batch_size))
    t0, done = time.time(), 0
    for k in batches[rank::world_size]:
        part = os.path.join(root, f'batch_{k:05d}.npz')
        y = labels[k * args.batch_size:(k + 1) * args.batch_size]
        if os.path.exists(part) and np.array_equal(np.load(part)['labels'], y.numpy()):
            continue  # finished by an earlier run of these settings (its last batch may have been shorter)
        images = sample_batch(k, y.to(device))
        for i, im in enumerate(images):
            Image.fromarray(im).save(os.path.join(root, 'images', f'{k * args.batch_size + i:06d}.png'))
        with open(part + '.tmp', 'wb') as f:  # written whole or not at all
            np.savez(f, images=images, labels=y.numpy())
        os.replace(part + '.tmp', part)
        done += len(images)
        print(f"rank {rank}: sampled {done} images, {done / (time.time() - t0):.2f} images/s", flush=True)
    if ddp:
        dist.barrier()
    if rank == 0:
        parts = [np.load(os.path.join(root, f'batch_{k:05d}.npz')) for k in batches]
        images = np.concatenate([p['images'] for p in parts])  # (num_images, H, W, 3) uint8
        np.savez(npz, arr_0=images, arr_1=np.concatenate([p['labels'] for p in parts]))
        png = os.path.splitext(npz)[0] + '.png'
        save_grid(images[:100], png, ncol=meta['num_classes'] if meta['num_classes'] <= 20 else 10)
        print(f"wrote {npz}, {png} and {len(images)} images in {root}/images")
    if ddp:
        dist.destroy_process_group()


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument('--ckpt', default='out/ckpt.pt', help='checkpoint written by train.py')
    parser.add_argument('--num_images', type=int, default=100, help='the paper: 50000')
    parser.add_argument('--out', default='samples.npz', help='the .npz to write, or a directory for samples.npz')
    parser.add_argument('--overwrite', action='store_true',
                        help='if --out holds samples of another checkpoint or flags, delete them and start afresh')
    parser.add_argument('--batch_size', type=int, default=100, help='images per batch and process')
    parser.add_argument('--labels', default='balanced', choices=['balanced', 'random'],
                        help='balanced: equally many of each class (MAR: 50 per class); random: uniform')
    parser.add_argument('--class_label', type=int, default=None, help='one class for all images')
    # sampling
    parser.add_argument('--temperature', type=float, default=1.0, help='> 0; 1 samples the model distribution')
    parser.add_argument('--top_k', type=int, default=None, help='sample among the k most likely tokens only')
    parser.add_argument('--cfg', type=float, default=1.0, help='classifier-free guidance scale; 1 = off (the paper)')
    parser.add_argument('--num_steps', type=int, default=None, help='decoding steps (default: one per token)')
    parser.add_argument('--position_order', default=None, choices=['random', 'raster', 'confidence'],
                        help="which positions each step fills (default: the training order; random is the paper's)")
    parser.add_argument('--diffusion_steps', type=int, default=100, help='respaced diffusion steps (MAR: 100)')
    parser.add_argument('--prefix_image', default=None, help='an image whose kept tokens are the prefix')
    parser.add_argument('--keep_mask', default=None, help='an image, white where --prefix_image is kept')
    parser.add_argument('--figures', default=None, metavar='IMAGE',
                        help="Fig. 3: write the tokens' cosine similarity and the last-layer attention of IMAGE to "
                             "OUT/similarity.png and OUT/attention.png, then exit")
    parser.add_argument('--ema', action=argparse.BooleanOptionalAction, default=True, help='use the EMA weights')
    parser.add_argument('--tokenizer_ckpt', default=None,
                        help='vq/vae weights to decode with (default: the file the cache was made with)')
    # system
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--device', default=None, help='default: cuda if available, else cpu')
    parser.add_argument('--amp', action=argparse.BooleanOptionalAction, default=None,
                        help='bf16 autocast (default: on for CUDA, off for CPU)')
    parser.add_argument('--compile', action=argparse.BooleanOptionalAction, default=False,
                        help='torch.compile the head and the decoding step')
    parser.add_argument('--bench', action='store_true', help='time one batch after a warm-up one, then exit')
    parser.add_argument('--peak_tflops', type=float, default=None, help='peak TFLOP/s for MFU on other devices')
    return parser


if __name__ == '__main__':
    main(get_parser().parse_args())
