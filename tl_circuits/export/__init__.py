"""Exports for people and other tools: the frontend graph JSON with optional head-loading
and QK blocks, and a static picture."""
