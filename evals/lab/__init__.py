"""The GBA paper's synthetic feature-recovery experiments (``sae-gba synth``)."""
