"""Thin Linux kernel interfaces (cgroups, ...): file and syscall access only, no policy.

Isolators call these modules; the modules know nothing of containers or isolators. Each takes its
filesystem roots (procfs, cgroupfs) as parameters so tests can feed synthetic files.
"""
