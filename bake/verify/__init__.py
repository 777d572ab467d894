"""Verification: probes, passes, the reference schedule, the noise floor, statistics, reports and the
tolerance table."""
