"""The one exception type users see: a sentence saying what is wrong and how to fix it."""


class LMError(Exception):
    """A mistake in the user's input (config, files, run directory), not a bug.

    The CLIs print its message as one line and exit non-zero, without a traceback.
    """


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, handled: the work stopped in a consistent state, and the message says what was kept.

    The CLIs print the message as one line and exit 130 (the shell's code for SIGINT).
    """
