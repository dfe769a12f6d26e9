"""What the bench and the lab both read and write, below both: the sweep's plan and its
cells (plan.py), run.json's schema (runschema.py), the pure statistics and the verdict
(stats.py) and the report (report.py). Neither room imports the other."""
