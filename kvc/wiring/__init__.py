"""Wiring workloads to KVC volumes (pure): the ``kvc/*`` annotations (``grammar``), finding the
volumes they ask for in a namespace's VolumeManagers (``resolve``), and the wired copy of a
pod or training workload (``mutation``). The webhook wires at admission with it; the
controller releases gated pods with the same code, so a released pod ends up exactly as if
it had been admitted with its data Ready."""
