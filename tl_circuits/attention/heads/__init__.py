"""Head loadings (DESIGN.md §3)."""
