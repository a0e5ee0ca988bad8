"""Helpers shared by the test suites (imported as ``support``)."""
