"""A Llama-family decoder with transformers' module names (input_layernorm, self_attn,
post_attention_layernorm, mlp with gate/up/down projections) and its forward order, small enough
for CPU tests and sized up for GPU runs. Randomly initialised; no downloads, no transformers."""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def rope(x, pos):
    d = x.shape[-1] // 2
    freq = 1.0 / (10000 ** (torch.arange(d, device=x.device, dtype=torch.float32) / d))
    ang = pos[:, None].float() * freq[None]
    cos, sin = ang.cos()[None, None].to(x.dtype), ang.sin()[None, None].to(x.dtype)
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)


class Attention(nn.Module):
    """Causal self-attention with RoPE. sdpa=False spells attention out (matmul, mask, softmax:
    deterministic on every device); sdpa=True uses F.scaled_dot_product_attention."""

    def __init__(self, dim, heads, sdpa=False):
        super().__init__()
        self.heads = heads
        self.sdpa = sdpa
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, hidden_states):
        b, t, d = hidden_states.shape
        shape = (b, t, self.heads, d // self.heads)
        q = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        k = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        pos = torch.arange(t, device=hidden_states.device)
        q, k = rope(q, pos), rope(k, pos)
        if self.sdpa:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            att = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
            mask = torch.ones(t, t, device=q.device, dtype=torch.bool).triu(1)
            y = att.masked_fill(mask, float("-inf")).softmax(-1) @ v
        return self.o_proj(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, dim, heads, hidden, sdpa=False):
        super().__init__()
        self.input_layernorm = RMSNorm(dim)
        self.self_attn = Attention(dim, heads, sdpa)
        self.post_attention_layernorm = RMSNorm(dim)
        self.mlp = MLP(dim, hidden)

    def forward(self, hidden_states):
        residual = hidden_states
        hidden_states = self.self_attn(self.input_layernorm(hidden_states))
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states = self.mlp(hidden_states)
        return residual + hidden_states


class TinyLlama(nn.Module):
    def __init__(self, vocab=256, dim=64, heads=4, hidden=172, layers=6, sdpa=False):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(DecoderLayer(dim, heads, hidden, sdpa) for _ in range(layers))
        self.norm = RMSNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.normal_(p, std=1.0 / math.sqrt(p.shape[-1]))

    def hidden(self, tokens):
        x = self.embed_tokens(tokens)
        for layer in self.layers:
            x = layer(x)
        return x

    def forward(self, tokens):
        return self.lm_head(self.norm(self.hidden(tokens)))

    def checkpoint_layers(self):
        """Full activation checkpointing: every layer's forward runs under torch.utils.checkpoint
        (the layer keeps only its input; the rest is recomputed in the backward)."""
        import torch.utils.checkpoint as cp

        for layer in self.layers:
            layer.forward = (lambda f: lambda *x, **k: cp.checkpoint(f, *x, use_reentrant=False, **k))(layer.forward)

    def loss(self, tokens, chunk=0):
        """Next-token cross-entropy (fp32). With `chunk` > 0 the final norm, the LM head and the
        loss run `chunk` tokens at a time, each chunk recomputed in the backward: the logits of
        one chunk exist at a time instead of the whole sequence's (vocabulary x tokens x 10
        bytes: bf16 logits, their fp32 copy and log-softmax). Same value up to summation order."""
        if chunk <= 0:
            logits = self.forward(tokens[:, :-1])
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1))
        import torch.utils.checkpoint as cp

        x, targets = self.hidden(tokens[:, :-1]), tokens[:, 1:]
        total = None
        for start in range(0, targets.shape[1], chunk):
            part = cp.checkpoint(self._chunk_loss, x[:, start:start + chunk], targets[:, start:start + chunk],
                                 use_reentrant=False)
            total = part if total is None else total + part
        return total / targets.numel()

    def _chunk_loss(self, x, targets):
        logits = self.lm_head(self.norm(x))
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="sum")


class PlainBlock(nn.Module):
    """A layer of no known family (its saved tensors are swapped whole)."""

    def __init__(self, dim):
        super().__init__()
        self.a = nn.Linear(dim, 2 * dim)
        self.b = nn.Linear(2 * dim, dim)

    def forward(self, x):
        return x + self.b(torch.tanh(self.a(x)))
