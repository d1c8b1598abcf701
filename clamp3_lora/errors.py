"""The project's exceptions: every error raised on purpose derives from Clamp3LoraError."""


class Clamp3LoraError(Exception):
    """Base of the errors this project raises on purpose."""


class MusicFormatError(Clamp3LoraError, ValueError):
    """Music text or a music file that cannot become patches (the message names the file)."""


class CheckpointError(Clamp3LoraError):
    """A model or training checkpoint that does not fit (keys, sizes, corruption; names the file)."""


class DataError(Clamp3LoraError):
    """A data file problem that stops a run (names the file, and the line where there is one)."""


class DistributedError(Clamp3LoraError):
    """A collective operation across the torchrun processes failed: another process was lost
    (crashed, killed) or did not answer within the collective timeout (--dist-timeout-s)."""
