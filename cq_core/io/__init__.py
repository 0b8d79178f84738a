"""Bytes on disk: the safetensors reader and streaming writer, direct I/O, shard sets, output safety, memory."""
