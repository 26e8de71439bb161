"""The harness's foundation (standard library and torch only; imports nothing else of ``experiments``).

- :mod:`.errors`: :class:`~.errors.SetupError` (what to install or do).
- :mod:`.provenance`: the machine, versions and commit every row carries.
- :mod:`.progress`: progress bars and status lines on stderr.
- :mod:`.timing`: the timers (``do_bench`` on CUDA, ``torch.utils.benchmark`` on CPU).
- :mod:`.results`: long CSV tables, written atomically, one context per table.
- :mod:`.runs`: run directories (``runs/<name>/``) and the committed reference ``results/``.
"""
