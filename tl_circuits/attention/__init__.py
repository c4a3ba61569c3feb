"""Attention analyses of an attribution graph: which heads carried each edge
(:mod:`.heads`, DESIGN.md §3) and why a head attended where it did (:mod:`.qk`, §4)."""
