"""
Help text of the C{portal} commands: Twisted takes an option method's whole docstring as its help,
indentation included, which shows as runs of spaces in C{--help}; here each is one clean paragraph.
"""

from __future__ import annotations

from twisted.python import usage


class TidyHelp(usage.Options):
    """
    L{usage.Options} whose options' help texts have their whitespace collapsed.
    """

    def __init__(self) -> None:
        super().__init__()
        self.docs = {name: " ".join(doc.split()) if doc else doc for name, doc in self.docs.items()}
