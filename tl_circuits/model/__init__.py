"""Model plumbing: supported architectures and the MLP-input hook, prompts, loading
TransformerLens models."""
