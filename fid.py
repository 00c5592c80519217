"""
FID, sFID, Inception Score and precision/recall as the ADM evaluator computes them (openai/guided-diffusion
evaluations/evaluator.py: the paper's Table 2, LlamaGen, VAR, RAR), with torch, numpy, scipy and pillow only: the
FID Inception-v3 of the TF graph of 2015-12-05, TF-1 bilinear resize to 299 and (x - 128) / 128, as torch-fidelity
reproduces them; and SmallImageMetric for images too small for an Inception (train.py --eval_every without --fid_ref).

    python fid.py samples.npz VIRTUAL_imagenet256_labeled.npz   # Table 2: FID, sFID, IS, precision, recall
    python fid.py samples.npz DIR                               # against another image set (.npz or folder)
    python fid.py DIR --save_stats ref.npz                      # a reference batch of your own dataset
    python fid.py samples.npz ref.npz --is_splits torch_fidelity  # IS as MAR's online evaluation
    python fid.py --bench                                       # feature extraction images/s at batch 200

SAMPLES: an .npz with arr_0 (uint8 (N, H, W, 3), as sample.py writes) or a folder of images of one size, read batch
by batch: memory holds the features (20 KB per image), not the images. The weights: pytorch-fid's port of the TF
graph, pt_inception-2015-12-05-6726825d.pth, where pytorch-fid downloads it (--inception elsewhere).
"""
import argparse
import math
import os
import sys
import time
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from scipy import linalg

from tokenizers import HelpFormatter, load_weights, one_line, peak_memory, read_torch, write_atomic

# pytorch-fid's port of the TF weights (torch-fidelity's weights-inception-2015-12-05-6726825d.pth: the same tensors)
WEIGHTS_FILE = 'pt_inception-2015-12-05-6726825d.pth'
WEIGHTS_URL = 'https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/' + WEIGHTS_FILE
DEFAULT_WEIGHTS = '~/.cache/torch/hub/checkpoints/' + WEIGHTS_FILE  # where pytorch-fid's download lands
IMAGE_EXTENSIONS = ('.bmp', '.jpg', '.jpeg', '.pgm', '.png', '.ppm', '.tif', '.tiff', '.webp')  # pytorch-fid's
# the ADM reference-batch layout: pool3 statistics and those of the spatial features (sFID)
STATS_SHAPES = {'mu': (2048,), 'sigma': (2048, 2048), 'mu_s': (2023,), 'sigma_s': (2023, 2023)}
METRIC_NAMES = {'fid': 'FID', 'sfid': 'sFID', 'is': 'IS', 'precision': 'precision', 'recall': 'recall'}
IS_SPLIT_SIZE = 5000  # ADM's compute_inception_score(split_size=5000): consecutive parts, in the file's order
IS_SPLITS_TORCH_FIDELITY = 10  # torch-fidelity's isc_splits default, after its shuffle with RandomState(2020)
FULL_RANK = 2048  # fewer images than feature dimensions leave the covariance singular
BENCH_SECONDS = 10  # --bench times whole batches for at least this long

# -----------------------------------------------------------------------------
# The FID Inception-v3: torchvision's module names (the published state dict loads as it is), the pools of the
# TF graph (pytorch-fid inception.py, torch-fidelity feature_extractor_inceptionv3.py)


class BasicConv2d(nn.Module):
    """Conv (no bias), BatchNorm (eps 0.001, every port's), ReLU; 'same' is TF's SAME at stride 1, else VALID."""

    def __init__(self, c_in, c_out, kernel_size, stride=1, padding='same'):
        super().__init__()
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
        padding = (kh // 2, kw // 2) if padding == 'same' else padding
        self.conv = nn.Conv2d(c_in, c_out, (kh, kw), stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def avg_pool(x):  # TF's SAME average pool counts real pixels only: with Mixed_7c's max pool, pytorch-fid's change
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 block (Mixed_5b, 5c, 5d): 1x1, 5x5, double 3x3 and pool branches."""

    def __init__(self, c_in, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(c_in, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = BasicConv2d(c_in, 48, 1), BasicConv2d(48, 64, 5)
        self.branch3x3dbl_1, self.branch3x3dbl_2 = BasicConv2d(c_in, 64, 1), BasicConv2d(64, 96, 3)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3)
        self.branch_pool = BasicConv2d(c_in, pool_features, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(avg_pool(x))], dim=1)  # (B, 224 + pool_features, 35, 35)


class InceptionB(nn.Module):
    """35x35 -> 17x17 reduction (Mixed_6a)."""

    def __init__(self, c_in):
        super().__init__()
        self.branch3x3 = BasicConv2d(c_in, 384, 3, stride=2, padding=0)
        self.branch3x3dbl_1, self.branch3x3dbl_2 = BasicConv2d(c_in, 64, 1), BasicConv2d(64, 96, 3)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2, padding=0)

    def forward(self, x):
        return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, stride=2)], dim=1)  # (B, 384 + 96 + 288 = 768, 17, 17)


class InceptionC(nn.Module):
    """17x17 block (Mixed_6b to 6e), its 7x7 convolutions factored into 1x7 and 7x1."""

    def __init__(self, c_in, c7):
        super().__init__()
        self.branch1x1 = BasicConv2d(c_in, 192, 1)
        self.branch7x7_1, self.branch7x7_2 = BasicConv2d(c_in, c7, 1), BasicConv2d(c7, c7, (1, 7))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1))
        self.branch7x7dbl_1, self.branch7x7dbl_2 = BasicConv2d(c_in, c7, 1), BasicConv2d(c7, c7, (7, 1))
        self.branch7x7dbl_3, self.branch7x7dbl_4 = BasicConv2d(c7, c7, (1, 7)), BasicConv2d(c7, c7, (7, 1))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7))
        self.branch_pool = BasicConv2d(c_in, 192, 1)

    def forward(self, x):
        dbl = self.branch7x7dbl_3(self.branch7x7dbl_2(self.branch7x7dbl_1(x)))
        return torch.cat([self.branch1x1(x), self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
                          self.branch7x7dbl_5(self.branch7x7dbl_4(dbl)),
                          self.branch_pool(avg_pool(x))], dim=1)  # (B, 4 * 192 = 768, 17, 17)


class InceptionD(nn.Module):
    """17x17 -> 8x8 reduction (Mixed_7a)."""

    def __init__(self, c_in):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(c_in, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2, padding=0)
        self.branch7x7x3_1, self.branch7x7x3_2 = BasicConv2d(c_in, 192, 1), BasicConv2d(192, 192, (1, 7))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2, padding=0)

    def forward(self, x):
        b7 = self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x)))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), self.branch7x7x3_4(b7),
                          F.max_pool2d(x, 3, stride=2)], dim=1)  # (B, 320 + 192 + 768 = 1280, 8, 8)


class InceptionE(nn.Module):
    """8x8 block (Mixed_7b, 7c), split 1x3 / 3x1 outputs; the graph's last (Mixed_7c) max-pools (FIDInceptionE_2)."""

    def __init__(self, c_in, pool):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(c_in, 320, 1)
        self.branch3x3_1 = BasicConv2d(c_in, 384, 1)
        self.branch3x3_2a, self.branch3x3_2b = BasicConv2d(384, 384, (1, 3)), BasicConv2d(384, 384, (3, 1))
        self.branch3x3dbl_1, self.branch3x3dbl_2 = BasicConv2d(c_in, 448, 1), BasicConv2d(448, 384, 3)
        self.branch3x3dbl_3a, self.branch3x3dbl_3b = BasicConv2d(384, 384, (1, 3)), BasicConv2d(384, 384, (3, 1))
        self.branch_pool = BasicConv2d(c_in, 192, 1)

    def forward(self, x):
        b3, dbl = self.branch3x3_1(x), self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.pool == 'max' else avg_pool(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                          self.branch3x3dbl_3a(dbl), self.branch3x3dbl_3b(dbl),
                          self.branch_pool(pooled)], dim=1)  # (B, 320 + 768 + 768 + 192 = 2048, 8, 8)


class FIDInception(nn.Module):
    """Inception-v3 of the TF graph, with its 1008-way classifier (1000 ImageNet classes and 8 unused ones)."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2, padding=0)
        self.Conv2d_2a_3x3, self.Conv2d_2b_3x3 = BasicConv2d(32, 32, 3, padding=0), BasicConv2d(32, 64, 3)
        self.Conv2d_3b_1x1, self.Conv2d_4a_3x3 = BasicConv2d(64, 80, 1), BasicConv2d(80, 192, 3, padding=0)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = InceptionA(192, 32), InceptionA(256, 64), InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b, self.Mixed_6c = InceptionC(768, 128), InceptionC(768, 160)
        self.Mixed_6d, self.Mixed_6e = InceptionC(768, 160), InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b, self.Mixed_7c = InceptionE(1280, pool='avg'), InceptionE(2048, pool='max')
        self.fc = nn.Linear(2048, 1008)

    def forward(self, x):
        """x (B, 3, 299, 299) preprocessed -> pool3 (B, 2048) and ADM's spatial features (B, 2023)."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (B, 64, 147, 147)
        x = F.max_pool2d(x, 3, stride=2)  # (B, 64, 73, 73)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)  # (B, 192, 35, 35)
        x = self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x))))))
        # ADM's 'mixed_6/conv': the first 7 channels of the 1x1 branch of TF's mixed_6 (our Mixed_6d), recomputed
        spatial = self.Mixed_6d.branch1x1(x)[:, :7]  # (B, 7, 17, 17)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(self.Mixed_6e(self.Mixed_6d(x)))))  # (B, 2048, 8, 8)
        pool = x.mean(dim=(2, 3))  # (B, 2048) pool3, the graph's 8x8 average pool
        return pool, spatial.permute(0, 2, 3, 1).flatten(1)  # (B, 17*17*7): ADM flattens NHWC, channels last


def load_inception(path=DEFAULT_WEIGHTS, device='cpu'):
    """The FID Inception with the published weights, checked strictly, in eval mode."""
    path = os.path.expanduser(path)
    state = read_torch(path, 'PyTorch file', f"; the FID Inception weights: download {WEIGHTS_FILE} from "
                                             f"{WEIGHTS_URL} (pytorch-fid's release) and pass --inception PATH")
    model = FIDInception()
    # pytorch-fid's file (saved from torchvision's model) holds BatchNorm's num_batches_tracked, torch-fidelity's
    # (the same tensors) not: they count training steps only, ours fill the gaps
    own = {k: v for k, v in model.state_dict().items() if k.endswith('num_batches_tracked')}
    model = load_weights(model, own | state if isinstance(state, dict) else state, path,
                         f"its weights (expected {WEIGHTS_FILE})", "download it again")
    return model.to(device).eval().requires_grad_(False)

# -----------------------------------------------------------------------------
# Preprocessing and features


def resize_tf1(x, size=299):
    """Bilinear resize of x (B, C, H, W) as TF 1's ResizeBilinear in the graph: output pixel i reads input coordinate
    i * in / out (no half-pixel offset), in float32, x then y (torch-fidelity interpolate_compat_tensorflow.py)."""
    def grid(n_in):
        src = torch.arange(size, dtype=torch.float32, device=x.device) * torch.tensor(n_in / size)  # in / out in fp32
        lo = src.long()  # floor, as src >= 0
        return lo, (lo + 1).clamp_max(n_in - 1), src - lo  # the last rows repeat the edge when upsampling
    (y0, y1, fy), (x0, x1, fx) = grid(x.shape[2]), grid(x.shape[3])
    top, bottom = x[:, :, y0], x[:, :, y1]  # (B, C, size, W)
    top = top[..., x0] + (top[..., x1] - top[..., x0]) * fx  # (B, C, size, size)
    bottom = bottom[..., x0] + (bottom[..., x1] - bottom[..., x0]) * fx
    return top + (bottom - top) * fy[:, None]


def preprocess(images, resize='tf1'):
    """uint8 images (B, H, W, 3) -> the Inception's input (B, 3, 299, 299) float32."""
    x = images.permute(0, 3, 1, 2).float()  # (B, 3, H, W), 0..255
    if resize == 'tf1':  # the TF graph: ResizeBilinear on 0..255, Sub 128, Mul 1/128 (ADM, torch-fidelity)
        return (resize_tf1(x) - 128) / 128
    return 2 * F.interpolate(x / 255, size=(299, 299), mode='bilinear', align_corners=False) - 1  # pytorch-fid's


@contextmanager
def no_tf32():
    """Full fp32 matmuls and convolutions on CUDA (TF32 keeps 10 mantissa bits; the references are fp32)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@torch.no_grad()
def features(model, images, batch_size=64, device='cpu', resize='tf1', log=None):
    """float32 features of uint8 images (N, H, W, 3) (anything with len() and slices): pool3 (N, 2048), sFID's spatial
    features (N, 2023), IS logits (N, 1008) = pool3 @ fc.weight.T (as ADM, torch-fidelity). log: a progress line."""
    N, out, t0 = len(images), None, time.time()
    last = t0
    with no_tf32(), ThreadPoolExecutor(1) as reader:  # the next batch is read and decoded while this one runs
        next_batch = reader.submit(images.__getitem__, slice(0, batch_size))
        for i in range(0, N, batch_size):
            batch = next_batch.result()
            if i + batch_size < N:
                next_batch = reader.submit(images.__getitem__, slice(i + batch_size, i + 2 * batch_size))
            check_images(batch.dtype, tuple(batch.shape), 'images')
            pool, spatial = model(preprocess(torch.as_tensor(batch).to(device), resize))
            batch_feats = {'pool': pool, 'spatial': spatial, 'logits': pool @ model.fc.weight.T}
            if out is None:  # filled in place: concatenating the batches would hold every feature twice
                out = {k: np.empty((N, v.shape[1]), np.float32) for k, v in batch_feats.items()}
            for k, v in batch_feats.items():
                out[k][i:i + len(v)] = v.cpu().numpy()
            done = i + len(batch)
            if log and (time.time() - last >= 30 or done == N):
                last, rate = time.time(), done / (time.time() - t0)
                left = f"{(N - done) / rate / 60:.0f} min left" if done < N else f"{last - t0:.0f} s"
                print(f"{log}: {done}/{N} images, {rate:.1f} images/s, {left}", flush=True)
    return out

# -----------------------------------------------------------------------------
# Metrics


def mean_cov(x, block=4096):
    """Mean and unbiased covariance in float64 of features x (N, D), summed over blocks of centred rows."""
    mu, sigma = x.mean(0, dtype=np.float64), np.zeros((x.shape[1], x.shape[1]))
    for i in range(0, len(x), block):  # np.cov would copy all of x to float64 first (0.8 GB for 50,000 x 2048)
        d = x[i:i + block] - mu  # (block, D) float64
        sigma += d.T @ d
    return mu, sigma / (len(x) - 1)


def stats(feats):
    """Mean and covariance of pool3 and of the spatial features, in ADM's npz keys."""
    (mu, sigma), (mu_s, sigma_s) = mean_cov(feats['pool']), mean_cov(feats['spatial'])
    return dict(mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2), with ADM's and pytorch-fid's numerical safeguards."""
    mu1, mu2, sigma1, sigma2 = (np.asarray(a, dtype=np.float64) for a in (mu1, mu2, sigma1, sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics of different sizes: {mu1.shape}, {sigma1.shape} vs {mu2.shape}, {sigma2.shape}")
    covmean = linalg.sqrtm(sigma1 @ sigma2)  # without `disp`: deprecated in SciPy 1.16, gone in 1.18
    if not np.isfinite(covmean).all():  # a singular product: retry with eps on both diagonals, as ADM does
        offset = eps * np.eye(len(sigma1))
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):  # rounding leaves tiny imaginary parts; a large one means a wrong result
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"imaginary component {np.abs(covmean.imag).max():.3g} in sqrtm(sigma1 @ sigma2)")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def inception_score(logits, splits='adm'):
    """exp(E_x KL(p(y|x) || p(y))) over the 1008 classes, averaged over splits of the samples (N, 1008): 'adm' (the
    paper's Table 2), parts of 5000 in the given order; 'torch_fidelity' (MAR's online evaluation), 10 equal parts
    after a shuffle with RandomState(2020), torch-fidelity's (metric_isc.py)."""
    N, logits = len(logits), np.asarray(logits)
    if splits == 'adm' and N >= 1:
        order, bounds = np.arange(N), list(range(0, N, IS_SPLIT_SIZE)) + [N]
    elif splits == 'torch_fidelity' and N >= IS_SPLITS_TORCH_FIDELITY:
        order = np.random.RandomState(2020).permutation(N)
        bounds = [k * N // IS_SPLITS_TORCH_FIDELITY for k in range(IS_SPLITS_TORCH_FIDELITY + 1)]
    else:
        raise ValueError(f"Inception Score with splits={splits!r} of {N} images: 'adm' needs 1 image or more, "
                         f"'torch_fidelity' {IS_SPLITS_TORCH_FIDELITY} or more")
    scores = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        log_p = torch.as_tensor(logits[order[a:b]], dtype=torch.float64).log_softmax(1)  # (b - a, 1008)
        log_py = log_p.exp().mean(0).log()  # (1008,) the marginal p(y) of the split
        scores.append((log_p.exp() * (log_p - log_py)).sum(1).mean().exp().item())
    return float(np.mean(scores))


def sq_dists(a, b):
    """Squared Euclidean distances (A, B) as ADM's DistanceBlock, |a|^2 - 2 a.b + |b|^2, in one (A, B) buffer."""
    d = (a @ b.T).mul_(-2)  # (A, B)
    return d.add_(torch.einsum('ij,ij->i', a, a)[:, None]).add_(torch.einsum('ij,ij->i', b, b)[None]).clamp_min_(0)


@torch.no_grad()
def precision_recall(real, fake, k=3, max_block=2 ** 25, device='cpu'):
    """Improved precision and recall (Kynkaanniemi et al. 2019) as ADM's ManifoldEstimator: a point is on a set's
    manifold if within the distance from some point of the set to its k-th neighbour. Distances in fp32 (ADM's:
    fp16), max_block at a time (128 MB)."""
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision/recall with k = {k} need more than {k} images per set, "
                         f"got {len(real)} and {len(fake)}")
    real, fake = (torch.as_tensor(f, dtype=torch.float32, device=device) for f in (real, fake))

    def blocks(x, centres):  # row ranges of x whose distances to all centres fill at most max_block
        rows = max(1, max_block // len(centres))
        return [(i, min(i + rows, len(x))) for i in range(0, len(x), rows)]

    def radii(x):  # (k+1)-th smallest distance, the point itself being the first (ADM and torch-fidelity)
        out = torch.empty(len(x), device=device)  # in place: small tensors kept between blocks fragment the heap
        for i, j in blocks(x, x):
            out[i:j] = sq_dists(x[i:j], x).kthvalue(k + 1, dim=1).values
        return out

    def on_manifold(x, centres, r):  # (len(x),) whether each point of x is in some ball
        out = torch.empty(len(x), dtype=torch.bool, device=device)
        for i, j in blocks(x, centres):
            out[i:j] = (sq_dists(x[i:j], centres) <= r).any(1)
        return out.double()
    with no_tf32():  # samples on the reference manifold, references on the sample manifold
        return on_manifold(fake, real, radii(real)).mean().item(), on_manifold(real, fake, radii(fake)).mean().item()


def metrics(feats, ref, ref_pool=None, device='cpu', is_splits='adm'):
    """FID, sFID (when ref has spatial statistics), IS and precision/recall (given ref_pool, the reference images'
    pool3) of sample features against reference statistics."""
    s = stats(feats)
    out = {'fid': frechet_distance(s['mu'], s['sigma'], ref['mu'], ref['sigma'])}
    if 'mu_s' in ref:
        out['sfid'] = frechet_distance(s['mu_s'], s['sigma_s'], ref['mu_s'], ref['sigma_s'])
    out['is'] = inception_score(feats['logits'], is_splits)
    if ref_pool is not None:
        out['precision'], out['recall'] = precision_recall(ref_pool, feats['pool'], device=device)
    return out

# -----------------------------------------------------------------------------
# Small images (the built-in shapes, pixel tokens, any small cache): Inception features mean little at 16x16, so the
# feature space is fit on the real training images: the top principal components of their pixels.


class SmallImageMetric:
    """A Frechet distance in a PCA space of pixels and a classifier's accuracy, fit on real training images only
    (numpy, seconds on a CPU). Called on samples (N, H, W, 3) and their labels: fd, the FD to held-out real images
    over the top `dim` components; fd_floor, that of as many real training images (a perfect model's: FD is biased
    upwards at small N); class_acc, how often a k-nearest-neighbour classifier of the training images names the
    class a sample was made for; class_acc_real, its accuracy on the held-out images."""

    def __init__(self, train_images, train_labels, ref_images, ref_labels, dim=64, k=5):
        x = self.pixels(train_images)
        self.mean = x.mean(0)
        _, eigvec = np.linalg.eigh(np.cov(x, rowvar=False))  # eigenvalues in ascending order
        self.components = eigvec[:, ::-1][:, :dim]  # (H*W*3, dim) the top principal directions
        self.train, self.train_labels, self.k = (x - self.mean) @ self.components, np.asarray(train_labels), k
        ref = self.project(ref_images)  # (M, dim)
        self.ref_stats = ref.mean(0), np.cov(ref, rowvar=False)
        self.class_acc_real = float((self.classify(ref) == np.asarray(ref_labels)).mean())

    @staticmethod
    def pixels(images):
        return np.asarray(images, dtype=np.float64).reshape(len(images), -1) / 255  # (N, H*W*3) in [0, 1]

    def project(self, images):
        return (self.pixels(images) - self.mean) @ self.components  # (N, dim)

    def classify(self, f):
        """The majority class of the k nearest training images of each row of f (N, dim); ties to the lower class."""
        sq, votes = (self.train ** 2).sum(1), []
        for part in np.array_split(f, math.ceil(len(f) / 1000)):  # (n, len(train)) distances at a time
            d = (part ** 2).sum(1)[:, None] - 2 * part @ self.train.T + sq
            nearest = self.train_labels[np.argpartition(d, self.k, axis=1)[:, :self.k]]  # (n, k)
            votes.append([np.bincount(row).argmax() for row in nearest])
        return np.concatenate(votes)

    def __call__(self, images, labels):
        if len(images) < 2:
            raise ValueError(f"the small-image metric needs at least 2 images, got {len(images)}")
        f = self.project(images)
        real = self.train[np.random.default_rng(0).choice(len(self.train), min(len(f), len(self.train)), False)]
        return dict(fd=frechet_distance(f.mean(0), np.cov(f, rowvar=False), *self.ref_stats),
                    fd_floor=frechet_distance(real.mean(0), np.cov(real, rowvar=False), *self.ref_stats),
                    class_acc=float((self.classify(f) == np.asarray(labels)).mean()),
                    class_acc_real=self.class_acc_real)

# -----------------------------------------------------------------------------
# Image sets and reference batches


def check_images(dtype, shape, where):
    if dtype not in (np.uint8, torch.uint8) or len(shape) != 4 or shape[-1] != 3:
        raise SystemExit(f"error: {where}: {dtype} array of shape {tuple(shape)}; expected uint8 images "
                         f"(N, H, W, 3), the layout sample.py and ADM write")


def check_count(n, where, covariance=True):
    """At least 4 images (precision/recall need k + 1); a warning below 2048 when their covariance is computed."""
    if n < 4:
        raise SystemExit(f"error: {where}: {n} image{'s' * (n != 1)}; FID and precision/recall need at least 4 "
                         f"(the paper scores 50,000 against ADM's 10,000)")
    if covariance and n < FULL_RANK:
        print(f"warning: {where}: {n} images, fewer than the {FULL_RANK} feature dimensions: the covariance is "
              f"singular and FID is biased upwards; compare only with scores of as many images", file=sys.stderr)


def open_npz(path):
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise SystemExit(f"error: {path}: not a readable .npz ({one_line(e)}); write it with np.savez")


class NpzImages:
    """arr_0 of an .npz read in contiguous slices through zipfile, stored or deflated alike, as ADM's evaluator:
    np.load(mmap_mode='r') reads .npz members whole, and a memory map counts each page read as the process's."""

    def __init__(self, path):
        self.path, self.zip, self.pos = path, open_npz(path), 0  # pos: the image the file is at
        keys = [n[:-len('.npy')] for n in self.zip.namelist()]
        if 'arr_0' not in keys:
            raise SystemExit(f"error: {path} has no 'arr_0' (keys: {keys}); expected uint8 images (N, H, W, 3) in "
                             f"arr_0, as sample.py writes")
        try:
            self.file = self.zip.open('arr_0.npy')
            version = np.lib.format.read_magic(self.file)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            self.shape, fortran_order, dtype = read_header[version](self.file)
        except (KeyError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
            raise SystemExit(f"error: {path}: arr_0 is not a readable .npy array ({one_line(e)})")
        check_images(dtype, self.shape, path)
        if fortran_order or len(self) == 0:
            raise SystemExit(f"error: {path}: arr_0 of shape {self.shape} " + ('holds no images' if len(self) == 0
                             else 'is in Fortran order; save np.ascontiguousarray(images)'))
        self.start, self.row = self.file.tell(), math.prod(self.shape[1:])  # where the data begins, bytes per image
        if self.zip.getinfo('arr_0.npy').file_size != self.start + len(self) * self.row:
            raise SystemExit(f"error: {path}: arr_0 holds {self.zip.getinfo('arr_0.npy').file_size - self.start} "
                             f"bytes of data, not the {len(self) * self.row} of its shape {self.shape}; write it again")

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, s):
        i, j, _ = s.indices(len(self))
        j = max(i, j)
        try:
            if i != self.pos:  # zipfile seeks forward by reading on, backward by starting the member again
                self.file.seek(self.start + i * self.row)
            data = self.file.read((j - i) * self.row)
        except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:  # e.g. a CRC error at the end
            raise SystemExit(f"error: {self.path}: arr_0 unreadable after image {i} ({one_line(e)})")
        if len(data) != (j - i) * self.row:
            raise SystemExit(f"error: {self.path}: arr_0 ends at image {i + len(data) // self.row} of {len(self)}")
        self.pos = j
        return np.frombuffer(bytearray(data), np.uint8).reshape(j - i, *self.shape[1:])  # writable, for torch


def read_image(path, size_only=False):
    """An image file as uint8 (H, W, 3) RGB, or only its (W, H), or one error line naming the file."""
    try:
        with Image.open(path) as im:
            return im.size if size_only else np.asarray(im.convert('RGB'))
    except Exception as e:  # PIL raises OSError, SyntaxError, DecompressionBombError, ...
        raise SystemExit(f"error: {path}: not a readable image ({one_line(e)}); remove or replace it")


class FolderImages:
    """A folder's images, searched recursively and sorted, decoded slice by slice; every header is read first, so
    that a bad file or a second size stops the run before the first batch, not hours in."""

    def __init__(self, path):
        self.files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs
                            if f.lower().endswith(IMAGE_EXTENSIONS))
        if not self.files:
            raise SystemExit(f"error: {path}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in this folder")
        sizes = {}  # (W, H) -> the first file of that size
        for f in self.files:
            sizes.setdefault(read_image(f, size_only=True), f)
        if len(sizes) > 1:
            (a, fa), (b, fb) = list(sizes.items())[:2]
            raise SystemExit(f"error: {path}: images of {len(sizes)} sizes ({fa}: {a[0]}x{a[1]}, {fb}: {b[0]}x{b[1]}); "
                             f"resize them to one size first, as the evaluated samples have")
        (W, H), = sizes
        self.shape = (len(self.files), H, W, 3)

    def __len__(self):
        return len(self.files)

    def __getitem__(self, s):
        return np.stack([read_image(f) for f in self.files[s]])  # (B, H, W, 3)


def load_images(path):
    """uint8 images (N, H, W, 3), read lazily: arr_0 of an .npz, or a folder of images of one size."""
    if os.path.isdir(path):
        return FolderImages(path)
    if os.path.isfile(path) and path.endswith('.npz'):
        return NpzImages(path)
    raise SystemExit(f"error: {path}: {'not an .npz file or a folder' if os.path.exists(path) else 'no such file'}")


def load_reference(path, model, batch_size=64, device='cpu', resize='tf1', log=None):
    """(statistics, pool3 features or None) of a reference batch .npz (mu, sigma, maybe mu_s, sigma_s, and images
    arr_0, as ADM's VIRTUAL_imagenet256_labeled.npz) or of any image set."""
    ref, images = {}, None
    if os.path.isfile(path) and path.endswith('.npz'):
        zf = open_npz(path)
        for k in [k for k in STATS_SHAPES if k + '.npy' in zf.namelist()]:
            try:
                with zf.open(k + '.npy') as f:
                    ref[k] = np.lib.format.read_array(f)
            except (ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
                raise SystemExit(f"error: {path}: '{k}' is not a readable array ({one_line(e)})")
        for k in (['mu', 'sigma'] + (['mu_s', 'sigma_s'] if 'mu_s' in ref or 'sigma_s' in ref else [])) if ref else []:
            if k not in ref or ref[k].shape != STATS_SHAPES[k]:
                raise SystemExit(f"error: {path}: '{k}' is {ref[k].shape if k in ref else 'missing'}, expected "
                                 f"{STATS_SHAPES[k]} (ADM's reference batch layout: mu, sigma, mu_s, sigma_s)")
        if not ref and 'arr_0.npy' not in zf.namelist():
            raise SystemExit(f"error: {path} has neither statistics (mu, sigma) nor images (arr_0); keys: "
                             f"{[n[:-len('.npy')] for n in zf.namelist()]}")
        images = NpzImages(path) if 'arr_0.npy' in zf.namelist() else None  # with statistics: precision/recall only
    else:
        images = load_images(path)
    if images is None:
        return ref, None
    check_count(len(images), path, covariance=not ref)
    feats = features(model, images, batch_size, device, resize, log)
    return ref or stats(feats), feats['pool']


def save_reference(path, s, images, batch_size=64):
    """Statistics s and the images (for precision/recall) as a reference batch in np.savez's layout, the images
    copied batch by batch, written whole or not at all."""
    def write(f):
        with zipfile.ZipFile(f, 'w', allowZip64=True) as zf:
            for k, v in s.items():
                with zf.open(k + '.npy', 'w') as member:
                    np.lib.format.write_array(member, v)
            with zf.open('arr_0.npy', 'w', force_zip64=True) as member:  # zip64: 10,000 256x256 images pass 4 GB
                np.lib.format.write_array_header_1_0(member, dict(descr='|u1', fortran_order=False, shape=images.shape))
                for i in range(0, len(images), batch_size):
                    member.write(images[i:i + batch_size].tobytes())
    write_atomic(path, write)

# -----------------------------------------------------------------------------
# Speed, and the command line


def bench(args, device):
    """Feature extraction images/s at batch args.bench on random 256x256 images (resize, network, copy back), with
    random weights when the weights file is missing: the speed does not depend on them."""
    path = os.path.expanduser(args.inception)
    model = load_inception(path, device) if os.path.isfile(path) else FIDInception().to(device).eval()
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.bench, 256, 256, 3), dtype=torch.uint8, generator=g)
    # warm-up: the CUDA context and cuDNN's choices for this shape; a CPU needs only its first small pass
    features(model, images if device.startswith('cuda') else images[:2], args.bench, device, args.resize)
    t0, n = time.time(), 0
    while n == 0 or time.time() - t0 < BENCH_SECONDS:  # features() ends on a copy to the host: all is timed
        features(model, images, args.bench, device, args.resize)
        n += 1
    print(f"bench: {n * args.bench / (time.time() - t0):.1f} images/s at batch {args.bench} on {device} (--resize "
          f"{args.resize}), {'weights ' + path if os.path.isfile(path) else 'random weights: no ' + path}; "
          f"peak memory {peak_memory(device)}")


def main(args):
    device = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    if args.batch_size < 1 or args.bench < 0:
        raise SystemExit(f"error: --batch_size {args.batch_size}, --bench {args.bench}: batch sizes must be positive")
    if args.bench:
        return bench(args, device)
    if args.samples is None or (args.ref is None and args.save_stats is None):
        raise SystemExit("error: give SAMPLES and REF to compare them, or SAMPLES --save_stats OUT.npz to write "
                         "their statistics (or --bench)")
    folder = os.path.dirname(args.save_stats or '.') or '.'
    if args.save_stats and (os.path.isdir(args.save_stats) or not os.path.isdir(folder)):
        raise SystemExit(f"error: --save_stats {args.save_stats}: not a file name in an existing folder")
    if args.save_stats and os.path.exists(args.save_stats):
        raise SystemExit(f"error: --save_stats {args.save_stats} exists; delete it first, or choose another name")
    images = load_images(args.samples)  # checked before anything is computed: errors come first
    check_count(len(images), args.samples)
    if args.ref and args.is_splits == 'torch_fidelity' and len(images) < IS_SPLITS_TORCH_FIDELITY:
        raise SystemExit(f"error: {args.samples}: {len(images)} images; --is_splits torch_fidelity needs "
                         f"{IS_SPLITS_TORCH_FIDELITY}, one per split")
    model = load_inception(args.inception, device)
    ref = load_reference(args.ref, model, args.batch_size, device, args.resize, log=args.ref) if args.ref else None
    print(f"{args.samples}: {len(images)} images of {images.shape[1]}x{images.shape[2]}", flush=True)
    feats = features(model, images, args.batch_size, device, args.resize, log=args.samples)
    if args.save_stats:  # the images too, so that precision/recall work against this file
        save_reference(args.save_stats, stats(feats), images, args.batch_size)
        print(f"wrote {args.save_stats} (mu, sigma, mu_s, sigma_s, arr_0; --resize {args.resize})")
    for k, v in metrics(feats, *ref, device=device, is_splits=args.is_splits).items() if ref is not None else ():
        print(f"{METRIC_NAMES[k]} {v:.4f}")


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument('samples', nargs='?', default=None, help='.npz with arr_0 (uint8 N, H, W, 3) or a folder')
    parser.add_argument('ref', nargs='?', default=None,
                        help='reference batch .npz (mu, sigma, mu_s, sigma_s, arr_0) or another image set')
    parser.add_argument('--save_stats', default=None, metavar='OUT.npz',
                        help="write SAMPLES' statistics and images as a reference batch (ADM's layout)")
    # the definitions
    parser.add_argument('--inception', default=DEFAULT_WEIGHTS, help=f'weights, from {WEIGHTS_URL}')
    parser.add_argument('--resize', default='tf1', choices=['tf1', 'pytorch'],
                        help="tf1: TF-1 bilinear, (x-128)/128 (ADM, torch-fidelity); pytorch: F.interpolate, "
                             "2x/255-1 (pytorch-fid); a reference's statistics must come from the same mode")
    parser.add_argument('--is_splits', default='adm', choices=['adm', 'torch_fidelity'],
                        help="adm: parts of 5000 in file order (ADM's evaluator, the paper's Table 2); "
                             "torch_fidelity: 10 parts after a seeded shuffle (MAR's online evaluation)")
    # system
    parser.add_argument('--batch_size', type=int, default=64, help="images per forward pass (ADM's evaluator: 64)")
    parser.add_argument('--device', default=None, help='default: cuda if available, else cpu')
    parser.add_argument('--bench', type=int, nargs='?', const=200, default=0, metavar='BATCH',
                        help='only measure feature extraction images/s at this batch size (default 200)')
    return parser


if __name__ == '__main__':
    main(get_parser().parse_args())
