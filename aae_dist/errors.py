"""One exception type for every mistake a user can fix: the CLI prints it as one line."""


class UserError(Exception):
    """A problem with input, config or storage, phrased as 'what is wrong: how to fix it'."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # always one line
