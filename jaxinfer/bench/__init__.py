"""Offline benchmarks users know from vLLM (`jaxinfer bench latency | throughput | startup`),
each with its floor (from the device's datasheet and from ceilings measured in the same run) and
HF transformers as a peer in the same invocation where torch is installed."""
