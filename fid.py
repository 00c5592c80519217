"""
FID, sFID, Inception Score and precision/recall as the ADM evaluator computes them (openai/guided-diffusion
evaluations/evaluator.py, used by LlamaGen, VAR, RAR and, through torch-fidelity, MAR), with torch, numpy,
scipy and pillow only: the FID Inception-v3 of the TF graph of 2015-12-05, TF-1 bilinear resize to 299x299
and (x - 128) / 128, as torch-fidelity reproduces them.

    python fid.py samples.npz VIRTUAL_imagenet256_labeled.npz   # Table 2: FID, sFID, IS, precision, recall
    python fid.py samples.npz DIR                               # against another image set (.npz or folder)
    python fid.py DIR --save_stats ref.npz                      # a reference batch of your own dataset
    python fid.py samples.npz ref.npz --resize pytorch          # pytorch-fid's resize and scaling

SAMPLES is an .npz with arr_0 (uint8 images (N, H, W, 3), as sample.py writes) or a folder of images of
one size. The weights are pytorch-fid's port of the TF graph, pt_inception-2015-12-05-6726825d.pth, read
from where pytorch-fid downloads it (--inception to point elsewhere).
"""
import argparse
import math
import os
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from scipy import linalg

# pytorch-fid's port of the TF weights; torch-fidelity's weights-inception-2015-12-05-6726825d.pth holds the same tensors
WEIGHTS_FILE = 'pt_inception-2015-12-05-6726825d.pth'
WEIGHTS_URL = 'https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/' + WEIGHTS_FILE
DEFAULT_WEIGHTS = '~/.cache/torch/hub/checkpoints/' + WEIGHTS_FILE  # where pytorch-fid's download lands
IMAGE_EXTENSIONS = ('.bmp', '.jpg', '.jpeg', '.pgm', '.png', '.ppm', '.tif', '.tiff', '.webp')  # pytorch-fid's
# the ADM reference-batch layout: pool3 statistics and those of the spatial features (sFID)
STATS_SHAPES = {'mu': (2048,), 'sigma': (2048, 2048), 'mu_s': (2023,), 'sigma_s': (2023, 2023)}

# -----------------------------------------------------------------------------
# The FID Inception-v3: torchvision's module names (so the published state dict loads as it is),
# with the pools of the TF graph (pytorch-fid inception.py, torch-fidelity feature_extractor_inceptionv3.py)


class BasicConv2d(nn.Module):
    """Conv (no bias), BatchNorm (eps 0.001, as in every port of the graph), ReLU. padding='same' pads k // 2
    on each side, TF's SAME for odd kernels at stride 1; the graph's other convolutions are VALID (padding=0)."""

    def __init__(self, c_in, c_out, kernel_size, stride=1, padding='same'):
        super().__init__()
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
        padding = (kh // 2, kw // 2) if padding == 'same' else padding
        self.conv = nn.Conv2d(c_in, c_out, (kh, kw), stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def avg_pool(x):
    # TF's SAME-padded average pool divides by the number of real pixels: count_include_pad=False, unlike
    # torchvision's blocks. With Mixed_7c's max pool, this is all that pytorch-fid's FIDInception* blocks change
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
    """8x8 block (Mixed_7b, 7c) with split 1x3 / 3x1 outputs. The graph's last block (mixed_10, our Mixed_7c)
    pools with a max pool, not an average pool, hence pool='max' there (pytorch-fid's FIDInceptionE_2)."""

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
        # ADM's 'mixed_6/conv' is the 1x1 branch of TF block mixed_6 (our Mixed_6d); it keeps the first 7
        # channels. Recomputing that one 1x1 conv here costs under 1% of the network.
        spatial = self.Mixed_6d.branch1x1(x)[:, :7]  # (B, 7, 17, 17)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(self.Mixed_6e(self.Mixed_6d(x)))))  # (B, 2048, 8, 8)
        pool = x.mean(dim=(2, 3))  # (B, 2048) pool3, the graph's 8x8 average pool
        return pool, spatial.permute(0, 2, 3, 1).flatten(1)  # (B, 17*17*7): ADM flattens NHWC, channels last


def load_inception(path=DEFAULT_WEIGHTS, device='cpu'):
    """The FID Inception with the published weights, checked strictly, in eval mode."""
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise SystemExit(f"error: no FID Inception weights at {path}; download {WEIGHTS_FILE} from {WEIGHTS_URL} "
                         f"(pytorch-fid's release) and pass --inception PATH")
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise SystemExit(f"error: {path}: not a PyTorch file that loads with weights_only=True ({type(e).__name__})")
    if not isinstance(state, dict):
        raise SystemExit(f"error: {path} holds a {type(state).__name__}, not a state dict of the FID Inception")
    model = FIDInception()
    own = model.state_dict()
    # pytorch-fid's file was saved from torchvision's model and holds BatchNorm's num_batches_tracked counters;
    # torch-fidelity's converted file (same tensors) has none. They count training steps only, so we take ours
    # where they are missing and check every other key strictly.
    state = {**{k: v for k, v in own.items() if k.endswith('num_batches_tracked')}, **state}
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    if missing or unexpected:
        raise SystemExit(f"error: {path} is not the FID Inception-v3 ({WEIGHTS_FILE}): "
                         f"{len(missing)} missing keys {missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:  # wrong shapes; torch's message spans many lines
        raise SystemExit(f"error: {path} is not the FID Inception-v3: {' '.join(str(e).split())[:300]}")
    return model.to(device).eval().requires_grad_(False)

# -----------------------------------------------------------------------------
# Preprocessing and features


def resize_tf1(x, size=299):
    """Bilinear resize of x (B, C, H, W) float as TF 1's ResizeBilinear (align_corners=False), which the TF
    graph runs: output pixel i reads input coordinate i * in / out (no half-pixel offset, so the image is
    anchored at its top-left corner), in float32, x first, then y (torch-fidelity interpolate_compat_tensorflow.py)."""
    def grid(n_in):
        scale = torch.tensor(n_in / size, dtype=torch.float32)  # TF computes in / out in float32
        src = torch.arange(size, dtype=torch.float32, device=x.device) * scale  # (size,)
        lo = src.long()  # floor, as src >= 0
        return lo, (lo + 1).clamp_max(n_in - 1), src - lo  # the last rows repeat the edge when upsampling
    y0, y1, fy = grid(x.shape[2])
    x0, x1, fx = grid(x.shape[3])
    top, bottom = x[:, :, y0], x[:, :, y1]  # (B, C, size, W)
    top = top[..., x0] + (top[..., x1] - top[..., x0]) * fx  # (B, C, size, size)
    bottom = bottom[..., x0] + (bottom[..., x1] - bottom[..., x0]) * fx
    return top + (bottom - top) * fy[:, None]


def preprocess(images, resize='tf1'):
    """uint8 images (B, H, W, 3) -> the Inception's input (B, 3, 299, 299) float32."""
    x = images.permute(0, 3, 1, 2).float()  # (B, 3, H, W), 0..255
    if resize == 'tf1':  # the TF graph: ResizeBilinear on 0..255, Sub 128, Mul 1/128 (ADM, torch-fidelity)
        return (resize_tf1(x) - 128) / 128
    # pytorch-fid: ToTensor's x / 255, half-pixel bilinear, 2x - 1 (its InceptionV3.forward)
    x = F.interpolate(x / 255, size=(299, 299), mode='bilinear', align_corners=False)
    return 2 * x - 1


@contextmanager
def no_tf32():
    """Full fp32 matmuls and convolutions on CUDA: TF32, cuDNN's default for convolutions on Ampere and later,
    keeps 10 mantissa bits, and the reference numbers are defined in fp32."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@torch.no_grad()
def features(model, images, batch_size=64, device='cpu', resize='tf1'):
    """Features of uint8 images (N, H, W, 3) as float64 numpy arrays: pool3 (N, 2048), the spatial features of
    sFID (N, 2023) and the IS logits (N, 1008), pool3 @ fc.weight.T without the bias (as ADM and torch-fidelity)."""
    check_images(images, 'images')
    out = {'pool': [], 'spatial': [], 'logits': []}
    with no_tf32():
        for i in range(0, len(images), batch_size):
            pool, spatial = model(preprocess(torch.as_tensor(images[i:i + batch_size]).to(device), resize))
            for k, v in zip(out, (pool, spatial, pool @ model.fc.weight.T)):
                out[k].append(v.double().cpu())
    return {k: torch.cat(v).numpy() for k, v in out.items()}

# -----------------------------------------------------------------------------
# Metrics


def stats(feats):
    """Mean and covariance (unbiased, float64) of pool3 and of the spatial features, in ADM's npz keys."""
    return dict(mu=feats['pool'].mean(0), sigma=np.cov(feats['pool'], rowvar=False),
                mu_s=feats['spatial'].mean(0), sigma_s=np.cov(feats['spatial'], rowvar=False))


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


def inception_score(logits, splits=10, seed=2020):
    """exp(E_x KL(p(y|x) || p(y))) over the 1008 classes, averaged over splits of the shuffled samples."""
    N = len(logits)
    assert N >= splits, f"{N} samples for {splits} splits"
    # shuffled first, so that class-sorted sample files do not give one-class splits; RandomState(2020) is
    # torch-fidelity's permutation (metric_isc.py), so the score equals its score on the same features
    log_p = torch.as_tensor(logits, dtype=torch.float64)[np.random.RandomState(seed).permutation(N)].log_softmax(1)
    scores = []
    for k in range(splits):
        part = log_p[k * N // splits:(k + 1) * N // splits]  # (n, 1008) torch-fidelity's split boundaries
        log_py = part.exp().mean(0).log()  # (1008,) the marginal p(y) of the split
        scores.append((part.exp() * (part - log_py)).sum(1).mean().exp().item())
    return float(np.mean(scores))


def sq_dists(a, b):
    """Squared Euclidean distances (A, B), |a|^2 - 2 a.b + |b|^2 as ADM's DistanceBlock (fp32; ADM tries fp16 first)."""
    return ((a * a).sum(1)[:, None] - 2 * a @ b.T + (b * b).sum(1)[None]).clamp_min(0)


@torch.no_grad()
def precision_recall(real, fake, k=3, batch_size=10000, device='cpu'):
    """Improved precision and recall (Kynkaanniemi et al. 2019) as ADM's ManifoldEstimator: a point is on a
    set's manifold if it lies within the distance from some point of that set to its k-th nearest neighbour."""
    assert min(len(real), len(fake)) > k, f"precision/recall with k = {k} need more than {k} images per set"
    real, fake = (torch.as_tensor(f, dtype=torch.float32, device=device) for f in (real, fake))

    def radii(x):  # (k+1)-th smallest distance, the point itself being the first (ADM and torch-fidelity)
        return torch.cat([sq_dists(r, x).kthvalue(k + 1, dim=1).values for r in x.split(batch_size)])

    def on_manifold(x, centres, r):  # (len(x),) whether each point of x is in some ball
        return torch.cat([(sq_dists(p, centres) <= r).any(1) for p in x.split(batch_size)]).double()
    with no_tf32():
        precision = on_manifold(fake, real, radii(real)).mean().item()  # samples on the reference manifold
        recall = on_manifold(real, fake, radii(fake)).mean().item()  # references on the sample manifold
    return precision, recall


def metrics(feats, ref, ref_pool=None, device='cpu'):
    """FID, sFID (when ref has spatial statistics), IS and precision/recall (when ref_pool is given, ADM's
    reference images) of sample features against reference statistics."""
    s = stats(feats)
    out = {'fid': frechet_distance(s['mu'], s['sigma'], ref['mu'], ref['sigma'])}
    if 'mu_s' in ref:
        out['sfid'] = frechet_distance(s['mu_s'], s['sigma_s'], ref['mu_s'], ref['sigma_s'])
    out['is'] = inception_score(feats['logits'], splits=min(10, len(feats['logits'])))  # min: toy sets only
    if ref_pool is not None:
        out['precision'], out['recall'] = precision_recall(ref_pool, feats['pool'], device=device)
    return out

# -----------------------------------------------------------------------------
# Small images (the built-in shapes, pixel tokens, any small cache): a metric that needs no downloaded network.
# Inception features mean little at 16x16 pixels, so the feature space is fit on the real training images
# themselves: the top principal components of their pixels. Samples are compared with held-out real images.


def pixels(images):
    """uint8 images (N, H, W, 3) -> (N, H*W*3) float64 in [0, 1]."""
    return np.asarray(images, dtype=np.float64).reshape(len(images), -1) / 255


class SmallImageMetric:
    """A Frechet distance in a fixed PCA space of pixels and a classifier's accuracy, both fit on real training
    images only (numpy and scipy, seconds on a CPU). Called on samples (N, H, W, 3) and their class labels (N,):
      fd: FD between the samples and the held-out real images, over the top `dim` principal components;
      fd_floor: the FD of as many real training images: what a perfect model scores at this N (FD is biased
        upwards at small N, so read fd against this floor, not against 0);
      class_acc: how often a k-nearest-neighbour classifier of the real training images (in the same space)
        names the class each sample was generated for; class_acc_real: its accuracy on the held-out images."""

    def __init__(self, train_images, train_labels, ref_images, ref_labels, dim=64, k=5):
        x = pixels(train_images)
        self.mean = x.mean(0)
        _, eigvec = np.linalg.eigh(np.cov(x, rowvar=False))  # eigenvalues in ascending order
        self.components = eigvec[:, ::-1][:, :dim]  # (H*W*3, dim) the top principal directions
        self.train, self.train_labels, self.k = (x - self.mean) @ self.components, np.asarray(train_labels), k
        ref = self.project(ref_images)  # (M, dim)
        self.ref_stats = ref.mean(0), np.cov(ref, rowvar=False)
        self.class_acc_real = float((self.classify(ref) == np.asarray(ref_labels)).mean())

    def project(self, images):
        return (pixels(images) - self.mean) @ self.components  # (N, dim)

    def classify(self, f):
        """The majority class of the k nearest training images of each row of f (N, dim); ties go to the lower class."""
        sq = (self.train ** 2).sum(1)
        votes = []
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


def check_images(images, where):
    if images.dtype not in (np.uint8, torch.uint8) or images.ndim != 4 or images.shape[-1] != 3:
        raise SystemExit(f"error: {where}: {images.dtype} array of shape {tuple(images.shape)}; expected uint8 "
                         f"images (N, H, W, 3), the layout sample.py and ADM write")


def load_images(path):
    """uint8 images (N, H, W, 3) from an .npz (arr_0) or a folder of images of one size (searched recursively)."""
    if os.path.isfile(path) and path.endswith('.npz'):
        with np.load(path) as f:
            if 'arr_0' not in f.files:
                raise SystemExit(f"error: {path} has no 'arr_0' (keys: {f.files}); expected uint8 images "
                                 f"(N, H, W, 3) in arr_0, as sample.py writes")
            images = f['arr_0']
    elif os.path.isdir(path):
        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs
                       if f.lower().endswith(IMAGE_EXTENSIONS))
        if not files:
            raise SystemExit(f"error: {path}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in this folder")
        images = [np.asarray(Image.open(f).convert('RGB')) for f in files]
        sizes = sorted({im.shape[:2] for im in images})
        if len(sizes) > 1:
            raise SystemExit(f"error: {path}: images of {len(sizes)} sizes (e.g. {sizes[0]} and {sizes[-1]}); "
                             f"resize them to one size first, as the evaluated samples have")
        images = np.stack(images)  # (N, H, W, 3)
    else:
        raise SystemExit(f"error: {path}: {'not an .npz file or a folder' if os.path.exists(path) else 'no such file'}")
    check_images(images, path)
    return images


def load_reference(path, model, batch_size=64, device='cpu', resize='tf1'):
    """(statistics, pool3 features or None) of a reference batch .npz (mu, sigma, optionally mu_s, sigma_s and
    the images arr_0, as ADM's VIRTUAL_imagenet256_labeled.npz) or of any image set."""
    if os.path.isfile(path) and path.endswith('.npz'):
        with np.load(path) as f:
            ref = {k: f[k] for k in STATS_SHAPES if k in f.files}
            keys = f.files
        if not ref and 'arr_0' not in keys:
            raise SystemExit(f"error: {path} has neither statistics (mu, sigma) nor images (arr_0); keys: {keys}")
        if ref:  # statistics given: the images, if any, serve precision/recall only (as in ADM's evaluator)
            needed = ['mu', 'sigma'] + (['mu_s', 'sigma_s'] if 'mu_s' in ref or 'sigma_s' in ref else [])
            for k in needed:
                if k not in ref or ref[k].shape != STATS_SHAPES[k]:
                    raise SystemExit(f"error: {path}: '{k}' is {ref[k].shape if k in ref else 'missing'}, expected "
                                     f"{STATS_SHAPES[k]} (ADM's reference batch layout: mu, sigma, mu_s, sigma_s)")
            pool = features(model, load_images(path), batch_size, device, resize)['pool'] if 'arr_0' in keys else None
            return ref, pool
    feats = features(model, load_images(path), batch_size, device, resize)
    return stats(feats), feats['pool']


def evaluate(images, ref, model, batch_size=64, device='cpu', resize='tf1'):
    """Metrics of uint8 images (N, H, W, 3) against a reference (a path, see load_reference): a dict with fid,
    sfid, is, and precision, recall when the reference has images."""
    ref_stats, ref_pool = load_reference(ref, model, batch_size, device, resize)
    return metrics(features(model, images, batch_size, device, resize), ref_stats, ref_pool, device)


def main(args):
    if args.ref is None and args.save_stats is None:
        raise SystemExit("error: give REF to compare SAMPLES with, or --save_stats OUT.npz to write their statistics")
    device = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    model = load_inception(args.inception, device)
    images = load_images(args.samples)  # read before the reference's features are computed: errors come first
    ref = load_reference(args.ref, model, args.batch_size, device, args.resize) if args.ref else None
    print(f"{args.samples}: {len(images)} images of {images.shape[1]}x{images.shape[2]}")
    feats = features(model, images, args.batch_size, device, args.resize)
    if args.save_stats:  # the images too, so that precision/recall work against this file
        np.savez(args.save_stats, arr_0=images, **stats(feats))
        print(f"wrote {args.save_stats} (mu, sigma, mu_s, sigma_s, arr_0; --resize {args.resize})")
    if ref is not None:
        names = {'fid': 'FID', 'sfid': 'sFID', 'is': 'IS', 'precision': 'precision', 'recall': 'recall'}
        for k, v in metrics(feats, *ref, device=device).items():
            print(f"{names[k]} {v:.4f}")


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('samples', help='.npz with arr_0 (uint8 N, H, W, 3) or a folder of images')
    parser.add_argument('ref', nargs='?', default=None,
                        help='reference batch .npz (mu, sigma, mu_s, sigma_s, arr_0) or another image set')
    parser.add_argument('--save_stats', default=None, metavar='OUT.npz',
                        help="write SAMPLES' statistics and images as a reference batch (ADM's layout)")
    parser.add_argument('--inception', default=DEFAULT_WEIGHTS, help=f'weights, from {WEIGHTS_URL}')
    parser.add_argument('--resize', default='tf1', choices=['tf1', 'pytorch'],
                        help="tf1: TF-1 bilinear, (x-128)/128 (ADM, torch-fidelity); pytorch: F.interpolate, "
                             "2x/255-1 (pytorch-fid); a reference's statistics must come from the same mode")
    parser.add_argument('--batch_size', type=int, default=64, help="ADM's evaluator: 64")
    parser.add_argument('--device', default=None, help='default: cuda if available, else cpu')
    return parser


if __name__ == '__main__':
    main(get_parser().parse_args())
