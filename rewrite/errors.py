"""The one exception type users see for bad input."""


class RewriteError(ValueError):
    """Bad input: the message is one sentence naming the input, what was wrong and what would be accepted.

    The CLI prints it without a traceback and exits with status 2.
    """


def causes(error: BaseException) -> list[BaseException]:
    """The errors behind `error` (`raise ... from`), nearest first: a RewriteError says it in our words,
    and the third-party text it replaced (ONNX Runtime's, transformers') stays here, for `-v`."""
    found: list[BaseException] = []
    while error.__cause__ is not None and error.__cause__ not in found:
        error = error.__cause__
        found.append(error)
    return found
