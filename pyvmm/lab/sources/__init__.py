"""The lab's first stage: where kernels come from. Debian's metadata (debian.py), the
private apt state and downloads (apt.py), ELF and module files (elf.py), kits
(kits.py) and the cache they live in (cache.py)."""
