"""The base of every error a user can cause (bad config, missing data, unreachable service).

The CLI reports these as one line and a non-zero exit; anything else is a bug and keeps
its traceback.
"""


class UserError(Exception):
    """Something the user can fix; the message says what to do."""
