"""Exceptions that carry a message meant for the person running xpsr."""


class UserError(Exception):
    """A problem the user can fix: a missing path, a bad config value, an unwritable folder.

    The CLI prints its message as one paragraph and exits non-zero without a traceback.
    """


class FailureRatioExceeded(UserError):
    """More inputs failed than the configured threshold allows (the outputs that worked are kept)."""
