"""Tests for Portal."""
