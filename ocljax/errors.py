"""User-facing errors: one clear message, non-zero exit, no traceback (see ``ocljax.cli``)."""


class OCLError(Exception):
    """Base class for errors caused by the user's input or environment, not by a bug."""


class ConfigError(OCLError):
    """An unknown learner, dataset or setting, or an impossible combination of sizes."""


class DataError(OCLError):
    """A data file that is missing, corrupt, or a dataset that cannot be obtained."""


class Interrupted(Exception):  # noqa: N818 - a stop request, not a failure
    """A run stopped on request (SIGINT / SIGTERM) after writing a final checkpoint."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by signal {signum}")
        self.signum = signum
