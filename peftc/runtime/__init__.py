"""The runtime: the compiled model users call, train and save."""
