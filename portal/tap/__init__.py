"""Portal: portal/tap."""
