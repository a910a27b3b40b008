"""The one exception type users see for bad input."""


class RewriteError(ValueError):
    """Bad input: the message is one sentence naming the input, what was wrong and what would be accepted.

    The CLI prints it without a traceback and exits with status 2.
    """
