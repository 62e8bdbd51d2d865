"""Plant sparse features in synthetic data, train GBA on it and measure how many it
recovers (FRR: true features with a learned direction at cosine > 0.9). Seconds.

    python examples/synthetic_recovery.py
"""

import os

import torch
from sae_lens import TrainingSAE

from sae_gba.recovery import best_match_cosine
from sae_gba.synthetic import SyntheticFeatureModel, uniform_preset
from sae_gba.training import TensorDataProvider, make_trainer

steps = int(os.environ.get("EXAMPLE_STEPS", 400))
data = SyntheticFeatureModel(uniform_preset(sparsity=3, n_features=64, d=32))
x, _ = data.sample(32_768, torch.Generator().manual_seed(0))

torch.manual_seed(0)
sae = TrainingSAE.from_dict(
    {"architecture": "gba", "d_in": 32, "d_sae": 256, "n_groups": 4,
     "adaptation_interval": 5}
)  # fmt: skip
make_trainer(
    sae, TensorDataProvider(x, 256), total_tokens=256 * steps, batch_size=256, lr=3e-3
).fit()

best = best_match_cosine(sae.W_dec.detach(), data.feature_directions)
l0 = (sae.encode(x[:4096]) > 0).float().sum(-1).mean()
print(f"FRR@0.9 {(best > 0.9).float().mean():.2f}, mean best cosine "
      f"{best.mean():.3f}, L0 {l0:.1f} (3 features active per sample)")  # fmt: skip
