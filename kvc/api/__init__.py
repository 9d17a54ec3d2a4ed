"""KVC's API: resource names, labels and annotations, and the VolumeManager models."""
