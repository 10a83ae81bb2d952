"""Terminal renderers: rich views of typed results (summaries, process reports, investigation
results, tracer stats). Commands parse options, call the library, and hand results here."""
