"""From samples and traced mappings to verdicts: slopes, plateaus, attribution, known culprits."""
