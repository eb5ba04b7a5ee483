"""What a model reference means: checkpoints, released prompts, loading by name, the ONNX graph and runtime."""
