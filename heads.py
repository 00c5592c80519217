"""
The prediction heads of Heptapod (Sec. 4.3, Fig. 5) and the whole model.

Next 2D distribution prediction: after each causal step t the head predicts the distribution of the
tokens at *all* positions not yet seen. The global head (Fig. 5 left) puts the causal hidden states
h_1..h_t at their own grid positions, fills every other position with a learnable mask token plus a
learnable position embedding, and runs a bidirectional Transformer over the grid; a linear classifier
with cross-entropy scores the masked positions only (Sec. 3: discrete tokens).

Supervision density n (`--density`, Sec. 5.3/5.5): n prefix lengths per sequence, run as one batched
head call of B * n grids. The 1D baselines of Table 1 (`--head linear`) have no head: each causal state
predicts the single next token through the classifier, as a language model does.
"""
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

    def forward(self, h_cls, grid_h, seen):
        """h_cls: (B, 1, C) the class state h_0; grid_h: (B, N, C) the causal state of each seen position
        (anything elsewhere); seen: (B, N) bool. Returns z: (B, N, C), the prediction at every position."""
        x = torch.where(seen[..., None], grid_h, self.mask_token) + self.pos_emb  # (B, N, C)
        x = torch.cat([h_cls, x], dim=1)  # (B, 1+N, C)
        for block in self.blocks:
            x = block(x, is_causal=False)
        return self.ln_f(x[:, 1:])  # (B, N, C)

    def loss_inputs(self, h, idx, orders, prefix_lens):
        """Training: the head's predictions for n prefixes per sequence, batched.
        h: (B, N, C) causal states (h[:, t] has seen t tokens); idx: (B, N) tokens in raster order;
        orders: (B, N) generation order; prefix_lens: (B, n) prefix lengths t in [0, N).
        Returns z: (B*n, N, C) and targets: (B*n, N), -1 at positions already seen (not scored)."""
        B, N, C = h.shape
        n = prefix_lens.size(1)
        rank = orders.argsort(dim=1)  # (B, N) the step at which each grid position is read
        h_tok = F.pad(h[:, 1:], (0, 0, 0, 1))  # (B, N, C) state after each token; the last token is never read
        grid_h = h_tok.gather(1, rank[..., None].expand(B, N, C))  # (B, N, C) each state at its own position
        seen = (rank[:, None, :] < prefix_lens[:, :, None]).flatten(0, 1)  # (B*n, N)
        z = self(h[:, :1].repeat_interleave(n, 0), grid_h.repeat_interleave(n, 0), seen)  # (B*n, N, C)
        targets = idx.repeat_interleave(n, 0).masked_fill(seen, -1)  # (B*n, N) score masked positions only
        return z, targets


def sample_prefix_lens(batch_size, density, N, generator):
    """n distinct prefix lengths per sequence, uniform over [0, N): the steps the head is trained at."""
    rand = torch.rand(batch_size, N, generator=generator, device=generator.device)
    return rand.argsort(dim=1)[:, :density]  # (B, n)


class Heptapod(nn.Module):
    """Causal Transformer (model.py) + prediction head + token classifier. The constructor's arguments
    are saved in every checkpoint as `config`, so sample.py rebuilds the model without flags."""

    def __init__(self, vocab_size, num_classes, grid_size, n_layer, n_embd, n_head, head='global', head_depth=None):
        super().__init__()
        self.config = dict(vocab_size=vocab_size, num_classes=num_classes, grid_size=grid_size, n_layer=n_layer,
                           n_embd=n_embd, n_head=n_head, head=head, head_depth=head_depth)
        self.grid_size = grid_size
        # the 1D heads are told the next position (target-aware); the 2D heads never are (Fig. 4)
        self.transformer = Transformer(vocab_size, num_classes, grid_size, n_layer, n_embd, n_head,
                                       target_aware=(head == 'linear'))
        if head == 'global':  # same width as the backbone and, by default, the same depth (Sec. 5.1, Table 4)
            self.head = GlobalHead(grid_size, head_depth or n_layer, n_embd, n_head)
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
        else:  # 2D: h_1..h_t predict every position not yet seen
            h = self.transformer(seq[:, :-1], labels, orders[:, :-1])  # (B, N, C)
            z, targets = self.head.loss_inputs(h, idx, orders, prefix_lens)
        logits = self.classifier(z)  # (..., V)
        # mean over the scored tokens, as MAR averages its loss over masked tokens
        return F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(), ignore_index=-1)
