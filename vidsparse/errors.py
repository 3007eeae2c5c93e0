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
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    line = lines[0]
    if line.endswith(":") and len(lines) > 1:  # "Validation error for field 'x':" says why on the next line
        line = f"{line} {lines[1]}"
    return f"{type(error).__name__}: {line}" if with_type else line
