"""
Help text of the C{portal} commands: Twisted takes an option method's whole docstring as its help,
indentation included, which shows as runs of spaces in C{--help}; here each is one clean paragraph.
And C{--version} prints Portal's version, not Twisted's.
"""

from __future__ import annotations

import sys

from twisted.python import usage

import portal


class TidyHelp(usage.Options):
    """
    L{usage.Options} whose options' help texts have their whitespace collapsed, and whose
    C{--version} is Portal's.
    """

    def __init__(self) -> None:
        super().__init__()
        self.docs = {name: " ".join(doc.split()) if doc else doc for name, doc in self.docs.items()}

    def opt_version(self) -> None:
        """
        Print Portal's version and exit.
        """
        print(f"portal {portal.__version__}")
        sys.exit(0)
