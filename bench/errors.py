"""The base of every error a user can cause (bad config, missing data, unreachable service).

The CLI reports these as one line and a non-zero exit; anything else is a bug and keeps
its traceback.
"""


class UserError(Exception):
    """Something the user can fix; the message says what to do."""


class Diverged(RuntimeError):
    """A client's training loss stopped being a number. The run fails with this line (the
    sweep records it and goes on to the next run): training on from NaN weights would only
    spend the budget and write chance accuracy as if it were a result."""
