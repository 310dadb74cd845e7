"""Building blocks of TranscriptFormer: tokenizer, readout, decoder, smoother, anchors."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.nn import GCNConv

from step.models._fused import (
    FUSED_ATTENTION_DTYPES,
    FUSED_DROPOUT_DTYPES,
    FUSED_DTYPES,
    FUSED_HEAD_DIMS,
    fused_bias_gelu,
    fused_count_log_prob,
    fused_dropout,
    fused_kernels_available,
    fused_layer_norm,
    fused_residual_dropout,
    fused_self_attention,
)
from step.models._likelihoods import (
    log_nb_from_logs,
    log_poisson_from_logs,
    log_zinb_from_logs,
)
from step.models._losses import anchor_logits

__all__ = [
    "DISPERSIONS",
    "LIKELIHOODS",
    "AnchorClassifier",
    "CountDecoder",
    "FastDropout",
    "GCNSmoother",
    "GeneModuleTokenizer",
    "VariationalReadout",
]

LIKELIHOODS = ("zinb", "nb", "poisson")
DISPERSIONS = ("gene", "gene-batch")

# Bounds that keep exp() of learned log-parameters finite in float32.
_LOG_THETA_RANGE = (-20.0, 20.0)
_LOGVAR_RANGE = (-15.0, 10.0)


class FastDropout(nn.Module):
    """Inverted dropout with a mask that is cheap to draw on CPUs.

    Same semantics as :class:`torch.nn.Dropout`. On CPUs each random 64-bit
    integer gives the decisions of four elements (16 bits each), which costs
    about a quarter of the uniform draw (and a tenth of the Bernoulli sampler)
    that the mask would otherwise need. The drop probability is then ``p``
    rounded to a multiple of ``2**-16`` (at most ``8e-6`` away), and the kept
    elements are scaled by the exact inverse of the resulting keep probability,
    so the output stays unbiased. Where the fused CPU kernels are built, the mask is
    applied from the random integers in one pass (:func:`step.models._fused.fused_dropout`),
    with the same result. Other devices draw uniforms.

    Parameters
    ----------
    p
        Probability of zeroing an element, in ``[0, 1)``.
    """

    def __init__(self, p: float = 0.1) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            msg = f"dropout probability must lie in [0, 1), got {p!r}"
            raise ValueError(msg)
        self.p = float(p)
        dropped = min(round(self.p * 65536), 65535)
        # A 16-bit chunk read as a signed integer is kept when it is >= this.
        self._threshold = dropped - 32768
        self._scale = 65536.0 / (65536 - dropped)

    def forward(self, x: Tensor) -> Tensor:
        """Zero elements with probability ``p`` and rescale the rest (training only)."""
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu":
            return x * self._device_mask(x)
        bits = self._cpu_bits(x)
        if x.dtype in FUSED_DROPOUT_DTYPES and fused_kernels_available():
            return fused_dropout(x, bits, self._threshold, self._scale)
        return self._unfused(x, bits)

    def add_to(self, residual: Tensor, x: Tensor) -> Tensor:
        """``residual + self(x)``: a residual connection around a dropped-out branch.

        On CPUs with the fused kernels, for a float32 or float64 ``residual`` and ``x`` of
        its dtype or bfloat16 (a branch under autocast), the dropout and the addition run
        in one pass (:func:`step.models._fused.fused_residual_dropout`) with the random
        draws of :meth:`forward`; the dropped-out branch is then not rounded to bfloat16
        before the addition.
        """
        if not self.training or self.p == 0.0 or x.device.type != "cpu" \
                or residual.shape != x.shape or residual.dtype not in FUSED_DTYPES \
                or x.dtype not in (residual.dtype, torch.bfloat16):
            return residual + self(x)
        bits = self._cpu_bits(x)
        if not fused_kernels_available() \
                or (x.dtype == torch.bfloat16 and residual.dtype != torch.float32):
            return residual + self._unfused(x, bits)
        return fused_residual_dropout(residual, x, bits, self._threshold, self._scale)

    def _device_mask(self, x: Tensor) -> Tensor:
        # Drawn in float32 whatever the activation dtype, so that
        # low-precision uniforms cannot bias the keep probability.
        keep = torch.rand(x.shape, device=x.device).ge_(self.p)
        return keep.mul_(1.0 / (1.0 - self.p)).to(x.dtype)

    @staticmethod
    def _cpu_bits(x: Tensor) -> Tensor:
        return torch.empty((x.numel() + 3) // 4, dtype=torch.int64).random_(-(2**63), None)

    def _unfused(self, x: Tensor, bits: Tensor) -> Tensor:
        # The product is taken in float32 at least and rounded once, so that a bfloat16
        # input is scaled by the float32 factor, as the fused kernel does.
        keep = bits.view(torch.int16)[:x.numel()].view(x.shape) >= self._threshold
        factor = keep.to(torch.promote_types(x.dtype, torch.float32)).mul_(self._scale)
        return (x * factor).to(x.dtype)

    def extra_repr(self) -> str:
        return f"p={self.p}"


#: Largest head size for which CPU attention uses :class:`_NarrowHeadAttention`.
NARROW_HEAD_DIM = 8


class _NarrowHeadAttention(torch.autograd.Function):
    """Softmax attention over ``(batch, tokens, head_dim)`` inputs for narrow heads on CPUs.

    The products are the usual ones, but each is computed in the operand order whose
    output has the tokens, not the head dimension, as its columns: ``out.T = v.T @ w.T``
    rather than ``out = w @ v``, and likewise for the gradients of ``q``, ``k`` and ``v``.
    With heads of 8 dimensions or fewer, the batched GEMM kernels are 2-3 times faster in
    that order (33 tokens, ``benchmarks/efficiency.py``); with wider heads the usual order
    is faster, and :class:`_EncoderLayer` does not use this function. Inputs may be
    strided views; outputs and gradients are transposed views, no copies.
    """

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        weights = torch.softmax(torch.bmm(q, k.transpose(1, 2)).mul_(scale), dim=-1)
        ctx.save_for_backward(q, k, v, weights)
        ctx.scale = scale
        return torch.bmm(v.transpose(1, 2), weights.transpose(1, 2)).transpose(1, 2)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, Tensor, None]:
        q, k, v, weights = ctx.saved_tensors
        grad_v = torch.bmm(grad.transpose(1, 2), weights).transpose(1, 2)
        grad_weights = torch.bmm(grad, v.transpose(1, 2))
        grad_scores = torch._softmax_backward_data(grad_weights, weights, -1, weights.dtype)
        grad_scores.mul_(ctx.scale)
        grad_q = torch.bmm(k.transpose(1, 2), grad_scores.transpose(1, 2)).transpose(1, 2)
        grad_k = torch.bmm(q.transpose(1, 2), grad_scores).transpose(1, 2)
        return grad_q, grad_k, grad_v, None


class _EncoderLayer(nn.TransformerEncoderLayer):
    """A pre-norm encoder layer with faster CPU paths for short sequences.

    Where the fused CPU kernels are built (:mod:`step.models._fused`), heads of
    ``FUSED_HEAD_DIMS`` dimensions use the fused attention kernel, in float32,
    float64 and under bfloat16 autocast; the feed-forward block adds its first bias
    inside a fused GELU (in full precision and under bfloat16 autocast); in training, each
    residual connection adds its dropped-out branch in one pass, reading a bfloat16
    branch (under autocast) beside the float32 residual stream. Otherwise, with
    a few dozen tokens and heads of
    8-16 dimensions, PyTorch's CPU flash-attention kernel (and above all its
    backward) costs more than plain batched matmuls and a softmax, several times
    more under bfloat16 autocast, so attention runs as those; heads of at most
    ``NARROW_HEAD_DIM`` dimensions in float32 use :class:`_NarrowHeadAttention`.
    The parameters are those of :class:`torch.nn.TransformerEncoderLayer`, so
    weights move freely between the two. Other devices, and calls with masks, use
    the parent's computations.
    """

    def forward(
        self,
        src: Tensor,
        src_mask: Tensor | None = None,
        src_key_padding_mask: Tensor | None = None,
        is_causal: bool = False,
    ) -> Tensor:
        """The parent's pre-norm layer; in training on CPUs each residual connection adds
        its dropped-out branch in one pass (:meth:`FastDropout.add_to`), and the
        LayerNorms run as one kernel that writes bfloat16 under bfloat16 autocast."""
        if not self.training or not self.norm_first or src.device.type != "cpu" \
                or src_mask is not None or src_key_padding_mask is not None \
                or not isinstance(self.dropout1, FastDropout) \
                or not isinstance(self.dropout2, FastDropout):
            return super().forward(src, src_mask, src_key_padding_mask, is_causal)
        x = self.dropout1.add_to(src, self._attention(_layer_norm(self.norm1, src)))
        return self.dropout2.add_to(x, self._feed_forward(_layer_norm(self.norm2, x)))

    def _sa_block(
        self,
        x: Tensor,
        attn_mask: Tensor | None,
        key_padding_mask: Tensor | None,
        is_causal: bool = False,
    ) -> Tensor:
        if x.device.type != "cpu" or attn_mask is not None or key_padding_mask is not None:
            return super()._sa_block(x, attn_mask, key_padding_mask, is_causal)
        return self.dropout1(self._attention(x))

    def _attention(self, x: Tensor) -> Tensor:
        """Self-attention and output projection on the CPU, without masks or dropout."""
        attn = self.self_attn
        n, t, d = x.shape
        heads = attn.num_heads
        head_dim = d // heads
        qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)
        if head_dim in FUSED_HEAD_DIMS and qkv.dtype in FUSED_ATTENTION_DTYPES \
                and fused_kernels_available():
            out = fused_self_attention(qkv, heads, head_dim**-0.5)
            return F.linear(out, attn.out_proj.weight, attn.out_proj.bias)
        qkv = qkv.view(n, t, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
        if head_dim <= NARROW_HEAD_DIM and qkv.dtype == torch.float32 \
                and not torch.is_autocast_enabled("cpu"):
            q, k, v = qkv.reshape(3, n * heads, t, head_dim).unbind(0)
            out = _NarrowHeadAttention.apply(q, k, v, head_dim**-0.5)
            out = out.view(n, heads, t, head_dim).transpose(1, 2).reshape(n, t, d)
        else:
            q, k, v = qkv.unbind(0)
            scores = torch.matmul(q * head_dim**-0.5, k.transpose(-2, -1))
            weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
            out = torch.matmul(weights, v).transpose(1, 2).reshape(n, t, d)
        return F.linear(out, attn.out_proj.weight, attn.out_proj.bias)

    def _ff_block(self, x: Tensor) -> Tensor:
        return self.dropout2(self._feed_forward(x))

    def _feed_forward(self, x: Tensor) -> Tensor:
        """The feed-forward block without its output dropout."""
        if self.activation is not F.gelu or self.linear1.bias is None \
                or not (_fused_applies(x) or _fused_bf16_applies(x, self.linear1.bias)):
            return self.linear2(self.dropout(self.activation(self.linear1(x))))
        hidden = fused_bias_gelu(torch.matmul(x, self.linear1.weight.t()), self.linear1.bias,
                                 overwrite_h=True)
        return self.linear2(self.dropout(hidden))


def _layer_norm(norm: nn.LayerNorm, x: Tensor) -> Tensor:
    """``norm(x)``; with the fused CPU kernels in one kernel, whose result is bfloat16
    under bfloat16 autocast: the dtype the next product reads, so that no cast follows."""
    if x.device.type != "cpu" or x.dtype not in FUSED_DTYPES or norm.weight is None \
            or norm.bias is None or norm.weight.dtype != x.dtype \
            or tuple(norm.normalized_shape) != (x.shape[-1],) or not fused_kernels_available():
        return norm(x)
    autocast_bf16 = torch.is_autocast_enabled("cpu") \
        and torch.get_autocast_dtype("cpu") == torch.bfloat16 and x.dtype == torch.float32
    return fused_layer_norm(x, norm.weight, norm.bias, norm.eps,
                            torch.bfloat16 if autocast_bf16 else x.dtype)


def _fused_likelihood_applies(x: Tensor, params: dict[str, Tensor]) -> bool:
    """Whether the fused CPU likelihood takes these counts and parameters: float32 on the
    CPU, ``(cells, genes)`` counts that need no gradient, kernels built."""
    log_mu, log_theta = params["log_mu"], params["log_theta"]
    return x.device.type == "cpu" and x.dim() == 2 and not x.requires_grad \
        and log_mu.shape == x.shape and log_mu.dtype == x.dtype == torch.float32 \
        and log_theta.shape in (x.shape, x.shape[1:]) and log_theta.dtype == x.dtype \
        and params.get("pi_logits", log_mu).shape == x.shape and fused_kernels_available()


def _fused_bf16_applies(x: Tensor, bias: Tensor) -> bool:
    """Whether the fused bias + GELU takes the product of ``x`` under bfloat16 autocast on
    the CPU (a bfloat16 product and a float32 bias)."""
    return x.device.type == "cpu" and bias.dtype == torch.float32 \
        and torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16 \
        and fused_kernels_available()


def _fused_applies(x: Tensor) -> bool:
    """Whether the fused CPU kernels take ``x``: on the CPU, full precision, no autocast,
    kernels built."""
    return x.device.type == "cpu" and x.dtype in FUSED_DTYPES \
        and not torch.is_autocast_enabled("cpu") and fused_kernels_available()


def transformer_encoder(
    hidden_dim: int, *, n_layers: int, n_heads: int, dropout: float
) -> nn.TransformerEncoder:
    """Pre-norm transformer encoder (batch first) with a final LayerNorm.

    Dropout acts on the two residual branches (after attention and after the
    feed-forward block). Neither the attention weights nor the inner
    feed-forward activations are dropped: attention dropout disables the fused
    attention kernels on GPUs, and the inner activations are the widest tensor
    of the layer, so their mask would be the most expensive one to draw. On
    CPUs self-attention runs as two batched matmuls and a softmax, which is
    faster than PyTorch's CPU attention kernel for short sequences of small
    heads (several times faster under bfloat16 autocast).

    Parameters
    ----------
    hidden_dim
        Model width.
    n_layers
        Number of layers.
    n_heads
        Attention heads; must divide ``hidden_dim``.
    dropout
        Dropout probability.

    Returns
    -------
    torch.nn.TransformerEncoder
        The encoder.
    """
    layer = _EncoderLayer(
        d_model=hidden_dim,
        nhead=n_heads,
        dim_feedforward=4 * hidden_dim,
        dropout=dropout,
        activation="gelu",
        batch_first=True,
        norm_first=True,
    )
    layer.self_attn.dropout = 0.0
    layer.dropout = nn.Identity()
    layer.dropout1 = FastDropout(dropout)
    layer.dropout2 = FastDropout(dropout)
    return nn.TransformerEncoder(
        layer,
        num_layers=n_layers,
        norm=nn.LayerNorm(hidden_dim),
        enable_nested_tensor=False,
    )


class GeneModuleTokenizer(nn.Module):
    """Turn an expression vector into ``n_modules`` tokens of size ``module_dim``.

    Each token is a learned linear combination of all genes:
    ``tokens[n, m, d] = sum_g x[n, g] * weight[g, d, m] + bias[m, d]``. The sum
    runs as one matrix product against the weight viewed as
    ``(n_genes, module_dim * n_modules)``.

    Parameters
    ----------
    n_genes
        Number of input genes.
    n_modules
        Number of tokens produced per cell.
    module_dim
        Size of each token.
    """

    def __init__(self, n_genes: int, n_modules: int, module_dim: int) -> None:
        super().__init__()
        self.n_genes = n_genes
        self.n_modules = n_modules
        self.module_dim = module_dim
        self.weight = nn.Parameter(torch.empty(n_genes, module_dim, n_modules))
        self.bias = nn.Parameter(torch.zeros(n_modules, module_dim))
        nn.init.normal_(self.weight, std=1.0 / math.sqrt(n_genes))

    def forward(self, x: Tensor) -> Tensor:
        """Tokenise expression.

        Parameters
        ----------
        x
            Normalised expression, shape ``(n, n_genes)``.

        Returns
        -------
        Tensor
            Tokens, shape ``(n, n_modules, module_dim)``.
        """
        flat = x @ self.weight.reshape(self.n_genes, self.module_dim * self.n_modules)
        tokens = flat.view(-1, self.module_dim, self.n_modules).transpose(1, 2)
        return tokens + self.bias

    def extra_repr(self) -> str:
        return f"n_genes={self.n_genes}, n_modules={self.n_modules}, module_dim={self.module_dim}"


class VariationalReadout(nn.Module):
    """Map the CLS representation to a latent mean and log-variance.

    Parameters
    ----------
    in_dim
        Size of the CLS representation.
    latent_dim
        Size of the latent space.
    variational
        When false the readout is deterministic: only a mean head exists and
        the returned log-variance is ``None``.
    dropout
        Dropout after the shared hidden layer.
    """

    def __init__(
        self, in_dim: int, latent_dim: int, *, variational: bool = True, dropout: float = 0.1
    ) -> None:
        super().__init__()
        self.variational = variational
        self.net = nn.Sequential(
            nn.Linear(in_dim, in_dim),
            nn.GELU(),
            FastDropout(dropout),
            nn.LayerNorm(in_dim),
        )
        self.mu = nn.Linear(in_dim, latent_dim)
        self.logvar = nn.Linear(in_dim, latent_dim) if variational else None

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor | None]:
        """Read out the posterior.

        Parameters
        ----------
        h
            Representations, shape ``(n, in_dim)``.

        Returns
        -------
        tuple
            ``(mu, logvar)``, each ``(n, latent_dim)``; ``logvar`` is ``None`` for
            the deterministic variant.
        """
        shared = self.net(h)
        mu = self.mu(shared)
        if self.logvar is None:
            return mu, None
        return mu, self.logvar(shared).clamp(*_LOGVAR_RANGE)


class CountDecoder(nn.Module):
    """Decode a latent code into the parameters of a count likelihood.

    The rate is ``library * softmax(logits)``, kept in log space as
    ``log(library) + log_softmax(logits)``.

    Parameters
    ----------
    in_dim
        Size of the decoder input (latent size plus any covariate size).
    n_genes
        Number of genes.
    hidden_dim
        Width of the hidden layer.
    likelihood
        ``"zinb"``, ``"nb"`` or ``"poisson"``.
    dispersion
        ``"gene"`` (one inverse dispersion per gene) or ``"gene-batch"`` (one
        per gene and batch). Stored in log space as ``log_theta``.
    n_batches
        Number of batches (rows of ``log_theta`` for ``"gene-batch"``).
    dropout
        Dropout after the hidden layer.
    """

    def __init__(
        self,
        in_dim: int,
        n_genes: int,
        *,
        hidden_dim: int = 128,
        likelihood: str = "zinb",
        dispersion: str = "gene",
        n_batches: int = 1,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if likelihood not in LIKELIHOODS:
            msg = f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}"
            raise ValueError(msg)
        if dispersion not in DISPERSIONS:
            msg = f"dispersion must be one of {DISPERSIONS}, got {dispersion!r}"
            raise ValueError(msg)
        self.likelihood = likelihood
        self.dispersion = dispersion
        self.n_batches = n_batches
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.LayerNorm(hidden_dim),
            nn.GELU(),
            FastDropout(dropout),
        )
        self.scale = nn.Linear(hidden_dim, n_genes)
        self.zi_logits = nn.Linear(hidden_dim, n_genes) if likelihood == "zinb" else None
        if likelihood == "poisson":
            self.log_theta = None
        else:
            shape = (n_batches, n_genes) if dispersion == "gene-batch" else (n_genes,)
            self.log_theta = nn.Parameter(torch.zeros(shape))

    def dispersion_log(self, batch: Tensor | None = None) -> Tensor | None:
        """Log inverse dispersion, broadcastable against ``(n, n_genes)``.

        Parameters
        ----------
        batch
            Batch codes ``(n,)``; used only for ``"gene-batch"`` dispersion
            (``None`` selects the first batch).

        Returns
        -------
        Tensor or None
            ``(n_genes,)`` or ``(n, n_genes)``; ``None`` for Poisson.
        """
        if self.log_theta is None:
            return None
        log_theta = self.log_theta
        if self.dispersion == "gene-batch":
            log_theta = log_theta[0] if batch is None else log_theta[batch]
        return log_theta.clamp(*_LOG_THETA_RANGE)

    def forward(self, z: Tensor, library: Tensor, batch: Tensor | None = None) -> dict[str, Tensor]:
        """Compute likelihood parameters.

        Parameters
        ----------
        z
            Decoder input, shape ``(n, in_dim)``.
        library
            Library sizes, shape ``(n,)`` or ``(n, 1)``; clamped to at least 1.
        batch
            Batch codes ``(n,)`` for per-batch dispersion.

        Returns
        -------
        dict
            ``log_mu`` ``(n, n_genes)``; ``log_theta`` (NB/ZINB); ``pi_logits``
            ``(n, n_genes)`` (ZINB). All float32.
        """
        hidden = self.net(z)
        log_lib = torch.log(library.reshape(-1, 1).float().clamp_min(1.0))
        log_mu = log_lib + F.log_softmax(self.scale(hidden).float(), dim=-1)
        params = {"log_mu": log_mu}
        log_theta = self.dispersion_log(batch)
        if log_theta is not None:
            params["log_theta"] = log_theta.float()
        if self.zi_logits is not None:
            params["pi_logits"] = self.zi_logits(hidden).float()
        return params

    def log_prob(self, x: Tensor, params: dict[str, Tensor]) -> Tensor:
        """Elementwise log-likelihood of counts under ``params``.

        Parameters
        ----------
        x
            Raw counts, shape ``(n, n_genes)``.
        params
            Output of :meth:`forward`.

        Returns
        -------
        Tensor
            ``log p(x)``, shape ``(n, n_genes)``.

        Notes
        -----
        On CPUs where the fused kernels are built, the negative binomial likelihoods
        (plain and zero-inflated) are computed by
        :func:`step.models._fused.fused_count_log_prob`: the same formula in two passes
        with its derivatives, instead of the elementwise operations of
        :mod:`step.models._likelihoods` and their autograd record.
        """
        x = x.float()
        if self.likelihood == "poisson":
            return log_poisson_from_logs(x, params["log_mu"])
        if _fused_likelihood_applies(x, params):
            return fused_count_log_prob(x, params["log_mu"], params["log_theta"],
                                        params.get("pi_logits"))
        if self.likelihood == "nb":
            return log_nb_from_logs(x, params["log_mu"], params["log_theta"])
        return log_zinb_from_logs(x, params["log_mu"], params["log_theta"], params["pi_logits"])


class GCNSmoother(nn.Module):
    """Graph smoother on cell representations, with a contrastive projector.

    ``n_layers`` GCN convolutions (symmetric normalisation, no added self-loops:
    the graphs built by :mod:`step.graph` already carry one self-loop per node)
    with LayerNorm, GELU and dropout between them.

    By default the output is the convolution stack alone, so every output row
    is built from its neighbourhood: the smoothing is imposed by the
    architecture, which is what makes spatial domains emerge (the
    reconstruction and contrastive terms alone would both prefer a node's own
    representation). With ``residual`` the stack is added to its input and its
    last convolution starts at zero: the untrained smoother is the identity
    and smooths only as far as training pushes it.

    Parameters
    ----------
    dim
        Size of the representation (input and output).
    hidden
        Width of the inner layers (defaults to ``dim``).
    n_layers
        Number of GCN layers, at least 1.
    dropout
        Dropout between layers.
    residual
        Add the input to the output of the stack.
    proj_dim
        Output size of the projector used by the contrastive loss (defaults
        to ``dim``).
    """

    def __init__(
        self,
        dim: int,
        *,
        hidden: int | None = None,
        n_layers: int = 2,
        dropout: float = 0.1,
        residual: bool = False,
        proj_dim: int | None = None,
    ) -> None:
        super().__init__()
        if n_layers < 1:
            msg = f"the smoother needs at least one layer, got n_layers={n_layers}"
            raise ValueError(msg)
        hidden = dim if hidden is None else hidden
        proj_dim = dim if proj_dim is None else proj_dim
        sizes = [dim] + [hidden] * (n_layers - 1) + [dim]
        self.convs = nn.ModuleList(
            GCNConv(a, b, add_self_loops=False, normalize=True)
            for a, b in zip(sizes[:-1], sizes[1:], strict=True)
        )
        self.norms = nn.ModuleList(nn.LayerNorm(b) for b in sizes[1:-1])
        self.act = nn.GELU()
        self.dropout = FastDropout(dropout)
        self.residual = residual
        if residual:
            last = self.convs[-1]
            nn.init.zeros_(last.lin.weight)
            if last.bias is not None:
                nn.init.zeros_(last.bias)
        self.projector = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, proj_dim))

    def forward(self, h: Tensor, edge_index: Tensor) -> Tensor:
        """Smooth representations over a graph.

        Parameters
        ----------
        h
            Node representations, shape ``(n, dim)``.
        edge_index
            Edges in local node ids, shape ``(2, E)``.

        Returns
        -------
        Tensor
            Smoothed representations, shape ``(n, dim)``.
        """
        out = h
        for i, conv in enumerate(self.convs):
            out = conv(out, edge_index)
            if i < len(self.norms):
                out = self.dropout(self.act(self.norms[i](out)))
        return h + out if self.residual else out

    def project(self, h: Tensor) -> Tensor:
        """Projection head for the contrastive loss, shape ``(n, proj_dim)``."""
        return self.projector(h)


class AnchorClassifier(nn.Module):
    """Nearest-anchor classifier in a learned linear view of the latent space.

    Points are mapped by ``proj`` (initialised to the identity) and scored by
    ``-||proj(mu) - anchor_k||^2 / temperature``. The anchored representation
    moves each projected point toward its soft-assigned anchor:
    ``(1 - mix) * proj(mu) + mix * softmax(logits) @ anchors``.

    Parameters
    ----------
    latent_dim
        Size of the latent space.
    temperature
        Divides the negative squared distances.
    mix
        Weight of the expected anchor in the anchored representation, in
        ``[0, 1]``.
    """

    def __init__(self, latent_dim: int, *, temperature: float = 1.0, mix: float = 0.5) -> None:
        super().__init__()
        self.temperature = float(temperature)
        self.mix = float(mix)
        self.proj = nn.Linear(latent_dim, latent_dim)
        with torch.no_grad():
            self.proj.weight.copy_(torch.eye(latent_dim))
            self.proj.bias.zero_()

    def forward(self, mu: Tensor, anchors: Tensor) -> Tensor:
        """Class logits, shape ``(n, n_classes)``."""
        return anchor_logits(self.proj(mu), anchors, temperature=self.temperature)

    def anchored(self, mu: Tensor, anchors: Tensor) -> Tensor:
        """Anchored representation, shape ``(n, latent_dim)``."""
        q = self.proj(mu)
        weights = torch.softmax(anchor_logits(q, anchors, temperature=self.temperature), -1)
        return (1.0 - self.mix) * q + self.mix * weights @ anchors

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, mix={self.mix}"
