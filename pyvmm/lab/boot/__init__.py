"""The lab's third stage: booting a kit. The initramfs and its /init (initramfs.py),
the Python runtime collected into it (pyruntime.py), the emulator and busybox on this
host (tools.py), QEMU under TCG with its hang bounds (qemu.py) and the parser of what
/init writes back on the data port (serial.py)."""
