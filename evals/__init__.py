"""The evaluation side of sae-gba, installed as ``sae_gba_evals`` (folder ``evals/``).

- :mod:`sae_gba_evals.saebench`: SAEBench's core and absorption evals on an SAE folder
  (``sae-gba eval``).
- :mod:`sae_gba_evals.compare`: GBA against SAELens's SAEs on the same tokens, width
  and L0 range (``sae-gba compare``).
- :mod:`sae_gba_evals.lab`: the GBA paper's synthetic feature-recovery experiments
  and the weighted-SAE experiment (``sae-gba synth``).
- :mod:`sae_gba_evals.suite`: the recovery suite over data families (``sae-gba synth
  suite``, ``scaling``).
- :mod:`sae_gba_evals.bench`: training-step throughput (``sae-gba bench``).
"""
