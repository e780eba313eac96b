"""Portal: portal/relay."""
