"""Laying a step out on devices: meshes and shardings, several hosts, and the CPU backend."""
