"""Reading a process's memory from /proc: smaps parsing, region classes, the sampler loop."""
