"""The command line of a run, as it may be recorded: secret values redacted.

A training script's command line often carries credentials (``--api-key=...``, ``--wandb_token ...``). A run
directory is shared (and its HTML report more so), so the command is recorded only when asked
(``Probe(record_command=True)``), and then with the value of every option whose name contains ``key``, ``token``,
``secret`` or ``password`` (any case, ``-``/``_`` alike) replaced by ``***`` — in both ``--name=value`` and
``--name value`` forms. A value is never inspected, only the option name before it.
"""
from __future__ import annotations

import re
import shlex
from collections.abc import Sequence

__all__ = ["REDACTED", "is_secret_option", "redacted_command"]

REDACTED = "***"
_SECRET = re.compile(r"key|token|secret|passw(or)?d", re.IGNORECASE)


def is_secret_option(argument: str) -> bool:
    """Whether ``argument`` is an option (``-x``, ``--name``, ``--name=value``) whose name marks a secret."""
    if not argument.startswith("-") or argument in ("-", "--"):
        return False
    return bool(_SECRET.search(argument.lstrip("-").split("=", 1)[0]))


def redacted_command(argv: Sequence[str]) -> str:
    """``argv`` as one shell-quoted line with secret option values replaced by ``***``.

    >>> redacted_command(["train.py", "--api-key=abc", "--token", "xyz", "--lr", "0.1"])
    'train.py --api-key=*** --token *** --lr 0.1'
    """
    out: list[str] = []
    hide_next = False
    for argument in argv:
        if hide_next and not (argument.startswith("-") and argument != "-"):
            out.append(REDACTED)
            hide_next = False
            continue
        hide_next = False
        if is_secret_option(argument):
            if "=" in argument:
                out.append(argument.split("=", 1)[0] + "=" + REDACTED)
            else:
                out.append(argument)
                hide_next = True
            continue
        out.append(argument)
    return " ".join(part if part == REDACTED or "=" + REDACTED in part else shlex.quote(part) for part in out)
