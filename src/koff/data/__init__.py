"""Text data: domains and their files, documents, tokenising and packing into blocks,
deterministic batch streams, and the guard that keeps test text out of training."""
