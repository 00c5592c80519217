"""
The causal Transformer of Heptapod (Sec. 4.2, Table 3): the first half of the model. The whole model, this
backbone + a prediction head + a token head, is `heads.Heptapod`; training is train.py, sampling sample.py.

The sequence is [class, x_1, ..., x_{N-1}]: a class token, then the image tokens in generation order, each
embedded with the embedding of *its own* 2D grid position: the model is never told where the next token will be
(Fig. 4 right). Attention is causal, so h_t, the output after the class and t tokens, has seen exactly t tokens.
The 1D baselines of Table 1 (`--head linear`), told their target's position, are one branch of `Transformer.embed`.
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
    """Keys and values of past tokens for incremental decoding (gpt-fast's KVCache); a plain object, out of the
    state dict, whose storage is made at the first update in the keys' dtype (bf16 under autocast)."""

    def __init__(self, batch_size, n_head, max_len, head_dim):
        self.shape = (batch_size, n_head, max_len, head_dim)
        self.k = self.v = None

    def update(self, input_pos, k, v):
        # input_pos: (T,) sequence indices of the new entries; k, v: (B, n_head, T, head_dim)
        if self.k is None:
            self.k, self.v = k.new_zeros(self.shape), v.new_zeros(self.shape)  # (B, n_head, max_len, head_dim)
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
    """block(*args), recomputing its activations in backward with train.py --grad_checkpointing (memory for time)."""
    if block.training and getattr(block, 'grad_checkpointing', False):
        return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
    return block(*args)


def init_weights(module, init='mar', n_layer=1):
    """'mar': MAR's (LTH14/mar models/mar.py): N(0, 0.02) tables and mask tokens, xavier-uniform linears (std 0.026
    for B's qkv, 0.09 at width 64). 'gpt2': nanoGPT's N(0, 0.02) everywhere, residual projections / sqrt(2 n_layer):
    too small at the CPU widths (README, "Why the 2D model once learned slower"). Both: zero biases, LayerNorms 1."""
    for name, p in module.named_parameters():
        if name.endswith('bias'):
            nn.init.zeros_(p)
        elif init == 'gpt2' and name.endswith('proj.weight'):
            nn.init.normal_(p, std=0.02 / math.sqrt(2 * n_layer))
        elif p.dim() >= 2:
            nn.init.normal_(p, std=0.02)
    for m in module.modules():
        if isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)  # its bias is zeroed above
        elif isinstance(m, nn.Linear) and init == 'mar':
            nn.init.xavier_uniform_(m.weight)


class Transformer(nn.Module):
    """The causal backbone: class token + (token, own 2D position) inputs -> hidden states h."""

    def __init__(self, vocab_size, num_classes, grid_size, n_layer, n_embd, n_head, target_position=None,
                 token_dim=0, init='mar'):
        super().__init__()
        assert target_position in (None, 'shifted', 'added'), target_position
        self.target_position = target_position  # None: the 2D model; the 1D baselines are told their target
        N = grid_size * grid_size
        # discrete tokens are looked up; continuous tokens (token_dim > 0) are linearly projected
        self.tok_emb = nn.Linear(token_dim, n_embd) if token_dim else nn.Embedding(vocab_size, n_embd)
        self.pos_emb = nn.Embedding(N, n_embd)  # a 2D grid position, row-major index
        self.cls_emb = nn.Embedding(num_classes + 1, n_embd)  # the last row is 'no class', for CFG dropout
        self.target_pos_emb = nn.Embedding(N, n_embd) if target_position == 'added' else None  # RAR Eq. 4
        self.blocks = nn.ModuleList([Block(n_embd, n_head) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd)
        init_weights(self, init, n_layer)

    def forward(self, idx, labels, pos, target_pos=None):
        """idx: (B, T) ids or (B, T, D) vectors in generation order at grid positions pos (B, T); labels: (B,).
        Returns h (B, T+1, C): h[:, t] has seen the class and t tokens. target_pos (B, T+1): the 1D baselines'."""
        x = torch.cat([self.cls_emb(labels)[:, None], self.tok_emb(idx)], dim=1)  # (B, 1+T, C)
        return self.run(self.embed(x, pos, target_pos), is_causal=True)

    def embed(self, x, pos, target_pos=None):
        """Inputs x (B, T', C) + the embedding of each token's own grid position pos (B, T), Sec. 4.2; for T' = T + 1
        the first input is the class token, which has none."""
        own = F.pad(self.pos_emb(pos), (0, 0, x.size(1) - pos.size(1), 0))  # (B, T', C), zero for the class token
        if self.target_position is None:
            return x + own  # the 2D model: never told where the next token goes (Fig. 4 right)
        # --- the 1D baselines of Table 1, told the position target_pos (B, T') of the token each input predicts ---
        if self.target_position == 'shifted':  # the paper's vanilla AR (Fig. 4 middle): instead of the own position
            return x + self.pos_emb(target_pos)
        return x + own + self.target_pos_emb(target_pos)  # RAR's target-aware embedding, a second table (Eq. 4)

    def run(self, x, is_causal=False, input_pos=None):
        for block in self.blocks:
            x = run_block(block, x, is_causal, input_pos)
        return self.ln_f(x)

    # --- incremental decoding with a KV cache (sample.py): prefill the class token, then decode new tokens ---

    def setup_cache(self, batch_size, max_len):
        for block in self.blocks:
            attn = block.attn
            attn.cache = KVCache(batch_size, attn.n_head, max_len, attn.proj.in_features // attn.n_head)

    def clear_cache(self):
        for block in self.blocks:
            block.attn.cache = None

    def prefill(self, labels, target_pos=None):
        """The class token into slot 0 of the cache; returns h_0 (B, 1, C)."""
        x = self.cls_emb(labels)[:, None]  # (B, 1, C)
        pos = torch.zeros(len(x), 0, dtype=torch.long, device=x.device)  # (B, 0): no token yet
        return self.run(self.embed(x, pos, target_pos), input_pos=torch.zeros(1, dtype=torch.long, device=x.device))

    def decode(self, idx, pos, input_pos, target_pos=None):
        """Tokens idx at grid positions pos (B, T') appended as sequence steps input_pos (T',) -> states (B, T', C)."""
        return self.run(self.embed(self.tok_emb(idx), pos, target_pos), input_pos=input_pos)


def make_orders(batch_size, N, order, generator, rar_prob=1.0):
    """(B, N) grid positions in generation order: raster, uniformly random (2D- and 1D-random), or 'rar': random
    with probability rar_prob per sample, else raster (RAR Sec. 3.2). Every draw from `generator`."""
    raster = torch.arange(N, device=generator.device).expand(batch_size, N)
    if order == 'raster':
        return raster
    permuted = torch.rand(batch_size, N, generator=generator, device=generator.device).argsort(dim=1)
    if order == 'rar':
        coin = torch.rand(batch_size, 1, generator=generator, device=generator.device) < rar_prob
        return torch.where(coin, permuted, raster)
    return permuted
