"""The what-if simulator: a simulated fleet in simulated time, driven by the live policy classes."""
