"""The one exception type for mistakes a user can make; the CLI prints it as a single line."""


class UserError(Exception):
    """Bad input (file, video, question, model, option): shown to the user without a traceback."""
