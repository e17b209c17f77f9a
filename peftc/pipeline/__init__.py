"""The pass pipeline: run rewrite passes in order, check invariants after each, keep records.

runner (PassResult, PassContext, run_pipeline), invariants, changes (what a pass erased or rewired).
"""
