"""Process set-up that must happen before JAX initialises a backend.

- JAX_PLATFORMS=cpu unless the target is `local`: with libtpu installed, a plain
  `import jax` on a CPU host would try the TPU backend. Deviceless TPU topologies work
  regardless.
- The libtpu metadata variables, so a host with no TPU does not print libtpu's warnings
  about missing worker hostnames for every build.
- ALLOW_MULTIPLE_LIBTPU_LOAD, so two processes can compile for TPU at once (otherwise
  the second fails on libtpu's lockfile, /tmp/libtpu_lockfile).
- The number of simulated CPU devices for the `cpu` target.
User-set variables always win.
"""

from __future__ import annotations

import os
import re

# The seed's hardware (32 v4 chips, 4x8) as a default runtime exposes it (docs/design.md).
DEFAULT_TARGET = "tpu-v4-64"


def accelerator_type(target: str | None) -> str:
    """libtpu's TPU_ACCELERATOR_TYPE for a named slice (tpu-v4-64 -> v4-64, tpu-v5e-32 -> v5litepod-32)."""
    name = re.sub(r"^\d+x", "", target or "").removeprefix("tpu-")  # one slice of a multi-slice target
    if name.startswith("v5e-"):
        return "v5litepod-" + name.removeprefix("v5e-")
    return name if name.startswith("v4-") else "v4-32"


# Simulated CPU devices share this host's cores and memory, and every compiled program
# grows with them: one tiny encode_image program on 32x32 took 39 s and 1.5 GB here (16x16:
# 14 s, 0.7 GB); 4,096 devices take 23 s just to create. Beyond this the `cpu` target is
# no longer a test of anything: compile for a TPU target instead (deviceless, any size).
MAX_SIMULATED_CPU_DEVICES = 512


def prepare(target: str | None = None, cpu_devices: int | None = None) -> None:
    if target != "local":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_WORKER_ID", "0")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", accelerator_type(target))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    if cpu_devices:
        if cpu_devices > MAX_SIMULATED_CPU_DEVICES:
            from modelapi.errors import UserError   # imported only on the refusal

            raise UserError(f"{cpu_devices} simulated CPU devices: the `cpu` target simulates at most "
                            f"{MAX_SIMULATED_CPU_DEVICES} on one host; use a smaller --mesh, or a TPU --target "
                            "for larger meshes (they compile deviceless)")
        import jax

        try:
            jax.config.update("jax_num_cpu_devices", int(cpu_devices))
        except RuntimeError:
            # JAX already started in this process (a command called in-process, after other
            # JAX work): its devices serve if there are enough; programs take the first ones
            have = len(jax.devices("cpu"))
            if have < int(cpu_devices):
                from modelapi.errors import UserError

                raise UserError(f"this process already runs JAX on {have} CPU device(s) and {cpu_devices} "
                                "are needed; run the command in a new process") from None
