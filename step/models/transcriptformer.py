"""TranscriptFormer: a transformer variational autoencoder for count data."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from step._constants import ITEM_KEYS, LOSS_KEYS
from step.models import _losses
from step.models._blocks import (
    DISPERSIONS,
    LIKELIHOODS,
    AnchorClassifier,
    CountDecoder,
    GCNSmoother,
    GeneModuleTokenizer,
    VariationalReadout,
    transformer_encoder,
)

__all__ = ["TranscriptFormer"]

_NORM_TARGET = 1e4


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        msg = f"{name} must be a positive integer, got {value!r}"
        raise ValueError(msg)
    return value


def _fraction(name: str, value: float) -> float:
    if not 0.0 <= value < 1.0:
        msg = f"{name} must lie in [0, 1), got {value!r}"
        raise ValueError(msg)
    return float(value)


class TranscriptFormer(nn.Module):
    """Transformer variational autoencoder over gene-module tokens.

    The encoder normalises raw counts to ``log1p(x / library * 1e4)``, turns
    them into ``n_modules`` tokens with a learned gene-to-module map
    (``moduler``), lifts the tokens to ``hidden_dim`` (``expand``), prepends a
    learned ``cls_token`` and runs a pre-norm transformer encoder
    (``transformer``). The CLS output ``h`` is read out into a latent mean and
    log-variance (``readout``); the decoder (``decoder``) maps a latent code,
    plus a batch representation for multi-batch data (``batch_embedding`` ->
    ``batch_readout``), to the parameters of a ZINB, NB or Poisson likelihood
    with rate ``library * softmax(logits)``.

    Optional parts: a GCN ``smoother`` on ``h`` for spatial data
    (:meth:`init_smoother_with_builtin`) and class ``anchors`` with a
    ``classifier`` for label-guided refinement (:meth:`init_anchors`).

    Parameters
    ----------
    n_genes
        Number of genes (columns of the count matrix).
    n_modules
        Number of gene-module tokens.
    module_dim
        Size of each token before the lift.
    hidden_dim
        Transformer width.
    n_layers
        Number of transformer layers.
    n_heads
        Attention heads; must divide ``hidden_dim``.
    dropout
        Dropout in the transformer and the readout.
    latent_dim
        Latent size; defaults to ``hidden_dim``.
    variational
        Variational readout (mean and log-variance) or a deterministic one.
    likelihood
        ``"zinb"``, ``"nb"`` or ``"poisson"``.
    dispersion
        ``"gene"`` or ``"gene-batch"``.
    n_batches
        Number of batches. With more than one, a batch embedding feeds the
        decoder and ``inputs["batch"]`` is required.
    batch_dim
        Size of the batch embedding.
    kl_weight
        Default beta of the KL term.
    free_bits
        Per-dimension KL floor in nats (``0`` disables it).
    library_log_input
        When true the encoder sees ``log1p(x / library * 1e4)``; when false it
        sees ``log1p(x)`` without library normalisation.
    decoder_hidden_dim
        Width of the decoder's hidden layer; defaults to ``hidden_dim``.
    contrast_temperature
        Temperature of the InfoNCE term in :meth:`graph_loss`.
    smoother
        Settings of an attached smoother (keyword arguments of
        :meth:`init_smoother_with_builtin`), or ``None``. Lets :attr:`config`
        rebuild a model that had a smoother.
    anchors
        Settings of attached anchors (keyword arguments of
        :meth:`init_anchors`), or ``None``.

    Notes
    -----
    Inputs are mappings with the keys of :data:`step._constants.ITEM_KEYS`:
    ``x`` (raw counts ``(n, n_genes)``), ``library`` (``(n,)``), ``batch``
    (int64 ``(n,)``, required when ``n_batches > 1``) and ``label`` (int64
    ``(n,)``, used by ``cl_loss``; negative labels are ignored).
    """

    #: Check batch codes and labels against their ranges (one host sync each).
    check_inputs: bool = True

    def __init__(
        self,
        n_genes: int,
        *,
        n_modules: int = 32,
        module_dim: int = 30,
        hidden_dim: int = 64,
        n_layers: int = 2,
        n_heads: int = 4,
        dropout: float = 0.1,
        latent_dim: int | None = None,
        variational: bool = True,
        likelihood: str = "zinb",
        dispersion: str = "gene",
        n_batches: int = 1,
        batch_dim: int = 8,
        kl_weight: float = 1.0,
        free_bits: float = 0.0,
        library_log_input: bool = True,
        decoder_hidden_dim: int | None = None,
        contrast_temperature: float = 0.5,
        smoother: Mapping[str, Any] | None = None,
        anchors: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        for name, value in (
            ("n_genes", n_genes),
            ("n_modules", n_modules),
            ("module_dim", module_dim),
            ("hidden_dim", hidden_dim),
            ("n_layers", n_layers),
            ("n_heads", n_heads),
            ("n_batches", n_batches),
            ("batch_dim", batch_dim),
        ):
            _positive_int(name, value)
        latent_dim = hidden_dim if latent_dim is None else _positive_int("latent_dim", latent_dim)
        decoder_hidden_dim = (
            hidden_dim
            if decoder_hidden_dim is None
            else _positive_int("decoder_hidden_dim", decoder_hidden_dim)
        )
        if hidden_dim % n_heads:
            msg = f"n_heads={n_heads} must divide hidden_dim={hidden_dim}"
            raise ValueError(msg)
        if likelihood not in LIKELIHOODS:
            msg = f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}"
            raise ValueError(msg)
        if dispersion not in DISPERSIONS:
            msg = f"dispersion must be one of {DISPERSIONS}, got {dispersion!r}"
            raise ValueError(msg)
        if kl_weight < 0 or free_bits < 0:
            msg = f"kl_weight and free_bits must be >= 0, got {kl_weight!r} and {free_bits!r}"
            raise ValueError(msg)
        if contrast_temperature <= 0:
            msg = f"contrast_temperature must be > 0, got {contrast_temperature!r}"
            raise ValueError(msg)
        _fraction("dropout", dropout)

        self._config: dict[str, Any] = {
            "n_genes": n_genes,
            "n_modules": n_modules,
            "module_dim": module_dim,
            "hidden_dim": hidden_dim,
            "n_layers": n_layers,
            "n_heads": n_heads,
            "dropout": float(dropout),
            "latent_dim": latent_dim,
            "variational": bool(variational),
            "likelihood": likelihood,
            "dispersion": dispersion,
            "n_batches": n_batches,
            "batch_dim": batch_dim,
            "kl_weight": float(kl_weight),
            "free_bits": float(free_bits),
            "library_log_input": bool(library_log_input),
            "decoder_hidden_dim": decoder_hidden_dim,
            "contrast_temperature": float(contrast_temperature),
            "smoother": None,
            "anchors": None,
        }
        self.n_genes = n_genes
        self.hidden_dim = hidden_dim
        self.latent_dim = latent_dim
        self.n_batches = n_batches
        self.variational = bool(variational)
        self.kl_weight = float(kl_weight)
        self.free_bits = float(free_bits)
        self.library_log_input = bool(library_log_input)
        self.contrast_temperature = float(contrast_temperature)

        self.moduler = GeneModuleTokenizer(n_genes, n_modules, module_dim)
        self.expand = nn.Linear(module_dim, hidden_dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, hidden_dim) * 0.02)
        self.transformer = transformer_encoder(
            hidden_dim, n_layers=n_layers, n_heads=n_heads, dropout=dropout
        )
        self.readout = VariationalReadout(
            hidden_dim, latent_dim, variational=self.variational, dropout=dropout
        )
        if n_batches > 1:
            self.batch_embedding: nn.Embedding | None = nn.Embedding(n_batches, batch_dim)
            self.batch_readout: nn.Module | None = nn.Sequential(
                nn.Linear(batch_dim, batch_dim), nn.GELU()
            )
            decoder_in = latent_dim + batch_dim
        else:
            self.batch_embedding = None
            self.batch_readout = None
            decoder_in = latent_dim
        self.decoder = CountDecoder(
            decoder_in,
            n_genes,
            hidden_dim=decoder_hidden_dim,
            likelihood=likelihood,
            dispersion=dispersion,
            n_batches=n_batches,
        )
        self.smoother: GCNSmoother | None = None
        self.anchors: nn.Parameter | None = None
        self.classifier: AnchorClassifier | None = None
        if smoother is not None:
            self.init_smoother_with_builtin(**smoother)
        if anchors is not None:
            self.init_anchors(**anchors)

    # ------------------------------------------------------------------ config
    @property
    def config(self) -> dict[str, Any]:
        """Constructor keyword arguments that rebuild this module tree.

        ``TranscriptFormer(**model.config)`` (or :meth:`from_config`) gives a
        model with the same submodules, smoother and anchors included, whose
        ``load_state_dict`` accepts this model's state. JSON-serialisable.
        """
        config = copy.deepcopy(self._config)
        # Plain attributes a caller may have changed since construction.
        config["kl_weight"] = float(self.kl_weight)
        config["free_bits"] = float(self.free_bits)
        config["contrast_temperature"] = float(self.contrast_temperature)
        return config

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> TranscriptFormer:
        """Build a model from :attr:`config`.

        Parameters
        ----------
        config
            A mapping produced by :attr:`config` (e.g. read back from JSON).

        Returns
        -------
        TranscriptFormer
            A freshly initialised model with the same architecture.
        """
        kwargs = dict(config)
        if "n_genes" not in kwargs:
            msg = f"config lacks 'n_genes'; got keys {sorted(kwargs)}"
            raise KeyError(msg)
        return cls(**kwargs)

    @property
    def n_classes(self) -> int | None:
        """Number of anchor classes, or ``None`` before :meth:`init_anchors`."""
        return None if self.anchors is None else self.anchors.shape[0]

    # ------------------------------------------------------------ attachments
    def init_smoother_with_builtin(
        self,
        n_layers: int = 2,
        hidden: int | None = None,
        dropout: float = 0.1,
        *,
        residual: bool = False,
        proj_dim: int | None = None,
    ) -> GCNSmoother:
        """Attach a GCN smoother operating on the CLS representation ``h``.

        Parameters
        ----------
        n_layers
            Number of GCN layers.
        hidden
            Width of inner layers (defaults to ``hidden_dim``).
        dropout
            Dropout between layers.
        residual
            Add the input to the output of the convolutions (the smoother then
            starts as the identity). Off by default: without it every output
            is computed from the node's neighbourhood, which is what spatial
            domain detection needs.
        proj_dim
            Output size of the contrastive projector (defaults to ``hidden_dim``).

        Returns
        -------
        GCNSmoother
            The attached module (also ``self.smoother``), on the model's device.
        """
        _positive_int("n_layers", n_layers)
        if hidden is not None:
            _positive_int("hidden", hidden)
        if proj_dim is not None:
            _positive_int("proj_dim", proj_dim)
        _fraction("dropout", dropout)
        smoother = GCNSmoother(
            self.hidden_dim,
            hidden=hidden,
            n_layers=n_layers,
            dropout=dropout,
            residual=residual,
            proj_dim=proj_dim,
        )
        self.smoother = smoother.to(self.cls_token.device)
        self._config["smoother"] = {
            "n_layers": n_layers,
            "hidden": hidden,
            "dropout": float(dropout),
            "residual": bool(residual),
            "proj_dim": proj_dim,
        }
        return self.smoother

    def init_anchors(
        self,
        n_classes: int,
        *,
        temperature: float = 1.0,
        mix: float = 0.5,
        init: Tensor | None = None,
    ) -> None:
        """Attach class anchors and the nearest-anchor classifier.

        ``cl_loss`` is the cross-entropy of logits
        ``-||proj(mu) - anchor_k||^2 / temperature`` (``proj`` is a learned
        linear map starting at the identity), so training pulls each cell's
        mean toward its class anchor and the anchor toward its cells.

        Parameters
        ----------
        n_classes
            Number of classes.
        temperature
            Divides the squared distances in the logits; larger values give
            softer assignments.
        mix
            Weight of the soft-assigned anchor in :meth:`anchored`, in ``[0, 1]``.
        init
            Optional starting anchors ``(n_classes, latent_dim)``, e.g. the class
            means of the current embedding; random ``N(0, I)`` draws otherwise.
        """
        _positive_int("n_classes", n_classes)
        if temperature <= 0:
            msg = f"temperature must be > 0, got {temperature!r}"
            raise ValueError(msg)
        if not 0.0 <= mix <= 1.0:
            msg = f"mix must lie in [0, 1], got {mix!r}"
            raise ValueError(msg)
        device = self.cls_token.device
        shape = (n_classes, self.latent_dim)
        if init is None:
            values = torch.randn(shape, device=device)
        else:
            if tuple(init.shape) != shape:
                msg = f"init must have shape {shape}, got {tuple(init.shape)}"
                raise ValueError(msg)
            values = init.detach().to(device=device, dtype=torch.float32).clone()
        self.anchors = nn.Parameter(values)
        self.classifier = AnchorClassifier(self.latent_dim, temperature=temperature, mix=mix).to(
            device
        )
        self._config["anchors"] = {
            "n_classes": n_classes,
            "temperature": float(temperature),
            "mix": float(mix),
        }

    # ------------------------------------------------------------ validation
    @staticmethod
    def _require(inputs: Mapping[str, Tensor], key: str) -> Tensor:
        if key not in inputs:
            msg = f"inputs lack the key {key!r}; got keys {sorted(inputs)}"
            raise KeyError(msg)
        return inputs[key]

    def _check_counts(self, x: Tensor) -> Tensor:
        if x.dim() != 2 or x.shape[1] != self.n_genes:
            msg = f"expected counts of shape (n_cells, {self.n_genes}), got {tuple(x.shape)}"
            raise ValueError(msg)
        return x

    def _check_codes(self, name: str, codes: Tensor, n: int, n_rows: int) -> Tensor:
        if codes.dtype.is_floating_point or codes.dtype == torch.bool:
            msg = f"{name} must hold integer codes, got dtype {codes.dtype}"
            raise TypeError(msg)
        codes = codes.reshape(-1)
        if codes.numel() != n_rows:
            msg = f"{name} must have one code per cell ({n_rows}), got {codes.numel()}"
            raise ValueError(msg)
        low = -1 if name == ITEM_KEYS.LABEL else 0
        if self.check_inputs and bool(((codes < low) | (codes >= n)).any()):
            msg = (
                f"{name} codes must lie in [{low}, {n - 1}] for this model "
                f"({name}: {n} allowed), got values in "
                f"[{int(codes.min())}, {int(codes.max())}]"
            )
            raise ValueError(msg)
        return codes.long()

    def _batch_from(self, inputs: Mapping[str, Tensor], n_rows: int) -> Tensor | None:
        if self.n_batches > 1:
            batch = self._require(inputs, ITEM_KEYS.BATCH)
        else:
            batch = inputs.get(ITEM_KEYS.BATCH)
        if batch is None:
            return None
        return self._check_codes(ITEM_KEYS.BATCH, batch, self.n_batches, n_rows)

    def _unpack(
        self, inputs: Mapping[str, Tensor], *, need_library: bool = True
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        x = self._check_counts(self._require(inputs, ITEM_KEYS.X))
        if need_library:
            library = self._require(inputs, ITEM_KEYS.LIBRARY)
        else:
            library = inputs.get(ITEM_KEYS.LIBRARY)
        if library is not None and library.numel() != x.shape[0]:
            msg = f"library must have one value per cell ({x.shape[0]}), got {library.numel()}"
            raise ValueError(msg)
        return x, library, self._batch_from(inputs, x.shape[0])

    # ------------------------------------------------------------- inference
    def normalise(self, x: Tensor, library: Tensor | None = None) -> Tensor:
        """Compute the encoder's input, ``log1p(x / library * 1e4)`` (or ``log1p(x)``).

        Parameters
        ----------
        x
            Raw counts ``(n, n_genes)``.
        library
            Library sizes ``(n,)``; defaults to the row sums of ``x``. Clamped
            to at least 1.

        Returns
        -------
        Tensor
            Normalised expression ``(n, n_genes)``.
        """
        x = x.float()
        if not self.library_log_input:
            return torch.log1p(x)
        if library is None:
            library = x.sum(dim=-1)
        scale = _NORM_TARGET / library.reshape(-1, 1).float().clamp_min(1.0)
        return torch.log1p(x * scale)

    def encode(
        self, x: Tensor, batch: Tensor | None = None, *, library: Tensor | None = None
    ) -> dict[str, Tensor]:
        """Encode raw counts.

        Parameters
        ----------
        x
            Raw counts ``(n, n_genes)``.
        batch
            Batch codes ``(n,)``. Checked, but the encoder itself is
            batch-agnostic so that every batch shares one latent space; batch
            information enters only through the decoder.
        library
            Library sizes ``(n,)``; defaults to the row sums of ``x``.

        Returns
        -------
        dict
            ``h`` (CLS representation ``(n, hidden_dim)``), ``mu`` and ``logvar``
            (``(n, latent_dim)``; ``logvar`` is absent for a deterministic model).
        """
        self._check_counts(x)
        if batch is not None:
            self._check_codes(ITEM_KEYS.BATCH, batch, self.n_batches, x.shape[0])
        h = self._backbone(x, library)
        mu, logvar = self.represent(h)
        out = {"h": h, "mu": mu}
        if logvar is not None:
            out["logvar"] = logvar
        return out

    def _backbone(self, x: Tensor, library: Tensor | None) -> Tensor:
        tokens = self.expand(self.moduler(self.normalise(x, library)))
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        seq = self.transformer(torch.cat((cls, tokens), dim=1))
        return seq[:, 0]

    def represent(self, h: Tensor) -> tuple[Tensor, Tensor | None]:
        """Read out ``(mu, logvar)`` from a CLS representation ``h``.

        ``logvar`` is ``None`` for a deterministic model.
        """
        return self.readout(h)

    def sample(self, mu: Tensor, logvar: Tensor | None) -> Tensor:
        """Reparameterised draw in training mode; the mean in eval mode."""
        if logvar is None or not self.training:
            return mu
        return mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)

    def _decoder_input(self, z: Tensor, batch: Tensor | None) -> Tensor:
        if self.batch_embedding is None or self.batch_readout is None:
            return z
        if batch is None:
            msg = f"batch codes are required to decode with n_batches={self.n_batches}"
            raise ValueError(msg)
        covariate = self.batch_readout(self.batch_embedding(batch.reshape(-1)))
        return torch.cat((z, covariate.to(z.dtype)), dim=-1)

    def decode(self, z: Tensor, library: Tensor, batch: Tensor | None = None) -> dict[str, Tensor]:
        """Likelihood parameters for latent codes.

        Parameters
        ----------
        z
            Latent codes ``(n, latent_dim)``.
        library
            Library sizes ``(n,)`` (clamped to at least 1).
        batch
            Batch codes ``(n,)``; required when ``n_batches > 1``.

        Returns
        -------
        dict
            ``log_mu`` (log rate, ``(n, n_genes)``), plus ``log_theta`` for
            NB/ZINB and ``pi_logits`` (log-odds of an extra zero) for ZINB.
        """
        return self.decoder(self._decoder_input(z, batch), library, batch)

    def forward(self, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Encode, sample and decode one batch of cells.

        Returns the keys of :meth:`encode`, ``z`` and those of :meth:`decode`.
        """
        x, library, batch = self._unpack(inputs)
        out = self.encode(x, library=library)
        out["z"] = self.sample(out["mu"], out.get("logvar"))
        out.update(self.decode(out["z"], library, batch))
        return out

    # ------------------------------------------------------------------ losses
    def _recon(self, x: Tensor, library: Tensor, batch: Tensor | None, z: Tensor) -> Tensor:
        params = self.decode(z, library, batch)
        return -self.decoder.log_prob(x, params).sum(dim=-1).mean()

    def _kl(self, mu: Tensor, logvar: Tensor, kl_weight: float | None) -> Tensor:
        weight = self.kl_weight if kl_weight is None else float(kl_weight)
        return _losses.kl_divergence_loss(
            mu.float(), logvar.float(), weight=weight, free_bits=self.free_bits
        )

    def _cl(
        self, inputs: Mapping[str, Tensor], mu: Tensor, rows: Tensor | None = None
    ) -> Tensor | None:
        if self.anchors is None or self.classifier is None or ITEM_KEYS.LABEL not in inputs:
            return None
        label = inputs[ITEM_KEYS.LABEL].reshape(-1)
        if rows is not None:
            label = label[rows]
        label = self._check_codes(ITEM_KEYS.LABEL, label, self.anchors.shape[0], mu.shape[0])
        logits = self.classifier(mu.float(), self.anchors)
        total = F.cross_entropy(logits, label, ignore_index=-1, reduction="sum")
        return total / (label >= 0).sum().clamp_min(1)

    def loss(
        self, inputs: Mapping[str, Tensor], *, kl_weight: float | None = None
    ) -> dict[str, Tensor]:
        """Named loss terms for one batch of cells.

        Parameters
        ----------
        inputs
            ``x`` and ``library`` are required; ``batch`` when ``n_batches > 1``;
            ``label`` enables ``cl_loss`` once anchors exist.
        kl_weight
            Overrides the model's beta for this call (e.g. a warm-up schedule).

        Returns
        -------
        dict
            Scalar tensors: ``recon_loss`` (negative log-likelihood summed over
            genes, mean over cells), ``kl_loss`` (variational models only) and
            ``cl_loss`` (when anchors exist and ``label`` is given). No total.
        """
        x, library, batch = self._unpack(inputs)
        h = self._backbone(x, library)
        mu, logvar = self.represent(h)
        z = self.sample(mu, logvar)
        out = {LOSS_KEYS.RECON: self._recon(x, library, batch, z)}
        if logvar is not None:
            out[LOSS_KEYS.KL] = self._kl(mu, logvar, kl_weight)
        cl = self._cl(inputs, mu)
        if cl is not None:
            out[LOSS_KEYS.CL] = cl
        return out

    # --------------------------------------------------------------- embedding
    def embed(self, inputs: Mapping[str, Tensor]) -> Tensor:
        """Mean embedding ``mu`` ``(n, latent_dim)``; never a random sample.

        Deterministic in eval mode (dropout is active in training mode).
        ``library`` is optional here (defaults to the row sums of ``x``).
        Returned in float32, also under autocast.
        """
        x, library, _ = self._unpack(inputs, need_library=False)
        mu, _ = self.represent(self._backbone(x, library))
        return mu.float()

    def anchored(self, inputs: Mapping[str, Tensor]) -> Tensor:
        """Anchored representation ``(n, latent_dim)`` for refined embeddings.

        ``(1 - mix) * proj(mu) + mix * softmax(logits) @ anchors``: each cell's
        mean in the classifier's view, pulled toward the anchors of the classes
        it is assigned to. Keeps within-class structure while tightening
        classes.
        """
        if self.anchors is None or self.classifier is None:
            msg = "the model has no anchors; call init_anchors(n_classes) first"
            raise RuntimeError(msg)
        return self.classifier.anchored(self.embed(inputs), self.anchors).float()

    # ------------------------------------------------------------------ graphs
    def _require_smoother(self) -> GCNSmoother:
        if self.smoother is None:
            msg = "the model has no smoother; call init_smoother_with_builtin() first"
            raise RuntimeError(msg)
        return self.smoother

    @staticmethod
    def _check_edges(edge_index: Tensor) -> Tensor:
        if edge_index.dim() != 2 or edge_index.shape[0] != 2:
            msg = f"edge_index must have shape (2, n_edges), got {tuple(edge_index.shape)}"
            raise ValueError(msg)
        if edge_index.dtype != torch.long:
            msg = f"edge_index must be int64, got {edge_index.dtype}"
            raise TypeError(msg)
        return edge_index

    def graph_loss(
        self,
        inputs: Mapping[str, Tensor],
        edge_index: Tensor,
        *,
        loss_mask: Tensor | None = None,
        end_to_end: bool = False,
        kl_weight: float | None = None,
        contrast_sample: int = 1024,
    ) -> dict[str, Tensor]:
        """Named loss terms on a graph of cells or spots.

        Every node is encoded, the CLS representations are smoothed over
        ``edge_index``, and the terms are computed on the nodes where
        ``loss_mask`` is true (e.g. the seed nodes of a sampled sub-graph).
        Gradients reach the whole backbone: the transformer is fine-tuned
        together with the smoother rather than frozen (the public STEP release
        detaches the backbone here, so its stage 2 can only move the smoother).

        Parameters
        ----------
        inputs
            Node inputs (as in :meth:`loss`) for all ``n`` nodes of the graph.
        edge_index
            Local edges ``(2, E)`` including one self-loop per node.
        loss_mask
            Boolean ``(n,)``; ``None`` computes the terms on every node.
        end_to_end
            Also reconstruct from the unsmoothed representation
            (``raw_recon_loss``).
        kl_weight
            Overrides the model's beta for this call.
        contrast_sample
            At most this many masked nodes, drawn at random, enter the InfoNCE
            term, whose memory grows with the square of that number.

        Returns
        -------
        dict
            ``recon_loss`` (from smoothed ``h``), ``kl_loss`` (variational
            models), ``contrast_loss`` (InfoNCE between projections of smoothed
            and unsmoothed ``h``), ``raw_recon_loss`` (with ``end_to_end``) and
            ``cl_loss`` (with anchors and labels).
        """
        smoother = self._require_smoother()
        self._check_edges(edge_index)
        x, library, batch = self._unpack(inputs)
        h = self._backbone(x, library)
        smoothed = smoother(h, edge_index)
        rows = self._mask_rows(loss_mask, x.shape[0])
        if rows is not None:
            x, library, h, smoothed = x[rows], library.reshape(-1)[rows], h[rows], smoothed[rows]
            batch = None if batch is None else batch[rows]

        mu, logvar = self.represent(smoothed)
        out = {LOSS_KEYS.RECON: self._recon(x, library, batch, self.sample(mu, logvar))}
        if logvar is not None:
            out[LOSS_KEYS.KL] = self._kl(mu, logvar, kl_weight)

        pick = _losses.sample_rows(h.shape[0], contrast_sample, device=h.device)
        left, right = (smoothed, h) if pick is None else (smoothed[pick], h[pick])
        out[LOSS_KEYS.CONTRAST] = _losses.info_nce(
            smoother.project(left).float(),
            smoother.project(right).float(),
            temperature=self.contrast_temperature,
        )
        if end_to_end:
            raw_mu, raw_logvar = self.represent(h)
            out[LOSS_KEYS.RAW_RECON] = self._recon(
                x, library, batch, self.sample(raw_mu, raw_logvar)
            )
        cl = self._cl(inputs, mu, rows)
        if cl is not None:
            out[LOSS_KEYS.CL] = cl
        return out

    @staticmethod
    def _mask_rows(loss_mask: Tensor | None, n: int) -> Tensor | None:
        if loss_mask is None:
            return None
        if loss_mask.dtype != torch.bool or loss_mask.shape != (n,):
            msg = (
                f"loss_mask must be a boolean tensor of shape ({n},), got dtype "
                f"{loss_mask.dtype} and shape {tuple(loss_mask.shape)}"
            )
            raise ValueError(msg)
        rows = loss_mask.nonzero().reshape(-1)
        if rows.numel() == 0:
            msg = "loss_mask selects no node"
            raise ValueError(msg)
        return rows

    def embed_graph(
        self, inputs: Mapping[str, Tensor], edge_index: Tensor, smoothed: bool = True
    ) -> Tensor:
        """Mean embedding of every node, from smoothed (default) or raw ``h``.

        Parameters
        ----------
        inputs
            Node inputs for all ``n`` nodes.
        edge_index
            Local edges ``(2, E)``.
        smoothed
            Smooth ``h`` over the graph before the readout.

        Returns
        -------
        Tensor
            ``mu`` of shape ``(n, latent_dim)``, float32.
        """
        x, library, _ = self._unpack(inputs, need_library=False)
        h = self._backbone(x, library)
        if smoothed:
            h = self._require_smoother()(h, self._check_edges(edge_index))
        mu, _ = self.represent(h)
        return mu.float()
