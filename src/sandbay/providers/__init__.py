"""Provider modules, one per sandbox provider. Each imports its SDK; import them lazily."""
