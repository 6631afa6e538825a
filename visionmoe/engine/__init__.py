"""Workflows that run many models: `visionmoe compare`."""
