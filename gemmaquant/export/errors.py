"""The one error type exporters raise for bad input; its message names the tensor or file at fault."""

from gemmaquant.errors import GemmaquantError


class ExportError(GemmaquantError, ValueError):
    """Bad input to an exporter (a type that cannot hold a shape, a name clash, a write failure, ...).

    Raised before anything exists at the target path, or after the partial output was removed."""
