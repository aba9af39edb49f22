"""Load tests, goodput reports and reliability scenarios for the family gateway (loopback only)."""
