"""The streaming core: header -> plan -> reader (sources) -> sink. Imports no engine."""
