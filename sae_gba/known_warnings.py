"""Third-party warnings that say nothing about a run, silenced in one place.

Commands that print long logs (``sae-gba demo``, ``sae-gba inspect``) run inside
:func:`known_warnings_silenced`; importing the package changes no filter. Every
filter names one message and why it is harmless here; anything else still shows.
"""

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

# (message regex, category, module regex of the line that warns)
_WARNINGS: tuple[tuple[str, type[Warning], str], ...] = (
    # SAELens compares the number of dataset rows with the number of training tokens;
    # the embedded slice holds 4,090 windows of 128 tokens, so the message misstates
    # the shortfall. The demo's 560k tokens read the 519k-token slice 1.08 times,
    # as its preset intends.
    (r"The training dataset contains fewer samples", UserWarning, r"sae_lens\."),
    # ... and says so again when that second pass starts.
    (
        r"All samples in the training dataset have been exhausted",
        UserWarning,
        r"sae_lens\.",
    ),
    # SAELens's ActivationsStore wraps rows that it formatted as tensors itself in
    # torch.tensor(); the copy is made and correct, only torch's advice is printed.
    (r"To copy construct from a tensor", UserWarning, r"sae_lens\."),
    # Every SAE trained by SAELens's runner records the model's loader options
    # (center_writing_weights=False) and SAELens repeats them on every load; our
    # loaders already load models unprocessed, as the options ask.
    (r"\s*This SAE has non-empty model_from_pretrained_kwargs", UserWarning, ""),
)
# SAELens's runner logs these whenever a model or dataset object is passed in; the
# demo and presets pass both on purpose (offline model, in-memory tokens), and the
# saved config still names them.
_LOG_MESSAGES = ("You just passed in a dataset", "You just passed in a model")


class _DropKnownMessages(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_LOG_MESSAGES)


@contextmanager
def known_warnings_silenced() -> Iterator[None]:
    """Silence the known harmless third-party warnings inside the block."""
    log_filter = _DropKnownMessages()
    logger = logging.getLogger("sae_lens")
    with warnings.catch_warnings():
        for message, category, module in _WARNINGS:
            warnings.filterwarnings(
                "ignore", message=message, category=category, module=module
            )
        logger.addFilter(log_filter)
        try:
            yield
        finally:
            logger.removeFilter(log_filter)
