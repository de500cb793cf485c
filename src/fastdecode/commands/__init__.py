"""CLI commands and the argument groups they share."""
