"""
The prediction heads of Heptapod (Sec. 4.3, Fig. 5), the token heads, and `Heptapod`, the whole model: the causal
Transformer of model.py + a prediction head + a token head. Training is train.py, sampling sample.py.

Next 2D distribution prediction: after each causal step t the head predicts the distribution of the tokens at
the positions not yet seen, from the causal states h_0..h_t (h_0 is the class state).
- GlobalHead (Fig. 5 left): h_1..h_t at their own grid positions, learnable mask tokens elsewhere, position
  embeddings added, a bidirectional Transformer over the whole grid: it predicts all N positions (w = N).
- LocalHead (Fig. 5 right): learnable queries for the chunk of w positions that holds the next position
  cross-attend to h_0..h_t, then self-attend within the chunk.
A token head scores the positions not yet seen: a linear classifier with cross-entropy for discrete (VQ) tokens,
or MAR's diffusion MLP conditioned on the head's output for continuous (VAE) tokens. Density n (`--density`, Sec.
5.3): n prefixes per sequence in one batched head call. The 1D baselines of Table 1 (`--head linear`) have no
head: each causal state predicts the next token, as a language model; next-patch prediction is Heptapod.npp_loss.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import Block, KVCache, Transformer, init_weights, run_block


class GlobalHead(nn.Module):
    """Bidirectional Transformer over the whole grid: prefix states at their positions, mask tokens elsewhere."""

    def __init__(self, grid_size, n_layer, n_embd, n_head, init='mar'):
        super().__init__()
        N = grid_size * grid_size
        self.mask_token = nn.Parameter(torch.zeros(1, 1, n_embd))
        self.pos_emb = nn.Parameter(torch.zeros(1, N, n_embd))  # a learnable embedding per grid position
        self.blocks = nn.ModuleList([Block(n_embd, n_head) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd)
        init_weights(self, init, n_layer)  # mask token and position embeddings N(0, 0.02), as MAR

    def forward(self, h, orders, prefix_lens):
        """h (B, N, C): h[:, t] has seen t tokens; orders (B, N): positions in reading order; prefix_lens (B, n) in
        [0, N). Returns for the B*n prefixes z (B*n, N, C), the grid positions of z (B*n, N), which are seen."""
        B, N, C = h.shape
        n = prefix_lens.size(1)
        rank = orders.argsort(dim=1)  # (B, N) the step at which each grid position is read
        h_tok = F.pad(h[:, 1:], (0, 0, 0, 1))  # (B, N, C) state after each token; the last is never read
        grid_h = h_tok.gather(1, rank[..., None].expand(B, N, C))  # (B, N, C) each state at its own position
        seen = (rank[:, None, :] < prefix_lens[:, :, None]).flatten(0, 1)  # (B*n, N)
        x = torch.where(seen[..., None], grid_h.repeat_interleave(n, 0), self.mask_token) + self.pos_emb
        x = torch.cat([h[:, :1].repeat_interleave(n, 0), x], dim=1)  # (B*n, 1+N, C) class state first
        for block in self.blocks:
            x = run_block(block, x, False)  # bidirectional
        positions = torch.arange(N, device=h.device).expand(B * n, N)
        return self.ln_f(x[:, 1:]), positions, seen


class CrossAttention(nn.Module):
    """Queries attend to a memory (the causal prefix states), through F.scaled_dot_product_attention."""

    def __init__(self, n_embd, n_head):
        super().__init__()
        self.n_head = n_head
        self.q = nn.Linear(n_embd, n_embd)
        self.kv = nn.Linear(n_embd, 2 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)
        self.cache = None  # while sampling, the memory's keys and values (LocalHead.setup_cache)

    def keys_values(self, memory):
        B, T, C = memory.shape
        return self.kv(memory).view(B, T, 2, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)  # 2 x (B, nh, T, hd)

    def forward(self, x, k, v, mask):
        # x: (B, Tq, C) queries; k, v: (B, nh, Tk, hd); mask: (B, 1, Tq, Tk) bool, True where a query may look
        B, Tq, C = x.shape
        q = self.q(x).view(B, Tq, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, Tq, hd)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(y.transpose(1, 2).reshape(B, Tq, C))  # (B, Tq, C)


class LocalHead(nn.Module):
    """Queries for the chunk of the next position: cross-attention to the prefix, then self-attention in the chunk."""

    def __init__(self, grid_size, window, n_layer, n_embd, n_head, init='mar'):
        super().__init__()
        s = math.isqrt(window)  # chunks are s x s squares that tile the grid
        assert s * s == window and grid_size % s == 0, f"window {window} does not tile a {grid_size}x{grid_size} grid"
        self.window = window
        self.query = nn.Parameter(torch.zeros(1, 1, n_embd))
        self.pos_emb = nn.Parameter(torch.zeros(1, grid_size * grid_size, n_embd))
        self.ln_cross = nn.ModuleList([nn.LayerNorm(n_embd) for _ in range(n_layer)])
        self.cross = nn.ModuleList([CrossAttention(n_embd, n_head) for _ in range(n_layer)])
        self.blocks = nn.ModuleList([Block(n_embd, n_head) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd)
        rc = torch.arange(grid_size) // s
        chunk_of = (rc[:, None] * (grid_size // s) + rc[None, :]).flatten()  # (N,) chunk of each position
        self.register_buffer('chunk_of', chunk_of, persistent=False)
        # the positions of each chunk, row-major inside it: (num_chunks, w)
        self.register_buffer('chunk_pos', chunk_of.argsort(stable=True).view(-1, window), persistent=False)
        init_weights(self, init, n_layer)

    def memory(self, h, pos):
        """States h (B, T, C) + the embedding of the position pos (B, T') just read (the class state h_0: none)."""
        return h + F.pad(self.pos_emb[0, pos], (0, 0, h.size(1) - pos.size(1), 0))

    def forward(self, h, orders, prefix_lens):
        """As GlobalHead.forward, for the w positions of the chunk of orders[:, t]: z (B*n, w, C), positions, seen."""
        B, N, C = h.shape
        n, w = prefix_lens.size(1), self.window
        positions = self.chunk_pos[self.chunk_of[orders.gather(1, prefix_lens)]]  # (B, n, w)
        rank = orders.argsort(dim=1)  # (B, N)
        seen = rank.gather(1, positions.flatten(1)).view(B, n, w) < prefix_lens[..., None]  # (B, n, w)
        if self.cross[0].cache is None:  # the memory h_0..h_{N-1}, projected here; while sampling, in the cache
            memory = self.memory(h, orders[:, :-1])  # (B, N, C)
            kv = [cross.keys_values(memory) for cross in self.cross]
        else:
            kv = [(cross.cache.k, cross.cache.v) for cross in self.cross]
        mask = torch.arange(N, device=h.device) <= prefix_lens[..., None]  # (B, n, N) h_0..h_t of each prefix
        mask = mask[:, :, None].expand(B, n, w, N).reshape(B, 1, n * w, N)  # (B, 1, n*w, N)
        x = (self.query + self.pos_emb[0, positions]).view(B, n * w, C)  # (B, n*w, C) all prefixes of a sample
        for ln, cross, (k, v), block in zip(self.ln_cross, self.cross, kv, self.blocks):
            x = x + cross(ln(x), k, v, mask)  # the n*w queries of a sample share one memory projection
            x = run_block(block, x.view(B * n, w, C), False).view(B, n * w, C)  # bidirectional, chunk by chunk
        return self.ln_f(x).view(B * n, w, C), positions.view(B * n, w), seen.view(B * n, w)

    # --- sampling: each memory entry's keys and values projected once, when its state is made (sample.py) ---

    def setup_cache(self, batch_size, max_len):
        for cross in self.cross:
            cross.cache = KVCache(batch_size, cross.n_head, max_len, cross.proj.in_features // cross.n_head)

    def clear_cache(self):
        for cross in self.cross:
            cross.cache = None

    def extend(self, h, pos, input_pos):
        """The new states h (B, T, C), after reading positions pos, into the cache as entries input_pos (T,)."""
        memory = self.memory(h, pos)
        for cross in self.cross:
            cross.cache.update(input_pos, *cross.keys_values(memory))


# -----------------------------------------------------------------------------
# Token heads: what turns the head's output z at a position into a token distribution (Sec. 3)


class LinearClassifier(nn.Module):
    """Discrete tokens: a linear classifier over the vocabulary, trained with cross-entropy."""

    def __init__(self, n_embd, vocab_size, init='mar'):
        super().__init__()
        self.linear = nn.Linear(n_embd, vocab_size)
        init_weights(self, init)

    def loss(self, z, targets, generator=None):
        # z: (M, C) the head's output at the M scored positions; targets: (M,) their token ids
        return F.cross_entropy(self.linear(z).float(), targets)  # the mean over the scored tokens

    def logits(self, z, cfg=1.0):
        """(..., V) logits of z (..., C); with cfg != 1, z holds the 'no class' rows as its second half, and the
        result is the guided uncond + cfg * (cond - uncond) of the first half."""
        logits = self.linear(z).float()
        if cfg != 1.0:
            cond, uncond = logits.chunk(2)
            logits = uncond + cfg * (cond - uncond)
        return logits

    def sample(self, z, generator, temperature=1.0, cfg=1.0, top_k=None, diffusion_steps=None, run=None):
        """One token per row of z (B, C), or of its first half with CFG (see logits)."""
        logits = self.logits(z, cfg) / temperature  # (B, V)
        if top_k:
            kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
            logits = logits.masked_fill(logits < kth, float('-inf'))
        return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)[:, 0]  # (B,)


def timestep_embedding(t, dim=256, max_period=10000):
    """Sinusoidal embedding of integer timesteps, cos before sin (DiT and MAR)."""
    freqs = torch.exp(-math.log(max_period) * torch.arange(dim // 2, device=t.device) / (dim // 2))
    args = t[:, None].float() * freqs[None]  # (M, dim/2)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (M, dim)


class ResBlock(nn.Module):
    """MLP block with adaptive LayerNorm: shift and scale the normalised input, gate the residual."""

    def __init__(self, width):
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.ada = nn.Linear(width, 3 * width)  # shift, scale and gate from SiLU(condition)

    def forward(self, x, shift, scale, gate):
        return torch.addcmul(x, gate, self.mlp(torch.addcmul(shift, self.norm(x), 1 + scale)))


class DiffusionMLP(nn.Module):
    """MAR's denoising MLP (SimpleMLPAdaLN, LTH14/mar models/diffloss.py): (x_t, t, z) -> the noise and v of x_t."""

    def __init__(self, token_dim, n_embd, width, depth):
        super().__init__()
        self.time_embed = nn.Sequential(nn.Linear(256, width), nn.SiLU(), nn.Linear(width, width))
        self.cond_embed = nn.Linear(n_embd, width)
        self.input_proj = nn.Linear(token_dim, width)
        self.blocks = nn.ModuleList([ResBlock(width) for _ in range(depth)])
        self.final_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Linear(width, 2 * width)
        self.final = nn.Linear(width, 2 * token_dim)  # noise and v: learned variance (IDDPM)
        for m in self.modules():  # MAR's initialisation
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for m in (self.time_embed[0], self.time_embed[2]):
            nn.init.normal_(m.weight, std=0.02)
        for m in [b.ada for b in self.blocks] + [self.final_ada, self.final]:
            nn.init.zeros_(m.weight)  # every block starts as the identity, and the output at 0
            nn.init.zeros_(m.bias)

    def forward(self, x, t, z):
        return self.run(x, self.time_embed(timestep_embedding(t)) + self.cond_embed(z), *self.modulation())

    def modulation(self):  # every block's modulation weights as one matrix: one matmul for all of them
        ada = [b.ada for b in self.blocks] + [self.final_ada]
        return torch.cat([m.weight for m in ada]), torch.cat([m.bias for m in ada])  # ((3 depth + 2) W, W), (..)

    def run(self, x, y, weight, bias):
        # x: (M, D) noisy tokens; y: (M, W) the condition, time + z
        mods = F.linear(F.silu(y), weight, bias).split(y.size(-1), dim=-1)  # shift, scale, gate per block, ...
        x = self.input_proj(x)
        for b, block in enumerate(self.blocks):
            x = run_block(block, x, *mods[3 * b:3 * b + 3])
        return self.final(torch.addcmul(mods[-2], self.final_norm(x), 1 + mods[-1]))  # (M, 2D)

    def denoiser(self, z, timesteps):
        """forward for sampling, z (M, C) fixed: (x, k) -> the output at timesteps[k], with what no step changes (the
        time embeddings, z's projection, the modulation weights) computed once."""
        t_emb, cond, mod = self.time_embed(timestep_embedding(timesteps)), self.cond_embed(z), self.modulation()
        return lambda x, k: self.run(x, t_emb[k] + cond, *mod)


class GaussianDiffusion(nn.Module):
    """DDPM, cosine schedule over 1000 steps, epsilon prediction, a learned variance between the posterior's and
    beta_t (IDDPM, as MAR's diffusion/); fewer sampling steps respace it (IDDPM respace.py). The float64 tables
    are buffers, not saved."""

    def __init__(self, num_sampling_steps=1000, num_steps=1000):
        super().__init__()
        s = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
        alpha_bar = torch.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2  # Nichol & Dhariwal, Eq. 17
        betas = (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)
        alphas_cumprod = torch.cumprod(1 - betas, dim=0)
        # respacing (IDDPM respace.py): round(k (T-1) / (S-1)) for k = 0..S-1, both ends kept
        timesteps = torch.round(torch.arange(num_sampling_steps, dtype=torch.float64)
                                * (num_steps - 1) / max(num_sampling_steps - 1, 1)).long()
        ac = alphas_cumprod[timesteps]
        ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
        betas = 1 - ac / ac_prev
        posterior_var = betas * (1 - ac_prev) / (1 - ac)
        tables = dict(timesteps=timesteps, betas=betas, alphas_cumprod=ac,
                      posterior_log_var=torch.log(torch.cat([posterior_var[1:2], posterior_var[1:]])),  # clipped at t=0
                      posterior_coef_x0=betas * ac_prev.sqrt() / (1 - ac),
                      posterior_coef_xt=(1 - ac_prev) * (1 - betas).sqrt() / (1 - ac))
        for name, table in tables.items():
            self.register_buffer(name, table, persistent=False)
        # sample()'s per-step constants, as Python numbers: (sqrt(1 - ac), sqrt(ac), the posterior's coefficients,
        # and logvar = log_var + (v + 1) / 2 (log beta - log_var), as std = exp(f v + e))
        f = (betas.log() - tables['posterior_log_var']) / 4
        self.steps = torch.stack([(1 - ac).sqrt(), ac.sqrt(), tables['posterior_coef_x0'],
                                  tables['posterior_coef_xt'], f, tables['posterior_log_var'] / 2 + f], 1).tolist()

    def _at(self, a, i):
        return a[i].float()[:, None]  # (M, 1)

    def q_sample(self, x0, i, noise):
        return self._at(self.alphas_cumprod.sqrt(), i) * x0 + self._at((1 - self.alphas_cumprod).sqrt(), i) * noise

    def posterior(self, x0, x_t, i):
        """Mean and log-variance of q(x_{t-1} | x_t, x0)."""
        mean = self._at(self.posterior_coef_x0, i) * x0 + self._at(self.posterior_coef_xt, i) * x_t
        return mean, self._at(self.posterior_log_var, i)

    def p_mean_logvar(self, eps, v, x_t, i, clip=False):
        """p(x_{t-1} | x_t): x0 from the noise (clipped only for bounded tokens, as IDDPM's images; MAR's latents are
        not), the posterior mean, and a log-variance interpolated by v between the posterior's and log beta_t."""
        ac = self._at(self.alphas_cumprod, i)
        x0 = (x_t - (1 - ac).sqrt() * eps) / ac.sqrt()
        if clip:
            x0 = x0.clamp(-1, 1)
        frac = (v + 1) / 2
        logvar = frac * self._at(self.betas.log(), i) + (1 - frac) * self._at(self.posterior_log_var, i)
        return self.posterior(x0, x_t, i)[0], logvar

    def loss(self, net, x0, z, i, noise):
        """IDDPM's hybrid loss per row (M,) at timestep indices i: MSE on the noise + the variational bound, which
        trains only the variance."""
        x_t = self.q_sample(x0, i, noise)
        eps, v = net(x_t, self.timesteps[i], z).float().chunk(2, dim=-1)
        mse = ((noise - eps) ** 2).mean(-1)
        mean, logvar = self.p_mean_logvar(eps.detach(), v, x_t, i)
        true_mean, true_logvar = self.posterior(x0, x_t, i)
        kl = 0.5 * (-1 + logvar - true_logvar + torch.exp(true_logvar - logvar)
                    + (true_mean - mean) ** 2 * torch.exp(-logvar))  # KL(q || p) of two Gaussians
        nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * logvar)  # at t = 0, the decoder term
        vb = torch.where(i == 0, nll.mean(-1), kl.mean(-1)) / math.log(2.0)  # in bits, as IDDPM
        return mse + vb

    def sample(self, denoise, noise, cfg=None, clip=False):
        """Ancestral sampling (p_mean_logvar per step) from x = noise[0] (B, D), noise[S - k] entering at step k,
        denoise(x, k) the network at timesteps[k]. With cfg (a 0-d tensor) denoise runs on 2B rows, 'no class'
        second, and the noise is guided. A fixed function of its tensors: a CUDA graph can replay it. The first
        respaced step multiplies the noise's error by ~630 (beta ~ 1 - 2.5e-6): small models need clip=True."""
        x, S = noise[0], len(self.steps)
        for k in reversed(range(S)):
            eps, v = denoise(x if cfg is None else torch.cat([x, x]), k).float().chunk(2, dim=-1)
            if cfg is not None:
                (eps, uncond), v = eps.chunk(2), v[:len(x)]
                eps = uncond + cfg * (eps - uncond)
            sqrt_1m_ac, sqrt_ac, coef_x0, coef_xt, f, e = self.steps[k]
            x0 = (x - sqrt_1m_ac * eps) / sqrt_ac
            if clip:
                x0 = x0.clamp(-1, 1)
            mean = coef_x0 * x0 + coef_xt * x
            x = torch.addcmul(mean, (v * f + e).exp(), noise[S - k]) if k > 0 else mean
        return x


def discretized_gaussian_log_likelihood(x, mean, log_scale):
    """log p(x) of a Gaussian discretised to bins of 2/255 (ADM's decoder term, tanh approximation of the CDF)."""
    def cdf(u):
        return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (u + 0.044715 * u ** 3)))
    inv_std = torch.exp(-log_scale)
    cdf_plus, cdf_min = cdf(inv_std * (x - mean + 1 / 255)), cdf(inv_std * (x - mean - 1 / 255))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


class DiffusionLoss(nn.Module):
    """Continuous tokens (MAR): the diffusion MLP models p(token | z) at each position."""

    repeats = 4  # each target is noised 4 times per batch (MAR's diffusion_batch_mul in its README)

    def __init__(self, token_dim, n_embd, width, depth, clip_denoised=False):
        super().__init__()
        self.clip_denoised = clip_denoised  # tokens bounded to [-1, 1] (pixels), not VAE latents
        self.net = DiffusionMLP(token_dim, n_embd, width, depth)
        self.train_diffusion = GaussianDiffusion(1000)
        self.respaced = {}  # (sampling steps, device) -> GaussianDiffusion, made at first use

    def loss(self, z, targets, generator):
        # z: (M, C) the head's output at the M scored positions; targets: (M, D) their tokens
        x0, z = targets.repeat(self.repeats, 1), z.repeat(self.repeats, 1)  # (repeats * M, D), (repeats * M, C)
        i = torch.randint(len(self.train_diffusion.timesteps), (len(x0),), generator=generator, device=x0.device)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device)  # a timestep and noise per row
        return self.train_diffusion.loss(self.net, x0, z, i, noise).mean()  # over the scored tokens and repeats

    def sample(self, z, generator, temperature=1.0, cfg=1.0, top_k=None, diffusion_steps=100, run=None):
        """A token (B, D) per row of z (B, C) (its first half with CFG) in `diffusion_steps` (MAR: 100), all noise drawn
        first: the chain is a function of (z, noise) that `run` may replay as a CUDA graph (sample.CUDAGraphs)."""
        key = (diffusion_steps, str(z.device))
        if key not in self.respaced:
            self.respaced[key] = GaussianDiffusion(diffusion_steps).to(z.device)
        diffusion, B = self.respaced[key], len(z) // 2 if cfg != 1.0 else len(z)
        noise = torch.randn(diffusion_steps + 1, B, self.net.final.out_features // 2, generator=generator,
                            device=z.device)  # (S + 1, B, D): the start, then one per step, in the order drawn
        noise[1:] *= temperature
        cfg = None if cfg == 1.0 else torch.full((), cfg, device=z.device)

        def chain(z, noise, cfg):
            return diffusion.sample(self.net.denoiser(z, diffusion.timesteps), noise, cfg, self.clip_denoised)
        return chain(z, noise, cfg) if run is None else run('token head', chain, z, noise, cfg)


def linear_flops(module):
    """FLOPs of one row through every nn.Linear of module: 2 per weight (a multiply and an add)."""
    return 2 * sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


def sample_prefix_lens(batch_size, density, N, generator):
    """n distinct prefix lengths per sequence, uniform over [0, N): the steps the head is trained at."""
    rand = torch.rand(batch_size, N, generator=generator, device=generator.device)
    return rand.argsort(dim=1)[:, :density]  # (B, n)


def take(x, index):
    """x[b, index[b, k]] for tokens x: (B, N) ids or (B, N, D) vectors; index: (B, K)."""
    return x.gather(1, index if x.dim() == 2 else index[..., None].expand(-1, -1, x.size(-1)))


class Heptapod(nn.Module):
    """Causal Transformer (model.py) + prediction head + token head: a linear classifier for ids in [0, vocab_size)
    (token_dim 0), MAR's diffusion MLP for D-dim vectors. Its arguments, `config`, are saved in every checkpoint."""

    def __init__(self, vocab_size, num_classes, grid_size, n_layer, n_embd, n_head, head='global', head_depth=None,
                 window=None, token_dim=0, diffusion_width=None, diffusion_depth=None, clip_denoised=False,
                 target_position='shifted', init='mar'):
        super().__init__()
        # the 1D models are told where their next token is (Fig. 4 middle, or RAR's 'added'); the 2D ones never are
        target_position = target_position if head == 'linear' else None
        # the head has the backbone's width and, by default, its depth (Sec. 5.1, Table 4)
        head_depth = (head_depth or n_layer) if head != 'linear' else None
        # what the model is, read by train.py and sample.py (never from the class of a module that
        # torch.compile or DDP may have wrapped) and saved in every checkpoint
        self.config = dict(vocab_size=vocab_size, num_classes=num_classes, grid_size=grid_size, n_layer=n_layer,
                           n_embd=n_embd, n_head=n_head, head=head, head_depth=head_depth, window=window,
                           token_dim=token_dim, diffusion_width=diffusion_width, diffusion_depth=diffusion_depth,
                           clip_denoised=clip_denoised, target_position=target_position, init=init)
        self.grid_size = grid_size
        self.num_classes = num_classes
        self.transformer = Transformer(vocab_size, num_classes, grid_size, n_layer, n_embd, n_head,
                                       target_position=target_position, token_dim=token_dim, init=init)
        if head == 'global':
            self.head = GlobalHead(grid_size, head_depth, n_embd, n_head, init)
        elif head == 'local':
            self.head = LocalHead(grid_size, window, head_depth, n_embd, n_head, init)
        else:
            assert head == 'linear', head
            self.head = None
        if token_dim:
            self.token_head = DiffusionLoss(token_dim, n_embd, diffusion_width, diffusion_depth, clip_denoised)
        else:
            self.token_head = LinearClassifier(n_embd, vocab_size, init)

    def forward(self, idx, labels, orders, prefix_lens, generator=None, patch_size=1):
        """The mean loss of the scored tokens. idx: (B, N) ids or (B, N, D) vectors in raster order; orders (B, N): the
        generation orders; prefix_lens (B, n): the steps the 2D heads supervise; patch_size > 1: NPP."""
        if patch_size > 1:
            return self.npp_loss(idx, labels, patch_size)
        seq = take(idx, orders)  # tokens in generation order
        if self.config['head'] == 'linear':  # 1D: h_t predicts the token at orders[:, t], every step scored
            h = self.transformer(seq[:, :-1], labels, orders[:, :-1], target_pos=orders)  # (B, N, C)
            z, targets = h.flatten(0, 1), seq.flatten(0, 1)  # (B*N, C), (B*N[, D])
        else:  # 2D: h_0..h_t predict the positions not yet seen
            h = self.transformer(seq[:, :-1], labels, orders[:, :-1])  # (B, N, C)
            z, positions, seen = self.head(h, orders, prefix_lens)  # (B*n, P, C), (B*n, P), (B*n, P)
            targets = take(idx.repeat_interleave(prefix_lens.size(1), 0), positions)  # (B*n, P[, D])
            # the token head runs only on the unseen positions, packed: (M, C), (M[, D]) with M = sum of (P - seen)
            z, targets = z[~seen], targets[~seen]
        return self.token_head.loss(z, targets, generator)

    def npp_loss(self, idx, labels, p):
        """Next-patch prediction (NPP Sec. 3.2) of the 1D raster model: a p x p patch is one input, the mean of its
        token embeddings (Eq. 2) at its patch-grid coordinates (NPP's RoPE keeps them); each step's distribution is
        scored against all p^2 codes of the next patch (Eq. 3)."""
        B, G, C, t = len(idx), self.grid_size, self.config['n_embd'], self.transformer
        g = G // p
        emb = t.tok_emb(idx).view(B, g, p, g, p, C).mean(dim=(2, 4)).flatten(1, 2)  # (B, g*g, C)
        pos = (torch.arange(g, device=idx.device)[:, None] * G + torch.arange(g, device=idx.device)).flatten()
        x = torch.cat([t.cls_emb(labels)[:, None], emb[:, :-1]], 1)  # (B, g*g, C): class, then patches
        h = t.run(t.embed(x, pos[:-1].expand(B, -1), pos.expand(B, -1)), is_causal=True)  # told the next patch
        codes = idx.view(B, g, p, g, p).permute(0, 1, 3, 2, 4).reshape(B, g * g, p * p)  # each patch's codes
        logp = self.token_head.linear(h).float().log_softmax(dim=-1)  # (B, g*g, V)
        return -logp.gather(-1, codes).mean()  # Eq. 3: the mean over all N codes

    def flops_per_image(self, density):
        """Training FLOPs per image by part (3 x forward; a matmul m x k by k x n counts 2mkn). A layer of width C
        over T tokens: 24 T C^2 (linears) + 4 T Tk C (attention to Tk keys, halved when causal). Backbone: T = N.
        Global head: n prefixes of T = N+1. Local head: n prefixes of w queries, + cross-attention per layer (8 w C^2
        + 4 w N C; keys once per image, 4 N C^2). Token head: 2 x its weights per scored position (x 4 noised copies
        for diffusion): N for the 1D models, (w + 1) / 2 unseen of the w per prefix on average for the 2D heads."""
        cfg = self.config
        C, L, N, kind = cfg['n_embd'], cfg['n_layer'], self.grid_size ** 2, cfg['head']
        backbone = L * (24 * N * C ** 2 + 2 * N * N * C)
        if kind == 'linear':
            head, scored = 0, N
        elif kind == 'global':
            T = N + 1
            head = density * cfg['head_depth'] * (24 * T * C ** 2 + 4 * T * T * C)
            scored = density * (N + 1) / 2
        else:
            w = cfg['window']
            per_layer = density * (24 * w * C ** 2 + 4 * w * w * C + 8 * w * C ** 2 + 4 * w * N * C) + 4 * N * C ** 2
            head, scored = cfg['head_depth'] * per_layer, density * (w + 1) / 2
        rows = scored * (DiffusionLoss.repeats if cfg['token_dim'] else 1)
        return {'backbone': 3 * backbone, 'head': 3 * head, 'token head': 3 * linear_flops(self.token_head) * rows}
