"""
Tokenizers, the built-in dataset, and the dataset cache that training memory-maps.

- PixelTokenizer: each pixel is one token from a fixed palette (3 bits per channel, 512 colours),
  so a 16x16 image is a 16x16 grid of discrete tokens. It needs no weights and trains on a CPU.
- make_shapes: a built-in, procedurally drawn dataset (10 classes of coloured shapes on a 16x16 grid)
  with real class structure, so a class-conditional model has something to learn without a download.
- cache: an ImageFolder (DIR/<class>/<image>) is read with Pillow, centre-cropped and resized the ADM way,
  tokenized once, and written as tokens.npy / labels.npy / meta.json that train.py memory-maps.

    python tokenizers.py cache --tokenizer pixel --data DIR --image_size 16 --out CACHE
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch
from PIL import Image

# -----------------------------------------------------------------------------
# The pixel tokenizer


class PixelTokenizer:
    """One token per pixel: the top `bits` bits of R, G and B packed into one index."""

    def __init__(self, bits=3):
        self.bits = bits
        self.vocab_size = 2 ** (3 * bits)  # 512 colours for 3 bits per channel

    def encode(self, images):
        # images: (B, H, W, 3) uint8 -> tokens (B, H, W) int64
        q = images.long() >> (8 - self.bits)  # (B, H, W, 3) each channel in [0, 2^bits)
        return (q[..., 0] << (2 * self.bits)) | (q[..., 1] << self.bits) | q[..., 2]

    def decode(self, tokens):
        # tokens: (B, H, W) int -> images (B, H, W, 3) uint8, each colour at the centre of its bin
        mask = 2 ** self.bits - 1
        q = torch.stack([tokens >> (2 * self.bits), tokens >> self.bits, tokens], dim=-1) & mask  # (B, H, W, 3)
        return ((q << (8 - self.bits)) + 2 ** (7 - self.bits)).to(torch.uint8)


TOKENIZERS = {'pixel': PixelTokenizer}

# -----------------------------------------------------------------------------
# The built-in dataset: coloured shapes, one shape kind per class

SHAPE_CLASSES = ['disc', 'ring', 'square', 'frame', 'triangle', 'plus', 'cross', 'h_stripes', 'v_stripes', 'diamond']
# saturated colours that the 3-bit palette represents exactly (up to the bin centre)
COLOURS = torch.tensor([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [255, 0, 255], [0, 255, 255],
                        [255, 255, 255], [255, 128, 0], [128, 0, 255], [0, 128, 255]], dtype=torch.uint8)


def shape_masks(kind, cx, cy, r, size):
    """Boolean masks (M, size, size) of one shape kind with centres (cx, cy) and radii r, all (M,) floats."""
    y, x = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing='ij')  # pixel centres
    dx, dy = x - cx[:, None, None], y - cy[:, None, None]  # (M, size, size) offsets from each centre
    r = r[:, None, None]
    d2 = dx ** 2 + dy ** 2
    inside = (dx.abs() <= r) & (dy.abs() <= r)  # the bounding square of the shape
    arm = torch.clamp(r / 3, min=1.0)  # half-width of bars and rings
    if kind == 'disc':
        return d2 <= r ** 2
    if kind == 'ring':
        return (d2 <= r ** 2) & (d2 >= (r - 1.5 * arm) ** 2)
    if kind == 'square':
        return inside
    if kind == 'frame':
        return inside & ((dx.abs() > r - arm) | (dy.abs() > r - arm))
    if kind == 'triangle':  # apex up, base at the bottom of the bounding square
        return inside & (dx.abs() <= (dy + r) / 2)
    if kind == 'plus':
        return inside & ((dx.abs() <= arm / 1.5) | (dy.abs() <= arm / 1.5))
    if kind == 'cross':
        return inside & (((dx - dy).abs() <= arm) | ((dx + dy).abs() <= arm))
    if kind == 'h_stripes':
        return ((y // 2) % 2 == 0).expand_as(d2).clone()
    if kind == 'v_stripes':
        return ((x // 2) % 2 == 0).expand_as(d2).clone()
    if kind == 'diamond':
        return dx.abs() + dy.abs() <= r
    raise ValueError(kind)


def make_shapes(num_images, size=16, seed=0, jitter=0.0):
    """The built-in dataset: (images (M, size, size, 3) uint8, labels (M,) int64), deterministic in `seed`.
    Each image is one shape of its class at a random place and scale, in one of 10 colours on black;
    stripes cover the whole image."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_images) % len(SHAPE_CLASSES)
    cx = size * (0.5 + jitter * (torch.rand(num_images, generator=g) - 0.5))  # centre within the middle `jitter`
    cy = size * (0.5 + jitter * (torch.rand(num_images, generator=g) - 0.5))
    r = size * (0.25 + 0.15 * torch.rand(num_images, generator=g))  # radius 25%..40% of the image
    fg = torch.randint(len(COLOURS), (num_images,), generator=g)
    images = torch.empty(num_images, size, size, 3, dtype=torch.uint8)
    for k, kind in enumerate(SHAPE_CLASSES):
        i = (labels == k).nonzero()[:, 0]
        mask = shape_masks(kind, cx[i], cy[i], r[i], size)  # (m, size, size)
        images[i] = torch.where(mask[..., None], COLOURS[fg[i]][:, None, None], 0)  # on black
    perm = torch.randperm(num_images, generator=g)  # interleave classes
    return images[perm], labels[perm]


# -----------------------------------------------------------------------------
# ImageFolder reading and the token cache

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff', '.ppm')


def center_crop_arr(pil_image, image_size):
    """ADM's centre crop (openai/guided-diffusion image_datasets.py, also used by MAR and LlamaGen):
    halve with a box filter while the short side is >= 2x the target, resize the short side to
    image_size with bicubic, then crop the centre."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    top, left = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return arr[top:top + image_size, left:left + image_size]


def list_image_folder(root):
    """(paths, labels, class_names) of an ImageFolder: one subdirectory per class, sorted by name."""
    if not os.path.isdir(root):
        raise SystemExit(f"error: --data {root}: no such directory (expected an ImageFolder DIR/<class>/<image>)")
    classes = sorted(d.name for d in os.scandir(root) if d.is_dir())
    if not classes:
        raise SystemExit(f"error: --data {root}: no class subdirectories (expected DIR/<class>/<image>)")
    paths, labels = [], []
    for k, c in enumerate(classes):
        files = sorted(f.path for f in os.scandir(os.path.join(root, c)) if f.is_file())
        if not files:
            raise SystemExit(f"error: --data {root}: class folder '{c}' is empty")
        paths += files
        labels += [k] * len(files)
    return paths, labels, classes


def cache(args):
    """Tokenize an ImageFolder once into CACHE/{tokens.npy, labels.npy, meta.json}."""
    tokenizer = TOKENIZERS[args.tokenizer]()
    paths, labels, classes = list_image_folder(args.data)
    images, kept, skipped = [], [], 0
    t0 = time.time()
    for i, path in enumerate(paths):
        if not path.lower().endswith(IMAGE_EXTENSIONS):
            print(f"skipping {path}: not an image file extension", file=sys.stderr)
            skipped += 1
            continue
        try:
            with Image.open(path) as im:
                images.append(center_crop_arr(im.convert('RGB'), args.image_size))
        except (OSError, ValueError) as e:  # PIL raises these for truncated or unknown files
            print(f"skipping {path}: {e}", file=sys.stderr)
            skipped += 1
            continue
        kept.append(labels[i])
        if (i + 1) % 1000 == 0 or i + 1 == len(paths):
            print(f"read {i + 1}/{len(paths)} images, {(i + 1) / (time.time() - t0):.0f} images/s")
    if not images:
        raise SystemExit(f"error: --data {args.data}: no readable images")
    tokens = torch.cat([tokenizer.encode(torch.from_numpy(np.stack(images[i:i + 1024])))
                        for i in range(0, len(images), 1024)])  # (M, H, W)
    os.makedirs(args.out, exist_ok=True)
    np.save(os.path.join(args.out, 'tokens.npy'), tokens.numpy().astype(np.uint16))  # vocabularies up to 65536
    np.save(os.path.join(args.out, 'labels.npy'), np.array(kept, dtype=np.int64))
    meta = dict(tokenizer=args.tokenizer, image_size=args.image_size, grid_size=tokens.shape[1],
                vocab_size=tokenizer.vocab_size, num_classes=len(classes), classes=classes)
    with open(os.path.join(args.out, 'meta.json'), 'w') as f:
        json.dump(meta, f, indent=1)
    print(f"wrote {len(images)} images of {len(classes)} classes to {args.out} ({skipped} skipped)")


def load_dataset(data, tokenizer='pixel', num_images=10000, seed=0):
    """(tokens (M, H, W), labels (M,), meta) of the built-in data ('shapes', tokenized here with
    `tokenizer`) or of a cache directory; a cache is memory-mapped, so only the batches read are loaded."""
    if data == 'shapes':
        name, tokenizer = tokenizer, TOKENIZERS[tokenizer]()
        images, labels = make_shapes(num_images, seed=seed)
        meta = dict(tokenizer=name, image_size=16, grid_size=16, vocab_size=tokenizer.vocab_size,
                    num_classes=len(SHAPE_CLASSES), classes=SHAPE_CLASSES)
        return tokenizer.encode(images).numpy().astype(np.uint16), labels.numpy(), meta
    meta_path = os.path.join(data, 'meta.json')
    if not os.path.isdir(data):
        raise SystemExit(f"error: --data {data}: no such directory; use --data shapes (built-in) or make a cache "
                         f"with `python tokenizers.py cache --data IMAGEFOLDER --out {data}`")
    if not os.path.isfile(meta_path):
        raise SystemExit(f"error: --data {data}: no meta.json there; make a cache with "
                         f"`python tokenizers.py cache --data IMAGEFOLDER --out {data}` or use --data shapes")
    with open(meta_path) as f:
        meta = json.load(f)
    tokens = np.load(os.path.join(data, 'tokens.npy'), mmap_mode='r')
    labels = np.load(os.path.join(data, 'labels.npy'))
    return tokens, labels, meta


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest='command', required=True)
    p = sub.add_parser('cache', help='tokenize an ImageFolder into a cache directory')
    p.add_argument('--tokenizer', default='pixel', choices=list(TOKENIZERS))
    p.add_argument('--data', required=True, help='ImageFolder root: DIR/<class>/<image>')
    p.add_argument('--image_size', type=int, default=16, help='centre crop size; pixel tokens: grid = image size')
    p.add_argument('--out', required=True, help='cache directory to write')
    args = parser.parse_args()
    cache(args)
