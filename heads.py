"""
The prediction heads of Heptapod (Sec. 4.3, Fig. 5) and the whole model.

Next 2D distribution prediction: after each causal step t the head predicts the distribution of the
tokens at the positions not yet seen, from the causal states h_0..h_t (h_0 is the class state).

- GlobalHead (Fig. 5 left): h_1..h_t sit at their own grid positions, every other position holds a
  learnable mask token; position embeddings are added and a bidirectional Transformer runs over the
  whole grid. It predicts all N positions (window w = N = 256).
- LocalHead (Fig. 5 right): the grid is cut into chunks of w positions; learnable queries for the chunk
  that holds the next position cross-attend to h_0..h_t, then self-attend within the chunk. One extra
  attention block per layer compared with the global head.

Either way a linear classifier with cross-entropy scores the positions not yet seen (Sec. 3: discrete
tokens). Supervision density n (`--density`, Sec. 5.3/5.5): n prefix lengths per sequence, run as one
batched head call. The 1D baselines of Table 1 (`--head linear`) have no head: each causal state
predicts the single next token through the classifier, as a language model does.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import Block, Transformer, init_weights


class GlobalHead(nn.Module):
    """Bidirectional Transformer over the whole grid: prefix states at their positions, mask tokens elsewhere."""

    def __init__(self, grid_size, n_layer, n_embd, n_head):
        super().__init__()
        N = grid_size * grid_size
        self.mask_token = nn.Parameter(torch.zeros(1, 1, n_embd))
        self.pos_emb = nn.Parameter(torch.zeros(1, N, n_embd))  # a learnable embedding per grid position
        self.blocks = nn.ModuleList([Block(n_embd, n_head) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd)
        init_weights(self, n_layer)  # mask token and position embeddings N(0, 0.02), as MAR

    def forward(self, h, orders, prefix_lens):
        """h: (B, N, C) causal states, h[:, t] has seen t tokens; orders: (B, N) the positions in reading
        order; prefix_lens: (B, n) prefix lengths t in [0, N). Returns, for the B*n prefixes, the
        predictions z (B*n, N, C), the grid positions they are for (B*n, N) and which are seen (B*n, N)."""
        B, N, C = h.shape
        n = prefix_lens.size(1)
        rank = orders.argsort(dim=1)  # (B, N) the step at which each grid position is read
        h_tok = F.pad(h[:, 1:], (0, 0, 0, 1))  # (B, N, C) state after each token; the last is never read
        grid_h = h_tok.gather(1, rank[..., None].expand(B, N, C))  # (B, N, C) each state at its own position
        seen = (rank[:, None, :] < prefix_lens[:, :, None]).flatten(0, 1)  # (B*n, N)
        x = torch.where(seen[..., None], grid_h.repeat_interleave(n, 0), self.mask_token) + self.pos_emb
        x = torch.cat([h[:, :1].repeat_interleave(n, 0), x], dim=1)  # (B*n, 1+N, C) class state first
        for block in self.blocks:
            x = block(x, is_causal=False)
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

    def forward(self, x, memory, mask):
        # x: (B, Tq, C) queries; memory: (B, Tk, C); mask: (B, 1, Tq, Tk) bool, True where a query may look
        B, Tq, C = x.shape
        q = self.q(x).view(B, Tq, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, Tq, hd)
        k, v = self.kv(memory).view(B, -1, 2, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)  # (B, nh, Tk, hd)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(y.transpose(1, 2).reshape(B, Tq, C))  # (B, Tq, C)


class LocalHead(nn.Module):
    """Learnable queries for the chunk of the next position: cross-attention to the prefix, then
    self-attention within the chunk, layer after layer."""

    def __init__(self, grid_size, window, n_layer, n_embd, n_head):
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
        init_weights(self, n_layer)

    def forward(self, h, orders, prefix_lens):
        """As GlobalHead.forward, but for the w positions of the chunk that holds the next position
        orders[:, t]: returns z (B*n, w, C), positions (B*n, w), seen (B*n, w)."""
        B, N, C = h.shape
        n, w = prefix_lens.size(1), self.window
        positions = self.chunk_pos[self.chunk_of[orders.gather(1, prefix_lens)]]  # (B, n, w)
        rank = orders.argsort(dim=1)  # (B, N)
        seen = rank.gather(1, positions.flatten(1)).view(B, n, w) < prefix_lens[..., None]  # (B, n, w)
        # memory: h_0..h_{N-1}, each token's state with the embedding of its own position (as the global head)
        memory = h + F.pad(self.pos_emb[0, orders[:, :-1]], (0, 0, 1, 0))  # (B, N, C)
        mask = torch.arange(N, device=h.device) <= prefix_lens[..., None]  # (B, n, N) h_0..h_t of each prefix
        mask = mask[:, :, None].expand(B, n, w, N).reshape(B, 1, n * w, N)  # (B, 1, n*w, N)
        x = (self.query + self.pos_emb[0, positions]).view(B, n * w, C)  # (B, n*w, C) all prefixes of a sample
        for ln, cross, block in zip(self.ln_cross, self.cross, self.blocks):
            x = x + cross(ln(x), memory, mask)  # the n*w queries of a sample share one memory projection
            x = block(x.view(B * n, w, C)).view(B, n * w, C)  # bidirectional inside each chunk only
        return self.ln_f(x).view(B * n, w, C), positions.view(B * n, w), seen.view(B * n, w)


def sample_prefix_lens(batch_size, density, N, generator):
    """n distinct prefix lengths per sequence, uniform over [0, N): the steps the head is trained at."""
    rand = torch.rand(batch_size, N, generator=generator, device=generator.device)
    return rand.argsort(dim=1)[:, :density]  # (B, n)


class Heptapod(nn.Module):
    """Causal Transformer (model.py) + prediction head + token classifier. The constructor's arguments
    are saved in every checkpoint as `config`, so sample.py rebuilds the model without flags."""

    def __init__(self, vocab_size, num_classes, grid_size, n_layer, n_embd, n_head, head='global', head_depth=None,
                 window=None):
        super().__init__()
        self.config = dict(vocab_size=vocab_size, num_classes=num_classes, grid_size=grid_size, n_layer=n_layer,
                           n_embd=n_embd, n_head=n_head, head=head, head_depth=head_depth, window=window)
        self.grid_size = grid_size
        self.num_classes = num_classes
        # the 1D heads are told the next position (target-aware); the 2D heads never are (Fig. 4)
        self.transformer = Transformer(vocab_size, num_classes, grid_size, n_layer, n_embd, n_head,
                                       target_aware=(head == 'linear'))
        # the head has the backbone's width and, by default, its depth (Sec. 5.1, Table 4)
        head_depth = head_depth or n_layer
        if head == 'global':
            self.head = GlobalHead(grid_size, head_depth, n_embd, n_head)
        elif head == 'local':
            self.head = LocalHead(grid_size, window, head_depth, n_embd, n_head)
        else:
            assert head == 'linear', head
            self.head = None
        self.classifier = nn.Linear(n_embd, vocab_size)  # discrete tokens: softmax over the vocabulary (Sec. 3)
        init_weights(self.classifier, 1)

    def forward(self, idx, labels, orders, prefix_lens):
        """idx: (B, N) tokens in raster order; labels: (B,); orders: (B, N) the generation order of each
        sample; prefix_lens: (B, n) the steps to supervise (2D heads). Returns the mean cross-entropy."""
        seq = idx.gather(1, orders)  # (B, N) tokens in generation order
        if self.head is None:  # 1D: h_t predicts the token at the next position orders[:, t]
            h = self.transformer(seq[:, :-1], labels, orders[:, :-1], target_pos=orders)  # (B, N, C)
            z, targets = h, seq
        else:  # 2D: h_0..h_t predict the positions not yet seen
            h = self.transformer(seq[:, :-1], labels, orders[:, :-1])  # (B, N, C)
            z, positions, seen = self.head(h, orders, prefix_lens)  # (B*n, P, C), (B*n, P), (B*n, P)
            n = prefix_lens.size(1)
            targets = idx.repeat_interleave(n, 0).gather(1, positions).masked_fill(seen, -1)  # score unseen only
        logits = self.classifier(z)  # (..., V)
        # mean over the scored tokens, as MAR averages its loss over masked tokens
        return F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(), ignore_index=-1)

    def flops_per_image(self, density):
        """Training FLOPs per image (forward + backward = 3 x forward), by part. A matmul of m x k by k x n
        counts 2mkn. Per layer of width C over T tokens: 24 T C^2 for the linears (qkv 3C^2, proj C^2,
        MLP 8C^2) and 4 T Tk C for attention over Tk keys (QK^T and AV), halved when causal.
        Backbone: T = N causal. Global head: n prefixes of T = N+1. Local head: n prefixes of w queries,
        each layer adding cross-attention (8 w C^2 + 4 w N C, keys projected once per image: 4 N C^2).
        Classifier: 2 C V for every position the head outputs."""
        cfg = self.config
        C, L, V, N = cfg['n_embd'], cfg['n_layer'], cfg['vocab_size'], self.grid_size ** 2
        backbone = L * (24 * N * C ** 2 + 2 * N * N * C)
        if self.head is None:
            head, outputs = 0, N
        elif isinstance(self.head, GlobalHead):
            T = N + 1
            head, outputs = density * len(self.head.blocks) * (24 * T * C ** 2 + 4 * T * T * C), density * N
        else:
            w = self.head.window
            per_layer = density * (24 * w * C ** 2 + 4 * w * w * C + 8 * w * C ** 2 + 4 * w * N * C) + 4 * N * C ** 2
            head, outputs = len(self.head.blocks) * per_layer, density * w
        return {'backbone': 3 * backbone, 'head': 3 * head, 'classifier': 3 * 2 * outputs * C * V}
