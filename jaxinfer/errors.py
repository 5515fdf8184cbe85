"""Exceptions users see when a checkpoint or model reference cannot be used."""


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupted or of a refused format."""


class ModelNotFoundError(FileNotFoundError):
    """A model reference (path, alias or hub id) could not be resolved to local files."""
