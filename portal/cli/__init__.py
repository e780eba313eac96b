"""
Every C{portal} command's argument parsing and output: C{expose}, C{demo}, C{identity}, C{relays},
C{pair}, C{terminals}, C{peers}. The console script is L{portal.cli.main.main}.

The top layer, beside L{portal.tap}: it may import anything in C{portal}; nothing imports it.
"""
