"""The activation harvest's rate on the embedded model (part of ``sae-gba bench``)."""

import time

import torch
from tqdm.auto import tqdm


def harvest_rate(windows: int = 48, batch_windows: int = 16) -> dict[str, float]:
    """Tokens/s of :func:`sae_gba.lm.harvest.harvest` on the embedded Gemma-3-270M.

    Layer 9 resid_post in bfloat16 on 128-token windows, the forward pass stopped
    after the hooked block; BOS positions are dropped and not counted.
    """
    from sae_gba.embedded import EMBEDDED_MODEL_NAME, embedded_token_dataset
    from sae_gba.lm.harvest import harvest
    from sae_gba.lm.models import load_model
    from sae_gba.presets import EMBEDDED

    start = time.perf_counter()
    model = load_model(EMBEDDED_MODEL_NAME, dtype=torch.bfloat16)
    load_seconds = time.perf_counter() - start
    tokens = torch.tensor(
        embedded_token_dataset("train", EMBEDDED.context_size)["tokens"][
            : windows + batch_windows
        ]
    )
    hook = EMBEDDED.hook_name
    harvest(model, hook, tokens[:batch_windows], progress=False)  # warm-up
    start = time.perf_counter()
    n = 0
    starts = range(batch_windows, batch_windows + windows, batch_windows)
    for i in tqdm(starts, desc="bench: harvest", unit="batch"):
        n += len(harvest(model, hook, tokens[i : i + batch_windows], progress=False))
    seconds = time.perf_counter() - start
    return {
        "harvest_tokens_per_s": n / seconds,
        "harvest_tokens_timed": n,
        "model_load_seconds": load_seconds,
    }
