"""Detectors: the trigger suite, audit metrics, the audit itself and the trigger scan."""
