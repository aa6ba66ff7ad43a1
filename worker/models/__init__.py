"""Native (transformers 5.x) ports of model-specific processing code."""
