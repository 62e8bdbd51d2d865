"""The fused GBA training step: a custom autograd Function for the tied, gated SAE.

With unit directions ``w = directions / |directions|`` (normalised once per step;
``unit_directions`` where the caller just renormalised the parameter itself, as GBA's
training SAE does, so ``w`` is the parameter), output scales ``a``, input scale ``c``,
``b_pre = c * pre_bias`` and ``x_c = x - b_pre``:

    u = x_c w^T          gate = u > threshold          z = u * gate
    x_hat = z (a * w) + b_pre

Autograd on that formula renormalises the directions twice (``W_enc`` and ``W_dec``),
keeps both in the graph and materialises masks and zero gradients. Here the forward
is one op and the backward is written out, with ``G = dL/dx_hat`` (from whatever loss
used ``x_hat``, so a weighted ``mse_loss_fn`` still applies) and ``R = G w^T``, needed
only where the gate is open:

    dL/dw = a * (z^T G + (R * gate)^T x_c)       the decoder and encoder roles
    dL/da = rowsum(w * z^T G)                     reuses z^T G: no product
          = sum over each neuron's open pairs of z * R
    dL/dpre_bias = c * (colsum(G) - (a * colsum(R * gate)) w)
    dL/ddirections = (dL/dw - w * rowsum(w * dL/dw)) / |directions|
    rowsum(w * dL/dw) = 2 a dL/da                 w . x_c = u = z where open

That is still five (batch x d_in x d_sae) products: the encoder ``x_c w^T``, the
decode, ``R`` and the two terms of ``dL/dw``. The encoder must be dense (every ``u``
decides its gate), but the other four only involve open pairs. So neurons are taken
in blocks of ``block``, and a block whose gate is open on at most ``max_density`` of
its (token, neuron) pairs runs those four over its open pairs only (GBA's
low-frequency groups once bias adaptation has brought them to target, and every
group at L0 32-128 of thousands of latents): the decode as sparsify does it, an
``embedding_bag`` of each token's open rows of ``w`` weighted by ``z * a``; ``R`` as
a CSR-sampled product at the open pairs; ``dL/dw`` as two CSR products of the
neuron-major open pairs (no (pairs x d_in) intermediate); ``dL/da`` and the
``pre_bias`` term as per-neuron sums over the pairs. Denser blocks use dense
products on strided views of the full tensors (no copies).

``tests/test_fast_step.py`` checks values and gradients against autograd on the plain
formula. ``SAE_GBA_FAST_STEP=0`` makes ``GBATrainingSAE`` use that plain formula.
"""

import os
import warnings
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from sae_gba.step_memory import StepMemory

FAST_STEP_ENV = "SAE_GBA_FAST_STEP"
# Neurons per block when choosing dense or sparse products.
BLOCK = 256
# Densest gate (open fraction of a block's (token, neuron) pairs) given sparse
# products. On an AMD EPYC core (MKL, d_in 640) four CSR products and their setup
# cost 0.7-1 us per open pair against 70-80 ns per pair for the four dense ones, so
# sparse won below ~8-10%; 5% leaves a margin. The embedding_bag decode since is
# cheaper per pair, which can only move the break-even up (not re-measured).
MAX_SPARSE_DENSITY = 0.05
# torch.sparse CSR products and embedding_bag run on CPU in these dtypes.
_CSR_DTYPES = (torch.float32, torch.float64)


def fast_step_enabled() -> bool:
    """Whether ``GBATrainingSAE`` uses this fused step (``SAE_GBA_FAST_STEP`` != 0)."""
    return os.environ.get(FAST_STEP_ENV, "1") != "0"


class FusedOutput(NamedTuple):
    """What one fused forward returns (all but ``x_hat`` carry no gradient).

    Args:
        x_hat: (batch, d_in) reconstruction, differentiable.
        feature_acts: (batch, d_sae) ``z``; a sparse COO tensor (coalesced) where
            every block was sparse.
        hidden_pre: (batch, d_sae) ``u``.
        fire_counts: (d_sae,) int64, tokens on which each gate was open.
        peak_hidden_pre: (d_sae,) max of ``u`` over the batch.
    """

    x_hat: torch.Tensor
    feature_acts: torch.Tensor
    hidden_pre: torch.Tensor
    fire_counts: torch.Tensor
    peak_hidden_pre: torch.Tensor


class _SparseRun(NamedTuple):
    """The open pairs of neurons ``[start, stop)``, listed by token and by neuron."""

    start: int
    stop: int
    token_rows: torch.Tensor  # (batch + 1,) offsets of each token's pairs
    tokens: torch.Tensor  # each pair's token, token-major
    neurons: torch.Tensor  # each pair's neuron (within the run), token-major
    values: torch.Tensor  # each pair's z, token-major
    by_neuron: torch.Tensor  # (run, batch) CSR of z^T, for R and dL/dw


def plan_runs(
    fire_counts: torch.Tensor, n_tokens: int, block: int, max_density: float
) -> list[tuple[int, int, bool]]:
    """Split the neurons into maximal runs of dense or sparse blocks.

    Args:
        fire_counts: (d_sae,) open-gate counts over the batch.
        n_tokens: batch rows.
        block: neurons per block.
        max_density: a block with at most this open fraction is sparse.

    Returns:
        ``(start, stop, sparse)`` runs covering ``[0, d_sae)`` in order.
    """
    d_sae = fire_counts.shape[0]
    starts = list(range(0, d_sae, block))
    sums = torch.zeros(len(starts), dtype=torch.int64, device=fire_counts.device)
    sums.index_add_(
        0, torch.arange(d_sae, device=fire_counts.device) // block, fire_counts
    )
    sizes = [min(block, d_sae - s) for s in starts]
    sparse = [
        int(total) <= max_density * n_tokens * size
        for total, size in zip(sums.tolist(), sizes, strict=True)
    ]
    runs: list[tuple[int, int, bool]] = []
    for start, size, is_sparse in zip(starts, sizes, sparse, strict=True):
        if runs and runs[-1][2] == is_sparse:
            runs[-1] = (runs[-1][0], start + size, is_sparse)
        else:
            runs.append((start, start + size, is_sparse))
    return runs


def _sparse_run(
    u_t: torch.Tensor, gate_t: torch.Tensor, counts: torch.Tensor, start: int, stop: int
) -> _SparseRun:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
        return _build_sparse_run(u_t, gate_t, counts, start, stop)


def _build_sparse_run(
    u_t: torch.Tensor, gate_t: torch.Tensor, counts: torch.Tensor, start: int, stop: int
) -> _SparseRun:
    # Neuron-major pairs, each neuron's tokens in order: the CSR of z^T as it comes.
    # Flat positions in the (contiguous) rows: nonzero and the gather of z = u where
    # the gate is open run ~25% faster on one index than on two.
    width, n_tokens = stop - start, gate_t.shape[1]
    flat = gate_t[start:stop].reshape(-1).nonzero(as_tuple=True)[0]
    values = u_t[start:stop].reshape(-1).index_select(0, flat)
    neuron, token = flat.div(n_tokens, rounding_mode="floor"), flat % n_tokens
    neuron_rows = torch.zeros(width + 1, dtype=torch.int64, device=u_t.device)
    neuron_rows[1:] = counts[start:stop].cumsum(0)
    by_neuron = torch.sparse_csr_tensor(
        neuron_rows, token, values, (width, n_tokens), check_invariants=False
    )
    # Token-major for the decode's embedding_bag: a stable sort keeps each token's
    # neurons in order.
    token, order = torch.sort(token, stable=True)
    token_rows = torch.zeros(n_tokens + 1, dtype=torch.int64, device=u_t.device)
    token_rows[1:] = torch.bincount(token, minlength=n_tokens).cumsum(0)
    return _SparseRun(
        start, stop, token_rows, token, neuron[order], values[order], by_neuron
    )


class _TiedGatedAutoencoder(torch.autograd.Function):
    """``x -> x_hat`` of the GBA SAE with the hand-written backward above."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        directions: torch.Tensor,
        output_scale: torch.Tensor,
        pre_bias: torch.Tensor,
        input_scale: torch.Tensor,
        threshold: torch.Tensor,
        block: int,
        max_density: float,
        unit_directions: bool,
        memory: StepMemory | None,
    ) -> tuple[torch.Tensor, ...]:
        # Directions renormalised just before are w itself: their norms are 1 to float
        # rounding, and a (d_sae x d_in) norm, division and new tensor are saved.
        norms = None if unit_directions else directions.norm(dim=1, keepdim=True)
        # Detached: embedding_bag then skips the outputs only its own backward needs.
        w = directions.detach() if norms is None else directions / norms
        b_pre = pre_bias * input_scale
        x_c = x - b_pre
        memory = StepMemory(slots=0) if memory is None else memory
        # u^T, neuron-major: this orientation of the product runs 3-18% faster here,
        # and nonzero then lists each neuron's open tokens, the CSR the backward uses.
        u_t = memory.empty("u", (w.shape[0], x.shape[0]), x)
        torch.mm(w, x_c.T, out=u_t)
        gate_t = memory.empty("gate", u_t.shape, u_t, torch.bool)
        torch.gt(u_t, threshold[:, None], out=gate_t)
        counts = _row_counts(gate_t).long()
        use_csr = x.device.type == "cpu" and x.dtype in _CSR_DTYPES
        runs = plan_runs(counts, x.shape[0], block, max_density if use_csr else -1.0)
        x_hat = b_pre.expand_as(x).clone()
        # z = u * gate, written run by run: sparse runs scatter their open pairs into
        # zeros (a float-by-bool product over the whole width costs several passes).
        # Where every run is sparse, z stays a sparse COO tensor of the open pairs:
        # no (batch x d_sae) zeros, and the trainer's firing statistics on it need
        # no dense passes either.
        all_sparse = all(sparse for *_, sparse in runs)
        if all_sparse:
            memory.release("z")
        z_t = None if all_sparse else memory.empty("z", u_t.shape, u_t).zero_()
        sparse_runs = []
        for start, stop, sparse in runs:
            if sparse:
                run = _sparse_run(u_t, gate_t, counts, start, stop)
                if z_t is not None:
                    z_t[start:stop][run.neurons, run.tokens] = run.values
                sparse_runs.append(run)
                # Each token's open rows of w, summed with weights z * a.
                weights = run.values * output_scale[start:stop][run.neurons]
                x_hat += F.embedding_bag(
                    run.neurons, w[start:stop], run.token_rows, mode="sum",
                    per_sample_weights=weights, include_last_offset=True,
                )  # fmt: skip
            else:
                torch.mul(u_t[start:stop], gate_t[start:stop], out=z_t[start:stop])
                scaled_w = output_scale[start:stop, None] * w[start:stop]
                x_hat.addmm_(z_t[start:stop].T, scaled_w)
        ctx.runs = runs
        ctx.sparse_runs = sparse_runs
        ctx.memory = memory
        # Only dense runs read z and the gate in backward.
        dense_only = (z_t, None if z_t is None else gate_t)
        ctx.save_for_backward(x_c, w, norms, output_scale, input_scale, *dense_only)
        z = z_t.T if z_t is not None else _sparse_acts(sparse_runs[0], u_t.T.shape)
        u = u_t.T
        peak = u_t.amax(dim=1)
        ctx.mark_non_differentiable(z, u, counts, peak)
        # Their gradients are never used: do not fill (batch x d_sae) zeros for them.
        ctx.set_materialize_grads(False)
        return x_hat, z, u, counts, peak

    @staticmethod
    def backward(ctx: Any, grad_x_hat: torch.Tensor, *_: Any) -> tuple[Any, ...]:  # type: ignore[override]
        if grad_x_hat is None:  # the loss did not use x_hat
            return (None,) * 10
        x_c, w, norms, output_scale, input_scale, z_t, gate_t = ctx.saved_tensors
        grad = grad_x_hat.contiguous()
        need_dir, need_scale, need_pre = ctx.needs_input_grad[1:4]
        # grad_w accumulates, per run of neurons, a * z^T G and a * (R * gate)^T x_c:
        # dL/dw. In dense runs dL/da = rowsum(w * z^T G) is read off it in between;
        # sparse runs fold a into the pairs' values (no (width x d_in) scaling pass).
        grad_w = ctx.memory.empty("grad_w", w.shape, w)
        grad_scale = w.new_empty(w.shape[0])
        r_sum = w.new_empty(w.shape[0]) if need_pre else None
        sparse_runs = iter(ctx.sparse_runs)
        grad_t = None
        for start, stop, sparse in ctx.runs:
            w_run, grad_w_run = w[start:stop], grad_w[start:stop]
            scale_run = output_scale[start:stop]
            if sparse:
                run = next(sparse_runs)
                grad_t = grad.T.contiguous() if grad_t is None else grad_t
                r_open = torch.sparse.sampled_addmm(
                    run.by_neuron, w_run, grad_t, beta=0.0
                )
                # Per neuron, sums over its open pairs (P values, not width x d_in):
                # dL/da = sum of z * R, as R = G w^T there.
                rows, r_values = run.by_neuron.crow_indices(), r_open.values()
                z_values = run.by_neuron.values()
                grad_scale[start:stop] = _segment_sums(z_values * r_values, rows)
                if r_sum is not None:
                    r_sum[start:stop] = _segment_sums(r_values, rows)
                pair_scale = scale_run.repeat_interleave(rows.diff())
                r_values.mul_(pair_scale)
                scaled_z = _csr_like(run.by_neuron, z_values * pair_scale)
                # In place: torch.mm(sparse, out=) fills a zeroed temporary and
                # copies it over, five times the product's own time. beta=0 ignores
                # the uninitialised grad_w_run (no zero fill; NaN there is not read).
                grad_w_run.addmm_(scaled_z, grad, beta=0).addmm_(r_open, x_c)
            else:
                r_open = w_run @ grad.T  # R^T
                r_open.mul_(gate_t[start:stop])
                torch.mm(z_t[start:stop], grad, out=grad_w_run)
                if r_sum is not None:
                    r_sum[start:stop] = r_open.sum(dim=1)
                grad_scale[start:stop] = _row_dots(w_run, grad_w_run)
                grad_w_run.addmm_(r_open, x_c).mul_(scale_run[:, None])
        grad_dir = grad_pre = None
        if need_dir:
            # dL/ddirections = (dL/dw - w * rowsum(w * dL/dw)) / |dir|, where
            # rowsum(w * dL/dw) = 2 a dL/da: on the open pairs w . x_c = u = z, so
            # both terms give sum z * R. No (d_sae x d_in) row-dot pass.
            radial = 2 * output_scale * grad_scale
            grad_dir = grad_w.addcmul_(w, radial[:, None], value=-1)
            if norms is not None:
                grad_dir.div_(norms)
        if need_pre:
            grad_pre = input_scale * (
                grad.sum(dim=0) - (output_scale * r_sum) @ w  # type: ignore[operator]
            )
        grad_scale = grad_scale if need_scale else None
        return (None, grad_dir, grad_scale, grad_pre) + (None,) * 6


def _csr_like(csr: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``csr``'s pattern (indices shared, not copied) with other values."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(
            csr.crow_indices(), csr.col_indices(), values, csr.shape,
            check_invariants=False,
        )  # fmt: skip


def _sparse_acts(run: _SparseRun, shape: torch.Size) -> torch.Tensor:
    """``z`` as a sparse COO tensor of the open pairs of the run covering all neurons.

    The run lists the pairs token-major, each token's neurons in order: already
    coalesced.
    """
    indices = torch.stack([run.tokens, run.neurons + run.start])
    return torch.sparse_coo_tensor(
        indices, run.values, shape, is_coalesced=True, check_invariants=False
    )


def _row_dots(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(a * b).sum(dim=1)`` without the (rows x d_in) temporary."""
    return torch.einsum("md,md->m", a, b)


def _row_counts(gate: torch.Tensor) -> torch.Tensor:
    """``gate.sum(dim=1)`` (int32), from byte sums over groups of 255 columns.

    A uint8 sum cannot overflow within a group, and summing bytes into bytes is
    vectorised where summing them into int32 is not: ~8x faster on CPU.
    """
    rows = gate.view(torch.uint8)
    grouped = rows.shape[1] - rows.shape[1] % 255
    counts = rows[:, grouped:].sum(dim=1, dtype=torch.int32)
    if grouped:
        groups = rows.unfold(1, 255, 255)  # a view: (rows, columns // 255, 255)
        counts += groups.sum(dim=2, dtype=torch.uint8).sum(dim=1, dtype=torch.int32)
    return counts


def _segment_sums(values: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Sums of ``values[offsets[i]:offsets[i + 1]]`` (0 for an empty segment)."""
    return torch.segment_reduce(values, "sum", offsets=offsets, axis=0)


def fused_forward(
    x: torch.Tensor,
    directions: torch.Tensor,
    output_scale: torch.Tensor,
    pre_bias: torch.Tensor,
    input_scale: torch.Tensor,
    threshold: torch.Tensor,
    block: int | None = None,
    max_density: float | None = None,
    unit_directions: bool = False,
    memory: StepMemory | None = None,
) -> FusedOutput:
    """The GBA SAE on a batch, differentiable in directions, output_scale and pre_bias.

    Args:
        x: (batch, d_in) inputs (after SAELens's run-time normalisation).
        directions: (d_sae, d_in) unnormalised tied directions.
        output_scale: (d_sae,) ``a``.
        pre_bias: (d_in,) ``b_pre / c``.
        input_scale: scalar ``c``, in x's dtype.
        threshold: (d_sae,) gate threshold on ``u`` (``-c * gate_bias``), x's dtype.
        block: neurons per dense-or-sparse block (None: ``BLOCK``).
        max_density: open fraction at or below which a block uses sparse products
            (None: ``MAX_SPARSE_DENSITY``; negative: dense everywhere).
        unit_directions: the rows of ``directions`` were just put at unit norm: they
            are used as ``w`` (norm taken as 1) without normalising them again.
        memory: where the pre-activations, gate, dense activations and directions'
            gradient are allocated, reused across steps (None: fresh allocations).
    """
    block = BLOCK if block is None else block
    max_density = MAX_SPARSE_DENSITY if max_density is None else max_density
    return FusedOutput(
        *_TiedGatedAutoencoder.apply(
            x,
            directions,
            output_scale,
            pre_bias,
            input_scale,
            threshold,
            block,
            max_density,
            unit_directions,
            memory,
        )  # fmt: skip
    )
