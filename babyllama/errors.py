"""The one exception type for user-facing mistakes.

The CLI turns a `BabyLlamaError` into a single line on stderr and a non-zero exit; anything else is a bug
and keeps its traceback.
"""


class BabyLlamaError(Exception):
    """A problem with the user's input (bad file, bad flag, missing dependency), not a bug."""
