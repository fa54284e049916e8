"""Defenses, one module (or small package) each."""
