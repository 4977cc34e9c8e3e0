"""The one exception type users see: a clear, one-line reason (the CLI prints it and exits 2)."""


class ConversionError(Exception):
    """Bad input or an unsupported feature; the message names the field, file or tensor."""
