"""Probes: occlusion (and, later, adversarial and invariance)."""
