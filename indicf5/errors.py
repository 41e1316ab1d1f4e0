"""Errors a user can fix. The CLI prints their message on one line and exits with status 2."""


class InputError(ValueError):
    """Bad input: a missing or corrupt file, unusable text or audio, a checkpoint of another model.
    The message says what was wrong and what to do."""
