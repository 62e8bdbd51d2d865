"""Weighted SAEs (WSAE, seeds 002 and 003) as SAELens architectures ``weighted_<base>``.

The reconstruction term of the base architecture, ``|x - x_hat|^2`` summed over input
dimensions, becomes ``|Gamma (x - x_hat)|^2 = sum_i gamma_i^2 (x_i - x_hat_i)^2``; every
other term of the base is kept as it is (L1, TopK's aux-k on the unweighted residual,
JumpReLU's L0 and pre-activation losses, GBA's bias adaptation). Bases: ``standard``,
``topk``, ``batchtopk``, ``jumprelu`` and ``gba``.

Both SAELens's ``TrainingSAE.training_forward_pass`` and GBA's measure reconstruction
through the ``mse_loss_fn(preds, target)`` hook (per-dimension squared errors); the
weighted classes replace that hook, so the weights apply exactly where each base
measures its error (raw inputs for the SAELens bases, GBA's normalised inputs for GBA).

Weights, in order of precedence:
- ``set_input_weights(tensor)`` or ``weights_path`` (a safetensors file holding a
  ``"gamma"`` tensor of shape ``(d_in,)``): fixed from the start, rescaled to
  ``mean(gamma^2) = 1``.
- Otherwise estimated: the first ``weight_estimation_batches`` training batches are
  trained with weights 1 while the per-dimension variance of the tensor the loss
  compares against is accumulated; after the last of them ``gamma = var^alpha``
  (``input_weights``) is fixed and weights every later batch.

The weights and the running statistics are buffers: checkpoints carry them and a
resumed run continues exactly. The exported inference SAE is an ordinary SAE of the
base's inference architecture (``weighted_gba`` and ``weighted_batchtopk`` export as
``jumprelu``); the weights used are written beside it in ``input_weights.safetensors``
and described in ``cfg.json``'s metadata (``input_weights_source``).
"""

import copy
import math
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeAlias

import torch
import torch.nn.functional as F
from sae_lens.saes.batchtopk_sae import (
    BatchTopKTrainingSAE,
    BatchTopKTrainingSAEConfig,
)
from sae_lens.saes.jumprelu_sae import (
    JumpReLUSAEConfig,
    JumpReLUTrainingSAE,
    JumpReLUTrainingSAEConfig,
)
from sae_lens.saes.sae import (
    SAEConfig,
    TrainingSAE,
    TrainingSAEConfig,
    TrainStepInput,
    TrainStepOutput,
)
from sae_lens.saes.standard_sae import (
    StandardSAEConfig,
    StandardTrainingSAE,
    StandardTrainingSAEConfig,
)
from sae_lens.saes.topk_sae import TopKSAEConfig, TopKTrainingSAE, TopKTrainingSAEConfig
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from typing_extensions import override

from sae_gba.buffers import keep_float32, restore_state_dtypes
from sae_gba.collectives import gather_rows
from sae_gba.config_fields import check_field
from sae_gba.gba_sae import (
    MIN_RELATIVE_SPREAD,
    GBATrainingSAE,
    GBATrainingSAEConfig,
    _check_finite,
)

# Type checkers see the mixins as what they extend; at run time they are plain mixins.
if TYPE_CHECKING:
    _ConfigBase: TypeAlias = TrainingSAEConfig
    _TrainingBase: TypeAlias = TrainingSAE[Any]
else:
    _ConfigBase = _TrainingBase = object

INPUT_WEIGHTS_FILENAME = "input_weights.safetensors"
WEIGHTS_TENSOR_NAME = "gamma"

# Where the weights came from (the ``input_weights_state`` buffer).
PENDING, ESTIMATED, FROM_FILE, FROM_TENSOR = 0, 1, 2, 3
SOURCE_NAMES = {
    PENDING: "none",
    ESTIMATED: "variance",
    FROM_FILE: "weights_path",
    FROM_TENSOR: "tensor",
}

# Saved with training checkpoints, dropped from exported SAEs. float32 and integer
# whatever the SAE dtype (bfloat16 would round the running statistics away).
FLOAT32_STATE = ("input_weights", "variance_mean", "variance_m2")
COUNTER_STATE = ("input_weights_state", "variance_batches", "variance_count")
WEIGHT_BUFFERS = (*FLOAT32_STATE, *COUNTER_STATE)


def input_weights(variance: torch.Tensor, alpha: float) -> torch.Tensor:
    """WSAE weights ``gamma_i = var_i^alpha``, rescaled so that ``mean(gamma^2) = 1``.

    A dimension with zero variance gets weight 0 (``0^alpha``): it carries no signal and
    drops out of the reconstruction loss. The rescaling keeps the loss comparable with
    the unweighted one (isotropic inputs give weights 1).

    Args:
        variance: (d_in,) per-dimension variances, finite and >= 0, not all zero.
        alpha: exponent > 0 (the paper uses 0.5 and 1).
    """
    if variance.ndim != 1:
        raise ValueError(
            f"variance must be 1-D (d_in,), got shape {tuple(variance.shape)}"
        )
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha={alpha!r} is invalid: must be a finite number > 0")
    bad = (~torch.isfinite(variance)) | (variance < 0)
    if bool(bad.any()):
        dims = bad.nonzero().flatten()[:10].tolist()
        raise ValueError(
            f"variance must be finite and >= 0; {int(bad.sum())} dimensions are not "
            f"(first: {dims})"
        )
    gamma = variance.float().pow(alpha)
    if not bool((gamma > 0).any()):
        raise ValueError(
            f"every one of the {variance.numel()} input dimensions has zero variance: "
            "there is nothing to weight (the inputs are constant)"
        )
    gamma = gamma / gamma.max()  # before squaring: large variances cannot overflow
    return gamma / gamma.square().mean().sqrt()


def check_input_weights(
    weights: torch.Tensor, d_in: int, where: str = "input weights"
) -> torch.Tensor:
    """Return ``weights`` as float32 after checking shape ``(d_in,)``, finite, > 0.

    Args:
        weights: the user's weights.
        d_in: the SAE's input width.
        where: what the weights came from (for the message).
    """
    if not isinstance(weights, torch.Tensor):
        raise ValueError(
            f"{where} must be a torch.Tensor, got {type(weights).__name__}"
        )
    if tuple(weights.shape) != (d_in,):
        raise ValueError(
            f"{where} must have shape (d_in,) = ({d_in},), got {tuple(weights.shape)}"
        )
    weights = weights.detach().float()
    bad = ~(torch.isfinite(weights) & (weights > 0))
    if bool(bad.any()):
        dims = bad.nonzero().flatten()[:10].tolist()
        raise ValueError(
            f"{where} must be finite and > 0; {int(bad.sum())} of {d_in} entries are "
            f"not (first dims: {dims}, values: {weights[dims].tolist()})"
        )
    return weights


def load_input_weights(path: str | Path, d_in: int) -> torch.Tensor:
    """Read and check the ``"gamma"`` tensor of a safetensors file.

    Args:
        path: safetensors file with a ``"gamma"`` tensor of shape ``(d_in,)``.
        d_in: the SAE's input width.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"weights_path {str(path)!r} does not exist (expected a safetensors file "
            f"with a {WEIGHTS_TENSOR_NAME!r} tensor of shape ({d_in},))"
        )
    try:
        with safe_open(path, framework="pt") as file:
            names = list(file.keys())
            if WEIGHTS_TENSOR_NAME not in names:
                raise ValueError(
                    f"weights_path {str(path)!r} has no {WEIGHTS_TENSOR_NAME!r} tensor "
                    f"(it holds {names})"
                )
            weights = file.get_tensor(WEIGHTS_TENSOR_NAME)
    except (SafetensorError, OSError) as err:
        raise ValueError(
            f"weights_path {str(path)!r} is not a readable safetensors file: {err}"
        ) from err
    return check_input_weights(weights, d_in, f"weights_path {str(path)!r}")


@dataclass
class WeightedConfigMixin(_ConfigBase):
    """The weighting fields shared by every ``weighted_<base>`` training config.

    Args:
        weight_alpha: exponent in ``gamma_i = var_i^alpha`` (> 0; the paper: 0.5, 1).
        weight_estimation_batches: training batches whose variance sets the weights;
            they are trained with weights 1.
        weights_path: safetensors file with a ``"gamma"`` tensor of shape (d_in,) to
            use instead of estimating (rescaled to ``mean(gamma^2) = 1``).
    """

    weight_alpha: float = 1.0
    weight_estimation_batches: int = 10
    weights_path: str | None = None
    # Set by each concrete config: the base architecture and its inference config.
    weighted_base: ClassVar[str]
    inference_config: ClassVar[type[SAEConfig]]

    def __post_init__(self) -> None:
        _validate_weight_fields(self)
        super().__post_init__()

    @override
    @classmethod
    def architecture(cls) -> str:
        return f"weighted_{cls.weighted_base}"

    @override
    def get_inference_config_class(self) -> type[SAEConfig]:
        # The weighting is a training loss only: the SAE is an ordinary base SAE.
        return self.inference_config


def _validate_weight_fields(cfg: WeightedConfigMixin) -> None:
    require = partial(check_field, cfg)

    alpha = cfg.weight_alpha
    require(
        "weight_alpha",
        isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0,
        "must be a finite number > 0 (the WSAE paper uses 0.5 or 1)",
    )
    batches = cfg.weight_estimation_batches
    require(
        "weight_estimation_batches",
        isinstance(batches, int) and batches >= 1,
        "must be an integer >= 1",
    )
    require(
        "weights_path",
        cfg.weights_path is None
        or (isinstance(cfg.weights_path, str) and cfg.weights_path != ""),
        "must be None (estimate the weights) or the path of a safetensors file",
    )


class WeightedTrainingMixin(_TrainingBase):
    """Weighted reconstruction loss, weight estimation and export for a training SAE.

    Put it before the base training SAE class: ``class X(WeightedTrainingMixin, Base)``.
    """

    cfg: Any
    input_weights: torch.Tensor
    input_weights_state: torch.Tensor
    variance_count: torch.Tensor
    variance_mean: torch.Tensor
    variance_m2: torch.Tensor
    variance_batches: torch.Tensor

    def __init__(self, cfg: Any, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)
        d_in, device = cfg.d_in, self.device
        buffers = {
            "input_weights": torch.ones(d_in, dtype=torch.float32, device=device),
            "input_weights_state": torch.tensor(PENDING, device=device),
            "variance_count": torch.tensor(0, device=device),
            "variance_mean": torch.zeros(d_in, dtype=torch.float32, device=device),
            "variance_m2": torch.zeros(d_in, dtype=torch.float32, device=device),
            "variance_batches": torch.tensor(0, device=device),
        }
        for name, value in buffers.items():
            self.register_buffer(name, value)
        # SAELens's training_forward_pass (and GBA's) compute reconstruction errors
        # through this hook: replacing it weights them without touching any other term.
        self.mse_loss_fn = self._weighted_squared_error
        # Not on the meta device: SAELens's disk loader builds there and then loads the
        # checkpoint's buffers, so the file need not exist when reloading a checkpoint.
        if cfg.weights_path is not None and self.device.type != "meta":
            self._set_weights(
                load_input_weights(cfg.weights_path, d_in), FROM_FILE, normalize=True
            )

    def set_input_weights(self, weights: torch.Tensor, normalize: bool = True) -> None:
        """Use these weights from now on instead of estimating them.

        Args:
            weights: (d_in,) finite positive weights gamma.
            normalize: rescale to ``mean(gamma^2) = 1`` (as estimated weights are), so
                the balance between reconstruction and the other loss terms is the
                unweighted base's.
        """
        checked = check_input_weights(weights, self.cfg.d_in, "set_input_weights")
        self._set_weights(checked, FROM_TENSOR, normalize)

    @torch.no_grad()
    def _set_weights(self, weights: torch.Tensor, state: int, normalize: bool) -> None:
        if normalize:
            weights = weights / weights.square().mean().sqrt()
        self.input_weights.copy_(weights)
        self.input_weights_state.fill_(state)

    @property
    def estimated_variance(self) -> torch.Tensor:
        """Per-dimension (unbiased) variance of the rows accumulated so far."""
        count = int(self.variance_count)
        if count < 2:
            raise ValueError(
                f"the variance needs at least 2 rows; {count} accumulated so far"
            )
        return self.variance_m2 / (count - 1)

    @property
    def input_weights_source(self) -> str:
        """Where the weights in use came from: variance, weights_path, tensor or none."""
        return SOURCE_NAMES[int(self.input_weights_state)]

    def _weighted_squared_error(
        self, preds: torch.Tensor, target: torch.Tensor
    ) -> torch.Tensor:
        # Snapshot before the estimate may fix the weights: all estimation batches
        # are trained with weights 1, including the last one.
        weights_sq = self.input_weights.square()
        if self.training and int(self.input_weights_state) == PENDING:
            self._accumulate_variance(target)
        squared_error = F.mse_loss(preds, target, reduction="none")
        return squared_error * weights_sq.to(squared_error.dtype)

    @torch.no_grad()
    def _accumulate_variance(self, target: torch.Tensor) -> None:
        # Data-parallel: the global batch's statistics, the same on every rank.
        x = gather_rows(target.detach().reshape(-1, self.cfg.d_in).float())
        # Chan et al.'s pairwise merge of (count, mean, M2): no cancellation when the
        # mean is large compared with the spread, as in residual streams.
        count_b = x.shape[0]
        mean_b = x.mean(dim=0)
        m2_b = (x - mean_b).square().sum(dim=0)
        count = int(self.variance_count)
        total = count + count_b
        delta = mean_b - self.variance_mean
        self.variance_mean += delta * (count_b / total)
        self.variance_m2 += m2_b + delta.square() * (count * count_b / total)
        self.variance_count.fill_(total)
        self.variance_batches += 1
        if int(self.variance_batches) >= self.cfg.weight_estimation_batches:
            variance = self.estimated_variance
            spread = variance.sum().sqrt()
            size = (self.variance_mean.square().sum() + variance.sum()).sqrt()
            if 0 < spread <= MIN_RELATIVE_SPREAD * size:  # exactly 0: see below
                raise ValueError(
                    f"cannot set the input weights from the first "
                    f"{int(self.variance_batches)} training batches ({total} rows): "
                    f"they are (nearly) constant (spread {float(spread):.3g}, size "
                    f"{float(size):.3g}); shuffle the data so the first batches are "
                    "representative, or give the weights (weights_path)"
                )
            try:
                weights = input_weights(variance, self.cfg.weight_alpha)
            except ValueError as err:
                raise ValueError(
                    f"cannot set the input weights from the first "
                    f"{int(self.variance_batches)} training batches "
                    f"({total} rows): {err}"
                ) from err
            self._set_weights(weights, ESTIMATED, normalize=False)

    @override
    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        # SAELens's bases would train on NaN/Inf inputs without a word.
        _check_finite(step_input.sae_in, step_input.n_training_steps)
        output = super().training_forward_pass(step_input)
        # Lambdas: SAELens evaluates them only on the steps it logs.
        output.metrics |= {
            "wsae/weights_fixed": lambda: int(int(self.input_weights_state) != PENDING),
            "wsae/gamma_min": lambda: self.input_weights.min(),
            "wsae/gamma_max": lambda: self.input_weights.max(),
        }
        return output

    @override
    def _apply(self, *args: Any, **kwargs: Any) -> Any:
        out = super()._apply(*args, **kwargs)
        keep_float32(self, FLOAT32_STATE)
        return out

    @override
    def process_state_dict_for_loading(self, state_dict: dict[str, Any]) -> None:
        super().process_state_dict_for_loading(state_dict)
        restore_state_dtypes(state_dict, FLOAT32_STATE, COUNTER_STATE)

    @override
    def process_state_dict_for_saving_inference(
        self, state_dict: dict[str, Any]
    ) -> None:
        super().process_state_dict_for_saving_inference(state_dict)
        for name in WEIGHT_BUFFERS:
            state_dict.pop(name, None)

    @override
    @torch.no_grad()
    def fold_activation_norm_scaling_factor(self, scaling_factor: float) -> None:
        super().fold_activation_norm_scaling_factor(scaling_factor)
        # The statistics were gathered on scaled inputs; the exported SAE takes raw
        # ones. The weights are scale free (normalised) and need nothing.
        self.variance_mean /= scaling_factor
        self.variance_m2 /= scaling_factor**2

    @override
    def save_inference_model(self, path: str | Path) -> tuple[Path, Path]:
        """Save the base-architecture SAE, plus ``input_weights.safetensors`` beside it.

        Args:
            path: the output folder.
        """
        metadata = self.cfg.metadata
        metadata.input_weights_source = self.input_weights_source
        metadata.input_weights_file = INPUT_WEIGHTS_FILENAME
        if int(self.input_weights_state) == ESTIMATED:
            metadata.input_weights_estimation_rows = int(self.variance_count)
        saved = super().save_inference_model(path)
        tensors = {WEIGHTS_TENSOR_NAME: self.input_weights}
        if int(self.input_weights_state) == ESTIMATED:
            tensors["variance"] = self.estimated_variance
        save_file(
            {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()},
            Path(path) / INPUT_WEIGHTS_FILENAME,
            metadata={
                "source": self.input_weights_source,
                "weight_alpha": str(self.cfg.weight_alpha),
                "weights_path": str(self.cfg.weights_path),
            },
        )
        return saved


# ------------------------------------------------------------- the five architectures


@dataclass
class WeightedStandardTrainingSAEConfig(WeightedConfigMixin, StandardTrainingSAEConfig):
    """``standard`` (ReLU + L1) on the weighted loss; exports as ``standard``."""

    weighted_base: ClassVar[str] = "standard"
    inference_config: ClassVar[type[SAEConfig]] = StandardSAEConfig


@dataclass
class WeightedTopKTrainingSAEConfig(WeightedConfigMixin, TopKTrainingSAEConfig):
    """``topk`` on the weighted loss (aux-k unweighted); exports as ``topk``."""

    weighted_base: ClassVar[str] = "topk"
    inference_config: ClassVar[type[SAEConfig]] = TopKSAEConfig


@dataclass
class WeightedBatchTopKTrainingSAEConfig(
    WeightedConfigMixin, BatchTopKTrainingSAEConfig
):
    """``batchtopk`` on the weighted loss; exports as ``jumprelu`` like batchtopk."""

    weighted_base: ClassVar[str] = "batchtopk"
    inference_config: ClassVar[type[SAEConfig]] = JumpReLUSAEConfig


@dataclass
class WeightedJumpReLUTrainingSAEConfig(WeightedConfigMixin, JumpReLUTrainingSAEConfig):
    """``jumprelu`` on the weighted loss (L0 loss kept); exports as ``jumprelu``."""

    weighted_base: ClassVar[str] = "jumprelu"
    inference_config: ClassVar[type[SAEConfig]] = JumpReLUSAEConfig


@dataclass
class WeightedGBATrainingSAEConfig(WeightedConfigMixin, GBATrainingSAEConfig):
    """``gba`` on the weighted loss (bias adaptation kept); exports as ``jumprelu``."""

    weighted_base: ClassVar[str] = "gba"
    inference_config: ClassVar[type[SAEConfig]] = JumpReLUSAEConfig


class WeightedStandardTrainingSAE(WeightedTrainingMixin, StandardTrainingSAE):
    """``weighted_standard`` training SAE."""


class WeightedTopKTrainingSAE(WeightedTrainingMixin, TopKTrainingSAE):
    """``weighted_topk`` training SAE."""


class WeightedBatchTopKTrainingSAE(WeightedTrainingMixin, BatchTopKTrainingSAE):
    """``weighted_batchtopk`` training SAE."""


class WeightedJumpReLUTrainingSAE(WeightedTrainingMixin, JumpReLUTrainingSAE):
    """``weighted_jumprelu`` training SAE."""


class WeightedGBATrainingSAE(WeightedTrainingMixin, GBATrainingSAE):
    """``weighted_gba`` training SAE."""


# base architecture -> (weighted training SAE, weighted training config)
WEIGHTED_CLASSES: dict[str, tuple[type[TrainingSAE[Any]], type[TrainingSAEConfig]]] = {
    "standard": (WeightedStandardTrainingSAE, WeightedStandardTrainingSAEConfig),
    "topk": (WeightedTopKTrainingSAE, WeightedTopKTrainingSAEConfig),
    "batchtopk": (WeightedBatchTopKTrainingSAE, WeightedBatchTopKTrainingSAEConfig),
    "jumprelu": (WeightedJumpReLUTrainingSAE, WeightedJumpReLUTrainingSAEConfig),
    "gba": (WeightedGBATrainingSAE, WeightedGBATrainingSAEConfig),
}


def weighted_config_class(base: str) -> type[TrainingSAEConfig]:
    """The ``weighted_<base>`` training config class, e.g. ``"topk"``.

    Args:
        base: a base architecture name: standard, topk, batchtopk, jumprelu or gba.
    """
    if base not in WEIGHTED_CLASSES:
        raise ValueError(
            f"no weighted version of architecture {base!r}; "
            f"available: {sorted(WEIGHTED_CLASSES)}"
        )
    return WEIGHTED_CLASSES[base][1]


def weighted_config(base_cfg: TrainingSAEConfig, **weight_fields: Any) -> Any:
    """The weighted version of a base training config, with every base field kept.

    Args:
        base_cfg: e.g. a ``TopKTrainingSAEConfig``.
        weight_fields: ``weight_alpha``, ``weight_estimation_batches``, ``weights_path``.
    """
    config_class = weighted_config_class(base_cfg.architecture())
    values = {f.name: getattr(base_cfg, f.name) for f in fields(base_cfg) if f.init}
    values["metadata"] = copy.deepcopy(base_cfg.metadata)
    return config_class(**values, **weight_fields)
