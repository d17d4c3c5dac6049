"""Errors the PKI layer raises: each names the field at fault and what is allowed."""


class PKIError(ValueError):
    """A bad input or an unusable key/certificate; `field` says which input was wrong."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
