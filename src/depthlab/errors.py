"""The only exceptions users see. The CLI turns each into one line on stderr and exit code 2."""


class DepthlabError(Exception):
    """Base class: a problem with the user's input or environment, explained in one line."""


class ConfigError(DepthlabError):
    """A configuration key, value or combination of values is invalid."""


class DataError(DepthlabError):
    """A corpus, token shard or dataset folder is missing, empty, unreadable or inconsistent."""


class ModelLoadError(DepthlabError):
    """A model path, checkpoint or architecture cannot be loaded or is unsupported."""


class CheckpointError(DepthlabError):
    """A checkpoint is missing, truncated, corrupt, or belongs to a different configuration."""


class TrainingError(DepthlabError):
    """Training cannot continue (for example a non-finite loss)."""


class AnalysisError(DepthlabError):
    """An analysis metric cannot be computed for the given model or inputs."""


class EvalError(DepthlabError):
    """An evaluation task or its data is invalid."""


class StudyError(DepthlabError):
    """A study spec or study folder is invalid."""


class FileSystemError(DepthlabError):
    """A path cannot be written or read: read-only, not a folder, exists, name too long, permission, disk full."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped the work at a safe point; `saved` says what was kept for resuming."""

    def __init__(self, saved: str):
        super().__init__(saved)
        self.saved = saved
