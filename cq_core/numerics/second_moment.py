"""The second moment H = E[x xᵀ] of a layer's inputs, exact or in bounded memory.

Full H is K² floats per layer: FLUX.1's single-block ``linear2`` (K = 15360)
alone is 944 MB in float32, and FLUX.1-dev's 314 Linear layers hold 68 GB
of it. :class:`SecondMoment` keeps instead, for K above ``rank``,

- a **low-rank sketch** ``B`` (at most ``rank`` rows, K columns), kept by a
  truncated incremental SVD: new rows are stacked under ``B`` and only the top
  ``rank`` right singular directions of the stack are kept, unshrunk. Each step
  drops a positive semi-definite part, so ``Σ x xᵀ - Bᵀ B ≽ 0`` always. This
  is frequent directions (Liberty, KDD 2013) without its shrinking step;
  Ghashami et al. (SIAM J. Comput. 2016) found it usually the more accurate
  of the two, and on MiniLM it was: in layer 3's four Linear layers, GPTQ's
  (NVFP4) output error with a rank-128 sketch came within 0.04-0.06 dB of
  what H's own top 128 eigenvectors give, against 0.6-0.8 dB with the
  shrinking step;
- the **exact diagonal** ``Σ x²`` (K,), float64.

``H ≈ Bᵀ B / n`` with its diagonal replaced by the exact one: a low-rank plus
diagonal matrix, positive semi-definite because the dropped part is, and its
diagonal is exactly what the replacement adds. Memory is ``rank × K`` floats
whatever the number of inputs seen, and two sketches merge (stack, then
truncate), so statistics from separate runs accumulate.

Stored form (float32): ``H_lowrank`` ``(r, K)`` = ``B / √n`` and ``H_diag``
``(K,)`` = ``Σ x² / n``; :func:`dense_second_moment` rebuilds the (K, K)
matrix one layer at a time, when an optimizer needs it.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

#: Fewest rows added per truncation: fewer, larger eigendecompositions for small ranks.
MIN_CHUNK = 128
#: Defaults where full H cannot fit (the ComfyUI nodes, ``cq calibrate --comfyui``): a
#: rank-512 sketch held in bfloat16. For FLUX.1-dev: 1.84 GB while capturing, 3.64 GB on
#: disk (bench/minilm_sketch.py), within the 2 GB and 4 GB the node pack was asked to fit.
BOUNDED_RANK = 512
BOUNDED_SKETCH_DTYPE = torch.bfloat16
#: Keys of the two stored forms: exact ``H``, or the sketch and the diagonal.
EXACT_KEY = "H"
LOWRANK_KEY = "H_lowrank"
DIAG_KEY = "H_diag"


class SecondMoment:
    """Running ``Σ x xᵀ`` of rows ``x`` (K features), exact for ``K <= rank`` or when
    ``rank`` is None, else a sketch of ``rank`` rows plus the exact diagonal.

    Memory: ``K²`` float64 (exact) or ``rank × K`` of ``sketch_dtype`` plus ``K`` float64 (sketch),
    on ``device``. Rows are added in chunks of ``c = max(rank, 128)``, each chunk
    costing one ``(rank + c)²`` eigendecomposition and ``O((rank + c)² K)`` products
    (in float32, whatever ``sketch_dtype``). ``sketch_dtype``: how the sketch is held
    between chunks; bfloat16 halves its memory, and on MiniLM (GPTQ, NVFP4, layer 3,
    ranks 64 and 128) changed the output error by at most 0.02 dB.
    """

    def __init__(
        self,
        features: int,
        device: torch.device | str = "cpu",
        rank: int | None = None,
        sketch_dtype: torch.dtype = torch.float32,
    ) -> None:
        if rank is not None and rank < 1:
            raise ValueError(f"a sketch needs rank >= 1, not {rank}")
        self.features = features
        self.device = torch.device(device)
        self.rank = None if rank is None or rank >= features else rank
        self.rows = 0
        if self.rank is None:
            self.gram = torch.zeros(features, features, dtype=torch.float64, device=self.device)
        else:
            self.sketch_dtype = sketch_dtype
            self.sketch = torch.zeros(0, features, dtype=sketch_dtype, device=self.device)
            self.diag = torch.zeros(features, dtype=torch.float64, device=self.device)

    @property
    def exact(self) -> bool:
        return self.rank is None

    def add(self, x: torch.Tensor) -> None:
        """Add the rows of ``x`` (..., K), any float dtype."""
        x = x.detach().reshape(-1, self.features)
        if x.shape[0] == 0:
            return
        self.rows += x.shape[0]
        if self.exact:
            x64 = x.to(self.device, torch.float64)
            self.gram += x64.T @ x64
            return
        x32 = x.to(self.device, torch.float32)
        self.diag += x32.double().square().sum(0)
        chunk = max(self.rank, MIN_CHUNK)
        for start in range(0, x32.shape[0], chunk):
            self._absorb(x32[start : start + chunk])

    def _absorb(self, rows: torch.Tensor) -> None:
        """Stack the new rows under the sketch; past ``rank`` rows, keep the top ``rank``
        right singular directions of the stack, scaled by their singular values."""
        stacked = torch.cat([self.sketch.float(), rows])
        if stacked.shape[0] <= self.rank:
            self.sketch = stacked.to(self.sketch_dtype)
            return
        # Singular values and right vectors through the small Gram matrix (2 rank)²:
        # far cheaper than an SVD of the wide (2 rank, K) matrix.
        gram = stacked @ stacked.T
        if not bool(torch.isfinite(gram).all()):  # inputs whose products overflow float32 (|x| ~ 1e18)
            gram = stacked.double() @ stacked.double().T
        gram = gram.double()
        values, vectors = torch.linalg.eigh(gram)  # ascending
        values, vectors = values[-self.rank :], vectors[:, -self.rank :]
        alive = values > 0
        # Row i of the new sketch: sqrt(λ_i) v_iᵀ = u_iᵀ stacked (u_i: the Gram's eigenvector).
        self.sketch = (vectors[:, alive].T.float() @ stacked).flip(0).to(self.sketch_dtype)

    def merge(self, stored: Mapping[str, torch.Tensor], rows: int) -> None:
        """Add statistics saved by :meth:`result` from ``rows`` inputs (another run's)."""
        if rows <= 0:
            return
        dense = EXACT_KEY in stored
        if self.exact:
            h = dense_second_moment(stored).to(self.device, torch.float64)
            self.gram += h * rows
        elif dense:
            h = stored[EXACT_KEY].to(self.device, torch.float64) * rows
            self.diag += torch.diagonal(h)
            # An exact H as rows: its symmetric square root, sketched like any input.
            values, vectors = torch.linalg.eigh(h)
            root = (vectors * values.clamp(min=0).sqrt()).T.float()
            for start in range(0, root.shape[0], self.rank):
                self._absorb(root[start : start + self.rank])
        else:
            scale = rows**0.5
            self.diag += stored[DIAG_KEY].to(self.device, torch.float64) * rows
            other = stored[LOWRANK_KEY].to(self.device, torch.float32) * scale
            for start in range(0, other.shape[0], self.rank):
                self._absorb(other[start : start + self.rank])
        self.rows += rows

    def result(self) -> dict[str, torch.Tensor]:
        """The stored form on the CPU, float32: ``{"H"}`` (exact) or ``{"H_lowrank", "H_diag"}``."""
        n = max(self.rows, 1)
        if self.exact:
            return {EXACT_KEY: (self.gram / n).float().cpu()}
        return {
            LOWRANK_KEY: (self.sketch.float() / n**0.5).cpu(),
            DIAG_KEY: (self.diag / n).float().cpu(),
        }

    def nbytes(self) -> int:
        """Bytes held now (the running state, not counting one chunk's temporaries)."""
        if self.exact:
            return self.gram.numel() * self.gram.element_size()
        return self.sketch.numel() * self.sketch.element_size() + self.diag.numel() * 8


def stored_bytes(features: int, rank: int | None) -> int:
    """Bytes on disk of one layer's stored form (float32), before the file's header."""
    if rank is None or rank >= features:
        return features * features * 4
    return (rank + 1) * features * 4


def capture_bytes(features: int, rank: int | None, sketch_dtype: torch.dtype = torch.float32) -> int:
    """Bytes of one layer's running state during capture (see :meth:`SecondMoment.nbytes`)."""
    if rank is None or rank >= features:
        return features * features * 8
    return rank * features * sketch_dtype.itemsize + features * 8


def features_of(stored: Mapping[str, torch.Tensor]) -> int | None:
    """K of a stored form, or None when it holds neither form."""
    if EXACT_KEY in stored:
        return int(stored[EXACT_KEY].shape[-1])
    if LOWRANK_KEY in stored and DIAG_KEY in stored:
        return int(stored[DIAG_KEY].shape[0])
    return None


def dense_second_moment(stored: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The (K, K) float32 H of a stored form: H itself, or ``Lᵀ L`` with the exact diagonal.

    Raises ``KeyError`` when ``stored`` holds neither form.
    """
    if EXACT_KEY in stored:
        return stored[EXACT_KEY].float()
    low = stored[LOWRANK_KEY].float()
    h = low.T @ low
    h.diagonal().copy_(stored[DIAG_KEY].float())
    return h
