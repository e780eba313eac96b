"""
Tests for Portal.

Property tests run with no deadline and without hypothesis's "too slow" health check: the suite runs
on a 2-core machine beside real processes, where timing says nothing about correctness.
"""

from hypothesis import HealthCheck, settings

settings.register_profile("portal", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("portal")
