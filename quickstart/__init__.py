"""The quickstart's own pieces (``scripts/quickstart.sh`` runs them from the repository root)."""
