"""Test-wide setup, before anything imports jax: the CLI's own process environment (JAX on
the host CPU, libtpu quiet and shareable between processes), with the CPU simulated as
32 devices so the 4x8 mesh plans run."""

from capibara_export import environment

environment.prepare(target=None, cpu_devices=32)
