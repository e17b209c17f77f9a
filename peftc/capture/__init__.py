"""Capture: an nn.Module and a call become an ATen training-IR GraphModule (torch.export).

export (the torch.export call), layer_stacks (export two identical layers, copy the rest).
"""
