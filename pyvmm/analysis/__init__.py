"""What the bench, the lab and the trace read, below all three: the sweep's plan, its
cells and the empty run.json (plan.py), run.json's schema (runschema.py), the pure
statistics and the verdict (stats.py) and the report (report.py)."""
