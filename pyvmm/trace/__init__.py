"""`pyvmm trace`: any VMM's KVM ioctls at start-up, and what each one waited for in the
kernel. record.py runs the command under a tracefs instance of its own (probesite.py finds
where the uprobe on ioctl() goes; strace.py is the fallback without tracefs); model.py builds
the start-up from the events (ioctls by fd kind, their arguments, the sleeps inside them,
the milestones); attribute.py says what each sleep waited for and what the start-up
paid; workloads.py holds the named presets (QEMU microvm); report.py renders and writes
it; cli.py is the command."""
