"""The one exception type that the command line turns into a one-line message and a non-zero exit."""


class UserError(Exception):
    """Bad input or a bad state the user can fix; the message names the problem and the fix."""
