"""The classic encoder-decoder Transformer, built from torch's Transformer layers.

Token embedding (shared by encoder and decoder, scaled by sqrt(hidden)) plus sinusoidal
positions; an encoder stack of `nn.TransformerEncoderLayer` and a decoder stack of
`nn.TransformerDecoderLayer` (multi-head attention and FFN(x) = max(0, x W1 + b1) W2 + b2,
pre-norm, no dropout); a final LayerNorm per stack; an output projection, optionally tied to the
embedding.

Attention is `LinearProjectionAttention`, an `nn.MultiheadAttention` whose query, key and value
projections are `nn.Linear` modules (q_proj, k_proj, v_proj, beside its own out_proj) instead of
one fused in_proj_weight Parameter. So every attention matrix of both stacks (encoder
self-attention, decoder self-attention, cross-attention) and both FFN matrices are named Linears,
and every criterion, scope and N:M pattern of the pipeline, the activation statistics
(stats.py hooks Linear inputs) and SparseGPT's X^T X apply to them unchanged; a cross-attention
k_proj and v_proj see the encoder memory, its q_proj the decoder states.

Examples are packed rows of token ids, `[source (source_length) | target (target_length)]`, both
right-padded with pad_token_id, so the pipeline's token-block code (Parquet, batching,
calibration sampling) carries them as it carries LM blocks. `model(input_ids=rows,
labels=rows)` returns the mean cross-entropy over non-pad target tokens (teacher forcing: the
decoder reads decoder_start_token_id, then the target shifted right) and the target logits.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from gradprune.device import bf16_autocast, model_device

MODEL_TYPE = "gradprune_seq2seq"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


@dataclass(frozen=True)
class Seq2SeqConfig:
    vocab_size: int
    hidden: int
    heads: int
    layers: int                 # per stack
    ffn: int
    source_length: int
    target_length: int
    pad_token_id: int
    eos_token_id: int
    decoder_start_token_id: int
    tie_embeddings: bool = False

    def to_json(self) -> dict:
        return {"model_type": MODEL_TYPE, "architectures": ["Seq2SeqTransformer"], **asdict(self)}

    @classmethod
    def from_json(cls, meta: dict) -> "Seq2SeqConfig":
        return cls(**{k: v for k, v in meta.items() if k not in ("model_type", "architectures")})


class LinearProjectionAttention(nn.MultiheadAttention):
    """`nn.MultiheadAttention` (same constructor arguments, same call, same results: tested
    against the stock module) whose q/k/v projections are nn.Linear modules.

    The stock module keeps them fused in one in_proj_weight Parameter and computes attention
    inside F.multi_head_attention_forward, so neither that matrix nor out_proj is ever called
    as a module and forward hooks cannot see their inputs. Here each projection is called as a
    Linear. Masks follow torch's convention: a bool attn_mask or key_padding_mask is True where
    attending is not allowed; a float one is added to the attention logits.
    """

    def __init__(self, embed_dim: int, num_heads: int, bias: bool = True):
        super().__init__(embed_dim, num_heads, dropout=0.0, bias=bias, batch_first=True)
        del self.in_proj_weight, self.in_proj_bias
        # Read by the layers' fast-path checks, which these two values switch off.
        self.register_parameter("in_proj_weight", None)
        self.register_parameter("in_proj_bias", None)
        self._qkv_same_embed_dim = False
        for name in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
            delattr(self, name)
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.xavier_uniform_(proj.weight)
            if bias:
                nn.init.zeros_(proj.bias)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=False,
                attn_mask=None, average_attn_weights=True, is_causal=False):
        if need_weights:
            raise NotImplementedError("LinearProjectionAttention returns no attention weights")
        if attn_mask is None and is_causal:
            attn_mask = causal_mask(query.shape[1], query.device)
        batch, q_len, _ = query.shape
        k_len = key.shape[1]

        def heads(x, length):
            return x.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

        q = heads(self.q_proj(query), q_len)
        k = heads(self.k_proj(key), k_len)
        v = heads(self.v_proj(value), k_len)
        bias = None
        if attn_mask is not None:
            bias = _additive(attn_mask, q.dtype).view(1, 1, q_len, k_len)
        if key_padding_mask is not None:
            padding = _additive(key_padding_mask, q.dtype).view(batch, 1, 1, k_len)
            bias = padding if bias is None else bias + padding
        context = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.out_proj(context.transpose(1, 2).reshape(batch, q_len, self.embed_dim)), None


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            mask, float("-inf"))
    return mask.to(dtype)


def causal_mask(length: int, device=None) -> torch.Tensor:
    """True above the diagonal: position i may attend to positions 0..i only."""
    return torch.ones(length, length, dtype=torch.bool, device=device).triu(1)


def sinusoidal_positions(length: int, dim: int) -> torch.Tensor:
    """PE(pos, 2i) = sin(pos / 10000^(2i/dim)), PE(pos, 2i+1) = cos(...) (Vaswani et al.)."""
    position = torch.arange(length, dtype=torch.float32).unsqueeze(1)
    rate = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(position * rate)
    table[:, 1::2] = torch.cos(position * rate[: dim // 2])
    return table


class _Stack(nn.Module):
    def __init__(self, layers: list[nn.Module], dim: int):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = nn.LayerNorm(dim)


def _with_linear_attention(layer: nn.Module, dim: int, heads: int) -> nn.Module:
    layer.self_attn = LinearProjectionAttention(dim, heads)
    if hasattr(layer, "multihead_attn"):
        layer.multihead_attn = LinearProjectionAttention(dim, heads)
    return layer


@dataclass
class Seq2SeqOutput:
    logits: torch.Tensor                 # batch x target_length x vocab
    loss: torch.Tensor | None = None     # mean over non-pad target tokens
    target_tokens: int = 0               # how many tokens `loss` averages over


class Seq2SeqTransformer(nn.Module):
    def __init__(self, config: Seq2SeqConfig):
        super().__init__()
        self.config = config
        d = config.hidden
        self.embed = nn.Embedding(config.vocab_size, d)
        nn.init.normal_(self.embed.weight, std=d ** -0.5)
        layer_args = dict(d_model=d, nhead=config.heads, dim_feedforward=config.ffn, dropout=0.0,
                          activation="relu", batch_first=True, norm_first=True)
        self.encoder = _Stack([_with_linear_attention(nn.TransformerEncoderLayer(**layer_args),
                                                      d, config.heads)
                               for _ in range(config.layers)], d)
        self.decoder = _Stack([_with_linear_attention(nn.TransformerDecoderLayer(**layer_args),
                                                      d, config.heads)
                               for _ in range(config.layers)], d)
        self.output_projection = None if config.tie_embeddings else nn.Linear(
            d, config.vocab_size, bias=False)
        self.register_buffer("positions", sinusoidal_positions(
            max(config.source_length, config.target_length), d), persistent=False)

    def split(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(source, target) of packed example rows."""
        s, t = self.config.source_length, self.config.target_length
        if rows.shape[-1] != s + t:
            raise ValueError(f"example rows of width {rows.shape[-1]}; this model reads "
                             f"{s} source + {t} target tokens")
        return rows[:, :s], rows[:, s:]

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed(ids) * math.sqrt(self.config.hidden) + self.positions[: ids.shape[1]]

    def encode(self, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder memory and the source's key padding mask (True at pad tokens)."""
        padding = source == self.config.pad_token_id
        x = self._embed(source)
        for layer in self.encoder.layers:
            x = layer(x, src_key_padding_mask=padding)
        return self.encoder.norm(x), padding

    def decode(self, decoder_input: torch.Tensor, memory: torch.Tensor,
               source_padding: torch.Tensor) -> torch.Tensor:
        """Logits for every decoder position; position i sees decoder_input[:i + 1] only."""
        length = decoder_input.shape[1]
        padding = decoder_input == self.config.pad_token_id
        y = self._embed(decoder_input)
        for layer in self.decoder.layers:
            y = layer(y, memory, tgt_mask=causal_mask(length, y.device),
                      tgt_key_padding_mask=padding, memory_key_padding_mask=source_padding,
                      tgt_is_causal=True)
        y = self.decoder.norm(y)
        if self.output_projection is None:
            return nn.functional.linear(y, self.embed.weight)
        return self.output_projection(y)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None
                ) -> Seq2SeqOutput:
        """Teacher-forced target logits of packed rows; with labels (the same rows, as the
        pipeline passes them), the mean cross-entropy over their non-pad target tokens."""
        source, target = self.split(input_ids)
        start = torch.full_like(target[:, :1], self.config.decoder_start_token_id)
        memory, source_padding = self.encode(source)
        logits = self.decode(torch.cat([start, target[:, :-1]], dim=1), memory, source_padding)
        if labels is None:
            return Seq2SeqOutput(logits)
        total, count = self.summed_target_loss(logits, self.split(labels)[1])
        return Seq2SeqOutput(logits, total / max(count, 1), count)

    def summed_target_loss(self, logits: torch.Tensor, target: torch.Tensor
                           ) -> tuple[torch.Tensor, int]:
        """Summed fp32 cross-entropy over the non-pad target tokens, and their count."""
        total = nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1),
            ignore_index=self.config.pad_token_id, reduction="sum")
        return total, int((target != self.config.pad_token_id).sum())

    def save_pretrained(self, folder: str | Path) -> None:
        """config.json + model.safetensors, which `load_seq2seq` reads back."""
        from safetensors.torch import save_model

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CONFIG_FILE).write_text(json.dumps(self.config.to_json(), indent=2) + "\n")
        save_model(self, str(folder / WEIGHTS_FILE))


def is_seq2seq_folder(folder: str | Path) -> bool:
    config = Path(folder) / CONFIG_FILE
    return config.is_file() and json.loads(config.read_text()).get("model_type") == MODEL_TYPE


def load_seq2seq(folder: str | Path) -> Seq2SeqTransformer:
    from safetensors.torch import load_model

    folder = Path(folder)
    model = Seq2SeqTransformer(Seq2SeqConfig.from_json(
        json.loads((folder / CONFIG_FILE).read_text())))
    load_model(model, str(folder / WEIGHTS_FILE), strict=True)
    return model


@torch.no_grad()
def greedy_decode(model: Seq2SeqTransformer, source: torch.Tensor, bf16: bool) -> torch.Tensor:
    """target_length tokens per source, each the argmax given the source and the tokens before
    it (the decoder reruns over the whole prefix at each step: no cache, plain and exact)."""
    model.eval()
    device = model_device(model)
    with bf16_autocast(device, bf16):
        memory, padding = model.encode(source.to(device))
        out = torch.full((len(source), 1), model.config.decoder_start_token_id,
                         dtype=torch.long, device=device)
        for _ in range(model.config.target_length):
            logits = model.decode(out, memory, padding)[:, -1]
            out = torch.cat([out, logits.float().argmax(-1, keepdim=True)], dim=1)
    return out[:, 1:]


def exact_match(model: Seq2SeqTransformer, rows: torch.Tensor, batch_size: int,
                bf16: bool) -> float:
    """Fraction of examples whose greedy decoding reproduces the whole target (every non-pad
    token, the final EOS included); what follows the target's length is not compared."""
    pad = model.config.pad_token_id
    matched = 0
    for start in range(0, len(rows), batch_size):
        source, target = model.split(rows[start:start + batch_size])
        decoded = greedy_decode(model, source, bf16)
        target = target.to(decoded.device)
        real = target != pad
        matched += int(((decoded == target) | ~real).all(dim=1).sum())
    return matched / len(rows)
