"""leakhunt: memory-leak forensics for serving processes.

Finds memory that grows outside the heap (raw mmap, /dev/shm, pinned host buffers, driver
mappings) and names the library that maps it.
"""

__version__ = "0.1.0"
