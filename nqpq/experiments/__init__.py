"""The experiments: the sweep and the scan with their settings, calibration, crystallinity, batching and torchrun."""
