"""The base of every error that reports bad user input (the CLI prints these without a traceback)."""


class UserInputError(ValueError):
    """A recipe, file, model or directory that cannot be used; the message names it and says why."""
