"""State that outlives a request: live backend state, tenant keys, failures, background tasks,
and `shared/` (the same state across processes through Redis).
"""
