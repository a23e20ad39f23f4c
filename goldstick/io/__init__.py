"""Checkpoints on disk: reader, shard writer, formats, run folder, verification, loader."""
