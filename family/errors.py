"""The one error type of the offline layers (family/ and plrd/).

Anything a user can cause (a bad path, an impossible target, a corrupted member) raises FamilyError
with a message that reads as one line; the CLI prints it and exits non-zero, never a traceback.
"""


class FamilyError(Exception):
    """A user-facing error of the offline tools: the message is the whole explanation."""
