"""The encoder: frozen backbone + deep soft prompt + pooler -> (B, D) embeddings, and batched encoding."""
