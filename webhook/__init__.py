"""The mutating admission webhook that wires annotated Pods, TFJobs and PyTorchJobs to KVC volumes."""
