"""Offline fixtures: tiny random-weight models of the real architectures and synthetic grounding data."""
