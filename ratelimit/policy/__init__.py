"""Policy: rules, limit types, keys, configuration; what to limit and how."""
