r"""
Tokenizers, the built-in data and the dataset cache that training memory-maps; at the bottom, the file handling every
script shares (atomic writes, checkpoint reading, folder locks, --help, memory and MFU).

- pixel: a token per pixel, the index of its nearest colour in a palette fitted to the data by `cache` (exact for
  data of few colours, else k-means as iGPT) or the fixed 3-bit cube (512 colours); pixel_patch: a continuous 12-d
  token per 2x2x3 patch. Neither has weights: both train on a CPU.
- vq: LlamaGen's VQ-16 (16384 codes), vae: MAR's KL-16 VAE (16 channels), the paper's (Sec. 5.1), loading the
  released files (vq_ds16_c2i.pt, kl16.ckpt) as they are.
- make_shapes: the built-in data, coloured shapes of 10 classes ('pairs': two per image that must agree), a class
  structure to learn without a download; RandomTokens: random tokens of the paper's shapes, for --bench, --dry_run.
- cache: an ImageFolder (DIR/<class>/<image>) read with Pillow, centre-cropped the ADM way, tokenized once with
  each image's mirror, into shards.

    python tokenizers.py cache --tokenizer pixel --data DIR --image_size 16 --out CACHE
    torchrun --nproc_per_node=8 tokenizers.py cache --tokenizer vae --ckpt kl16.ckpt --data IMAGENET/train \
        --image_size 256 --out CACHE          # the paper's data: 16x16 tokens of each image and its mirror
"""
import argparse
import contextlib
import fcntl
import hashlib
import json
import math
import os
import re
import resource
import sys
import time
from collections import OrderedDict

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

# -----------------------------------------------------------------------------
# The pixel tokenizers


class Tokenizer:
    """Every tokenizer: encode (uint8 images (B, H, W, 3) -> what the cache keeps), from_cache (-> the model's tokens:
    (B, h, w) ids or (B, h, w, D) vectors) and decode (tokens -> uint8 images)."""
    from_cache = staticmethod(lambda x, generator: x)  # the cache keeps the tokens themselves (the VAE: moments)


class PixelTokenizer(Tokenizer):
    """A token per pixel: the index of its nearest colour in palette (K, 3) uint8 (squared distance, ties to the later
    colour), or in the 3-bit cube (palette None): r << 6 | g << 3 | b at the centres of their bins, whose nearest
    colour is the top 3 bits of each channel, computed so."""

    def __init__(self, palette=None):
        steps = torch.arange(8) * 32 + 16  # the centre of each 3-bit bin
        cube = torch.stack(torch.meshgrid(steps, steps, steps, indexing='ij'), -1).view(512, 3)
        self.palette = cube.to(torch.uint8) if palette is None else torch.as_tensor(palette, dtype=torch.uint8)
        self.cube, self.vocab_size = palette is None, len(self.palette)

    def encode(self, images):  # (B, H, W, 3) uint8 -> (B, H, W) int64
        if self.cube:
            q = images.long() >> 5  # (B, H, W, 3) each channel's bin in [0, 8)
            return (q[..., 0] << 6) | (q[..., 1] << 3) | q[..., 2]
        x, c = images.reshape(-1, 3).float(), self.palette.float()  # (P, 3), (K, 3)
        # squared distances less |x|^2 (exact integers), 16384 pixels at a time; ties to the later colour
        near = [len(c) - 1 - ((c ** 2).sum(1) - 2 * part @ c.T).flip(1).argmin(1) for part in x.split(16384)]
        return torch.cat(near).view(images.shape[:-1])

    def decode(self, tokens):  # (B, H, W) -> (B, H, W, 3) uint8
        return self.palette.to(tokens.device)[tokens]


def fit_palette(pixels, size, seed=0, iters=10):
    """At most `size` colours (K, 3) uint8 for pixels (P, 3) uint8: their own when no more (exact), else k-means in
    RGB (k-means++ seeding, colours weighted by count), as iGPT's 512 clusters."""
    colours, counts = np.unique(pixels, axis=0, return_counts=True)  # (U, 3), (U,)
    if len(colours) <= size:
        return colours
    rng, x, w = np.random.default_rng(seed), colours.astype(np.float64), counts.astype(np.float64)
    centres = [x[rng.choice(len(x), p=w / w.sum())]]
    d = ((x - centres[0]) ** 2).sum(1)
    for _ in range(size - 1):  # k-means++: the next centre drawn in proportion to its squared distance
        centres.append(x[rng.choice(len(x), p=w * d / (w * d).sum())])
        d = np.minimum(d, ((x - centres[-1]) ** 2).sum(1))
    c = np.array(centres)  # (K, 3)
    for _ in range(iters):  # Lloyd's: each colour to its nearest centre, each centre to its colours' weighted mean
        parts = np.array_split(x, len(x) // 16384 + 1)  # squared distances less |x|^2, a part at a time
        near = np.concatenate([((c ** 2).sum(1) - 2 * part @ c.T).argmin(1) for part in parts])
        n = np.bincount(near, w, size)[:, None]
        c = np.where(n > 0, np.stack([np.bincount(near, w * x[:, j], size) for j in range(3)], 1) / np.maximum(n, 1), c)
    return np.unique(np.clip(np.round(c), 0, 255).astype(np.uint8), axis=0)


class PixelPatchTokenizer(Tokenizer):
    """Continuous tokens: each p x p x 3 patch scaled to [-1, 1] is one token of 3 p^2 values (32x32 -> 16x16 x 12)."""

    clip_denoised = True  # bounded tokens: the diffusion sampler may clip its x0 estimate to [-1, 1]

    def __init__(self, patch_size=2):
        self.p, self.token_dim = patch_size, 3 * patch_size ** 2

    def encode(self, images):  # (B, H, W, 3) uint8 -> (B, H/p, W/p, 3 p^2) in [-1, 1]
        B, H, W, _ = images.shape
        x = images.float().div(127.5).sub(1).view(B, H // self.p, self.p, W // self.p, self.p, 3)
        return x.permute(0, 1, 3, 2, 4, 5).reshape(B, H // self.p, W // self.p, self.token_dim)

    def decode(self, tokens):  # (B, h, w, 3 p^2) -> (B, h p, w p, 3) uint8
        B, h, w, _ = tokens.shape
        x = tokens.float().view(B, h, w, self.p, self.p, 3).permute(0, 1, 3, 2, 4, 5)  # (B, h, p, w, p, 3)
        return x.reshape(B, h * self.p, w * self.p, 3).add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8)


# -----------------------------------------------------------------------------
# The reconstruction tokenizers: LlamaGen's VQ-16 and MAR's KL-16 VAE. Both are the taming-transformers / LDM
# autoencoder (ch 128, ch_mult (1, 1, 2, 2, 4): five levels, 16x downsampling, the same blocks); only their
# checkpoints' container names differ (LlamaGen tokenizer/tokenizer_image/vq_model.py, MAR models/vae.py), so the
# Encoder and Decoder take the names as arguments. Where a checkpoint has no weights, nn.Identity (no keys).


def group_norm(c):
    return nn.GroupNorm(32, c, eps=1e-6)  # 32 groups, eps 1e-6: Normalize() in both reference files


class ResnetBlock(nn.Module):
    """GroupNorm, swish, 3x3 conv, twice, plus a skip that is a 1x1 conv where the width changes."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.norm1, self.conv1 = group_norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = group_norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))  # the references' dropout has p = 0.0 in both models, left out
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions, with a residual; q, k, v and proj_out are 1x1 convs."""

    def __init__(self, c):
        super().__init__()
        self.norm = group_norm(c)
        self.q, self.k, self.v = nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 1)
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (conv(h).flatten(2).transpose(1, 2) for conv in (self.q, self.k, self.v))  # each (B, H*W, C)
        h = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C)) v, (B, H*W, C)
        return x + self.proj_out(h.transpose(1, 2).reshape(B, C, H, W))  # (B, H*W, C) -> (B, C, H, W)


class Resample(nn.Module):
    """Halve H and W (a zero column and row at the right and bottom, a 3x3 conv of stride 2), or double them
    (nearest-neighbour, then a 3x3 conv)."""

    def __init__(self, c, down):
        super().__init__()
        self.down, self.conv = down, nn.Conv2d(c, c, 3, stride=2 if down else 1, padding=0 if down else 1)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)) if self.down else F.interpolate(x, scale_factor=2.0, mode='nearest'))


class Level(nn.Module):
    """One resolution: ResnetBlocks ('res' in LlamaGen, 'block' in MAR), each followed by an AttnBlock if any."""

    def __init__(self, c_in, c_out, n_blocks, attn, res_name):
        super().__init__()
        self.res_name = res_name
        self.add_module(res_name, nn.ModuleList([ResnetBlock(c_out if i else c_in, c_out) for i in range(n_blocks)]))
        self.attn = nn.ModuleList([AttnBlock(c_out) if attn else nn.Identity() for _ in range(n_blocks)])

    def forward(self, h):
        for block, attn in zip(getattr(self, self.res_name), self.attn):
            h = attn(block(h))
        return h


def mid_block(c, names):
    """Res, Attn, Res at the lowest resolution, under the checkpoint's names for the three."""
    return nn.Sequential(OrderedDict(zip(names, [ResnetBlock(c, c), AttnBlock(c), ResnetBlock(c, c)])))


class Encoder(nn.Module):
    """Images (B, 3, H, W) -> (B, z_out, H/16, W/16): five levels of 2 ResnetBlocks, downsampling after each but the
    last, which alone has attention (LlamaGen's rule; MAR's attn_resolutions (16,) picks it too), then mid, out."""

    def __init__(self, z_out, levels_name, res_name, mid_names, ch=128, ch_mult=(1, 1, 2, 2, 4)):
        super().__init__()
        self.levels_name = levels_name  # the checkpoint's name: 'conv_blocks' in LlamaGen, 'down' in MAR
        widths, last = [ch] + [ch * m for m in ch_mult], len(ch_mult) - 1  # 128, 128, 128, 256, 256, 512
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        levels = nn.ModuleList()
        for i in range(len(ch_mult)):
            levels.append(Level(widths[i], widths[i + 1], 2, i == last, res_name))  # num_res_blocks 2 in both
            levels[-1].downsample = Resample(widths[i + 1], down=True) if i < last else nn.Identity()
        self.add_module(levels_name, levels)
        self.mid = mid_block(widths[-1], mid_names)
        self.norm_out = group_norm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], z_out, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)  # (B, 128, H, W)
        for level in getattr(self, self.levels_name):
            h = level.downsample(level(h))
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))  # mid: (B, 512, H/16, W/16)


class Decoder(nn.Module):
    """Latents (B, z_in, h, w) -> images (B, 3, 16h, 16w): conv_in, mid, five levels of 3 ResnetBlocks from the lowest
    resolution up, upsampling after each but the last; only LlamaGen's lowest level has attention (`attn`)."""

    def __init__(self, z_in, attn, levels_name, lowest_first, res_name, mid_names, ch=128, ch_mult=(1, 1, 2, 2, 4)):
        super().__init__()
        self.levels_name = levels_name  # the checkpoint's name: 'conv_blocks' in LlamaGen, 'up' in MAR
        self.lowest_first = lowest_first  # LlamaGen's conv_blocks.0 is the lowest resolution, MAR's up.0 the highest
        widths, last = [ch * ch_mult[-1]] + [ch * m for m in reversed(ch_mult)], len(ch_mult) - 1  # 512, 512, ..128
        self.conv_in = nn.Conv2d(z_in, widths[0], 3, padding=1)
        self.mid = mid_block(widths[0], mid_names)
        levels = []  # in forward order, the lowest resolution first
        for i in range(len(ch_mult)):
            levels.append(Level(widths[i], widths[i + 1], 3, attn and i == 0, res_name))  # num_res_blocks + 1 = 3
            levels[-1].upsample = Resample(widths[i + 1], down=False) if i < last else nn.Identity()
        self.add_module(levels_name, nn.ModuleList(levels if lowest_first else levels[::-1]))
        self.norm_out = group_norm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], 3, 3, padding=1)

    def forward(self, z):
        h, levels = self.mid(self.conv_in(z)), getattr(self, self.levels_name)  # (B, 512, h, w)
        for level in (levels if self.lowest_first else reversed(levels)):
            h = level.upsample(level(h))
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, 3, 16h, 16w)


def nearest_code(z, codebook):
    """Indices (B, h, w) of the codes nearest to the latents z (B, D, h, w) by cosine similarity, as LlamaGen's
    VectorQuantizer with codebook_l2_norm: both are L2-normalised, then the squared distance is minimised."""
    B, D, h, w = z.shape
    z = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, D), dim=-1)  # (B, D, h, w) -> (B*h*w, D), rows in raster order
    e = F.normalize(codebook, dim=-1)  # (n_codes, D)
    d = (z ** 2).sum(1, keepdim=True) + (e ** 2).sum(1) - 2 * z @ e.T  # (B*h*w, n_codes) = 2 - 2 cos; LlamaGen's form
    return d.argmin(dim=1).view(B, h, w)  # (B*h*w,) -> (B, h, w); ties go to the first code, as torch.argmin


class VQModel(nn.Module):
    """LlamaGen's VQ-16 (vq_ds16_c2i.pt): images <-> a grid of indices into 16384 L2-normalised codes of 8 dims."""

    vocab_size = 16384  # codebook_size of VQ-16 (LlamaGen ModelArgs)

    def __init__(self):
        super().__init__()
        names = dict(res_name='res', mid_names=('0', '1', '2'))  # LlamaGen's Encoder/Decoder names
        self.encoder = Encoder(256, levels_name='conv_blocks', **names)  # z_channels 256
        self.decoder = Decoder(256, attn=True, levels_name='conv_blocks', lowest_first=True, **names)
        self.quantize = nn.Module()  # a container, for the key quantize.embedding.weight
        self.quantize.embedding = nn.Embedding(16384, 8)  # codebook_size 16384, codebook_embed_dim 8
        self.quant_conv = nn.Conv2d(256, 8, 1)
        self.post_quant_conv = nn.Conv2d(8, 256, 1)

    @torch.no_grad()
    def encode(self, x):
        """Images (B, 3, H, W) in [-1, 1] -> indices (B, H/16, W/16); 1 GiB of distances for 64 of 256x256."""
        return nearest_code(self.quant_conv(self.encoder(x)), self.quantize.embedding.weight)

    @torch.no_grad()
    def decode(self, idx):
        """Indices (B, h, w) -> images (B, 3, 16h, 16w), about [-1, 1] (the model does not clamp)."""
        codes = F.normalize(self.quantize.embedding.weight, dim=-1)  # LlamaGen normalises the table at every use
        z = codes[idx].permute(0, 3, 1, 2).contiguous()  # (B, h, w, 8) -> (B, 8, h, w), not left as channels_last
        return self.decoder(self.post_quant_conv(z))


VAE_SCALE = 0.2325  # latent scale of MAR's KL-16 VAE, "to normalize the std of latent to be 1" (MAR engine_mar.py)


class AutoencoderKL(nn.Module):
    """MAR's KL-16 VAE (kl16.ckpt): images <-> 16-channel Gaussian latents at 1/16 resolution (MAR's class name)."""

    token_dim = 16  # embed_dim of KL-16 (MAR --vae_embed_dim)

    def __init__(self):
        super().__init__()
        names = dict(res_name='block', mid_names=('block_1', 'attn_1', 'block_2'))  # MAR's Encoder/Decoder names
        self.encoder = Encoder(2 * 16, levels_name='down', **names)  # double_z: a mean and a log-variance per channel
        self.decoder = Decoder(16, attn=False, levels_name='up', lowest_first=False, **names)
        self.quant_conv = nn.Conv2d(2 * 16, 2 * 16, 1)
        self.post_quant_conv = nn.Conv2d(16, 16, 1)

    @torch.no_grad()
    def encode_moments(self, x):
        """Images (B, 3, H, W) in [-1, 1] -> posterior moments (B, 32, H/16, W/16): mean then logvar, not scaled."""
        return self.quant_conv(self.encoder(x))

    @torch.no_grad()
    def decode(self, latents):
        """Scaled latents (B, 16, h, w) -> images (B, 3, 16h, 16w), about [-1, 1] (the model does not clamp)."""
        return self.decoder(self.post_quant_conv(latents / VAE_SCALE))


def sample_latent(moments, generator, dim=1):
    """A scaled latent from the posterior of moments (mean, log-variance along `dim`), as MAR trains on it (engine_mar
    posterior.sample().mul_(0.2325)); the noise from `generator` on the moments' device (MAR's: drawn on the CPU)."""
    mean, logvar = moments.float().chunk(2, dim=dim)  # 16 channels each: the mean first, then the log-variance
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))  # the clamp of MAR's DiagonalGaussianDistribution
    noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return (mean + std * noise) * VAE_SCALE


RECONSTRUCTION_TOKENIZERS = {  # name: (class, what the file must be)
    'vq': (VQModel, "a LlamaGen VQ-16 checkpoint (vq_ds16_c2i.pt) with a 'model' state dict"),
    'vae': (AutoencoderKL, "a MAR KL-16 checkpoint (kl16.ckpt) with a 'model' state dict"),
}


def load_tokenizer(name, path, device='cpu'):
    """The 'vq' or 'vae' model with the released weights at path (checkpoint['model']), in eval mode on device."""
    cls, expected = RECONSTRUCTION_TOKENIZERS[name]
    ckpt = read_torch(path, 'torch checkpoint', f"; expected {expected}")
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get('model'), dict):
        found = f"top-level keys {sorted(map(str, ckpt))[:5]}" if isinstance(ckpt, dict) else type(ckpt).__name__
        raise SystemExit(f"error: {path}: expected {expected}, found {found}")
    sd = dict(ckpt['model'])  # other top-level keys (optimizer, steps, args, ema) are training state
    sd.pop('quantize.codebook_used', None)  # LlamaGen's training-only usage counter (the last 65536 codes chosen)
    model = load_weights(cls(), sd, path, f"expected {expected}; its weights", "the file is damaged; download it again")
    return model.to(device).eval().requires_grad_(False)


def to_unit_range(images, model):
    """uint8 images (B, H, W, 3) -> (B, 3, H, W) in [-1, 1] on the model's device (ToTensor, Normalize(0.5, 0.5))."""
    return images.to(next(model.parameters()).device).permute(0, 3, 1, 2).float().div(127.5).sub(1)


class VQTokenizer(Tokenizer):
    """LlamaGen's VQ-16 as a tokenizer: uint8 images <-> (B, H/16, W/16) code indices."""

    vocab_size = VQModel.vocab_size

    def __init__(self, ckpt, device='cpu'):
        self.model = load_tokenizer('vq', ckpt, device)

    def encode(self, images):
        return self.model.encode(to_unit_range(images, self.model))  # (B, h, w) int64

    def decode(self, tokens):  # LlamaGen's sample_c2i_ddp.py: clamp(127.5 x + 128, 0, 255) as uint8
        x = self.model.decode(tokens.to(self.model.quant_conv.weight.device))  # (B, 3, H, W) about [-1, 1]
        return torch.clamp(127.5 * x + 128.0, 0, 255).permute(0, 2, 3, 1).to('cpu', torch.uint8)


class VAETokenizer(Tokenizer):
    """MAR's KL-16 VAE as a tokenizer: uint8 images -> posterior moments (what the cache keeps) -> scaled 16-d latents
    sampled afresh at every use, as MAR trains (B, H/16, W/16, 16) -> images."""

    token_dim = AutoencoderKL.token_dim
    clip_denoised = False  # latents are unbounded: MAR's sampler does not clip

    def __init__(self, ckpt, device='cpu'):
        self.model = load_tokenizer('vae', ckpt, device)

    def encode(self, images):
        return self.model.encode_moments(to_unit_range(images, self.model)).permute(0, 2, 3, 1)  # (B, h, w, 32)

    @staticmethod
    def from_cache(moments, generator):
        return sample_latent(moments, generator, dim=-1)  # (B, h, w, 16)

    def decode(self, tokens):  # MAR's evaluate: round(clip((x + 1) / 2) * 255) as uint8
        x = self.model.decode(tokens.permute(0, 3, 1, 2).to(self.model.quant_conv.weight.device))  # (B, 3, H, W)
        return torch.round(((x + 1) / 2).clamp(0, 1) * 255).permute(0, 2, 3, 1).to('cpu', torch.uint8)


# the tokenizers by name; vq and vae need their released weights (--ckpt)
TOKENIZERS = {'pixel': PixelTokenizer, 'pixel_patch': PixelPatchTokenizer, 'vq': VQTokenizer, 'vae': VAETokenizer}
DOWNSAMPLING = {'pixel': 1, 'pixel_patch': 2, 'vq': 16, 'vae': 16}  # image size / token grid size


def make_tokenizer(name, ckpt=None, device='cpu', colours=None):
    """The tokenizer `name`: vq and vae with their weights, pixel with its fitted palette (meta.json and checkpoints
    keep it: `colours`) or the cube."""
    if name in RECONSTRUCTION_TOKENIZERS:
        if ckpt is None:
            raise SystemExit(f"error: --tokenizer {name} needs its released weights: --ckpt " + (
                'vq_ds16_c2i.pt (FoundationVision/LlamaGen)' if name == 'vq' else 'kl16.ckpt (LTH14/mar)'))
        return TOKENIZERS[name](ckpt, device)
    return PixelTokenizer(colours) if name == 'pixel' else PixelPatchTokenizer()


def token_meta(name, colours=None):
    """What the model needs to know of the tokens: a vocabulary (discrete) or a dimension (continuous)."""
    tok = TOKENIZERS[name] if name in RECONSTRUCTION_TOKENIZERS else make_tokenizer(name, colours=colours)  # no weights
    if hasattr(tok, 'vocab_size'):
        return {'vocab_size': tok.vocab_size}
    return {'token_dim': tok.token_dim, 'clip_denoised': tok.clip_denoised}


# -----------------------------------------------------------------------------
# The built-in data: coloured shapes, one shape kind per class

SHAPE_CLASSES = ['disc', 'ring', 'square', 'frame', 'triangle', 'plus', 'cross', 'h_stripes', 'v_stripes', 'diamond']
# saturated colours that the 3-bit palette represents exactly (up to the bin centre)
COLOURS = torch.tensor([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [255, 0, 255], [0, 255, 255],
                        [255, 255, 255], [255, 128, 0], [128, 0, 255], [0, 128, 255]], dtype=torch.uint8)
BUILT_IN = ('shapes', 'pairs')  # --data names of the datasets make_shapes draws


def shape_masks(kind, cx, cy, r, size):
    """Boolean masks (M, size, size) of one shape kind with centres (cx, cy) and radii r, all (M,) floats."""
    y, x = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing='ij')  # pixel centres
    dx, dy, r = x - cx[:, None, None], y - cy[:, None, None], r[:, None, None]  # (M, size, size) from each centre
    d2, arm = dx ** 2 + dy ** 2, torch.clamp(r / 3, min=1.0)  # arm: half-width of bars and rings
    inside = (dx.abs() <= r) & (dy.abs() <= r)  # the bounding square of the shape
    return {'disc': lambda: d2 <= r ** 2,
            'ring': lambda: (d2 <= r ** 2) & (d2 >= (r - 1.5 * arm) ** 2),
            'square': lambda: inside,
            'frame': lambda: inside & ((dx.abs() > r - arm) | (dy.abs() > r - arm)),
            'triangle': lambda: inside & (dx.abs() <= (dy + r) / 2),  # apex up, base at the bottom of the square
            'plus': lambda: inside & ((dx.abs() <= arm / 1.5) | (dy.abs() <= arm / 1.5)),
            'cross': lambda: inside & (((dx - dy).abs() <= arm) | ((dx + dy).abs() <= arm)),
            'h_stripes': lambda: ((y // 2) % 2 == 0).expand_as(d2).clone(),
            # columns 1-2, 5-6, ...: the mirror image (which training also sees) is the same
            'v_stripes': lambda: (((x + 0.5) // 2) % 2 == 1).expand_as(d2).clone(),
            'diamond': lambda: dx.abs() + dy.abs() <= r}[kind]()


def make_shapes(num_images, size=16, seed=0, pairs=False):
    """The built-in data: (images (M, size, size, 3) uint8, labels (M,)), deterministic in seed. 'shapes': a shape of
    the class, centred, of random scale, in one of 10 colours on black; pairs=True, harder: two shapes of the class
    side by side, each at its own height and scale, in one colour, so that the two halves must agree."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_images) % len(SHAPE_CLASSES)
    u = torch.rand(3, 2 if pairs else 1, num_images, generator=g)  # (3, copies, M) uniform draws
    if pairs:  # in the left and the right half, the centre's height and the radius free
        cx = size * (torch.tensor([[0.25], [0.75]]) + 0.1 * (u[0] - 0.5))  # (2, M)
        cy, r = size * (0.5 + 0.4 * (u[1] - 0.5)), size * (0.14 + 0.08 * u[2])  # radius 14%..22%
    else:
        cx = cy = torch.full_like(u[0], size / 2)  # (1, M) centred
        r = size * (0.25 + 0.15 * u[2])  # radius 25%..40% of the image
    fg = torch.randint(len(COLOURS), (num_images,), generator=g)
    images = torch.empty(num_images, size, size, 3, dtype=torch.uint8)
    for k, kind in enumerate(SHAPE_CLASSES):
        i = (labels == k).nonzero()[:, 0]
        mask = torch.stack([shape_masks(kind, x[i], y[i], z[i], size) for x, y, z in zip(cx, cy, r)]).any(0)
        images[i] = torch.where(mask[..., None], COLOURS[fg[i]][:, None, None], 0)  # (m, size, size, 3) on black
    perm = torch.randperm(num_images, generator=g)  # interleave classes
    return images[perm], labels[perm]


class RandomTokens:
    """An ImageNet token cache's stand-in: random tokens (2, 16, 16[, D]) of any row, drawn from the row index, so that
    --bench and --dry_run run the paper's shapes without data."""

    num_images, num_classes, grid_size = 1281167, 1000, 16  # ImageNet-1k train, 256x256 images as 16x16 tokens

    def __init__(self, tokenizer):
        self.meta = dict(tokenizer=tokenizer, image_size=self.grid_size * DOWNSAMPLING[tokenizer],
                         grid_size=self.grid_size, num_classes=self.num_classes,
                         classes=[str(k) for k in range(self.num_classes)], **token_meta(tokenizer))
        dim = self.meta.get('token_dim', 0) * (2 if tokenizer == 'vae' else 1)  # the VAE cache keeps mean and logvar
        self.shape = (2, self.grid_size, self.grid_size) + ((dim,) if dim else ())

    def __len__(self):
        return self.num_images

    def __getitem__(self, rows):
        rng = np.random.default_rng(int(rows[0]))
        if 'vocab_size' in self.meta:
            return rng.integers(self.meta['vocab_size'], size=(len(rows), *self.shape), dtype=np.uint16)
        return rng.standard_normal((len(rows), *self.shape), dtype=np.float32).astype(np.float16)


def load_dataset(data, tokenizer='pixel', num_images=10000, seed=0):
    """(tokens (M, 2, h, w[, D]), labels (M,), meta), axis 1 each image and its mirror: the built-in data ('shapes',
    'pairs'; drawn and tokenized here, on the cube), random tokens ('random') or a cache directory."""
    if data == 'random':
        tokens = RandomTokens(tokenizer)
        return tokens, np.arange(len(tokens)) % tokens.num_classes, tokens.meta
    if data in BUILT_IN:  # drawn at the size that gives a 16x16 token grid
        if tokenizer not in ('pixel', 'pixel_patch'):
            raise SystemExit(f"error: --data {data} is drawn for the pixel tokenizers; for --tokenizer {tokenizer}, "
                             f"cache an ImageFolder: python tokenizers.py cache --tokenizer {tokenizer} --ckpt ...")
        image_size = 16 * DOWNSAMPLING[tokenizer]
        images, labels = make_shapes(num_images, size=image_size, seed=seed, pairs=data == 'pairs')
        meta = dict(tokenizer=tokenizer, image_size=image_size, grid_size=16, num_classes=len(SHAPE_CLASSES),
                    classes=SHAPE_CLASSES, **token_meta(tokenizer))
        return cache_array(encode_with_mirror(make_tokenizer(tokenizer), images)), labels.numpy(), meta
    if not os.path.isdir(data):
        raise SystemExit(f"error: --data {data}: no such directory; use --data shapes (built-in) or make a cache "
                         f"with `python tokenizers.py cache --data IMAGEFOLDER --out {data}`")
    meta = read_meta(data)
    if meta is None:  # often the image folder itself: its cache belongs next to it, not inside
        out = os.path.normpath(data) + '_cache'
        raise SystemExit(f"error: --data {data}: not a cache (no meta.json); if it is an image folder "
                         f"(DIR/<class>/<image>), cache it first with `python tokenizers.py cache --data {data} "
                         f"--out {out}` and train with --data {out}; or use --data shapes")
    tokens = TokenCache(data, meta)
    return tokens, tokens.labels, meta


# -----------------------------------------------------------------------------
# ImageFolder reading and the token cache

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff', '.ppm')
CACHE_FILE = re.compile(r'meta\.json|(tokens|labels)_\d{5}\.npy')  # what cache() writes in --out
PALETTE_IMAGES, PALETTE_PIXELS = 10000, 4096  # the palette: of up to 4096 pixels (64x64) of 10,000 images


def center_crop_arr(pil_image, image_size):
    """ADM's centre crop (guided-diffusion image_datasets.py, used by MAR and LlamaGen): halve with a box filter while
    the short side is >= 2x the target, resize it to image_size (bicubic), crop the centre."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    arr = np.array(pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC))
    top, left = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return arr[top:top + image_size, left:left + image_size]


def to_rgb(im):
    """A Pillow image of any mode as 8-bit RGB; 16-bit ('I;16', 'I') and float ('F') greys, which convert('RGB') clips
    to black or white, scaled from [0, 65535] and [0, 1]."""
    if im.mode.startswith('I') or im.mode == 'F':
        x, top = np.asarray(im, dtype=np.float64), 1.0 if im.mode == 'F' else 65535.0
        if not (x.min() >= 0 and x.max() <= top):  # NaN fails too
            raise ValueError(f"mode {im.mode} values in [{x.min():g}, {x.max():g}]; only [0, {top:g}] is read")
        im = Image.fromarray(np.round(x * (255 / top)).astype(np.uint8))  # grey, mode 'L'
    return im.convert('RGB')


def list_image_folder(root):
    """(paths, labels, class_names) of an ImageFolder, a subdirectory per class, sorted; other files are skipped,
    saying so."""
    if not os.path.isdir(root):
        raise SystemExit(f"error: --data {root}: no such directory (expected an ImageFolder DIR/<class>/<image>)")
    classes = sorted(d.name for d in os.scandir(root) if d.is_dir())
    if not classes:
        raise SystemExit(f"error: --data {root}: no class subdirectories (expected DIR/<class>/<image>)")
    paths, labels = [], []
    for k, c in enumerate(classes):
        files = sorted(f.path for f in os.scandir(os.path.join(root, c)) if f.is_file())
        for p in files:
            if not p.lower().endswith(IMAGE_EXTENSIONS):
                print(f"skipping {p}: not an image file extension", file=sys.stderr)
        files = [p for p in files if p.lower().endswith(IMAGE_EXTENSIONS)]
        if not files:
            raise SystemExit(f"error: --data {root}: class folder '{c}' has no image files")
        paths, labels = paths + files, labels + [k] * len(files)
    return paths, labels, classes


def files_sha256(root, paths):
    """A digest of the files' relative paths and sizes (not contents: reading ImageNet twice is slow), so that a cache
    is continued only over the same files."""
    h = hashlib.sha256()
    for p in paths:
        h.update(f"{os.path.relpath(p, root)}\t{os.path.getsize(p)}\n".encode())
    return h.hexdigest()[:16]  # 64 bits: enough to tell two file lists apart


def encode_with_mirror(tokenizer, images):
    """What the cache keeps of uint8 images (B, H, W, 3) and their mirrors, (B, 2, h, w[, D]): MAR caches both."""
    return torch.stack(tokenizer.encode(torch.cat([images, images.flip(2)])).chunk(2), dim=1)


def cache_array(tokens):
    """Tokens as stored: ids as uint16 (vocabularies up to 65536), vectors and VAE moments as float16."""
    return tokens.cpu().numpy().astype(np.uint16 if tokens.dtype == torch.long else np.float16)


class ImageFiles(torch.utils.data.Dataset):
    """(centre-cropped uint8 image or None if unreadable, label, path or why it is unreadable), for a DataLoader."""

    def __init__(self, paths, labels, image_size):
        self.paths, self.labels, self.image_size = paths, labels, image_size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            with Image.open(self.paths[i]) as im:
                return center_crop_arr(to_rgb(im), self.image_size), self.labels[i], self.paths[i]
        # truncated, corrupt or unknown files, values out of range, and headers over Pillow's 2 x MAX_IMAGE_PIXELS
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            return None, self.labels[i], f"{self.paths[i]}: {e}"


def cache(args):
    """Tokenize an ImageFolder into CACHE/meta.json and shards of (images, 2, h, w[, D]) tokens, each image with its
    mirror (training picks one), and labels. Under torchrun rank 0 holds the folder and writes meta.json (with a
    fitted palette) before any rank writes a shard, rank r taking shards r, r + world, ...; a shard is written whole
    or not at all, so a killed run continues where it stopped, with any number of processes."""
    check_cache_args(args)
    ddp, rank, world = setup_distributed()
    device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else 'cpu'
    # vq and vae with their weights now: a missing or broken --ckpt must not leave a meta.json behind
    weighted = args.tokenizer in RECONSTRUCTION_TOKENIZERS
    tokenizer = make_tokenizer(args.tokenizer, args.ckpt, device) if weighted else None
    paths, labels, classes = list_image_folder(args.data)
    # everything that decides what the shards hold, so that a rerun continues only the same cache
    meta = dict(tokenizer=args.tokenizer, ckpt=args.ckpt and os.path.abspath(args.ckpt), image_size=args.image_size,
                grid_size=args.image_size // DOWNSAMPLING[args.tokenizer], num_classes=len(classes),
                classes=classes, num_shards=math.ceil(len(paths) / args.shard_size), shard_size=args.shard_size,
                num_files=len(paths), files_sha256=files_sha256(args.data, paths),
                **(dict(palette=args.palette, palette_size=args.palette_size) if args.tokenizer == 'pixel' else {}))
    make_folder(args.out, '--out')
    with hold_lock(args.out) if rank == 0 else contextlib.nullcontext():
        error = [None]
        if rank == 0:
            try:
                start_cache(args, meta, paths, labels)
            except SystemExit as e:  # the other ranks stop with the same line
                error = [str(e.code)]
        if ddp:
            dist.broadcast_object_list(error)  # also the barrier: no shard before meta.json
        if error[0]:
            raise SystemExit(error[0])
        meta = read_meta(args.out)  # with the palette
        tokenizer = tokenizer or make_tokenizer(args.tokenizer, None, device, meta.get('colours'))
        for k in range(rank, meta['num_shards'], world):
            encode_shard(args, k, tokenizer, paths, labels)
        if ddp:
            dist.barrier()  # every rank's shards are written
        if rank == 0:  # the checks training makes, so that a cache it would refuse fails here
            print(f"cache {args.out} complete: {len(TokenCache(args.out, meta))} images of {len(classes)} classes")
    if ddp:
        dist.destroy_process_group()


def start_cache(args, meta, paths, labels):
    """Rank 0, before any shard: continue a cache the same arguments and files began (same meta.json, and its fitted
    palette), or begin one (--rebuild deletes the old), fitting the palette and writing meta.json."""
    fitted = meta.get('palette') == 'fit'  # then the colours and vocabulary come from the data, below
    if not fitted:
        meta.update(token_meta(args.tokenizer))
    ours, old = [f for f in os.listdir(args.out) if CACHE_FILE.fullmatch(f)], read_meta(args.out)
    if ours and not args.rebuild:
        differ = ['no meta.json'] if old is None else [
            f"{k} {old.get(k)} -> {meta.get(k)}" if len(f"{old.get(k)}{meta.get(k)}") < 200 else k
            for k in dict.fromkeys([*meta, *old]) if old.get(k) != meta.get(k)
            and not (fitted and k in ('colours', 'vocab_size'))]
        if differ:
            raise SystemExit(f"error: --out {args.out} holds a cache made from other arguments or files "
                             f"({', '.join(differ)}); write to another --out, or add --rebuild to encode it afresh")
        return
    for f in ours:
        os.remove(os.path.join(args.out, f))
    if meta.get('palette') == 'fit':  # on up to PALETTE_PIXELS pixels of up to PALETTE_IMAGES images, seeded
        rng, files, pixels, t0 = np.random.default_rng(0), ImageFiles(paths, labels, args.image_size), [], time.time()
        for image, _, what in (files[i] for i in rng.permutation(len(paths))[:PALETTE_IMAGES]):
            if image is not None:  # unreadable files are reported when encoded
                pixels.append(image.reshape(-1, 3)[rng.permutation(image.shape[0] * image.shape[1])[:PALETTE_PIXELS]])
        if not pixels:
            raise SystemExit(f"error: --data {args.data}: no image read to fit the palette is readable ({what})")
        meta['colours'] = fit_palette(np.concatenate(pixels), args.palette_size).tolist()
        print(f"palette: {len(meta['colours'])} colours fitted in {time.time() - t0:.0f}s", flush=True)
        meta.update(token_meta(args.tokenizer, meta['colours']))
    write_atomic(os.path.join(args.out, 'meta.json'), lambda f: f.write(json.dumps(meta, indent=1).encode()))


def encode_shard(args, k, tokenizer, paths, labels):
    """Write shard k: its images' tokens, then their labels (last: marks it done); a readable one is kept."""
    if os.path.exists(shard_path(args.out, k, 'labels')):  # written last: marks it done
        try:
            return read_shard(args.out, k)  # finished by an earlier run
        except ValueError as e:  # cut short or missing its tokens: encoded again
            print(f"re-encoding shard {k}: {e}", file=sys.stderr)
    part = slice(k * args.shard_size, (k + 1) * args.shard_size)
    loader = torch.utils.data.DataLoader(ImageFiles(paths[part], labels[part], args.image_size), args.batch_size,
                                         num_workers=args.workers, collate_fn=list)  # keeps None
    # an empty batch first gives a shard whose files are all unreadable its shape (0, 2, h, w[, D])
    none = torch.zeros(0, args.image_size, args.image_size, 3, dtype=torch.uint8)
    tokens, kept, t0 = [cache_array(encode_with_mirror(tokenizer, none))], [], time.time()
    for i, batch in enumerate(loader):
        for image, _, what in batch:
            if image is None:
                print(f"skipping {what}", file=sys.stderr)
        if batch := [b for b in batch if b[0] is not None]:
            images = torch.from_numpy(np.stack([b[0] for b in batch]))  # (B, H, W, 3) uint8
            tokens.append(cache_array(encode_with_mirror(tokenizer, images)))  # (B, 2, h, w[, D])
            kept += [b[1] for b in batch]
        if i % 20 == 0 or i == len(loader) - 1:
            print(f"shard {k + 1}/{math.ceil(len(paths) / args.shard_size)}: {len(kept)} images, "
                  f"{len(kept) / (time.time() - t0):.1f} images/s", flush=True)
    save_array(shard_path(args.out, k, 'tokens'), np.concatenate(tokens))
    save_array(shard_path(args.out, k, 'labels'), np.array(kept, dtype=np.int64))  # last: marks it done


def shard_path(out, k, what):
    return os.path.join(out, f'{what}_{k:05d}.npy')


def save_array(path, array):
    write_atomic(path, lambda f: np.save(f, array), 'rerun the same command to continue the cache')


def read_shard(out, k):
    """(tokens memory-mapped, labels) of shard k, or a ValueError naming the file that is missing or cut short."""
    arrays = []
    for what in ('tokens', 'labels'):
        try:
            arrays.append(np.load(shard_path(out, k, what), mmap_mode='r'))  # a file cut short fails to map
        except (OSError, ValueError, EOFError) as e:  # missing, cut short, or not an .npy file
            raise ValueError(f"{shard_path(out, k, what)} is unreadable ({e})") from None
    if len(arrays[0]) != len(arrays[1]):
        raise ValueError(f"{shard_path(out, k, 'tokens')} holds {len(arrays[0])} images but its labels file "
                         f"{len(arrays[1])}")
    return arrays[0], np.array(arrays[1])


class TokenCache:
    """A cache's shards, memory-mapped and indexed as one (M, 2, h, w[, D]) array (only the rows read are loaded);
    shards that disagree with meta.json are refused in one line."""

    def __init__(self, path, meta):
        missing = [k for k in range(meta['num_shards']) if not os.path.exists(shard_path(path, k, 'labels'))]
        if missing:
            raise SystemExit(f"error: cache {path}: shards {missing[:5]} of {meta['num_shards']} are not written yet; "
                             f"finish the cache (rerun the same `tokenizers.py cache` command)")
        try:
            shards = [read_shard(path, k) for k in range(meta['num_shards'])]
        except ValueError as e:
            raise SystemExit(f"error: cache {path}: {e}; rerun the `tokenizers.py cache` command that made it, "
                             f"which re-encodes a broken shard") from None
        self.shards, self.labels = [t for t, _ in shards], np.concatenate([labels for _, labels in shards])
        self.offsets = np.cumsum([0] + [len(t) for t in self.shards])
        g, dtype = meta['grid_size'], np.dtype(np.uint16 if 'vocab_size' in meta else np.float16)
        remake = "rerun its `tokenizers.py cache` command with --rebuild"
        for k, t in enumerate(self.shards):
            if t.shape[1:4] != (2, g, g) or t.shape[1:] != self.shards[0].shape[1:] or t.dtype != dtype:
                raise SystemExit(f"error: cache {path}: {shard_path(path, k, 'tokens')} holds {t.dtype} tokens "
                                 f"{t.shape[1:]}, not the {dtype} {g}x{g} grids of its meta.json; {remake}")
        counts = np.bincount(self.labels, minlength=meta['num_classes'])  # cache() writes class indices >= 0
        if len(counts) > meta['num_classes']:
            raise SystemExit(f"error: cache {path}: labels beyond the {meta['num_classes']} classes of meta.json; "
                             f"{remake}")
        # refused, not dropped: dropping a class would shift the labels of the classes after it
        if empty := [c for c, count in zip(meta['classes'], counts) if count == 0]:
            raise SystemExit(f"error: cache {path}: no image of class {', '.join(empty[:3])}: every file was skipped "
                             f"when cached (the reasons were printed then); fix or remove them, then {remake}")

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, rows):  # rows: sorted int array
        shard = np.searchsorted(self.offsets, rows, side='right') - 1  # an empty shard k shares its offset with k + 1
        return np.concatenate([self.shards[k][rows[shard == k] - self.offsets[k]] for k in np.unique(shard)])


def read_meta(path):
    """CACHE/meta.json as a dict, None if there is none."""
    if os.path.isfile(os.path.join(path, 'meta.json')):
        with open(os.path.join(path, 'meta.json')) as f:
            return json.load(f)


def setup_distributed():
    """(ddp, rank, world_size): under torchrun a gloo process group, for the barriers; a single process otherwise."""
    if int(os.environ.get('WORLD_SIZE', 1)) == 1:
        return False, 0, 1
    if 'MASTER_ADDR' not in os.environ:
        raise SystemExit("error: WORLD_SIZE > 1 without MASTER_ADDR: start several processes with torchrun")
    dist.init_process_group(backend='gloo')
    return True, dist.get_rank(), dist.get_world_size()


# -----------------------------------------------------------------------------
# Files and reports every script shares: one home each


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help of every script: the module docstring's usage lines as written, and each flag's default."""

    def _get_help_string(self, action):
        return action.help if action.default is None or action.default is False else super()._get_help_string(action)


def one_line(e):
    return f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"


def temporary(path):
    """The name a file is written under before its rename to path: per process, so two never share one."""
    return f"{path}.{os.getpid()}.tmp"


def write_atomic(path, write, advice=''):
    """write(f) into a temporary file beside path, then renamed to path: written whole or not at all, and what path
    held stays until then. A disk error (full, read-only, no permission) stops in one line naming the path."""
    tmp = temporary(path)
    try:
        with open(tmp, 'wb') as f:
            write(f)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise SystemExit(f"error: writing {path}: {e.strerror or e}{'; ' + advice if advice else ''}") from None
        raise


def make_folder(path, flag):
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"error: {flag} {path}: cannot write there ({e.strerror or e}); choose another") from None


def remove_partial_files(folder, prefix=''):
    """Delete the temporary files (see temporary) of names beginning with prefix that a killed writer left in folder."""
    for name in os.listdir(folder):
        if name.startswith(prefix) and re.fullmatch(r'.+\.\d+\.tmp', name):
            os.remove(os.path.join(folder, name))


@contextlib.contextmanager
def hold_lock(folder):
    """folder/.lock held while the block runs, so that no second process writes there; the OS releases it when the
    process ends, even killed (fcntl.flock): no stale lock. Once held, a killed writer's partial files go."""
    try:
        f = open(os.path.join(folder, '.lock'), 'a')
    except OSError as e:
        raise SystemExit(f"error: {folder}: cannot write there ({e.strerror or e}); choose another folder") from None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise SystemExit(f"error: {folder} is in use by another running train.py, sample.py or cache; wait for "
                             f"it to end, or choose another folder") from None
        remove_partial_files(folder)
        yield


def read_torch(path, what, advice='', device='cpu'):
    """torch.load(path) without unpickling Python objects (weights_only), or one error line naming the file: the one
    reader of checkpoints and weights. `what`: the kind of file; advice: what was expected."""
    if os.path.isdir(path):  # what file: the advice, else a training run's
        raise SystemExit(f"error: {path} is a folder: pass a file in it{advice or f' ({path}/ckpt.pt for a run)'}")
    if not os.path.isfile(path):
        raise SystemExit(f"error: {path}: no such file{advice}")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for files it cannot read
        if 'Unsupported global' in str(e):  # e.g. the argparse Namespace 'args' that LlamaGen's vq_train.py saves
            slim = f"torch.save({{'model': torch.load('{path}', weights_only=False)['model']}}, 'slim.pt')"
            raise SystemExit(f"error: {path}: holds pickled Python objects besides tensors; if you trust the file, "
                             f"keep only its weights with: python -c \"import torch; {slim}\"") from None
        raise SystemExit(f"error: {path}: not a readable {what} ({type(e).__name__}){advice}") from None


def load_weights(model, state, path, what, damaged="the run that wrote them diverged; use an earlier checkpoint "
                 "(out_dir/ckpt_STEP.pt)"):
    """state, the state dict in the file path, into model strictly, or one error line naming the file, `what` it holds
    and the first missing, unexpected, wrongly shaped or non-finite entries (then `damaged` says what to do)."""
    own, state = model.state_dict(), state if isinstance(state, dict) else {}

    def shape(v):
        return tuple(v.shape) if torch.is_tensor(v) else type(v).__name__

    def some(keys, kind):
        return f"{len(keys)} {kind} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
    problems = [some(keys, kind) for kind, keys in [
        ('missing', [k for k in own if k not in state]), ('unexpected', [k for k in state if k not in own]),
        ('wrongly shaped', [f"{k}: {shape(v)} in the file, {shape(own[k])} in the model" for k, v in state.items()
                            if k in own and shape(v) != shape(own[k])])] if keys]
    if problems:
        raise SystemExit(f"error: {path}: {what} do not fit the model: {'; '.join(problems)}")
    if bad := [k for k, v in state.items() if not v.isfinite().all()]:  # integer tensors are always finite
        raise SystemExit(f"error: {path}: {what} hold NaN or inf in {some(bad, 'of their tensors')}: {damaged}")
    model.load_state_dict(state)
    return model


# dense bf16 peak of one GPU in TFLOP/s, from the vendors' data sheets; the first name found in the device's wins
PEAK_TFLOPS = {'H100 PCIe': 756, 'H100': 989, 'H200': 989, 'A100': 312}


def mfu(flops_per_second, device, peak_tflops=None):
    """Model FLOPs utilisation: the fraction of the device's peak bf16 FLOP/s; None where unknown (CPUs)."""
    name = torch.cuda.get_device_name(device) if str(device).startswith('cuda') else ''
    peak = next((t for n, t in PEAK_TFLOPS.items() if n in name), peak_tflops)
    return peak and flops_per_second / (peak * 1e12)


def percent(x):
    return '-' if x is None else f"{100 * x:.1f}%"


def peak_memory(device):
    if str(device).startswith('cuda'):
        return f"{torch.cuda.max_memory_allocated(device) / 2 ** 30:.1f} GiB"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20:.1f} GiB (process RSS)"  # Linux: KiB


# -----------------------------------------------------------------------------
# The command line


def check_cache_args(args):
    """Flags that cannot work fail here, in one line, before anything is read or written."""
    m, data, out = DOWNSAMPLING[args.tokenizer], os.path.abspath(args.data), os.path.abspath(args.out)
    checks = [  # (what is wrong, the message)
        (args.image_size < 1 or args.image_size % m, f"--image_size {args.image_size} must be positive" + (
            f" and a multiple of {m} (one {args.tokenizer} token covers {m}x{m} pixels)" if m > 1 else "")),
        (args.ckpt and args.tokenizer not in RECONSTRUCTION_TOKENIZERS,
         f"--ckpt is for --tokenizer vq or vae; --tokenizer {args.tokenizer} has no weights"),
        (args.batch_size < 1 or args.shard_size < 1 or args.workers < 0,
         "--batch_size and --shard_size must be at least 1, --workers at least 0"),
        (not 2 <= args.palette_size <= 65536, f"--palette_size {args.palette_size} must be in [2, 65536]"),  # uint16
        (os.path.exists(args.out) and not os.path.isdir(args.out), f"--out {args.out} is a file, not a directory"),
        (out != data and os.path.commonpath([data, out]) == data,  # the cache would be read as a class folder
         f"--out {args.out} is inside --data; put it next to the images, e.g. --out {data}_cache")]
    if errors := [message for wrong, message in checks if wrong]:
        raise SystemExit("error: " + "; ".join(errors))


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p = parser.add_subparsers(dest='command', required=True).add_parser('cache', help='tokenize an ImageFolder')
    p.add_argument('--tokenizer', default='pixel', choices=list(TOKENIZERS),
                   help="pixel: palette ids; pixel_patch: 2x2 patches as 12-d vectors; vq, vae: the paper's")
    p.add_argument('--palette', default='fit', choices=['fit', 'cube'],
                   help="pixel: fit: the data's colours (k-means beyond --palette_size); cube: 3 bits per channel")
    p.add_argument('--palette_size', type=int, default=512, help='pixel, fit: at most this many colours (iGPT: 512)')
    p.add_argument('--ckpt', default=None, help='released weights of vq (vq_ds16_c2i.pt) or vae (kl16.ckpt)')
    p.add_argument('--data', required=True, help='ImageFolder root: DIR/<class>/<image>')
    p.add_argument('--image_size', type=int, default=16,
                   help='centre crop size (the paper: 256); grid: size / 16 (vq, vae), / 2 (pixel_patch), size (pixel)')
    p.add_argument('--out', required=True, help='cache directory to write; a rerun continues it (same flags and files)')
    p.add_argument('--rebuild', action='store_true', help='delete the cache in --out first, e.g. to change its flags')
    p.add_argument('--batch_size', type=int, default=64, help='images per encoder call (each with its mirror)')
    p.add_argument('--shard_size', type=int, default=10000, help='images per shard file')
    p.add_argument('--workers', type=int, default=min(8, os.cpu_count() or 1), help='image decoding processes')
    return parser


if __name__ == '__main__':
    cache(get_parser().parse_args())
