"""The one exception type conversion raises for problems with the user's input.

The CLI turns it into a non-zero exit with the message, so every message must name the
problem (which file, which option, which value) and, where it can, the fix.
"""


class ConversionError(Exception):
    """Bad input (missing files, unsupported architecture, impossible ranks, ...)."""
