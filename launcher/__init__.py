"""Mesos-style containerizer."""
