"""
The app gateway of routed HTTP mode: per-path access from an C{app.json}, identity headers, paired
terminals and peers (issue 7).
"""
