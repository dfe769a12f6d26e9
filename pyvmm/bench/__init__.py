"""The boot-cost lab: recipes, runners (C helper and Python VMM), stats, reports."""
