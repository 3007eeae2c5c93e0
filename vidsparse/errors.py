"""The one exception type for mistakes a user can make (the CLI prints it as a single line), and how
any exception becomes such a line."""


class UserError(Exception):
    """Bad input (file, video, question, model, option): shown to the user without a traceback."""


def first_line(error: BaseException, with_type: bool = True) -> str:
    """An exception as one line for the user: its first line of text (after its type name, unless
    `with_type` is False), or just its type name when it has no text."""
    text = str(error).strip()
    if not text:
        return type(error).__name__
    return f"{type(error).__name__}: {text.splitlines()[0]}" if with_type else text.splitlines()[0]
