"""Probe families defined outside the epviz package, registered on import."""
