"""Portal: portal/tunnel."""
