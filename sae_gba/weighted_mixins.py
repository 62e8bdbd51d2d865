"""The two mixins behind every ``weighted_<base>`` architecture (``weighted_sae``): the
config's weighting fields and their checks, and the training SAE's weighted
reconstruction loss, variance estimate, checkpointed state and export."""

import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeAlias

import torch
import torch.nn.functional as F
from sae_lens.saes.sae import (
    SAEConfig,
    TrainingSAE,
    TrainingSAEConfig,
    TrainStepInput,
    TrainStepOutput,
)
from safetensors.torch import save_file
from typing_extensions import override

from sae_gba.buffers import keep_float32, restore_state_dtypes
from sae_gba.collectives import gather_rows
from sae_gba.config_fields import check_field
from sae_gba.gba_sae import MIN_RELATIVE_SPREAD, _check_finite
from sae_gba.wsae_weights import (
    INPUT_WEIGHTS_FILENAME,
    WEIGHTS_TENSOR_NAME,
    check_input_weights,
    input_weights,
    load_input_weights,
)

# Type checkers see the mixins as what they extend; at run time they are plain mixins.
if TYPE_CHECKING:
    _ConfigBase: TypeAlias = TrainingSAEConfig
    _TrainingBase: TypeAlias = TrainingSAE[Any]
else:
    _ConfigBase = _TrainingBase = object

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
