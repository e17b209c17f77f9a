"""The PEFT spec: a validated list of method configs, parsed through the method table."""
