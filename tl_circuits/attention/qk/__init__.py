"""QK attributions (DESIGN.md §4): bases, the attribution itself, reverse passes and
QK-circuit interventions."""
