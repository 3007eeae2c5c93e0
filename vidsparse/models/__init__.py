"""Model adapters: load a checkpoint, build prompts, turn frames into input embeddings."""
