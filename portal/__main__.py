"""
C{python -m portal}: the same as the C{portal} command.
"""

from portal.cli.main import main

main()
