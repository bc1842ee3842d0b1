"""One base class for every user-facing error: the CLI prints it and exits non-zero."""


class RaysoupError(ValueError):
    pass
