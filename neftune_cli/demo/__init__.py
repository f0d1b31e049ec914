"""The builtin tiny model, the demo tasks and the demo's before/after check."""
