"""Built-in model architectures, per framework, for `.pth` state_dict uploads and demos."""
