"""Firmware tables the guest reads to discover CPUs and interrupt routing."""
