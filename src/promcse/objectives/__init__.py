"""Training objectives on embeddings: pure tensor losses (NT-Xent, energy hinge, SupCon, distillation) and their registry."""
