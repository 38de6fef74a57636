"""Scoring and reporting: per-case metrics, report tables and figures."""
