"""
The causal Transformer of Heptapod (Sec. 4.2, Table 3 of the paper).

The sequence is [class, x_1, ..., x_{N-1}]: a class token, then the image tokens in generation order.
Each token is embedded with the learnable embedding of *its own* 2D grid position (never the next one:
the model is not told where the next token will be, Fig. 4 right). Attention is causal, so h_t, the
output after the class and t tokens, has seen exactly the prefix of length t. A prediction head
(heads.py) turns these states into a distribution over the positions not yet seen.

For the 1D baselines of Table 1 (one next token, `--head linear`) the model is told the target: the
embedding of the next token's position is added to each input, as RAR's target-aware position
embedding (RAR Eq. 4; the paper's Fig. 4 middle).

The building blocks (Attention, MLP, Block) are shared with the bidirectional heads in heads.py.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

# Table 3 of the paper (FFN dim = 4 x width), with the diffusion MLP of continuous tokens sized as the
# paper's appendix A (from MAR): {6, 8, 12} blocks of width {1024, 1280, 1536}. tiny and small are ours, for CPUs.
SIZES = {
    'tiny': dict(n_layer=2, n_embd=64, n_head=4, diffusion_depth=2, diffusion_width=64),
    'small': dict(n_layer=6, n_embd=256, n_head=8, diffusion_depth=3, diffusion_width=384),
    'B': dict(n_layer=12, n_embd=768, n_head=12, diffusion_depth=6, diffusion_width=1024),
    'L': dict(n_layer=16, n_embd=1024, n_head=16, diffusion_depth=8, diffusion_width=1280),
    'H': dict(n_layer=20, n_embd=1280, n_head=16, diffusion_depth=12, diffusion_width=1536),  # head dim 80
}


class KVCache:
    """Keys and values of every layer's past tokens, for incremental decoding (after gpt-fast's KVCache).
    A plain object, not a Module, so it never enters the state dict."""

    def __init__(self, batch_size, n_head, max_len, head_dim, dtype, device):
        self.k = torch.zeros(batch_size, n_head, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)

    def update(self, input_pos, k, v):
        # input_pos: (T,) sequence indices of the new tokens; k, v: (B, n_head, T, head_dim)
        self.k[:, :, input_pos] = k
        self.v[:, :, input_pos] = v
        return self.k, self.v


class Attention(nn.Module):
    """Multi-head self-attention through F.scaled_dot_product_attention (flash kernels on GPU)."""

    def __init__(self, n_embd, n_head):
        super().__init__()
        assert n_embd % n_head == 0
        self.n_head = n_head
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)
        self.cache = None  # a KVCache while sampling, see Transformer.setup_cache

    def forward(self, x, is_causal, input_pos=None):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)  # 3 x (B, nh, T, hd)
        if input_pos is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
        else:  # cached decoding: store the new keys/values, attend to every cached step up to one's own
            k, v = self.cache.update(input_pos, k, v)  # (B, nh, max_len, hd)
            mask = torch.arange(k.size(2), device=x.device) <= input_pos[:, None]  # (T, max_len)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))  # (B, T, C)


class MLP(nn.Module):
    def __init__(self, n_embd):
        super().__init__()
        self.fc = nn.Linear(n_embd, 4 * n_embd)  # FFN dim = 4 x hidden size (Table 3)
        self.proj = nn.Linear(4 * n_embd, n_embd)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """Pre-norm Transformer block; causal in the backbone, bidirectional in the heads."""

    def __init__(self, n_embd, n_head):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = Attention(n_embd, n_head)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = MLP(n_embd)

    def forward(self, x, is_causal=False, input_pos=None):
        x = x + self.attn(self.ln_1(x), is_causal, input_pos)
        return x + self.mlp(self.ln_2(x))


def run_block(block, *args):
    """block(*args), recomputing its activations during backward when block.grad_checkpointing is set
    (train.py --grad_checkpointing: memory for compute, e.g. H with dense supervision)."""
    if block.training and getattr(block, 'grad_checkpointing', False):
        return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
    return block(*args)


def init_weights(module, n_layer):
    """GPT-2 initialisation (as nanoGPT): N(0, 0.02) for linears and embeddings, zero biases,
    and residual projections scaled by 1/sqrt(2 n_layer)."""
    for name, p in module.named_parameters():
        if name.endswith('bias'):
            nn.init.zeros_(p)
        elif name.endswith('proj.weight'):
            nn.init.normal_(p, std=0.02 / math.sqrt(2 * n_layer))
        elif p.dim() >= 2:
            nn.init.normal_(p, std=0.02)
    for m in module.modules():  # LayerNorm: weight 1, bias 0 (the bias is zeroed above)
        if isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)


class Transformer(nn.Module):
    """The causal backbone: class token + (token, own 2D position) inputs -> hidden states h."""

    def __init__(self, vocab_size, num_classes, grid_size, n_layer, n_embd, n_head, target_aware=False, token_dim=0):
        super().__init__()
        N = grid_size * grid_size
        # discrete tokens are looked up; continuous tokens (token_dim > 0) are linearly projected
        self.tok_emb = nn.Linear(token_dim, n_embd) if token_dim else nn.Embedding(vocab_size, n_embd)
        self.pos_emb = nn.Embedding(N, n_embd)  # the token's own 2D position, row-major index
        self.cls_emb = nn.Embedding(num_classes + 1, n_embd)  # the last row is 'no class', for CFG dropout
        self.target_pos_emb = nn.Embedding(N, n_embd) if target_aware else None  # RAR Eq. 4, 1D heads only
        self.blocks = nn.ModuleList([Block(n_embd, n_head) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd)
        init_weights(self, n_layer)

    def forward(self, idx, labels, pos, target_pos=None):
        """Training and reference path. idx: (B, T) token ids or (B, T, D) vectors in generation order;
        pos: (B, T) their grid positions; labels: (B,); target_pos: (B, T+1) next positions (target-aware models only).
        Returns h: (B, T+1, C), where h[:, t] has seen the class and the first t tokens."""
        x = torch.cat([self.cls_emb(labels)[:, None], self.tok_emb(idx) + self.pos_emb(pos)], dim=1)  # (B, 1+T, C)
        return self.run(x, target_pos, is_causal=True)

    def run(self, x, target_pos, is_causal=False, input_pos=None):
        if self.target_pos_emb is not None:
            x = x + self.target_pos_emb(target_pos)  # the position each input must predict (RAR Eq. 4)
        for block in self.blocks:
            x = run_block(block, x, is_causal, input_pos)
        return self.ln_f(x)

    # --- incremental decoding with a KV cache (sample.py) ---

    def setup_cache(self, batch_size, max_len, dtype=None):
        p = self.ln_f.weight
        for block in self.blocks:
            block.attn.cache = KVCache(batch_size, block.attn.n_head, max_len, p.size(0) // block.attn.n_head,
                                       dtype or p.dtype, p.device)

    def clear_cache(self):
        for block in self.blocks:
            block.attn.cache = None

    def prefill(self, labels, target_pos=None):
        """Put the class token into slot 0 of the cache; returns its state h_0: (B, 1, C)."""
        x = self.cls_emb(labels)[:, None]  # (B, 1, C)
        return self.run(x, target_pos, input_pos=torch.zeros(1, dtype=torch.long, device=x.device))

    def decode(self, idx, pos, input_pos, target_pos=None):
        """Append tokens idx at grid positions pos (B, T') as sequence steps input_pos (T',);
        returns their states: (B, T', C)."""
        return self.run(self.tok_emb(idx) + self.pos_emb(pos), target_pos, input_pos=input_pos)


def make_orders(batch_size, N, order, generator, rar_prob=1.0):
    """The generation order of each sample, (B, N) grid positions: raster, uniformly random (Heptapod's
    2D-random and the 1D-random baseline), or 'rar': random with probability rar_prob, raster otherwise,
    per sample (RAR Sec. 3.2). All randomness comes from `generator`."""
    raster = torch.arange(N, device=generator.device).expand(batch_size, N)
    if order == 'raster':
        return raster
    permuted = torch.rand(batch_size, N, generator=generator, device=generator.device).argsort(dim=1)
    if order == 'rar':
        coin = torch.rand(batch_size, 1, generator=generator, device=generator.device) < rar_prob
        return torch.where(coin, permuted, raster)
    return permuted
