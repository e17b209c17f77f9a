"""The IR: what a captured graph is made of and how it is edited.

sites (ops that consume a parameter), graph_edit (inserting nodes with their metadata),
adapters (the adapter module tree mounted on every graph), modes (train/eval as node
arguments), shapes (readable sizes), weight_codec and quantized (a packed base in the graph).
"""
