"""The decoder-only Transformer (Flax Linen): layers, attention, the stack, and KV-cache decoding."""
